"""UDP sources while a worker restarts (docs/cluster.md, "Workers").

`run --workers 2` shares one UDP port between its workers (SO_REUSEPORT): the kernel
picks a worker per source address. When one worker dies its socket leaves the group and
every source goes to the survivor, at once (a phone retransmitting as RFC 3261 Timer E
says is answered); when the parent has started it again, sources spread over both again.
A real redis-server, the real parent and workers; sources on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realpeers import DOMAIN
from tests.test_cluster_nodes import wait_for
from tests.test_workers import Parent, ready_, redis_server, two_workers

__all__ = ["redis_server", "two_workers"]  # the fixtures, by name
SOURCES = 16  # all on one worker by chance: 2 x 2^-16
NOWHERE = 'pbx_relay_cluster_lookups_total{outcome="nowhere"}'
TIMER_E = (0.5, 1.0, 2.0)  # RFC 3261 §17.1.2.2: a UDP client's retransmissions


@pytest.fixture
def sources() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(SOURCES):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def probe(s: socket.socket, port: int) -> str:
    """OPTIONS for a serial no node holds (each worker answers 480 after a lookup it
    counts), retransmitted as a UDP client does; the status line, or "" if none came."""
    local = s.getsockname()[1]
    data = (f"OPTIONS sip:5555555555.{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-r{time.monotonic_ns()};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=r1\r\nTo: <sip:x@{DOMAIN}>\r\n"
            f"Call-ID: r-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
    for wait in TIMER_E:
        s.sendto(data, ("127.0.0.1", port))
        s.settimeout(wait)
        try:
            return s.recv(65535).split(b"\r\n", 1)[0].decode()
        except TimeoutError:
            continue
    return ""


def no_descriptors(pid: int) -> bool:
    """The process holds no descriptor (gone, or a zombie the parent has not reaped)."""
    try:
        return not any(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return True


def serving(view: dict[str, object], pid: int) -> bool:
    """The parent's view of a worker says ``pid`` serves."""
    return view["pid"] == pid and bool(view["serving"])


def spread(parent: Parent, socks: list[socket.socket]) -> list[int]:
    """Which worker answers each source (the one whose lookup count went up)."""
    workers = parent.workers
    out = []
    for s in socks:
        before = [w.metric(NOWHERE) for w in workers]
        assert probe(s, workers[0].udp) == "SIP/2.0 480 Temporarily Unavailable"
        after = [w.metric(NOWHERE) for w in workers]
        (index,) = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
        out.append(index)
    return out


def test_a_worker_killed_leaves_its_udp_sources_to_the_other_and_gets_them_back(
    two_workers: tuple[Parent, object], sources: list[socket.socket],
) -> None:
    parent, _ = two_workers
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    first = spread(parent, sources)
    assert set(first) == {0, 1}, first  # the kernel spreads sources over both

    views = parent.views()
    victim = views[1]["pid"]
    survivor = parent.workers[0]
    counted = survivor.metric(NOWHERE)
    os.kill(victim, signal.SIGKILL)
    # Its socket leaves the group when the process is gone (no descriptors left).
    wait_for("the worker gone", lambda: no_descriptors(victim), timeout=5)
    wait_for("the parent saw it die", lambda: not serving(parent.views()[1], victim), timeout=5)
    # Every source is answered while the parent waits to start it again (RESTART_DELAY).
    answers = [probe(s, survivor.udp) for s in sources]
    assert answers == ["SIP/2.0 480 Temporarily Unavailable"] * SOURCES, answers
    # All by the survivor (a probe retransmitted on a slow lookup counts twice): none by a
    # worker 1 started again in the meantime.
    assert survivor.metric(NOWHERE) >= counted + SOURCES

    wait_for("the worker again", lambda: len(parent.children()) == 2 and victim not in parent.children(),
             timeout=15)
    wait_for("both workers ready again", lambda: all(ready_(w) for w in parent.workers), timeout=15)
    again = spread(parent, sources)
    assert set(again) == {0, 1}, again  # sources spread over both again
