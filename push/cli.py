"""The pbx-push command: run the push service, check its config, mint tokens, export and erase users."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from typing import Any
from urllib.parse import quote

from pbxcore.cli import command_parser, iso_time, print_json, run_command
from pbxcore.errors import PbxError
from pbxcore.http import request_json
from push import config as config_mod
from push.config import CONFIG_ENV, PushConfig

PROG = "pbx-push"
CLI_TOKEN_TTL = 60  # seconds: the operator token each CLI call mints for itself
HTTP_TIMEOUT = 30.0

DESCRIPTION = """\
The pbx-push command: run the push wake-up service alone (APNs/FCM, device registry,
push log, HTTP API), check its configuration, mint API tokens, and inspect, export or
erase what the running service holds.

Options go before or after the command (`pbx-push run -c push.toml` works). Without
--config (or $PBX_PUSH_CONFIG) the built-in defaults apply."""


class CliError(PbxError):
    """A failure to report as ``pbx-push: <message>``, exit 1."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"push.toml (default: ${CONFIG_ENV}, else the built-in defaults)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="override push.state_dir (relative to the current directory)")


def _load(args: argparse.Namespace) -> PushConfig:
    overrides = {}
    if getattr(args, "state_dir", None):
        overrides["push.state_dir"] = args.state_dir
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None
    return config_mod.load(path, overrides)


# ------------------------------------------------------------------ service


def cmd_run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads log level, retention and gateway
    credentials. Under systemd (Type=notify) it reports READY/STATUS/WATCHDOG."""
    import trio

    from pbxcore.journal import configure_logging
    from push.app import run

    cfg = _load(args)
    configure_logging(cfg.push.log_level)
    try:
        trio.run(run, cfg, lambda: _load(args))
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """config check: load the file and the variables, check the files they name."""
    cfg = _load(args)
    config_mod.check_files(cfg)
    print(f"{cfg.source}: ok")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """token: print a bearer token for the API, signed with the API secret."""
    from push.api import mint_token
    from push.app import load_api_secret

    cfg = _load(args)
    if args.scope == "pbx" and not args.serial:
        raise CliError("a pbx token needs --serial")
    if args.scope != "pbx" and args.serial:
        raise CliError("--serial is for pbx tokens only")
    if not 0 < args.ttl <= cfg.api.token_ttl_max:
        raise CliError(f"--ttl must be 1..{cfg.api.token_ttl_max} seconds (api.token_ttl_max)")
    sub = args.sub or (f"pbx:{args.serial}" if args.scope == "pbx" else args.scope)
    print(mint_token(load_api_secret(cfg), args.scope, sub, args.serial, args.ttl))
    return 0


# ------------------------------------------------------------------ operator verbs


def _verify(cfg: PushConfig, args: argparse.Namespace) -> ssl.SSLContext | bool:
    if args.ca_file:
        return ssl.create_default_context(cafile=args.ca_file)
    if cfg.api_tls and not args.url:
        return cfg.api_verify()
    return True


def _call(args: argparse.Namespace, method: str, path: str, params: dict[str, str] | None = None) -> Any:
    from push.api import mint_token
    from push.app import load_api_secret

    cfg = _load(args)
    url = (args.url or cfg.api_url).rstrip("/")
    token = mint_token(load_api_secret(cfg), "operator", "pbx-push-cli", ttl=CLI_TOKEN_TTL)
    return request_json(url + path, what="the push service", method=method, token=token,
                        verify=_verify(cfg, args), params=params, timeout=HTTP_TIMEOUT,
                        hint="is `pbx-push run` up?")


def _user_path(args: argparse.Namespace) -> str:
    return f"/v1/users/{quote(args.serial, safe='')}/{quote(args.username, safe='')}"


def cmd_devices(args: argparse.Namespace) -> int:
    """devices: the registered devices, never their tokens."""
    params = {k: v for k, v in (("serial", args.serial), ("username", args.username)) if v}
    devices = _call(args, "GET", "/v1/devices", params)
    if args.json:
        print_json(devices)
        return 0
    print("device_id\tprovider\tserial\tusername\taddress\tupdated_at")
    for d in devices:
        ip = f"[{d['ip']}]" if ":" in d["ip"] else d["ip"]
        print(f"{d['device_id']}\t{d['provider']}\t{d['serial']}\t{d['username']}\t"
              f"{d['transport']}:{ip}:{d['port']}\t{iso_time(d['updated_at'])}")
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    """device ID: one device as JSON."""
    print_json(_call(args, "GET", f"/v1/devices/{quote(args.device_id, safe='')}"))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    """log SERIAL USER: the user's push log as JSON."""
    print_json(_call(args, "GET", _user_path(args) + "/log"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """export SERIAL USER: everything held about the user, as JSON."""
    print_json(_call(args, "GET", _user_path(args) + "/export"))
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """erase SERIAL USER: delete everything held about the user."""
    counts = _call(args, "DELETE", _user_path(args))
    print(f"erased {args.serial}/{args.username}: {counts['devices']} device(s), "
          f"{counts['push_log_rows']} push log row(s)")
    return 0


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """pbx-push's argument parser; the common options are taken before and after the verb."""
    p, common, sub = command_parser(PROG, DESCRIPTION, _common)
    sub.add_parser("run", parents=[common], help="run the push service (API, admin endpoint, purges)",
                   description="Serve the API and the admin endpoint, purge old rows, until stopped. "
                   "SIGHUP reloads gateway credentials, retention and the log level.",
                   ).set_defaults(fn=cmd_run)
    conf = sub.add_parser("config", parents=[common], help="check a configuration file",
                          description="Load the configuration (file and PBX_PUSH_* variables), check the "
                          "files it names, and say ok or name the file and the key (exit 2).")
    conf.add_argument("action", choices=["check"], help="check: validate and say ok")
    conf.set_defaults(fn=cmd_config)
    tok = sub.add_parser("token", parents=[common], help="print an API token signed with the API secret",
                         description="Mint a bearer token (HS256 JWT) for the push API.")
    tok.add_argument("--scope", required=True, choices=["relay", "pbx", "operator"],
                     help="relay: register and wake devices; pbx: the same for one PBX's devices, "
                     "and its users' export/erase; operator: everything")
    tok.add_argument("--serial", help="the PBX's serial (pbx tokens only)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600, "
                     "at most api.token_ttl_max)")
    tok.add_argument("--sub", help="who the token is for (default: the scope, or pbx:<serial>)")
    tok.set_defaults(fn=cmd_token)
    _operator_verbs(sub, common)
    return p


def _operator_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                    common: argparse.ArgumentParser) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", help="the running service's API (default: from api.listen)")
    remote.add_argument("--ca-file", help="CA bundle to verify the API's certificate")
    dev = sub.add_parser("devices", parents=[common, remote],
                         help="list registered devices (never their tokens)",
                         description="Devices the running service holds; push tokens are never shown.")
    dev.add_argument("--serial", help="only this PBX's devices")
    dev.add_argument("--username", help="only this user's devices")
    dev.add_argument("--json", action="store_true", help="JSON instead of a table")
    dev.set_defaults(fn=cmd_devices)
    one = sub.add_parser("device", parents=[common, remote], help="show one device (JSON)",
                         description="One device, by the id `devices` shows.")
    one.add_argument("device_id", help="the device's id")
    one.set_defaults(fn=cmd_device)
    for name, fn, text in (
        ("log", cmd_log, "a user's push log (JSON, kept 7 days at most)"),
        ("export", cmd_export, "everything held about a user (JSON, GDPR Art. 15/20)"),
        ("erase", cmd_erase, "delete everything held about a user (GDPR Art. 17)"),
    ):
        u = sub.add_parser(name, parents=[common, remote], help=text,
                           description=text[0].upper() + text[1:] + ".")
        u.add_argument("serial", help="the user's PBX (its serial)")
        u.add_argument("username", help="the user (extension) on that PBX")
        u.set_defaults(fn=fn)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pbx-push``."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: int(args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
