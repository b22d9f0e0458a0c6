"""MemoryState: the shared state of a single node, in plain dicts with expiry (no I/O)."""

import itertools
import time
from collections import deque
from collections.abc import Callable

from relay.cluster.state import (
    MAX_SHARED_BANS,
    PbxClaim,
    SharedBan,
    check_part,
    check_seconds,
    check_token,
)

# A full sweep of expired entries runs once per this many writes, so entries
# nobody reads again are dropped too while each write stays amortised O(1): the
# tables never hold more than what was written within the longest TTL in use
# plus SWEEP_EVERY entries.
SWEEP_EVERY = 1024


class MemoryState:
    """SharedState for one node: dicts keyed like RedisState's keys, each entry with a deadline.

    ``clock`` is a monotonic time source in seconds (time.monotonic by default), so tests
    can drive expiry without waiting. The methods are async only to match SharedState;
    none awaits anything.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_bans: int = MAX_SHARED_BANS) -> None:
        self._clock = clock
        # key -> (deadline, value); keys are "pbx:<serial>", "rate:<key>", "node:<id>", "addr:<id>",
        # "waiting:<device>".
        self._entries: dict[str, tuple[float, object]] = {}
        self._writes = 0
        # Shared bans, oldest first: (sequence, ip, deadline, node id).
        self._bans: deque[tuple[int, str, float, str]] = deque(maxlen=max_bans)
        self._ban_seq = itertools.count(1)

    def __len__(self) -> int:
        """Entries held now, expired ones not yet swept included (for tests and metrics)."""
        return len(self._entries)

    def _get(self, key: str) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def _put(self, key: str, value: object, ttl: float) -> None:
        self._entries[key] = (self._clock() + ttl, value)
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0:
            now = self._clock()
            for k in [k for k, (deadline, _) in self._entries.items() if deadline <= now]:
                del self._entries[k]

    async def claim_pbx(self, serial: str, node_id: str, flow_token: str, ttl: float) -> None:
        """See SharedState.claim_pbx."""
        check_part("node_id", node_id)
        self._put("pbx:" + check_part("serial", serial),
                  PbxClaim(node_id, check_token(flow_token)), check_seconds("ttl", ttl))

    async def pbx_node(self, serial: str) -> PbxClaim | None:
        """See SharedState.pbx_node."""
        claim = self._get("pbx:" + check_part("serial", serial))
        return claim if isinstance(claim, PbxClaim) else None

    async def release_pbx(self, serial: str, node_id: str) -> bool:
        """See SharedState.release_pbx."""
        claim = await self.pbx_node(serial)
        if claim is None or claim.node_id != node_id:
            return False
        del self._entries["pbx:" + serial]
        return True

    async def share_ban(self, ip: str, seconds: float, node_id: str) -> None:
        """See SharedState.share_ban."""
        deadline = self._clock() + check_seconds("seconds", seconds)
        entry = (next(self._ban_seq), check_part("ip", ip), deadline, check_part("node_id", node_id))
        self._bans.append(entry)

    async def bans_after(self, cursor: str, count: int) -> tuple[list[SharedBan], str]:
        """See SharedState.bans_after."""
        after, now = int(cursor or 0), self._clock()
        newer = [b for b in self._bans if b[0] > after][:count]
        bans = [SharedBan(ip, deadline - now, node) for _, ip, deadline, node in newer if deadline > now]
        return bans, str(newer[-1][0]) if newer else cursor

    async def await_device(self, device: str, node_id: str, ttl: float) -> None:
        """See SharedState.await_device."""
        self._put("waiting:" + check_part("device", device), check_part("node_id", node_id),
                  check_seconds("ttl", ttl))

    async def awaiting_node(self, device: str) -> str | None:
        """See SharedState.awaiting_node."""
        node = self._get("waiting:" + check_part("device", device))
        return node if isinstance(node, str) else None

    async def incr_rate(self, key: str, window: float) -> int:
        """See SharedState.incr_rate."""
        k = "rate:" + check_part("key", key)
        check_seconds("window", window)
        entry = self._entries.get(k)
        if entry is None or entry[0] <= self._clock():
            self._put(k, 1, window)
            return 1
        count = (entry[1] if isinstance(entry[1], int) else 0) + 1
        self._entries[k] = (entry[0], count)
        return count

    async def node_heartbeat(self, node_id: str, ttl: float, address: str = "") -> None:
        """See SharedState.node_heartbeat."""
        self._put("node:" + check_part("node_id", node_id), True, check_seconds("ttl", ttl))
        if address:
            self._put("addr:" + node_id, check_part("address", address), ttl)

    async def node_address(self, node_id: str) -> str | None:
        """See SharedState.node_address."""
        address = self._get("addr:" + check_part("node_id", node_id))
        return address if isinstance(address, str) else None

    async def live_nodes(self) -> frozenset[str]:
        """See SharedState.live_nodes."""
        now = self._clock()
        return frozenset(k[5:] for k, (deadline, _) in self._entries.items()
                         if k.startswith("node:") and deadline > now)
