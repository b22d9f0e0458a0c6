"""relay.toml as typed sections: every key, its type, default and meaning; checks across keys.

config/relay.toml documents each key for operators and holds the same defaults (a
test compares them). Loading, environment overrides (``PBX_RELAY_<SECTION>_<KEY>``)
and the one-line errors are :mod:`pbxcore.config`'s.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pbxcore import config as loader
from pbxcore.config import Listen, ServiceConfig, path_field
from pbxcore.errors import ConfigError
from pbxcore.redisconn import redis_url_problem
from relay.media import session as media_session
from relay.pbx.digest import ALGORITHMS
from relay.provisioning.settings import ProvisioningSettings
from relay.proxy import authbans, invites
from relay.transport import limits

__all__ = ["ConfigError", "Listen", "RelayConfig", "load"]

PUSH_MODES = ("embedded", "remote", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")
TRANSPORTS = ("udp", "tcp", "tls")
MEDIA_BACKENDS = ("userspace", "kernel", "auto")  # relay/media/kernel.py make_backend
MAX_BAN_SECONDS = 86_400.0  # a day: longer is the firewall's (fail2ban's) job
CONFIG_ENV = "PBX_RELAY_CONFIG"  # the configuration file's path; not a key
COMMAND_ENV = "PBX_RELAY_COMMAND"  # how dev.sh runs pbx-relay ("./dev.sh"), for the banner; not a key
# The operator token the operator commands read (relay/operator.py); not a key.
OPERATOR_TOKEN_ENV = "PBX_RELAY_OPERATOR_TOKEN"
COMPILE_ENV = "PBX_RELAY_COMPILE"  # build time: compile the core (setup.py); not a key
MAX_DRAIN_TIMEOUT = 3600.0  # seconds: a stop that waits longer than an hour is a hang
RING_TIMEOUT_RANGE = (1.0, 120.0)  # seconds; APNs/FCM keep a VoIP push about that long
UDP_ASLEEP_RANGE = (5.0, 300.0)  # seconds; awake phones send UDP keepalives every 15-30 s
# [cluster] (docs/cluster.md)
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a node id: safe in a Redis key and a log line
MIN_CLUSTER_SECRET = 32  # characters: `openssl rand -hex 32` gives 64; 32 hex digits are 128 bits
CLUSTER_TIMEOUT_RANGE = (0.01, 0.45)  # seconds: below SIP's 500 ms Timer A (relay/cluster/redis.py)
HEARTBEAT_RANGE = (0.5, 60.0)  # seconds between heartbeats; a node is dead after 3 missed
LOOKUP_CACHE_RANGE = (0, 500_000)  # holders cached: ~300 bytes each, 150 MB at most
LOOKUP_CACHE_TTL_RANGE = (0.0, 60.0)  # seconds: longer, and a half-dead old holder keeps calls longer


@dataclass
class RelaySection:
    """``[relay]``: who the relay is and where it keeps its state."""

    domain: str = "relay.localhost"
    """SIP domain and digest realm: PBXs register ``sip:<serial>@<domain>``."""
    advertise: str = ""
    """Host or IP written into Via, Record-Route and Path; empty: the first non-wildcard listen address."""
    state_dir: str = path_field("./state")
    """pbx.sqlite, relay.key, tls/ and (embedded) push/; relative to the config file's directory."""
    log_level: str = "info"
    """debug, info, warning or error."""
    drain_timeout: float = 30.0
    """Seconds a SIGTERM waits for calls in progress (0-3600)."""


@dataclass
class SipSection:
    """``[sip]``: listeners, TLS, digest and the timers of flows and PBX registrations."""

    udp: list[str] = field(default_factory=lambda: ["127.0.0.1:5060"])
    """UDP listen addresses, "IP:port"; empty: no UDP."""
    tcp: list[str] = field(default_factory=lambda: ["127.0.0.1:5060"])
    """TCP listen addresses."""
    tls: list[str] = field(default_factory=lambda: ["127.0.0.1:5061"])
    """TLS listen addresses."""
    tls_cert: str = path_field("")
    """PEM certificate chain; empty: a self-signed one under <state_dir>/tls."""
    tls_key: str = path_field("")
    """PEM private key of tls_cert (both or neither)."""
    digest_algorithms: list[str] = field(default_factory=lambda: ["MD5", "SHA-256"])
    """Digest algorithms offered to PBXs, one challenge each, in this order (RFC 8760); MD5 first
    because most PBXs and phones read only the first challenge."""
    flow_idle_timeout: float = 300.0
    """Seconds a TCP/TLS flow may stay silent (no keepalive either) before it is closed."""
    partial_message_timeout: float = 10.0
    """Seconds a TCP/TLS peer may leave half a message unfinished."""
    pbx_expires_default: int = 3600
    """Seconds of a PBX registration that names no expiry."""
    pbx_expires_min: int = 60
    """Shortest PBX registration accepted (shorter: 423 with Min-Expires)."""
    pbx_expires_max: int = 3600
    """Longest PBX registration granted (longer is cut down in the 200 OK)."""


@dataclass
class MediaSection:
    """``[media]``: RTP anchoring."""

    enabled: bool = True
    """Anchor every call's RTP/RTCP at the relay (SDP rewritten, latching)."""
    address: str = ""
    """IP media sockets bind to and SDP names; empty: the advertised IP, else 127.0.0.1."""
    port_min: int = 10000
    """First RTP port (inclusive)."""
    port_max: int = 20000
    """End of the RTP port range (exclusive)."""
    no_media_timeout: float = 60.0
    """Seconds without RTP or RTCP either way after which a call's media is torn down."""
    backend: str = "userspace"
    """userspace, kernel (nftables; CAP_NET_ADMIN) or auto (kernel when it can run); docs/media.md."""
    kernel_fast_path: bool = True
    """kernel backend: latched streams forwarded by tc eBPF before the IP stack (Linux 6.6+)."""


@dataclass
class TransportSection:
    """``[transport]``: per-source admission (relay/transport/limits.py says why each default)."""

    max_connections: int = limits.MAX_CONNECTIONS
    """TCP/TLS connections open at once, in total."""
    connections_reserved: int = limits.CONNECTIONS_RESERVED
    """Of max_connections, kept for registered PBXs and their phones."""
    max_connections_per_source: int = limits.MAX_CONNECTIONS_PER_SOURCE
    """TCP/TLS connections open at once from one untrusted IP."""
    connection_rate_per_source: float = limits.CONNECTION_RATE_PER_SOURCE
    """New connections per second from one untrusted IP (2 s burst)."""
    max_tls_handshakes: int = limits.MAX_TLS_HANDSHAKES
    """TLS handshakes in progress at once from untrusted sources."""
    udp_rate_per_source: float = limits.UDP_RATE_PER_SOURCE
    """UDP datagrams per second from one untrusted IP before the rest is dropped unread."""
    udp_ban_seconds: float = limits.UDP_BAN_SECONDS
    """Seconds a UDP source that keeps flooding is banned in the kernel (0-86400; 0: never)."""
    exempt: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    """Source IPs never limited per source (only by the totals)."""


@dataclass
class LimitsSection:
    """``[limits]``: what one source or one PBX may make the SIP core hold (docs/security.md)."""

    pending_invites_per_source: int = invites.MAX_PENDING_PER_SOURCE
    """INVITEs ringing or held for a push at once from one source IP (then 503)."""
    pending_invites_per_pbx: int = invites.MAX_PENDING_PER_PBX
    """INVITEs ringing or held at once for one PBX (then 503)."""
    media_calls_per_source: int = media_session.MAX_CALLS_PER_SOURCE
    """Calls with anchored media opened from one source IP (then 503)."""
    media_calls_per_pbx: int = media_session.MAX_CALLS_PER_PBX
    """Calls with anchored media of one PBX (then 503)."""
    auth_failures_before_ban: int = authbans.MAX_FAILURES
    """Wrong digest responses from one source IP within a minute before it is banned."""
    auth_first_ban: float = authbans.FIRST_BAN
    """Seconds of a source's first ban; each next one twice as long, up to a day."""


@dataclass
class ProvisioningSection:
    """``[provisioning]``: provisioning files through the relay (docs/provisioning.md)."""

    enabled: bool = True
    """Serve GET /provisioning/<serial>/<path> over HTTPS and accept `pbx-relay link` agents."""
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:4433"])
    """HTTPS listen addresses, "IP:port"."""
    response_timeout: float = 30.0
    """Seconds the PBX has to start answering a request (then 504)."""
    body_idle_timeout: float = 30.0
    """Seconds a response body may stall before it is cut."""
    max_body: int = 1073741824
    """Largest response body carried, in bytes."""
    max_requests_per_serial: int = 32
    """Requests in flight to one PBX at once (then 503)."""
    max_links_per_serial: int = 4
    """Links one PBX may hold open."""
    max_connections: int = 1024
    """HTTPS connections open at once, in total."""
    max_connections_per_ip: int = 128
    """HTTPS connections open at once from one IP."""
    link_keepalive: float = 20.0
    """Seconds between PINGs on an idle link."""
    link_keepalive_timeout: float = 10.0
    """Seconds a PING may wait for its answer before the link is dropped."""
    access_log_days: int = 365
    """Days an access-log row is kept (anonymised address, serial, status)."""
    extra_request_headers: list[str] = field(default_factory=list)
    """Request headers carried to the PBX besides the standard ones."""


@dataclass
class AdminSection:
    """``[admin]``: the loopback HTTP endpoint."""

    listen: str = "127.0.0.1:9090"
    """/metrics, /registry, /healthz, /readyz and the directory reload, "IP:port"."""


@dataclass
class PushLinkSection:
    """``[push]``: where the push service is and how long a woken call waits."""

    mode: str = "embedded"
    """embedded (in this process), remote (a pbx-push at url) or off."""
    config: str = path_field("")
    """push.toml of the embedded push service; empty: its defaults under <state_dir>/push."""
    url: str = ""
    """The remote push service's API (https, or http on loopback)."""
    token: str = ""
    """Bearer token of scope relay for url; set it as $PBX_RELAY_PUSH_TOKEN."""
    ca_file: str = path_field("")
    """CA bundle (PEM) for url's certificate; empty: the system's."""
    ring_timeout: float = 30.0
    """Seconds (1-120) an INVITE waits for a woken phone."""
    udp_asleep_after: float = 40.0
    """Seconds (5-300) of silence after which a UDP phone with push parameters is asleep."""


@dataclass
class ClusterSection:
    """``[cluster]``: several relay nodes sharing state in Redis/Valkey (docs/cluster.md); off when
    redis_url is empty."""

    redis_url: str = ""
    """redis://[:password@]host:port of the shared Redis/Valkey; empty: one node, nothing shared."""
    node_id: str = ""
    """This node's name in the cluster (letters, digits, . _ -; at most 64); empty: the host name."""
    listen: str = "127.0.0.1:5070"
    """"IP:port" other nodes connect to for SIP between nodes (authenticated TCP)."""
    advertise: str = ""
    """"host:port" other nodes reach this node's listen address at; empty: listen (not a wildcard)."""
    secret: str = ""
    """Shared secret of every node (at least 32 characters); set it as $PBX_RELAY_CLUSTER_SECRET."""
    timeout: float = 0.25
    """Seconds one call to Redis/Valkey, or opening a link to another node, may take (0.01-0.45)."""
    heartbeat: float = 5.0
    """Seconds between heartbeats (0.5-60); a node is taken as gone after three missed."""
    max_links: int = 64
    """Links to and from other nodes open at once (handshakes included), in total."""
    max_pending_lookups: int = 1000
    """Lookups of a PBX's node in flight at once; beyond, requests get 503 with Retry-After: 1."""
    lookup_cache_size: int = 10_000
    """PBXs whose holding node is remembered at once (0: no cache); beyond, the oldest is dropped."""
    lookup_cache_ttl: float = 5.0
    """Seconds (0-60) a remembered holding node is used without asking Redis (0: no cache)."""
    link_tls: bool = False
    """Links between nodes inside TLS, with the relay's SIP TLS certificate (the same on every node)."""


@dataclass(kw_only=True)
class RelayConfig(ServiceConfig):
    """The relay's whole configuration: ``cfg.sip.flow_idle_timeout`` and so on."""

    ENV_PREFIX = "PBX_RELAY_"
    ENV_NOT_KEYS = frozenset({CONFIG_ENV, OPERATOR_TOKEN_ENV, COMMAND_ENV, COMPILE_ENV})

    relay: RelaySection = field(default_factory=RelaySection)
    """``[relay]``"""
    sip: SipSection = field(default_factory=SipSection)
    """``[sip]``"""
    transport: TransportSection = field(default_factory=TransportSection)
    """``[transport]``"""
    limits: LimitsSection = field(default_factory=LimitsSection)
    """``[limits]``"""
    media: MediaSection = field(default_factory=MediaSection)
    """``[media]``"""
    admin: AdminSection = field(default_factory=AdminSection)
    """``[admin]``"""
    push: PushLinkSection = field(default_factory=PushLinkSection)
    """``[push]``"""
    provisioning: ProvisioningSection = field(default_factory=ProvisioningSection)
    """``[provisioning]``"""
    cluster: ClusterSection = field(default_factory=ClusterSection)
    """``[cluster]``"""

    def __getitem__(self, dotted: str) -> Any:
        """``cfg["sip.udp"]`` is ``cfg.sip.udp``: for code that takes keys by name (a
        component's settings read through a getter, tests). The shell uses attributes."""
        section, key = dotted.split(".")
        return getattr(self.section(section), key)

    # -- derived values
    def listeners(self, transport: str) -> list[Listen]:
        """The parsed listen addresses of ``transport`` ("udp", "tcp" or "tls")."""
        key = f"sip.{transport}"
        return [loader.parse_listen(v, self.where(key)) for v in getattr(self.sip, transport)]

    @property
    def admin_listen(self) -> Listen:
        """admin.listen, parsed."""
        return loader.parse_listen(self.admin.listen, self.where("admin.listen"))

    @property
    def state_dir(self) -> Path:
        """relay.state_dir, absolute."""
        return Path(self.relay.state_dir)

    @property
    def advertise(self) -> str:
        """relay.advertise, else the first listen address that is not a wildcard, else 127.0.0.1."""
        if self.relay.advertise:
            return self.relay.advertise
        for t in TRANSPORTS:
            for listen in self.listeners(t):
                if listen.host not in ("0.0.0.0", "::"):
                    return listen.host
        return "127.0.0.1"

    @property
    def media_address(self) -> str:
        """The IP media sockets bind to and SDP names: media.address, else the
        advertised address when it is an IP, else 127.0.0.1."""
        if self.media.address:
            return self.media.address
        try:
            ipaddress.ip_address(self.advertise)
            return self.advertise
        except ValueError:
            return "127.0.0.1"

    @property
    def cluster_listen(self) -> Listen:
        """cluster.listen, parsed."""
        return loader.parse_listen(self.cluster.listen, self.where("cluster.listen"))

    @property
    def node_id(self) -> str:
        """cluster.node_id, else the host name (cut to a valid node id)."""
        if self.cluster.node_id:
            return self.cluster.node_id
        name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].lstrip("._-")
        return name or "node"

    def embedded_push_source(self) -> tuple[str | None, dict[str, Any]]:
        """push.toml of the embedded push service and what the relay sets in it: without
        a push.toml, its state lives in <state_dir>/push."""
        path = self.push.config or None
        return path, ({} if path else {"push.state_dir": str(self.state_dir / "push")})

    # -- checks across keys
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first key that is wrong."""
        self._validate_relay()
        self._validate_sip()
        self._validate_transport()
        self._validate_limits()
        self._validate_media()
        self._validate_push()
        self._validate_cluster()
        for problem in ProvisioningSettings.from_config(self.__getitem__).problems():
            raise ConfigError(f"{self.source}: {problem}")
        _ = self.admin_listen

    def _within(self, key: str, value: float, bounds: tuple[float, float], unit: str = " seconds") -> None:
        """``key``'s value must lie within ``bounds`` (NaN does not): else one error naming it."""
        lo, hi = bounds
        if not lo <= value <= hi:
            raise ConfigError(f"{self.where(key)} must be between {lo:g} and {hi:g}{unit}")

    def _validate_relay(self) -> None:
        r, w = self.relay, self.where
        if not r.domain or " " in r.domain or r.domain.startswith("."):
            raise ConfigError(f"{w('relay.domain')}: {r.domain!r} is not a domain name")
        if r.log_level not in LOG_LEVELS:
            raise ConfigError(f"{w('relay.log_level')} must be debug, info, warning or error")
        self._within("relay.drain_timeout", r.drain_timeout, (0.0, MAX_DRAIN_TIMEOUT))

    def _validate_sip(self) -> None:
        s, w = self.sip, self.where
        for t in TRANSPORTS:
            self.listeners(t)
        for a in s.digest_algorithms:
            if a not in ALGORITHMS:
                raise ConfigError(f"{w('sip.digest_algorithms')}: unknown algorithm {a!r} (MD5, SHA-256)")
        if not s.digest_algorithms:
            raise ConfigError(f"{w('sip.digest_algorithms')}: needs at least one algorithm")
        for k in ("flow_idle_timeout", "partial_message_timeout"):
            if getattr(s, k) <= 0:
                raise ConfigError(f"{w('sip.' + k)} must be > 0")
        if not 0 < s.pbx_expires_min <= s.pbx_expires_default <= s.pbx_expires_max:
            raise ConfigError(f"{self.source}: sip.pbx_expires_*: need 0 < min <= default <= max")
        if (s.tls_cert == "") != (s.tls_key == ""):
            raise ConfigError(f"{w('sip.tls_cert')} and sip.tls_key go together")

    def _validate_media(self) -> None:
        m, w = self.media, self.where
        if not 1024 <= m.port_min < m.port_max <= 65535 or m.port_max - m.port_min < 4:
            raise ConfigError(
                f"{self.source}: media.port_min/port_max: need 1024 <= min < max <= 65535, room for 2 pairs")
        if m.backend not in MEDIA_BACKENDS:
            raise ConfigError(f"{w('media.backend')} must be userspace, kernel or auto")
        if m.no_media_timeout <= 0:
            raise ConfigError(f"{w('media.no_media_timeout')} must be > 0")
        if m.address:
            try:
                ipaddress.ip_address(m.address)
            except ValueError:
                raise ConfigError(f"{w('media.address')}: {m.address!r} is not an IP address") from None

    def _validate_transport(self) -> None:
        t, w = self.transport, self.where
        for k in ("max_connections", "max_connections_per_source", "max_tls_handshakes"):
            if getattr(t, k) < 1:
                raise ConfigError(f"{w('transport.' + k)} must be >= 1")
        if not 0 <= t.connections_reserved < t.max_connections:
            raise ConfigError(f"{w('transport.connections_reserved')}: need 0 <= reserved < max_connections")
        for k in ("connection_rate_per_source", "udp_rate_per_source"):
            if getattr(t, k) <= 0:
                raise ConfigError(f"{w('transport.' + k)} must be > 0")
        self._within("transport.udp_ban_seconds", t.udp_ban_seconds, (0.0, MAX_BAN_SECONDS), unit="")
        for a in t.exempt:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ConfigError(f"{w('transport.exempt')}: {a!r} is not an IP address") from None

    def _validate_limits(self) -> None:
        lim, w = self.limits, self.where
        for k in ("pending_invites_per_source", "pending_invites_per_pbx", "media_calls_per_source",
                  "media_calls_per_pbx", "auth_failures_before_ban"):
            if getattr(lim, k) < 1:
                raise ConfigError(f"{w('limits.' + k)} must be >= 1")
        self._within("limits.auth_first_ban", lim.auth_first_ban, (1.0, MAX_BAN_SECONDS))

    def _validate_cluster(self) -> None:
        c, w = self.cluster, self.where
        _ = self.cluster_listen  # parsed even when off: a typo shows before the day it is used
        if c.node_id and not NODE_ID.fullmatch(c.node_id):
            raise ConfigError(f"{w('cluster.node_id')}: {c.node_id!r}: letters, digits, . _ - "
                              "(at most 64, not starting with . _ -)")
        if c.advertise:
            host_port(c.advertise, w("cluster.advertise"))
        self._within("cluster.timeout", c.timeout, CLUSTER_TIMEOUT_RANGE)
        self._within("cluster.heartbeat", c.heartbeat, HEARTBEAT_RANGE)
        for k in ("max_links", "max_pending_lookups"):
            if getattr(c, k) < 1:
                raise ConfigError(f"{w('cluster.' + k)} must be >= 1")
        self._within("cluster.lookup_cache_size", c.lookup_cache_size, LOOKUP_CACHE_RANGE, "")
        self._within("cluster.lookup_cache_ttl", c.lookup_cache_ttl, LOOKUP_CACHE_TTL_RANGE)
        if not c.redis_url:
            return
        problem = redis_url_problem(c.redis_url)
        if problem is not None:
            raise ConfigError(f"{w('cluster.redis_url')} {problem}")
        if len(c.secret) < MIN_CLUSTER_SECRET:
            raise ConfigError(f"{w('cluster.secret')} must be at least {MIN_CLUSTER_SECRET} characters "
                              "when cluster.redis_url is set (the same on every node; "
                              "set it as $PBX_RELAY_CLUSTER_SECRET)")
        listen = self.cluster_listen
        if not c.advertise and listen.host in ("0.0.0.0", "::"):
            raise ConfigError(f"{w('cluster.advertise')} is needed when cluster.listen is a wildcard")

    def _validate_push(self) -> None:
        p, w = self.push, self.where
        if p.mode not in PUSH_MODES:
            raise ConfigError(f"{w('push.mode')} must be embedded, remote or off")
        if p.mode == "remote" and not (p.url and p.token):
            raise ConfigError(f'{self.source}: push.url and push.token are needed with push.mode = "remote"')
        if p.url:
            parts = urlsplit(p.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{w('push.url')}: {p.url!r} is not an http(s) URL")
            if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
                # Push tokens and the relay's bearer token would cross the network in clear.
                raise ConfigError(f"{w('push.url')}: plain http is allowed on loopback only; use https")
        self._within("push.ring_timeout", p.ring_timeout, RING_TIMEOUT_RANGE)
        self._within("push.udp_asleep_after", p.udp_asleep_after, UDP_ASLEEP_RANGE)


HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def host_port(value: str, where: str) -> tuple[str, int]:
    """``host:port`` (a name, an IP, or an IPv6 address in brackets) as (host, port)."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        p = int(port)
        if not sep or not 0 < p < 65536:
            raise ValueError
        if bracketed or ":" in host:
            ipaddress.IPv6Address(host)
        elif not HOST_NAME.fullmatch(host):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not host:port (IPv6 as [::1]:5070)") from None
    return host, p


def load(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RelayConfig:
    """Defaults, then the file, then ``PBX_RELAY_<SECTION>_<KEY>`` variables, then
    ``overrides`` ({"section.key": value}); see :func:`pbxcore.config.load`."""
    return loader.load(RelayConfig, path, overrides, environ)



