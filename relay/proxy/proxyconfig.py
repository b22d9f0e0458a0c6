"""What the proxy core needs to know of the configuration (relay/service.py builds it from relay.toml)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.proxy.authbans import FIRST_BAN, MAX_FAILURES
from relay.proxy.invites import PendingLimits

# INVITE transactions in flight at most (each ~2 KB). Beyond, new INVITEs get
# 503 + Retry-After (RFC 3261 §21.5.4) instead of the relay growing without bound.
MAX_TRANSACTIONS = 100_000


@dataclass(slots=True)
class ProxyConfig:
    """What the core needs to know of the configuration."""

    domain: str  # relay domain: PBXs register sip:<serial>@domain, phones use <serial>.domain
    advertise: str  # host (name or IP) we put in Via / Record-Route / Path
    ports: dict[str, int]  # transport → advertised port
    local_names: frozenset[str] = frozenset()  # extra hosts meaning "us" (listen IPs)
    pbx_expires_default: int = 3600
    pbx_expires_min: int = 60  # RFC 3261 §10.3: 423 Interval Too Brief below this
    pbx_expires_max: int = 3600
    # RFC 8599: wake phones that registered push parameters (needs a push service)
    push: bool = False
    ring_timeout: float = 30.0  # seconds an INVITE waits for a woken phone, then 480
    udp_asleep_after: float = 40.0  # a UDP phone silent this long (no SIP, CRLF or STUN) sleeps
    max_transactions: int = MAX_TRANSACTIONS
    pending: PendingLimits = PendingLimits()  # INVITEs pending per source and per PBX
    exempt_sources: frozenset[str] = frozenset()  # never held to a per-source share
    auth_failures_before_ban: int = MAX_FAILURES
    auth_first_ban: float = FIRST_BAN
    # Several nodes share state (docs/cluster.md): claims, lookups and links between
    # nodes (ports["cluster"] is the node's cluster listener).
    cluster: bool = False
    # The cluster's shared secret: names a held device in the shared state without its
    # push token (relay/proxy/crosswake.py).
    cluster_key: bytes = b""
    # This node's id in the cluster ("" alone): written into Path and Record-Route tokens,
    # and part of the loop hash (each node tells its own Vias from the others').
    node_id: str = ""
