"""A PBX that stops reading for a while keeps its connection and gets every message;
how a flow's writes are grouped."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time

import trio
from trio.testing import MemorySendStream

from relay.proxy.flow import Flow
from relay.transport.flows import TLS_RECORD, Connection
from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import HOST, SERIAL, Pbx, assert_healthy, request, udp_socket

# ~1.4 MB: what a PBX receives in 2 s at ~250 calls/s; the old 512-message queue dropped it
MESSAGES = 1500
# While it pauses, the PBX's receive buffer is shrunk so that the pause bites: the
# relay's kernel buffers fill and the relay must queue ~1 MB itself.
PAUSED_RCVBUF = 4096
# Once it reads again it is an ordinary PBX. Left at 4 KiB, its window (5 KiB, less
# than half the 64 KiB it advertised at first) keeps the relay's kernel in sender-side
# silly-window avoidance (RFC 1122 §4.2.3.4): one window per 200 ms persist tick,
# ~25 KB/s, ~50 s for these 1.25 MB — that, not a loss, was the old flake (tshark:
# "[TCP Window Full]" 5120 bytes every 208 ms, every message on the wire in the end).
READING_RCVBUF = 1 << 20


def test_pbx_pausing_two_seconds_under_load_is_not_disconnected(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    pbx.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAUSED_RCVBUF)
    body = b"x" * 400
    with udp_socket() as phone:
        local = phone.getsockname()
        t0 = time.monotonic()
        for n in range(MESSAGES):  # stateless MESSAGEs: each one is forwarded to the PBX
            phone.sendto(request("MESSAGE", f"sip:100@{SERIAL}.{DOMAIN}", local=local, call_id=f"m{n}",
                                 extra=["Content-Type: text/plain"], body=body), (HOST, relay.udp))
            if n % 200 == 199:
                time.sleep(0.01)  # stay within the relay's UDP receive buffer
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))  # the PBX has not read for 2 s
    pbx.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READING_RCVBUF)
    got: list[str] = []
    deadline = time.monotonic() + 20
    while len(got) < MESSAGES and time.monotonic() < deadline:
        m = pbx.stream.recv(timeout=2)
        if m is None:
            break
        if m.start.startswith("MESSAGE "):
            got.append(m.get("call-id") or "")
    metrics = relay.metrics()
    assert len(got) == MESSAGES, f"the PBX got {len(got)} of {MESSAGES}: {metrics}"
    assert got == [f"m{n}@test" for n in range(MESSAGES)]  # in order, none twice
    assert metrics.get("pbx_relay_messages_unsent_total", 0) == 0
    pbx.assert_bound()
    assert relay.metric('pbx_relay_pbx_unregistered_total{reason="flow_closed"}') == 0
    assert not select.select([pbx.stream.sock], [], [], 0)[0] or pbx.stream.recv(0.1) is None
    assert_healthy(relay)


def test_pbx_that_never_reads_is_closed_and_the_relay_says_what_it_did_not_deliver(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    pbx.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAUSED_RCVBUF)
    body = b"x" * 60_000  # a large MESSAGE per datagram: ~10 MB, past every buffer and the 2 MiB queue
    sent = 0
    with udp_socket() as phone:
        local = phone.getsockname()
        deadline = time.monotonic() + 30
        while relay.metric("pbx_relay_flows_open") and time.monotonic() < deadline:
            for _ in range(20):
                phone.sendto(request("MESSAGE", f"sip:100@{SERIAL}.{DOMAIN}", local=local,
                                     call_id=f"big{sent}", extra=["Content-Type: text/plain"], body=body),
                             (HOST, relay.udp))
                sent += 1
            time.sleep(0.05)
    metrics = relay.metrics()
    assert metrics.get("pbx_relay_flows_open") == 0, f"the relay kept a PBX that reads nothing: {metrics}"
    unsent = metrics.get("pbx_relay_messages_unsent_total", 0)
    assert unsent >= 1, metrics
    assert "event=flow_overflow" in relay.log() and "event=flow_closed_unsent" in relay.log()
    # Every message the proxy counted as forwarded either reached the PBX whole, or the
    # relay says it did not write it (unsent), or refused it once the flow was gone.
    pbx.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READING_RCVBUF)
    whole = 0
    while (m := pbx.stream.recv(timeout=5)) is not None:
        whole += m.start.startswith("MESSAGE ")
    assert pbx.stream.eof
    forwarded = metrics["pbx_relay_requests_forwarded_total"]
    gone = metrics.get('pbx_relay_dropped_total{reason="flow_gone"}', 0)
    assert whole + unsent + gone == forwarded, (whole, unsent, gone, metrics)
    assert_healthy(relay)


def _segments_to(port: int) -> int:
    """TCP segments the relay sent on its connection to the PBX at local ``port``
    (``ss -ti``'s segs_out of the relay's end: what went on the wire, counted by the kernel)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    counts = [int(m) for m in re.findall(r"\bsegs_out:(\d+)", out)]
    assert len(counts) == 1, out
    return counts[0]


def test_a_udp_batch_for_one_pbx_goes_out_in_one_write_in_order(relay: RelayProc) -> None:
    """Datagrams the relay reads in one batch (here: ten, sent while it was stopped) reach
    the PBX's connection in one write — one TCP segment, not ten — whole and in order."""
    pbx = Pbx(relay)
    assert relay.proc is not None
    port = pbx.stream.local[1]
    before = _segments_to(port)
    with udp_socket() as phone:
        local = phone.getsockname()
        os.kill(relay.proc.pid, signal.SIGSTOP)
        try:
            for n in range(10):
                phone.sendto(request("MESSAGE", f"sip:100@{SERIAL}.{DOMAIN}", local=local, call_id=f"b{n}",
                                     extra=["Content-Type: text/plain"], body=b"hello"), (HOST, relay.udp))
        finally:
            os.kill(relay.proc.pid, signal.SIGCONT)
    got = []
    while len(got) < 10 and (m := pbx.stream.recv(timeout=5)) is not None:
        if m.start.startswith("MESSAGE "):
            got.append(m.get("call-id"))
    assert got == [f"b{n}@test" for n in range(10)]
    assert _segments_to(port) - before == 1
    assert_healthy(relay)


async def test_a_tls_flows_queued_messages_leave_in_record_sized_writes(nursery: trio.Nursery) -> None:
    """A TLS flow's writer (and a node link's) joins what is queued into writes of at most
    one TLS record (2^14 bytes): all arrive once, in order, and each message's bytes stay
    in one write, so a write that fails leaves whole messages counted unwritten."""
    stream = MemorySendStream()
    writes: list[bytes] = []

    async def record() -> None:
        writes.append(stream.get_data_nowait())

    stream.send_all_hook = record
    conn = Connection(stream, Flow("tls", "192.0.2.7", 5061, "127.0.0.1", 5061))  # no fd: TLS
    messages = [f"MESSAGE sip:{n} SIP/2.0\r\n".encode() + b"x" * 1000 for n in range(40)]
    for m in messages:
        assert conn.send(m)
    assert conn.pending == 40
    conn.start(nursery)
    await conn.wait_flushed()
    assert b"".join(writes) == b"".join(messages)
    assert len(writes) == 3  # 16 + 16 + 8 messages of ~1 KB
    assert all(len(w) <= TLS_RECORD for w in writes)
    assert all(w.startswith(b"MESSAGE ") for w in writes)  # whole messages only
    assert (conn.pending, conn.queued) == (0, 0)
