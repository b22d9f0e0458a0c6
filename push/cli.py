"""The pbx-push command: run the push service, check its config, mint tokens, export and erase users."""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from typing import Any
from urllib.parse import quote

from push import config as config_mod
from push.config import CONFIG_ENV, ConfigError, PushConfig

CLI_TOKEN_TTL = 60  # seconds: the operator token each CLI call mints for itself
HTTP_TIMEOUT = 30.0


class CliError(Exception):
    """A failure to report as ``pbx-push: <message>``, exit 1."""


def _load(args: argparse.Namespace) -> PushConfig:
    overrides = {}
    if getattr(args, "state_dir", None):
        overrides["push.state_dir"] = args.state_dir
    path = args.config or os.environ.get(CONFIG_ENV) or None
    return config_mod.load(path, overrides)


# ------------------------------------------------------------------ service


def cmd_run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads log level, retention and gateway
    credentials. Under systemd (Type=notify) it reports READY/STATUS/WATCHDOG."""
    import trio

    from pbxcore.journal import configure_logging
    from push.app import run

    cfg = _load(args)
    configure_logging(cfg["push.log_level"])
    try:
        trio.run(run, cfg, lambda: _load(args))
    except KeyboardInterrupt:
        return 0
    except BaseException as e:  # noqa: B036 - re-raised unless it is one we explain
        # Errors from inside the task tree arrive wrapped in exception groups.
        leaf = _leaf(e, (ConfigError, OSError))
        if leaf is None:
            raise
        if isinstance(leaf, ConfigError):
            print(f"pbx-push: {leaf}", file=sys.stderr)
            return 2
        print(f"pbx-push: {leaf.strerror if isinstance(leaf, OSError) and leaf.strerror else leaf}",
              file=sys.stderr)
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


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    config_mod.check_files(cfg)
    print(f"{cfg.source}: ok")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from push.api import mint_token
    from push.app import load_api_secret

    cfg = _load(args)
    if args.scope == "pbx" and not args.serial:
        raise CliError("a pbx token needs --serial")
    if args.scope != "pbx" and args.serial:
        raise CliError("--serial is for pbx tokens only")
    if not 0 < args.ttl <= cfg["api.token_ttl_max"]:
        raise CliError(f"--ttl must be 1..{cfg['api.token_ttl_max']} seconds (api.token_ttl_max)")
    sub = args.sub or (f"pbx:{args.serial}" if args.scope == "pbx" else args.scope)
    print(mint_token(load_api_secret(cfg), args.scope, sub, args.serial, args.ttl))
    return 0


# ------------------------------------------------------------------ operator verbs


def _default_url(cfg: PushConfig) -> str:
    listen = cfg.api_listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if cfg.api_tls else 'http'}://{host}:{listen.port}"


def _verify(cfg: PushConfig, args: argparse.Namespace) -> ssl.SSLContext | bool:
    if args.ca_file:
        return ssl.create_default_context(cafile=args.ca_file)
    if cfg.api_tls and not args.url:
        # Talking to our own listen address: trust exactly the configured certificate
        # (its name is the public one, not the loopback address we connect to).
        ctx = ssl.create_default_context(cafile=cfg["api.tls_cert"])
        ctx.check_hostname = False
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx
    return True


def _call(args: argparse.Namespace, method: str, path: str, params: dict[str, str] | None = None) -> Any:
    import httpx

    from push.api import mint_token
    from push.app import load_api_secret

    cfg = _load(args)
    url = (args.url or _default_url(cfg)).rstrip("/")
    token = mint_token(load_api_secret(cfg), "operator", "pbx-push-cli", ttl=CLI_TOKEN_TTL)
    try:
        with httpx.Client(verify=_verify(cfg, args), timeout=HTTP_TIMEOUT, trust_env=False) as client:
            resp = client.request(method, url + path, params=params,
                                  headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as e:
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            hint = " (give the CA with --ca-file)"
        elif isinstance(e, httpx.ConnectError):
            hint = " (is `pbx-push run` up?)"
        raise CliError(f"cannot reach the push service at {url}: {e}{hint}") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        raise CliError(f"{url}: HTTP {resp.status_code}: {message or resp.reason_phrase}")
    return body


def _user_path(args: argparse.Namespace) -> str:
    return f"/v1/users/{quote(args.serial, safe='')}/{quote(args.username, safe='')}"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_devices(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("serial", args.serial), ("username", args.username)) if v}
    devices = _call(args, "GET", "/v1/devices", params)
    if args.json:
        _print_json(devices)
        return 0
    print("device_id\tprovider\tserial\tusername\taddress\tupdated_at")
    for d in devices:
        ip = f"[{d['ip']}]" if ":" in d["ip"] else d["ip"]
        print(f"{d['device_id']}\t{d['provider']}\t{d['serial']}\t{d['username']}\t"
              f"{d['transport']}:{ip}:{d['port']}\t{_iso(d['updated_at'])}")
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    _print_json(_call(args, "GET", f"/v1/devices/{quote(args.device_id, safe='')}"))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    _print_json(_call(args, "GET", _user_path(args) + "/log"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _print_json(_call(args, "GET", _user_path(args) + "/export"))
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    counts = _call(args, "DELETE", _user_path(args))
    print(f"erased {args.serial}/{args.username}: {counts['devices']} device(s), "
          f"{counts['push_log_rows']} push log row(s)")
    return 0


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pbx-push", description=__doc__)
    p.add_argument("-c", "--config", help=f"push.toml (default: ${CONFIG_ENV} or built-in defaults)")
    p.add_argument("--state-dir", help="override push.state_dir")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the push service (API, admin endpoint, purges)").set_defaults(fn=cmd_run)
    conf = sub.add_parser("config", help="check a configuration file")
    conf.add_argument("action", choices=["check"])
    conf.set_defaults(fn=cmd_config)
    tok = sub.add_parser("token", help="print an API token signed with the API secret")
    tok.add_argument("--scope", required=True, choices=["relay", "pbx", "operator"])
    tok.add_argument("--serial", help="the PBX's serial (pbx tokens)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    tok.add_argument("--sub", help="who the token is for (default: the scope, or pbx:<serial>)")
    tok.set_defaults(fn=cmd_token)

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", help="the running service's API (default: from api.listen)")
    remote.add_argument("--ca-file", help="CA bundle to verify the API's certificate")
    dev = sub.add_parser("devices", parents=[remote], help="list registered devices (never their tokens)")
    dev.add_argument("--serial")
    dev.add_argument("--username")
    dev.add_argument("--json", action="store_true", help="JSON instead of a table")
    dev.set_defaults(fn=cmd_devices)
    one = sub.add_parser("device", parents=[remote], help="show one device")
    one.add_argument("device_id")
    one.set_defaults(fn=cmd_device)
    for name, fn, text in (
        ("log", cmd_log, "a user's push log (JSON)"),
        ("export", cmd_export, "everything held about a user (JSON, GDPR Art. 15/20)"),
        ("erase", cmd_erase, "delete everything held about a user (GDPR Art. 17)"),
    ):
        u = sub.add_parser(name, parents=[remote], help=text)
        u.add_argument("serial")
        u.add_argument("username")
        u.set_defaults(fn=fn)

    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"pbx-push: {e}", file=sys.stderr)
        return 2
    except (CliError, OSError) as e:
        print(f"pbx-push: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
