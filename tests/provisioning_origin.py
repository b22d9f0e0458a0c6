"""A PBX's provisioning web server for the tests: Python's http.server on a directory, plus
a few paths that misbehave on purpose.

    python tests/provisioning_origin.py DIR HOST PORT

- ``/files/<name>``: the file DIR/<name> (http.server's own handler: GET, HEAD,
  Last-Modified, If-Modified-Since, Content-Type);
- ``/echo``: 200, the request's header fields as JSON (what reached the PBX);
- ``/slow/<seconds>``: waits, then 200 "late";
- ``/cut/<bytes>``: announces 1 MB, sends <bytes> of it, then waits 60 s (a body
  that stops half-way);
- ``/big/<megabytes>``: that many MB generated on the fly (a firmware image that
  exists on no disk), Content-Length set.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

BLOCK = bytes(range(256)) * 256  # 64 KiB of a pattern a test can check


class Handler(SimpleHTTPRequestHandler):
    """The provisioning server's paths."""

    protocol_version = "HTTP/1.1"
    # Head and body in one write, sent at once: unbuffered writes on a keep-alive
    # connection meet Nagle and delayed ACKs (40 ms a request on Linux).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
        sys.stderr.write(f"origin: {self.command} {self.path}\n")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        route, _, arg = self.path.partition("?")[0].lstrip("/").partition("/")
        if route == "files":
            self.path = "/" + arg
            super().do_GET()
        elif route == "echo":
            self._reply(200, json.dumps(dict(self.headers.items()) | {"_path": self.path}).encode())
        elif route == "slow":
            time.sleep(float(arg))
            self._reply(200, b"late\n")
        elif route == "cut":
            self.send_response(200)
            self.send_header("Content-Length", str(1_000_000))
            self.end_headers()
            self.wfile.write(b"x" * int(arg))
            self.wfile.flush()
            time.sleep(60)
        elif route == "big":
            self._big(int(arg))
        else:
            self._reply(404, b"no such file\n")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        route, _, arg = self.path.lstrip("/").partition("/")
        if route == "files":
            self.path = "/" + arg
            super().do_HEAD()
        else:
            self._reply(405, b"")

    def _big(self, megabytes: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(megabytes * 16 * len(BLOCK)))
        self.end_headers()
        for _ in range(megabytes * 16):
            self.wfile.write(BLOCK)

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    """Serve until killed."""
    directory, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ThreadingHTTPServer.request_queue_size = 1024  # 100 clients connect at once (the default is 5)
    server = ThreadingHTTPServer((host, port), partial(Handler, directory=directory))
    server.daemon_threads = True
    print(f"origin listening {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
