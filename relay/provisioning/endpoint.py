"""The relay's provisioning port: phones' HTTPS GETs, and the links PBXs open to carry them.

One TLS listener (default 127.0.0.1:4433 under ``pbx-relay run``, 4433 being the
port plan PBX vendors document for this) speaks HTTP/1.1 (h11) to phones. A GET of
``/provisioning/<serial>/<path>`` goes to that PBX over one of its links as an
HTTP/2 stream, and the answer streams back as it comes: nothing is cached, nothing
of it written to disk or logged. A request for the link path with the right
Upgrade becomes a link after the digest handshake (:mod:`relay.provisioning.handshake`).

Answers of the relay's own, all with a short text body and ``Cache-Control: no-store``:

- 404 — unknown serial, PBX offline (no link), or a target outside
  ``/provisioning/<serial>/``: one answer for all, byte for byte, so a scanner learns
  nothing of which serials exist;
- 405 — a method other than GET or HEAD;
- 431 — a request head over MAX_REQUEST_HEAD;
- 502 — the link went before the PBX answered, the PBX side reset the stream, or the
  announced body is over ``provisioning.max_body``;
- 503 + Retry-After — ``provisioning.max_requests_per_serial`` requests of this PBX in
  progress, or every link of it full;
- 504 — no response head within ``provisioning.response_timeout``.

Once a response has begun (status sent), a failure can only cut it: the connection
closes before the body's end, which a phone sees as a broken download (a short
Content-Length or a missing last chunk), never as a complete file.
"""

from __future__ import annotations

import http
import logging
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import h2.exceptions
import h11
import trio

from relay.pbx.digest import ALGORITHMS, DigestAuth
from relay.provisioning.accesslog import AccessLog, AccessRecorder, anonymise
from relay.provisioning.forwarding import (
    BadTarget,
    Target,
    content_length,
    forwarded,
    parse_target,
    request_fields,
    response_fields,
)
from relay.provisioning.handshake import (
    LINK_PATH,
    UPGRADE_TOKEN,
    auth_params,
    digest_username,
    is_link_request,
)
from relay.provisioning.limits import (
    ACCESS_LOG_BATCH,
    ACCESS_LOG_PURGE_EVERY,
    ACCESS_LOG_QUEUE,
    KEEPALIVE_IDLE,
    LINK_HANDSHAKE_TIMEOUT,
    MAX_LINK_AUTH_ATTEMPTS,
    MAX_REQUEST_FIELDS,
    MAX_REQUEST_HEAD,
    PHONE_WRITE_TIMEOUT,
    RECEIVE_SIZE,
    REQUEST_HEAD_TIMEOUT,
)
from relay.provisioning.link import NETWORK_ERRORS
from relay.provisioning.pbxlink import Exchange, Head, LinkLost, PbxLink, StreamRefused
from relay.provisioning.routing import LinkTable
from relay.provisioning.settings import ProvisioningSettings

log = logging.getLogger("relay.provisioning")

Lookup = Callable[[str], "dict[str, str] | None"]
TlsSource = ssl.SSLContext | Callable[[], ssl.SSLContext]

# Seconds a busy PBX's phones are told to wait (Retry-After on 503, 429).
RETRY_AFTER = 5
ACCESS_LOG_FILE = "provisioning-access.sqlite"


class Aborted(Exception):
    """A response cut after its status was sent (the phone's connection must close)."""


class ProvisioningServer:
    """The provisioning listener's state: links by serial, counters, the access log."""

    def __init__(self, settings: ProvisioningSettings, lookup: Lookup, tls: TlsSource,
                 recorder: AccessRecorder):
        self.settings = settings
        self.lookup = lookup
        self.tls = tls
        self.recorder = recorder
        self.table: LinkTable[PbxLink] = LinkTable(settings.max_links_per_serial,
                                                   settings.max_requests_per_serial)
        algorithms = tuple(a for a in settings.digest_algorithms if a in ALGORITHMS)
        # Nonces only live through one handshake: a key of this process is enough.
        self.auth = DigestAuth(secrets.token_bytes(32), settings.realm, algorithms)
        self.extra = frozenset(h.lower() for h in settings.extra_request_headers)
        self.connections: Counter[str] = Counter()  # open TLS connections by client IP
        self.stats: Counter[str] = Counter()
        self.bound: list[str] = []

    # ------------------------------------------------------------ connections
    async def serve_connection(self, tcp: trio.SocketStream) -> None:
        """One accepted TCP connection, within the connection limits."""
        try:
            ip = tcp.socket.getpeername()[0]
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        if (sum(self.connections.values()) >= self.settings.max_connections
                or self.connections[ip] >= self.settings.max_connections_per_ip):
            self.stats["provisioning_connections_refused_total"] += 1
            await trio.aclose_forcefully(tcp)
            return
        self.connections[ip] += 1
        try:
            await self._connection(tcp, ip)
        except Exception:
            # One connection's bug must never reach the listener (that would stop it).
            self.stats["provisioning_internal_errors_total"] += 1
            log.exception("event=provisioning_connection_error")
        finally:
            self.connections[ip] -= 1
            if self.connections[ip] <= 0:
                del self.connections[ip]
            await trio.aclose_forcefully(tcp)

    async def _connection(self, tcp: trio.SocketStream, ip: str) -> None:
        ctx = self.tls() if callable(self.tls) else self.tls
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        with trio.move_on_after(REQUEST_HEAD_TIMEOUT) as handshake:
            try:
                await stream.do_handshake()
            except NETWORK_ERRORS:
                handshake.cancel()
        if handshake.cancelled_caught:
            self.stats["provisioning_tls_failures_total"] += 1
            return
        timeout = REQUEST_HEAD_TIMEOUT
        while True:
            request = await self._read_request(conn, stream, timeout)
            if request is None:
                return
            if is_link_request(request.method, request.target, list(request.headers)):
                await self._link(conn, stream, ip, request)
                return
            if not await self._phone_request(conn, stream, ip, request):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            timeout = KEEPALIVE_IDLE

    async def _read_request(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                            timeout: float) -> h11.Request | None:
        """The next request head and its (empty) body; None when the connection is done
        (closed, timed out, or answered 400/431 for a bad head)."""
        request: h11.Request | None = None
        with trio.move_on_after(timeout):
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
                    elif isinstance(event, h11.Request):
                        request = event
                        if _head_size(event) > MAX_REQUEST_HEAD or len(event.headers) > MAX_REQUEST_FIELDS:
                            await self._error(conn, stream, 431)
                            return None
                        if event.method not in (b"GET", b"HEAD"):  # its body stays unread: close
                            await self._error(conn, stream, 405, [(b"allow", b"GET, HEAD")])
                            return None
                    elif isinstance(event, h11.EndOfMessage) and request is not None:
                        return request
                    elif isinstance(event, h11.Data):
                        await self._error(conn, stream, 400)  # a GET with a body: not ours
                        return None
                    else:  # ConnectionClosed, PAUSED
                        return None
            except h11.RemoteProtocolError as e:
                await self._error(conn, stream, e.error_status_hint)
            except NETWORK_ERRORS:
                pass
        return None

    # ---------------------------------------------------------- phone requests
    async def _phone_request(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                             ip: str, request: h11.Request) -> bool:
        """Answer one phone request; False when the connection must close."""
        try:
            target = parse_target(request.target)
        except BadTarget:
            target = None
        known = target is not None and self.lookup(target.serial) is not None
        if target is not None and not known:
            self._forget(target.serial)
        if target is None or not known or not self.table.online(target.serial):
            self.stats["provisioning_requests_total:unknown_or_offline"] += 1
            if known and target is not None:
                self.recorder.record(target.serial, ip, 404)
            return await self._error(conn, stream, 404)
        if not self.table.begin(target.serial):
            return await self._busy(conn, stream, ip, target.serial)
        try:
            return await self._forward(conn, stream, ip, request, target)
        finally:
            self.table.end(target.serial)

    async def _busy(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                    ip: str, serial: str) -> bool:
        self.stats["provisioning_requests_total:busy"] += 1
        self.recorder.record(serial, ip, 503)
        return await self._error(conn, stream, 503, [(b"retry-after", str(RETRY_AFTER).encode())])

    async def _forward(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                       ip: str, request: h11.Request, target: Target) -> bool:
        link = self.table.pick(target.serial)
        if link is None:
            return await self._busy(conn, stream, ip, target.serial)
        host = dict(request.headers).get(b"host", b"").decode("latin-1")
        fields = [(b":method", request.method), (b":scheme", b"https"),
                  (b":authority", (host or self.settings.realm).encode("latin-1")),
                  (b":path", target.path.encode("ascii")),
                  *request_fields(list(request.headers), self.extra),
                  (b"forwarded", forwarded(ip, host).encode("latin-1"))]
        try:
            exchange = link.open(fields)
        except h2.exceptions.ProtocolError:  # the link is ending under us
            self.recorder.record(target.serial, ip, 502)
            return await self._error(conn, stream, 502)
        status = 502
        try:
            status = await self._relay(conn, stream, exchange, request.method == b"HEAD")
            return True
        except (Aborted, *NETWORK_ERRORS) as e:
            why = str(e) if isinstance(e, Aborted) else "phone_gone"
            # Logged as what it was for the phone: no file. 499 (nginx's "client closed
            # request") when the phone went or stopped reading, 502 when the PBX side failed.
            status = 499 if why in ("phone_gone", "phone_stalled") else 502
            self.stats[f"provisioning_aborted_total:{why}"] += 1
            log.info("event=provisioning_aborted serial=%s client=%s why=%s",
                     target.serial, anonymise(ip), why)
            return False
        finally:
            exchange.close()
            self.stats[f"provisioning_requests_total:{status}"] += 1
            self.recorder.record(target.serial, ip, status)

    async def _relay(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                     exchange: Exchange, head_only: bool) -> int:
        """Carry the PBX's answer to the phone; returns the status the phone got."""
        head: Head | None = None
        status = 504
        with trio.move_on_after(self.settings.response_timeout):
            try:
                head = await exchange.head()
            except (LinkLost, StreamRefused):
                status = 502
        if head is None:
            await self._error(conn, stream, status)
            return status
        length = content_length(head.fields)
        if length is not None and length > self.settings.max_body:
            await self._error(conn, stream, 502)
            return 502
        response = h11.Response(status_code=head.status, headers=response_fields(head.fields),
                                reason=_reason(head.status))
        await self._send(stream, conn.send(response))
        if not head_only:
            await self._body(conn, stream, exchange)
        await self._send(stream, conn.send(h11.EndOfMessage()))
        return head.status

    async def _body(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                    exchange: Exchange) -> None:
        sent = 0
        while True:
            chunk: bytes | None = None
            with trio.move_on_after(self.settings.body_idle_timeout) as idle:
                try:
                    chunk = await exchange.chunk()
                except (LinkLost, StreamRefused):
                    raise Aborted("link_lost") from None
            if idle.cancelled_caught:
                raise Aborted("pbx_idle")
            if chunk is None:
                return
            sent += len(chunk)
            if sent > self.settings.max_body:
                raise Aborted("max_body")
            await self._send(stream, conn.send(h11.Data(data=chunk)))
            exchange.consumed()
            self.stats["provisioning_bytes_total"] += len(chunk)

    async def _send(self, stream: trio.SSLStream[trio.SocketStream], data: bytes | None) -> None:
        if not data:
            return
        with trio.move_on_after(PHONE_WRITE_TIMEOUT) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise Aborted("phone_stalled")

    async def _error(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream], status: int,
                     extra: list[tuple[bytes, bytes]] | None = None) -> bool:
        """The relay's own short answer; True when the connection may carry on."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        body = f"{status} {_reason(status).decode()}\n".encode()
        fields = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                  (b"cache-control", b"no-store"), *(extra or [])]
        try:
            await self._send(stream, conn.send(h11.Response(status_code=status, headers=fields,
                                                            reason=_reason(status))))
            await self._send(stream, conn.send(h11.Data(data=body)))
            await self._send(stream, conn.send(h11.EndOfMessage()))
        except (Aborted, h11.LocalProtocolError, *NETWORK_ERRORS):
            return False
        return status < 500 or status == 503

    def _forget(self, serial: str) -> None:
        """A PBX removed from the directory: its links go."""
        for link in list(self.table.links.get(serial, [])):
            link.link.close("pbx removed")

    # ------------------------------------------------------------------ links
    async def _link(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                    ip: str, request: h11.Request) -> None:
        """A PBX's link: digest handshake, upgrade, then carry streams until it ends."""
        serial = await self._authenticate(conn, stream, ip, request)
        if serial is None:
            return
        if len(self.table.links.get(serial, [])) >= self.table.max_links:
            self.stats["provisioning_links_refused_total"] += 1
            log.info("event=link_refused serial=%s reason=max_links_per_serial", serial)
            await self._error(conn, stream, 429, [(b"retry-after", str(RETRY_AFTER).encode())])
            return
        try:
            upgrade = [(b"upgrade", UPGRADE_TOKEN.encode()), (b"connection", b"Upgrade")]
            await self._send(stream, conn.send(h11.InformationalResponse(status_code=101, headers=upgrade)))
        except (Aborted, *NETWORK_ERRORS):
            return
        initial, _ = conn.trailing_data
        link = PbxLink(serial, stream, self.settings.keepalive, initial)
        self.table.add(serial, link)
        self.stats["provisioning_links_total"] += 1
        log.info("event=link_up serial=%s peer=%s links=%d", serial, ip, len(self.table.links[serial]))
        try:
            await link.run()
        finally:
            self.table.remove(serial, link)
            log.info("event=link_down serial=%s reason=%s", serial, link.link.reason or "closed")

    async def _authenticate(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                            ip: str, request: h11.Request) -> str | None:
        """The serial whose digest this connection proved, None if it did not."""
        for attempt in range(MAX_LINK_AUTH_ATTEMPTS):
            authorization = dict(request.headers).get(b"authorization", b"").decode("latin-1")
            stale = False
            if authorization:
                serial = digest_username(authorization)
                ha1s = self.lookup(serial) if serial else None
                verdict, _ = self.auth.check(authorization, "GET", ha1s, trio.current_time(), bind=ip)
                if verdict == "ok" and serial and auth_params(authorization[7:]).get("uri") == LINK_PATH:
                    return serial
                stale = verdict == "stale"
                if verdict == "fail":
                    self.stats["provisioning_link_auth_failures_total"] += 1
                    log.info("event=link_auth_failed serial=%s", serial)
            challenges = [(b"www-authenticate", c.encode())
                          for c in self.auth.challenges(trio.current_time(), stale=stale, bind=ip)]
            if not await self._error(conn, stream, 401, challenges) or attempt + 1 == MAX_LINK_AUTH_ATTEMPTS:
                return None
            conn.start_next_cycle()
            again = await self._read_request(conn, stream, LINK_HANDSHAKE_TIMEOUT)
            if again is None or not is_link_request(again.method, again.target, list(again.headers)):
                return None
            request = again
        return None

    def counters(self) -> dict[str, int]:
        """For /metrics: what happened, what is open now."""
        online, links = self.table.counts()
        out = dict(self.stats)
        out["provisioning_pbx_online"] = online
        out["provisioning_links_open"] = links
        out["provisioning_connections_open"] = sum(self.connections.values())
        out.update(self.recorder.counters())
        return out


def _head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def serve_provisioning(
    settings: ProvisioningSettings, lookup: Lookup, tls: TlsSource, state_dir: Path, *,
    clock: Callable[[], float] = time.time, threaded_store: bool = True,
    task_status: trio.TaskStatus[ProvisioningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the provisioning port until cancelled.

    ``lookup``: serial → its digest HA1s ({"MD5": ..., "SHA-256": ...}) or None (the
    relay's PBX directory); ``tls``: the server context, or a callable returning the
    current one (so a SIGHUP's new certificate reaches new connections); the access
    log lives in ``state_dir``; ``clock`` is the wall clock its rows and purge use.
    Reports the running :class:`ProvisioningServer` (``.bound``, ``.counters()``)."""
    store = AccessLog(state_dir / ACCESS_LOG_FILE, threaded=threaded_store)
    recorder = AccessRecorder(store, settings.access_log_days, clock, ACCESS_LOG_QUEUE,
                              ACCESS_LOG_BATCH, ACCESS_LOG_PURGE_EVERY)
    server = ProvisioningServer(settings, lookup, tls, recorder)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recorder.run_writer)
            nursery.start_soon(recorder.run_purges)
            for value in settings.listen:
                host, _, port = value.rpartition(":")
                listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]"), backlog=1024)
                for listener in listeners:
                    ip, bound_port = listener.socket.getsockname()[:2]
                    server.bound.append(f"[{ip}]:{bound_port}" if ":" in ip else f"{ip}:{bound_port}")
                nursery.start_soon(trio.serve_listeners, server.serve_connection, listeners)
            task_status.started(server)
    finally:
        store.close()
