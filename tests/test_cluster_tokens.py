"""Tokens that name their node (docs/cluster.md): `pbx-relay run --workers 2` and a real redis-server.

A phone registers through worker X, where the PBX is connected (its Path entry is X's
token, naming X). The PBX's connection breaks and it reconnects: the kernel gives the new
connection to worker Y. Its INVITE along the phone's Path reaches Y, which reads X's
id in the token and sends the request over the link to X without asking Redis which node
holds anything; X delivers it to the phone. The answer, the ACK and the BYE follow the
route set both nodes recorded. Plain sockets play the PBX (TCP) and the phone (UDP).
"""

from __future__ import annotations

import re
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


def test_the_pbx_reconnected_to_another_worker_reaches_a_phone_of_the_first_without_a_lookup(
    two_workers: tuple[Parent, RedisServer],
) -> None:
    parent, redis = two_workers
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    first = Pbx(parent.workers[0])
    x = worker_of_pbx(parent, first)
    y = 1 - x
    for _ in range(64):  # a phone source port the kernel gives to X, the PBX's worker
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        if worker_of_source(parent, port) == x:
            break
    else:
        raise AssertionError("64 source ports, none on the PBX's worker")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind(("127.0.0.1", port))
        path = register_phone(phone, first)
        # The PBX's connection breaks; X releases its claim. It reconnects, and lands on Y.
        first.stream.close()
        wait_for("X's release", lambda: redis_cli(redis, "EXISTS", f"pbxrelay:pbx:{SERIAL}") == "0")
        pbx = pbx_on_worker(parent, y)
        wait_for("Y's claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node")
                 == f"edge-w{y}")

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
