"""The Dispatcher (relay/dispatch.py) carries out the core's effects in order, and what
an effect leads to at once in its place — without recursion, however long the chain."""

from __future__ import annotations

from relay.dispatch import Dispatcher
from relay.media.effects import BindPorts
from relay.proxy.effects import Effect, Send
from relay.proxy.flow import Flow

FLOW = Flow("udp", "192.0.2.1", 5060, "127.0.0.1", 5060)


class RefillingProxy:
    """What the media reserve does when every pair it binds is held by another program:
    on each failed bind it asks for the next pair, then says so, ``rounds`` times."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.reports: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def on_ports_bound(self, bound: tuple[int, ...], failed: tuple[int, ...]) -> list[Effect]:
        self.reports.append((bound, failed))
        n = len(self.reports)
        if n >= self.rounds:
            return [Send(FLOW, b"done")]
        return [BindPorts((10_000 + 2 * n,)), Send(FLOW, f"after {n}".encode())]

    def next_timer(self) -> float:
        return float("inf")


class BusyPorts:
    """A media backend whose every port is taken."""

    def bind(self, port: int) -> bool:
        return False


def test_a_long_chain_of_refills_runs_in_order_without_recursion() -> None:
    rounds = 5_000  # five times Python's default recursion limit
    proxy = RefillingProxy(rounds)
    sent: list[bytes] = []
    dispatcher = Dispatcher(proxy, lambda sends: sent.extend(s.data for s in sends), BusyPorts())  # type: ignore[arg-type]
    dispatcher.run([BindPorts((10_000,)), Send(FLOW, b"first")])
    assert len(proxy.reports) == rounds and all(r == ((), r[1]) for r in proxy.reports)
    # depth first: each bind's consequences before what followed it
    assert sent[-1] == b"first" and sent[-2] == b"after 1" and sent[0] == b"done"
    assert len(sent) == rounds + 1
