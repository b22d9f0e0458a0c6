"""Loopback HTTP endpoint: /metrics (Prometheus text), /registry (live PBX bindings), /healthz, /readyz."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import trio

log = logging.getLogger("relay.admin")

MAX_REQUEST = 8192
STATUS_LINES = {200: "200 OK", 503: "503 Service Unavailable"}
# A route answers (content type, body), or (content type, body, status) for other than 200.
Route = Callable[[], tuple[str, str] | tuple[str, str, int]]


async def serve_admin(
    host: str, port: int, routes: dict[str, Route],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A deliberately tiny HTTP/1.0-style server: GET only, one request per connection."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        line = buf.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(line) < 2 or line[0] != "GET":
            status, ctype, body = "405 Method Not Allowed", "text/plain", "GET only\n"
        elif line[1].split("?")[0] in routes:
            answer = routes[line[1].split("?")[0]]()
            ctype, body = answer[0], answer[1]
            status = STATUS_LINES[answer[2] if len(answer) == 3 else 200]
        else:
            status, ctype, body = "404 Not Found", "text/plain", "not found\n"
        data = body.encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            await stream.send_all(head.encode() + data)
        except trio.BrokenResourceError:
            pass
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def as_json(obj: object) -> tuple[str, str]:
    return "application/json", json.dumps(obj, indent=1) + "\n"
