"""Userspace RTP/RTCP forwarder (trio): the packets move here, and are never kept."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

import trio

from relay.media.session import Leg

# A datagram larger than this is not RTP on any network we serve (Ethernet MTU
# 1500; RTP over UDP stays below it to avoid fragmentation, RFC 3550 §11).
MAX_PACKET = 2048
# Packets read from one socket per round before the next socket and the rest of the
# relay get their turn: amortises the event loop's cost under load without letting
# one busy stream starve the rest.
BATCH = 64
# Ready sockets taken from the media epoll per round (the rest wait for the next one:
# the epoll is level-triggered, nothing is lost). A round then holds the loop for at
# most this many sockets' batches, as one trio tick with a task per socket did before.
MAX_EVENTS = 1024


# Gauge (via ``count``, +1 on open, -1 on close): RTP streams, one per leg, i.e. one
# per direction, that this backend forwards. A kernel backend moves them to
# "media_streams_forwarded:kernel" while the kernel has them (relay/media/kernel.py).
STREAMS_USERSPACE = "media_streams_forwarded:userspace"
# Counter: packets that reached a bound pair no call holds now (late packets of an
# ended call, port scans): read and dropped.
DROPPED_IDLE = "media_dropped_total:idle_port"


class UdpForwarder:
    """MediaBackend that binds two UDP sockets per port pair and forwards in Python.

    A pair is bound once and kept (relay.media.ports reuses it, least recently freed
    first): opening or closing a leg only changes which leg, if any, a port belongs to.
    Every socket is registered once in one epoll of its own, and one trio task reads
    whatever is ready (rtpengine's shape: one poller, many sockets) — a call costs no
    socket, bind, close, task or epoll registration. What reaches a pair no leg holds
    is read and dropped (``DROPPED_IDLE``).

    ``on_latch(leg)``, if given, is called when one of the leg's latches takes its
    first source (the packet that latched it is forwarded as usual): what a
    kernel backend waits for before it hands the stream over."""

    def __init__(self, address: str, count: Callable[[str, int], None],
                 on_latch: Callable[[Leg], None] | None = None):
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.count = count
        self.on_latch = on_latch
        self._socks: dict[int, socket.socket] = {}  # every bound port, RTP and RTCP
        self._by_fd: dict[int, tuple[socket.socket, int]] = {}  # descriptor → (socket, port)
        self._legs: dict[int, tuple[Leg, bool]] = {}  # forwarding port → (leg, is its RTCP port)
        self._epoll = select.epoll()
        self._attached = False

    def attach(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._serve)
        self._attached = True

    # ------------------------------------------------------------ MediaBackend
    def bind(self, port: int) -> bool:
        """Bind ``port`` and ``port + 1``; they stay bound (idle until a leg opens on them)."""
        if port in self._socks:
            return True
        opened: list[socket.socket] = []
        try:
            for p in (port, port + 1):
                s = socket.socket(self.family, socket.SOCK_DGRAM)
                opened.append(s)
                s.setblocking(False)
                s.bind((self.address, p))
        except OSError:
            for s in opened:
                s.close()
            return False
        for p, s in zip((port, port + 1), opened, strict=True):
            self._socks[p] = s
            self._by_fd[s.fileno()] = (s, p)
            self._epoll.register(s.fileno(), select.EPOLLIN)
        return True

    def open(self, leg: Leg) -> None:
        """Forward what reaches the leg's pair (bound by :meth:`bind`, or now); OSError if taken."""
        assert self._attached, "attach() the forwarder to a nursery first"
        if leg.port not in self._socks and not self.bind(leg.port):
            raise OSError(f"port pair {leg.port} is in use")
        self._legs[leg.port] = (leg, False)
        self._legs[leg.port + 1] = (leg, True)
        self.count(STREAMS_USERSPACE, 1)

    def close(self, leg: Leg) -> None:
        """Stop forwarding for ``leg``: its pair stays bound, idle, for a later leg."""
        entry = self._legs.get(leg.port)
        if entry is None or entry[0] is not leg:
            return
        del self._legs[leg.port], self._legs[leg.port + 1]
        self.count(STREAMS_USERSPACE, -1)

    def relatch(self, leg: Leg) -> None:
        """Nothing to do: the forwarder reads the latches for every packet."""

    def close_all(self) -> None:
        """Close every socket and the epoll (the relay is stopping)."""
        self._legs.clear()
        self._by_fd.clear()
        for s in self._socks.values():
            s.close()
        self._socks.clear()
        if not self._epoll.closed:
            if self._attached:
                trio.lowlevel.notify_closing(self._epoll.fileno())  # ends the reader task
            self._epoll.close()

    @property
    def bound_pairs(self) -> int:
        """Port pairs bound now (two sockets each), forwarding or idle."""
        return len(self._socks) // 2

    # ---------------------------------------------------------------- hot path
    async def _serve(self) -> None:
        """The one reader: wait for any media socket to be readable, drain the ready ones."""
        epoll, by_fd = self._epoll, self._by_fd
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, MAX_EVENTS):
                    entry = by_fd.get(fd)
                    if entry is not None:
                        self._drain(*entry)
                await trio.lowlevel.checkpoint()
        except (trio.ClosedResourceError, ValueError):
            if not self._epoll.closed:
                raise  # not close_all(): a bug, to surface at the nursery

    def _drain(self, sock: socket.socket, port: int) -> None:
        entry = self._legs.get(port)
        if entry is None:
            self._drop_idle(sock)
            return
        leg, rtcp = entry
        for _ in range(BATCH):
            try:
                data, src = sock.recvfrom(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                self.count("media_receive_errors_total", 1)
                return
            self._forward(leg, rtcp, data, src)

    def _forward(self, leg: Leg, rtcp: bool, data: bytes, src: tuple[str, int]) -> None:
        latch = leg.rtcp if rtcp else leg.rtp
        first = latch.latched is None
        if not latch.accept(src[:2]):
            leg.dropped += 1
            self.count("media_dropped_total:unlatched_source", 1)
            return
        if first and self.on_latch is not None:
            self.on_latch(leg)
        leg.packets += 1
        leg.octets += len(data)
        leg.last_seen = trio.current_time()
        peer = leg.peer
        if peer is None:
            return
        dest = (peer.rtcp if rtcp else peer.rtp).destination()
        out = self._socks.get(peer.port + 1 if rtcp else peer.port)
        if dest is None or out is None:
            self.count("media_dropped_total:no_destination", 1)
            return
        try:
            out.sendto(data, dest)
        except (OSError, OverflowError, ValueError):
            self.count("media_dropped_total:send_error", 1)

    def _drop_idle(self, sock: socket.socket) -> None:
        for _ in range(BATCH):
            try:
                sock.recvfrom(MAX_PACKET)
            except OSError:  # BlockingIOError: nothing (more) queued
                return
            self.count(DROPPED_IDLE, 1)
