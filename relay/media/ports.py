"""The relay's RTP port range: even RTP ports, RTCP on the next odd one (RFC 3550 §11)."""

from __future__ import annotations

from collections import deque


class PortsExhausted(Exception):
    pass


class PortAllocator:
    """Hands out (rtp, rtp+1) pairs from [low, high], least recently freed first.

    Reusing the pair freed longest ago keeps late packets of an ended call from
    landing in a new one (rtpengine does the same).
    """

    def __init__(self, low: int = 10_000, high: int = 20_000):
        if low % 2:
            low += 1
        if high - low < 2:
            raise ValueError("port range too small")
        self.low, self.high = low, high
        self._free: deque[int] = deque(range(low, high, 2))
        self._used: set[int] = set()

    def take(self) -> int:
        """An even RTP port whose RTCP port (+1) is free too."""
        if not self._free:
            raise PortsExhausted(f"no free RTP port pair in {self.low}-{self.high}")
        port = self._free.popleft()
        self._used.add(port)
        return port

    def give_back(self, port: int) -> None:
        if port in self._used:
            self._used.remove(port)
            self._free.append(port)

    def retire(self, port: int) -> None:
        """A pair we could not bind (another program holds it): never hand it out again."""
        self._used.discard(port)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)
