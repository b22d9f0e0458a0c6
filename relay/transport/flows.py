"""Listeners and flows: move bytes between sockets and the service above (trio shell)."""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Iterable

import trio

from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.framer import FramingLost, Invalid, Ping, StreamEvent, StreamFramer
from relay.sip.parser import parse_message
from relay.transport import sockfilter, stun
from relay.transport.admission import HANDSHAKES, Bans, ConnectionSlots, Notices, SourceBuckets
from relay.transport.backoff import ONE_CONNECTION, AcceptBackoff
from relay.transport.events import TransportEvents
from relay.transport.limits import (
    FLUSH_TIMEOUT,
    LISTEN_BACKLOG,
    MESSAGES_PER_TURN,
    READ_SIZE,
    SEND_QUEUE_BYTES,
    TLS_HANDSHAKE_TIMEOUT,
    UDP_BAN_CHECK_EVERY,
    UDP_BAN_FACTOR,
    UDP_BATCH,
    UDP_DROP_BATCH,
    StreamTimeouts,
    TransportLimits,
)

log = logging.getLogger("relay.transport")

# The TLS context a new connection gets: fixed, or asked for at each accept (so that
# a certificate reloaded on SIGHUP serves new connections, old ones keep theirs).
TlsContext = ssl.SSLContext | Callable[[], ssl.SSLContext] | None
# Close with RST, not FIN: a refused connection leaves no TIME_WAIT entry behind.
_ABORT = struct.pack("ii", 1, 0)


def _nobody(ip: str) -> bool:
    return False


def _uncounted(name: str, n: int = 1) -> None:
    return None


DEFAULT_TIMEOUTS = StreamTimeouts()
DEFAULT_LIMITS = TransportLimits()


# The most plaintext one TLS record carries (RFC 8446 §5.1, RFC 5246 §6.2.1).
TLS_RECORD = 1 << 14


class Connection:
    """One TCP/TLS flow's output. On plain TCP a message goes straight into the
    kernel's socket buffer when nothing is queued (no task switch per message);
    what the kernel does not take, and everything on TLS, is queued and written in
    order by a writer task. That task exists only while something is queued, and runs
    in the listener's nursery: an idle flow (thousands of PBXs phoned home) holds no
    task, nursery, channel or message for its output - ~6 KB per connection less than
    a nursery with a writer waiting on a channel (issue 13)."""

    __slots__ = ("stream", "flow", "count", "fd", "queue", "queued", "pending", "cancel_scope", "silence",
                 "corked", "_nursery", "_writer", "_writing", "_failed", "_finished", "_flushed")

    def __init__(
        self, stream: trio.abc.Stream, flow: Flow, fd: int | None = None,
        count: Callable[[str, int], None] = _uncounted,
    ):
        self.stream = stream
        self.flow = flow
        self.count = count
        self.fd = fd  # plain TCP: the (non-blocking) socket for the direct path
        # What the writer has yet to write, in order; None while nothing is (an empty
        # deque is ~600 bytes).
        self.queue: deque[bytes] | None = None
        self.queued = 0  # bytes handed to the writer and not yet written
        self.pending = 0  # messages (or their tails) handed to the writer and not yet written
        # Messages of one UDP batch for this flow, written together when the batch ends
        # (Transports._udp_batch); None outside a batch.
        self.corked: list[bytes] | None = None
        self.cancel_scope = trio.CancelScope()
        self.silence = "idle"  # what the reader's deadline (on cancel_scope) waits out
        self._nursery: trio.Nursery | None = None  # where a writer runs, once the flow serves
        self._writer: trio.CancelScope | None = None  # the running writer's (stop cancels it)
        self._writing = False  # a writer task is started and has not ended
        self._failed = False  # the stream broke under a writer: nothing more is written
        self._finished = False  # no more sends (finish)
        self._flushed: trio.Event | None = None  # made only when someone waits for the writer

    def start(self, nursery: trio.Nursery) -> None:
        """Writers run in ``nursery`` from now on (what was queued before starts now)."""
        self._nursery = nursery
        self._spawn()

    async def stop(self) -> None:
        """The flow ends: no writer starts again; a running one is cancelled and waited for."""
        self._failed = True
        if self._writing and self._writer is not None:
            self._writer.cancel()
            with trio.CancelScope(shield=True):  # it ends at its next checkpoint
                await self.wait_flushed()

    def finish(self) -> None:
        """No more sends: the writer drains what is queued, then stops."""
        self._finished = True

    async def wait_flushed(self) -> None:
        """Until nothing is queued and no writer runs."""
        if not (self._writing or (self.queue and not self._failed)):
            await trio.lowlevel.checkpoint()
            return
        if self._flushed is None:
            self._flushed = trio.Event()
        await self._flushed.wait()

    def send(self, data: bytes, cork: list[Connection] | None = None) -> bool:
        """Write or queue ``data``; False if the flow is gone or overflowed (it closes).
        With ``cork`` (the batch in progress), a direct write waits for :meth:`uncork`,
        and this connection joins ``cork`` with its first message."""
        if cork is not None and self.fd is not None and self.queued == 0:
            if self.corked is None:
                self.corked = []
                cork.append(self)
            self.corked.append(data)
            return True
        return self._send(data)

    def uncork(self) -> None:
        """Write what the batch left here in one write (the end of Transports._udp_batch);
        what the kernel does not take is queued message by message, as :meth:`send` would
        have (so that ``pending`` and the drop counters still count messages)."""
        corked, self.corked = self.corked, None
        if not corked:  # corked only with a socket and nothing queued (send): write at once
            return
        written = self._write_now(b"".join(corked))  # one message: joined is that message
        if written < 0:
            self.count("dropped_total:flow_gone", len(corked))
            return
        for data in corked:
            if written >= len(data):
                written -= len(data)
                continue
            if not self._enqueue(data[written:]):
                self.count("dropped_total:flow_gone", 1)
            written = 0

    def _send(self, data: bytes) -> bool:
        if self.fd is not None and self.queued == 0:
            n = self._write_now(data)
            if n < 0:
                return False
            if n == len(data):
                return True
            data = data[n:]
        return self._enqueue(data)

    def _write_now(self, data: bytes) -> int:
        """Bytes the kernel took straight away (plain TCP); -1 if the flow broke (it closes)."""
        assert self.fd is not None
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self.cancel_scope.cancel()
            return -1

    def _enqueue(self, data: bytes) -> bool:
        if self.queued + len(data) > SEND_QUEUE_BYTES:
            log.warning("event=flow_overflow flow=%s queued=%d", self.flow, self.queued)
            self.cancel_scope.cancel()
            return False
        if self._finished:
            return False
        if self.queue is None:
            self.queue = deque()
        self.queue.append(data)
        self.queued += len(data)
        self.pending += 1
        self._spawn()
        return True

    def _spawn(self) -> None:
        if self.queue and not (self._writing or self._failed) and self._nursery is not None:
            self._writing = True
            self._writer = trio.CancelScope()
            self._nursery.start_soon(self._write)

    def _next_write(self, queue: deque[bytes]) -> tuple[int, bytes]:
        """How many queued messages the writer's next ``send_all`` takes, and their bytes.
        TLS (and node links): the messages that fit in one TLS record (RFC 8446 §5.1,
        2^14 bytes), joined — the record reaches the peer whole or not at all, so a failed
        write leaves whole messages unwritten, as one message did. Plain TCP: one
        message (a failed ``send_all`` does not say how far it got)."""
        first = queue[0]
        if self.fd is not None or len(queue) == 1 or len(first) >= TLS_RECORD:
            return 1, first
        parts = [first]
        size = len(first)
        for data in itertools.islice(queue, 1, None):
            if size + len(data) > TLS_RECORD:
                break
            parts.append(data)
            size += len(data)
        return len(parts), b"".join(parts)

    async def _write(self) -> None:
        """Write the queue in order, then end (the next send starts another writer). A
        message leaves the queue once written: if the stream breaks, it stays counted."""
        assert self._writer is not None  # _spawn made it
        try:
            with self._writer:
                while self.queue:
                    n, data = self._next_write(self.queue)
                    await self.stream.send_all(data)
                    for _ in range(n):
                        self.queued -= len(self.queue.popleft())
                        self.pending -= 1
                self.queue = None
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            self._failed = True
            self.cancel_scope.cancel()
        except Exception:
            # A bug here must close this flow, never reach the listener's nursery.
            self._failed = True
            self.cancel_scope.cancel()
            self.count("internal_errors_total", 1)
            log.exception("event=connection_error flow=%s", self.flow)
        finally:
            self._writing = False
            if self._flushed is not None:
                self._flushed.set()


class Transports:
    """Owns every socket. Reports what arrives to ``events`` (synchronously, from
    the reading task); the service answers through ``send``/``send_many``.

    ``trusted(ip)`` says whether a source is a customer (a registered PBX, a phone
    with a live registration): the service keeps it current, the transport asks it
    when a source connects or is swept (relay/transport/admission.py). Sources in
    ``limits.exempt`` are trusted too."""

    def __init__(
        self, events: TransportEvents, timeouts: StreamTimeouts = DEFAULT_TIMEOUTS,
        limits: TransportLimits = DEFAULT_LIMITS, trusted: Callable[[str], bool] = _nobody,
    ):
        self.events = events
        self.count = events.count
        self.timeouts = timeouts
        self.limits = limits
        self._trusted = trusted
        self.udp_gate = SourceBuckets(limits.udp_rate_per_source, self.is_trusted, exempt=limits.exempt)
        self.slots = ConnectionSlots(limits)
        self.notices = Notices()
        self.bans = Bans(limits.udp_ban_seconds)
        self._bans_checked = -math.inf
        # stdlib sockets, non-blocking: a sendto never waits (UDP has no
        # back-pressure worth waiting for; a full buffer drops and counts).
        self.udp: dict[tuple[str, int], socket.socket] = {}
        # `pbx-relay run --workers N`: every worker binds the same SIP ports with
        # SO_REUSEPORT and the kernel spreads flows among them (docs/cluster.md).
        self.reuse_port = False
        self.conns: dict[Flow, Connection] = {}
        self._cork: list[Connection] | None = None  # during a UDP batch: its flows with corked output
        # Draining: stop_accepting() closes the TCP/TLS listening sockets, connections stay.
        self.accepting = True
        self._accept_scopes: list[trio.CancelScope] = []

    def is_trusted(self, ip: str) -> bool:
        """An exempt address or one the service trusts."""
        return ip in self.limits.exempt or self._trusted(ip)

    def stop_accepting(self) -> None:
        """Close every TCP/TLS listening socket (new connections are refused); the
        connections already open, and the UDP sockets, carry on."""
        self.accepting = False
        for scope in self._accept_scopes:
            scope.cancel()

    # ------------------------------------------------------------------ state
    def gauges(self) -> dict[str, int]:
        """Current sizes for /metrics."""
        return {
            "flows_open": len(self.conns),
            "flows_queued_bytes": sum(c.queued for c in self.conns.values()),
            "tls_handshakes_in_progress": self.slots.handshakes,
            "udp_sources_tracked": len(self.udp_gate),
            "udp_sources_banned": len(self.bans.until),
        }

    def send(self, flow: Flow, data: bytes) -> bool:
        """Send ``data`` on ``flow`` (never waits); False, counted, if it cannot go."""
        if flow.transport == "udp":
            sock = self.udp.get((flow.local_ip, flow.local_port))
            if sock is None:
                self.count("dropped_total:no_udp_socket")
                return False
            try:
                sock.sendto(data, (flow.remote_ip, flow.remote_port))
            except OSError as e:  # BlockingIOError too: a full buffer drops (UDP)
                self.count("send_errors_total:udp")
                log.debug("event=udp_send_error flow=%s err=%s", flow, e)
                return False
            return True
        conn = self.conns.get(flow)
        if conn is None or not conn.send(data, self._cork):
            self.count("dropped_total:flow_gone")
            return False
        return True

    def send_many(self, out: Iterable[tuple[Flow, bytes]]) -> None:
        """``send`` each (flow, data) in order."""
        for flow, data in out:
            self.send(flow, data)

    # -------------------------------------------------------------------- UDP
    async def serve_udp(
        self, host: str, port: int, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read one UDP socket until cancelled; ``task_status`` gets the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_DGRAM)
        raw.setblocking(False)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if self.reuse_port:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock = trio.socket.from_stdlib_socket(raw)
        with sock:
            await sock.bind((host, port))
            bound_port = sock.getsockname()[1]
            key = (host, bound_port)
            self.udp[key] = raw
            if not math.isfinite(self._bans_checked):
                self._bans_checked = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._ban_clock)  # bans end even in silence
                    task_status.started(bound_port)
                    while True:
                        await trio.lowlevel.wait_readable(raw)
                        # Drain what is queued before going back to the event loop: one
                        # scheduler round per burst instead of one per datagram.
                        while self._udp_batch(raw, host, bound_port):
                            await trio.lowlevel.checkpoint()
            finally:
                self.udp.pop(key, None)

    async def _ban_clock(self) -> None:
        # A task of its own rather than a timeout around each wait for a datagram: a
        # cancel scope per wake-up cost ~2 % of the relay at 400 calls/s (issue 9).
        # With several UDP sockets each has a clock; the check runs once per period.
        while True:
            await trio.sleep(UDP_BAN_CHECK_EVERY)
            now = trio.current_time()
            if now >= self._bans_checked + UDP_BAN_CHECK_EVERY:
                self._check_bans(now)

    def _udp_batch(self, raw: socket.socket, host: str, port: int) -> bool:
        """Handle up to UDP_BATCH admitted datagrams (or UDP_DROP_BATCH dropped ones);
        True if the batch filled up (more may be waiting)."""
        now = trio.current_time()
        if now >= self._bans_checked + UDP_BAN_CHECK_EVERY:
            self._check_bans(now)
        admit = self.udp_gate.admit
        admitted = dropped = 0
        last_dropped = ""
        # What the batch sends on TCP/TLS flows waits for its end: one write per flow per
        # batch, not per message (at 900 calls/s a batch holds ~7 datagrams, the INVITEs,
        # ACKs and BYEs that mostly go to one PBX's connection). The batch never awaits, so
        # nothing else sends meanwhile; the writes happen before anything else runs.
        cork: list[Connection] = []
        self._cork = cork
        try:
            while admitted < UDP_BATCH and dropped < UDP_DROP_BATCH:
                try:
                    data, addr = raw.recvfrom(READ_SIZE)
                except BlockingIOError:
                    return False
                except OSError as e:  # e.g. ICMP errors reported on the socket
                    self.count("receive_errors_total:udp")
                    log.debug("event=udp_receive_error err=%s", e)
                    return False
                ip = addr[0]
                if not admit(ip, now):  # before parsing: a flood costs a lookup each
                    dropped += 1
                    last_dropped = ip
                    continue
                admitted += 1
                self._datagram(data, Flow("udp", ip, addr[1], host, port))
            return True
        finally:
            self._cork = None
            for conn in cork:
                conn.uncork()
            if dropped:
                self._udp_dropped(last_dropped, dropped, now)

    def _udp_dropped(self, ip: str, n: int, now: float) -> None:
        self.count("udp_dropped_total:rate", n)
        if self.notices.due("udp " + ip, now):
            log.warning("event=udp_rate_limited source=%s rate=%g/s (dropped unread, counted in "
                        "udp_dropped_total; this source is named again in %gs if it goes on)",
                        ip, self.limits.udp_rate_per_source, self.notices.every)

    def _check_bans(self, now: float) -> None:
        """Ban in the kernel the IPv4 sources that went on flooding; lift the bans
        that ran out (relay/transport/sockfilter.py)."""
        elapsed = min(now - self._bans_checked, 10 * UDP_BAN_CHECK_EVERY)
        self._bans_checked = now
        flooders = [ip for ip in self.udp_gate.flooders(elapsed, UDP_BAN_FACTOR) if ":" not in ip]
        banned, lifted = self.bans.update(flooders, now)
        if not (banned or lifted):
            return
        sources = sorted(self.bans.until)
        for sock in self.udp.values():
            if sock.family == socket.AF_INET:
                try:
                    sockfilter.apply(sock, sources)
                except OSError as e:  # no BPF here: the gate alone goes on dropping
                    log.warning("event=udp_ban_failed err=%s", e)
        for ip in banned:
            self.count("udp_bans_total")
            log.warning("event=udp_source_banned source=%s seconds=%g (over %gx its budget; "
                        "dropped in the kernel from now on)", ip, self.bans.seconds, UDP_BAN_FACTOR)
        for ip in lifted:
            log.info("event=udp_ban_lifted source=%s", ip)

    def _datagram(self, data: bytes, flow: Flow) -> None:
        if stun.is_stun(data):
            answer = stun.binding_response(data, flow.remote_ip, flow.remote_port)
            self.count("stun_requests_total")
            self.events.on_keepalive(flow)
            if answer is not None:
                self.send(flow, answer)
            return
        if not data.strip(b"\r\n\x00 "):
            self.count("keepalives_total:udp")
            self.events.on_keepalive(flow)
            return  # CRLF keepalive or padding
        try:
            msg = parse_message(data, datagram=True)
        except SipParseError as e:
            self.events.on_error(e, flow)
            return
        self.events.on_message(msg, flow)

    # ---------------------------------------------------------------- TCP/TLS
    async def serve_stream(
        self, transport: str, host: str, port: int, ssl_context: TlsContext,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept TCP (``ssl_context`` None) or TLS connections until cancelled;
        ``stop_accepting`` closes the listening sockets, open connections carry on."""
        if self.reuse_port:
            listeners = [reuse_port_listener(host, port)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host, backlog=LISTEN_BACKLOG)
        bound_port = listeners[0].socket.getsockname()[1]
        accepting = trio.CancelScope()
        self._accept_scopes.append(accepting)
        if not self.accepting:
            accepting.cancel()
        async with trio.open_nursery() as handlers:  # keeps the connections until they end
            task_status.started(bound_port)
            try:
                with accepting:
                    async with trio.open_nursery() as loops:
                        for listener in listeners:
                            loops.start_soon(self._accept_loop, listener.socket, transport,
                                             ssl_context, handlers)
            finally:
                for listener in listeners:
                    listener.socket.close()

    async def _accept_loop(
        self, sock: trio.socket.SocketType, transport: str, ssl_context: TlsContext,
        handlers: trio.Nursery,
    ) -> None:
        def admit(conn: trio.socket.SocketType, ip: str) -> None:
            self._admit(conn, ip, transport, ssl_context, handlers)

        await accept_forever(sock, admit, transport, self.count)

    def _admit(
        self, sock: trio.socket.SocketType, ip: str, transport: str, ssl_context: TlsContext,
        handlers: trio.Nursery,
    ) -> None:
        trusted = self.is_trusted(ip)
        refused = self.slots.open(ip, trusted, trio.current_time())
        if refused is None and ssl_context is not None and not self.slots.start_handshake(trusted):
            self.slots.close(ip)
            refused = HANDSHAKES
        if refused is not None:
            self._refuse(sock, ip, transport, refused)
            return
        handlers.start_soon(self._serve_connection, sock, ip, transport, ssl_context, handlers)

    def _refuse(self, sock: trio.socket.SocketType, ip: str, transport: str, reason: str) -> None:
        """Close a connection over a limit at once (RST), count it, and name the source
        in the log once per NOTICE_EVERY."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
        except OSError:
            pass
        sock.close()
        self.count("connections_refused_total:" + reason)
        n = self.notices.due(f"{transport} {ip}", trio.current_time())
        if n:
            log.warning("event=connection_refused transport=%s source=%s reason=%s refused=%d",
                        transport, ip, reason, n)

    async def _serve_connection(
        self, sock: trio.socket.SocketType, ip: str, transport: str, ssl_context: TlsContext,
        handlers: trio.Nursery,
    ) -> None:
        # One connection's failure (a reset before we looked at it, a bug) must
        # never reach the listener's nursery: that would stop the relay.
        tcp = trio.SocketStream(sock)
        handed_over = False  # _connection gives the slot back itself
        try:
            flow = _flow_of(tcp, transport)
            stream: trio.abc.Stream | None = tcp
            if ssl_context is not None:
                try:  # its handshake slot was taken by _admit
                    ctx = ssl_context() if callable(ssl_context) else ssl_context
                    stream = await self._handshake(tcp, flow, ctx) if flow is not None else None
                finally:
                    self.slots.end_handshake()
            if flow is None or stream is None:
                await trio.aclose_forcefully(tcp)
                return
            handed_over = True
            fd = tcp.socket.fileno() if ssl_context is None else None
            await self._connection(Connection(stream, flow, fd, self.count), ip, handlers)
        except Exception:
            self.count("internal_errors_total")
            log.exception("event=connection_error transport=%s", transport)
            await trio.aclose_forcefully(tcp)
        finally:
            if not handed_over:
                self.slots.close(ip)

    async def _handshake(
        self, tcp: trio.SocketStream, flow: Flow, ssl_context: ssl.SSLContext,
    ) -> trio.SSLStream[trio.SocketStream] | None:
        """The TLS stream once its handshake is done, or None (counted)."""
        tls = trio.SSLStream(tcp, ssl_context, server_side=True)
        with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT):
            try:
                await tls.do_handshake()
                return tls
            except (trio.BrokenResourceError, ssl.SSLError) as e:
                log.info("event=tls_handshake_failed flow=%s err=%s", flow, type(e).__name__)
        self.count("tls_handshake_failures_total")
        return None

    async def serve_established(
        self, stream: trio.abc.Stream, flow: Flow,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Carry SIP on a connection someone else opened and vetted - a link to another
        relay node (relay/cluster/links.py) - as on an accepted one: framing, timeouts,
        the send queue, the events. It takes no admission slot (the cluster bounds its
        links itself); ``task_status`` is told once ``send`` reaches ``flow``."""
        async with trio.open_nursery() as handlers:  # its writer's (one per link)
            await self._connection(Connection(stream, flow, None, self.count), None, handlers, task_status)

    async def _connection(
        self, conn: Connection, ip: str | None, handlers: trio.Nursery,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read ``conn`` until it ends; its writers run in ``handlers`` (no nursery per flow)."""
        flow, stream = conn.flow, conn.stream
        self.conns[flow] = conn
        self.count("connections_total:" + flow.transport)
        log.debug("event=flow_open flow=%s", flow)
        try:
            self.events.on_opened(flow)
            task_status.started()
            conn.start(handlers)
            with conn.cancel_scope:
                await self._reader(conn)
            if conn.cancel_scope.cancelled_caught and trio.current_time() >= conn.cancel_scope.deadline:
                # The reader's deadline passed: silent, or half a message for too long.
                self.count(f"flows_closed_total:{conn.silence}")
                log.info("event=flow_timeout flow=%s reason=%s", flow, conn.silence)
        finally:
            await conn.stop()
            self.conns.pop(flow, None)
            # The slot goes back in the same step the flow leaves ``conns``: whoever
            # sees a connection gone may open the next one at once.
            if ip is not None:
                self.slots.close(ip)
            if conn.pending:
                # Counted as forwarded by the proxy, never written: say so.
                self.count("messages_unsent_total", conn.pending)
                log.warning("event=flow_closed_unsent flow=%s messages=%d bytes=%d",
                            flow, conn.pending, conn.queued)
            self.events.on_closed(flow)
            await trio.aclose_forcefully(stream)
            log.debug("event=flow_closed flow=%s", flow)

    async def _reader(self, conn: Connection) -> None:
        framer = StreamFramer()
        partial_since: float | None = None
        while True:
            # The wait's timeout is the flow's own cancel scope's deadline (_connection
            # names it): no cancel scope per read, none kept per idle flow (issue 13).
            deadline = trio.current_time() + self.timeouts.idle
            if partial_since is not None:
                deadline = min(deadline, max(trio.current_time(), partial_since + self.timeouts.partial))
            conn.silence = "idle" if partial_since is None else "partial_message"
            conn.cancel_scope.deadline = deadline
            try:
                data = await conn.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                conn.cancel_scope.deadline = math.inf
                return
            conn.cancel_scope.deadline = math.inf
            if not data:
                return
            try:
                events = framer.feed(data)
            except FramingLost as e:
                self.count("framing_lost_total")
                self.events.on_error(e, conn.flow)  # may queue a 400/513
                conn.finish()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await conn.wait_flushed()
                return
            data = b""  # an idle flow (5,000 PBXs) must not keep its last read alive
            completed = bool(events)
            await self._deliver(conn, events)
            if not framer.buffered:
                partial_since = None
            elif partial_since is None or completed:
                # A busy trunk's reads end mid-message all the time: only a peer that
                # completes nothing for timeouts.partial is stalled.
                partial_since = trio.current_time()

    async def _deliver(self, conn: Connection, events: list[StreamEvent]) -> None:
        """Hand one read's messages up, MESSAGES_PER_TURN at a time: between two
        batches every other task (the other connections) gets a turn."""
        flow = conn.flow
        for i, ev in enumerate(events):
            if i and i % MESSAGES_PER_TURN == 0:
                await trio.lowlevel.checkpoint()
            if isinstance(ev, Ping):
                self.count("keepalives_total:" + flow.transport)
                self.events.on_keepalive(flow)
                conn.send(b"\r\n")  # RFC 5626 §4.4.1 pong
            elif isinstance(ev, Invalid):
                self.events.on_error(ev.error, flow)
            else:
                self.events.on_message(ev, flow)
        events.clear()  # an idle flow must not keep its last message alive


def _flow_of(tcp: trio.SocketStream, transport: str) -> Flow | None:
    """The flow of an accepted connection, or None if the peer is already gone."""
    try:
        peer = tcp.socket.getpeername()
    except OSError:
        return None
    local = tcp.socket.getsockname()
    return Flow(transport, peer[0], peer[1], local[0], local[1])


async def accept_forever(
    sock: trio.socket.SocketType, admit: Callable[[trio.socket.SocketType, str], None],
    name: str, count: Callable[..., None],
) -> None:
    """Accept connections on a listening socket until cancelled, handing each with
    its peer IP to ``admit`` (which must not block). Out of descriptors or memory,
    it waits (relay/transport/backoff.py) and says so once per episode, with the
    count when it recovers - where trio.serve_listeners logs a traceback every 0.1 s."""
    backoff = AcceptBackoff()
    while True:
        try:
            conn, addr = await sock.accept()
        except OSError as e:
            if e.errno in ONE_CONNECTION:
                continue
            delay, began = backoff.failed(e.errno or 0, trio.current_time())
            err = errno.errorcode.get(e.errno or 0, str(e.errno))
            count("accept_failures_total:" + err)
            if began:
                log.warning("event=accept_failing listener=%s errno=%s (retrying, backoff up to %gs)",
                            name, err, backoff.cap)
            await trio.sleep(delay)
            continue
        episode = backoff.succeeded()
        if episode is not None:
            log.warning("event=accept_recovered listener=%s failures=%d after=%.1fs errno=%s",
                        name, episode.failures, trio.current_time() - episode.started,
                        errno.errorcode.get(episode.errno, episode.errno))
        admit(conn, addr[0])


def reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A TCP listener on ``host:port`` (an IP address, as the config has it) that other
    processes of the same user bind too (SO_REUSEPORT): the kernel hands each new
    connection to one of them, by a hash of its addresses and ports."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        raw.bind((host, port))
        raw.listen(LISTEN_BACKLOG)
    except OSError:
        raw.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))
