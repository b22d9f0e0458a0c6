"""The userspace forwarder with real sockets under trio: closing early, odd ports."""

from __future__ import annotations

import socket

import trio

from relay.media.forwarder import UdpForwarder
from relay.media.ports import PortPool
from relay.media.session import PBX, PHONE, Leg
from tests.mediarig import MediaRig


def _sdp(port: int) -> bytes:
    return (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\n").encode()


async def test_leg_closed_before_its_tasks_ran_does_not_kill_the_nursery() -> None:
    counts: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        fwd = UdpForwarder("127.0.0.1", lambda n, k: counts.__setitem__(n, counts.get(n, 0) + k))
        fwd.attach(nursery)
        mc = MediaRig(fwd, "127.0.0.1", PortPool(31000, 31100))
        for n in range(20):  # INVITE and BYE handled in one go: open, then close at once
            mc.on_sdp(f"c{n}", PHONE, _sdp(4000), "127.0.0.1", 0.0)
            mc.end(f"c{n}")
        # a new call reuses the descriptors the closed sockets had
        mc.on_sdp("live", PHONE, _sdp(4000), "127.0.0.1", 0.0)
        mc.on_sdp("live", PBX, _sdp(5000), "127.0.0.1", 0.0)
        await trio.sleep(0.05)
        legs = mc.sessions["live"].streams[0].legs
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pbx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind(("127.0.0.1", 0))
            pbx.bind(("127.0.0.1", 0))
            pbx.sendto(b"\x80" + b"x" * 171, ("127.0.0.1", legs[PBX].port))  # latches the PBX
            await trio.sleep(0.05)
            phone.sendto(b"\x80" + b"p" * 171, ("127.0.0.1", legs[PHONE].port))
            await trio.sleep(0.1)
            pbx.setblocking(False)
            assert pbx.recv(2048) == b"\x80" + b"p" * 171  # the live call still forwards
        assert legs[PHONE].packets == 1 and legs[PBX].packets == 1
        mc.end("live")
        for leg in legs.values():  # the call's four ports are closed: another program may bind them
            for port in (leg.port, leg.port + 1):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                    again.bind(("127.0.0.1", port))
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
