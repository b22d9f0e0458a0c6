"""relay.toml: every key, its type and default; a bad file is one error naming the key."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.pbx.digest import ALGORITHMS
from relay.provisioning.settings import ProvisioningSettings


class ConfigError(Exception):
    pass


# section → key → (type, default). config/relay.toml documents each one; a test
# checks that the two agree.
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "relay": {
        "domain": (str, "relay.localhost"),
        "advertise": (str, ""),
        "state_dir": (str, "./state"),
        "log_level": (str, "info"),
        "drain_timeout": (float, 30.0),
    },
    "sip": {
        "udp": (list, ["127.0.0.1:5060"]),
        "tcp": (list, ["127.0.0.1:5060"]),
        "tls": (list, ["127.0.0.1:5061"]),
        "tls_cert": (str, ""),
        "tls_key": (str, ""),
        "digest_algorithms": (list, ["SHA-256", "MD5"]),
        "flow_idle_timeout": (float, 300.0),
        "partial_message_timeout": (float, 10.0),
        "pbx_expires_default": (int, 3600),
        "pbx_expires_min": (int, 60),
        "pbx_expires_max": (int, 3600),
    },
    "transport": {
        "max_connections": (int, 16_384),
        "connections_reserved": (int, 2_048),
        "max_connections_per_source": (int, 256),
        "connection_rate_per_source": (float, 50.0),
        "max_tls_handshakes": (int, 128),
        "udp_rate_per_source": (float, 200.0),
        "udp_ban_seconds": (float, 30.0),
        "exempt": (list, ["127.0.0.1", "::1"]),
    },
    "media": {
        "enabled": (bool, True),
        "address": (str, ""),
        "port_min": (int, 10000),
        "port_max": (int, 20000),
        "no_media_timeout": (float, 60.0),
        "backend": (str, "userspace"),
    },
    "admin": {
        "listen": (str, "127.0.0.1:9090"),
    },
    "push": {
        "mode": (str, "embedded"),
        "config": (str, ""),
        "url": (str, ""),
        "token": (str, ""),
        "ca_file": (str, ""),
        "ring_timeout": (float, 30.0),
        "udp_asleep_after": (float, 40.0),
    },
    # Provisioning through the relay (relay/provisioning, docs/provisioning.md); the
    # typed view is relay.provisioning.settings.ProvisioningSettings.
    "provisioning": {
        "enabled": (bool, True),
        "listen": (list, ["127.0.0.1:4433"]),
        "response_timeout": (float, 30.0),
        "body_idle_timeout": (float, 30.0),
        "max_body": (int, 1073741824),
        "max_requests_per_serial": (int, 32),
        "max_links_per_serial": (int, 4),
        "max_connections": (int, 1024),
        "max_connections_per_ip": (int, 128),
        "link_keepalive": (float, 20.0),
        "link_keepalive_timeout": (float, 10.0),
        "access_log_days": (int, 365),
        "extra_request_headers": (list, []),
    },
}
PUSH_MODES = ("embedded", "remote", "off")
MEDIA_BACKENDS = ("userspace", "kernel", "auto")  # relay/media/kernel.py make_backend
ENV_PREFIX = "PBX_RELAY_"
# Not configuration keys: the variable naming the configuration file itself, and the
# operator token the operator commands read (relay/operator.py).
ENV_NOT_KEYS = frozenset({"PBX_RELAY_CONFIG", "PBX_RELAY_OPERATOR_TOKEN"})


@dataclass
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class RelayConfig:
    source: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return self.values[section][key]

    def listeners(self, transport: str) -> list[Listen]:
        return [parse_listen(v, f"sip.{transport}", self.source) for v in self[f"sip.{transport}"]]

    @property
    def state_dir(self) -> Path:
        return Path(self["relay.state_dir"])

    @property
    def advertise(self) -> str:
        if self["relay.advertise"]:
            return str(self["relay.advertise"])
        for t in ("udp", "tcp", "tls"):
            for listen in self.listeners(t):
                if listen.host not in ("0.0.0.0", "::"):
                    return listen.host
        return "127.0.0.1"

    @property
    def media_address(self) -> str:
        """The IP media sockets bind to and SDP names: media.address, else the
        advertised address when it is an IP, else 127.0.0.1."""
        if self["media.address"]:
            return str(self["media.address"])
        try:
            ipaddress.ip_address(self.advertise)
            return self.advertise
        except ValueError:
            return "127.0.0.1"


def parse_listen(value: str, key: str, source: str) -> Listen:
    host, sep, port = str(value).rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
        if not sep or not 0 <= p < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{source}: {key}: {value!r} is not IP:port") from None
    return Listen(host, p)


def env_overrides(
    environ: Mapping[str, str], prefix: str, schema: dict[str, dict[str, tuple[type, Any]]],
    skip: frozenset[str] = frozenset(),
) -> dict[str, tuple[str, Any]]:
    """``<PREFIX><SECTION>_<KEY>`` variables → {"section.key": (variable, value)}.

    Values are read as TOML literals when they are one (``5``, ``true``,
    ``["a", "b"]``), else as plain strings — secrets stay out of files this way."""
    out: dict[str, tuple[str, Any]] = {}
    for var, raw in environ.items():
        if not var.startswith(prefix) or var in skip:
            continue
        rest = var[len(prefix):].lower()
        section = next((s for s in schema if rest.startswith(s + "_")), None)
        if section is None or rest[len(section) + 1:] not in schema[section]:
            raise ConfigError(f"${var}: no such configuration key")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if schema[section][rest[len(section) + 1:]][0] is str:
            value = raw
        out[f"{section}.{rest[len(section) + 1:]}"] = (var, value)
    return out


def load(
    path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RelayConfig:
    """Defaults, then the file, then ``PBX_RELAY_<SECTION>_<KEY>`` environment
    variables, then ``overrides`` ({"section.key": value})."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
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
    env = os.environ if environ is None else environ
    for dotted, (var, value) in env_overrides(env, ENV_PREFIX, SCHEMA, ENV_NOT_KEYS).items():
        section, key = dotted.split(".")
        values[section][key] = _check(section, key, value, f"${var}")
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        values[section][key] = _check(section, key, value, source)
    cfg = RelayConfig(source, values)
    _validate(cfg)
    return cfg


def _check(section: str, key: str, value: Any, source: str) -> Any:
    if key not in SCHEMA[section]:
        raise ConfigError(f"{source}: unknown key {section}.{key}")
    typ = SCHEMA[section][key][0]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ConfigError(f"{source}: {section}.{key} must be a {typ.__name__}, got {value!r}")
    return value


def _validate(cfg: RelayConfig) -> None:
    src = cfg.source
    for t in ("udp", "tcp", "tls"):
        cfg.listeners(t)
    for a in cfg["sip.digest_algorithms"]:
        if a not in ALGORITHMS:
            raise ConfigError(f"{src}: sip.digest_algorithms: unknown algorithm {a!r} (MD5, SHA-256)")
    if not cfg["sip.digest_algorithms"]:
        raise ConfigError(f"{src}: sip.digest_algorithms: needs at least one algorithm")
    for k in ("flow_idle_timeout", "partial_message_timeout"):
        if cfg[f"sip.{k}"] <= 0:
            raise ConfigError(f"{src}: sip.{k} must be > 0")
    lo, default, hi = (cfg[f"sip.pbx_expires_{x}"] for x in ("min", "default", "max"))
    if not 0 < lo <= default <= hi:
        raise ConfigError(f"{src}: sip.pbx_expires_*: need 0 < min <= default <= max")
    domain = cfg["relay.domain"]
    if not domain or " " in domain or domain.startswith("."):
        raise ConfigError(f"{src}: relay.domain: {domain!r} is not a domain name")
    if cfg["relay.log_level"] not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{src}: relay.log_level must be debug, info, warning or error")
    if not 0.0 <= cfg["relay.drain_timeout"] <= 3600.0:
        raise ConfigError(f"{src}: relay.drain_timeout must be between 0 and 3600 seconds")
    if (cfg["sip.tls_cert"] == "") != (cfg["sip.tls_key"] == ""):
        raise ConfigError(f"{src}: sip.tls_cert and sip.tls_key go together")
    parse_listen(cfg["admin.listen"], "admin.listen", src)
    _validate_transport(cfg)
    lo, hi = cfg["media.port_min"], cfg["media.port_max"]
    if not 1024 <= lo < hi <= 65535 or hi - lo < 4:
        raise ConfigError(
            f"{src}: media.port_min/port_max: need 1024 <= min < max <= 65535, room for 2 pairs")
    if cfg["push.mode"] not in PUSH_MODES:
        raise ConfigError(f"{src}: push.mode must be embedded, remote or off")
    if cfg["push.mode"] == "remote" and not (cfg["push.url"] and cfg["push.token"]):
        raise ConfigError(f"{src}: push.url and push.token are needed with push.mode = \"remote\"")
    url = cfg["push.url"]
    if url:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
        if scheme not in ("http", "https") or not host:
            raise ConfigError(f"{src}: push.url: {url!r} is not an http(s) URL")
        if scheme == "http" and host not in ("127.0.0.1", "::1", "localhost"):
            # Push tokens and the relay's bearer token would cross the network in clear.
            raise ConfigError(f"{src}: push.url: plain http is allowed on loopback only; use https")
    if not 1.0 <= cfg["push.ring_timeout"] <= 120.0:
        raise ConfigError(f"{src}: push.ring_timeout must be between 1 and 120 seconds")
    if not 5.0 <= cfg["push.udp_asleep_after"] <= 300.0:
        raise ConfigError(f"{src}: push.udp_asleep_after must be between 5 and 300 seconds")
    if cfg["media.backend"] not in MEDIA_BACKENDS:
        raise ConfigError(f"{src}: media.backend must be userspace, kernel or auto")
    if cfg["media.no_media_timeout"] <= 0:
        raise ConfigError(f"{src}: media.no_media_timeout must be > 0")
    for problem in ProvisioningSettings.from_config(cfg.__getitem__).problems():
        raise ConfigError(f"{src}: {problem}")
    if cfg["media.address"]:
        try:
            ipaddress.ip_address(cfg["media.address"])
        except ValueError:
            raise ConfigError(
                f"{src}: media.address: {cfg['media.address']!r} is not an IP address") from None


def _validate_transport(cfg: RelayConfig) -> None:
    src = cfg.source
    for k in ("max_connections", "max_connections_per_source", "max_tls_handshakes"):
        if cfg[f"transport.{k}"] < 1:
            raise ConfigError(f"{src}: transport.{k} must be >= 1")
    if not 0 <= cfg["transport.connections_reserved"] < cfg["transport.max_connections"]:
        raise ConfigError(f"{src}: transport.connections_reserved: need 0 <= reserved < max_connections")
    for k in ("connection_rate_per_source", "udp_rate_per_source"):
        if cfg[f"transport.{k}"] <= 0:
            raise ConfigError(f"{src}: transport.{k} must be > 0")
    if not 0.0 <= cfg["transport.udp_ban_seconds"] <= 86_400.0:
        raise ConfigError(f"{src}: transport.udp_ban_seconds must be between 0 and 86400")
    for a in cfg["transport.exempt"]:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ConfigError(f"{src}: transport.exempt: {a!r} is not an IP address") from None
