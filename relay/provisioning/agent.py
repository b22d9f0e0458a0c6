"""``pbx-relay link``: the PBX side of the link, forwarding the relay's requests to the PBX's web server.

It runs next to (or inside) the PBX: opens TLS to the relay's provisioning port,
authenticates with the PBX's serial and secret (the handshake of
:mod:`relay.provisioning.handshake`), then serves HTTP/2 on that connection — each
stream the relay opens is one phone's GET, fetched from the PBX's local provisioning
URL with httpx and streamed back within the relay's flow-control windows. When the
link ends it comes back after a backoff (:func:`relay.provisioning.policy.reconnect_delay`).
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import httpx
import trio

from relay.provisioning.forwarding import end_to_end, response_fields, safe_path
from relay.provisioning.handshake import LINK_PATH, authorization, choose_challenge, link_request
from relay.provisioning.limits import (
    LINK_HANDSHAKE_TIMEOUT,
    MAX_REQUEST_HEAD,
    MAX_RESPONSE_HEAD,
    MAX_STREAMS_PER_LINK,
    RECEIVE_SIZE,
)
from relay.provisioning.link import NETWORK_ERRORS, Link
from relay.provisioning.policy import LINK_STABLE, KeepaliveTimes, reconnect_delay

log = logging.getLogger("relay.provisioning.agent")

# Seconds the PBX's web server has to start answering. Longer than the relay's
# default response_timeout (30 s): the relay's 504 is the answer a phone should get.
LOCAL_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0  # seconds to reach the relay (TCP and TLS)


class LinkRefused(Exception):
    """The relay would not take the link (wrong secret, too many links, not a relay)."""


@dataclass(frozen=True)
class AgentSettings:
    """What the agent needs: where the relay is, who the PBX is, where its files are."""

    relay_host: str
    relay_port: int
    serial: str
    secret: str = field(repr=False)
    target: str  # the PBX's provisioning base URL, e.g. http://127.0.0.1:8080/provisioning
    ca_file: str | None = None  # the relay's certificate or CA (None: the system's)
    server_name: str | None = None  # the name to check the relay's certificate for
    target_ca: str | None = None  # CA of an https target (None: the system's)
    keepalive: KeepaliveTimes = KeepaliveTimes(20.0, 10.0)
    max_streams: int = MAX_STREAMS_PER_LINK

    def tls_context(self) -> ssl.SSLContext:
        """Client context checking the relay's certificate (TLS 1.2+)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


class AgentLink:
    """The agent's end of one link: the HTTP/2 server answering the relay's streams."""

    def __init__(self, settings: AgentSettings, stream: trio.abc.Stream, client: httpx.AsyncClient,
                 initial: bytes = b""):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.update_settings({  # applied on our side once the relay acknowledges them
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2 * MAX_REQUEST_HEAD,
        })
        self.settings = settings
        self.client = client
        self.link = Link(stream, conn, settings.keepalive, f"agent:{settings.serial}", initial)
        self.scopes: dict[int, trio.CancelScope] = {}
        self._window = trio.Event()
        self.served = 0

    def on_event(self, event: h2.events.Event) -> None:
        """Requests start a task; resets cancel it; window updates wake senders."""
        if isinstance(event, h2.events.RequestReceived):
            scope = trio.CancelScope()
            self.scopes[event.stream_id] = scope
            self.link.start_soon(self._serve, event.stream_id, list(event.headers), scope)
        elif isinstance(event, h2.events.StreamReset):
            cancelled = self.scopes.pop(event.stream_id, None)
            if cancelled is not None:
                cancelled.cancel()
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged,
                              h2.events.StreamReset)):
            self._window.set()
            self._window = trio.Event()

    def on_lost(self) -> None:
        """Nothing to do: the link's tasks (the requests too) end with it."""

    async def run(self) -> None:
        """Serve streams until the link ends."""
        await self.link.run(self)

    async def _serve(self, stream_id: int, fields: list[tuple[bytes, bytes]],
                     scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self._answer(stream_id, fields)
            except h2.exceptions.StreamClosedError:
                pass  # the relay reset it meanwhile
        self.scopes.pop(stream_id, None)

    async def _answer(self, stream_id: int, fields: list[tuple[bytes, bytes]]) -> None:
        head = dict(fields)
        method = head.get(b":method", b"")
        path = head.get(b":path", b"").decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            self._respond(stream_id, 405)
            return
        if not safe_path(path):
            self._respond(stream_id, 404)
            return
        headers = end_to_end(fields)
        if not any(n == b"accept-encoding" for n, _ in headers):
            headers.append((b"accept-encoding", b"identity"))  # else httpx would ask for gzip
        url = self.settings.target.rstrip("/") + path
        sent = False
        try:
            async with self.client.stream(method.decode(), url, headers=headers) as resp:
                # The relay's allow-list here already: a web server's big cookies or
                # odd fields never cross the link (nor risk its header size limit).
                reply = [(b":status", str(resp.status_code).encode()), *response_fields(resp.headers.raw)]
                if sum(len(n) + len(v) + 32 for n, v in reply) > MAX_RESPONSE_HEAD:
                    self._respond(stream_id, 502)
                    return
                self.link.conn.send_headers(stream_id, reply, end_stream=method == b"HEAD")
                sent = True
                self.link.kick()
                if method == b"HEAD":
                    return
                # A reset mid-body cancels this loop; httpx's inner async generators
                # are then finalised by trio with a ResourceWarning (encode/httpx#3686).
                async for chunk in resp.aiter_raw():
                    await self._send(stream_id, chunk)
        except httpx.HTTPError as e:
            log.warning("event=local_fetch_failed error=%s", type(e).__name__)
            if not sent:
                self._respond(stream_id, 502)
            else:
                self.link.conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                self.link.kick()
            return
        self.link.conn.end_stream(stream_id)
        self.link.kick()
        self.served += 1

    def _respond(self, stream_id: int, status: int) -> None:
        self.link.conn.send_headers(stream_id, [(b":status", str(status).encode()),
                                                (b"content-length", b"0")], end_stream=True)
        self.link.kick()

    async def _send(self, stream_id: int, data: bytes) -> None:
        """Send ``data`` on the stream as the relay's windows allow."""
        conn = self.link.conn
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                await self._window.wait()
                continue
            conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self.link.kick()
        await trio.lowlevel.checkpoint()


async def open_link(settings: AgentSettings) -> tuple[trio.SSLStream[trio.SocketStream], bytes]:
    """Connect, authenticate and upgrade: the TLS stream, now HTTP/2, and any bytes
    of it already read. Raises LinkRefused, or a network error."""
    with trio.fail_after(CONNECT_TIMEOUT):
        tcp = await trio.open_tcp_stream(settings.relay_host, settings.relay_port)
    stream = trio.SSLStream(tcp, settings.tls_context(),
                            server_hostname=settings.server_name or settings.relay_host)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await stream.do_handshake()
        return stream, await _upgrade(settings, stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _upgrade(settings: AgentSettings, stream: trio.SSLStream[trio.SocketStream]) -> bytes:
    """The handshake on a fresh TLS connection; the bytes read past the 101."""
    conn = h11.Connection(h11.CLIENT)
    host = f"{settings.server_name or settings.relay_host}:{settings.relay_port}"
    auth: str | None = None
    with trio.fail_after(LINK_HANDSHAKE_TIMEOUT):
        for _ in range(2):
            request = h11.Request(method="GET", target=LINK_PATH, headers=link_request(host, auth))
            await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            response = await _response(conn, stream)
            if response.status_code == 101:
                return conn.trailing_data[0]
            if response.status_code != 401:
                raise LinkRefused(f"relay answered {response.status_code}")
            challenge = choose_challenge([v.decode("latin-1") for n, v in response.headers
                                          if n == b"www-authenticate"])
            if challenge is None or auth is not None:
                raise LinkRefused("relay refused the serial and secret" if auth else "no usable challenge")
            auth = authorization(challenge, settings.serial, settings.secret, "GET", LINK_PATH)
            await _rest_of_message(conn, stream)
            conn.start_next_cycle()
    raise LinkRefused("relay refused the serial and secret")


async def _response(conn: h11.Connection,
                    stream: trio.abc.Stream) -> h11.Response | h11.InformationalResponse:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise trio.BrokenResourceError("relay closed the connection")
            conn.receive_data(bytes(data))
        elif isinstance(event, (h11.Response, h11.InformationalResponse)):
            return event
        else:
            raise LinkRefused(f"unexpected {type(event).__name__}")


async def _rest_of_message(conn: h11.Connection, stream: trio.abc.Stream) -> None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
        elif isinstance(event, h11.EndOfMessage):
            return
        elif not isinstance(event, h11.Data):
            raise LinkRefused(f"unexpected {type(event).__name__}")


def local_client(settings: AgentSettings) -> httpx.AsyncClient:
    """The client for the PBX's web server: no proxy from the environment, no
    redirects followed (the phone gets them), none of httpx's default headers."""
    client = httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=settings.target_ca) if settings.target_ca else True,
        timeout=httpx.Timeout(LOCAL_TIMEOUT, connect=CONNECT_TIMEOUT),
        limits=httpx.Limits(max_connections=settings.max_streams, max_keepalive_connections=8),
        follow_redirects=False, trust_env=False,
    )
    for name in list(client.headers.keys()):
        del client.headers[name]
    return client


async def run_agent(settings: AgentSettings, rng: random.Random | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Keep a link up until cancelled: connect, serve, and after any end, wait and again."""
    if urlsplit(settings.target).scheme not in ("http", "https"):
        raise ValueError(f"target {settings.target!r} is not an http(s) URL")
    rng = rng or random.Random()
    # httpx logs each request's URL at INFO: paths name devices, queries carry tokens.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    failures = 0
    task_status.started()
    async with local_client(settings) as client:
        while True:
            started = trio.current_time()
            why = await _one_link(settings, client)
            failures = 1 if trio.current_time() - started >= LINK_STABLE else failures + 1
            delay = reconnect_delay(failures, rng)
            log.info("event=link_retry in=%.1f reason=%s", delay, why)
            await trio.sleep(delay)


async def _one_link(settings: AgentSettings, client: httpx.AsyncClient) -> str:
    """One link, from connecting to its end; returns why it ended."""
    try:
        stream, initial = await open_link(settings)
    except LinkRefused as e:
        log.warning("event=link_refused relay=%s:%d reason=%s", settings.relay_host, settings.relay_port, e)
        return str(e)
    except (trio.TooSlowError, *NETWORK_ERRORS) as e:
        log.info("event=link_failed relay=%s:%d error=%s", settings.relay_host, settings.relay_port,
                 type(e).__name__)
        return type(e).__name__
    link = AgentLink(settings, stream, client, initial)
    log.info("event=link_up relay=%s:%d serial=%s", settings.relay_host, settings.relay_port, settings.serial)
    await link.run()
    log.info("event=link_down reason=%s served=%d", link.link.reason or "closed", link.served)
    return link.link.reason or "closed"
