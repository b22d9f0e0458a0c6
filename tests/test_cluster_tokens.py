"""Tokens that name their node (docs/cluster.md): `pbx-relay run --workers 2` and a real redis-server.

A phone registers through worker X, where the PBX is connected (its Path entry is X's
token, naming X). The PBX's connection breaks and it reconnects: the kernel gives the new
connection to worker Y. Its INVITE along the phone's Path reaches Y, which reads X's
id in the token and sends the request over the link to X without asking Redis which node
holds anything; X delivers it to the phone. The answer, the ACK and the BYE follow the
route set both nodes recorded. With X gone, the same INVITE gets 430 Flow Failed.
Plain sockets play the PBX (TCP) and the phone (UDP).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import redisfixture
from tests.realpeers import DOMAIN
from tests.redisfixture import RedisServer
from tests.sipclient import Msg, Pbx, drain, parse, request
from tests.test_cluster_cache import commands
from tests.test_cluster_nodes import SERIAL, redis_cli, wait_for
from tests.test_workers import Parent, ready_, start_workers, stop_workers, worker_of_source

redis_server = redisfixture.redis_server  # the fixture, by name
AOR = f"sip:201@{SERIAL}.{DOMAIN}"


@pytest.fixture
def two_workers(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Parent, RedisServer]]:
    parent = start_workers(tmp_path, redis_server, 2)
    try:
        yield parent, redis_server
    finally:
        stop_workers(parent)


def worker_of_pbx(parent: Parent, pbx: Pbx) -> int:
    port = pbx.stream.local[1]
    for _ in range(100):
        for i, w in enumerate(parent.workers):
            if any(r["serial"] == SERIAL and r["port"] == port for r in w.registry()):
                return i
        time.sleep(0.05)
    raise AssertionError("the PBX's registration is on no worker")


def pbx_on_worker(parent: Parent, want: int) -> Pbx:
    """A PBX connection (new source port each time) until the kernel gives one to ``want``."""
    for _ in range(64):
        pbx = Pbx(parent.workers[0])
        if worker_of_pbx(parent, pbx) == want:
            return pbx
        pbx.stream.close()
    raise AssertionError(f"64 connections, none on worker {want}")


def answer(msg: Msg, status: str, to_tag: str, extra: list[str] | None = None) -> bytes:
    """A UAS's response: the Vias, Record-Routes, From, Call-ID and CSeq copied."""
    lines = [f"SIP/2.0 {status}"]
    for name in ("via", "record-route", "path", "from", "call-id", "cseq"):
        lines += [f"{name.title()}: {v}" for v in msg.get_all(name)]
    to = msg.get("to") or ""
    lines += [f"To: {to}" + ("" if "tag=" in to else f";tag={to_tag}"), *(extra or []), "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def from_tag(data: bytes, tag: str) -> bytes:
    """The same From tag on every request of the dialog (sipclient.request draws one)."""
    return re.sub(rb"(\r\nFrom: [^\r]*;tag=)[0-9a-f]+", rb"\g<1>" + tag.encode(), data, count=1)


def received(sock: socket.socket, method_or_status: str) -> Msg:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for raw in drain(sock, 0.2):
            msg = parse(raw)
            if msg.start.startswith(method_or_status) or f" {method_or_status} " in f"{msg.start} ":
                return msg
    raise AssertionError(f"no {method_or_status}")


def from_pbx(pbx: Pbx, status: int) -> Msg:
    while True:
        msg = pbx.stream.recv(5.0)
        assert msg is not None, f"no {status} for the PBX"
        if msg.status == status:
            return msg


def register_phone(phone: socket.socket, pbx: Pbx) -> str:
    """The phone's REGISTER through the PBX's worker; the PBX answers; the Path it saw."""
    port = phone.getsockname()[1]
    phone.sendto(request("REGISTER", f"sip:{SERIAL}.{DOMAIN}", local=("127.0.0.1", port), to=f"<{AOR}>",
                         from_=f"<{AOR}>", extra=[f"Contact: <sip:201@127.0.0.1:{port}>", "Expires: 600"]),
                 ("127.0.0.1", pbx.relay.udp))
    reg = pbx.stream.recv(5.0)
    assert reg is not None and reg.start.startswith("REGISTER"), reg
    (path,) = reg.get_all("path")
    pbx.stream.send(answer(reg, "200 OK", "reg1", [f"Contact: <sip:201@127.0.0.1:{port}>;expires=600"]))
    assert received(phone, "200").status == 200
    return path


def phone_port_on(parent: Parent, want: int) -> int:
    """A UDP source port the kernel gives to worker ``want``."""
    for _ in range(64):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
        probe.close()
        if worker_of_source(parent, port) == want:
            return port
    raise AssertionError(f"64 source ports, none on worker {want}")


def phone_of_x_pbx_on_y(parent: Parent, redis: RedisServer, phone: socket.socket) -> tuple[int, Pbx, str]:
    """The phone registers through X, where the PBX is; the PBX's connection breaks and
    its new one lands on Y. (X, the PBX on Y, the phone's Path.)"""
    first = Pbx(parent.workers[0])
    x = worker_of_pbx(parent, first)
    phone.bind(("127.0.0.1", phone_port_on(parent, x)))
    path = register_phone(phone, first)
    first.stream.close()  # X releases its claim
    wait_for("X's release", lambda: redis_cli(redis, "EXISTS", f"pbxrelay:pbx:{SERIAL}") == "0")
    pbx = pbx_on_worker(parent, 1 - x)
    wait_for("Y's claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node")
             == f"edge-w{1 - x}")
    return x, pbx, path


def test_the_pbx_reconnected_to_another_worker_reaches_a_phone_of_the_first_without_a_lookup(
    two_workers: tuple[Parent, RedisServer],
) -> None:
    parent, redis = two_workers
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        x, pbx, path = phone_of_x_pbx_on_y(parent, redis, phone)
        y, port = 1 - x, phone.getsockname()[1]

        redis_cli(redis, "CONFIG", "RESETSTAT")
        ip, pport = pbx.stream.local
        contact = f"Contact: <sip:100@{ip}:{pport};transport=tcp>"
        pbx.stream.send(from_tag(request(
            "INVITE", f"sip:201@127.0.0.1:{port}", transport="TCP", local=(ip, pport), to=f"<{AOR}>",
            from_=f"<sip:100@{SERIAL}.{DOMAIN}>", call_id="tok-call", extra=[f"Route: {path}", contact]),
            "pbx1"))
        invite = received(phone, "INVITE")
        phone.sendto(answer(invite, "200 OK", "ph1", [f"Contact: <sip:201@127.0.0.1:{port}>"]),
                     ("127.0.0.1", parent.workers[0].udp))
        ok = from_pbx(pbx, 200)
        assert commands(redis, "hmget") == 0  # nobody asked which node holds the PBX
        assert parent.workers[y].metric('pbx_relay_cluster_node_links_total{link="open"}') + \
            parent.workers[y].metric('pbx_relay_cluster_node_links_total{link="opened"}') == 1
        assert parent.workers[y].metric("pbx_relay_flow_failed_total") == 0

        # ACK and BYE from the PBX along the route set: Y, the link, X, the phone.
        route = f"Route: {', '.join(reversed(ok.get_all('record-route')))}"
        to = ok.get("to") or ""
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            pbx.stream.send(from_tag(request(
                method, f"sip:201@127.0.0.1:{port}", transport="TCP", local=(ip, pport), to=to,
                from_=f"<sip:100@{SERIAL}.{DOMAIN}>", call_id="tok-call", cseq=cseq, extra=[route]),
                "pbx1"))
            got = received(phone, method)
            assert got.get("call-id") == "tok-call@test"
        phone.sendto(answer(got, "200 OK", "ph1"), ("127.0.0.1", parent.workers[0].udp))
        assert from_pbx(pbx, 200).get("cseq") == "2 BYE"
        pbx.stream.close()


def worker_pid(parent: Parent, index: int) -> int:
    for pid in parent.children():
        if f"{index}/2" in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
            return pid
    raise AssertionError(f"no worker {index}")


def test_a_token_naming_a_worker_that_is_gone_gets_430_flow_failed(
    two_workers: tuple[Parent, RedisServer],
) -> None:
    """Worker X dies and is not started again (its parent stopped): once its heartbeat
    expired, Y answers the PBX's INVITE along X's Path 430 Flow Failed (RFC 5626 §5.3)."""
    parent, redis = two_workers
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        x, pbx, path = phone_of_x_pbx_on_y(parent, redis, phone)
        port = phone.getsockname()[1]
        workers = parent.workers  # their admin ports, asked of the parent before it stops
        os.kill(parent.proc.pid, signal.SIGSTOP)  # no restart of X while the test looks
        try:
            os.kill(worker_pid(parent, x), signal.SIGKILL)
            wait_for("X's heartbeat gone",
                     lambda: redis_cli(redis, "EXISTS", f"pbxrelay:node:edge-w{x}") == "0")
            ip, pport = pbx.stream.local
            pbx.stream.send(from_tag(request(
                "INVITE", f"sip:201@127.0.0.1:{port}", transport="TCP", local=(ip, pport), to=f"<{AOR}>",
                from_=f"<sip:100@{SERIAL}.{DOMAIN}>", call_id="tok-gone", extra=[f"Route: {path}"]),
                "pbx1"))
            final = from_pbx(pbx, 430)
            assert final.start == "SIP/2.0 430 Flow Failed"
            assert workers[1 - x].metric("pbx_relay_flow_failed_total") == 1
            assert drain(phone, 0.3) == []
        finally:
            os.kill(parent.proc.pid, signal.SIGCONT)
        pbx.stream.close()
