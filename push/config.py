"""push.toml as typed sections: every key, its type, default and meaning; checks across keys.

config/push.toml documents each key for operators and holds the same defaults (a
test compares them). Loading, environment overrides (``PBX_PUSH_<SECTION>_<KEY>``)
and the one-line errors are :mod:`pbxcore.config`'s.
"""

from __future__ import annotations

import ipaddress
import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbxcore import config as loader
from pbxcore.config import Listen, ServiceConfig, path_field
from pbxcore.errors import ConfigError
from pbxcore.redisconn import redis_url_problem

__all__ = ["ConfigError", "Listen", "PushConfig", "check_files", "load"]

CONFIG_ENV = "PBX_PUSH_CONFIG"  # the config file's path; not a key
# DESIGN §3 promises push metadata is gone after 7 days: operators may shorten it, never extend it.
MAX_LOG_RETENTION_DAYS = 7.0
# HS256 keys shorter than the hash output (32 bytes) are guessable offline from one token
# (RFC 7518 §3.2 requires a key at least as long as the hash).
MIN_JWT_SECRET = 32
LOG_LEVELS = ("debug", "info", "warning", "error")
FILE_KEYS = ("api.tls_cert", "api.tls_key", "apns.key_file", "apns.cert_file", "apns.cert_key_file",
             "apns.ca_file", "fcm.service_account", "fcm.ca_file")


@dataclass
class PushSection:
    """``[push]``: state, logging and retention."""

    state_dir: str = path_field("./state/push")
    """push.sqlite, push.key, api.secret; relative to the config file's directory."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_retention_days: float = 7.0
    """Days a push log row is kept (at most 7, DESIGN §3)."""
    device_stale_days: float = 30.0
    """Days a device may go without registering before it is deleted."""
    purge_interval: float = 600.0
    """Seconds between two purges while the service runs."""


@dataclass
class StoreSection:
    """``[store]``: where devices and the push log live."""

    redis_url: str = ""
    """redis://[:password@]host:port of a Redis/Valkey shared by several pbx-push
    processes; empty: SQLite in <state_dir>/push.sqlite."""


@dataclass
class ApiSection:
    """``[api]``: the JWT-authenticated HTTP API."""

    listen: str = "127.0.0.1:8443"
    """"IP:port" of the API; port 0 picks a free one."""
    jwt_secret: str = ""
    """HS256 secret (>= 32 bytes); empty: generated into <state_dir>/api.secret."""
    tls_cert: str = path_field("")
    """PEM certificate chain of the API; empty: plain HTTP."""
    tls_key: str = path_field("")
    """PEM key of tls_cert (both or neither)."""
    token_ttl_max: int = 86400
    """Longest lifetime in seconds of a token minted by `pbx-push token`."""


@dataclass
class AdminSection:
    """``[admin]``: the unauthenticated loopback endpoint."""

    listen: str = "127.0.0.1:9091"
    """/metrics, /healthz, /readyz, "IP:port"."""


@dataclass
class ApnsSection:
    """``[apns]``: Apple Push Notification service (iOS VoIP pushes)."""

    key_file: str = path_field("")
    """.p8 signing key (token auth, with key_id and team_id)."""
    key_id: str = ""
    """The 10-character Key ID of key_file."""
    team_id: str = ""
    """The 10-character Team ID."""
    cert_file: str = path_field("")
    """PEM client certificate (certificate auth instead of token auth)."""
    cert_key_file: str = path_field("")
    """Key of cert_file, when not in the same file."""
    base_url: str = "https://api.push.apple.com"
    """APNs endpoint (the sandbox for development builds)."""
    ca_file: str = path_field("")
    """CA bundle for base_url; empty: the system's."""


@dataclass
class FcmSection:
    """``[fcm]``: Firebase Cloud Messaging (Android)."""

    service_account: str = path_field("")
    """Firebase service-account JSON; empty: the dry-run gateway."""
    base_url: str = "https://fcm.googleapis.com"
    """FCM endpoint."""
    ca_file: str = path_field("")
    """CA bundle for base_url and token_uri; empty: the system's."""


@dataclass(kw_only=True)
class PushConfig(ServiceConfig):
    """The push service's whole configuration: ``cfg.api.listen`` and so on."""

    ENV_PREFIX = "PBX_PUSH_"
    ENV_NOT_KEYS = frozenset({CONFIG_ENV})

    push: PushSection = field(default_factory=PushSection)
    """``[push]``"""
    store: StoreSection = field(default_factory=StoreSection)
    """``[store]``"""
    api: ApiSection = field(default_factory=ApiSection)
    """``[api]``"""
    admin: AdminSection = field(default_factory=AdminSection)
    """``[admin]``"""
    apns: ApnsSection = field(default_factory=ApnsSection)
    """``[apns]``"""
    fcm: FcmSection = field(default_factory=FcmSection)
    """``[fcm]``"""

    @property
    def state_dir(self) -> Path:
        """push.state_dir, absolute."""
        return Path(self.push.state_dir)

    @property
    def api_listen(self) -> Listen:
        """api.listen, parsed."""
        return loader.parse_listen(self.api.listen, self.where("api.listen"))

    @property
    def admin_listen(self) -> Listen:
        """admin.listen, parsed."""
        return loader.parse_listen(self.admin.listen, self.where("admin.listen"))

    @property
    def api_tls(self) -> bool:
        """The API is served over TLS."""
        return bool(self.api.tls_cert)

    @property
    def api_url(self) -> str:
        """The API as a client on this host reaches it (a wildcard bind → loopback)."""
        return f"{'https' if self.api_tls else 'http'}://{self.api_listen.client_address()}"

    def api_verify(self) -> ssl.SSLContext:
        """How a client on this host checks the API's own certificate: exactly the
        configured one (its name is the public one, not the loopback address used)."""
        ctx = ssl.create_default_context(cafile=self.api.tls_cert)
        ctx.check_hostname = False
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx

    @property
    def apns_mode(self) -> str:
        """"token" (.p8 key), "certificate" (client certificate) or "log" (dry run)."""
        if self.apns.key_file:
            return "token"
        if self.apns.cert_file:
            return "certificate"
        return "log"

    @property
    def fcm_mode(self) -> str:
        """"live" (service account) or "log" (dry run)."""
        return "live" if self.fcm.service_account else "log"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first key that is wrong."""
        self._validate_push()
        self._validate_store()
        _ = self.api_listen, self.admin_listen  # each raises on a bad address
        self._validate_api()
        self._validate_providers()

    def _validate_push(self) -> None:
        p, w = self.push, self.where
        if not p.state_dir:
            raise ConfigError(f"{w('push.state_dir')} must not be empty")
        if p.log_level not in LOG_LEVELS:
            raise ConfigError(f"{w('push.log_level')} must be debug, info, warning or error")
        days = p.log_retention_days
        if not 0 < days <= MAX_LOG_RETENTION_DAYS:
            raise ConfigError(
                f"{w('push.log_retention_days')} must be > 0 and <= {MAX_LOG_RETENTION_DAYS:g}"
                f" (got {days:g}):"
                " push metadata is kept 7 days at most; the retention can only be shortened")
        for k in ("device_stale_days", "purge_interval"):
            if not 0 < getattr(p, k) < math.inf:
                raise ConfigError(f"{w('push.' + k)} must be > 0")

    def _validate_store(self) -> None:
        url = self.store.redis_url
        problem = redis_url_problem(url) if url else None
        if problem is not None:
            raise ConfigError(f"{self.where('store.redis_url')} {problem}")

    def _validate_api(self) -> None:
        a, w = self.api, self.where
        if a.jwt_secret and len(a.jwt_secret.encode()) < MIN_JWT_SECRET:
            raise ConfigError(
                f"{w('api.jwt_secret')} must be at least {MIN_JWT_SECRET} bytes"
                " (leave it empty to have one generated)")
        if (a.tls_cert == "") != (a.tls_key == ""):
            raise ConfigError(f"{w('api.tls_cert')} and api.tls_key go together (both or neither)")
        if a.token_ttl_max <= 0:
            raise ConfigError(f"{w('api.token_ttl_max')} must be > 0 seconds")

    def _validate_providers(self) -> None:
        apns, w = self.apns, self.where
        token_keys = [v != "" for v in (apns.key_file, apns.key_id, apns.team_id)]
        if any(token_keys) and not all(token_keys):
            raise ConfigError(
                f"{w('apns.key_file')}, apns.key_id and apns.team_id go together"
                " (token auth: all three or none)")
        if apns.cert_key_file and not apns.cert_file:
            raise ConfigError(f"{w('apns.cert_key_file')} needs apns.cert_file")
        if all(token_keys) and apns.cert_file:
            raise ConfigError(
                f"{w('apns.cert_file')}: choose token auth (apns.key_file, key_id, team_id) or"
                " certificate auth (apns.cert_file), not both")
        for k, url in (("apns.base_url", apns.base_url), ("fcm.base_url", self.fcm.base_url)):
            if not url.startswith(("https://", "http://")) or len(url.split("://", 1)[1].strip("/")) == 0:
                raise ConfigError(f"{w(k)}: {url!r} is not an http(s) URL")

    def is_loopback_only(self) -> bool:
        """The API listens on loopback only (plain HTTP is fine there)."""
        return ipaddress.ip_address(self.api_listen.host).is_loopback


def env_name(section: str, key: str) -> str:
    """The variable that overrides ``section.key``: ``PBX_PUSH_<SECTION>_<KEY>``."""
    return f"{PushConfig.ENV_PREFIX}{section.upper()}_{key.upper()}"


def load(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PushConfig:
    """Defaults, then the file, then ``PBX_PUSH_<SECTION>_<KEY>`` variables, then
    ``overrides`` ({"section.key": value}, the command line's flags)."""
    return loader.load(PushConfig, path, overrides, environ)


def check_files(cfg: PushConfig) -> None:
    """The files the config names exist and are readable (run and ``config check``)."""
    for k in FILE_KEYS:
        section, key = k.split(".")
        p = getattr(cfg.section(section), key)
        if not p:
            continue
        if not os.path.isfile(p):
            raise ConfigError(f"{cfg.where(k)}: {p}: no such file")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{cfg.where(k)}: {p}: not readable by this user")
    old_store = cfg.state_dir / "push.sqlite"
    if cfg.store.redis_url and old_store.exists():
        # Switched to Redis (or `pbx-relay run` now starting workers): nothing would ever
        # purge the devices and push log rows left in the SQLite store (7 days, DESIGN §3).
        raise ConfigError(f"{cfg.where('store.redis_url')}: {old_store} holds a SQLite store that "
                          "nothing purges while the store is Redis: delete it (phones register "
                          "again) or run without Redis")
