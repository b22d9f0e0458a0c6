"""A coredis client under trio for either service: a redis:// URL checked, one deadline per call, one error.

How coredis runs under trio (docs/cluster.md, "coredis under trio: what was checked"):
natively, through anyio's trio backend; the client owns its pool's task group, so it
must be entered as an async context manager by a task that outlives its users
(:func:`open_client`); commands return awaitable requests. coredis's own retries are
off: the caller's deadline (``timeout``) is the bound, and a call that misses it or
finds the server gone raises :class:`RedisUnavailable`. The client reconnects by
itself on the next call once the server is back.

The relay's cluster (relay/cluster/) grew the same rules first; this module holds them
for code that must not import the relay (the push service).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import coredis
import coredis.exceptions
import coredis.retry
import trio

from pbxcore.errors import PbxError

__all__ = ["RedisConn", "RedisUnavailable", "client_at", "new_client", "open_client",
           "redis_address", "redis_url_problem", "redis_url_shown"]

T = TypeVar("T")


class RedisUnavailable(PbxError):
    """Redis/Valkey did not answer in time, or the connection failed."""


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a ``redis://[:password@]host:port`` URL, or None (the relay's rules)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return "has a bad port"
    if parts.scheme != "redis" or not parts.hostname:
        return "is not redis://host:port (rediss:// and unix sockets are not supported yet)"
    if port is None:
        return "needs a port (redis://host:6379)"
    if parts.path not in ("", "/", "/0") or parts.query or parts.fragment:
        return "may name no database but 0, and no options"
    return None


def redis_address(url: str) -> tuple[str, int, str | None]:
    """(host, port, password) of a URL :func:`redis_url_problem` accepts."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError("not redis://host:port")
    return parts.hostname, parts.port, unquote(parts.password) if parts.password else None


def redis_url_shown(url: str) -> str:
    """The URL as a banner or a log line may show it: the password replaced by ``***``."""
    host, port, password = redis_address(url)
    host = f"[{host}]" if ":" in host else host
    return f"redis://{':***@' if password else ''}{host}:{port}"


class RedisConn:
    """An entered coredis client (``raw``) and the deadline of each call."""

    def __init__(self, client: coredis.Redis[str], timeout: float) -> None:
        self.raw = client
        self.timeout = timeout

    async def call(self, request: Awaitable[T]) -> T:
        """Await one request (a command, a script, a pipeline's execute) within the deadline."""
        try:
            with trio.fail_after(self.timeout):
                return await request
        except (trio.TooSlowError, coredis.exceptions.ConnectionError, TimeoutError, OSError) as exc:
            raise RedisUnavailable(f"redis: {type(exc).__name__}") from exc


def new_client(url: str, timeout: float) -> coredis.Redis[str]:
    """A client for ``url`` that connects lazily; enter it (``async with``) before use."""
    return client_at(*redis_address(url), timeout=timeout)


def client_at(host: str, port: int, password: str | None, *, timeout: float) -> coredis.Redis[str]:
    """A client for ``host:port`` that connects lazily, with strings in and out and no
    retries of its own; enter it (``async with``) before use."""
    return coredis.Redis(
        host=host, port=port, password=password, decode_responses=True,
        connect_timeout=timeout, stream_timeout=timeout,
        # Our own deadline bounds each call; coredis's retries would only eat into it.
        retry_policy=coredis.retry.NoRetryPolicy(),
    )


@asynccontextmanager
async def open_client(url: str, timeout: float) -> AsyncIterator[RedisConn]:
    """The client of ``url``, entered for the duration of the block."""
    client = new_client(url, timeout)
    async with client:
        yield RedisConn(client, timeout)
