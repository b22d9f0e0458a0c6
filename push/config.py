"""push.toml: every key, its type and default; a bad file or variable is one error naming the key."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    pass


# section → key → (type, default). config/push.toml documents each one; a test
# checks that the two agree.
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "push": {
        "state_dir": (str, "./state/push"),
        "log_level": (str, "info"),
        "log_retention_days": (float, 7.0),
        "device_stale_days": (float, 30.0),
        "purge_interval": (float, 600.0),
    },
    "api": {
        "listen": (str, "127.0.0.1:8443"),
        "jwt_secret": (str, ""),
        "tls_cert": (str, ""),
        "tls_key": (str, ""),
        "token_ttl_max": (int, 86400),
    },
    "admin": {
        "listen": (str, "127.0.0.1:9091"),
    },
    "apns": {
        "key_file": (str, ""),
        "key_id": (str, ""),
        "team_id": (str, ""),
        "cert_file": (str, ""),
        "cert_key_file": (str, ""),
        "base_url": (str, "https://api.push.apple.com"),
        "ca_file": (str, ""),
    },
    "fcm": {
        "service_account": (str, ""),
        "base_url": (str, "https://fcm.googleapis.com"),
        "ca_file": (str, ""),
    },
}

ENV_PREFIX = "PBX_PUSH_"
CONFIG_ENV = "PBX_PUSH_CONFIG"  # the config file's path; not a key
# DESIGN §3 promises push metadata is gone after 7 days: operators may shorten it, never extend it.
MAX_LOG_RETENTION_DAYS = 7.0
# HS256 keys shorter than the hash output (32 bytes) are guessable offline from one token
# (RFC 7518 §3.2 requires a key at least as long as the hash).
MIN_JWT_SECRET = 32
LOG_LEVELS = ("debug", "info", "warning", "error")
FILE_KEYS = ("api.tls_cert", "api.tls_key", "apns.key_file", "apns.cert_file", "apns.cert_key_file",
             "apns.ca_file", "fcm.service_account", "fcm.ca_file")


def env_name(section: str, key: str) -> str:
    """The variable that overrides ``section.key``: ``PBX_PUSH_<SECTION>_<KEY>``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


@dataclass
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class PushConfig:
    source: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "section.key" → the variable it came from, for keys set by the environment
    from_env: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return self.values[section][key]

    def where(self, dotted: str) -> str:
        """``<file>: section.key``, plus the variable when the environment set it."""
        var = self.from_env.get(dotted)
        return f"{self.source}: {dotted}" + (f" (from {var})" if var else "")

    @property
    def state_dir(self) -> Path:
        return Path(self["push.state_dir"])

    @property
    def api_listen(self) -> Listen:
        return parse_listen(self["api.listen"], self.where("api.listen"))

    @property
    def admin_listen(self) -> Listen:
        return parse_listen(self["admin.listen"], self.where("admin.listen"))

    @property
    def api_tls(self) -> bool:
        return bool(self["api.tls_cert"])

    @property
    def apns_mode(self) -> str:
        """"token" (.p8 key), "certificate" (client certificate) or "log" (dry run)."""
        if self["apns.key_file"]:
            return "token"
        if self["apns.cert_file"]:
            return "certificate"
        return "log"

    @property
    def fcm_mode(self) -> str:
        """"live" (service account) or "log" (dry run)."""
        return "live" if self["fcm.service_account"] else "log"


def parse_listen(value: str, where: str) -> Listen:
    host, sep, port = str(value).rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
        if not sep or not 0 <= p < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not IP:port (IPv6 as [::1]:8443)") from None
    return Listen(host, p)


def load(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> PushConfig:
    """Defaults, then the file, then ``PBX_PUSH_<SECTION>_<KEY>`` variables, then
    ``overrides`` ({"section.key": value}, the command line's flags)."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory, not a file") from None
        except PermissionError:
            raise ConfigError(f"{source}: permission denied") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    values = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()}
    for section, body in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {section} must be a table")
        for key, value in body.items():
            values[section][key] = _check(section, key, value, source)
    from_env = _apply_environ(values, environ, source)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}]")
        values[section][key] = _check(section, key, value, source)
        from_env.pop(dotted, None)
    cfg = PushConfig(source, values, from_env)
    _validate(cfg)
    return cfg


def _apply_environ(
    values: dict[str, dict[str, Any]], environ: Mapping[str, str], source: str
) -> dict[str, str]:
    known = {env_name(s, k): (s, k) for s, keys in SCHEMA.items() for k in keys}
    used: dict[str, str] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        if var not in known:
            # A misspelt secret variable would otherwise be ignored in silence.
            raise ConfigError(f"{var}: unknown variable (no such key; see config/push.toml)")
        section, key = known[var]
        values[section][key] = _from_text(section, key, environ[var], var)
        used[f"{section}.{key}"] = var
    return used


def _from_text(section: str, key: str, text: str, var: str) -> Any:
    typ = SCHEMA[section][key][0]
    if typ is str:
        return text
    try:
        if typ is bool:
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        value = typ(text.strip())
    except ValueError:
        raise ConfigError(f"{var}: {section}.{key} must be a {typ.__name__}, got {text!r}") from None
    if typ is float and value != value:  # NaN passes float() and every comparison check
        raise ConfigError(f"{var}: {section}.{key} must be a number, got {text!r}")
    return value


def _check(section: str, key: str, value: Any, source: str) -> Any:
    if key not in SCHEMA[section]:
        raise ConfigError(f"{source}: unknown key {section}.{key}")
    typ = SCHEMA[section][key][0]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ConfigError(f"{source}: {section}.{key} must be a {typ.__name__}, got {value!r}")
    if typ is float and value != value:
        raise ConfigError(f"{source}: {section}.{key} must be a number, got nan")
    return value


def _validate(cfg: PushConfig) -> None:
    w = cfg.where
    if not cfg["push.state_dir"]:
        raise ConfigError(f"{w('push.state_dir')} must not be empty")
    if cfg["push.log_level"] not in LOG_LEVELS:
        raise ConfigError(f"{w('push.log_level')} must be debug, info, warning or error")
    days = cfg["push.log_retention_days"]
    if not 0 < days <= MAX_LOG_RETENTION_DAYS:
        raise ConfigError(
            f"{w('push.log_retention_days')} must be > 0 and <= {MAX_LOG_RETENTION_DAYS:g} (got {days:g}):"
            " push metadata is kept 7 days at most; the retention can only be shortened")
    for k in ("push.device_stale_days", "push.purge_interval"):
        if not 0 < cfg[k] < float("inf"):
            raise ConfigError(f"{w(k)} must be > 0")
    _ = cfg.api_listen, cfg.admin_listen  # each raises on a bad address
    secret = cfg["api.jwt_secret"]
    if secret and len(secret.encode()) < MIN_JWT_SECRET:
        raise ConfigError(
            f"{w('api.jwt_secret')} must be at least {MIN_JWT_SECRET} bytes"
            " (leave it empty to have one generated)")
    if (cfg["api.tls_cert"] == "") != (cfg["api.tls_key"] == ""):
        raise ConfigError(f"{w('api.tls_cert')} and api.tls_key go together (both or neither)")
    if cfg["api.token_ttl_max"] <= 0:
        raise ConfigError(f"{w('api.token_ttl_max')} must be > 0 seconds")
    token_keys = [cfg[f"apns.{k}"] != "" for k in ("key_file", "key_id", "team_id")]
    if any(token_keys) and not all(token_keys):
        raise ConfigError(
            f"{w('apns.key_file')}, apns.key_id and apns.team_id go together (token auth: all three or none)")
    if cfg["apns.cert_key_file"] and not cfg["apns.cert_file"]:
        raise ConfigError(f"{w('apns.cert_key_file')} needs apns.cert_file")
    if all(token_keys) and cfg["apns.cert_file"]:
        raise ConfigError(
            f"{w('apns.cert_file')}: choose token auth (apns.key_file, key_id, team_id) or"
            " certificate auth (apns.cert_file), not both")
    for k in ("apns.base_url", "fcm.base_url"):
        url = cfg[k]
        if not url.startswith(("https://", "http://")) or len(url.split("://", 1)[1].strip("/")) == 0:
            raise ConfigError(f"{w(k)}: {url!r} is not an http(s) URL")


def check_files(cfg: PushConfig) -> None:
    """The files the config names exist and are readable (run and ``config check``)."""
    for k in FILE_KEYS:
        p = cfg[k]
        if not p:
            continue
        if not os.path.isfile(p):
            raise ConfigError(f"{cfg.where(k)}: {p}: no such file")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{cfg.where(k)}: {p}: not readable by this user")
