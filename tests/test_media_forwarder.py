"""The userspace forwarder with real sockets under trio: closing early, reused pairs, odd ports."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import trio

from relay.media.forwarder import DROPPED_IDLE, UdpForwarder
from relay.media.ports import PortPool
from relay.media.session import PBX, PHONE, Leg
from tests.mediarig import MediaRig


def _sdp(port: int) -> bytes:
    return (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\n").encode()


def _counter(counts: dict[str, int]) -> Callable[[str, int], None]:
    return lambda n, k: counts.__setitem__(n, counts.get(n, 0) + k)


def _udp(ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    s.setblocking(False)
    return s


def _received(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(2048))
        except BlockingIOError:
            return out


async def test_leg_closed_before_its_tasks_ran_does_not_kill_the_nursery() -> None:
    counts: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        fwd = UdpForwarder("127.0.0.1", _counter(counts))
        fwd.attach(nursery)
        mc = MediaRig(fwd, "127.0.0.1", PortPool(31000, 31100))
        for n in range(20):  # INVITE and BYE handled in one go: open, then close at once
            mc.on_sdp(f"c{n}", PHONE, _sdp(4000), "127.0.0.1", 0.0)
            mc.end(f"c{n}")
        mc.on_sdp("live", PHONE, _sdp(4000), "127.0.0.1", 0.0)
        mc.on_sdp("live", PBX, _sdp(5000), "127.0.0.1", 0.0)
        await trio.sleep(0.05)
        legs = mc.sessions["live"].streams[0].legs
        with _udp() as pbx, _udp() as phone:
            pbx.sendto(b"\x80" + b"x" * 171, ("127.0.0.1", legs[PBX].port))  # latches the PBX
            await trio.sleep(0.05)
            phone.sendto(b"\x80" + b"p" * 171, ("127.0.0.1", legs[PHONE].port))
            await trio.sleep(0.1)
            assert _received(pbx) == [b"\x80" + b"p" * 171]  # the live call still forwards
        assert legs[PHONE].packets == 1 and legs[PBX].packets == 1
        mc.end("live")
        assert counts["media_streams_forwarded:userspace"] == 0
        for leg in legs.values():  # the call's pairs stay bound, for the next calls
            for port in (leg.port, leg.port + 1):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again, \
                        pytest.raises(OSError):
                    again.bind(("127.0.0.1", port))
        fwd.close_all()
        for leg in legs.values():  # stopped: every port is free for another program
            for port in (leg.port, leg.port + 1):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                    again.bind(("127.0.0.1", port))
        nursery.cancel_scope.cancel()


async def test_calls_reuse_bound_pairs_without_binding_again() -> None:
    """Once the range has been bound, a call costs no socket: 200 calls on a 10-pair
    range hold 10 pairs, and each call gets the pairs freed longest ago."""
    binds: list[int] = []
    async with trio.open_nursery() as nursery:
        fwd = UdpForwarder("127.0.0.1", lambda n, k: None)
        real_bind = fwd.bind

        def counted_bind(port: int) -> bool:
            binds.append(port)
            return real_bind(port)

        fwd.bind = counted_bind  # type: ignore[method-assign]
        fwd.attach(nursery)
        mc = MediaRig(fwd, "127.0.0.1", PortPool(31400, 31420, reserve=2))
        seen: list[tuple[int, int]] = []
        for n in range(200):
            mc.on_sdp(f"c{n}", PHONE, _sdp(4000), "127.0.0.1", 0.0)
            legs = mc.sessions[f"c{n}"].streams[0].legs
            seen.append((legs[PHONE].port, legs[PBX].port))
            mc.end(f"c{n}")
        assert sorted(binds) == list(range(31400, 31420, 2))  # each pair bound once
        assert fwd.bound_pairs == 10 and mc.ports.held == 10
        # least recently freed first: a call's pairs come back only after the 4 other pairs
        for n in range(5, 200):
            assert seen[n] == seen[n - 5]
        fwd.close_all()
        nursery.cancel_scope.cancel()


async def test_late_packets_of_an_ended_call_are_dropped_and_counted() -> None:
    """The old call's peer keeps sending after BYE: while the pair is idle its packets
    are dropped as ``idle_port``; once a new call holds the pair they are not the new
    call's (unlatched), and the new call's own media flows."""
    counts: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        fwd = UdpForwarder("127.0.0.1", _counter(counts))
        fwd.attach(nursery)
        mc = MediaRig(fwd, "127.0.0.1", PortPool(31500, 31504, reserve=2))  # 2 pairs: reused at once
        old_phone = _udp("127.0.0.2")
        mc.on_sdp("old", PHONE, _sdp(4000).replace(b"127.0.0.1", b"127.0.0.2"), "127.0.0.2", 0.0)
        mc.on_sdp("old", PBX, _sdp(5000), "127.0.0.1", 0.0)
        old = mc.sessions["old"].streams[0].legs
        mc.end("old")
        with old_phone, _udp() as pbx, _udp("127.0.0.3") as phone:
            old_phone.sendto(b"late", ("127.0.0.1", old[PHONE].port))
            await trio.sleep(0.05)
            assert counts[DROPPED_IDLE] == 1
            mc.on_sdp("new", PHONE, _sdp(phone.getsockname()[1]).replace(b"127.0.0.1", b"127.0.0.3"),
                      "127.0.0.3", 0.0, peer_ip="127.0.0.1")
            mc.on_sdp("new", PBX, _sdp(pbx.getsockname()[1]), "127.0.0.1", 0.0)
            new = mc.sessions["new"].streams[0].legs
            assert {new[PHONE].port, new[PBX].port} == {old[PHONE].port, old[PBX].port}
            for _ in range(3):  # the old phone, still talking to "its" relay port
                old_phone.sendto(b"late", ("127.0.0.1", new[PHONE].port))
            await trio.sleep(0.05)
            phone.sendto(b"hello", ("127.0.0.1", new[PHONE].port))
            await trio.sleep(0.05)
            assert _received(pbx) == [b"hello"]
            assert counts["media_dropped_total:unlatched_source"] == 3
            assert new[PHONE].rtp.latched == phone.getsockname()
        fwd.close_all()
        nursery.cancel_scope.cancel()


async def test_rtp_on_port_65535_without_rtcp_line_is_no_crash() -> None:
    async with trio.open_nursery() as nursery:
        fwd = UdpForwarder("127.0.0.1", lambda n, k: None)
        fwd.attach(nursery)
        mc = MediaRig(fwd, "127.0.0.1", PortPool(31200, 31300))
        mc.on_sdp("c", PHONE, _sdp(65535), "127.0.0.1", 0.0)
        mc.on_sdp("c", PBX, _sdp(5000), "127.0.0.1", 0.0)
        leg: Leg = mc.sessions["c"].streams[0].legs[PHONE]
        assert leg.rtcp.destination() is None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pbx:
            pbx.bind(("127.0.0.1", 0))
            pbx.sendto(b"\x81\xc8" + b"r" * 50, ("127.0.0.1", mc.sessions["c"].streams[0].legs[PBX].port + 1))
            await trio.sleep(0.1)
        mc.end("c")
        nursery.cancel_scope.cancel()
