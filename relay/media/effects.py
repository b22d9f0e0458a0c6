"""What the media component asks the shell to do with sockets and forwarders (sans-I/O output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.media.session import Leg


@dataclass(frozen=True, slots=True)
class BindPorts:
    """Bind these RTP/RTCP port pairs (each ``p`` and ``p + 1``) and hold them unused;
    report with ``on_ports_bound(bound, failed)``. The media component keeps a reserve
    of bound pairs so that anchoring an SDP never waits for, or fails on, a socket."""

    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OpenLeg:
    """Start forwarding the packets that reach ``leg.port`` (and ``+1``) to its peer."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class RelatchLeg:
    """``leg``'s latches were reopened (a new SDP address from its side): what a
    backend derived from the old latched addresses no longer holds."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class CloseLeg:
    """Stop forwarding for ``leg``; its two ports stay bound, idle, until a later leg
    (relay.media.ports hands the pair out again, least recently freed first)."""

    leg: Leg


MediaEffect = BindPorts | OpenLeg | RelatchLeg | CloseLeg
