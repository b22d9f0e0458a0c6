"""Media sessions and Latch without sockets: ports, latching, teardown, timeouts."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from relay.media.ports import PortPool
from relay.media.sdp import parse_sdp
from relay.media.session import PBX, PHONE, Latch, Leg, NoPorts, UnusableSdp
from tests.mediarig import MediaRig

RELAY = "198.51.100.10"


class FakeBackend:
    """Ports bound and forwarding, as a backend would hold them; ``taken``: pairs another
    program holds."""

    def __init__(self, taken: set[int] | None = None) -> None:
        self.bound: set[int] = set()
        self.open_ports: set[int] = set()
        self.taken = taken or set()
        self.relatched: list[int] = []

    def bind(self, port: int) -> bool:
        if port in self.taken:
            return False
        self.bound.add(port)
        return True

    def open(self, leg: Leg) -> None:
        assert leg.port in self.bound, "a leg opens only on a pair bound before"
        self.open_ports |= {leg.port, leg.port + 1}

    def close(self, leg: Leg) -> None:
        self.open_ports -= {leg.port, leg.port + 1}
        self.bound.discard(leg.port)

    def relatch(self, leg: Leg) -> None:
        self.relatched.append(leg.port)


def sdp(ip: str = "10.77.1.2", port: int = 4000, extra: str = "", video: bool = False) -> bytes:
    text = (f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n{extra}")
    if video:
        text += f"m=video {port + 2} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    return text.encode()


def controller(**kw: object) -> tuple[MediaRig, FakeBackend]:
    backend = FakeBackend(**kw)  # type: ignore[arg-type]
    return MediaRig(backend, RELAY, PortPool(10000, 10020), 60.0), backend


def test_offer_and_answer_each_see_the_other_sides_relay_ports() -> None:
    mc, backend = controller()
    to_pbx = parse_sdp(mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0))
    to_phone = parse_sdp(mc.on_sdp("c1", PBX, sdp("10.77.2.2", 5000), "203.0.113.130", 0.1))
    assert to_pbx.media[0].conn == RELAY and to_phone.media[0].conn == RELAY
    legs = mc.sessions["c1"].streams[0].legs
    assert to_pbx.media[0].port == legs[PBX].port
    assert to_phone.media[0].port == legs[PHONE].port
    assert legs[PHONE].port != legs[PBX].port
    assert backend.open_ports == {10000, 10001, 10002, 10003}
    # before any packet: the SDP's port at the address the SIP came from — never
    # the private address the SDP names (the phone is behind NAT)
    assert legs[PHONE].rtp.destination() == ("203.0.113.2", 4000)
    assert legs[PHONE].rtcp.destination() == ("203.0.113.2", 4001)


def test_first_packets_of_the_callee_are_accepted_before_its_answer() -> None:
    # The PBX's RTP can overtake its 200 OK (TCP): its leg already accepts the
    # PBX's SIP address when the offer is forwarded.
    mc, _ = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0, peer_ip="203.0.113.130")
    pbx_leg = mc.sessions["c1"].streams[0].legs[PBX]
    assert not pbx_leg.rtp.accept(("192.0.2.66", 5000))
    assert pbx_leg.rtp.accept(("203.0.113.130", 5000))


def test_layered_port_count_streams_are_rejected_not_half_served() -> None:
    mc, backend = controller()
    out = parse_sdp(mc.on_sdp("c1", PHONE, sdp().replace(b"m=audio 4000 ", b"m=audio 4000/2 "),
                              "203.0.113.2", 0.0))
    assert out.media[0].port == 0 and not backend.open_ports


def test_latching_accepts_the_signalling_ip_then_only_the_latched_source() -> None:
    latch = Latch()
    latch.reopen(("10.77.1.2", 4000), "203.0.113.2")
    assert not latch.accept(("192.0.2.66", 4000))  # a stranger before latching: no bleed
    assert latch.accept(("203.0.113.2", 40123))  # the phone's NAT address
    assert latch.destination() == ("203.0.113.2", 40123)
    assert not latch.accept(("203.0.113.2", 40999))  # same IP, other port: not after latching
    assert latch.accept(("203.0.113.2", 40123))


def test_reinvite_with_a_new_address_reopens_latching_only_for_that_side() -> None:
    mc, backend = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    mc.on_sdp("c1", PBX, sdp("10.77.2.2", 5000), "203.0.113.130", 0.1)
    legs = mc.sessions["c1"].streams[0].legs
    assert legs[PHONE].rtp.accept(("203.0.113.2", 40000))
    assert legs[PBX].rtp.accept(("203.0.113.130", 50000))
    # same SDP again (a session refresh): latching kept, the backend not told
    relatched = list(backend.relatched)
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 5.0)
    assert legs[PHONE].rtp.latched == ("203.0.113.2", 40000)
    assert backend.relatched == relatched
    # the phone moved to LTE: new address in its SDP and a new signalling IP
    mc.on_sdp("c1", PHONE, sdp("100.64.7.9", 6000), "198.18.0.7", 6.0)
    assert legs[PHONE].rtp.latched is None
    assert backend.relatched == [*relatched, legs[PHONE].port]  # the backend hears of it once
    assert not legs[PHONE].rtp.accept(("203.0.113.2", 40000))  # the old source is refused
    assert legs[PHONE].rtp.accept(("198.18.0.7", 33333))
    assert legs[PBX].rtp.latched == ("203.0.113.130", 50000)  # the other side untouched


def test_disabled_stream_gets_no_ports_and_end_frees_everything() -> None:
    mc, backend = controller()
    body = sdp(video=True).replace(b"m=video 4002", b"m=video 0")
    out = parse_sdp(mc.on_sdp("c1", PHONE, body, "203.0.113.2", 0.0))
    assert out.media[1].port == 0
    assert backend.open_ports == {10000, 10001, 10002, 10003}
    assert mc.end("c1") and not backend.open_ports and mc.ports.in_use == 0
    assert not mc.end("c1")


def test_failed_invite_ends_media_but_failed_reinvite_does_not() -> None:
    mc, backend = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    mc.failed("c1")
    assert "c1" not in mc.sessions and not backend.open_ports
    mc.on_sdp("c2", PHONE, sdp(), "203.0.113.2", 0.0)
    mc.established("c2")
    mc.failed("c2")  # e.g. 491 to a re-INVITE
    assert "c2" in mc.sessions


def test_no_media_timeout_counts_rtcp_as_life() -> None:
    mc, _ = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    mc.established("c1")
    legs = mc.sessions["c1"].streams[0].legs
    legs[PBX].last_seen = 50.0  # e.g. RTCP only, on hold
    assert mc.expire(100.0) == []
    assert mc.expire(110.0) == ["c1"]


def test_ports_taken_by_another_program_are_skipped_and_exhaustion_is_an_error() -> None:
    mc, backend = controller(taken={10000})
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    assert 10000 not in backend.open_ports and mc.ports.in_use == 2
    with pytest.raises(NoPorts):
        for n in range(10):
            mc.on_sdp(f"x{n}", PHONE, sdp(), "203.0.113.2", 0.0)
    # the call that found no second pair gave its first one back: nothing leaks
    assert mc.ports.available == 1
    assert mc.ports.in_use * 2 == len(backend.open_ports)
    assert all(s.streams for s in mc.sessions.values())


def test_unusable_sdp_is_a_media_error() -> None:
    mc, backend = controller()
    with pytest.raises(UnusableSdp):
        mc.on_sdp("c1", PHONE, b"this is not sdp", "203.0.113.2", 0.0)
    assert not backend.open_ports


def test_a_ringing_call_is_not_judged_by_its_media() -> None:
    mc, _ = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    assert mc.expire(200.0) == []  # rings long, no early media: still there
    assert mc.expire(241.0) == ["c1"]  # past Timer C and the safety margin


def test_an_offer_in_an_established_call_waits_for_its_2xx() -> None:
    mc, _ = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    mc.on_sdp("c1", PBX, sdp("10.77.2.2", 5000), "203.0.113.130", 0.1)
    mc.established("c1")
    phone = mc.sessions["c1"].streams[0].legs[PHONE]
    assert phone.rtp.accept(("203.0.113.2", 40000))
    # re-INVITE offering a new port, rejected (488): nothing changes
    mc.on_sdp("c1", PHONE, sdp(port=4100), "203.0.113.2", 5.0, offer=True)
    assert phone.rtp.latched == ("203.0.113.2", 40000)
    mc.failed("c1")
    assert "c1" in mc.sessions and phone.pending is None
    assert phone.rtp.latched == ("203.0.113.2", 40000)
    # the same offer accepted (2xx): latching reopens for the new address
    mc.on_sdp("c1", PHONE, sdp(port=4100), "203.0.113.2", 6.0, offer=True)
    mc.established("c1")
    assert phone.rtp.latched is None and phone.rtp.destination() == ("203.0.113.2", 4100)


def test_an_sdp_refused_half_way_keeps_none_of_its_ports() -> None:
    """Ports for the first streams were taken when a later one found none: the refused
    SDP gives every one of them back (a 503 must not leave 16 pairs behind)."""
    mc, backend = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)  # 2 of 10 pairs
    def streams(n: int) -> bytes:
        return sdp() + b"".join(f"m=audio {5000 + 2 * i} RTP/AVP 0\r\n".encode() for i in range(n - 1))

    many = streams(5)
    with pytest.raises(NoPorts):  # 5 streams want 10 pairs, 8 are left
        mc.on_sdp("c2", PHONE, many, "203.0.113.3", 0.0)
    assert "c2" not in mc.sessions
    assert mc.ports.in_use == 2 and backend.open_ports == {10000, 10001, 10002, 10003}
    assert mc.ports.ready == 8  # back in the reserve, still bound
    mc.on_sdp("c3", PHONE, streams(4), "203.0.113.4", 0.0)  # 8 pairs: exactly what is left
    assert mc.ports.in_use == 10


def test_the_reserve_is_topped_up_and_a_busy_pair_is_replaced() -> None:
    backend = FakeBackend(taken={20004})
    rig = MediaRig(backend, RELAY, PortPool(20000, 21000, reserve=4), 60.0)
    assert rig.ports.ready == 4 and backend.bound == {20000, 20002, 20006, 20008}  # 20004 skipped
    rig.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    assert rig.ports.ready == 4 and rig.ports.in_use == 2  # two taken, two bound in their place


def test_counts_a_backend_reads_when_it_closes_a_leg_are_kept() -> None:
    """The kernel backend reads a leg's last counters when it closes it, after end()."""
    mc, _ = controller()
    mc.on_sdp("c1", PHONE, sdp(), "203.0.113.2", 0.0)
    legs = mc.sessions["c1"].legs()
    for leg in legs:
        leg.packets, leg.octets = 10, 1720
    assert mc.media.relayed() == (10 * len(legs), 1720 * len(legs))
    mc.end("c1")
    for leg in legs:  # what the backend's close() found in the kernel since its last read
        leg.packets, leg.octets = 50, 8600
    assert mc.media.relayed() == (50 * len(legs), 8600 * len(legs))
    assert mc.media.relayed() == (50 * len(legs), 8600 * len(legs))  # counted once



@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    """Only reference counting frees objects while the test runs (what earlier tests
    left for the collector is collected first)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def legs_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Leg)


@pytest.mark.usefixtures("no_cyclic_collector")
def test_an_ended_or_refused_call_is_freed_by_reference_counting() -> None:
    """Issue 9: the Legs (and Latches) of an ended call, and of streams an SDP made before
    it was refused, go when their last reference does, not at the cyclic collector's next
    full collection (whose pauses were the setup-time p99 at 400 calls/s)."""
    mc, _ = controller()
    mc.on_sdp("c1", PHONE, sdp(video=True), "203.0.113.2", 0.0)
    mc.on_sdp("c1", PBX, sdp("10.77.2.2", 5000, video=True), "203.0.113.130", 0.1)
    mc.established("c1")
    session = weakref.ref(mc.sessions["c1"])
    assert legs_alive() == 4
    mc.end("c1")
    mc.media.relayed()  # the closed legs' last counts are folded in, the legs let go
    assert session() is None and legs_alive() == 0

    def streams(n: int) -> bytes:
        return sdp() + b"".join(f"m=audio {5000 + 2 * i} RTP/AVP 0\r\n".encode() for i in range(n - 1))

    mc.on_sdp("c2", PHONE, streams(4), "203.0.113.3", 0.0)  # 8 of 10 pairs
    with pytest.raises(NoPorts):  # 2 streams want 4 pairs, 2 are left: one stream made, undone
        mc.on_sdp("c3", PHONE, streams(2), "203.0.113.4", 0.0)
    assert legs_alive() == 8
