"""push/gateways/http2.py's sans-I/O session, driven byte for byte by a server-side
h2 state machine in memory: which answers count, which requests are provably not
processed, which are unknown (RFC 9113 §6.8, §8.7), and its limits."""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hypercorn.trio
import pytest
import trio
from hypercorn.config import Config

from push.gateways.http2 import (
    HEADER_LIST_MAX,
    RESPONSE_BODY_MAX,
    STREAMS_MAX,
    Fate,
    H2Session,
    Http2Client,
    RequestNotProcessed,
    RequestOutcomeUnknown,
)
from tests.pushfakes import _reserve_port, _write_tls_files


class Server:
    """The provider's side of one connection."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        self.received: list[int] = []

    def take(self, session: H2Session) -> None:
        for ev in self.h2.receive_data(session.outgoing()):
            if isinstance(ev, h2.events.StreamEnded) and ev.stream_id is not None:
                self.received.append(ev.stream_id)

    def answer(self, sid: int, status: int = 200, body: bytes = b"") -> None:
        self.h2.send_headers(sid, [(b":status", str(status).encode())], end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)

    def goaway(self, last: int) -> None:
        self.h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=last)
        self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN  # finish streams ≤ last

    def out(self) -> bytes:
        return self.h2.data_to_send()


def connected() -> tuple[H2Session, Server]:
    session, server = H2Session("push.example"), Server()
    server.take(session)
    session.receive(server.out())
    assert session.settings_seen
    return session, server


def post(session: H2Session, body: bytes = b'{"aps":{}}') -> int:
    return session.open(b"/3/device/ab", [(b"content-type", b"application/json")], body).sid


def test_a_200_followed_by_goaway_and_more_answers_in_one_read_all_count() -> None:
    session, server = connected()
    s1, s3, s5 = (session.streams[post(session)] for _ in range(3))
    server.take(session)
    server.answer(s1.sid)
    server.goaway(last=3)  # s5 above last-stream-id: not processed
    server.answer(s3.sid, 410, b'{"reason":"Unregistered"}')  # after the GOAWAY, same read
    ended = session.receive(server.out())
    assert {s.sid for s in ended} == {s1.sid, s3.sid, s5.sid}
    assert s1.response is not None and s1.response.status == 200
    assert s3.response is not None
    assert (s3.response.status, s3.response.body) == (410, b'{"reason":"Unregistered"}')
    assert (s5.response, s5.fate, s5.reason) == (None, Fate.NOT_PROCESSED, "GoAway")
    assert session.draining and not session.has_room()


def test_the_answer_stands_when_the_connection_drops_right_after_it() -> None:
    session, server = connected()
    st = session.streams[post(session)]
    server.take(session)
    server.answer(st.sid)
    session.receive(server.out())
    assert session.lost("ConnectionClosed") == []  # nothing left open
    assert st.response is not None and st.response.status == 200 and st.fate is None


def test_connection_lost_written_is_unknown_unwritten_is_not_processed() -> None:
    session, server = connected()
    written = session.streams[post(session)]
    server.take(session)
    queued = session.streams[post(session)]  # never handed to the transport
    ended = session.lost("ConnectionResetError")
    assert ended == [written, queued]
    assert (written.fate, queued.fate) == (Fate.UNKNOWN, Fate.NOT_PROCESSED)
    assert written.reason == queued.reason == "ConnectionResetError"


@pytest.mark.parametrize(("code", "fate", "reason"), [
    (h2.errors.ErrorCodes.REFUSED_STREAM, Fate.NOT_PROCESSED, "RefusedStream"),
    (h2.errors.ErrorCodes.INTERNAL_ERROR, Fate.UNKNOWN, "StreamReset:INTERNAL_ERROR"),
    (h2.errors.ErrorCodes.CANCEL, Fate.UNKNOWN, "StreamReset:CANCEL"),
])
def test_stream_resets(code: h2.errors.ErrorCodes, fate: Fate, reason: str) -> None:
    session, server = connected()
    st = session.streams[post(session)]
    server.take(session)
    server.h2.reset_stream(st.sid, code)
    assert session.receive(server.out()) == [st]
    assert (st.fate, st.reason) == (fate, reason)


def test_a_reset_after_the_status_keeps_the_status() -> None:
    session, server = connected()
    st = session.streams[post(session)]
    server.take(session)
    server.h2.send_headers(st.sid, [(b":status", b"200")])
    server.h2.reset_stream(st.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
    session.receive(server.out())
    assert st.response is not None and st.response.status == 200 and st.fate is None


def test_bytes_split_anywhere_make_the_same_answers() -> None:
    session, server = connected()
    sids = [post(session) for _ in range(3)]
    streams = [session.streams[s] for s in sids]
    server.take(session)
    for s in sids[:2]:
        server.answer(s, 200)
    server.goaway(last=sids[1])
    data = server.out()
    for i in range(len(data)):  # one byte at a time: frames and a GOAWAY cut in pieces
        session.receive(data[i:i + 1])
    assert [s.response.status if s.response else s.fate for s in streams] == [200, 200, Fate.NOT_PROCESSED]


def test_response_body_is_cut_at_its_limit() -> None:
    session, server = connected()
    exact, over = session.streams[post(session)], session.streams[post(session)]
    server.take(session)
    server.h2.increment_flow_control_window(4 * RESPONSE_BODY_MAX)
    for st, size in ((exact, RESPONSE_BODY_MAX), (over, RESPONSE_BODY_MAX + 1)):
        server.h2.increment_flow_control_window(2 * RESPONSE_BODY_MAX, st.sid)
        server.h2.send_headers(st.sid, [(b":status", b"400")])
        body = b"x" * size
        while body:
            chunk, body = body[:16384], body[16384:]
            server.h2.send_data(st.sid, chunk, end_stream=not body)
            session.receive(server.out())
            server.take(session)  # the client's WINDOW_UPDATEs
    assert exact.response is not None and len(exact.response.body) == RESPONSE_BODY_MAX
    assert over.response is not None and len(over.response.body) == RESPONSE_BODY_MAX


def test_a_body_beyond_the_flow_control_window_waits_for_credit() -> None:
    session, server = connected()
    big = b"{" + b" " * 70_000 + b"}"  # more than the initial 65,535-byte window
    st = session.streams[post(session, big)]
    server.take(session)
    assert server.received == []  # not all of it could go
    server.h2.acknowledge_received_data(65_535, st.sid)
    session.receive(server.out())  # WINDOW_UPDATE: the rest goes
    server.take(session)
    assert server.received == [st.sid]


def test_stream_limit_follows_the_servers_setting() -> None:
    session, server = connected()
    server.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    session.receive(server.out())
    post(session)
    assert session.has_room()
    post(session)
    assert not session.has_room()


# ------------------------------------------------ the trio client against hypercorn


async def test_client_against_hypercorn_closing_connections_every_5_requests(tmp_path: Path) -> None:
    """An independent HTTP/2 server (hypercorn, keep_alive_max_requests = 5: a GOAWAY
    after every fifth request) and 3 × 20 concurrent requests, each sent again while
    'not processed': each one answered was processed exactly once, each 'not
    processed' never, each unknown at most once. (Hypercorn's h2 server state is
    closed once it has sent its GOAWAY, so it leaves some streams at or below
    last-stream-id unanswered and closes the connection: those are the unknowns.)"""
    ca, cert, key = _write_tls_files(tmp_path)
    seen: Counter[str] = Counter()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen[body.decode()] += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    cfg = Config()
    port = _reserve_port()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.certfile, cfg.keyfile = str(cert), str(key)
    cfg.alpn_protocols = ["h2"]
    cfg.keep_alive_max_requests = 5
    cfg.keep_alive_timeout = 0.5  # how soon it closes a connection it stopped answering on
    cfg.errorlog = logging.getLogger("tests.hypercorn")
    cfg.accesslog = None
    client = Http2Client(f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(ca)))
    verdicts: dict[str, str] = {}

    resent = Counter[str]()

    async def one(i: int) -> None:
        name = f"req-{i}"
        while True:  # as the retry policy does: again at once when not processed, else never
            try:
                resp = await client.request("/x", [], name.encode())
                verdicts[name] = f"answered {resp.status}"
            except RequestNotProcessed:
                resent[name] += 1
                assert seen[name] == 0, name
                continue
            except RequestOutcomeUnknown as exc:
                verdicts[name] = f"unknown {exc.reason}"
            return

    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        await nursery.start(partial(hypercorn.trio.serve, app, cfg, shutdown_trigger=shutdown.wait))
        for round_ in range(3):
            async with trio.open_nursery() as senders:
                for i in range(20):
                    senders.start_soon(one, round_ * 20 + i)
        await client.aclose()
        shutdown.set()
    assert len(verdicts) == 60
    for name, verdict in verdicts.items():
        if verdict.startswith("answered"):
            assert (verdict, seen[name]) == ("answered 200", 1), name
        else:
            assert seen[name] <= 1, name
    assert sum(v.startswith("answered") for v in verdicts.values()) >= 15, Counter(verdicts.values())
    assert sum(resent.values()) > 0 and client.connections_opened > 3  # the GOAWAYs happened


def test_at_most_streams_max_streams_whatever_the_server_allows() -> None:
    session, server = connected()
    server.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2 * STREAMS_MAX})
    session.receive(server.out())
    for _ in range(STREAMS_MAX - 1):
        post(session, b"")
    assert session.has_room()  # the 1,000th is accepted
    post(session, b"")
    assert not session.has_room()  # the 1,001st waits


def test_an_oversized_frame_is_refused_when_its_header_arrives() -> None:
    session, _ = connected()
    st = session.streams[post(session)]
    session.outgoing()
    # A DATA frame header announcing 16 MiB - 1 bytes: over the 16,384 we allow.
    ended = session.receive(bytes([0xFF, 0xFF, 0xFF, 0x0, 0x0, 0, 0, 0, 1]) + b"x" * 100)
    assert ended == [st] and st.fate is Fate.UNKNOWN and st.reason.startswith("ProtocolError")
    assert session.draining


def test_an_oversized_header_block_ends_the_connection() -> None:
    session, server = connected()
    st = session.streams[post(session)]
    server.take(session)
    server.h2.send_headers(st.sid, [(b":status", b"200"), (b"x-big", b"v" * (HEADER_LIST_MAX + 1))])
    session.receive(server.out())
    assert st.response is None and st.fate is Fate.UNKNOWN and session.draining
