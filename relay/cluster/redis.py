"""RedisState: shared state of several relay nodes on Redis/Valkey through coredis, under trio."""

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import coredis

from pbxcore.redisconn import RedisConn, RedisUnavailable, client_at
from relay.cluster.state import (
    KEY_PREFIX,
    MAX_SHARED_BANS,
    PbxClaim,
    SharedBan,
    SharedStateUnavailable,
    check_part,
    check_seconds,
    check_token,
)

T = TypeVar("T")

# The longest a node waits for one Redis call, connecting included. A node that
# loses Redis must keep serving its own flows (issue 13): a SIP transaction's
# Timer A starts at 500 ms (RFC 3261 §17.1.1.2), so a lookup on the routing path
# must give up well before it; a healthy local Redis answers in well under 1 ms.
DEFAULT_TIMEOUT = 0.25

# Claim: replace the PBX's hash (node, token) and give it the registration's expiry.
_CLAIM = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'token', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Release only if the caller still holds the claim (compare-and-delete, atomic).
_RELEASE = """
if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Fixed window: the first event creates the counter with the window's expiry.
_INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# Nodes live in one sorted set scored by their deadline on the server's clock (no
# clock skew between nodes); expired members go on every heartbeat, and the set
# itself expires with the longest heartbeat TTL written to it.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
end
return 1
"""

_LIVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""

# Shared bans: one stream, each entry (ip, deadline on the server's clock, node); trimmed
# to about MAX_SHARED_BANS entries and expiring with the longest ban written to it.
_SHARE_BAN = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'ip', ARGV[1], 'until', now + tonumber(ARGV[2]),
           'node', ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# The entries after a cursor ("" : from the oldest), with the server's time to read
# their deadlines against.
_BANS_AFTER = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local start = '-'
if ARGV[1] ~= '' then start = '(' .. ARGV[1] end
return {now, redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[2])}
"""

_NODES_KEY = KEY_PREFIX + "nodes"
_BANS_KEY = KEY_PREFIX + "bans"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisState:
    """SharedState on a Redis/Valkey server; open it with ``RedisState.open(host, port)``.

    Every key starts with ``pbxrelay:`` and has an expiry. Every call gives up after
    ``timeout`` seconds and raises SharedStateUnavailable; the client reconnects on
    the next call once the server is back.
    """

    def __init__(self, client: "coredis.Redis[str]", timeout: float, max_bans: int = MAX_SHARED_BANS) -> None:
        self._client = client
        self._conn = RedisConn(client, timeout)
        self._max_bans = max_bans

    @classmethod
    @asynccontextmanager
    async def open(cls, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                   password: str | None = None, max_bans: int = MAX_SHARED_BANS,
                   ) -> AsyncIterator["RedisState"]:
        """Connect lazily to ``host:port``; the first call that cannot reach it raises."""
        client = client_at(host, port, password, timeout=timeout)
        async with client:
            yield cls(client, timeout, max_bans)

    async def _call(self, request: Awaitable[T]) -> T:
        try:
            return await self._conn.call(request)
        except RedisUnavailable as exc:
            raise SharedStateUnavailable(f"shared state: {type(exc.__cause__).__name__}") from exc

    async def claim_pbx(self, serial: str, node_id: str, flow_token: str, ttl: float) -> None:
        """See SharedState.claim_pbx."""
        key = KEY_PREFIX + "pbx:" + check_part("serial", serial)
        args = (check_part("node_id", node_id), check_token(flow_token), _ms(check_seconds("ttl", ttl)))
        await self._call(self._client.eval(_CLAIM, keys=[key], args=args))

    async def pbx_node(self, serial: str) -> PbxClaim | None:
        """See SharedState.pbx_node."""
        key = KEY_PREFIX + "pbx:" + check_part("serial", serial)
        node, token = await self._call(self._client.hmget(key, ["node", "token"]))
        if node is None or token is None:
            return None
        return PbxClaim(node, token)

    async def release_pbx(self, serial: str, node_id: str) -> bool:
        """See SharedState.release_pbx."""
        key = KEY_PREFIX + "pbx:" + check_part("serial", serial)
        done = await self._call(self._client.eval(_RELEASE, keys=[key], args=[node_id]))
        return done == 1

    async def share_ban(self, ip: str, seconds: float, node_id: str) -> None:
        """See SharedState.share_ban."""
        args = (check_part("ip", ip), _ms(check_seconds("seconds", seconds)), check_part("node_id", node_id),
                self._max_bans)
        await self._call(self._client.eval(_SHARE_BAN, keys=[_BANS_KEY], args=args))

    async def bans_after(self, cursor: str, count: int) -> tuple[list[SharedBan], str]:
        """See SharedState.bans_after."""
        answer: Any = await self._call(self._client.eval(_BANS_AFTER, keys=[_BANS_KEY], args=[cursor, count]))
        now, entries = int(answer[0]), answer[1]
        bans: list[SharedBan] = []
        for _, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            left = (int(fields["until"]) - now) / 1000
            if left > 0:
                bans.append(SharedBan(str(fields["ip"]), left, str(fields["node"])))
        return bans, str(entries[-1][0]) if entries else cursor

    async def await_device(self, device: str, node_id: str, ttl: float) -> None:
        """See SharedState.await_device."""
        key = KEY_PREFIX + "waiting:" + check_part("device", device)
        ttl_ms = _ms(check_seconds("ttl", ttl))
        await self._call(self._client.set(key, check_part("node_id", node_id), px=ttl_ms))

    async def awaiting_node(self, device: str) -> str | None:
        """See SharedState.awaiting_node."""
        node = await self._call(self._client.get(KEY_PREFIX + "waiting:" + check_part("device", device)))
        return None if node is None else str(node)

    async def incr_rate(self, key: str, window: float) -> int:
        """See SharedState.incr_rate."""
        k = KEY_PREFIX + "rate:" + check_part("key", key)
        n = await self._call(self._client.eval(_INCR, keys=[k], args=[_ms(check_seconds("window", window))]))
        return int(n)  # type: ignore[arg-type]

    async def node_heartbeat(self, node_id: str, ttl: float, address: str = "") -> None:
        """See SharedState.node_heartbeat."""
        args = (check_part("node_id", node_id), _ms(check_seconds("ttl", ttl)),
                check_part("address", address) if address else "")
        keys = [_NODES_KEY, KEY_PREFIX + "node:" + node_id]
        await self._call(self._client.eval(_HEARTBEAT, keys=keys, args=args))

    async def node_address(self, node_id: str) -> str | None:
        """See SharedState.node_address."""
        key = KEY_PREFIX + "node:" + check_part("node_id", node_id)
        address = await self._call(self._client.get(key))
        return None if address is None else str(address)

    async def live_nodes(self) -> frozenset[str]:
        """See SharedState.live_nodes."""
        members = await self._call(self._client.eval(_LIVE, keys=[_NODES_KEY], args=[]))
        return frozenset(str(m) for m in members)  # type: ignore[union-attr]

