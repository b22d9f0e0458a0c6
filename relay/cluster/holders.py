"""A node's cache of serial → the node holding the PBX (docs/cluster.md, "The holder cache").

Without it, each request for a PBX held by another node costs two Redis reads (the
claim, then the holding node's address). An entry answers for ``ttl`` seconds; it is
dropped sooner when the holding node answers that it no longer holds the PBX (the
core's ``ForgetPbx``), when the link to that node cannot be opened, or when the PBX
registers here. Only positive answers are kept: a serial nobody holds is asked again
each time, so a PBX that registers anywhere is found at once.

Bounded: at most ``size`` entries; a new one beyond drops the oldest (insertion order,
refreshed when an entry is written again), so a scanner asking for many serials that
some node holds can never make the table grow past ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Defaults of cluster.lookup_cache_size and cluster.lookup_cache_ttl (relay/config.py).
CACHE_SIZE = 10_000
CACHE_TTL = 5.0


@dataclass(frozen=True, slots=True)
class Holder:
    """A node holding a PBX, and where it takes links ("host:port")."""

    node_id: str
    address: str


class HolderCache:
    """serial → (Holder, expiry); ``now`` is any monotonic clock (the shell passes trio's)."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: dict[str, tuple[Holder, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, serial: str, now: float) -> Holder | None:
        """The holder of ``serial`` learnt less than ``ttl`` seconds ago, or None."""
        entry = self._entries.get(serial)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[serial]
            return None
        return entry[0]

    def put(self, serial: str, holder: Holder, now: float) -> None:
        """Remember ``holder`` for ``ttl`` seconds (nothing with a ttl of 0: the cache is off)."""
        if self.ttl <= 0 or self.size <= 0:
            return
        self._entries.pop(serial, None)
        while len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[serial] = (holder, now + self.ttl)

    def forget(self, serial: str) -> bool:
        """Drop what is known of ``serial``; True if there was an entry."""
        return self._entries.pop(serial, None) is not None
