"""ClusterNode (relay/cluster/node.py) over a MemoryState: claims, releases, lookups and their limits.

The node runs with its real link listener on 127.0.0.1 (an ephemeral port) and a
Transports of its own; the shared state is in memory so the test reads what was written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio

from relay.cluster import MemoryState, PbxClaim
from relay.cluster.node import ClusterNode, NodeSettings
from relay.config import load
from relay.proxy.effects import LOCATE_BUSY, LOCATED, NOWHERE, ClaimPbx, LocatePbx, ReleasePbx
from relay.proxy.flow import Flow
from relay.proxy.registrar import PbxRegistration
from relay.service import cluster_node, proxy_config
from relay.transport.events import EventHandlers
from relay.transport.flows import Transports

PBX = Flow("tcp", "203.0.113.7", 41000, "127.0.0.1", 5060)
SECRET = b"s" * 40


@dataclass
class Rig:
    node: ClusterNode
    state: MemoryState
    located: list[tuple[LocatePbx, Flow | None, str]] = field(default_factory=list)
    registrations: list[PbxRegistration] = field(default_factory=list)


def settings(node_id: str, max_pending_lookups: int = 100) -> NodeSettings:
    return NodeSettings(node_id=node_id, redis_url="redis://127.0.0.1:1", listen_host="127.0.0.1",
                        listen_port=0, advertise="", secret=SECRET, timeout=0.25, heartbeat=60.0,
                        max_links=8, max_pending_lookups=max_pending_lookups)


async def start(nursery: trio.Nursery, state: MemoryState, node_id: str, **kw: int) -> Rig:
    rig = Rig(None, state)  # type: ignore[arg-type]
    transports = Transports(EventHandlers(lambda m, f: None, lambda e, f: None, lambda n, c: None))
    rig.node = ClusterNode(settings(node_id, **kw), transports,
                           lambda loc, link, outcome: rig.located.append((loc, link, outcome)),
                           lambda claim, now: f"tok-{claim.serial}", lambda: rig.registrations,
                           lambda name: None)
    await nursery.start(rig.node.run, state)
    return rig


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


def locate(serial: str) -> LocatePbx:
    return LocatePbx(serial, None)  # type: ignore[arg-type]  # the hop is opaque to the node


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_claims_and_releases_reach_the_shared_state(nursery: trio.Nursery) -> None:
    state = MemoryState()
    rig = await start(nursery, state, "node-a")
    assert rig.node.problem is None
    assert await state.node_address("node-a") == rig.node.address
    rig.node.submit(ClaimPbx("0123456789", PBX, 600))
    await settle()
    assert await state.pbx_node("0123456789") == PbxClaim("node-a", "tok-0123456789")
    rig.node.submit(ReleasePbx("0123456789"))
    await settle()
    assert await state.pbx_node("0123456789") is None


async def test_a_release_never_drops_another_nodes_claim(nursery: trio.Nursery) -> None:
    state = MemoryState()
    rig = await start(nursery, state, "node-a")
    await state.claim_pbx("0123456789", "node-b", "tokB", 600)  # the PBX moved to B
    rig.node.submit(ReleasePbx("0123456789"))  # A's late release
    await settle()
    assert await state.pbx_node("0123456789") == PbxClaim("node-b", "tokB")


async def test_lookups_nowhere_self_and_located(nursery: trio.Nursery) -> None:
    state = MemoryState()
    a = await start(nursery, state, "node-a")
    b = await start(nursery, state, "node-b")
    await state.claim_pbx("1111111111", "node-a", "tok", 600)
    await state.claim_pbx("2222222222", "node-gone", "tok", 600)  # no heartbeat: gone
    for serial in ("0000000000", "2222222222", "1111111111"):
        b.node.submit(locate(serial))
    a.node.submit(locate("1111111111"))  # claimed by itself yet not registered: stale
    with trio.fail_after(5):
        while len(a.located) + len(b.located) < 4:
            await trio.sleep(0.01)
    outcomes = {(loc.serial, outcome) for loc, _, outcome in b.located}
    assert outcomes == {("0000000000", NOWHERE), ("2222222222", NOWHERE), ("1111111111", LOCATED)}
    link = next(link for loc, link, _ in b.located if loc.serial == "1111111111")
    assert link is not None and link.transport == "cluster"
    assert [o for _, _, o in a.located] == [NOWHERE]
    assert b.node.pending_lookups == 0


async def test_lookups_over_the_limit_are_busy_at_once(nursery: trio.Nursery) -> None:
    rig = await start(nursery, MemoryState(), "node-a", max_pending_lookups=2)
    for serial in ("1", "2", "3"):
        rig.node.submit(locate(serial))
    assert [(loc.serial, o) for loc, _, o in rig.located] == [("3", LOCATE_BUSY)]  # before any task ran
    await settle()
    assert sorted(o for _, _, o in rig.located) == [LOCATE_BUSY, NOWHERE, NOWHERE]


def test_no_redis_url_no_node() -> None:
    """Off by default: the single-node relay builds no cluster node and its core claims nothing."""
    cfg = load(None, environ={})
    assert cluster_node(cfg, None, None, None) is None  # type: ignore[arg-type]
    assert proxy_config(cfg).cluster is False
    assert "cluster" not in proxy_config(cfg).ports
