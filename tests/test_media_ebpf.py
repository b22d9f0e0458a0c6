"""The kernel path's eBPF fast lane (relay/media/ebpf.py), run by the kernel on frames we build.

BPF_PROG_TEST_RUN runs the loaded program on one frame and hands back its verdict
and the frame as the program left it: the rewrite, the checksums, the counters and
every case it must leave to the IP stack are checked on real kernel execution,
without traffic. The FIB lookup inside needs a route: each test module gets a
scratch network namespace with a veth (10.1.0.1/24, one resolved neighbour) and
forwarding on. With a relay and real packets the lane is tested in
tests/test_media_kernel.py.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media.ebpf import EbpfUnavailable, FastPath, csum_delta, ethernet_interfaces
from tests.kernelnet import inside, run, why_no_kernel

RELAY, PHONE, PBX, NEIGH_MAC = "10.1.0.1", "10.1.0.2", "10.1.0.3", "02:00:00:00:00:03"
RELAY6, PHONE6, PBX6 = "fd00:1::1", "2001:db8:7::2", "fd00:1::3"
REDIRECT, NEXT = 7, -1
NS = f"ebpf{os.getpid()}"


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


MAC = {"eb0": b""}  # the scratch veth's own address, once the namespace exists


def frame(src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, ttl: int = 64, frag: int = 0,
          checksum: bool = True, options: bytes = b"", to_mac: bytes | None = None) -> bytes:
    """Ethernet (to the veth's MAC) + IPv4 + UDP with correct checksums, as a peer sends it."""
    ulen = 8 + len(payload)
    pseudo = socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + struct.pack("!BBH", 0, 17, ulen)
    c = 0
    if checksum:
        c = 0xFFFF - _sum(pseudo + struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload) or 0xFFFF
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, c)
    ihl = 5 + len(options) // 4
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + ulen, 1, frag, ttl, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0])) + options
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _sum(ip)) + ip[12:]
    return (to_mac or MAC["eb0"]) + bytes.fromhex("020000000002") + b"\x08\x00" + ip + udp + payload


def checksums_valid(f: bytes) -> tuple[bool, bool]:
    ip, udp = f[14:34], f[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    return _sum(ip) == 0xFFFF, _sum(pseudo + udp) == 0xFFFF


def frame6(src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, hops: int = 64,
           next_header: int = 17, checksum: bool = True) -> bytes:
    """Ethernet + IPv6 + UDP (RFC 8200 §8.1 pseudo-header checksum)."""
    ulen = 8 + len(payload)
    addrs = socket.inet_pton(socket.AF_INET6, src[0]) + socket.inet_pton(socket.AF_INET6, dst[0])
    c = 0
    if checksum:
        pseudo = addrs + struct.pack("!IxxxB", ulen, 17)
        c = 0xFFFF - _sum(pseudo + struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload) or 0xFFFF
    ip = struct.pack("!IHBB", 6 << 28, ulen, next_header, hops) + addrs
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, c)
    return MAC["eb0"] + bytes.fromhex("020000000002") + b"\x86\xdd" + ip + udp + payload


def checksum6_valid(f: bytes) -> bool:
    ip, udp = f[14:54], f[54:]
    return _sum(ip[8:40] + struct.pack("!IxxxB", len(udp), 17) + udp) == 0xFFFF


def _test_run(fast: FastPath, f: bytes, ifindex: int) -> tuple[int, bytes]:
    """The kernel builds the test's skb in the caller's namespace: the scratch one."""
    with inside(NS):
        return fast.test_run(f, ifindex)


@pytest.fixture(scope="module")
def lane() -> Iterator[tuple[FastPath, int]]:
    why = why_no_kernel()
    if why:
        pytest.skip(why)
    run("ip", "netns", "add", NS)
    try:
        for cmd in (("ip", "link", "add", "eb0", "type", "veth", "peer", "name", "eb1"),
                    ("ip", "link", "set", "eb0", "up"), ("ip", "link", "set", "eb1", "up"),
                    ("ip", "addr", "add", f"{RELAY}/24", "dev", "eb0"),
                    ("ip", "neigh", "add", PBX, "lladdr", NEIGH_MAC, "dev", "eb0"),
                    ("ip", "-6", "addr", "add", f"{RELAY6}/64", "dev", "eb0", "nodad"),
                    ("ip", "-6", "neigh", "add", PBX6, "lladdr", NEIGH_MAC, "dev", "eb0"),
                    ("sysctl", "-qw", "net.ipv4.ip_forward=1"),
                    ("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")):
            run(*cmd, ns=NS)
        with inside(NS):
            try:
                fast = FastPath((1024, 65535), [])
            except EbpfUnavailable as e:
                pytest.skip(str(e))
            ifindex = socket.if_nametoindex("eb0")
        own = run("cat", "/sys/class/net/eb0/address", ns=NS).stdout.strip()
        MAC["eb0"] = bytes.fromhex(own.replace(":", ""))
        try:
            yield fast, ifindex
        finally:
            fast.close()
    finally:
        run("ip", "netns", "del", NS, check=False)


def test_a_latched_direction_is_rewritten_counted_and_redirected(lane: tuple[FastPath, int]) -> None:
    fast, ifindex = lane
    fast.forward(20000, (PHONE, 4000), RELAY, 20002, (PBX, 5000))
    fast.reset(20000)
    sent = frame((PHONE, 4000), (RELAY, 20000), b"\x80" * 172, ttl=64)
    verdict, out = _test_run(fast, sent, ifindex)
    assert verdict == REDIRECT
    assert out[26:38] == socket.inet_aton(RELAY) + socket.inet_aton(PBX) + struct.pack("!HH", 20002, 5000)
    assert out[22] == 63  # TTL - 1, as a router would
    assert checksums_valid(out) == (True, True)
    assert out[:6] == bytes.fromhex(NEIGH_MAC.replace(":", ""))  # the neighbour's MAC
    assert out[6:12] == MAC["eb0"]  # from the interface the FIB named
    assert out[38:40] == sent[38:40] and out[42:] == sent[42:]  # UDP length and payload untouched
    assert fast.count(20000) == (1, len(sent) - 14)
    fast.stop_forwarding(20000)
    assert _test_run(fast, sent, ifindex) == (NEXT, sent)
    assert fast.count(20000) == (1, len(sent) - 14)


MISSES = {
    "another source port": dict(src=(PHONE, 4001)),
    "another source address": dict(src=("10.1.0.9", 4000)),
    "a fragment (MF)": dict(frag=0x2000),
    "a later fragment": dict(frag=0x0010),
    "IP options": dict(options=b"\x01\x01\x01\x00"),
    "no UDP checksum": dict(checksum=False),
    "TTL 1": dict(ttl=1),
    "to another host's MAC (promiscuous)": dict(to_mac=bytes.fromhex("020000000009")),
    "to the broadcast MAC": dict(to_mac=b"\xff" * 6),
}


@pytest.mark.parametrize("case", MISSES)
def test_what_the_lane_leaves_to_the_stack_goes_on_untouched(lane: tuple[FastPath, int], case: str) -> None:
    """Strangers, a latched source's other address or port, and every packet the
    rewrite could not keep right: verdict "next", not a byte changed, not counted."""
    fast, ifindex = lane
    fast.forward(20004, (PHONE, 4000), RELAY, 20006, (PBX, 5000))
    fast.reset(20004)
    kw = dict(MISSES[case])
    src = kw.pop("src", (PHONE, 4000))
    sent = frame(src, (RELAY, 20004), b"\x80" * 100, **kw)  # type: ignore[arg-type]
    assert _test_run(fast, sent, ifindex) == (NEXT, sent)
    assert fast.count(20004) == (0, 0)


def test_counter_slots_cover_both_ends_of_the_range_and_nothing_else() -> None:
    """With an odd port_max the last pair's RTCP port is port_max itself: that port
    has a counter slot; a port outside the range has none and counts nothing."""
    why = why_no_kernel()
    if why:
        pytest.skip(why)
    try:
        fast = FastPath((10000, 10009), [])
    except EbpfUnavailable as e:
        pytest.skip(str(e))
    try:
        for port in (10000, 10009):
            fast.reset(port)
            assert fast.count(port) == (0, 0)
        fast.reset(9999)  # outside: nothing to zero, no error
        assert fast.count(9999) == (0, 0) and fast.count(20000) == (0, 0)
    finally:
        fast.close()


def test_padded_frames_unroutable_destinations_and_a_bad_ip_version_go_on(lane: tuple[FastPath, int]) -> None:
    fast, ifindex = lane
    fast.forward(20008, (PHONE, 4000), RELAY, 20010, (PBX, 5000))
    fast.forward(20012, (PHONE, 4000), RELAY, 20014, ("192.0.2.9", 5000))  # no route there
    short = frame((PHONE, 4000), (RELAY, 20008), b"\x80" * 4)
    padded = short + b"\0" * (60 - len(short))  # an Ethernet minimum frame: trailer after the datagram
    assert _test_run(fast, padded, ifindex) == (NEXT, padded)
    unroutable = frame((PHONE, 4000), (RELAY, 20012), b"\x80" * 40)
    assert _test_run(fast, unroutable, ifindex) == (NEXT, unroutable)
    v6 = MAC["eb0"] + bytes.fromhex("020000000002") + b"\x86\xdd" + bytes(40 + 8 + 40)  # version 0
    assert _test_run(fast, v6, ifindex) == (NEXT, v6)


@settings(max_examples=150, deadline=None)
@given(src=st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 65535)),
       relay_port=st.integers(1024, 65534), out_port=st.integers(1024, 65535),
       dst=st.tuples(st.integers(4, 254), st.integers(1, 65535)),
       ttl=st.integers(2, 255), payload=st.binary(max_size=300))
def test_checksums_stay_valid_for_any_addresses_ports_and_payload(
        lane: tuple[FastPath, int], src: tuple[int, int], relay_port: int, out_port: int,
        dst: tuple[int, int], ttl: int, payload: bytes) -> None:
    """The incremental deltas (RFC 1624), computed once per direction in Python and
    applied by the kernel's helpers, give the same checksums a full recomputation
    would: whatever the fields, carries included."""
    fast, ifindex = lane
    src_addr = (socket.inet_ntoa(struct.pack("!I", src[0])), src[1])
    dst_addr = (f"10.1.0.{dst[0]}", dst[1])  # on the veth's link: the FIB forwards there
    fast.forward(relay_port, src_addr, RELAY, out_port, dst_addr)
    try:
        verdict, out = _test_run(fast, frame(src_addr, (RELAY, relay_port), payload, ttl=ttl), ifindex)
    finally:
        fast.stop_forwarding(relay_port)
    assert verdict == REDIRECT
    assert out[22] == ttl - 1
    assert out[26:38] == (socket.inet_aton(RELAY) + socket.inet_aton(dst_addr[0])
                          + struct.pack("!HH", out_port, dst_addr[1]))
    assert checksums_valid(out) == (True, True)


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


@given(old=st.binary(min_size=12, max_size=12), new=st.binary(min_size=12, max_size=12))
def test_csum_delta_turns_the_old_checksum_into_the_new_one(old: bytes, new: bytes) -> None:
    """Pure (RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), in the host's word order as the
    kernel's helpers use it): the old checksum updated by the delta is the checksum
    computed from scratch over the new bytes (+0 and -0 being the same number)."""
    rest = b"\x45\x00\x00\x54\x12\x34"
    words = lambda b: sum(struct.unpack(f"={len(b) // 2}H", b))  # noqa: E731
    before = 0xFFFF - _fold(words(rest + old))
    updated = 0xFFFF - _fold((0xFFFF - before) + csum_delta(old, new))
    want = 0xFFFF - _fold(words(rest + new))
    assert updated == want or {updated, want} == {0, 0xFFFF}


def test_the_lane_goes_on_ethernet_interfaces_only(lane: tuple[FastPath, int]) -> None:
    """The program reads an Ethernet header: loopback (and L3 tunnels) are left out."""
    with inside(NS):
        assert sorted(name for _, name in ethernet_interfaces()) == ["eb0", "eb1"]


def test_an_ipv6_direction_is_rewritten_counted_and_redirected(lane: tuple[FastPath, int]) -> None:
    fast, ifindex = lane
    fast.forward(21000, (PHONE6, 4000), RELAY6, 21002, (PBX6, 5000))
    fast.reset(21000)
    sent = frame6((PHONE6, 4000), (RELAY6, 21000), b"\x80" * 172, hops=64)
    verdict, out = _test_run(fast, sent, ifindex)
    assert verdict == REDIRECT
    assert out[22:58] == (socket.inet_pton(socket.AF_INET6, RELAY6) + socket.inet_pton(socket.AF_INET6, PBX6)
                          + struct.pack("!HH", 21002, 5000))
    assert out[21] == 63  # hop limit - 1
    assert checksum6_valid(out)
    assert out[:6] == bytes.fromhex(NEIGH_MAC.replace(":", "")) and out[6:12] == MAC["eb0"]
    assert out[58:60] == sent[58:60] and out[62:] == sent[62:]
    assert fast.count(21000) == (1, len(sent) - 14)
    for why, other in (("another source port", frame6((PHONE6, 4001), (RELAY6, 21000), b"x" * 40)),
                       ("an extension header", frame6((PHONE6, 4000), (RELAY6, 21000), b"x" * 40,
                                                      next_header=0)),
                       ("hop limit 1", frame6((PHONE6, 4000), (RELAY6, 21000), b"x" * 40, hops=1)),
                       ("no checksum", frame6((PHONE6, 4000), (RELAY6, 21000), b"x" * 40, checksum=False))):
        assert _test_run(fast, other, ifindex) == (NEXT, other), why
    fast.stop_forwarding(21000)
    assert _test_run(fast, sent, ifindex) == (NEXT, sent)
    assert fast.count(21000) == (1, len(sent) - 14)


@settings(max_examples=100, deadline=None)
@given(src=st.tuples(st.binary(min_size=16, max_size=16), st.integers(1, 65535)),
       relay_port=st.integers(1024, 65534), out_port=st.integers(1024, 65535),
       dst=st.tuples(st.integers(4, 2**16 - 1), st.integers(1, 65535)), payload=st.binary(max_size=300))
def test_ipv6_checksums_stay_valid_for_any_addresses_ports_and_payload(
        lane: tuple[FastPath, int], src: tuple[bytes, int], relay_port: int, out_port: int,
        dst: tuple[int, int], payload: bytes) -> None:
    fast, ifindex = lane
    src_addr = (socket.inet_ntop(socket.AF_INET6, src[0]), src[1])
    dst_addr = (f"fd00:1::{dst[0]:x}", dst[1])  # on the veth's link
    fast.forward(relay_port, src_addr, RELAY6, out_port, dst_addr)
    try:
        verdict, out = _test_run(fast, frame6(src_addr, (RELAY6, relay_port), payload), ifindex)
    finally:
        fast.stop_forwarding(relay_port)
    assert verdict == REDIRECT
    assert checksum6_valid(out)
