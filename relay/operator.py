"""Operator verbs of pbx-relay, against the running services (DESIGN §3, §5).

- ``pbxs``, ``pbx show SERIAL``: the PBX directory joined with the live registry,
  read from the relay's admin endpoint (``admin.listen``, ``/registry``).
- ``devices``, ``device ID``, ``log``, ``export``, ``erase``: the push service's API
  (push/api.py). Where it is follows ``[push] mode``:

  - ``embedded``: the push service inside ``pbx-relay run``, configured by the
    push.toml in ``push.config`` or else push defaults with ``state_dir =
    <relay.state_dir>/push`` (as relay/service.py starts it). The command mints a
    short-lived operator token from that push state's API secret, so it must run
    as a user who can read it (the service's user, or root).
  - ``remote``: ``push.url``, verified with ``push.ca_file``. The relay's own
    ``push.token`` has scope ``relay`` and may not list or export, so these verbs
    need an operator token: ``--token`` or ``$PBX_RELAY_OPERATOR_TOKEN``
    (mint one on the push host: ``pbx-push token --scope operator``).
  - ``off``: there is no push service and nothing held about devices.

Human tables by default, ``--json`` for machines. No push token is ever shown:
the API does not return them.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pbxcore.cli import address, iso_time, print_json, table
from pbxcore.errors import PbxError, StateError, Unauthorized
from pbxcore.http import request_json
from relay.config import OPERATOR_TOKEN_ENV, RelayConfig

TOKEN_ENV = OPERATOR_TOKEN_ENV
TOKEN_SUB = "pbx-relay-cli"  # the ``sub`` of the operator tokens minted here
ADMIN_TIMEOUT = 5.0  # seconds for the relay's admin endpoint
HTTP_TIMEOUT = 30.0  # seconds for the push API (an export of a busy user may take a moment)

LoadConfig = Callable[[argparse.Namespace], RelayConfig]
Command = Callable[[argparse.Namespace, RelayConfig], int]


class OperatorError(PbxError):
    """A failure to report as one ``pbx-relay: <message>`` line, exit 1."""


# ------------------------------------------------------------------ where things are


def admin_url(cfg: RelayConfig) -> str:
    """The relay's admin endpoint, as a client reaches it (a wildcard bind → loopback)."""
    return "http://" + cfg.admin_listen.client_address()


@dataclass(frozen=True)
class PushApi:
    """The push service's API as this command reaches it."""

    url: str
    token: str = field(repr=False)
    verify: ssl.SSLContext | bool = True
    remote: bool = False


def push_api(cfg: RelayConfig, token: str | None = None) -> PushApi:
    """Where the push API is and the bearer token to use (see the module docstring).
    ``token`` (``--token``) wins; else ``$PBX_RELAY_OPERATOR_TOKEN``; else, embedded
    only, an operator token minted from the push state's API secret."""
    token = token or os.environ.get(TOKEN_ENV) or None
    mode = cfg.push.mode
    if mode == "off":
        raise OperatorError(f'push is off (push.mode = "off" in {cfg.source}): no devices are kept')
    if mode == "remote":
        if not token:
            raise OperatorError(
                f'push.mode = "remote": give an operator token with --token or ${TOKEN_ENV} '
                "(on the push host: pbx-push token --scope operator); push.token has scope relay")
        ca_file = cfg.push.ca_file
        try:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        except OSError as e:
            raise OperatorError(
                f"{cfg.where('push.ca_file')}: cannot use {ca_file}: {e.strerror or e}") from None
        return PushApi(cfg.push.url.rstrip("/"), token, verify, remote=True)
    return _embedded_push_api(cfg, token)


def _embedded_push_api(cfg: RelayConfig, token: str | None) -> PushApi:
    from push import config as push_config
    from push.api import mint_token
    from push.app import load_api_secret
    from push.cli import CLI_TOKEN_TTL

    pcfg = push_config.load(*cfg.embedded_push_source())  # as relay/service.py starts it
    verify: ssl.SSLContext | bool = pcfg.api_verify() if pcfg.api_tls else True
    if not token:
        secret_file = pcfg.state_dir / "api.secret"
        if not pcfg.api.jwt_secret and not secret_file.exists():
            # Never create it here: a file made by another user (root) would lock the service out.
            raise OperatorError(
                f"the push service has not run yet: no {secret_file} (is `pbx-relay run` up?)")
        try:
            secret = load_api_secret(pcfg)
        except PermissionError:
            raise StateError(
                f"cannot read {secret_file}: permission denied (run as the service's user)") from None
        token = mint_token(secret, "operator", TOKEN_SUB, ttl=CLI_TOKEN_TTL)
    return PushApi(pcfg.api_url, token, verify)


# ------------------------------------------------------------------ HTTP


def registry(cfg: RelayConfig) -> dict[str, dict[str, Any]]:
    """serial → live binding (transport, ip, port, expires_in), from the running relay."""
    rows = request_json(admin_url(cfg) + "/registry", what="the relay's admin endpoint",
                        hint="is `pbx-relay run` up?", timeout=ADMIN_TIMEOUT)
    if not isinstance(rows, list):
        raise OperatorError(f"{admin_url(cfg)}/registry: not a JSON list")
    return {str(r["serial"]): r for r in rows}


def push_call(
    cfg: RelayConfig, args: argparse.Namespace, method: str, path: str,
    params: dict[str, str] | None = None,
) -> Any:
    """The push API's JSON answer to ``method path``, with the operator's token."""
    api = push_api(cfg, getattr(args, "token", None))
    hint = "is the push service up?" if api.remote else "is `pbx-relay run` up?"
    try:
        return request_json(api.url + path, what="the push service", method=method, token=api.token,
                            verify=api.verify, params=params, timeout=HTTP_TIMEOUT, hint=hint)
    except Unauthorized as e:
        raise Unauthorized(f"{e} (needs an operator token: --token or ${TOKEN_ENV})") from None


def directory(cfg: RelayConfig) -> dict[str, tuple[str, float]]:
    """serial → (realm, created) from the PBX directory (the cluster's with redis_url);
    never creates it."""
    from relay.pbx.directory import PbxDirectory
    from relay.pbx.shared import open_directory

    if cfg.cluster.redis_url:
        shared = open_directory(cfg.state_dir, cfg.cluster.redis_url)
        return {serial: (realm, created) for serial, realm, created in shared.list()}
    path = cfg.state_dir / "pbx.sqlite"
    if not path.exists():
        return {}
    return {serial: (realm, created) for serial, realm, created in PbxDirectory(path).list()}


# ------------------------------------------------------------------ output


def _devices_table(devices: list[dict[str, Any]]) -> str:
    return table(
        ["device_id", "provider", "serial", "username", "address", "updated_at"],
        [[d["device_id"], d["provider"], d["serial"], d["username"],
          address(d["transport"], d["ip"], d["port"]), iso_time(d["updated_at"])] for d in devices],
    )


def _user_path(args: argparse.Namespace) -> str:
    return f"/v1/users/{quote(args.serial, safe='')}/{quote(args.username, safe='')}"


# ------------------------------------------------------------------ commands


def cmd_pbxs(args: argparse.Namespace, cfg: RelayConfig) -> int:
    live = registry(cfg)
    known = directory(cfg)
    out: list[dict[str, Any]] = []
    for serial in sorted(set(known) | set(live)):
        realm, created = known.get(serial, ("", None))
        b = live.get(serial)
        out.append({
            "serial": serial, "realm": realm or None, "created": created, "online": b is not None,
            "transport": b["transport"] if b else None, "ip": b["ip"] if b else None,
            "port": b["port"] if b else None, "expires_in": b["expires_in"] if b else None,
        })
    if args.json:
        print_json(out)
        return 0
    print(table(
        ["serial", "state", "address", "expires_in", "created"],
        [[p["serial"], "online" if p["online"] else "offline",
          address(p["transport"], p["ip"], p["port"]) if p["online"] else "-",
          f"{p['expires_in']} s" if p["online"] else "-", iso_time(p["created"])] for p in out],
    ))
    print(f"{len(known)} in the directory, {len(live)} online")
    return 0


def cmd_pbx_show(args: argparse.Namespace, cfg: RelayConfig) -> int:
    serial = args.serial
    live = registry(cfg).get(serial)
    entry = directory(cfg).get(serial)
    if entry is None and live is None:
        raise OperatorError(f"no PBX {serial} in the directory")
    devices = None
    if cfg.push.mode != "off":
        devices = push_call(cfg, args, "GET", "/v1/devices", {"serial": serial})
    realm, created = entry if entry else (None, None)
    if args.json:
        print_json({
            "serial": serial, "realm": realm, "created": created, "online": live is not None,
            "registration": None if live is None else {
                k: live[k] for k in ("transport", "ip", "port", "expires_in")},
            "devices": devices,
        })
        return 0
    print(f"serial      {serial}")
    print(f"realm       {realm or '- (not in the directory)'}")
    print(f"created     {iso_time(created)}")
    if live is None:
        print("state       offline")
    else:
        print(f"state       online from {address(live['transport'], live['ip'], live['port'])}, "
              f"registration expires in {live['expires_in']} s")
    if devices is None:
        print("devices     - (push is off)")
    else:
        print(f"devices     {len(devices)}")
        if devices:
            print("\n".join("  " + line for line in _devices_table(devices).splitlines()))
    return 0


def cmd_devices(args: argparse.Namespace, cfg: RelayConfig) -> int:
    params = {k: v for k, v in (("serial", args.serial), ("username", args.username)) if v}
    devices = push_call(cfg, args, "GET", "/v1/devices", params)
    if args.json:
        print_json(devices)
    else:
        print(_devices_table(devices))
    return 0


def cmd_device(args: argparse.Namespace, cfg: RelayConfig) -> int:
    device = push_call(cfg, args, "GET", f"/v1/devices/{quote(args.device_id, safe='')}")
    if args.json:
        print_json(device)
        return 0
    for key in ("device_id", "provider", "param", "serial", "username"):
        print(f"{key:<11} {device[key]}")
    print(f"{'address':<11} {address(device['transport'], device['ip'], device['port'])}")
    print(f"{'updated_at':<11} {iso_time(device['updated_at'])}")
    return 0


def cmd_log(args: argparse.Namespace, cfg: RelayConfig) -> int:
    rows = push_call(cfg, args, "GET", _user_path(args) + "/log")
    if args.json:
        print_json(rows)
        return 0
    print(table(
        ["at", "caller", "callee", "provider", "outcome", "status", "attempts", "src", "dst"],
        [[iso_time(r["at"]), r["caller"] or "-", r["callee"] or "-", r["provider"] or "-", r["outcome"],
          "-" if r["status"] is None else r["status"], r["attempts"], r["src"] or "-", r["dst"] or "-"]
         for r in rows],
    ))
    return 0


def cmd_export(args: argparse.Namespace, cfg: RelayConfig) -> int:
    print_json(push_call(cfg, args, "GET", _user_path(args) + "/export"))
    return 0


def cmd_erase(args: argparse.Namespace, cfg: RelayConfig) -> int:
    counts = push_call(cfg, args, "DELETE", _user_path(args))
    if args.json:
        print_json(counts)
    else:
        print(f"erased {args.serial}/{args.username}: {counts['devices']} device(s), "
              f"{counts['push_log_rows']} push log row(s)")
    return 0


# ------------------------------------------------------------------ wiring


def _guarded(fn: Command, load_config: LoadConfig) -> Callable[[argparse.Namespace], int]:
    """Load the relay's config, run ``fn``; errors go to pbxcore.cli.run_command."""

    def run(args: argparse.Namespace) -> int:
        return fn(args, load_config(args))

    return run


def token_option(parser: argparse.ArgumentParser) -> None:
    """``--token``: an operator token for the push API."""
    parser.add_argument("--token", metavar="JWT",
                        help=f"operator token for the push API (default: ${TOKEN_ENV}; "
                        'needed with push.mode = "remote")')


def json_option(parser: argparse.ArgumentParser) -> None:
    """``--json``: machine-readable output."""
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], load_config: LoadConfig,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Register the operator verbs (pbxs, devices, device, log, export, erase) on
    pbx-relay's subcommands; ``parents`` carry the options every verb takes."""
    token = argparse.ArgumentParser(add_help=False)
    token_option(token)
    as_json = argparse.ArgumentParser(add_help=False)
    json_option(as_json)
    common = list(parents)

    pbxs = sub.add_parser("pbxs", parents=[*common, as_json],
                          help="PBXs in the directory and which are online (from the running relay)",
                          description="The PBX directory joined with the running relay's live registry "
                          "(its admin endpoint, admin.listen): serial, online or not, from where.")
    pbxs.set_defaults(fn=_guarded(cmd_pbxs, load_config))
    dev = sub.add_parser("devices", parents=[*common, as_json, token],
                         help="registered push devices (never their push tokens)",
                         description="Devices the push service holds: id, provider, PBX, user, current "
                         "address. Push tokens are never shown.")
    dev.add_argument("--serial", help="only this PBX's devices")
    dev.add_argument("--username", help="only this user's devices")
    dev.set_defaults(fn=_guarded(cmd_devices, load_config))
    one = sub.add_parser("device", parents=[*common, as_json, token], help="one push device",
                         description="One device the push service holds, by its id (from `devices`).")
    one.add_argument("device_id", help="the device's id, as `devices` shows it")
    one.set_defaults(fn=_guarded(cmd_device, load_config))
    for name, fn, text, extra in (
        ("log", cmd_log, "a user's push log (kept 7 days)", [as_json, token]),
        ("export", cmd_export, "everything held about a user, as JSON (GDPR Art. 15/20)", [token]),
        ("erase", cmd_erase, "delete everything held about a user (GDPR Art. 17)", [as_json, token]),
    ):
        u = sub.add_parser(name, parents=[*common, *extra], help=text,
                           description=text[0].upper() + text[1:] + ".")
        u.add_argument("serial", help="the user's PBX (its serial)")
        u.add_argument("username", help="the user (extension) on that PBX")
        u.set_defaults(fn=_guarded(fn, load_config))
