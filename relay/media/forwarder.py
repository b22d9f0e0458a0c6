"""Userspace RTP/RTCP forwarder (trio): the packets move here, and are never kept."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import trio

from relay.media.session import Leg

# A datagram larger than this is not RTP on any network we serve (Ethernet MTU
# 1500; RTP over UDP stays below it to avoid fragmentation, RFC 3550 §11).
MAX_PACKET = 2048
# Packets read per wake-up before yielding to other tasks: amortises the event
# loop's cost under load without letting one busy stream starve the rest.
BATCH = 64


# Gauge (via ``count``, +1 on open, -1 on close): RTP streams, one per leg, i.e. one
# per direction, that this backend forwards. A kernel backend moves them to
# "media_streams_forwarded:kernel" while the kernel has them (relay/media/kernel.py).
STREAMS_USERSPACE = "media_streams_forwarded:userspace"


class UdpForwarder:
    """MediaBackend that binds two UDP sockets per leg and forwards in Python.

    ``on_latch(leg)``, if given, is called when one of the leg's latches takes its
    first source (the packet that latched it is forwarded as usual): what a
    kernel backend waits for before it hands the stream over."""

    def __init__(self, address: str, count: Callable[[str, int], None],
                 on_latch: Callable[[Leg], None] | None = None):
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.count = count
        self.on_latch = on_latch
        self._socks: dict[int, socket.socket] = {}  # forwarding, by port
        self._idle: dict[int, tuple[socket.socket, socket.socket]] = {}  # bound, not yet a leg's
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # ------------------------------------------------------------ MediaBackend
    def bind(self, port: int) -> bool:
        """Bind ``port`` and ``port + 1`` and keep them idle until a leg opens on them."""
        if port in self._idle:
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
        self._idle[port] = (opened[0], opened[1])
        return True

    def open(self, leg: Leg) -> None:
        """Forward what reaches the leg's pair (bound by :meth:`bind`, or now); OSError if taken."""
        assert self._nursery is not None, "attach() the forwarder to a nursery first"
        if leg.port not in self._idle and not self.bind(leg.port):
            raise OSError(f"port pair {leg.port} is in use")
        rtp, rtcp = self._idle.pop(leg.port)
        for s in (rtp, rtcp):
            _discard_queued(s)  # strays that reached the idle pair belong to no call
        self._socks[leg.port] = rtp
        self._socks[leg.port + 1] = rtcp
        self._nursery.start_soon(self._forward, rtp, leg, False)
        self._nursery.start_soon(self._forward, rtcp, leg, True)
        self.count(STREAMS_USERSPACE, 1)

    def close_all(self) -> None:
        """Close every socket, idle or forwarding (the relay is stopping)."""
        for pair in self._idle.values():
            for s in pair:
                s.close()
        self._idle.clear()
        for port, s in list(self._socks.items()):
            trio.lowlevel.notify_closing(s)
            s.close()
            del self._socks[port]

    def relatch(self, leg: Leg) -> None:
        """Nothing to do: the forwarder reads the latches for every packet."""

    def close(self, leg: Leg) -> None:
        """Stop forwarding for ``leg``: its sockets close (its reader tasks end)."""
        for idle in self._idle.pop(leg.port, ()):
            idle.close()
        if leg.port in self._socks:
            self.count(STREAMS_USERSPACE, -1)
        for port in (leg.port, leg.port + 1):
            s = self._socks.pop(port, None)
            if s is not None:
                trio.lowlevel.notify_closing(s)  # wakes its reader with ClosedResourceError
                s.close()

    # ---------------------------------------------------------------- hot path
    async def _forward(self, sock: socket.socket, leg: Leg, rtcp: bool) -> None:
        latch = leg.rtcp if rtcp else leg.rtp
        socks = self._socks
        clock = trio.current_time
        on_latch = self.on_latch
        try:
            while True:
                # The leg may have been closed before this task first ran (INVITE
                # and BYE in one read): a closed socket object says fileno() -1,
                # even when its old descriptor number already belongs to a new one.
                if sock.fileno() < 0:
                    return
                await trio.lowlevel.wait_readable(sock)
                for _ in range(BATCH):
                    try:
                        data, src = sock.recvfrom(MAX_PACKET)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno == errno.EBADF:
                            return
                        self.count("media_receive_errors_total", 1)
                        break
                    first = latch.latched is None
                    if not latch.accept(src[:2]):
                        leg.dropped += 1
                        self.count("media_dropped_total:unlatched_source", 1)
                        continue
                    if first and on_latch is not None:
                        on_latch(leg)
                    leg.packets += 1
                    leg.octets += len(data)
                    leg.last_seen = clock()
                    peer = leg.peer
                    if peer is None:
                        continue
                    dest = (peer.rtcp if rtcp else peer.rtp).destination()
                    out = socks.get(peer.port + 1 if rtcp else peer.port)
                    if dest is None or out is None:
                        self.count("media_dropped_total:no_destination", 1)
                        continue
                    try:
                        out.sendto(data, dest)
                    except (OSError, OverflowError, ValueError):
                        self.count("media_dropped_total:send_error", 1)
                else:
                    await trio.lowlevel.checkpoint()
        except (trio.ClosedResourceError, trio.BusyResourceError, ValueError):
            return  # closed while waiting: the leg is gone


def _discard_queued(sock: socket.socket) -> None:
    for _ in range(BATCH):
        try:
            sock.recvfrom(MAX_PACKET)
        except OSError:  # BlockingIOError: nothing (more) queued
            return
