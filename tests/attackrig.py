"""A rig for the attack tests of issue 10: a real relay, a legit PBX and phone, attacker addresses.

The relay is a real ``pbx-relay run`` process (``relay_factory`` of tests/conftest.py)
with media anchored (the default ``[media]``) and ``[transport] exempt = []``: loopback
is exempt from per-source limits by default, and here every source, the legit ones
included, is held to them. The legit parties sit on 127.0.0.1: a PBX phoned home over
TCP and registered (``tests.media_peers.PbxUa``) and a softphone over UDP (``Phone``).
The attackers send from ``ATTACKER`` and ``ATTACKER2``: every 127.0.0.0/8 address is on
lo, so each is a distinct source to the relay (its bans, limits and media shares).

Use it by importing the fixture into a test module (``from tests.attackrig import rig``,
with ``# noqa: F401`` on the import and ``# noqa: F811`` on the test's parameter), or
build one with ``make_rig(relay_factory, extra=...)`` for other ``[transport]`` /
``[limits]`` keys. After (and during) an attack a test checks:

- ``call_carries_rtp(rig)``: the phone calls the PBX through the relay and RTP crosses
  both ways, counted at the far ends;
- ``pbx_still_registers(rig)``: a fresh REGISTER on the PBX's connection is answered 200;
- ``rss_mib(rig.relay)``: the relay's resident memory (``RSS_SLACK_MIB`` is the issue's
  "returns within 50 MB").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.media_peers import MediaEndpoint, Peers, establish, exchange, hang_up
from tests.realpeers import RelayProc
from tests.sipclient import SERIAL

ATTACKER = "127.0.0.66"
ATTACKER2 = "127.0.0.67"
LEGIT = "127.0.0.1"
RSS_SLACK_MIB = 50.0

TRANSPORT = "[transport]\nexempt = []\n"
MEDIA_WINDOW = 400  # media ports per rig: 200 pairs, room for 16 calls of the largest SDP


def media_ports() -> str:
    """[media] lines: a window of its own, below the ephemeral ports (32768-60999), away
    from the default 10000-20000 that other relays on this host (benchmarks, other
    tests' relays running at the same time) bind and keep."""
    base = random.randrange(21_000, 32_000 - MEDIA_WINDOW, 2)
    return f"port_min = {base}\nport_max = {base + MEDIA_WINDOW}\n"


class Rig(Peers):
    """:class:`Peers` (the PBX registered from LEGIT over TCP, the phone on LEGIT over UDP,
    everything ``add``-ed closed at the end) and the relay's RSS once the PBX registered."""

    def __init__(self, relay: RelayProc, serial: str = SERIAL):
        super().__init__(relay, serial)  # PbxUa asserts the REGISTER's 200
        relay.wait_registered(serial)
        self.rss_before = rss_mib(relay)  # MiB

    def assert_rss_back(self, slack: float = RSS_SLACK_MIB) -> None:
        now = rss_mib(self.relay)
        assert now - self.rss_before <= slack, (
            f"relay RSS {now:.1f} MiB, {now - self.rss_before:.1f} MiB above {self.rss_before:.1f} before")


def rss_mib(relay: RelayProc) -> float:
    """The relay process's VmRSS in MiB (/proc/<pid>/status)."""
    assert relay.proc is not None and relay.alive(), f"relay not running\n{relay.log()[-2000:]}"
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


def make_rig(relay_factory: Callable[..., RelayProc], extra: str = "", media: str = "",
             serials: tuple[str, ...] = (SERIAL,)) -> Rig:
    """A rig whose relay gets ``extra`` after the ``[transport]`` table (so it may add keys
    to it, then open ``[limits]``), and ``media`` lines for ``[media]`` (besides its port
    window). ``serials``: the PBXs provisioned; the first is the legit PBX."""
    return Rig(relay_factory(TRANSPORT + extra, media=media_ports() + media, serials=serials), serials[0])


@pytest.fixture
def rig(relay_factory: Callable[..., RelayProc]) -> Iterator[Rig]:
    r = make_rig(relay_factory)
    yield r
    r.close()


def call_carries_rtp(rig: Rig, packets: int = 50) -> None:
    """The legit phone calls the PBX, ``packets`` RTP packets go each way and arrive at
    the far ends, from the relay's ports; then the phone hangs up (200)."""
    a, b = MediaEndpoint(LEGIT), MediaEndpoint(LEGIT)
    try:
        call = establish(rig.phone, rig.pbx, a, b)
        exchange(a, b, packets)
        got_b, got_a = b.wait_for(packets), a.wait_for(packets)
        assert (got_a, got_b) == (packets, packets), (
            f"RTP: phone got {got_a}, PBX got {got_b} of {packets} each way\n{rig.relay.log()[-2000:]}")
        assert {r.src for r in b.received} == {b.relay_rtp}, "PBX's media not from the relay's port"
        assert {r.src for r in a.received} == {a.relay_rtp}, "phone's media not from the relay's port"
        hang_up(call)
    finally:
        a.close()
        b.close()


def pbx_still_registers(rig: Rig) -> None:
    """A fresh REGISTER (challenge, then digest) on the PBX's connection is answered 200."""
    resp = rig.pbx.pbx.register(600)
    assert resp.status == 200, resp.raw
    rig.pbx.pbx.assert_bound()
