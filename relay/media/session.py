"""Media sessions: one per dialog, two legs per stream, latching rules (sans-I/O).

The component decides; the shell moves packets. Every method that changes what is
forwarded returns the media effects (relay.media.effects) the shell must carry out:
``OpenLeg`` once a leg's SDP went out, ``RelatchLeg`` when a side's address changed,
``CloseLeg`` when a leg ends, ``BindPorts`` to keep the reserve of bound port pairs
(relay.media.ports) full. Nothing here touches a socket.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from relay.media.effects import BindPorts, CloseLeg, MediaEffect, OpenLeg, RelatchLeg
from relay.media.ports import PortPool, PortsExhausted
from relay.media.sdp import MediaStream, Sdp, SdpError, anchor_sdp

PHONE = "phone"
PBX = "pbx"
OTHER = {PHONE: PBX, PBX: PHONE}
Addr = tuple[str, int]

_UNSPECIFIED = ("0.0.0.0", "::")
# A session never answered is dropped after this long whatever happens: past
# proxy Timer C (180 s, RFC 3261 §16.6 item 11) plus margin.
SETUP_LIMIT = 240.0


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
        """Whether a packet from ``src`` belongs to this side (latching on the first one)."""
        latched = self.latched
        if latched is not None:
            return src == latched
        if src[0] in self.allowed_ips:
            self.latched = src
            return True
        return False

    def destination(self) -> Addr | None:
        """Where packets for this side go: the latched source, else what its SDP said."""
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

    def apply(self, rtp: Addr | None, rtcp: Addr | None, signal_ip: str) -> RelatchLeg:
        """Take a new address for this side: latching starts again."""
        self.sdp_addr = rtp
        self.pending = None
        self.rtp.reopen(rtp, signal_ip)
        self.rtcp.reopen(rtcp, signal_ip)
        return RelatchLeg(self)


@dataclass(eq=False)
class Stream:
    """One m= line of the call: the phone's leg and the PBX's leg, each the other's peer."""

    index: int
    legs: dict[str, Leg]


@dataclass(eq=False)
class MediaSession:
    """The media of one call (by Call-ID): its streams, and whether the call is up."""

    call_id: str
    created: float
    streams: dict[int, Stream] = field(default_factory=dict)
    established: bool = False
    owner: Owner | None = None  # whose share of the ports it counts against

    def legs(self) -> list[Leg]:
        return [leg for s in self.streams.values() for leg in s.legs.values()]

    def last_activity(self) -> float:
        return max([self.created, *(leg.last_seen for leg in self.legs())])


class MediaBackend(Protocol):
    """What moves the packets, driven by the shell from the media effects. The userspace
    forwarder (trio) is one; a kernel forwarder (nftables, DESIGN §9) is another."""

    def bind(self, port: int) -> bool:
        """Bind ``port`` and ``port + 1`` and hold them idle; False if another program has one."""

    def open(self, leg: Leg) -> None:
        """Start forwarding what reaches leg.port/leg.port + 1 to leg.peer."""

    def close(self, leg: Leg) -> None:
        """Stop forwarding for ``leg`` and free its two ports."""

    def relatch(self, leg: Leg) -> None:
        """``leg``'s latches were reopened: whatever the backend derived from the old
        latched addresses no longer holds."""


class MediaError(Exception):
    """No media session could be made for an SDP."""


class NoPorts(MediaError):
    """The port range is used up: the request deserves 503 with Retry-After."""


class OverShare(NoPorts):
    """The caller's source or the PBX has as many calls anchored as it may (503 too)."""


# Calls with anchored media one source IP may open, and one PBX may have. Each call
# holds at most 2 x limits.MAX_MEDIA_STREAMS port pairs; at d9440f1 156 INVITEs from
# one phone held all 10,000 ports (issue 10). A source: an office NAT with a hundred
# calls in progress; a PBX: a thousand calls at once, past any office this relay serves.
MAX_CALLS_PER_SOURCE = 100
MAX_CALLS_PER_PBX = 1_000


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a call's media is charged to: the PBX, and the source IP that opened it ("" when
    no per-source share applies: the PBX itself, an exempt address)."""

    serial: str
    source_ip: str


class UnusableSdp(MediaError):
    """The body is not SDP the relay can anchor: the request deserves 488."""


class MediaSessions:
    """Every call's media. ``address``: the IP the SDP names for the relay."""

    def __init__(self, address: str, ports: PortPool, no_media_timeout: float = 60.0,
                 per_source: int = MAX_CALLS_PER_SOURCE, per_pbx: int = MAX_CALLS_PER_PBX):
        self.address = address
        self.ports = ports
        self.no_media_timeout = no_media_timeout
        self.per_source = per_source
        self.per_pbx = per_pbx
        self.sessions: dict[str, MediaSession] = {}
        self._by_source: dict[str, int] = {}
        self._by_serial: dict[str, int] = {}
        self.ended_total = 0
        self._ended = (0, 0)  # packets, octets of the legs closed and counted
        # Legs just closed: the backend reads their last counts when it closes them
        # (the kernel's counters), after end() returned, so they are added later.
        self._closing: list[Leg] = []

    def start(self) -> list[MediaEffect]:
        """What to do before the first call: fill the reserve of bound pairs."""
        return self._refill()

    def on_ports_bound(self, bound: tuple[int, ...], failed: tuple[int, ...]) -> list[MediaEffect]:
        """The shell's answer to a ``BindPorts``; asks again for pairs that failed."""
        self.ports.bound(bound, failed)
        return self._refill() if failed else []

    def _refill(self) -> list[MediaEffect]:
        wanted = self.ports.to_bind()
        return [BindPorts(wanted)] if wanted else []

    # ------------------------------------------------------------- signalling
    def on_sdp(
        self, call_id: str, from_side: str, body: bytes, signal_ip: str, now: float,
        peer_ip: str = "", offer: bool = False, owner: Owner | None = None,
    ) -> tuple[bytes, list[MediaEffect]]:
        """An offer or answer from ``from_side`` (whose SIP came from ``signal_ip``):
        remember where that side wants media, and return the SDP the other side
        must see (relay address, the ports of the other side's legs) with the effects.
        ``peer_ip`` is the other side's SIP address, to accept its first packets before
        its own SDP. ``offer``: an offer in a request (re-INVITE, UPDATE) whose new
        address waits for its 2xx when the call is already up (commit/rollback).
        Raises NoPorts or UnusableSdp; then nothing of this SDP is kept."""
        session = self.sessions.get(call_id)
        if session is None:
            session = MediaSession(call_id, now, owner=self._admit(owner))
            self.sessions[call_id] = session
        learn = _Learning(session, from_side, signal_ip, peer_ip, offer and session.established, self.ports)
        try:
            body = anchor_sdp(body, self.address, learn.allocate)
        except (SdpError, PortsExhausted) as e:
            learn.undo()
            if not session.streams:
                self._forget(call_id)  # nothing anchored, nothing to keep
            raise (NoPorts(str(e)) if isinstance(e, PortsExhausted) else UnusableSdp(str(e))) from e
        if not session.streams:
            self._forget(call_id)
        return body, [*learn.effects(), *self._refill()]

    def _admit(self, owner: Owner | None) -> Owner | None:
        """Charge a new call to ``owner``'s shares; OverShare when one is full."""
        if owner is None:
            return None
        if owner.source_ip and self._by_source.get(owner.source_ip, 0) >= self.per_source:
            raise OverShare(f"{owner.source_ip} has {self.per_source} calls anchored")
        if self._by_serial.get(owner.serial, 0) >= self.per_pbx:
            raise OverShare(f"PBX {owner.serial} has {self.per_pbx} calls anchored")
        for table, key in ((self._by_source, owner.source_ip), (self._by_serial, owner.serial)):
            table[key] = table.get(key, 0) + 1
        return owner

    def _forget(self, call_id: str) -> MediaSession | None:
        session = self.sessions.pop(call_id, None)
        if session is not None and session.owner is not None:
            o = session.owner
            for table, key in ((self._by_source, o.source_ip), (self._by_serial, o.serial)):
                n = table.get(key, 0) - 1
                if n > 0:
                    table[key] = n
                else:
                    table.pop(key, None)
        return session

    def established(self, call_id: str) -> list[MediaEffect]:
        """A 2xx to an INVITE or UPDATE: the call is up, a pending offer holds."""
        session = self.sessions.get(call_id)
        if session is None:
            return []
        session.established = True
        return [leg.apply(*leg.pending) for leg in session.legs() if leg.pending is not None]

    def failed(self, call_id: str) -> list[MediaEffect]:
        """A final error to an INVITE or UPDATE (or a CANCEL): a call that never came
        up loses its media; an established one forgets the rejected offer."""
        session = self.sessions.get(call_id)
        if session is None:
            return []
        if not session.established:
            return self.end(call_id)
        for leg in session.legs():
            leg.pending = None
        return []

    def end(self, call_id: str) -> list[MediaEffect]:
        """The call is over: close every leg (empty when there was no session)."""
        session = self._forget(call_id)
        if session is None:
            return []
        out: list[MediaEffect] = []
        legs = session.legs()
        for leg in legs:
            out.append(CloseLeg(leg))
            self.ports.give_back(leg.port)
            self._closing.append(leg)
        _unpair(legs)
        self.ended_total += 1
        return [*out, *self._refill()]

    def relayed(self) -> tuple[int, int]:
        """(packets, octets) relayed so far, ended calls and live ones."""
        self._fold_closed()
        packets, octets = self._ended
        for leg in (leg for s in self.sessions.values() for leg in s.legs()):
            packets, octets = packets + leg.packets, octets + leg.octets
        return packets, octets

    def _fold_closed(self) -> None:
        packets, octets = self._ended
        for leg in self._closing:
            packets, octets = packets + leg.packets, octets + leg.octets
        self._ended, self._closing = (packets, octets), []

    # ------------------------------------------------------------------ time
    def expire(self, now: float) -> tuple[list[str], list[MediaEffect]]:
        """Established calls with no packet, RTP or RTCP, either way for the timeout.
        A call still ringing is not judged by its media (early media is optional):
        Timer C, CANCEL and final errors end it; SETUP_LIMIT is the safety net."""
        self._fold_closed()  # closed by an earlier event: their last counts are in
        gone = [cid for cid, s in self.sessions.items()
                if (now - s.last_activity() >= self.no_media_timeout if s.established
                    else now - s.created >= SETUP_LIMIT)]
        out: list[MediaEffect] = []
        for cid in gone:
            out.extend(self.end(cid))
        return gone, out


def _unpair(legs: Iterable[Leg]) -> None:
    """The two legs of a stream name each other (``peer``): a reference cycle. Cut when
    they end, so that an ended call is freed by reference counting at once instead of
    waiting, with everything it holds, for a full collection of the cyclic collector
    (at 400 calls/s ~17 objects a call did: those collections were the setup-time p99,
    bench/RESULTS.md, issue 9). Nothing reads ``peer`` of a closed leg: the backend
    stops forwarding for it in the same step (CloseLeg)."""
    for leg in legs:
        leg.peer = None


class _Learning:
    """One SDP being anchored: the streams and legs it creates or changes, so that
    they are opened when it succeeds and given back when it fails."""

    def __init__(self, session: MediaSession, from_side: str, signal_ip: str, peer_ip: str,
                 defer: bool, ports: PortPool):
        self.session, self.from_side, self.signal_ip = session, from_side, signal_ip
        self.peer_ip, self.defer, self.ports = peer_ip, defer, ports
        self.new_streams: list[Stream] = []
        self.relatched: list[RelatchLeg] = []

    def allocate(self, sdp: Sdp) -> list[tuple[int, int | None]]:
        ports: list[tuple[int, int | None]] = []
        for m in sdp.media:
            if m.port == 0 or m.port_count > 1:
                # disabled (RFC 3264 §6), or layered over several ports (RFC 8866
                # §5.14), which no SIP phone uses: rejected rather than half served
                ports.append((0, None))
                continue
            stream = self.session.streams.get(m.index) or self._new_stream(m.index)
            self._learn(stream.legs[self.from_side], m)
            other = stream.legs[OTHER[self.from_side]]
            other.rtp.expect_from(self.peer_ip)
            other.rtcp.expect_from(self.peer_ip)
            ports.append((other.port, other.port + 1))
        return ports

    def _new_stream(self, index: int) -> Stream:
        a = Leg(PHONE, self.ports.take())
        try:
            b = Leg(PBX, self.ports.take())
        except PortsExhausted:
            self.ports.unused(a.port)
            raise
        a.peer, b.peer = b, a
        stream = Stream(index, {PHONE: a, PBX: b})
        self.session.streams[index] = stream
        self.new_streams.append(stream)
        return stream

    def _learn(self, leg: Leg, m: MediaStream) -> None:
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
        if self.defer:
            leg.pending = (rtp, rtcp, self.signal_ip)
        else:
            self.relatched.append(leg.apply(rtp, rtcp, self.signal_ip))

    def effects(self) -> list[MediaEffect]:
        """Open the new legs, tell the backend of changed ones (not of legs it has not seen)."""
        fresh = {id(leg) for s in self.new_streams for leg in s.legs.values()}
        out: list[MediaEffect] = [OpenLeg(leg) for s in self.new_streams for leg in s.legs.values()]
        out += [r for r in self.relatched if id(r.leg) not in fresh]
        return out

    def undo(self) -> None:
        """The SDP was refused: streams made for it go, their pairs back to the reserve."""
        for stream in self.new_streams:
            del self.session.streams[stream.index]
            for leg in stream.legs.values():
                self.ports.unused(leg.port)
            _unpair(stream.legs.values())
