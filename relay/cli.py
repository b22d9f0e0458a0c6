"""The pbx-relay command: run the relay, manage the PBX directory, check a config."""

from __future__ import annotations

import argparse
import errno
import os
import sys

import trio

from relay import config as config_mod
from relay.operator import add_commands as add_operator_commands
from relay.pbx.directory import DirectoryError, PbxDirectory

DEFAULT_CONFIG_ENV = "PBX_RELAY_CONFIG"


def _load(args: argparse.Namespace) -> config_mod.RelayConfig:
    overrides = {}
    if getattr(args, "state_dir", None):
        overrides["relay.state_dir"] = args.state_dir
    path = args.config or os.environ.get(DEFAULT_CONFIG_ENV) or None
    return config_mod.load(path, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    """Serve until stopped; SIGHUP reloads what it can, SIGTERM drains (relay.drain_timeout),
    SIGINT stops at once. Under systemd (Type=notify) it reports READY/STATUS/WATCHDOG."""
    from pbxcore.journal import configure_logging
    from relay.service import run

    cfg = _load(args)
    configure_logging(cfg["relay.log_level"])
    try:
        trio.run(run, cfg, lambda: _load(args))
    except KeyboardInterrupt:
        return 0
    except BaseException as e:  # noqa: B036 - re-raised unless it is one we explain
        # Errors from inside the task tree arrive wrapped in exception groups.
        leaf = _leaf(e, (config_mod.ConfigError, OSError))
        if leaf is None:
            raise
        if isinstance(leaf, config_mod.ConfigError):
            print(f"pbx-relay: {leaf}", file=sys.stderr)
            return 2
        bind = isinstance(leaf, OSError) and leaf.errno in (
            errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
        print(f"pbx-relay: {'cannot listen: ' if bind else ''}{leaf}", file=sys.stderr)
        return 1
    return 0


def _leaf(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _leaf(sub, kinds)
            if found is not None:
                return found
    return None


def cmd_pbx(args: argparse.Namespace) -> int:
    cfg = _load(args)
    directory = PbxDirectory(cfg.state_dir / "pbx.sqlite")
    if args.action == "add":
        try:
            secret = directory.add(args.serial, cfg["relay.domain"])
        except DirectoryError as e:
            print(f"pbx-relay: {e}", file=sys.stderr)
            return 1
        print(f"serial   {args.serial}")
        print(f"secret   {secret}")
        print(f"register sip:{args.serial}@{cfg['relay.domain']} (digest user {args.serial})")
        print("The secret is shown once and stored only as a digest hash.")
        return 0
    if args.action == "remove":
        if directory.remove(args.serial):
            print(f"removed {args.serial}")
            return 0
        print(f"pbx-relay: no PBX {args.serial}", file=sys.stderr)
        return 1
    for serial, realm, _created in directory.list():
        print(f"{serial}\t{realm}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{cfg.source}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pbx-relay", description=__doc__)
    p.add_argument("-c", "--config", help=f"relay.toml (default: ${DEFAULT_CONFIG_ENV} or built-in defaults)")
    p.add_argument("--state-dir", help="override relay.state_dir")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the relay on 127.0.0.1 with embedded defaults").set_defaults(fn=cmd_run)
    pbx = sub.add_parser("pbx", help="manage the PBX directory")
    pbx.add_argument("action", choices=["add", "list", "remove"])
    pbx.add_argument("serial", nargs="?")
    pbx.set_defaults(fn=cmd_pbx)
    conf = sub.add_parser("config", help="check a configuration file")
    conf.add_argument("action", choices=["check"])
    conf.set_defaults(fn=cmd_config)
    add_operator_commands(sub, _load)
    args = p.parse_args(argv)
    if args.command == "pbx" and args.action != "list" and not args.serial:
        p.error(f"pbx {args.action} needs a serial")
    try:
        return int(args.fn(args))
    except config_mod.ConfigError as e:
        print(f"pbx-relay: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
