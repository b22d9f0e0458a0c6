"""Media sessions: one per dialog, two legs per stream, latching rules (sans-I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from relay.media.ports import PortAllocator, PortsExhausted
from relay.media.sdp import MediaStream, Sdp, SdpError, anchor_sdp

PHONE = "phone"
PBX = "pbx"
OTHER = {PHONE: PBX, PBX: PHONE}
Addr = tuple[str, int]

# Attempts at binding a pair before giving up on a call: a pair another program
# holds is retired and the next one tried.
BIND_ATTEMPTS = 16
_UNSPECIFIED = ("0.0.0.0", "::")
# A session never answered is dropped after this long whatever happens: past
# proxy Timer C (180 s, RFC 3261 §16.6 item 11) plus margin.
SETUP_LIMIT = 240.0


def _apply(leg: Leg, rtp: Addr | None, rtcp: Addr | None, signal_ip: str) -> None:
    leg.sdp_addr = rtp
    leg.pending = None
    leg.rtp.reopen(rtp, signal_ip)
    leg.rtcp.reopen(rtcp, signal_ip)


class Latch:
    """Symmetric RTP (RFC 4961): learn a side's real address from its first packet.

    Before latching only a source whose IP is the side's SIP flow IP or the IP its
    SDP names is accepted — a stranger who guesses the port cannot take the
    stream over ("RTP bleed"); afterwards only the latched address. A new SDP
    address from that side (re-INVITE after a network change) reopens it.
    """

    __slots__ = ("expected", "allowed_ips", "latched")

    def __init__(self) -> None:
        self.expected: Addr | None = None
        self.allowed_ips: frozenset[str] = frozenset()
        self.latched: Addr | None = None

    def reopen(self, sdp_addr: Addr | None, signal_ip: str) -> None:
        """``sdp_addr``: where the side's SDP asks for media; ``signal_ip``: the
        address its SIP came from. Until the first packet, media for the side
        goes to the signalling IP at the SDP's port — behind NAT the SDP names
        a private address the relay must never send to (rtpengine's default,
        without trust-address; Kamailio's fix_nated_sdp does the same)."""
        self.expected = None if sdp_addr is None else (signal_ip or sdp_addr[0], sdp_addr[1])
        ips = {signal_ip} if signal_ip else set()
        if sdp_addr is not None:
            ips.add(sdp_addr[0])
        self.allowed_ips = frozenset(ips)
        self.latched = None

    def expect_from(self, ip: str) -> None:
        """Before the side's own SDP arrives (its 200 may be overtaken by its first
        RTP), accept its packets from the address its SIP flow has."""
        if not self.allowed_ips and ip:
            self.allowed_ips = frozenset({ip})

    def accept(self, src: Addr) -> bool:
        latched = self.latched
        if latched is not None:
            return src == latched
        if src[0] in self.allowed_ips:
            self.latched = src
            return True
        return False

    def destination(self) -> Addr | None:
        return self.latched or self.expected


@dataclass(eq=False)
class Leg:
    """One side of one stream: the relay's port pair that side sends to."""

    side: str
    port: int  # RTP; RTCP is port + 1
    rtp: Latch = field(default_factory=Latch)
    rtcp: Latch = field(default_factory=Latch)
    peer: Leg | None = None
    sdp_addr: Addr | None = None  # what the side's last SDP said, to see it change
    # An offer inside an established call takes effect only when it is accepted
    # (RFC 3264 §8: a rejected offer changes nothing): (sdp rtp, sdp rtcp, signal ip).
    pending: tuple[Addr | None, Addr | None, str] | None = None
    packets: int = 0
    octets: int = 0
    dropped: int = 0
    last_seen: float = 0.0


@dataclass(eq=False)
class Stream:
    index: int
    legs: dict[str, Leg]


@dataclass(eq=False)
class MediaSession:
    call_id: str
    created: float
    streams: dict[int, Stream] = field(default_factory=dict)
    established: bool = False

    def legs(self) -> list[Leg]:
        return [leg for s in self.streams.values() for leg in s.legs.values()]

    def last_activity(self) -> float:
        return max([self.created, *(leg.last_seen for leg in self.legs())])


class MediaBackend(Protocol):
    """What moves the packets. The userspace forwarder (trio) is one; a kernel
    forwarder (nftables, DESIGN §9) would be another."""

    def open(self, leg: Leg) -> None:
        """Bind leg.port and leg.port + 1 and start forwarding to leg.peer; OSError if taken."""

    def close(self, leg: Leg) -> None:
        """Stop forwarding for ``leg`` and free its two ports."""

    def relatch(self, leg: Leg) -> None:
        """``leg``'s latches were reopened (a new SDP address from its side): whatever
        the backend derived from the old latched addresses no longer holds."""


class MediaError(Exception):
    """No media session could be made (no ports left, unusable SDP)."""


class MediaController:
    def __init__(self, backend: MediaBackend, address: str, ports: PortAllocator,
                 no_media_timeout: float = 60.0):
        self.backend = backend
        self.address = address
        self.ports = ports
        self.no_media_timeout = no_media_timeout
        self.sessions: dict[str, MediaSession] = {}
        self.ended_total = 0
        self.packets_total = 0  # of ended sessions; live legs count their own
        self.octets_total = 0

    # ------------------------------------------------------------- signalling
    def on_sdp(
        self, call_id: str, from_side: str, body: bytes, signal_ip: str, now: float,
        peer_ip: str = "", offer: bool = False,
    ) -> bytes:
        """An offer or answer from ``from_side`` (whose SIP came from ``signal_ip``):
        remember where that side wants media, and return the SDP the other side
        must see (relay address, the ports of the other side's legs). ``peer_ip``
        is the other side's SIP address, to accept its first packets before its
        own SDP. ``offer``: an offer in a request (re-INVITE, UPDATE) whose new
        address waits for its 2xx when the call is already up (commit/rollback).
        Raises MediaError."""
        session = self.sessions.get(call_id)
        if session is None:
            session = self.sessions[call_id] = MediaSession(call_id, now)
        defer = offer and session.established

        def allocate(sdp: Sdp) -> list[tuple[int, int | None]]:
            ports: list[tuple[int, int | None]] = []
            for m in sdp.media:
                if m.port == 0 or m.port_count > 1:
                    # disabled (RFC 3264 §6), or layered over several ports (RFC 8866
                    # §5.14), which no SIP phone uses: rejected rather than half served
                    ports.append((0, None))
                    continue
                stream = session.streams.get(m.index) or self._new_stream(session, m.index)
                self._learn(stream.legs[from_side], m, signal_ip, defer)
                other = stream.legs[OTHER[from_side]]
                other.rtp.expect_from(peer_ip)
                other.rtcp.expect_from(peer_ip)
                ports.append((other.port, other.port + 1))
            return ports

        try:
            return anchor_sdp(body, self.address, allocate)
        except SdpError as e:
            raise MediaError(f"unusable SDP: {e}") from e
        except PortsExhausted as e:
            raise MediaError(str(e)) from e
        finally:
            if not session.streams:
                self.sessions.pop(call_id, None)  # nothing anchored, nothing to keep

    def _learn(self, leg: Leg, m: MediaStream, signal_ip: str, defer: bool) -> None:
        conn = m.conn
        rtp: Addr | None = None if conn is None or conn in _UNSPECIFIED else (conn, m.port)
        if rtp == leg.sdp_addr and leg.rtp.allowed_ips:
            leg.pending = None
            return  # same address as before: keep what was latched
        rtcp: Addr | None = None
        if rtp is not None:
            if m.rtcp_mux:
                rtcp = rtp
            elif m.rtcp_port or rtp[1] < 65535:  # RTP on 65535 has no implied RTCP port
                rtcp = (m.rtcp_addr or rtp[0], m.rtcp_port or rtp[1] + 1)
        if defer:
            leg.pending = (rtp, rtcp, signal_ip)
        else:
            _apply(leg, rtp, rtcp, signal_ip)
            self.backend.relatch(leg)

    def _new_stream(self, session: MediaSession, index: int) -> Stream:
        a = self._open_leg(PHONE)
        try:
            b = self._open_leg(PBX)
        except PortsExhausted:
            self.backend.close(a)
            self.ports.give_back(a.port)
            raise
        a.peer, b.peer = b, a
        stream = Stream(index, {PHONE: a, PBX: b})
        session.streams[index] = stream
        return stream

    def _open_leg(self, side: str) -> Leg:
        for _ in range(BIND_ATTEMPTS):
            leg = Leg(side, self.ports.take())
            try:
                self.backend.open(leg)
                return leg
            except OSError:
                self.ports.retire(leg.port)  # another program holds it
        raise PortsExhausted("no bindable media port pair")

    def established(self, call_id: str) -> None:
        """A 2xx to an INVITE or UPDATE: the call is up, a pending offer holds."""
        session = self.sessions.get(call_id)
        if session is not None:
            session.established = True
            for leg in session.legs():
                if leg.pending is not None:
                    _apply(leg, *leg.pending)
                    self.backend.relatch(leg)

    def failed(self, call_id: str) -> None:
        """A final error to an INVITE or UPDATE (or a CANCEL): a call that never came
        up loses its media; an established one forgets the rejected offer."""
        session = self.sessions.get(call_id)
        if session is None:
            return
        if not session.established:
            self.end(call_id)
            return
        for leg in session.legs():
            leg.pending = None

    def end(self, call_id: str) -> bool:
        session = self.sessions.pop(call_id, None)
        if session is None:
            return False
        for leg in session.legs():
            self.backend.close(leg)
            self.ports.give_back(leg.port)
            self.packets_total += leg.packets
            self.octets_total += leg.octets
        self.ended_total += 1
        return True

    # ------------------------------------------------------------------ time
    def expire(self, now: float) -> list[str]:
        """Established calls with no packet, RTP or RTCP, either way for the timeout.
        A call still ringing is not judged by its media (early media is optional):
        Timer C, CANCEL and final errors end it; SETUP_LIMIT is the safety net."""
        gone = [cid for cid, s in self.sessions.items()
                if (now - s.last_activity() >= self.no_media_timeout if s.established
                    else now - s.created >= SETUP_LIMIT)]
        for cid in gone:
            self.end(cid)
        return gone
