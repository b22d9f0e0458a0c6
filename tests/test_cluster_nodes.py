"""Two relay nodes sharing a real redis-server (docs/cluster.md): SIPp plays the PBX and the phone.

Each node is a `pbx-relay run` process with its own ports and state; the test starts
redis-server on a free loopback port and stops it to see readiness fall while local
calls go on. Everything listens on 127.0.0.1 on ports picked free for the test.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import redisfixture
from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import DOMAIN, RelayProc, free_port, sipp, start_relay, stop_relay, write_config
from tests.redisfixture import RedisServer

pytestmark = [needs_sipp, pytest.mark.sipp]
redis_server = redisfixture.redis_server  # the fixture, by name

SERIAL = "0123456789"
SECRET = "test-cluster-secret-0123456789abcdef"
MEDIA_PORTS = {"node-a": 31000, "node-b": 31400}


def cluster_lines(redis: RedisServer, node_id: str, secret: str = SECRET, extra: str = "") -> str:
    return f"""
[cluster]
redis_url = "redis://127.0.0.1:{redis.port}"
node_id = "{node_id}"
listen = "127.0.0.1:{free_port()}"
secret = "{secret}"
heartbeat = 0.5
{extra}"""


def start_node(tmp: Path, redis: RedisServer, node_id: str, serials: tuple[str, ...] = (),
               secret: str = SECRET, extra: str = "") -> RelayProc:
    state = tmp / node_id
    state.mkdir()
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    lines = cluster_lines(redis, node_id, secret, extra)
    # Each node its own slice of RTP ports, as `--workers N` gives its workers.
    first = MEDIA_PORTS[node_id]
    media = f"port_min = {first}\nport_max = {first + 400}"
    write_config(r, lines, media)
    for s in serials:
        r.add_pbx(s)
    return start_relay(r, lines, media)


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[RelayProc, RelayProc, RedisServer]]:
    """Node A, with the PBX in its directory, and node B, whose directory is empty."""
    a = start_node(tmp_path, redis_server, "node-a", (SERIAL,))
    b = start_node(tmp_path, redis_server, "node-b")
    try:
        yield a, b, redis_server
    finally:
        stop_relay(a)
        stop_relay(b)


def redis_cli(redis: RedisServer, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(redis.port), *args], capture_output=True, text=True,
                         timeout=10, check=True)
    return out.stdout.strip()


def wait_for(what: str, check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def readyz(r: RelayProc) -> int:
    try:
        with urllib.request.urlopen(f"http://{r.host}:{r.admin}/readyz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def pbx_on(node: RelayProc, tmp: Path, owner: RelayProc, xml: str, name: str = "pbx"):  # type: ignore[no-untyped-def]
    """SIPp as the PBX, registered over TCP on ``node`` with the secret of ``owner``'s directory."""
    return sipp(tmp, name, xml, f"127.0.0.1:{node.tcp}", transport="t1", local_port=free_port(),
                variables={"serial": SERIAL, "domain": DOMAIN}, auth=(SERIAL, owner.secrets[SERIAL]))


def phone_on(node: RelayProc, tmp: Path, xml: str, name: str = "phone"):  # type: ignore[no-untyped-def]
    return sipp(tmp, name, xml, f"127.0.0.1:{node.udp}", transport="u1", local_port=free_port(),
                variables={"serial": SERIAL, "domain": DOMAIN})


def options_to(node: RelayProc, serial: str) -> str:
    """The status line a one-shot OPTIONS for ``<serial>.<domain>`` gets from ``node`` over UDP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        port = s.getsockname()[1]
        s.sendto((
            f"OPTIONS sip:{serial}.{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-opt{time.monotonic_ns()};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@{DOMAIN}>;tag=p1\r\nTo: <sip:{serial}.{DOMAIN}>\r\n"
            f"Call-ID: opt-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        ).encode(), ("127.0.0.1", node.udp))
        while True:
            data = s.recv(65535).decode(errors="replace")
            first = data.split("\r\n", 1)[0]
            if not first.startswith("SIP/2.0 100"):
                return first


def test_a_phone_on_node_b_calls_the_pbx_on_node_a(
    nodes: tuple[RelayProc, RelayProc, RedisServer], tmp_path: Path,
) -> None:
    a, b, redis = nodes
    wait_for("both nodes ready", lambda: readyz(a) == 200 and readyz(b) == 200)
    pbx = pbx_on(a, tmp_path, a, sc.pbx_answers_phone())
    a.wait_registered(SERIAL)
    # The claim in Redis: this serial is held by node A, until the registration expires.
    wait_for("the claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")
    ttl = int(redis_cli(redis, "TTL", f"pbxrelay:pbx:{SERIAL}"))
    assert 590 <= ttl <= 600  # the PBX asked for Expires: 600
    assert redis_cli(redis, "GET", "pbxrelay:node:node-a").startswith("127.0.0.1:")

    # The phone registers through B (its REGISTER reaches the PBX's registrar on A),
    # calls, and hangs up: INVITE/100/180/200/ACK/BYE/200, all through B then A.
    phone = phone_on(b, tmp_path, sc.phone_calls_pbx())
    rc_phone, rc_pbx = phone.wait(), pbx.wait()
    assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}\n{b.log()[-3000:]}"
    assert b.metric('pbx_relay_cluster_lookups_total{outcome="located"}') >= 4  # REGISTER, INVITE, ACK, BYE
    assert b.registry() == []  # B holds no PBX: everything went over the link
    assert a.metric('pbx_relay_connections_total{transport="cluster"}') == 1  # one link, reused
    assert b.metric('pbx_relay_connections_total{transport="cluster"}') == 1

    # The PBX hung up its TCP connection at the end of its scenario: A releases the claim.
    wait_for("the release", lambda: redis_cli(redis, "EXISTS", f"pbxrelay:pbx:{SERIAL}") == "0")
    assert options_to(b, SERIAL) == "SIP/2.0 480 Temporarily Unavailable"


def pbx_calls_phone_through_two_nodes() -> str:
    """sc.pbx_calls_phone with both Path entries of the phone's REGISTER in the INVITE's
    route set: node A's (first) and node B's (RFC 3327: the PBX routes along all of them)."""
    capture = '<ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" assign_to="path"/>'
    both = ('<ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" occurrence="1" assign_to="path"/>'
            '<ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" occurrence="2" '
            'assign_to="path2"/>')
    xml = sc.pbx_calls_phone()
    assert capture in xml and "Route: [$path]" in xml
    return xml.replace(capture, both).replace("Route: [$path]", "Route: [$path], [$path2]")


def test_the_pbx_on_node_a_calls_a_phone_registered_through_node_b(
    nodes: tuple[RelayProc, RelayProc, RedisServer], tmp_path: Path,
) -> None:
    """The reverse direction: the phone's REGISTER went B → A → PBX and got a Path entry
    at each node; the PBX's INVITE along that Path goes A → link → B → the phone."""
    a, b, redis = nodes
    wait_for("both nodes ready", lambda: readyz(a) == 200 and readyz(b) == 200)
    pbx = pbx_on(a, tmp_path, a, pbx_calls_phone_through_two_nodes())
    a.wait_registered(SERIAL)
    wait_for("the claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")
    phone = phone_on(b, tmp_path, sc.phone_answers_pbx())
    rc_phone, rc_pbx = phone.wait(), pbx.wait()
    assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}\n{b.log()[-3000:]}"
    # The INVITE crossed each node once (the phone talks to B only, the PBX to A only).
    assert a.metric('pbx_relay_requests_in_total{method="INVITE"}') == 1
    assert b.metric('pbx_relay_requests_in_total{method="INVITE"}') == 1
    assert b.metric('pbx_relay_connections_total{transport="cluster"}') == 1


def pbx_rings_then_cancelled_three_vias() -> str:
    """sc.pbx_rings_then_cancelled, whose 487 copies the INVITE's two Vias: through two
    nodes it has three (node A's, node B's, the phone's), and all must go back."""
    xml = sc.pbx_rings_then_cancelled()
    capture = 'header="Via:" occurrence="2" assign_to="via2"/>'
    assert capture in xml and "Via: [$via2]\n" in xml
    return xml.replace(capture, capture + '\n      <ereg regexp=".*" search_in="hdr" header="Via:" '
                       'occurrence="3" assign_to="via3"/>').replace("Via: [$via2]\n",
                                                                   "Via: [$via2]\nVia: [$via3]\n")


def test_a_phone_on_node_b_cancels_its_call_to_the_pbx_on_node_a(
    nodes: tuple[RelayProc, RelayProc, RedisServer], tmp_path: Path,
) -> None:
    a, b, redis = nodes
    wait_for("both nodes ready", lambda: readyz(a) == 200 and readyz(b) == 200)
    pbx = pbx_on(a, tmp_path, a, pbx_rings_then_cancelled_three_vias())
    a.wait_registered(SERIAL)
    wait_for("the claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")
    phone = phone_on(b, tmp_path, sc.phone_calls_then_cancels())
    rc_phone, rc_pbx = phone.wait(), pbx.wait()
    assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}"
    assert b.metric("pbx_relay_cancels_forwarded_total") == 1  # B → link
    assert a.metric("pbx_relay_cancels_forwarded_total") == 1  # A → PBX


def test_a_serial_no_node_holds_gets_the_480_of_an_offline_pbx(
    nodes: tuple[RelayProc, RelayProc, RedisServer],
) -> None:
    a, b, _ = nodes
    wait_for("both nodes ready", lambda: readyz(a) == 200 and readyz(b) == 200)
    assert options_to(b, "5555555555") == "SIP/2.0 480 Temporarily Unavailable"
    assert options_to(b, SERIAL) == "SIP/2.0 480 Temporarily Unavailable"
    assert b.metric('pbx_relay_cluster_lookups_total{outcome="nowhere"}') == 2


def test_without_redis_a_node_is_not_ready_and_its_own_calls_go_on(
    nodes: tuple[RelayProc, RelayProc, RedisServer], tmp_path: Path,
) -> None:
    a, b, redis = nodes
    wait_for("both nodes ready", lambda: readyz(a) == 200 and readyz(b) == 200)
    redis.stop()
    wait_for("A not ready", lambda: readyz(a) == 503)
    with pytest.raises(urllib.error.HTTPError) as e:
        a.http("/readyz")
    assert e.value.read() == b"cluster: shared store unreachable\n"
    pbx = pbx_on(a, tmp_path, a, sc.pbx_answers_phone())
    a.wait_registered(SERIAL)
    phone = phone_on(a, tmp_path, sc.phone_calls_pbx())
    rc_phone, rc_pbx = phone.wait(), pbx.wait()
    assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}"
    assert readyz(a) == 503
    # B cannot know where the PBX is: 503 (try again), not a 480 that says it is offline.
    assert options_to(b, SERIAL) == "SIP/2.0 503 Service Unavailable"
    assert a.alive() and b.alive()

    # A PBX registers while Redis is away: no claim can be written.
    waiting = pbx_on(a, tmp_path, a, sc.scenario("PBX stays", sc.PBX_PHONE_HOME, sc.pause(30_000)),
                     name="pbx_stays")
    wait_for("the PBX again", lambda: a.metric("pbx_relay_pbx_registrations_total") == 2)
    # Redis back, empty: readiness returns and A claims what it holds again.
    redis.start()
    wait_for("A ready again", lambda: readyz(a) == 200)
    wait_for("the claim again",
             lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")
    waiting.proc.kill()
    waiting.proc.wait()


def test_a_node_without_the_secret_gets_no_link(tmp_path: Path, redis_server: RedisServer) -> None:
    a = start_node(tmp_path, redis_server, "node-a", (SERIAL,))
    b = start_node(tmp_path, redis_server, "node-b", secret="another-secret-0123456789abcdefghij")
    try:
        pbx = pbx_on(a, tmp_path, a, sc.pbx_answers_phone())
        a.wait_registered(SERIAL)
        wait_for("the claim",
                 lambda: redis_cli(redis_server, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")
        assert options_to(b, SERIAL) == "SIP/2.0 503 Service Unavailable"
        assert a.metric('pbx_relay_cluster_links_refused_total{reason="handshake"}') == 1
        assert a.metric('pbx_relay_connections_total{transport="cluster"}') == 0
        pbx.proc.kill()
        pbx.proc.wait()
    finally:
        stop_relay(a)
        stop_relay(b)


def link_hello_over_tls(node: RelayProc, redis: RedisServer, node_id: str) -> bytes:
    """The first line a node's link listener says to a TLS client."""
    address = redis_cli(redis, "GET", f"pbxrelay:node:{node_id}")
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        return tls.recv(256)


def test_links_over_tls_carry_a_call_both_nodes_with_their_own_certificate(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    """[cluster] link_tls = true on both nodes (each its self-signed certificate, made in
    its state_dir): the call phone → B → link → A → PBX goes through inside TLS."""
    a = start_node(tmp_path, redis_server, "node-a", (SERIAL,), extra="link_tls = true\n")
    b = start_node(tmp_path, redis_server, "node-b", extra="link_tls = true\n")
    try:
        wait_for("both nodes ready", lambda: readyz(a) == 200 and readyz(b) == 200)
        assert link_hello_over_tls(a, redis_server, "node-a").startswith(b"PBXRELAY-CLUSTER/1 HELLO node-a ")
        pbx = pbx_on(a, tmp_path, a, sc.pbx_answers_phone())
        a.wait_registered(SERIAL)
        wait_for("the claim",
                 lambda: redis_cli(redis_server, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")
        phone = phone_on(b, tmp_path, sc.phone_calls_pbx())
        rc_phone, rc_pbx = phone.wait(), pbx.wait()
        assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}\n{b.log()[-3000:]}"
        assert b.metric('pbx_relay_connections_total{transport="cluster"}') == 1
        assert a.metric('pbx_relay_cluster_links_refused_total{reason="handshake"}') == 1  # our probe
        assert b.metric('pbx_relay_cluster_links_refused_total{reason="handshake"}') == 0
    finally:
        stop_relay(a)
        stop_relay(b)
