"""The kernel media backend (relay/media/kernel.py) against real nftables, in namespaces of its own.

Each test builds tests/kernelnet.py's two namespaces (the relay in one, the
test's peers in the other), runs ``pbx-relay run`` there with ``[media] backend
= "kernel"`` and talks to it with the plain-socket peers of tests/media_peers.py.
What is asserted is what crossed the wire: packets that reached the far end
while the relay process was stopped, packets that did not arrive after BYE or
after a restart, the UDP checksum a receiver verified. Every test that takes the
``kernel`` fixture runs twice: with the eBPF fast lane in front of the table (the
default: relay/media/ebpf.py carries latched streams) and with the table
alone (``kernel_fast_path = false``, what IPv6 and kernels before 6.6 get).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.media.kernel import KernelForwarder, parse_counters
from tests.kernelnet import (
    OTHER_IP,
    PEER_IP,
    KernelNet,
    inside,
    kernel_relay,
    run,
    start_kernel_relay,
    why_no_fast_path,
    why_no_kernel,
)
from tests.media_peers import Call, MediaEndpoint, Peers, establish, exchange, hang_up, wait_metric
from tests.realpeers import RelayProc, stop_relay

_SKIP = why_no_kernel()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

M = "pbx_relay_"
KERNEL = f'{M}media_streams_forwarded{{backend="kernel"}}'
USERSPACE = f'{M}media_streams_forwarded{{backend="userspace"}}'
PACKETS = f"{M}media_packets_total"
UNLATCHED = f'{M}media_dropped_total{{reason="unlatched_source"}}'


@pytest.fixture(params=["fast_path", "table_only"])
def kernel(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[KernelNet, RelayProc, Peers]]:
    media = "kernel_fast_path = false\n" if request.param == "table_only" else ""
    if request.param == "fast_path" and (why := why_no_fast_path()):
        pytest.skip(f"the eBPF fast lane cannot run here: {why}")
    with kernel_relay(f"km{os.getpid()}-", tmp_path / "relay", media) as (net, relay):
        peers = Peers(relay)
        try:
            yield net, relay, peers
        finally:
            peers.close()


def _handed_over(relay: RelayProc, streams: int = 2) -> None:
    assert wait_metric(relay, KERNEL, streams) == streams, relay.metrics()


def _in_kernel(relay: RelayProc, peers: Peers, n: int = 10) -> tuple[MediaEndpoint, MediaEndpoint, Call]:
    """A call whose RTP has flowed ``n`` packets each way and is now the kernel's."""
    a, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a, b)
    exchange(a, b, n)
    assert a.wait_for(n) == n and b.wait_for(n) == n
    _handed_over(relay)
    return a, b, call


def _latched_entries(net: KernelNet) -> int:
    """Directions (RTP and RTCP) the relay's table forwards now."""
    listing = json.loads(net.nft("-j", "list", "map", "inet", "pbx_relay", "latched"))
    return sum(len(e["map"].get("elem", [])) for e in listing["nftables"] if "map" in e)


def _wait_entries(net: KernelNet, n: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (got := _latched_entries(net)) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_latched_call_is_forwarded_by_the_kernel_even_with_the_relay_stopped(
        kernel: tuple[KernelNet, RelayProc, Peers]) -> None:
    net, relay, peers = kernel
    a, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a, b)
    assert relay.metric(USERSPACE) == 2 and relay.metric(KERNEL) == 0
    exchange(a, b, 20)
    a.send_rtcp()
    b.send_rtcp()
    assert a.wait_for(20) == 20 and b.wait_for(20) == 20
    assert a.wait_for(1, "rtcp", quiet=0) == 1 and b.wait_for(1, "rtcp", quiet=0) == 1
    _handed_over(relay)
    assert _wait_entries(net, 4) == 4  # RTP and RTCP, both ways
    assert relay.metric(USERSPACE) == 0
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGSTOP)
    try:
        exchange(a, b, 200)
        a.send_rtcp()
        b.send_rtcp()
        assert b.wait_for(220) == 220 and a.wait_for(220) == 220
        assert a.wait_for(2, "rtcp", quiet=0) == 2 and b.wait_for(2, "rtcp", quiet=0) == 2
    finally:
        os.kill(relay.proc.pid, signal.SIGCONT)
    assert {r.src for r in a.received} == {a.relay_rtp, a.relay_rtcp}
    assert {r.src for r in b.received} == {b.relay_rtp, b.relay_rtcp}
    # The kernel's counters reach the relay's metrics (and so its no-media timeout).
    assert wait_metric(relay, PACKETS, 2 * 222) == 2 * 222

    hang_up(call)
    assert wait_metric(relay, f"{M}media_sessions", 0) == 0
    assert relay.metric(KERNEL) == 0 and relay.metric(USERSPACE) == 0
    got_a, got_b = a.count(), b.count()
    exchange(a, b, 50)
    time.sleep(0.3)
    assert (a.count(), b.count()) == (got_a, got_b), "the kernel still forwards an ended call"
    table = net.nft("-j", "list", "table", "inet", "pbx_relay")
    assert '"elem"' not in table, table  # every map is empty again
    assert relay.metric(PACKETS) == 2 * 222


def _table_counted(net: KernelNet) -> int:
    """Packets the table's forward chain has counted, all streams together."""
    listing = net.nft("list", "map", "inet", "pbx_relay", "from_port")
    return sum(n for n, _ in parse_counters(listing).values())


def test_the_fast_lane_carries_latched_ipv4_and_the_table_sees_none_of_it(
        kernel: tuple[KernelNet, RelayProc, Peers]) -> None:
    """With the lane on, a latched stream's packets never reach the IP stack: the
    table's counters stay at 0 while the far ends get every packet, and the lane's
    own counters reach the relay's metrics. With the table alone, the table counts."""
    net, relay, peers = kernel
    fast = "kernel_fast_path = false" not in relay.config_path.read_text()
    states = [line for line in relay.log().splitlines() if "event=media_fast_path" in line]
    assert len(states) == 1 and ("state=on" in states[0]) == fast, states
    a, b, _ = _in_kernel(relay, peers, 5)
    before = relay.metric(PACKETS)
    exchange(a, b, 100)
    assert a.wait_for(105) == 105 and b.wait_for(105) == 105
    assert wait_metric(relay, PACKETS, before + 200) == before + 200
    assert (_table_counted(net) == 0) == fast, _table_counted(net)


def test_stranger_and_old_address_stay_in_userspace(kernel: tuple[KernelNet, RelayProc, Peers]) -> None:
    """RTP bleed: once a stream is in the kernel, a stranger's packets to its relay
    ports are still not forwarded (they reach the socket and the latch drops them)."""
    _net, relay, peers = kernel
    a, b, _ = _in_kernel(relay, peers)
    assert a.relay_rtp is not None and b.relay_rtp is not None
    strangers = [peers.endpoint(OTHER_IP), peers.endpoint(PEER_IP)]
    before = relay.metric(UNLATCHED)
    for s in strangers:
        s.talker.payload = b"INJECTED" * 20
        s.send_rtp(10, a.relay_rtp)
        s.send_rtp(10, b.relay_rtp)
    assert wait_metric(relay, UNLATCHED, before + 40) == before + 40
    exchange(a, b, 10)
    assert a.wait_for(20) == 20 and b.wait_for(20) == 20
    for e in (a, b):
        assert all(b"INJECTED" not in r.data for r in e.received)
    for s in strangers:
        assert s.received == []


def _udp_checksum(src: str, dst: str, segment: bytes) -> int:
    data = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(segment)) + segment
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def _raw_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes, checksum: int | None) -> None:
    """One datagram with the UDP checksum given (None: computed in software here).
    A raw socket's packet carries a finished checksum, so the receiver verifies
    what the relay's rewrite left (loopback/veth offload would otherwise skip it)."""
    header = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0)
    if checksum is None:
        checksum = _udp_checksum(src[0], dst[0], header + payload)
    segment = header[:6] + struct.pack("!H", checksum) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        raw.bind((src[0], 0))
        raw.sendto(segment, (dst[0], 0))


def test_rewritten_packets_keep_a_valid_udp_checksum(kernel: tuple[KernelNet, RelayProc, Peers]) -> None:
    """The kernel rewrites addresses and ports; the far end's UDP checksum check
    passes (a packet with a wrong checksum, sent the same way, is dropped by the
    receiver: the check is real), and a packet without checksum (0, allowed in
    IPv4) is left to userspace, which forwards it intact."""
    _net, relay, peers = kernel
    a, b, _ = _in_kernel(relay, peers, 5)
    assert a.relay_rtp is not None
    src = a.rtp_addr
    a.rtp.close()  # its port is ours now: the raw socket sends as if from it
    good, bad, bare = b"\x80\x00" + b"G" * 170, b"\x80\x00" + b"B" * 170, b"\x80\x00" + b"Z" * 170
    _raw_udp(src, a.relay_rtp, good, None)
    _raw_udp(src, a.relay_rtp, bad, 0x1234)
    _raw_udp(src, a.relay_rtp, bare, 0)
    b.wait_for(8, quiet=0.3)
    got = [r.data for r in b.received]
    assert good in got, "a correctly rewritten packet was dropped (bad checksum after rewrite?)"
    assert bad not in got, "the receiver does not verify checksums: this test proves nothing"
    assert bare in got, "a packet without UDP checksum was lost"


def test_a_fragmented_datagram_is_left_to_userspace_and_arrives_whole(
        kernel: tuple[KernelNet, RelayProc, Peers]) -> None:
    """A datagram larger than the link's MTU (1,500 here) arrives as IP fragments;
    only the first carries the UDP ports. Rewritten and forwarded by itself, it
    would reach the far end without the rest (lost there), and the rest would wait
    in the relay's reassembly queue. The kernel path leaves fragments alone: they
    are reassembled for the relay's socket and userspace forwards the datagram."""
    _net, relay, peers = kernel
    a, b, _ = _in_kernel(relay, peers, 5)
    assert a.relay_rtp is not None
    big = b"\x80\x00" + bytes(range(256)) * 7  # 1,794 bytes: two fragments
    a.rtp.sendto(big, a.relay_rtp)
    a.send_rtp(3)  # and the stream goes on in the kernel
    b.wait_for(5 + 4, quiet=0.3)
    assert big in b.rtp_payloads(), "a fragmented datagram from the latched source was lost"
    assert relay.metric(KERNEL) == 2  # still the kernel's


def test_kill_9_and_restart_leaves_nothing_forwarding(tmp_path: Path) -> None:
    """A relay killed with SIGKILL cannot clean up: its table keeps forwarding the
    streams it had (that is the point of the kernel path) until the next start,
    which replaces the table with an empty one. From then on the old streams go
    nowhere, and new calls work."""
    net = KernelNet(f"kk{os.getpid()}-")
    relay: RelayProc | None = None
    try:
        net.up()
        relay = start_kernel_relay(net, tmp_path / "relay")
        with net.inside_peers():
            peers = Peers(relay)
            a, b = MediaEndpoint(PEER_IP), MediaEndpoint(PEER_IP)  # outlive the first relay's peers
            try:
                establish(peers.phone, peers.pbx, a, b)
                exchange(a, b, 10)
                assert a.wait_for(10) == 10 and b.wait_for(10) == 10
                _handed_over(relay)
                assert relay.proc is not None
                counted = _table_counted(net)
                relay.proc.kill()
                relay.proc.wait()
                exchange(a, b, 10)  # still forwarded: nobody removed the table
                assert a.wait_for(20) == 20 and b.wait_for(20) == 20
                # ... by the table: the eBPF lane left with the process (its links and
                # maps were its file descriptors), so these 20 went through the table.
                assert _table_counted(net) == counted + 20
                peers.close()
                relay = start_kernel_relay(net, tmp_path / "relay2")
                assert '"elem"' not in net.nft("-j", "list", "table", "inet", "pbx_relay")
                exchange(a, b, 10)
                time.sleep(0.3)
                assert (a.count(), b.count()) == (20, 20), "a stale entry forwarded after the restart"
                peers = Peers(relay)
                hang_up(_in_kernel(relay, peers)[2])
            finally:
                peers.close()
                for e in (a, b):
                    e.close()
    finally:
        if relay is not None:
            stop_relay(relay)
        net.down()


def test_clean_stop_removes_the_table(tmp_path: Path) -> None:
    net = KernelNet(f"ks{os.getpid()}-")
    try:
        net.up()
        relay = start_kernel_relay(net, tmp_path / "relay")
        assert "chain forward" in net.relay_table()
        stop_relay(relay)
        assert relay.proc is not None and relay.proc.returncode == 0
        assert net.relay_table() == ""
    finally:
        net.down()


def test_without_ip_forwarding_kernel_refuses_to_start_and_auto_falls_back(tmp_path: Path) -> None:
    """The kernel path routes the rewritten packets: with forwarding off they would
    vanish. backend = "kernel" then stops at start, saying why; "auto" says why in
    one warning line and forwards in userspace."""
    net = KernelNet(f"kf{os.getpid()}-")
    relay: RelayProc | None = None
    try:
        net.up(forwarding=False)
        with pytest.raises(AssertionError, match="ip_forward"):
            start_kernel_relay(net, tmp_path / "kernel")
        relay = start_kernel_relay(net, tmp_path / "auto", backend="auto")
        warnings = [line for line in relay.log().splitlines() if "event=media_backend" in line]
        assert len(warnings) == 1, warnings
        assert "WARNING" in warnings[0] and "backend=userspace" in warnings[0], warnings
        assert net.relay_table() == ""
        with net.inside_peers():
            peers = Peers(relay)
            try:
                a, b = peers.endpoint(), peers.endpoint()
                establish(peers.phone, peers.pbx, a, b)
                exchange(a, b, 10)
                assert a.wait_for(10) == 10 and b.wait_for(10) == 10
                assert relay.metric(USERSPACE) == 2 and relay.metric(KERNEL) == 0
            finally:
                peers.close()
    finally:
        if relay is not None:
            stop_relay(relay)
        net.down()


def test_ipv6_table_loads_and_goes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An IPv6 media address gets the same table with ip6 maps (what the kernel
    accepts, not only what nft parses), and the eBPF lane in front of it where it can
    run (its IPv6 path is run on frames in tests/test_media_ebpf.py)."""
    caplog.set_level("INFO", logger="relay")
    net = KernelNet(f"k6{os.getpid()}-")
    try:
        net.up()
        run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=net.relay_ns)
        with inside(net.relay_ns):
            fwd = KernelForwarder("2001:db8::10", lambda n, k: None, (10000, 20000))
            listing = net.nft("list", "table", "inet", "pbx_relay")
            fwd.stop()
        assert "ip6 daddr 2001:db8::10 udp dport 10000-20000 notrack" in listing
        assert "type ipv6_addr . inet_service . inet_service : mark" in listing
        lane = [r.getMessage() for r in caplog.records if "event=media_fast_path" in r.getMessage()]
        assert len(lane) == 1 and ("state=on" in lane[0]) == (why_no_fast_path() is None), lane
        assert net.relay_table() == ""
    finally:
        net.down()
