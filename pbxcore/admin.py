"""The admin HTTP endpoint of both services: a route table on a small trio server (GET and POST, bounded).

Meant for loopback or a management network (no authentication): /metrics, /healthz,
/readyz and a few operator routes. One request per connection (``Connection:
close``), parsed by h11. What a peer can make it hold is bounded:

- :data:`MAX_CONNECTIONS` connections at once (more are answered 503 and closed);
- :data:`MAX_HEAD` bytes of request line and headers (more: 431), :data:`MAX_BODY`
  bytes of body (more: 413);
- :data:`REQUEST_TIMEOUT` seconds to send the whole request (slower: closed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from pbxcore.config import Listen
from pbxcore.errors import ListenError

log = logging.getLogger("pbxcore.admin")

# h11's default buffer (16 KiB) is for the open Internet; an admin request is a
# request line and a few headers: 8 KiB, as Apache's LimitRequestLine/FieldSize.
MAX_HEAD = 8 * 1024
# The largest body an admin route takes (JSON of a few fields).
MAX_BODY = 64 * 1024
# A scraper or an operator command sends its request at once; a peer that trickles
# it must not hold a connection (slowloris).
REQUEST_TIMEOUT = 5.0
# Prometheus scrapes with one connection, operators run a command at a time: 64 at
# once is far above legitimate use and small next to the process's file descriptors.
MAX_CONNECTIONS = 64
RECEIVE_CHUNK = 4096
# After refusing a request early: how long and how much of the rest is read and dropped.
LINGER_TIME = 1.0
LINGER_BYTES = 4 * MAX_BODY
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class AdminRequest:
    """One request as a route sees it."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class AdminAnswer:
    """What a route answers."""

    status: int = 200
    body: str | bytes = ""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, obj: object, status: int = 200) -> AdminAnswer:
        """``obj`` as a JSON body."""
        return cls(status, json.dumps(obj, indent=1) + "\n", "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> AdminAnswer:
        """A one-line plain text body."""
        return cls(status, text if text.endswith("\n") else text + "\n")


Handler = Callable[[AdminRequest], Awaitable[AdminAnswer]]
# (method, path) → handler: ("GET", "/metrics"), ("POST", "/v1/directory/reload").
Routes = Mapping[tuple[str, str], Handler]


class _TooLarge(Exception):
    def __init__(self, status: int):
        self.status = status


async def serve_admin(
    what: str, listen: Listen, routes: Routes,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``listen`` until cancelled; ``task_status`` gets the bound
    "host:port" (port 0 picks one). A bind failure is a :class:`ListenError` naming
    ``what`` ("admin", "push admin") and the address."""
    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as e:
        raise ListenError.from_oserror(what, str(listen), e) from None
    port = listeners[0].socket.getsockname()[1]
    task_status.started(str(Listen(listen.host, port)))
    slots = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            if slots.value == 0:
                await _send(stream, AdminAnswer.text("busy", 503))
                await _linger(stream)  # closing with the request unread would reset the answer away
                return
            async with slots:
                await _handle(stream, routes)
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)


async def _handle(stream: trio.SocketStream, routes: Routes) -> None:
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            request = await _receive(stream)
    except trio.TooSlowError:
        return  # a trickling peer gets nothing but a closed connection
    except _TooLarge as e:
        await _send(stream, AdminAnswer.text(REASONS[e.status], e.status))
        await _linger(stream)
        return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, UnicodeDecodeError):
        await _send(stream, AdminAnswer.text("bad request", 400))
        return
    if request is None:
        return
    await _send(stream, await _answer(request, routes))


async def _receive(stream: trio.SocketStream) -> AdminRequest | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    head: h11.Request | None = None
    body = bytearray()
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                raise _TooLarge(431) from None
            raise
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data and head is None:
                return None
            received += len(data)
            if head is None and received > MAX_HEAD + RECEIVE_CHUNK:
                raise _TooLarge(431)  # still no end of the head
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            # h11 bounds only a head still incomplete; one that arrived whole is measured here.
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if size > MAX_HEAD:
                raise _TooLarge(431)
            head = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY:
                raise _TooLarge(413)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge(413)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if head is None:
        return None
    url = urlsplit(head.target.decode("ascii"))
    return AdminRequest(head.method.decode("ascii"), url.path, dict(parse_qsl(url.query)), bytes(body))


async def _answer(request: AdminRequest, routes: Routes) -> AdminAnswer:
    handler = routes.get((request.method, request.path))
    if handler is None:
        allowed = sorted(m for m, p in routes if p == request.path)
        if allowed:
            return AdminAnswer.text(f"{request.method} not allowed here: {', '.join(allowed)}", 405)
        return AdminAnswer.text("not found", 404)
    try:
        return await handler(request)
    except Exception:
        # A bug in one route costs one answer, never the endpoint (nor the service).
        log.exception("event=admin_route_failed method=%s path=%s", request.method, request.path)
        return AdminAnswer.text("internal error", 500)


async def _linger(stream: trio.SocketStream) -> None:
    """Read and drop what the peer still sends, briefly, before closing: closing with
    unread data makes the kernel send RST, and the peer loses the answer (a lingering
    close, as HTTP servers do after refusing a request early)."""
    try:
        await stream.send_eof()
        with trio.move_on_after(LINGER_TIME):
            dropped = 0
            while dropped < LINGER_BYTES and (chunk := await stream.receive_some(RECEIVE_CHUNK)):
                dropped += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _send(stream: trio.SocketStream, answer: AdminAnswer) -> None:
    data = answer.body.encode() if isinstance(answer.body, str) else answer.body
    reason = REASONS.get(answer.status, "")
    head = (f"HTTP/1.1 {answer.status} {reason}\r\nContent-Type: {answer.content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    try:
        await stream.send_all(head.encode() + data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
