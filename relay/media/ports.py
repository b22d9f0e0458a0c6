"""The RTP port range: even RTP, RTCP on the next odd port (RFC 3550 §11), bound once and reused."""

from __future__ import annotations

from collections import deque

from relay.media.sdp import MAX_MEDIA_STREAMS

# Port pairs kept bound and idle, ready to be handed to a call. Anchoring an SDP takes
# its ports from this reserve, so the pure media code never binds a socket itself; the
# shell tops the reserve up after every event. It must cover the most one message can
# ask for: two legs (phone side, PBX side) per stream, MAX_MEDIA_STREAMS streams.
RESERVE = 2 * MAX_MEDIA_STREAMS


class PortsExhausted(Exception):
    """No bound port pair is left for a new leg."""


class PortPool:
    """Hands out (rtp, rtp+1) pairs from [low, high], least recently freed first.

    A pair is bound once, the first time it is needed, and stays bound until the relay
    stops: a call's end hands it back still bound (the backend keeps its sockets and
    reads and drops what reaches them), so a call costs no socket(), bind() or close().
    The range bounds the sockets held, as before: at most two per pair.

    Reuse is least recently freed first, over every pair not in use, bound or not:
    a freed pair waits behind all the others, so late packets of an ended call do not
    land in a new one (rtpengine holds a deleted call's ports for ``delete-delay``,
    30 s in its sample configuration, to the same end). Pairs never used come first,
    then those freed by calls, oldest first.

    A pair goes free → binding (the shell was asked to bind it) → ready (bound, idle,
    in the reserve) → in use → free again (bound now); a pair the shell could not bind
    (another program holds it) is retired for good.
    """

    def __init__(self, low: int = 10_000, high: int = 20_000, reserve: int = RESERVE):
        if low % 2:
            low += 1
        if high - low < 2:
            raise ValueError("port range too small")
        self.low, self.high = low, high
        self.reserve = reserve
        self._free: deque[int] = deque(range(low, high, 2))  # least recently freed first
        self._bound: set[int] = set()  # pairs the shell bound (idle or in use)
        self._binding: set[int] = set()
        self._ready: deque[int] = deque()
        self._used: set[int] = set()

    def take(self) -> int:
        """A bound even RTP port whose RTCP port (+1) is bound too."""
        if not self._ready:
            raise PortsExhausted(f"no free RTP port pair in {self.low}-{self.high}")
        port = self._ready.popleft()
        self._used.add(port)
        return port

    def give_back(self, port: int) -> None:
        """A leg's pair was closed: free again, still bound, behind every other free pair."""
        if port in self._used:
            self._used.remove(port)
            self._free.append(port)

    def unused(self, port: int) -> None:
        """A pair taken but never opened (the SDP was refused): back to the reserve, still bound."""
        if port in self._used:
            self._used.remove(port)
            self._ready.appendleft(port)

    def to_bind(self) -> tuple[int, ...]:
        """Bring the reserve back to its size, oldest free pairs first; returns the pairs
        among them the shell must bind now (those already bound join the reserve at once)."""
        want = self.reserve - len(self._ready) - len(self._binding)
        out = []
        while want > 0 and self._free:
            port = self._free.popleft()
            if port in self._bound:
                self._ready.append(port)
            else:
                self._binding.add(port)
                out.append(port)
            want -= 1
        return tuple(out)

    def bound(self, ports: tuple[int, ...], failed: tuple[int, ...]) -> None:
        """What came of a ``to_bind``: bound pairs join the reserve, failed ones are retired."""
        for port in ports:
            if port in self._binding:
                self._binding.remove(port)
                self._bound.add(port)
                self._ready.append(port)
        for port in failed:
            self._binding.discard(port)  # another program holds it: never handed out again

    @property
    def in_use(self) -> int:
        """Pairs held by legs."""
        return len(self._used)

    @property
    def available(self) -> int:
        """Pairs that can still be handed out (bound or not)."""
        return len(self._free) + len(self._ready) + len(self._binding)

    @property
    def ready(self) -> int:
        """Pairs bound and idle, in the reserve."""
        return len(self._ready)

    @property
    def held(self) -> int:
        """Pairs bound (two sockets each), in use or idle."""
        return len(self._bound)
