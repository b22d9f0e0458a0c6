"""One HTTP/2 link over a TLS connection the PBX side opened: the trio shell both ends share.

Three tasks per link: a reader feeding bytes to h2, the only writer (so no task is
ever cancelled half-way through a TLS write), and the keepalive (PING after
silence, dead after an unanswered PING: :func:`relay.provisioning.policy.keepalive_step`).
The first of them to end ends the link; the side's handler hears every h2 event
and, once, that the link is gone.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import Protocol

import h2.connection
import h2.events
import h2.exceptions
import trio

from relay.provisioning.limits import LINK_RECEIVE_SIZE
from relay.provisioning.policy import Keepalive, KeepaliveTimes, keepalive_step

log = logging.getLogger("relay.provisioning")

# What ends a link from the network side: the peer went, TLS broke, h2 saw a protocol error.
NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError,
                  h2.exceptions.ProtocolError)


class LinkHandler(Protocol):
    """What a side of the link does with h2's events."""

    def on_event(self, event: h2.events.Event) -> None:
        """One event, in order, right after h2 produced it."""

    def on_lost(self) -> None:
        """The link is gone (called once, after the last event)."""


class Link:
    """An h2 connection on a stream, alive while :meth:`run` runs."""

    def __init__(self, stream: trio.abc.Stream, conn: h2.connection.H2Connection,
                 keepalive: KeepaliveTimes, name: str, initial: bytes = b"",
                 now: Callable[[], float] = trio.current_time):
        self.stream = stream
        self.conn = conn
        self.keepalive = keepalive
        self.name = name
        self.initial = initial
        self._now = now
        self.last_heard = now()
        self.closing = False  # no new streams: GOAWAY seen or the link is ending
        self.reason = ""
        self._flush = trio.Event()
        self._nursery: trio.Nursery | None = None

    def kick(self) -> None:
        """There is something for the writer (h2 has bytes to send)."""
        self._flush.set()

    def start_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run a task that lives no longer than the link."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)  # type: ignore[arg-type]

    def close(self, reason: str) -> None:
        """End the link now (its tasks are cancelled, the socket closed)."""
        self.reason = self.reason or reason
        self.closing = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, handler: LinkHandler) -> None:
        """Serve the link until it ends; network errors end it, they are not raised."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self._writer)
                nursery.start_soon(self._guard, self._reader, handler)
                nursery.start_soon(self._guard, self._keepalive)
                self.kick()
        finally:
            self.closing = True
            handler.on_lost()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _guard(self, task: Callable[..., object], *args: object) -> None:
        try:
            await task(*args)  # type: ignore[misc]
        except NETWORK_ERRORS as e:
            self.reason = self.reason or type(e).__name__
        finally:
            self.close(self.reason or "ended")

    async def _writer(self) -> None:
        while True:
            await self._flush.wait()
            self._flush = trio.Event()
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _reader(self, handler: LinkHandler) -> None:
        data = self.initial
        while True:
            if data:
                self.last_heard = self._now()
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        self.closing = True
                    handler.on_event(event)
                self.kick()
            data = bytes(await self.stream.receive_some(LINK_RECEIVE_SIZE))
            if not data:
                self.reason = "closed by peer"
                return

    async def _keepalive(self) -> None:
        ping_sent: float | None = None
        while True:
            action, at = keepalive_step(self._now(), self.last_heard, ping_sent, self.keepalive)
            if action is Keepalive.DEAD:
                self.reason = "keepalive timeout"
                log.info("event=link_dead link=%s reason=keepalive", self.name)
                return
            if action is Keepalive.PING:
                ping_sent = self._now()
                self.conn.ping(os.urandom(8))
                self.kick()
            await trio.sleep_until(at)
