"""Listeners and flows: move bytes between sockets and the sans-I/O proxy."""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio

from relay.proxy.core import Send
from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.framer import FramingLost, Invalid, Ping, StreamFramer
from relay.sip.message import SipMessage
from relay.sip.parser import parse_message
from relay.transport import stun

log = logging.getLogger("relay.transport")

# Bytes queued for one connection (beyond what its kernel socket buffer holds)
# before the peer counts as not reading and is closed: a phone on a bad link must
# not make the relay buffer without bound, but a busy PBX that pauses for a few
# seconds must survive — 2 MiB is ~2,000 INVITEs, 10 s at 200 calls/s.
SEND_QUEUE_BYTES = 2 * 1024 * 1024
READ_SIZE = 65_536
# Datagrams handled per wake-up of a UDP listener before other tasks get a turn.
UDP_BATCH = 32
# Seconds a UDP peer's last datagram time is kept (longer than push.udp_asleep_after may be).
UDP_HEARD_KEEP = 600.0
TLS_HANDSHAKE_TIMEOUT = 10.0
# How long a connection being closed for lost framing may take to deliver its
# last answer (400/513) before it is dropped anyway.
FLUSH_TIMEOUT = 2.0


@dataclass(slots=True)
class StreamTimeouts:
    idle: float = 300.0  # no byte at all (not even a CRLF keepalive) for this long → dead
    partial: float = 10.0  # half a message waiting for the rest this long → close


class Connection:
    """One TCP/TLS flow's output. On plain TCP a message goes straight into the
    kernel's socket buffer when nothing is queued (no task switch per message);
    what the kernel does not take, and everything on TLS, goes through the
    writer task in order."""

    def __init__(self, stream: trio.abc.Stream, flow: Flow, fd: int | None = None):
        self.stream = stream
        self.flow = flow
        self.fd = fd  # plain TCP: the (non-blocking) socket for the direct path
        self._send, self._recv = trio.open_memory_channel[bytes](math.inf)
        self.queued = 0  # bytes handed to the writer and not yet written
        self.pending = 0  # messages (or their tails) handed to the writer and not yet written
        self.cancel_scope = trio.CancelScope()
        self.flushed = trio.Event()  # the writer sent everything and stopped

    def finish(self) -> None:
        """No more sends: the writer drains what is queued, then stops."""
        self._send.close()

    def send(self, data: bytes) -> bool:
        if self.fd is not None and self.queued == 0:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.cancel_scope.cancel()
                return False
            if n == len(data):
                return True
            data = data[n:]
        if self.queued + len(data) > SEND_QUEUE_BYTES:
            log.warning("event=flow_overflow flow=%s queued=%d", self.flow, self.queued)
            self.cancel_scope.cancel()
            return False
        try:
            self._send.send_nowait(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.queued += len(data)
        self.pending += 1
        return True

    async def writer(self) -> None:
        async for data in self._recv:
            await self.stream.send_all(data)
            self.queued -= len(data)
            self.pending -= 1
        self.flushed.set()


Handler = Callable[[SipMessage, Flow], None]
ErrorHandler = Callable[[SipParseError, Flow], None]
# The TLS context a new connection gets: fixed, or asked for at each accept (so that
# a certificate reloaded on SIGHUP serves new connections, old ones keep theirs).
TlsContext = ssl.SSLContext | Callable[[], ssl.SSLContext] | None


class Transports:
    """Owns every socket. ``on_message``/``on_error`` are called synchronously
    with each parsed message; they answer through ``send``."""

    def __init__(
        self, on_message: Handler, on_error: ErrorHandler, on_closed: Callable[[Flow], None],
        counters: Callable[..., None], timeouts: StreamTimeouts,
    ):
        self.on_message = on_message
        self.on_error = on_error
        self.on_closed = on_closed
        self.count = counters
        self.timeouts = timeouts
        # stdlib sockets, non-blocking: a sendto never waits (UDP has no
        # back-pressure worth waiting for; a full buffer drops and counts).
        self.udp: dict[tuple[str, int], socket.socket] = {}
        self.conns: dict[Flow, Connection] = {}
        # Draining: stop_accepting() closes the TCP/TLS listening sockets, connections stay.
        self.accepting = True
        self._accept_scopes: list[trio.CancelScope] = []
        # When each UDP peer last sent anything (RFC 8599 wake-ups: a silent UDP
        # phone is asleep). Forgotten after UDP_HEARD_KEEP seconds of silence.
        self.udp_heard: dict[tuple[str, int], float] = {}
        self._udp_sweep_at = 0.0

    def stop_accepting(self) -> None:
        """Close every TCP/TLS listening socket (new connections are refused); the
        connections already open, and the UDP sockets, carry on."""
        self.accepting = False
        for scope in self._accept_scopes:
            scope.cancel()

    # ------------------------------------------------------------------ state
    def alive(self, flow: Flow) -> bool:
        if flow.transport == "udp":
            return (flow.local_ip, flow.local_port) in self.udp
        return flow in self.conns

    def heard(self, flow: Flow) -> float | None:
        """When the UDP peer of ``flow`` last sent a datagram (trio clock), or None."""
        return self.udp_heard.get((flow.remote_ip, flow.remote_port))

    def _forget_quiet_udp(self, now: float) -> None:
        horizon = now - UDP_HEARD_KEEP
        self.udp_heard = {a: t for a, t in self.udp_heard.items() if t >= horizon}
        self._udp_sweep_at = now + UDP_HEARD_KEEP / 4

    def send(self, out: list[Send]) -> None:
        for s in out:
            f = s.flow
            if f.transport == "udp":
                sock = self.udp.get((f.local_ip, f.local_port))
                if sock is None:
                    self.count("dropped_total:no_udp_socket")
                    continue
                try:
                    sock.sendto(s.data, (f.remote_ip, f.remote_port))
                except (BlockingIOError, OSError) as e:
                    self.count("send_errors_total:udp")
                    log.debug("event=udp_send_error flow=%s err=%s", f, e)
            else:
                conn = self.conns.get(f)
                if conn is None or not conn.send(s.data):
                    self.count("dropped_total:flow_gone")

    # -------------------------------------------------------------------- UDP
    async def serve_udp(
        self, host: str, port: int, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_DGRAM)
        raw.setblocking(False)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock = trio.socket.from_stdlib_socket(raw)
        with sock:
            await sock.bind((host, port))
            bound_port = sock.getsockname()[1]
            key = (host, bound_port)
            self.udp[key] = raw
            task_status.started(bound_port)
            try:
                while True:
                    await trio.lowlevel.wait_readable(raw)
                    now = trio.current_time()
                    if now >= self._udp_sweep_at:
                        self._forget_quiet_udp(now)
                    heard = self.udp_heard
                    # Drain what is queued before going back to the event loop: one
                    # scheduler round per burst instead of one per datagram.
                    for _ in range(UDP_BATCH):
                        try:
                            data, addr = raw.recvfrom(READ_SIZE)
                        except BlockingIOError:
                            break
                        except OSError as e:  # e.g. ICMP errors reported on the socket
                            self.count("receive_errors_total:udp")
                            log.debug("event=udp_receive_error err=%s", e)
                            break
                        heard[addr[:2]] = now
                        self._datagram(data, Flow("udp", addr[0], addr[1], host, bound_port))
                    else:
                        await trio.lowlevel.checkpoint()
            finally:
                self.udp.pop(key, None)

    def _datagram(self, data: bytes, flow: Flow) -> None:
        if stun.is_stun(data):
            answer = stun.binding_response(data, flow.remote_ip, flow.remote_port)
            self.count("stun_requests_total")
            if answer is not None:
                self.send([Send(flow, answer)])
            return
        if not data.strip(b"\r\n\x00 "):
            self.count("keepalives_total:udp")
            return  # CRLF keepalive or padding
        try:
            msg = parse_message(data, datagram=True)
        except SipParseError as e:
            self.on_error(e, flow)
            return
        self.on_message(msg, flow)

    # ---------------------------------------------------------------- TCP/TLS
    async def serve_stream(
        self, transport: str, host: str, port: int, ssl_context: TlsContext,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
        bound_port = listeners[0].socket.getsockname()[1]
        accepting = trio.CancelScope()
        self._accept_scopes.append(accepting)
        if not self.accepting:
            accepting.cancel()
        async with trio.open_nursery() as nursery:
            task_status.started(bound_port)
            with accepting:  # cancelled by stop_accepting(): the listeners close, the nursery
                await trio.serve_listeners(  # keeps the open connections until they end
                    lambda s: self._serve_connection(s, transport, ssl_context),  # type: ignore[arg-type]
                    listeners, handler_nursery=nursery,
                )

    async def _serve_connection(
        self, tcp: trio.SocketStream, transport: str, ssl_context: TlsContext,
    ) -> None:
        # One connection's failure (a reset before we looked at it, a bug) must
        # never reach the listener's nursery: that would stop the relay.
        try:
            ctx = ssl_context() if callable(ssl_context) else ssl_context
            await self._connection(tcp, transport, ctx)
        except Exception:
            self.count("internal_errors_total")
            log.exception("event=connection_error transport=%s", transport)
            await trio.aclose_forcefully(tcp)

    async def _connection(
        self, tcp: trio.SocketStream, transport: str, ssl_context: ssl.SSLContext | None,
    ) -> None:
        try:
            peer = tcp.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        local = tcp.socket.getsockname()
        flow = Flow(transport, peer[0], peer[1], local[0], local[1])
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            tls = trio.SSLStream(tcp, ssl_context, server_side=True)
            with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT) as scope:
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as e:
                    self.count("tls_handshake_failures_total")
                    log.info("event=tls_handshake_failed flow=%s err=%s", flow, type(e).__name__)
                    await trio.aclose_forcefully(tcp)
                    return
            if scope.cancelled_caught:
                self.count("tls_handshake_failures_total")
                await trio.aclose_forcefully(tcp)
                return
            stream = tls
        conn = Connection(stream, flow, tcp.socket.fileno() if ssl_context is None else None)
        self.conns[flow] = conn
        self.count("connections_total:" + transport)
        log.debug("event=flow_open flow=%s", flow)
        try:
            with conn.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn, nursery.cancel_scope)
                    await self._reader(conn)
                    nursery.cancel_scope.cancel()
        finally:
            self.conns.pop(flow, None)
            if conn.pending:
                # Counted as forwarded by the proxy, never written: say so.
                self.count("messages_unsent_total", conn.pending)
                log.warning("event=flow_closed_unsent flow=%s messages=%d bytes=%d",
                            flow, conn.pending, conn.queued)
            self.on_closed(flow)
            await trio.aclose_forcefully(stream)
            log.debug("event=flow_closed flow=%s", flow)

    async def _writer(self, conn: Connection, scope: trio.CancelScope) -> None:
        try:
            await conn.writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        scope.cancel()

    async def _reader(self, conn: Connection) -> None:
        framer = StreamFramer()
        partial_since: float | None = None
        while True:
            timeout = self.timeouts.idle
            if partial_since is not None:
                timeout = min(timeout, partial_since + self.timeouts.partial - trio.current_time())
            with trio.move_on_after(max(timeout, 0)) as scope:
                try:
                    data = await conn.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                    return
            if scope.cancelled_caught:
                reason = "partial_message" if partial_since is not None else "idle"
                self.count(f"flows_closed_total:{reason}")
                log.info("event=flow_timeout flow=%s reason=%s", conn.flow, reason)
                return
            if not data:
                return
            try:
                events = framer.feed(data)
            except FramingLost as e:
                self.count("framing_lost_total")
                self.on_error(e, conn.flow)  # may queue a 400/513
                conn.finish()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await conn.flushed.wait()
                return
            for ev in events:
                if isinstance(ev, Ping):
                    self.count("keepalives_total:" + conn.flow.transport)
                    conn.send(b"\r\n")  # RFC 5626 §4.4.1 pong
                elif isinstance(ev, Invalid):
                    self.on_error(ev.error, conn.flow)
                else:
                    self.on_message(ev, conn.flow)
            # An idle flow (5,000 PBXs) must not keep its last message alive.
            data = events = ev = None  # type: ignore[assignment]
            if framer.buffered:
                if partial_since is None:
                    partial_since = trio.current_time()
            else:
                partial_since = None
