"""The push fakes' own HTTPS server: HTTP/2 (h2) and HTTP/1.1 (h11) over TLS on trio,
with the connection-level faults a provider's front end shows.

tests/pushfakes.py decides *what* APNs or FCM answers; this module carries it, and
can misbehave the way a real front end does, on cue (:class:`Fault`):

- ``CLOSE_AFTER_ANSWER``: answer, then GOAWAY (NO_ERROR, last-stream-id = the
  highest stream seen) and close the connection — the incident of issue 10: the
  gateway closed its connection right after a 200, the client retried, the phone
  rang twice.
- ``GOAWAY_BEFORE``: on this request (stream N), GOAWAY with a last-stream-id below
  N: this request and every later one on the connection are not processed (RFC
  9113 §6.8); streams up to last-stream-id are still answered, then the
  connection closes.
- ``REFUSE_STREAM``: RST_STREAM REFUSED_STREAM, not processed (RFC 9113 §8.7).
- ``STALL_THEN_RESET``: processed (the push "goes out"), no answer for
  ``stall`` seconds, then RST_STREAM INTERNAL_ERROR.
- ``STALL_THEN_CLOSE``: processed, no answer for ``stall`` seconds, then the TCP
  connection closes without a GOAWAY.

A request that is *not processed* never reaches the fake's handler, so it is not
in the fake's record of received pushes; the ones that *are* processed are.

h2 (python-hyper) closes its connection state when a GOAWAY is sent or received
and then refuses every frame; RFC 9113 §6.8 lets the streams up to
last-stream-id complete, so after sending a GOAWAY the state is set back to open
for them (``state_machine.state``), as push/gateways/http2.py does on receipt.
"""

from __future__ import annotations

import enum
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio

log = logging.getLogger("tests.pushwire")

# APNs announces 1000 concurrent streams on a token-authenticated connection.
MAX_CONCURRENT_STREAMS = 1000
HANDSHAKE_TIMEOUT = 10.0
READ_SIZE = 64 * 1024


class Fault(enum.Enum):
    """A front end's misbehaviour for one request (see the module docstring)."""

    CLOSE_AFTER_ANSWER = "close_after_answer"
    GOAWAY_BEFORE = "goaway_before"
    REFUSE_STREAM = "refuse_stream"
    STALL_THEN_RESET = "stall_then_reset"
    STALL_THEN_CLOSE = "stall_then_close"


NOT_PROCESSED = frozenset({Fault.GOAWAY_BEFORE, Fault.REFUSE_STREAM})


@dataclass
class WireRequest:
    """One request as the fakes see it (path percent-decoded, like ASGI's)."""

    method: str
    path: str
    query: str
    http_version: str  # "2" or "1.1"
    header_list: list[tuple[str, str]]
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        return {k: v for k, v in self.header_list}

    def header_count(self, name: str) -> int:
        return sum(1 for k, _ in self.header_list if k == name)


@dataclass
class WireResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    delay: float = 0.0


@dataclass
class Handlers:
    """What the server asks the fake: the fault for a request (consumed), the answer
    to a processed request, and a note of a request not processed."""

    fault: Callable[[WireRequest], Fault | None]
    answer: Callable[[WireRequest], WireResponse]
    not_processed: Callable[[WireRequest, Fault], None]
    stall: Callable[[], float]


def _request(method: bytes, target: bytes, version: str, headers: list[tuple[str, str]],
             body: bytes) -> WireRequest:
    raw_path, _, query = target.decode("latin-1").partition("?")
    return WireRequest(method.decode("latin-1"), urllib.parse.unquote(raw_path), query, version,
                       headers, body)


class WireServer:
    """Serves ``handlers`` on 127.0.0.1:``port`` over TLS (ALPN h2, http/1.1)."""

    def __init__(self, handlers: Handlers, cert_file: str, key_file: str, port: int) -> None:
        self.handlers = handlers
        self.port = port
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert_file, key_file)
        tls.set_alpn_protocols(["h2", "http/1.1"])
        self._tls = tls
        self._conns: set[_H2Conn] = set()
        self.connections_accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; cancelling drops every connection at once (a
        gateway that goes down)."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    def close_connections(self, goaway: bool = True) -> None:
        """Close every open HTTP/2 connection (from the server's trio thread), with a
        GOAWAY first or as a bare TCP close."""
        for conn in list(self._conns):
            conn.close_soon(goaway)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        self.connections_accepted += 1
        stream = trio.SSLStream(tcp, self._tls, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            if stream.selected_alpn_protocol() == "h2":
                conn = _H2Conn(self, stream)
                self._conns.add(conn)
                try:
                    await conn.run()
                finally:
                    self._conns.discard(conn)
            else:
                await _serve_h11(self.handlers, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError,
                h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


class _H2Conn:
    """One HTTP/2 connection of the server."""

    def __init__(self, server: WireServer, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.server = server
        self.handlers = server.handlers
        self.stream = stream
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS},
        )
        self.pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.open_streams: set[int] = set()  # received, not yet answered or reset
        self.goaway_last: int | None = None
        self.write_lock = trio.Lock()
        self.done = trio.Event()
        self.done_after_flush = False  # GOAWAY sent and nothing left to answer: close once written
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._read_loop)
            await self.done.wait()
            nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        try:
            while not self.done.is_set():
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await self.flush()
                    break
                for ev in events:
                    self._event(ev)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self.done.set()

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived) and ev.stream_id is not None:
            headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers or []]
            self.pending[ev.stream_id] = (headers, bytearray())
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id is not None:
            if ev.stream_id in self.pending and ev.data:
                self.pending[ev.stream_id][1].extend(ev.data)
            if ev.flow_controlled_length:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self.pending:
            headers, body = self.pending.pop(ev.stream_id)
            self._dispatch(ev.stream_id, headers, bytes(body))
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id is not None:
            self.pending.pop(ev.stream_id, None)
            self.open_streams.discard(ev.stream_id)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.done.set()

    def _dispatch(self, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.goaway_last is not None and sid > self.goaway_last:
            return  # RFC 9113 §6.8: ignored, never processed
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        req = _request(pseudo.get(":method", "").encode(), pseudo.get(":path", "").encode(), "2",
                       [(k, v) for k, v in headers if not k.startswith(":")], body)
        fault = self.handlers.fault(req)
        if fault is Fault.REFUSE_STREAM:
            self.handlers.not_processed(req, fault)
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if fault is Fault.GOAWAY_BEFORE:
            self.handlers.not_processed(req, fault)
            self._goaway(sid - 2)
            return
        self.open_streams.add(sid)
        resp = self.handlers.answer(req)
        assert self.nursery is not None
        if fault in (Fault.STALL_THEN_RESET, Fault.STALL_THEN_CLOSE):
            self.nursery.start_soon(self._stall, sid, fault)
        elif resp.delay > 0 or fault is Fault.CLOSE_AFTER_ANSWER:
            self.nursery.start_soon(self._answer_later, sid, resp, fault)
        else:
            self._answer(sid, resp)

    def _answer(self, sid: int, resp: WireResponse) -> None:
        if sid not in self.open_streams:
            return  # the client reset it meanwhile
        self.open_streams.discard(sid)
        headers = [(b":status", str(resp.status).encode())]
        headers += [(k.encode(), v.encode()) for k, v in resp.headers.items()]
        headers.append((b"content-length", str(len(resp.body)).encode()))
        try:
            self.h2.send_headers(sid, headers, end_stream=not resp.body)
            if resp.body:
                self.h2.send_data(sid, resp.body, end_stream=True)
        except h2.exceptions.H2Error:
            return
        if self.goaway_last is not None and not self.open_streams:
            self.done_after_flush = True

    async def _answer_later(self, sid: int, resp: WireResponse, fault: Fault | None) -> None:
        if resp.delay > 0:
            await trio.sleep(resp.delay)
        self._answer(sid, resp)
        if fault is Fault.CLOSE_AFTER_ANSWER:
            self._goaway(max(self.h2.highest_inbound_stream_id, sid))
            await self.flush()
            self.done.set()
            return
        await self.flush()

    async def _stall(self, sid: int, fault: Fault) -> None:
        await trio.sleep(self.handlers.stall())
        if fault is Fault.STALL_THEN_CLOSE:
            self.done.set()  # TCP close, no GOAWAY, no answer
            return
        self.open_streams.discard(sid)
        try:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.H2Error:
            pass
        await self.flush()

    def _goaway(self, last_stream_id: int) -> None:
        last = max(last_stream_id, 0)
        self.goaway_last = last if self.goaway_last is None else min(self.goaway_last, last)
        self.h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=self.goaway_last)
        # Let the streams up to last-stream-id finish (see the module docstring).
        self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
        self.open_streams = {s for s in self.open_streams if s <= self.goaway_last}
        if not self.open_streams:
            self.done_after_flush = True

    async def flush(self) -> None:
        async with self.write_lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)
        if self.done_after_flush:
            self.done.set()

    def close_soon(self, goaway: bool) -> None:
        if goaway:
            self._goaway(self.h2.highest_inbound_stream_id)
            if self.nursery is not None:
                self.nursery.start_soon(self.flush)
            return
        self.done.set()


async def _serve_h11(handlers: Handlers, stream: trio.SSLStream[trio.SocketStream]) -> None:
    """HTTP/1.1, one request at a time (no faults: those are HTTP/2 matters)."""
    conn = h11.Connection(h11.SERVER)
    while True:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_SIZE))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if head is None:
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers]
        req = _request(head.method, head.target, head.http_version.decode(), headers, bytes(body))
        resp = handlers.answer(req)
        if resp.delay > 0:
            await trio.sleep(resp.delay)
        out_headers = [*resp.headers.items(), ("content-length", str(len(resp.body)))]
        data = conn.send(h11.Response(status_code=resp.status, headers=out_headers))
        data += conn.send(h11.Data(data=resp.body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()
