"""The pbx-relay command: run the relay, manage the PBX directory, check a config, operator verbs."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbxcore.cli import command_parser, find_leaf, run_command
from pbxcore.errors import ListenError, PbxError, ServiceUnavailable
from pbxcore.http import request_json
from pbxcore.statedir import private_dir
from relay import config as config_mod
from relay import operator
from relay.admin import DIRECTORY_RELOAD
from relay.pbx.directory import SERIAL_RULE, DirectoryError
from relay.pbx.shared import open_directory
from relay.provisioning.command import add_link_command

PROG = "pbx-relay"
DEFAULT_CONFIG_ENV = config_mod.CONFIG_ENV
RELOAD_TIMEOUT = 10.0  # seconds the running relay has to read the directory after `pbx add`
DIRECTORY_POLL = 2.0  # relay/service.py's DIRECTORY_POLL: how soon a relay without the route notices

DESCRIPTION = """\
The pbx-relay command: run the SIP/RTP relay (with the push service embedded), manage
its PBX directory, check its configuration, and inspect or erase what the running
services hold.

Options go before or after the command: `pbx-relay run --config relay.toml` and
`pbx-relay --config relay.toml run` are the same. Without --config (or $PBX_RELAY_CONFIG)
the built-in defaults apply, with the state in ./state of the source checkout."""


def operator_command() -> str:
    """How the operator runs this command here, for the banner: ``./dev.sh`` from a
    checkout started by dev.sh (which says so in $PBX_RELAY_COMMAND), else ``pbx-relay``."""
    return os.environ.get(config_mod.COMMAND_ENV) or PROG


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"relay.toml (default: ${DEFAULT_CONFIG_ENV}, else the built-in defaults)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="override relay.state_dir (relative to the current directory)")


def _load(args: argparse.Namespace, more: dict[str, Any] | None = None) -> config_mod.RelayConfig:
    overrides: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        overrides["relay.state_dir"] = args.state_dir
    path = getattr(args, "config", None) or os.environ.get(DEFAULT_CONFIG_ENV) or None
    return config_mod.load(path, {**overrides, **(more or {})})


# ------------------------------------------------------------------ run


def cmd_run(args: argparse.Namespace) -> int:
    """Serve until stopped; SIGHUP reloads what it can, SIGTERM drains (relay.drain_timeout),
    SIGINT stops at once. Under systemd (Type=notify) it reports READY/STATUS/WATCHDOG."""
    import gc

    import trio

    from pbxcore.journal import configure_logging
    from relay import workers
    from relay.service import run

    cfg = _load(args)
    if args.workers is None:  # one per core with a shared store (docs/cluster.md, "Workers")
        args.workers = 1 if args.worker else workers.default_workers(cfg, os.cpu_count())
    workers.check_workers(cfg, args.workers)
    reuse_port = args.workers > 1
    load = lambda: _load(args)  # noqa: E731
    if args.worker:  # one of the parent's workers: its own node id, ports, RTP slice
        index, count = workers.parse_worker(args.worker)
        more = workers.worker_overrides(cfg, index, count)
        cfg, reuse_port = _load(args, more), True
        load = lambda: _load(args, more)  # noqa: E731
    configure_logging(cfg.relay.log_level)
    if args.worker:
        workers.tag_log_lines(index)
    private_dir(cfg.state_dir)  # 0700: pbx.sqlite holds digest hashes, relay.key signs flow tokens
    if args.workers > 1 and not args.worker:
        return _run_parent(args, cfg)
    # Every module is imported by now and lives as long as the process: out of the
    # collector's sight, a full collection scans only what calls made. At 400 calls/s
    # those collections paused the relay 35-95 ms every ~5 s (the setup-time p99), about
    # half of it this start-up heap (bench/RESULTS.md, issue 9; gc.freeze in the docs).
    gc.freeze()
    try:
        trio.run(run, cfg, load, None, reuse_port)
    except KeyboardInterrupt:
        return 0
    except BaseException as e:  # noqa: B036 - re-raised, a bind failure named first
        raise _named_bind_failure(e) or e from None
    return 0


def _run_parent(args: argparse.Namespace, cfg: config_mod.RelayConfig) -> int:
    """``--workers N``: what the workers share is made once, here, before they start (the
    self-signed certificate; the embedded push service's key and API secret; the node key
    comes from the cluster secret); then the parent supervises them."""
    import trio

    from relay import workers
    from relay.pushlink import prepare_workers_push
    from relay.service import tls_files

    if cfg.listeners("tls") or cfg.provisioning.enabled:
        tls_files(cfg)
    push = trio.run(prepare_workers_push, cfg) if cfg.push.mode == "embedded" else None
    watchdog = workers.WORKER_WATCHDOG if args.worker_watchdog is None else args.worker_watchdog
    if not watchdog > 0:
        raise config_mod.ConfigError(f"--worker-watchdog {watchdog:g}: seconds, more than 0")
    argv = workers.worker_argv(getattr(args, "config", None), getattr(args, "state_dir", None))
    try:
        trio.run(workers.run_workers, argv, args.workers, cfg, None, watchdog, push)
    except KeyboardInterrupt:
        return 0
    return 0


# What a listener that cannot bind raises (EADDRINUSE, EADDRNOTAVAIL, EACCES).
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _named_bind_failure(exc: BaseException) -> ListenError | None:
    """A bare OSError from binding, as a ListenError. The admin endpoint and the push
    service raise ListenError themselves; until the SIP transports do too (see the
    lead's note), an unnamed bind failure can only be a SIP listener's."""
    if find_leaf(exc, ListenError) is not None:
        return None
    err = find_leaf(exc, OSError)
    if not isinstance(err, OSError) or err.errno not in BIND_ERRNOS:
        return None
    return ListenError("SIP", "one of sip.udp, sip.tcp, sip.tls", err.errno, err.strerror or "")


# ------------------------------------------------------------------ the PBX directory


def cmd_pbx(args: argparse.Namespace) -> int:
    """pbx add|list|remove: the PBX directory the relay authenticates PBXs against."""
    cfg = _load(args)
    directory = open_directory(cfg.state_dir, cfg.cluster.redis_url)
    if args.action == "show":
        return operator.cmd_pbx_show(args, cfg)
    if args.action == "list":
        for serial, realm, _created in directory.list():
            print(f"{serial}\t{realm}")
        return 0
    if args.action == "add":
        secret = directory.add(args.serial, cfg.relay.domain)
        print(f"serial   {args.serial}")
        print(f"secret   {secret}")
        print(f"register sip:{args.serial}@{cfg.relay.domain} (digest user {args.serial})")
        print("The secret is shown once and stored only as a digest hash.")
    elif not directory.remove(args.serial):
        raise DirectoryError(f"no PBX {args.serial}")
    else:
        print(f"removed {args.serial}")
    tell_running_relay(cfg)
    return 0


def tell_running_relay(cfg: config_mod.RelayConfig, warn: Callable[[str], None] | None = None) -> bool:
    """Ask the relay at admin.listen to read the directory now (POST /v1/directory/reload;
    it answers once applied). True when it did. A relay that keeps its state elsewhere,
    or none answering, is said on stderr: the change waits for a relay that reads it."""
    say = warn or (lambda text: print(f"{PROG}: {text}", file=sys.stderr))
    url = f"http://{cfg.admin_listen.client_address()}{DIRECTORY_RELOAD}"
    try:
        answer = request_json(url, what="the relay's admin endpoint", method="POST", timeout=RELOAD_TIMEOUT)
    except ServiceUnavailable:
        return False  # no relay runs here: the next one to start reads the directory
    except PbxError:
        # An older relay without the route, or one that could not read the file now.
        say(f"note: the relay at {url} did not reload; it reads the directory within {DIRECTORY_POLL:g} s")
        return False
    theirs = Path(str(answer.get("state_dir", ""))) if isinstance(answer, dict) else None
    if theirs is not None and theirs != cfg.state_dir.resolve():
        say(f"warning: the relay at {cfg.admin_listen.client_address()} keeps its state in {theirs}, "
            f"not {cfg.state_dir.resolve()}: it does not see this change (give this command the relay's "
            "--config or --state-dir)")
        return False
    return True


def cmd_config(args: argparse.Namespace) -> int:
    """config check: load the file (and its environment overrides) and say ok."""
    cfg = _load(args)
    print(f"{cfg.source}: ok")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """pbx-relay's argument parser; the common options are taken before and after the verb."""
    p, common, sub = command_parser(PROG, DESCRIPTION, _common)
    run = sub.add_parser("run", parents=[common], help="run the relay and the embedded push service",
                         description="Run the relay (and, with push.mode = \"embedded\", the push service) "
                         "until stopped. It prints what listens where and how to point a PBX and a "
                         "softphone at it. SIGHUP reloads, SIGTERM drains, Ctrl-C stops at once.")
    run.add_argument("--workers", type=int, metavar="N",
                     help="run N relay processes (nodes of one cluster, sharing [cluster] redis_url) "
                     "behind the same SIP ports and push API, supervised by this one (default: one "
                     "per core when [cluster] redis_url is set, else 1; docs/cluster.md)")
    run.add_argument("--worker-watchdog", type=float, metavar="SECONDS",
                     help="with --workers: a worker whose health check (its timer task runs, a "
                     "thread answers) stays silent this long is killed and started again (default 30)")
    run.add_argument("--worker", help=argparse.SUPPRESS)  # i/N: set by the parent for each worker
    run.set_defaults(fn=cmd_run)
    pbx = sub.add_parser("pbx", parents=[common], help="the PBX directory: add, list, remove, show",
                         description="Manage the PBXs allowed to phone home. `add` prints the new PBX's "
                         "secret once (only digest hashes are kept) and makes a running relay read the "
                         "directory at once, so the PBX can register as soon as the command returns.")
    pbx.add_argument("action", choices=["add", "list", "remove", "show"],
                     help="add SERIAL (prints its secret once), list, remove SERIAL, show SERIAL "
                     "(online or not, its devices: from the running services)")
    pbx.add_argument("serial", nargs="?", help=f"the PBX's serial: {SERIAL_RULE}")
    operator.json_option(pbx)
    operator.token_option(pbx)
    pbx.set_defaults(fn=cmd_pbx)
    conf = sub.add_parser("config", parents=[common], help="check a configuration file",
                          description="Load the configuration (file and PBX_RELAY_* variables) and say "
                          "ok, or name the file and the key that is wrong (exit 2).")
    conf.add_argument("action", choices=["check"], help="check: validate and say ok")
    conf.set_defaults(fn=cmd_config)
    operator.add_commands(sub, _load, parents=[common])
    add_link_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pbx-relay``."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "pbx" and args.action != "list" and not args.serial:
        p.error(f"pbx {args.action} needs a serial")
    return run_command(PROG, lambda: int(args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
