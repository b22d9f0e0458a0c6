"""HTTP/2 to a push provider on h2 under trio: many requests multiplexed on one
connection, and for each request a verdict the retry policy can trust.

Why not httpx (DESIGN §8 chose it first): a push that the provider *may* have
processed must never be sent again (a second VoIP push rings the phone twice),
and one it provably did *not* process should be sent again at once. httpx
(httpcore 1.0) folds both into ``RemoteProtocolError``: a stream refused with
``REFUSED_STREAM`` (safe to resend), a dropped connection after the request left
(unknown) and — a race in ``AsyncHTTP2Connection._receive_events``, which
checks for a stored GOAWAY *before* looking at the events already queued for the
stream — a 200 that arrived in the same read as a GOAWAY (delivered!) all look
alike, and only the exception's text or its ``args[0]`` tell them apart. Its
per-request machinery also cost ~1.2 ms of CPU per push (bench/RESULTS.md). So
the gateways talk HTTP/2 through this module, on the same ``h2`` state machine
httpcore uses.

Two halves, like the rest of the code base:

- :class:`H2Session` is sans-I/O: it turns requests into bytes, bytes from the
  provider into answers, and knows for every stream how it ended
  (:class:`Response`, or a :class:`Fate` with a reason).
- :class:`Http2Client` is the trio shell: it connects (TLS, ALPN ``h2`` only),
  writes, reads, applies timeouts, and raises :class:`RequestNotProcessed` or
  :class:`RequestOutcomeUnknown` when there is no answer.

The verdicts, from RFC 9113 (HTTP/2):

- answered: the response's status arrived. A connection that closes right after
  a 200 changes nothing: the 200 stands (the bug this module exists for).
- not processed, safe to resend at once: the connection failed before the
  request's bytes were handed to it (connect, TLS, ALPN); the stream was reset
  with ``REFUSED_STREAM`` (§8.7: "the stream is being closed prior to any
  processing having occurred. Any request that was sent on the reset stream can
  be safely retried."); the stream's id is above a GOAWAY's last-stream-id (§6.8:
  "... streams ... with identifiers higher than the last stream id were not
  processed ... and can be retried").
- unknown: anything else after the request left — the connection lost, any other
  RST_STREAM code, no answer within the request timeout, a protocol error.

There is no background task (the gateway has no nursery of its own): the
requests waiting for answers take turns reading the connection, one at a time,
and each read serves every stream; writes from concurrent requests are batched
into one TLS write by whichever request is flushing.
"""

from __future__ import annotations

import enum
import select
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import trio
from hpack import HeaderTuple, NeverIndexedHeaderTuple

# Streams we keep open on one connection at most; the provider's
# SETTINGS_MAX_CONCURRENT_STREAMS lowers it (APNs announces 1000 on a token
# connection; Google's front ends 100). More concurrent pushes wait for a stream.
STREAMS_MAX = 1000
# SETTINGS_MAX_HEADER_LIST_SIZE we announce: a provider's answer carries a handful
# of short headers (apns-id, content-type, retry-after); h2 refuses bigger blocks.
HEADER_LIST_MAX = 16 * 1024
# Bytes of a response body kept: APNs error bodies are ~50 bytes, FCM's under
# 2 KiB; what a misbehaving server sends beyond this is dropped unread.
RESPONSE_BODY_MAX = 64 * 1024
# Seconds to open a connection (TCP, TLS, the server's SETTINGS), and to hand one
# batch of bytes to the kernel; past either the connection is given up.
CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 5.0
# A connection idle this long is checked with a PING before a request goes out on
# it: a provider (APNs closes idle connections) or a NAT may have dropped it
# silently, and a request written into a dead connection has an *unknown* fate.
IDLE_PING_AFTER = 30.0
# Seconds to wait for that PING's acknowledgement before opening a new connection.
PING_TIMEOUT = 5.0
# Stream ids are 31 bits, odd for a client: past this the connection is drained and
# a new one opened (at 1,000 pushes/s a connection lasts ~12 days).
STREAM_ID_MAX = 2**31 - 1 - 2 * STREAMS_MAX
READ_SIZE = 64 * 1024

_GOAWAY = 0x7  # RFC 9113 §6.8 frame type
_FRAME_HEADER = 9


class Fate(enum.Enum):
    """How a request that got no answer ended."""

    NOT_PROCESSED = "not_processed"  # provably not processed: resend at once
    UNKNOWN = "unknown"  # may have been processed: never resend


class Http2Error(Exception):
    """A request that got no answer. ``reason``: a short token for logs and the push
    log (an exception class or protocol fact, never a message text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestNotProcessed(Http2Error):
    """The provider provably did not process the request: sending it again is safe."""


class RequestOutcomeUnknown(Http2Error):
    """The request left and no answer came: the provider may have processed it."""


@dataclass(slots=True)
class Response:
    """A provider's answer: status, headers (lower-case names, last value wins) and
    the body (at most :data:`RESPONSE_BODY_MAX` bytes kept)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: it saves ~20 % of a few dozen header bytes per
    push and cost ~15 % of the client's CPU (pure-Python bit packing)."""

    def encode(self, headers: Iterable[HeaderTuple | tuple[bytes, bytes]],  # type: ignore[override]
               huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Stream:
    """One request's bookkeeping in a session."""

    __slots__ = ("sid", "body", "written", "response", "fate", "reason", "done", "waiter")

    def __init__(self, sid: int, body: bytes) -> None:
        self.sid = sid
        self.body = body  # what is left to send (flow control may hold it back)
        self.written = False  # some of its frames were handed to the transport
        self.response: Response | None = None  # once the status arrived
        self.fate: Fate | None = None  # ended without an answer
        self.reason = ""
        self.done = False
        self.waiter: trio.Event | None = None  # the shell's: set when done or on a turn to read


class H2Session:
    """The sans-I/O half: one client connection's HTTP/2 state over ``h2``.

    ``open()`` queues a request; ``outgoing()`` gives the bytes to write (the streams
    in them count as written from then on); ``receive()`` takes bytes read and
    returns the streams that ended; ``lost()`` ends every stream when the
    connection is gone. A stream's result is ``stream.response`` or
    ``stream.fate`` with ``stream.reason``.
    """

    def __init__(self, authority: str) -> None:
        # Our header names are fixed, lower-case and valid: h2's per-request outbound
        # checks (~10 % of the client's CPU) would find nothing. Answers are checked.
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.encoder = _PlainEncoder()
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # no server-initiated streams
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: HEADER_LIST_MAX,
            },
        )
        # h2 applies a local setting to its HPACK decoder only when it changes after an
        # ACK; an initial value has to be set there too.
        self._h2.decoder.max_header_list_size = HEADER_LIST_MAX
        self._h2.initiate_connection()
        self._prefix = [
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", authority.encode("ascii")),
        ]
        self.streams: dict[int, _Stream] = {}
        self._unwritten: list[_Stream] = []
        self._held: list[_Stream] = []  # bodies waiting for flow-control credit
        self._rx = b""  # an incomplete frame, kept until the rest arrives
        self.settings_seen = False  # the server's first SETTINGS arrived
        self.goaway: int | None = None  # last-stream-id of a GOAWAY received
        self.closed_reason = ""  # set once the connection is unusable
        self.exhausted = False  # stream ids (nearly) used up: drain, then a new connection
        self.ping_acked = 0  # PING acknowledgements received
        self.settings_changed = False  # since the shell last looked (more room, maybe)

    # ------------------------------------------------------------------ state
    @property
    def draining(self) -> bool:
        """No new streams: GOAWAY received, connection lost or stream ids used up."""
        return self.goaway is not None or self.exhausted or bool(self.closed_reason)

    def has_room(self) -> bool:
        """Whether a new stream may be opened now."""
        if self.draining:
            return False
        limit = min(self._h2.remote_settings.max_concurrent_streams, STREAMS_MAX)
        return len(self.streams) < limit

    # --------------------------------------------------------------- sending
    def open(self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
             per_request: tuple[tuple[bytes, bytes], ...] = ()) -> _Stream:
        """Queue one POST; the caller checked :meth:`has_room`. ``headers`` repeat
        from request to request (HPACK indexes them: the provider token costs one
        byte after the first time); ``per_request`` and the path differ every time and
        are sent as never-indexed literals, so that they do not push the repeating
        ones out of the 4 KiB table (the path also carries the device token)."""
        sid = self._h2.get_next_available_stream_id()
        self.exhausted = sid >= STREAM_ID_MAX
        block: list[HeaderTuple | tuple[bytes, bytes]] = [*self._prefix]
        block.append(NeverIndexedHeaderTuple(b":path", path))
        block += headers
        block += [NeverIndexedHeaderTuple(k, v) for k, v in per_request]
        self._h2.send_headers(sid, block, end_stream=not body)
        st = _Stream(sid, body)
        self.streams[sid] = st
        self._unwritten.append(st)
        if body:
            self._held.append(st)
            self._send_held()
        return st

    def ping(self) -> None:
        """Queue a PING (RFC 9113 §6.7); :attr:`ping_acked` counts the answers."""
        self._h2.ping(b"pbxrelay")

    def reset(self, st: _Stream) -> None:
        """Give up on a stream (timeout): RST_STREAM CANCEL. Its fate is unknown once
        its request may have left, which it may from now on."""
        if st.done:
            return
        try:
            self._h2.reset_stream(st.sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.H2Error:
            pass  # already closed in h2's eyes
        self._end(st, Fate.UNKNOWN, "Timeout")

    def outgoing(self) -> bytes:
        """The bytes to write now; the streams they carry count as written."""
        for st in self._unwritten:
            st.written = True
        self._unwritten.clear()
        return self._h2.data_to_send()

    def _send_held(self) -> None:
        while self._held:
            st = self._held[0]
            if st.done:
                self._held.pop(0)
                continue
            while st.body:
                window = min(self._h2.local_flow_control_window(st.sid), self._h2.max_outbound_frame_size)
                if window <= 0:
                    return  # the next WINDOW_UPDATE resumes here
                chunk, st.body = st.body[:window], st.body[window:]
                self._h2.send_data(st.sid, chunk, end_stream=not st.body)
            self._held.pop(0)

    # ------------------------------------------------------------- receiving
    def receive(self, data: bytes) -> list[_Stream]:
        """Bytes read from the connection; returns the streams that ended."""
        ended: list[_Stream] = []
        buf = self._rx + data if self._rx else data
        # Feed h2 whole frames, and stop after a GOAWAY: h2 refuses every frame that
        # follows one (its connection state is CLOSED), which would lose the answers
        # that came before it in the same read.
        pos, end = 0, len(buf)
        while end - pos >= _FRAME_HEADER:
            size = int.from_bytes(buf[pos:pos + 3], "big") + _FRAME_HEADER
            if size - _FRAME_HEADER > self._h2.max_inbound_frame_size:
                # RFC 9113 §4.2 FRAME_SIZE_ERROR. Said now, on its header: h2 would
                # buffer up to 16 MiB of it first.
                self._feed(buf[:pos], ended)
                self._rx = b""
                return ended + self.lost("ProtocolError:FrameTooLarge")
            if end - pos < size:
                break
            if buf[pos + 3] == _GOAWAY:
                self._feed(buf[:pos + size], ended)
                buf, pos, end = buf[pos + size:], 0, end - pos - size
                self._reopen_after_goaway()
                continue
            pos += size
        self._feed(buf[:pos], ended)
        self._rx = bytes(buf[pos:])
        return ended

    def _feed(self, data: bytes, ended: list[_Stream]) -> None:
        if not data or self.closed_reason:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            ended += self.lost(f"ProtocolError:{type(exc).__name__}")
            return
        for ev in events:
            self._event(ev, ended)
        self._send_held()

    def _event(self, ev: h2.events.Event, ended: list[_Stream]) -> None:
        if isinstance(ev, h2.events.ResponseReceived | h2.events.DataReceived | h2.events.StreamEnded
                      | h2.events.StreamReset):
            st = self.streams.get(ev.stream_id) if ev.stream_id is not None else None
            if st is None or st.done:
                if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                    self._ack(ev)
                return
            # h2 reports END_STREAM as a StreamEnded event after the frame's own event.
            if isinstance(ev, h2.events.ResponseReceived):
                st.response = _response(ev.headers or [])
            elif isinstance(ev, h2.events.DataReceived):
                self._ack(ev)
                if st.response is not None and ev.data:
                    room = RESPONSE_BODY_MAX - len(st.response.body)
                    if room > 0:
                        st.response.body += ev.data[:room]
            elif isinstance(ev, h2.events.StreamEnded):
                self._answered(st, ended)
            else:
                self._stream_reset(st, ev.error_code, ended)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway(ev.last_stream_id or 0, ended)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings_seen = True
            self.settings_changed = True
        elif isinstance(ev, h2.events.PingAckReceived):
            self.ping_acked += 1

    def _ack(self, ev: h2.events.DataReceived) -> None:
        if ev.stream_id is None or not ev.flow_controlled_length:
            return
        try:
            self._h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        except h2.exceptions.StreamClosedError:
            self._h2.increment_flow_control_window(ev.flow_controlled_length)

    def _answered(self, st: _Stream, ended: list[_Stream]) -> None:
        if st.response is None:  # END_STREAM without a status: a broken answer
            self._end(st, Fate.UNKNOWN, "NoStatus")
        else:
            self._finish(st)
        ended.append(st)

    def _stream_reset(
        self, st: _Stream, code: h2.errors.ErrorCodes | int | None, ended: list[_Stream]
    ) -> None:
        if st.response is not None:  # the status came: the provider processed it
            self._finish(st)
        elif code == h2.errors.ErrorCodes.REFUSED_STREAM:
            self._end(st, Fate.NOT_PROCESSED, "RefusedStream")
        else:
            name = code.name if isinstance(code, h2.errors.ErrorCodes) else str(code)
            self._end(st, Fate.UNKNOWN, f"StreamReset:{name}")
        ended.append(st)

    def _goaway(self, last_stream_id: int, ended: list[_Stream]) -> None:
        self.goaway = last_stream_id if self.goaway is None else min(self.goaway, last_stream_id)
        for st in list(self.streams.values()):
            if st.sid > self.goaway and not st.done:
                self._end(st, Fate.NOT_PROCESSED, "GoAway")
                ended.append(st)

    def _reopen_after_goaway(self) -> None:
        # RFC 9113 §6.8: after GOAWAY the sender may still complete the streams up to
        # last-stream-id. h2 closes its state on receiving GOAWAY and would refuse
        # those answers, so its state goes back to open; no new stream is opened
        # here (draining), and the streams above last-stream-id are already ended.
        if self.closed_reason or not any(not s.done for s in self.streams.values()):
            return
        self._h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def lost(self, reason: str) -> list[_Stream]:
        """The connection is gone: every open stream ends, not processed if none of
        its bytes left, unknown otherwise. Returns them."""
        if not self.closed_reason:
            self.closed_reason = reason
        ended = []
        for st in list(self.streams.values()):
            if not st.done:
                self._end(st, Fate.UNKNOWN if st.written else Fate.NOT_PROCESSED, reason)
                ended.append(st)
        return ended

    # ------------------------------------------------------------ bookkeeping
    def _finish(self, st: _Stream) -> None:
        st.done = True
        self.streams.pop(st.sid, None)

    def _end(self, st: _Stream, fate: Fate, reason: str) -> None:
        st.fate, st.reason = fate, reason
        self._finish(st)


def _response(headers: list[tuple[bytes, bytes]]) -> Response:
    resp = Response(0)
    for k, v in headers:
        name, value = k.decode("latin-1"), v.decode("latin-1")
        if name == ":status":
            resp.status = int(value) if value.isdigit() else 0
        elif not name.startswith(":"):
            resp.headers[name.lower()] = value
    return resp


# ====================================================================== trio shell


class _Connection:
    """One TLS connection and its session; requests take turns reading it."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], session: H2Session) -> None:
        self.stream = stream
        self.session = session
        self.reading = False
        self.flushing = False
        self.checking = False  # being revalidated after idling: others wait for the verdict
        self.room = trio.lowlevel.ParkingLot()  # requests waiting for a free stream
        self.last_used = time.monotonic()

    @property
    def usable(self) -> bool:
        return not self.session.draining

    async def flush(self) -> None:
        """Write what the session has queued (one writer at a time; a request that
        finds a write under way leaves its bytes to that writer)."""
        if self.flushing:
            return
        self.flushing = True
        try:
            while not self.session.closed_reason:
                data = self.session.outgoing()
                if not data:
                    return
                # A cancelled send_all leaves a TLS stream unusable for every other
                # request on it: shield the write and bound it ourselves.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(WRITE_TIMEOUT) as cs:
                        try:
                            await self.stream.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                            self.die(_cause_name(exc))
                            return
                    if cs.cancelled_caught:
                        self.die("WriteTimeout")
                        return
        finally:
            self.flushing = False

    async def read_once(self) -> None:
        """One read, fed to the session; waiters of ended streams are woken."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.die(_cause_name(exc))
            return
        if not data:
            self.die("ConnectionClosed")
            return
        ended = self.session.receive(bytes(data))
        for st in ended:
            _wake(st)
        if ended or self.session.draining or self.session.settings_changed:
            self.session.settings_changed = False
            self.room.unpark_all()  # they look again: a stream is free, or go elsewhere
        await self.flush()

    async def wait(self, st: _Stream) -> None:
        """Until ``st`` ended: read when nobody else does, else sleep until woken."""
        while not st.done:
            if self.session.closed_reason:
                self.die(self.session.closed_reason)
                return
            if not self.reading:
                self.reading = True
                try:
                    while not st.done and not self.session.closed_reason:
                        await self.read_once()
                finally:
                    self.reading = False
                    self._pass_the_turn()
            else:
                st.waiter = trio.Event()
                try:
                    await st.waiter.wait()
                except BaseException:
                    # Cancelled: nobody may hand this task the turn to read any more,
                    # and if it was just handed it, it goes on to another waiter, or
                    # they would all sleep until their timeouts.
                    st.waiter = None
                    if not self.reading:
                        self._pass_the_turn()
                    raise

    def _pass_the_turn(self) -> None:
        """The reader is leaving: wake one waiting request to read in its place."""
        for other in self.session.streams.values():
            if other.waiter is not None and not other.waiter.is_set():
                other.waiter.set()
                return

    def readable_now(self) -> bool:
        """Bytes (or EOF) wait in the socket: the provider said something while we
        were not listening (GOAWAY, a close, a PING)."""
        try:
            fd = self.stream.transport_stream.socket.fileno()
            return fd >= 0 and bool(select.select([fd], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def die(self, reason: str) -> None:
        for st in self.session.lost(reason):
            _wake(st)
        for st in self.session.streams.values():
            _wake(st)
        self.room.unpark_all()

    async def aclose(self) -> None:
        self.die(self.session.closed_reason or "Closed")
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _wake(st: _Stream) -> None:
    if st.waiter is not None:
        st.waiter.set()


def _cause_name(exc: BaseException) -> str:
    """The class name that says what failed: trio wraps TLS and socket errors in
    BrokenResourceError, whose cause is the real one."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
    return type(cause).__name__


class Http2Client:
    """POSTs to one HTTPS origin over HTTP/2 (TLS, ALPN ``h2`` only: no fallback to
    HTTP/1.1, which APNs does not speak).

    One connection at a time carries every request; a GOAWAY moves new requests to
    a fresh connection while the old one finishes. ``request()`` returns the
    :class:`Response` or raises :class:`RequestNotProcessed` /
    :class:`RequestOutcomeUnknown`; it never raises for the network's sake otherwise.
    """

    def __init__(self, base_url: str, tls: ssl.SSLContext, *, request_timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        authority = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = authority if self.port == 443 else f"{authority}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        tls.set_alpn_protocols(["h2"])
        self._tls = tls
        self.request_timeout = request_timeout
        self._conn: _Connection | None = None
        self._draining: set[_Connection] = set()
        self._connecting = trio.Lock()
        self._connects = 0  # connection attempts started
        self._connect_error: str | None = None  # how the last one failed
        self.connections_opened = 0

    # ------------------------------------------------------------ connections
    def _needs_check(self, conn: _Connection) -> bool:
        if conn.checking:
            return True
        if conn.session.streams or conn.reading:
            return False  # in use: a reader would have seen a GOAWAY or a close
        return time.monotonic() - conn.last_used >= IDLE_PING_AFTER or conn.readable_now()

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable and not self._needs_check(conn):
            return conn
        seen = self._connects
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.usable and self._needs_check(conn):
                await self._revalidate(conn)
            if conn is not None and conn.usable:
                return conn
            if self._connects != seen and self._connect_error is not None:
                # Another request tried while we waited, and failed: share its answer.
                raise RequestNotProcessed(self._connect_error)
            self._connects += 1
            self._connect_error = None
            try:
                new = await self._open()
            except RequestNotProcessed as exc:
                self._connect_error = exc.reason
                raise
            old, self._conn = self._conn, new
            if old is not None:
                self._retire(old)
                await self._close_if_idle(old)
            return new

    async def _open(self) -> _Connection:
        stream: trio.SSLStream[trio.SocketStream] | None = None
        try:
            with trio.move_on_after(CONNECT_TIMEOUT) as cs:
                try:
                    tcp = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    raise RequestNotProcessed("ConnectError") from None
                stream = trio.SSLStream(tcp, self._tls, server_hostname=self.host, https_compatible=True)
                await stream.do_handshake()
                if stream.selected_alpn_protocol() != "h2":
                    raise RequestNotProcessed("NoHttp2")
                conn = _Connection(stream, H2Session(self.authority))
                await conn.flush()
                while not conn.session.settings_seen and not conn.session.closed_reason:
                    await conn.read_once()
                if conn.session.closed_reason:
                    raise RequestNotProcessed(conn.session.closed_reason)
                self.connections_opened += 1
                return conn
            assert cs.cancelled_caught
            raise RequestNotProcessed("ConnectTimeout")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise RequestNotProcessed(_cause_name(exc)) from None
        except BaseException:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            raise

    async def _revalidate(self, conn: _Connection) -> None:
        """An idle connection is checked before use: what the provider said while
        nobody listened is read first; after a long silence, a PING must come back."""
        conn.checking = conn.reading = True
        try:
            with trio.move_on_after(PING_TIMEOUT) as cs:
                if time.monotonic() - conn.last_used >= IDLE_PING_AFTER:
                    acked = conn.session.ping_acked
                    conn.session.ping()
                    await conn.flush()
                    while conn.session.ping_acked == acked and not conn.session.closed_reason:
                        await conn.read_once()
                else:
                    await conn.read_once()
            if cs.cancelled_caught:
                conn.die("PingTimeout")
        finally:
            conn.checking = conn.reading = False
        conn.last_used = time.monotonic()
        if not conn.usable:
            self._retire(conn)
            await self._close_if_idle(conn)

    def _retire(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
        self._draining.add(conn)

    async def _close_if_idle(self, conn: _Connection) -> None:
        if conn in self._draining and not conn.session.streams and not conn.reading:
            self._draining.discard(conn)
            await conn.aclose()

    # --------------------------------------------------------------- requests
    async def request(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      per_request: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
        """POST ``body`` to ``path`` (under the base URL's path) with ``headers``
        and ``per_request`` headers (lower-case names, see :meth:`H2Session.open`;
        the pseudo-headers are added)."""
        target = (self.base_path + path).encode("ascii")
        while True:
            conn = await self._connection()
            if conn.session.has_room():
                break
            if conn.usable:
                await conn.room.park()
        st = conn.session.open(target, headers, body, per_request)
        conn.last_used = time.monotonic()
        try:
            await conn.flush()
            with trio.move_on_after(self.request_timeout):
                await conn.wait(st)
            if not st.done:
                conn.session.reset(st)
                await conn.flush()
        finally:
            if not st.done:  # cancelled by the caller (its deadline): forget the stream
                conn.session.reset(st)
            conn.room.unpark()  # its stream is free
            if conn.session.draining:
                self._retire(conn)
                await self._close_if_idle(conn)
        if st.response is not None:
            return st.response
        if st.fate is Fate.NOT_PROCESSED:
            raise RequestNotProcessed(st.reason)
        raise RequestOutcomeUnknown(st.reason)

    async def aclose(self) -> None:
        """Close every connection (requests still waiting end as their fates say)."""
        conns = [c for c in (self._conn, *self._draining) if c is not None]
        self._conn = None
        self._draining.clear()
        for conn in conns:
            await conn.aclose()
