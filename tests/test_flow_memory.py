"""What an idle TCP/TLS flow keeps (issue 13: memory per PBX phoned home): once a
message is handled and its answer written, the connection holds neither of them, and
no writer task - only its reader waits."""

from __future__ import annotations

import gc
import ssl
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.message import SipMessage
from relay.transport.events import EventHandlers
from relay.transport.flows import Transports
from relay.transport.limits import StreamTimeouts
from relay.transport.tlscert import ensure_self_signed, server_context

CALL_ID = "idle-flow-memory@test"
REQUEST = (
    "OPTIONS sip:relay.test SIP/2.0\r\n"
    "Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-idle\r\n"
    "From: <sip:pbx@relay.test>;tag=1\r\n"
    "To: <sip:relay.test>\r\n"
    f"Call-ID: {CALL_ID}\r\n"
    "CSeq: 1 OPTIONS\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
).encode()


def _tasks(nursery: trio.Nursery) -> list[trio.lowlevel.Task]:
    out: list[trio.lowlevel.Task] = []
    for task in nursery.child_tasks:
        out.append(task)
        for child in task.child_nurseries:
            out += _tasks(child)
    return out


def _messages_with_our_call_id() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, SipMessage) and CALL_ID.encode() in o.serialise())


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_an_idle_flow_keeps_no_message_and_no_writer(transport: str, tmp_path: Path) -> None:
    # The answer is a fresh bytes object: its reference count says whether the relay still holds it.
    answer = bytes(bytearray(f"SIP/2.0 200 OK\r\nCall-ID: {CALL_ID}\r\nContent-Length: 0\r\n\r\n".encode()))
    refs_before = sys.getrefcount(answer)
    seen: list[Flow] = []

    def on_message(msg: SipMessage, flow: Flow) -> None:
        seen.append(flow)
        assert transports.send(flow, answer)  # on TLS: queued, written by a writer task

    def on_error(err: SipParseError, flow: Flow) -> None:
        raise AssertionError(err)

    transports = Transports(EventHandlers(on_message, on_error, lambda name, n: None))
    ctx = None
    if transport == "tls":
        ctx = server_context(*ensure_self_signed(tmp_path, "relay.test", ["127.0.0.1"]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(transports.serve_stream, transport, "127.0.0.1", 0, ctx)
        client: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if transport == "tls":
            cctx = ssl.create_default_context()
            cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
            client = trio.SSLStream(client, cctx, server_hostname="relay.test")
        await client.send_all(REQUEST)
        got = b""
        with trio.fail_after(5):
            while not got.endswith(b"\r\n\r\n"):
                got += await client.receive_some(4096)
        assert got == answer and len(seen) == 1
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        # The answer was written and let go of; the request is parsed and let go of.
        assert sys.getrefcount(answer) == refs_before
        assert _messages_with_our_call_id() == 0
        conn = transports.conns[seen[0]]
        assert conn.queued == conn.pending == 0
        # One task per connection, its reader: no writer waits on an idle flow.
        names = [t.name for t in _tasks(nursery)]
        assert not [n for n in names if "_write" in n], names
        # The flow still works both ways: a second request gets its answer (a new writer on TLS).
        await client.send_all(REQUEST)
        got = b""
        with trio.fail_after(5):
            while not got.endswith(b"\r\n\r\n"):
                got += await client.receive_some(4096)
        assert got == answer and len(seen) == 2
        await client.aclose()
        with trio.fail_after(5):
            while transports.conns:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("sent", "reason"), [(b"", "idle"), (REQUEST[:40], "partial_message")])
async def test_a_silent_flow_is_closed_at_its_timeout_and_counted(sent: bytes, reason: str) -> None:
    """The read timeout lives on the flow's own cancel scope (no scope per read): a flow
    silent for ``idle``, or holding half a message for ``partial``, is closed then - not
    before - and counted by reason; a flow that talks stays open."""
    counted: list[str] = []
    transports = Transports(
        EventHandlers(lambda m, f: None, lambda e, f: None, lambda name, n: counted.append(name)),
        timeouts=StreamTimeouts(idle=0.6, partial=0.3),
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(transports.serve_stream, "tcp", "127.0.0.1", 0, None)
        t0 = trio.current_time()  # before connecting: the relay's clock starts at its accept, after this
        quiet = await trio.open_tcp_stream("127.0.0.1", port)
        talker = await trio.open_tcp_stream("127.0.0.1", port)
        await quiet.send_all(sent)
        closed_at: list[float] = []

        async def watch() -> None:
            assert await quiet.receive_some(16) == b""  # closed by the relay
            closed_at.append(trio.current_time() - t0)

        nursery.start_soon(watch)
        while trio.current_time() < t0 + 1.2:  # the talker pings every 0.1 s: never silent
            await talker.send_all(b"\r\n\r\n")
            assert await talker.receive_some(16) == b"\r\n"
            await trio.sleep(0.1)
        expected = 0.6 if reason == "idle" else 0.3
        assert len(closed_at) == 1 and expected <= closed_at[0] < expected + 0.4, closed_at
        assert f"flows_closed_total:{reason}" in counted
        assert len(transports.conns) == 1  # the talker's flow is still open
        nursery.cancel_scope.cancel()
