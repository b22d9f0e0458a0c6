"""Two relay machines and one Redis, the PBX and the phone each behind their own NAT.

Issue 13's "Done means", in network namespaces (tests/netns/up.sh)::

    phone 10.77.1.2 ── [nat1] 203.0.113.2   ──┐         node A 198.51.100.10
                                              [pub]     node B 198.51.100.11
    pbx   10.77.2.2 ── [nat2] 203.0.113.130 ──┘         redis-server on pub's loopback

Node A and node B are two `pbx-relay run` processes with their own addresses, ports,
state directories and RTP ranges (two machines of one public network); they share the
redis-server and link to each other over the public network. The PBX phones home to A
through NAT2 over TCP; the phone talks to B through NAT1 over UDP. Real RTP both ways
(every packet counted at the far end), calls both ways, node A killed → the PBX
re-registers on B and calls work again, Redis stopped → B not ready, its own calls go on.
(Push wake-ups across nodes: tests/test_cluster_push.py, on loopback.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.pbx.directory import PbxDirectory
from relay.proxy.mediacalls import PEER
from tests import sipp_scenarios as sc
from tests.kernelnet import inside
from tests.media_peers import MediaEndpoint, PbxUa, Phone, establish, exchange, hang_up, pbx_reinvite
from tests.realpeers import DOMAIN, SIPP, RelayProc, SippRun, sipp, start_relay, stop_relay
from tests.redisfixture import REDIS_SERVER, RedisServer
from tests.test_cluster_nodes import SECRET, pbx_calls_phone_through_two_nodes, wait_for
from tests.test_nat import NETNS_DIR, PBX_IP, PBX_NAT, PHONE_IP, PHONE_NAT, PRIVATE

SERIAL = "0123456789"
NODE_A, NODE_B = "198.51.100.10", "198.51.100.11"
RTP_FIRST = {"node-a": 32000, "node-b": 32400}
PACKETS = 100  # each way, per call
SIPP_TIMEOUT = 15


def _why_skip() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2, nftables)"
    if SIPP is None or REDIS_SERVER is None:
        return "needs sipp and redis-server (./dev.sh test installs them)"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.netns, pytest.mark.sipp, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@dataclass
class Net:
    pub: str
    phone: str
    pbx: str


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    prefix = f"prc{os.getpid()}-"
    env = dict(os.environ, PRT_NS_PREFIX=prefix, NAT_MODE="masq", RELAY_ADDRS=f"{NODE_A} {NODE_B}")
    try:
        up = subprocess.run([str(NETNS_DIR / "up.sh")], env=env, capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield Net(f"{prefix}pub", f"{prefix}phone", f"{prefix}pbx")
    finally:
        subprocess.run([str(NETNS_DIR / "down.sh")], env=env, capture_output=True, text=True, timeout=30)


@dataclass
class Cluster:
    net: Net
    redis: RedisServer
    a: RelayProc
    b: RelayProc


def _node(tmp: Path, net: Net, redis: RedisServer, node_id: str, ip: str) -> RelayProc:
    """A node on its own public address; the PBX in its local directory (a node that
    joins the cluster brings its PBXs to the shared directory, docs/cluster.md)."""
    state = tmp / node_id
    state.mkdir()
    r = RelayProc(state, ip, 5060, 5060, 5061, 9090, netns=net.pub)
    if node_id == "node-a":
        r.secrets[SERIAL] = PbxDirectory(state / "pbx.sqlite").add(SERIAL, DOMAIN)
    cluster = f"""
[cluster]
redis_url = "redis://127.0.0.1:{redis.port}"
node_id = "{node_id}"
listen = "{ip}:7000"
secret = "{SECRET}"
heartbeat = 0.5
"""
    first = RTP_FIRST[node_id]
    return start_relay(r, cluster, f"port_min = {first}\nport_max = {first + 399}")


@pytest.fixture
def cluster(net: Net, tmp_path: Path) -> Iterator[Cluster]:
    redis = RedisServer(tmp_path)
    nodes: list[RelayProc] = []
    try:
        with inside(net.pub):  # redis-server on the public namespace's loopback
            redis.start()
        nodes.append(_node(tmp_path, net, redis, "node-a", NODE_A))
        nodes.append(_node(tmp_path, net, redis, "node-b", NODE_B))
        nodes[1].secrets = nodes[0].secrets
        c = Cluster(net, redis, *nodes)
        wait_for("both nodes ready", lambda: ready(c, c.a) == 200 and ready(c, c.b) == 200)
        yield c
    finally:
        for r in nodes:
            stop_relay(r)
        redis.stop()


def ready(c: Cluster, r: RelayProc) -> int:
    """The node's /readyz status, asked from the public network."""
    with inside(c.net.pub):
        try:
            with urllib.request.urlopen(f"http://{r.host}:{r.admin}/readyz", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)


def redis_cli(c: Cluster, *args: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", c.net.pub, "redis-cli", "-p", str(c.redis.port), *args],
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


def holder(c: Cluster) -> str:
    return redis_cli(c, "HGET", f"pbxrelay:pbx:{SERIAL}", "node")


def talk(ea: MediaEndpoint, eb: MediaEndpoint, node: RelayProc) -> None:
    """PACKETS RTP packets each way, every one counted at the far end. Each side sends
    one packet first and waits, as a phone's first frames do: a NAT lets nothing in
    towards a port its inside has not sent from (the relay's first packets towards a
    side that has not sent yet are the NAT's to drop, in any relay)."""
    ea.send_rtp()
    eb.send_rtp()
    time.sleep(0.3)
    base = (eb.count(), ea.count())
    exchange(ea, eb, PACKETS, rate=250.0)
    got = (eb.wait_for(base[0] + PACKETS) - base[0], ea.wait_for(base[1] + PACKETS) - base[1])
    assert got == (PACKETS, PACKETS), f"{got}\n{node.log()[-3000:]}"


def call_with_rtp(c: Cluster, pbx: PbxUa, phone_node: RelayProc,
                  reinvite: bool = False) -> tuple[MediaEndpoint, MediaEndpoint]:
    """The phone (behind NAT1, through ``phone_node``) calls the PBX: INVITE/180/200/ACK,
    PACKETS RTP packets each way counted at the far end (``reinvite``: again after the
    PBX moved its media), BYE. The endpoints, closed."""
    with inside(c.net.phone):
        phone = Phone(phone_node, host=PHONE_IP)
        ea = MediaEndpoint(PHONE_IP)
    with inside(c.net.pbx):
        eb = MediaEndpoint(PBX_IP)
    opened, seen = [ea, eb], list[bytes]()
    try:
        call = establish(phone, pbx, ea, eb)
        # The SDPs name the node that anchors the media: where the call entered.
        assert ea.relay_rtp is not None and eb.relay_rtp is not None
        assert ea.relay_rtp[0] == phone_node.host and eb.relay_rtp[0] == phone_node.host
        talk(ea, eb, phone_node)
        # Each side hears the relay only, never the other side's NAT or private address.
        assert {r.src[0] for r in ea.received} == {phone_node.host}
        assert {r.src[0] for r in eb.received} == {phone_node.host}
        if reinvite:
            # The PBX moves its media to another port and re-INVITEs: the request enters
            # at the PBX's node and is passed on to the anchoring one, which must learn
            # the PBX's address from it (not the link's) to latch the new port.
            with inside(c.net.pbx):
                opened.append(eb2 := MediaEndpoint(PBX_IP))
            offer_seen, answer_seen = pbx_reinvite(call, eb2.sdp(version=2), ea.sdp(version=2))
            eb2.learn(answer_seen.body)
            talk(ea, eb2, phone_node)
            seen += [offer_seen.raw, answer_seen.raw]
        hang_up(call)
        # The header that names a peer between nodes never reaches a phone or a PBX.
        seen += [call.pbx.offer.raw, call.phone.answer.raw]
        assert not [m for m in seen if PEER.lower().encode() in m.lower()]
        return ea, eb
    finally:
        for e in opened:
            e.close()
        phone.close()


def _sipp(c: Cluster, node: RelayProc, ns: str, name: str, xml: str, transport: str, ip: str,
          port: int, tmp: Path) -> SippRun:
    auth = (SERIAL, c.a.secrets[SERIAL]) if transport == "t1" else None
    return sipp(tmp, name, xml, f"{node.host}:{node.tcp if transport == 't1' else node.udp}",
                transport=transport, local_ip=ip, local_port=port,
                variables={"serial": SERIAL, "domain": DOMAIN}, auth=auth, netns=ns,
                timeout_s=SIPP_TIMEOUT)


def test_two_machines_behind_nat_call_both_ways_with_rtp(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    with inside(c.net.pbx):
        pbx = PbxUa(c.a)
    try:
        reg = c.a.wait_registered(SERIAL)
        assert (reg["transport"], reg["ip"]) == ("tcp", PBX_NAT)  # known by its NATed address only
        wait_for("the claim", lambda: holder(c) == "node-a")
        assert redis_cli(c, "GET", "pbxrelay:node:node-a") == f"{NODE_A}:7000"

        # Phone → PBX: B looks the PBX up, forwards over the link to A, A to the PBX.
        call_with_rtp(c, pbx, c.b, reinvite=True)
        assert c.b.registry() == []
        assert c.b.metric('pbx_relay_cluster_lookups_total{outcome="located"}') >= 1
        assert c.a.metric('pbx_relay_connections_total{transport="cluster"}') == 1
        assert c.a.metric("pbx_relay_media_sessions") == 0 and c.b.metric("pbx_relay_media_sessions") == 0
    finally:
        pbx.close()

    # PBX → phone: the phone registers through B (Path of both nodes), the PBX's INVITE
    # goes A → link → B → NAT1 → the phone.
    wait_for("the release", lambda: redis_cli(c, "EXISTS", f"pbxrelay:pbx:{SERIAL}") == "0")
    pbx_run = _sipp(c, c.a, c.net.pbx, "pbx", pbx_calls_phone_through_two_nodes(), "t1", PBX_IP, 5072,
                    tmp_path)
    try:
        c.a.wait_registered(SERIAL)
        wait_for("the claim again", lambda: holder(c) == "node-a")
        phone_run = _sipp(c, c.b, c.net.phone, "phone", sc.phone_answers_pbx(), "u1", PHONE_IP, 5082,
                          tmp_path)
        rc = (phone_run.wait(SIPP_TIMEOUT + 5), pbx_run.wait(SIPP_TIMEOUT + 5))
        assert rc == (0, 0), f"{phone_run.errors()}\n{pbx_run.errors()}\n{c.b.log()[-3000:]}"
        assert f"received={PHONE_NAT}" in pbx_run.messages()  # the phone's REGISTER, via both nodes
        assert c.a.metric('pbx_relay_requests_in_total{method="INVITE"}') == 3  # each way, and the re-INVITE
        assert c.b.metric('pbx_relay_requests_in_total{method="INVITE"}') == 3
    finally:
        if pbx_run.proc.poll() is None:
            pbx_run.proc.kill()
            pbx_run.proc.wait()
    for node in (c.a, c.b):
        assert PRIVATE not in node.log(), [line for line in node.log().splitlines() if PRIVATE in line]


def test_a_machine_lost_then_redis_lost(cluster: Cluster) -> None:
    c = cluster
    with inside(c.net.pbx):
        pbx = PbxUa(c.a)
    c.a.wait_registered(SERIAL)
    wait_for("the claim", lambda: holder(c) == "node-a")
    assert c.a.proc is not None
    c.a.proc.kill()  # node A's machine is gone: no release, its claim stays in Redis
    c.a.proc.wait()
    # The PBX sees its connection break and phones home to the other node (as DNS SRV or
    # a second A record would send it); B's claim replaces A's stale one at once.
    assert pbx.stream.recv(5) is None and pbx.stream.eof
    pbx.close()
    with inside(c.net.pbx):
        pbx = PbxUa(c.b)
    try:
        reg = c.b.wait_registered(SERIAL)
        assert reg["ip"] == PBX_NAT
        wait_for("B's claim", lambda: holder(c) == "node-b")
        call_with_rtp(c, pbx, c.b)

        # Redis gone: B says it is not ready, and the calls it can place alone go on.
        c.redis.stop()
        wait_for("B not ready", lambda: ready(c, c.b) == 503)
        call_with_rtp(c, pbx, c.b)
        assert ready(c, c.b) == 503
        assert c.b.alive()
    finally:
        pbx.close()
