"""Which flows are alive, as the transport reported it: the core's own view (RFC 5626 §4.4).

The transport tells the core when a TCP/TLS connection opens or closes and when a
UDP peer sent anything (SIP, CRLF keepalive, STUN); the core asks this table instead
of calling into the transport in the middle of a decision.
"""

from __future__ import annotations

from relay.proxy.flow import Flow

# Seconds a UDP peer's last datagram time is kept: longer than any "asleep after"
# the relay may be configured with (push.udp_asleep_after is at most 300 s).
UDP_HEARD_KEEP = 600.0
# UDP peers remembered at most. Every source address that ever sent a datagram would
# otherwise be an entry; beyond this, new peers are not remembered until the next sweep
# (they count as silent, which only matters for push wake-ups of UDP phones).
MAX_UDP_PEERS = 200_000


class Liveness:
    """Open connection-oriented flows, and when each UDP peer was last heard from."""

    __slots__ = ("_open", "_heard", "_sweep_at")

    def __init__(self) -> None:
        self._open: set[Flow] = set()
        self._heard: dict[tuple[str, int], float] = {}
        self._sweep_at = 0.0

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, flow: Flow) -> None:
        """A TCP/TLS connection was accepted (or a UDP socket bound: UDP flows are
        always usable and need no entry)."""
        if flow.reliable:
            self._open.add(flow)

    def closed(self, flow: Flow) -> None:
        self._open.discard(flow)

    def heard(self, flow: Flow, now: float) -> None:
        """``flow``'s peer sent something (any datagram, any bytes on a stream)."""
        if flow.reliable:
            return
        heard = self._heard
        addr = (flow.remote_ip, flow.remote_port)
        if addr in heard or len(heard) < MAX_UDP_PEERS:
            heard[addr] = now

    def alive(self, flow: Flow) -> bool:
        """A connection the transport still has open; UDP flows are always alive."""
        return not flow.reliable or flow in self._open

    def heard_at(self, flow: Flow) -> float | None:
        """When the UDP peer of ``flow`` last sent anything, or None."""
        return self._heard.get((flow.remote_ip, flow.remote_port))

    def sweep(self, now: float) -> None:
        """Forget UDP peers silent for UDP_HEARD_KEEP seconds (called once a second)."""
        if now < self._sweep_at:
            return
        horizon = now - UDP_HEARD_KEEP
        self._heard = {a: t for a, t in self._heard.items() if t >= horizon}
        self._sweep_at = now + UDP_HEARD_KEEP / 4
