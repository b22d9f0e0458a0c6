"""A flow: one transport-level path to a peer (RFC 5626 §3)."""

from __future__ import annotations

from dataclasses import dataclass

# "cluster": an authenticated TCP link to another relay node (relay/cluster/links.py,
# docs/cluster.md); it carries SIP like TCP, and tokens may name it like any flow.
CLUSTER = "cluster"
TRANSPORTS = ("udp", "tcp", "tls", CLUSTER)


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from or goes to.

    For UDP the flow is (our socket, the peer's address); for TCP/TLS it is the
    connection, which the transport layer finds by the same four values.
    """

    transport: str  # "udp" | "tcp" | "tls" | "cluster"
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

    @property
    def node_link(self) -> bool:
        """A link to another relay node, not a phone or a PBX."""
        return self.transport == CLUSTER

    @property
    def remote(self) -> str:
        host = f"[{self.remote_ip}]" if ":" in self.remote_ip else self.remote_ip
        return f"{host}:{self.remote_port}"

    def __str__(self) -> str:
        return f"{self.transport}:{self.remote}"
