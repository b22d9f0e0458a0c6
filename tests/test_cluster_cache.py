"""The holder cache (docs/cluster.md, "The holder cache") with a real redis-server and three nodes.

Node C forwards N requests for a PBX registered on node A: Redis sees one lookup (one
HMGET for the claim, one GET for A's address), not N. Then the PBX moves to node B:
C's cache still says A, A answers that it no longer holds the PBX, and C asks Redis
once and sends the INVITE to B: the phone's call goes through at once, no 480, no wait
for the cache's TTL. Everything on 127.0.0.1, ports picked free, SIPp as PBX and phone.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests import redisfixture
from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import DOMAIN, RelayProc, free_port, start_relay, stop_relay, write_config
from tests.redisfixture import RedisServer
from tests.test_cluster_nodes import (
    SERIAL,
    cluster_lines,
    pbx_on,
    phone_on,
    readyz,
    redis_cli,
    wait_for,
)

pytestmark = [needs_sipp, pytest.mark.sipp]
redis_server = redisfixture.redis_server  # the fixture, by name

N = 20


def start_node(tmp: Path, redis: RedisServer, node_id: str, directory_of: RelayProc | None) -> RelayProc:
    """A node without media whose cached holders outlive the test (30 s): what moves the
    PBX must be A's answer, never the TTL."""
    state = tmp / node_id
    state.mkdir()
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    lines = cluster_lines(redis, node_id) + "lookup_cache_ttl = 30\n"
    media = "enabled = false"
    write_config(r, lines, media)
    if directory_of is None:
        r.add_pbx(SERIAL)
    else:  # one directory for the cluster (relay/pbx/shared.py): its secret is known
        r.secrets = dict(directory_of.secrets)
    return start_relay(r, lines, media)


def commands(redis: RedisServer, name: str) -> int:
    """How often Redis ran command ``name`` since its stats were reset (INFO commandstats)."""
    for line in redis_cli(redis, "INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{name}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def options_to(node: RelayProc, cseq: int) -> str:
    """The status line an OPTIONS for the PBX gets from ``node`` over UDP; its Call-ID is
    the SIPp PBX's own (SIPp maps what it receives to its call by Call-ID)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        port = s.getsockname()[1]
        s.sendto((
            f"OPTIONS sip:{SERIAL}.{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-opt{time.monotonic_ns()};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@{DOMAIN}>;tag=p1\r\nTo: <sip:{SERIAL}.{DOMAIN}>\r\n"
            f"Call-ID: {sc.CALL_ID_FORMAT.replace('%u', '1')}\r\nCSeq: {cseq} OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode(), ("127.0.0.1", node.udp))
        return s.recv(65535).decode(errors="replace").split("\r\n", 1)[0]


def pbx_answers_options(n: int) -> str:
    """The PBX registers, answers ``n`` OPTIONS, and hangs up its connection."""
    answer = sc.send("""
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=opt[pid]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0
""")
    return sc.scenario("PBX answers OPTIONS", sc.PBX_PHONE_HOME, *[sc.recv("OPTIONS") + "\n" + answer] * n)


def phone_calls_without_registering() -> str:
    return sc.scenario("phone calls", sc.uac_calls(via=sc.PHONE_VIA, from_uri=sc.PHONE_URI,
                                                   to_uri=sc.PBX_URI, ruri=sc.PBX_URI))


def pbx_answers_a_call() -> str:
    return sc.scenario("PBX answers a call", sc.PBX_PHONE_HOME, sc.uas_answers("100"))


def test_n_requests_cost_one_lookup_and_a_pbx_that_moved_is_reached_at_once(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    redis = redis_server
    a = start_node(tmp_path, redis, "node-a", None)
    b = start_node(tmp_path, redis, "node-b", a)
    c = start_node(tmp_path, redis, "node-c", a)
    nodes = (a, b, c)
    try:
        wait_for("the nodes ready", lambda: all(readyz(n) == 200 for n in nodes))
        pbx = pbx_on(a, tmp_path, a, pbx_answers_options(N), name="pbx_on_a")
        a.wait_registered(SERIAL)
        wait_for("A's claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")

        # N OPTIONS through C: one lookup in Redis (HMGET the claim, GET A's address).
        redis_cli(redis, "CONFIG", "RESETSTAT")
        answers = [options_to(c, 10 + i) for i in range(N)]
        assert answers == ["SIP/2.0 200 OK"] * N
        assert (commands(redis, "hmget"), commands(redis, "get")) == (1, 1)
        assert c.metric('pbx_relay_cluster_lookup_cache_total{result="miss"}') == 1
        assert c.metric('pbx_relay_cluster_lookup_cache_total{result="hit"}') == N - 1
        assert c.metric('pbx_relay_cluster_lookups_total{outcome="located"}') == N
        assert pbx.wait() == 0, pbx.errors()

        # The PBX hung up: A released its claim. It registers on B; C still caches A.
        wait_for("A's release", lambda: redis_cli(redis, "EXISTS", f"pbxrelay:pbx:{SERIAL}") == "0")
        moved = pbx_on(b, tmp_path, a, pbx_answers_a_call(), name="pbx_on_b")
        b.wait_registered(SERIAL)
        wait_for("B's claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-b")
        assert c.metric("pbx_relay_cluster_lookup_cache_entries") == 1

        # A phone on C calls: C → A (cached) → 480 "not held" → C asks Redis once → B → PBX.
        redis_cli(redis, "CONFIG", "RESETSTAT")
        phone = phone_on(c, tmp_path, phone_calls_without_registering())
        rc_phone, rc_pbx = phone.wait(), moved.wait()
        assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{moved.errors()}\n{c.log()[-3000:]}"
        assert c.metric('pbx_relay_cluster_lookup_cache_total{result="forgotten"}') == 1
        # One fresh lookup for the INVITE; its ACK and BYE used the new entry (B).
        assert (commands(redis, "hmget"), commands(redis, "get")) == (1, 1)
        assert a.metric('pbx_relay_responses_sent_total{status="480"}') == 1
        assert c.metric('pbx_relay_responses_sent_total{status="480"}') == 0
        assert all(n.alive() for n in nodes)
    finally:
        for n in nodes:
            stop_relay(n)
