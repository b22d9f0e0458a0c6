"""The ``[provisioning]`` settings: one typed value per key of config/relay.toml."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from relay.provisioning.forwarding import NEVER
from relay.provisioning.policy import KeepaliveTimes

# Upper bounds of keys whose meaning ends somewhere: DESIGN §3's 12 months, and a
# body no phone's flash holds.
ACCESS_LOG_DAYS_MAX = 365
MAX_BODY_MAX = 4 * 1024**3


@dataclass(frozen=True)
class ProvisioningSettings:
    """What serve_provisioning needs; defaults are config/relay.toml's (a test checks).

    Every field is documented in config/relay.toml under [provisioning]."""

    enabled: bool = True
    listen: tuple[str, ...] = ("127.0.0.1:4433",)
    response_timeout: float = 30.0  # s until the PBX's response headers, else 504
    body_idle_timeout: float = 30.0  # s without a byte of body from the PBX, else cut
    max_body: int = 1024**3  # bytes per response
    max_requests_per_serial: int = 32  # phone requests in progress per PBX
    max_links_per_serial: int = 4  # links open per PBX
    max_connections: int = 1024  # TLS connections at once: phones and links
    max_connections_per_ip: int = 128  # of them from one IP address
    link_keepalive: float = 20.0  # s of silence before a PING
    link_keepalive_timeout: float = 10.0  # s a PING may go unanswered
    access_log_days: int = 365
    extra_request_headers: tuple[str, ...] = ()
    # Not in [provisioning]: the PBXs' digest realm (relay.domain) and algorithms
    # (sip.digest_algorithms), shared with SIP registration.
    realm: str = "relay.localhost"
    digest_algorithms: tuple[str, ...] = ("MD5", "SHA-256")  # sip.digest_algorithms default

    @property
    def keepalive(self) -> KeepaliveTimes:
        """The link's keepalive times."""
        return KeepaliveTimes(self.link_keepalive, self.link_keepalive_timeout)

    @classmethod
    def from_config(cls, get: Callable[[str], Any]) -> ProvisioningSettings:
        """From a RelayConfig (``get`` is its ``__getitem__``: "section.key" → value)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "realm":
                values[f.name] = get("relay.domain")
            elif f.name == "digest_algorithms":
                values[f.name] = tuple(get("sip.digest_algorithms"))
            else:
                value = get(f"provisioning.{f.name}")
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def problems(self) -> list[str]:
        """What is wrong with these values, one "provisioning.<key> ..." line each."""
        out = []
        for name in ("response_timeout", "body_idle_timeout", "link_keepalive", "link_keepalive_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                out.append(f"provisioning.{name} must be between 0 and 3600 seconds")
        for name in ("max_requests_per_serial", "max_links_per_serial", "max_connections",
                     "max_connections_per_ip"):
            if getattr(self, name) < 1:
                out.append(f"provisioning.{name} must be at least 1")
        if not 0 < self.max_body <= MAX_BODY_MAX:
            out.append(f"provisioning.max_body must be between 1 and {MAX_BODY_MAX} bytes")
        if not 1 <= self.access_log_days <= ACCESS_LOG_DAYS_MAX:
            out.append(f"provisioning.access_log_days must be between 1 and {ACCESS_LOG_DAYS_MAX}")
        for value in self.listen:
            if not _is_listen(value):
                out.append(f"provisioning.listen: {value!r} is not IP:port")
        for name in self.extra_request_headers:
            if not isinstance(name, str) or name.lower() in NEVER or not name.replace("-", "").isalnum():
                out.append(f"provisioning.extra_request_headers: {name!r} cannot be forwarded")
        return out


def _is_listen(value: Any) -> bool:
    host, sep, port = str(value).rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return bool(sep) and 0 <= int(port) < 65536
    except ValueError:
        return False
