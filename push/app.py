"""Assemble the push service from its config and serve its API and admin endpoints under trio."""

from __future__ import annotations

import copy
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework
from starlette.applications import Starlette

from pbxcore.admin import serve_admin
from pbxcore.cli import find_leaf
from pbxcore.config import changed_keys
from pbxcore.errors import ConfigError, ListenError
from pbxcore.journal import set_level
from pbxcore.lifecycle import SIGNALS, supervise
from pbxcore.redisconn import redis_url_shown
from pbxcore.sdnotify import Notifier
from pbxcore.statedir import private_dir
from push.api import admin_routes, make_api
from push.config import Listen, PushConfig, check_files
from push.gateways.base import Gateway
from push.redisstore import RedisStore
from push.service import DAY, PushService, PushSettings
from push.store import SqliteStore, Store, StoreUnavailable

log = logging.getLogger("push")

KEY_BYTES = 32  # AES-256-GCM key for tokens at rest, HMAC key for device ids
SECRET_BYTES = 32  # HS256 secret: as long as the hash (RFC 7518 §3.2)
# Seconds the gateways replaced by a reload stay open: a push in flight on them (its
# retries end with the ring timeout, 120 s at most) finishes there.
GATEWAY_RETIRE = 150.0
# What SIGHUP applies; any other key that changed needs a restart (the reload says which).
PROVIDER_NAMES = {"apns": "APNs", "fcm": "FCM"}
RELOADABLE_SECTIONS = frozenset({"apns", "fcm"})
RELOADABLE = frozenset({"push.log_level", "push.log_retention_days", "push.device_stale_days",
                        "push.purge_interval"})


def _create_once(path: Path, data: bytes) -> bytes:
    """Write ``data`` to a new file, mode 0600, unless a concurrent start made it first;
    what the file holds then. The file appears whole or not at all: ``data`` is written
    to a temporary file of the same directory, which is then linked to ``path`` (link(2)
    fails when ``path`` exists). Another process starting at the same moment therefore
    reads either nothing (and makes its own, which loses the race) or all of the winner's
    key, never an empty or half-written file."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()
        except OSError:
            # A file system without hard links (vfat, some FUSE mounts: EPERM, ENOTSUP).
            return _create_exclusive(path, data)
        return data
    finally:
        os.unlink(tmp)


def _create_exclusive(path: Path, data: bytes) -> bytes:
    """:func:`_create_once` where link(2) cannot be used: O_EXCL still makes one winner
    (a reader racing it may see a short file, which :func:`load_key` refuses by length)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def load_key(state_dir: Path) -> bytes:
    """The service key, <state_dir>/push.key: 32 random bytes made on first start. It
    encrypts tokens at rest and derives device ids, so it must survive restarts."""
    path = Path(state_dir) / "push.key"
    key = path.read_bytes() if path.exists() else _create_once(path, secrets.token_bytes(KEY_BYTES))
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path}: must hold {KEY_BYTES} bytes, holds {len(key)} (restore it from a backup)")
    return key


def load_api_secret(cfg: PushConfig) -> bytes:
    """The JWT secret: api.jwt_secret when set, else <state_dir>/api.secret (64 hex
    digits made on first use; the text itself is the secret, so it can be copied into
    PBX_PUSH_API_JWT_SECRET elsewhere)."""
    if cfg.api.jwt_secret:
        return cfg.api.jwt_secret.encode()
    path = cfg.state_dir / "api.secret"
    if path.exists():
        text = path.read_bytes().strip()
    else:
        text = _create_once(path, secrets.token_hex(SECRET_BYTES).encode() + b"\n").strip()
    if len(text) < SECRET_BYTES:
        raise ConfigError(f"{path}: secret shorter than {SECRET_BYTES} bytes")
    return text


def create_state(cfg: PushConfig) -> None:
    """Every file the service makes in its state directory as it starts, made now when
    missing: the directory (0700), push.key, and api.secret unless api.jwt_secret is set
    (a SQLite store's push.sqlite is its store's, and several processes never share one).
    The parent of `pbx-relay run --workers N` calls it before it starts any worker, so
    that every worker reads the same key and secret (docs/cluster.md, "Workers")."""
    private_dir(cfg.state_dir)
    load_key(cfg.state_dir)
    load_api_secret(cfg)


def build_gateways(cfg: PushConfig, key: bytes | None = None) -> dict[str, Gateway]:
    """One gateway per provider: the real client when its credentials are configured,
    else the ``log`` dry run (records the push as ``dry_run``, sends nothing; ``key``
    is the service key, so that its log lines name devices by their usual id)."""
    from push.gateways.log import LogGateway

    gateways: dict[str, Gateway] = {}
    apns, fcm = cfg.apns, cfg.fcm
    try:
        if cfg.apns_mode == "log":
            gateways["apns"] = LogGateway("apns", device_key=key)
        else:
            from push.gateways.apns import ApnsGateway

            gateways["apns"] = ApnsGateway(
                base_url=apns.base_url, key_file=apns.key_file or None, key_id=apns.key_id,
                team_id=apns.team_id, cert_file=apns.cert_file or None,
                cert_key_file=apns.cert_key_file or None, ca_file=apns.ca_file or None,
            )
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{cfg.where('apns.key_file' if cfg.apns_mode == 'token' else 'apns.cert_file')}:"
                          f" cannot set up APNs: {e}") from None
    try:
        if cfg.fcm_mode == "log":
            gateways["fcm"] = LogGateway("fcm", device_key=key)
        else:
            from push.gateways.fcm import FcmGateway

            gateways["fcm"] = FcmGateway(
                service_account_file=fcm.service_account, base_url=fcm.base_url,
                ca_file=fcm.ca_file or None,
            )
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{cfg.where('fcm.service_account')}: cannot set up FCM: {e}") from None
    return gateways


def build_service(
    cfg: PushConfig,
    *,
    clock: Callable[[], float] = time.time,
    gateways: Mapping[str, Gateway] | None = None,
) -> PushService:
    """The service over its store (store.redis_url, else <state_dir>/push.sqlite) with
    the configured gateways (``gateways`` replaces them, e.g. in tests). A Redis store
    connects once :func:`serve` runs."""
    check_files(cfg)
    key = load_key(cfg.state_dir)
    store: Store
    if cfg.store.redis_url:
        store = RedisStore.from_url(cfg.store.redis_url, key,
                                    device_ttl=cfg.push.device_stale_days * DAY)
    else:
        store = SqliteStore(cfg.state_dir / "push.sqlite", key)
    return PushService(store, gateways if gateways is not None else build_gateways(cfg, key), key,
                       _settings(cfg), clock=clock)


@dataclass
class Running:
    """What :func:`serve` reports once it listens."""

    service: PushService
    addresses: dict[str, str] = field(default_factory=dict)  # "api" | "admin" → "host:port"
    api_url: str = ""
    admin_url: str = ""
    secret: bytes = field(default=b"", repr=False)  # the JWT secret (tests mint tokens with it)


def _hypercorn_config(listen: Listen, cfg: PushConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [str(listen)]
    hc.backlog = 1024  # bursts of new connections (the relay's client pools up to 1000)
    # No access log: request lines would put serials, usernames and device ids into the
    # journal for every request. Errors go to our "push.http" logger (tracebacks, no bodies).
    hc.accesslog = None
    hc.errorlog = logging.getLogger("push.http")
    hc.include_server_header = False
    hc.graceful_timeout = 2.0
    if cfg.api_tls:
        hc.certfile = cfg.api.tls_cert
        hc.keyfile = cfg.api.tls_key
    return hc


def _reuse_port_bind(listen: Listen) -> str:
    """``listen`` bound with SO_REUSEPORT, as a hypercorn bind: ``fd://N``, hypercorn's way
    to serve a socket made elsewhere. Each worker of `pbx-relay run --workers N` binds
    the push API's one address so, and the kernel gives each new connection to one of
    them. (hypercorn 0.18's Config has no ``reuse_port``: it sets SO_REUSEPORT only in its
    own multi-process mode, ``workers > 1``, which :func:`hypercorn.trio.serve` ignores.)"""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listen.host, listen.port))
    except OSError as e:
        sock.close()
        raise ListenError.from_oserror("push API", str(listen), e) from None
    return f"fd://{sock.detach()}"  # hypercorn owns it from here (and closes it)


async def _start_http(nursery: trio.Nursery, app: Starlette, hc: HypercornConfig, what: str) -> list[str]:
    """Start hypercorn on ``hc.bind``; its bound URLs. A bind failure becomes one
    ListenError naming ``what`` and the address (hypercorn wraps it in exception groups)."""
    # Starlette's ASGI signature is looser than hypercorn's protocol types; they agree at run time.
    server = partial(hypercorn_serve, cast(ASGIFramework, app), hc)
    try:
        binds: list[str] = await nursery.start(server)
    except (OSError, BaseExceptionGroup) as e:
        err = find_leaf(e, OSError)
        if not isinstance(err, OSError):
            raise
        raise ListenError.from_oserror(what, hc.bind[0], err) from None
    return binds


def _hostport(bind: str) -> str:
    """hypercorn reports "http://127.0.0.1:8443"; keep "127.0.0.1:8443"."""
    return bind.split("://", 1)[-1]


async def serve(
    cfg: PushConfig,
    service: PushService | None = None,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the API, the admin endpoint and the purge loop until cancelled, then close
    the service (gateways and store). Port 0 in a listen address picks a free port;
    the bound addresses are in the :class:`Running` given to ``task_status``.
    ``reuse_port``: the API's address is shared with other processes (SO_REUSEPORT),
    as the workers of `pbx-relay run --workers N` share it."""
    if service is None:
        service = build_service(cfg)
    try:
        secret = load_api_secret(cfg)
        api = make_api(service, secret)
        async with service.store.session(), trio.open_nursery() as nursery:
            api_hc = _hypercorn_config(cfg.api_listen, cfg)
            if reuse_port:
                api_hc.bind = [_reuse_port_bind(cfg.api_listen)]
            api_binds = await _start_http(nursery, api, api_hc, "push API")
            routes = admin_routes(service)
            admin: str = await nursery.start(serve_admin, "push admin", cfg.admin_listen, routes)
            nursery.start_soon(service.run_purges)
            running = Running(
                service=service, addresses={"api": _hostport(api_binds[0]), "admin": admin},
                api_url=api_binds[0], admin_url=f"http://{admin}", secret=secret,
            )
            log.info("event=push_listening api=%s admin=%s", running.addresses["api"],
                     running.addresses["admin"])
            task_status.started(running)
    finally:
        with trio.CancelScope(shield=True):
            await service.aclose()


def gateway_modes(service: PushService) -> dict[str, str]:
    """provider → "live" or "dry-run" (the log gateway), for the banner."""
    return {p: ("dry-run" if g.provider == "log" else "live") for p, g in sorted(service.gateways.items())}


def banner(cfg: PushConfig, running: Running) -> str:
    modes = gateway_modes(running.service)
    hints = {
        "apns": "set [apns] key_file, key_id, team_id (or cert_file)",
        "fcm": "set [fcm] service_account",
    }
    lines = [
        f"pbx-push {cfg.source}",
        f"  API     {running.api_url}  (JWT bearer; mint one: pbx-push token --scope relay)",
        f"  admin   {running.admin_url}  (/metrics /healthz /readyz)",
    ]
    for provider, mode in modes.items():
        extra = "" if mode == "live" else f"  (log only, nothing sent: {hints.get(provider, 'configure it')})"
        name = {"apns": "APNs", "fcm": "FCM"}.get(provider, provider)
        lines.append(f"  {name:<7} {mode}{extra}")
    lines.append(f"  state   {cfg.state_dir}  (push log kept {cfg.push.log_retention_days:g} days)")
    if cfg.store.redis_url:
        lines.append(f"  store   {redis_url_shown(cfg.store.redis_url)}  (shared: devices and push log)")
    if not cfg.api_tls and not cfg.is_loopback_only():
        lines.append("  WARNING the API listens beyond loopback without TLS: set api.tls_cert/tls_key")
    return "\n".join(lines)


def _settings(cfg: PushConfig) -> PushSettings:
    return PushSettings(
        log_retention=cfg.push.log_retention_days * DAY,
        device_stale_after=cfg.push.device_stale_days * DAY,
        purge_interval=cfg.push.purge_interval,
    )


async def reload(
    service: PushService, current: PushConfig, fresh: PushConfig, nursery: trio.Nursery,
    *, log_level: bool = True,
) -> None:
    """SIGHUP with the configuration read again: log level (unless ``log_level`` is
    False: embedded in the relay, the relay's applies), retention, and the gateways
    rebuilt from their files (the APNs .p8 key or certificate, the FCM service account);
    gateways that do not build keep the old ones. Other changed keys are named as
    needing a restart. Updates ``current`` to what now runs; never raises."""
    level_changed = set_level(fresh.push.log_level) if log_level else False
    service.settings = _settings(fresh)
    applied = set(RELOADABLE)
    gateways = "kept_old"
    try:
        check_files(fresh)
        new = build_gateways(fresh, service.key)
    except ConfigError as e:
        log.error("event=reload_failed what=gateways error=%s (the old gateways stay)", e)
    else:
        old, service.gateways = service.gateways, new
        nursery.start_soon(_retire, old)
        applied |= {f"{s}.{k}" for s in RELOADABLE_SECTIONS for k in fresh.as_dict()[s]}
        gateways = ",".join(f"{p}:{m}" for p, m in gateway_modes(service).items())
    restart = [k for k in changed_keys(current, fresh)
               if k not in RELOADABLE and k.partition(".")[0] not in RELOADABLE_SECTIONS]
    for dotted in applied:
        section, key = dotted.split(".")
        setattr(current.section(section), key, getattr(fresh.section(section), key))
    log.info("event=reloaded log_level=%s%s gateways=%s log_retention_days=%g restart_needed=%s",
             fresh.push.log_level, "(changed)" if level_changed else "", gateways,
             fresh.push.log_retention_days, ",".join(restart) or "-")


async def _retire(gateways: Mapping[str, Gateway]) -> None:
    try:
        await trio.sleep(GATEWAY_RETIRE)
    finally:
        with trio.CancelScope(shield=True):
            for g in gateways.values():
                try:
                    await g.aclose()
                except Exception as e:  # closing a dead connection must not stop the service
                    log.warning("event=gateway_close_failed provider=%s error=%r", g.provider, e)


async def status_line(service: PushService) -> str:
    """The STATUS systemd shows (`systemctl status pbx-push`)."""
    try:
        with trio.fail_after(2.0):
            counts = await service.store.counts()
    except Exception as e:
        return f"Serving; store not answering ({type(e).__name__})"
    modes = ", ".join(f"{PROVIDER_NAMES.get(p, p)} {m}" for p, m in gateway_modes(service).items())
    return f"Serving: {counts['devices']} devices, {counts['push_log_rows']} push log rows; {modes}"


async def run(
    cfg: PushConfig, reload_config: Callable[[], PushConfig] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads (``reload_config`` reads the
    configuration again). Tells systemd through ``notifier`` (pbxcore.lifecycle)."""
    service = build_service(cfg)
    notify = notifier or Notifier.from_environ()
    current = copy.deepcopy(cfg)

    async def check() -> str | None:
        try:
            await service.store.counts()  # the watchdog pings only while the store answers...
        except StoreUnavailable:
            # ...or says in time that it cannot (a shared store's server is down): /readyz
            # says 503, and restarting this process would not bring Redis back.
            pass
        return None

    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, cfg, service)
            print(banner(cfg, running), flush=True, file=sys.stdout)

            async def on_hup() -> None:
                try:
                    fresh = reload_config() if reload_config is not None else cfg
                except (ConfigError, OSError) as e:
                    log.error("event=reload_failed what=config error=%s (nothing changed)", e)
                    return
                await reload(service, current, fresh, nursery)

            await supervise(signals, notify, status=partial(status_line, service), check=check,
                            reload=on_hup)
            nursery.cancel_scope.cancel()
