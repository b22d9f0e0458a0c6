"""The push service's two stores for tests: SQLite in a temp dir, Redis on a redis-server the test starts.

``backend`` (a fixture, parametrised "sqlite" and "redis") opens either; ``held``
returns every byte the store holds — the SQLite files, or every Redis key with its
value read by type (never DUMP, whose compression could hide a string) — so a test
can say what is *not* kept anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import coredis
import pytest

from push.redisstore import KEY_PREFIX, RedisStore
from push.store import SqliteStore, Store
from tests.redisfixture import REDIS_SERVER, RedisServer


@dataclass
class Backend:
    kind: str  # "sqlite" | "redis"
    path: Path
    redis: RedisServer | None = None

    @property
    def url(self) -> str:
        assert self.redis is not None
        return f"redis://127.0.0.1:{self.redis.port}"

    def open(self, key: bytes) -> Store:
        """A new store over the same data (a second worker, or after a restart)."""
        if self.kind == "redis":
            return RedisStore.from_url(self.url, key)
        return SqliteStore(self.path / "push.sqlite", key, threaded=False)

    async def held(self) -> bytes:
        """Everything the store holds, as bytes."""
        if self.kind == "sqlite":
            return b"".join(p.read_bytes() for p in self.path.glob("push.sqlite*"))
        return b"\n".join(f"{k} {v}".encode() for k, v in (await redis_contents(self.url)).items())


async def redis_contents(url: str) -> dict[str, object]:
    """Every key of the server, with its value read by type."""
    client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
    out: dict[str, object] = {}
    async with client:
        async for k in client.scan_iter():
            kind = await client.type(k)
            if kind == "string":
                out[k] = await client.get(k)
            elif kind == "zset":
                out[k] = await client.zrange(k, 0, -1, withscores=True)
            elif kind == "hash":
                out[k] = await client.hgetall(k)
            elif kind == "set":
                out[k] = await client.smembers(k)
            else:
                out[k] = await client.lrange(k, 0, -1)
    return out


async def redis_ttls(url: str) -> dict[str, int]:
    """PTTL (ms) of every key: -1 for a key without expiry."""
    client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        return {k: await client.pttl(k) async for k in client.scan_iter()}


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store in turn; Redis is a fresh redis-server of this test."""
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield Backend("redis", tmp_path, server)
    finally:
        server.stop()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """The backend's store, open for the test."""
    s = backend.open(b"K" * 32)
    async with s.session():
        yield s
    await s.aclose()


__all__ = ["KEY_PREFIX", "Backend", "backend", "redis_contents", "redis_ttls", "store"]
