"""The relay's end of a PBX's link: it is the HTTP/2 client, one stream per phone request.

A response body reaches the relay no faster than phones take it: the relay hands
the stream's flow-control window back (RFC 9113 §5.2, WINDOW_UPDATE) only for bytes
already written to the phone, so one download holds at most STREAM_WINDOW bytes
here and the link at most CONNECTION_WINDOW, whatever the file's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from relay.provisioning.limits import (
    CONNECTION_WINDOW,
    MAX_FRAME,
    MAX_RESPONSE_HEAD,
    MAX_STREAMS_PER_LINK,
    STREAM_WINDOW,
)
from relay.provisioning.link import Link
from relay.provisioning.policy import KeepaliveTimes

DEFAULT_WINDOW = 65_535  # RFC 9113 §6.9.2: every window starts here


class LinkLost(Exception):
    """The link went (closed, dead, reset) before the response was complete."""


class StreamRefused(Exception):
    """The PBX side reset the stream (it refused or failed the request)."""


@dataclass(frozen=True)
class Head:
    """The PBX's response status and header fields (names lower-case)."""

    status: int
    fields: list[tuple[bytes, bytes]]


class Exchange:
    """One phone request on a link: its response head, then body bytes.

    Body bytes wait in one buffer, never as a queue of frames: the buffer holds at
    most what the stream's window allowed (h2 refuses DATA beyond it), and empty or
    tiny frames from a misbehaving PBX side cost nothing here."""

    def __init__(self, link: PbxLink, stream_id: int):
        self.link = link
        self.stream_id = stream_id
        self._head: Head | None = None
        self._body = bytearray()
        self._ended = False
        self._failure: Exception | None = None
        self._received = 0  # flow-controlled bytes in the buffer (padding included)
        self._taken = 0  # of them, handed to the caller and not yet acknowledged
        self._wake = trio.Event()

    @property
    def done(self) -> bool:
        """The stream is over on the PBX's side (ended, reset or lost)."""
        return self._ended or self._failure is not None

    def deliver(self, event: h2.events.Event | None) -> None:
        """From the link: an h2 event of this stream, or None when the link is gone."""
        if event is None:
            self._failure = self._failure or LinkLost(self.link.link.reason or "link lost")
        elif isinstance(event, h2.events.StreamReset):
            self._failure = StreamRefused(str(event.error_code))
        elif isinstance(event, h2.events.ResponseReceived):
            fields = [(bytes(n), bytes(v)) for n, v in event.headers]
            status = next(int(v) for n, v in fields if n == b":status")
            self._head = Head(status, [(n, v) for n, v in fields if not n.startswith(b":")])
        elif isinstance(event, h2.events.DataReceived):
            self._body += event.data
            self._received += event.flow_controlled_length
        if isinstance(event, h2.events.StreamEnded) or getattr(event, "stream_ended", None) is not None:
            self._ended = True
        self._wake.set()

    async def _changed(self) -> None:
        wake = self._wake
        await wake.wait()
        if wake is self._wake:
            self._wake = trio.Event()

    async def head(self) -> Head:
        """Wait for the response head (1xx heads are skipped)."""
        while self._head is None:
            if self._failure is not None:
                raise self._failure
            await self._changed()
        return self._head

    async def chunk(self) -> bytes | None:
        """The body received so far and not taken yet, None at its end. Call
        :meth:`consumed` once the phone has it."""
        while not self._body:
            if self._ended:
                return None
            if self._failure is not None:
                raise self._failure
            if self._received:  # padding or empty frames only: nothing to hand on
                self._taken, self._received = self._taken + self._received, 0
                self.consumed()
            await self._changed()
        data = bytes(self._body)
        self._body.clear()
        self._taken, self._received = self._taken + self._received, 0
        return data

    def consumed(self) -> None:
        """The phone took everything handed out so far: give the window back."""
        if self._taken:
            self.link.acknowledge(self.stream_id, self._taken)
            self._taken = 0

    def close(self) -> None:
        """Done with it: complete, or the phone went or a limit struck (then the
        stream is reset). Its window goes back to the link either way."""
        self._taken += self._received
        self._received = 0
        self.link.finish(self, reset=not self.done)


class PbxLink:
    """One PBX's link, seen from the relay: opens streams, routes events to them."""

    def __init__(self, serial: str, stream: trio.abc.Stream, keepalive: KeepaliveTimes,
                 initial: bytes = b""):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        # Through update_settings, not initial values: h2 applies a setting to its own
        # side (the HPACK decoder's limit, stream windows) when the peer acknowledges it.
        conn.update_settings({
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEAD,
        })
        conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.serial = serial
        self.link = Link(stream, conn, keepalive, f"{serial}", initial)
        self.exchanges: dict[int, Exchange] = {}

    @property
    def active(self) -> int:
        """Streams in progress."""
        return len(self.exchanges)

    @property
    def capacity(self) -> int:
        """Streams it may carry at once: ours and the PBX side's limit, whichever is lower."""
        if self.link.closing:
            return 0
        return min(MAX_STREAMS_PER_LINK, self.link.conn.remote_settings.max_concurrent_streams)

    def open(self, fields: list[tuple[bytes, bytes]]) -> Exchange:
        """Send a request (HEADERS with END_STREAM: provisioning GETs carry no body)."""
        conn = self.link.conn
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, fields, end_stream=True)
        exchange = Exchange(self, stream_id)
        self.exchanges[stream_id] = exchange
        self.link.kick()
        return exchange

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Hand ``size`` bytes of window back on ``stream_id`` (and the link)."""
        try:
            self.link.conn.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return  # the link is ending anyway
        self.link.kick()

    def finish(self, exchange: Exchange, reset: bool) -> None:
        """Forget ``exchange``; reset its stream if it is still open."""
        self.exchanges.pop(exchange.stream_id, None)
        exchange.consumed()
        if reset and not self.link.closing:
            try:
                self.link.conn.reset_stream(exchange.stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass  # already closed on the PBX's side
            self.link.kick()

    def on_event(self, event: h2.events.Event) -> None:
        """Route one h2 event to its exchange."""
        stream_id = getattr(event, "stream_id", None)
        if isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY: streams the PBX side never saw are lost; the rest may finish.
            last = event.last_stream_id or 0
            for sid, exchange in list(self.exchanges.items()):
                if sid > last:
                    exchange.deliver(None)
            return
        if stream_id is None:
            return
        target = self.exchanges.get(stream_id)
        if target is not None:
            target.deliver(event)
        elif isinstance(event, h2.events.DataReceived):
            # A stream we already gave up on: return its window to the link.
            self.acknowledge(stream_id, event.flow_controlled_length)

    def on_lost(self) -> None:
        """Every exchange still waiting hears that the link is gone."""
        for exchange in list(self.exchanges.values()):
            exchange.deliver(None)

    async def run(self) -> None:
        """Carry streams until the link ends."""
        await self.link.run(self)
