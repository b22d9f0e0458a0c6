"""Media anchored once across nodes (docs/cluster.md, "Media anchored once").

Two `pbx-relay run` nodes on a real redis-server: the PBX phoned home to node A over TCP,
a phone calls it through node B over UDP. Real RTP both ways, every packet checked; the
call's media is anchored by node B alone (where the call entered the cluster), node A
passes the SDPs on untouched, re-INVITEs from either side included.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.media_peers import (
    MediaEndpoint,
    PbxUa,
    Phone,
    establish,
    exchange,
    hang_up,
    pbx_reinvite,
    phone_reinvite,
    sdp_media_address,
    wait_metric,
)
from tests.realpeers import RelayProc
from tests.redisfixture import RedisServer
from tests.test_cluster_nodes import MEDIA_PORTS, nodes, redis_server, wait_for

__all__ = ["nodes", "redis_server"]  # the fixtures, by name
M = "pbx_relay_"
SESSIONS, PORTS, ENDED = f"{M}media_sessions", f"{M}media_ports_in_use", f"{M}media_sessions_ended_total"


@pytest.fixture
def endpoints() -> Iterator[list[MediaEndpoint]]:
    opened: list[MediaEndpoint] = []
    yield opened
    for e in opened:
        e.close()


def in_range(body: bytes, node: str) -> bool:
    """The SDP names a port of ``node``'s RTP range."""
    (_, port), _ = sdp_media_address(body)
    return MEDIA_PORTS[node] <= port <= MEDIA_PORTS[node] + 400


def test_a_call_through_two_nodes_is_anchored_once(
    nodes: tuple[RelayProc, RelayProc, RedisServer], endpoints: list[MediaEndpoint],
) -> None:
    a, b, _ = nodes
    pbx = PbxUa(a)  # registered on A (asserted)
    phone = Phone(b)
    try:
        wait_for("the PBX claimed", lambda: a.metric(f"{M}pbx_registered") == 1)
        ea, eb = MediaEndpoint("127.0.0.1"), MediaEndpoint("127.0.0.1")
        endpoints += [ea, eb]
        call = establish(phone, pbx, ea, eb)
        # Both sides were given B's ports: one media hop, on the node the call entered.
        assert in_range(call.pbx.offer.body, "node-b") and in_range(call.phone.answer.body, "node-b")
        assert (b.metric(SESSIONS), b.metric(PORTS)) == (1, 4)
        assert (a.metric(SESSIONS), a.metric(PORTS)) == (0, 0)
        exchange(ea, eb, 50)
        assert eb.wait_for(50) == 50 and ea.wait_for(50) == 50
        assert {r.src for r in eb.received} == {eb.relay_rtp}  # symmetric: from the ports it sends to
        assert {r.src for r in ea.received} == {ea.relay_rtp}

        # A re-INVITE from the PBX enters at A, which has no session: it passes it on to B.
        eb2 = MediaEndpoint("127.0.0.1")
        endpoints.append(eb2)
        got, resp = pbx_reinvite(call, eb2.sdp(version=2), ea.sdp(version=2))
        eb2.learn(resp.body)
        assert in_range(got.body, "node-b") and in_range(resp.body, "node-b")
        got_a = ea.count()
        exchange(ea, eb2, 50)
        assert eb2.wait_for(50) == 50 and ea.wait_for(got_a + 50) == got_a + 50
        # And one from the phone, straight to B's session.
        _, resp = phone_reinvite(call, ea.sdp(version=3), eb2.sdp(version=3))
        assert in_range(resp.body, "node-b")
        assert (a.metric(SESSIONS), b.metric(SESSIONS)) == (0, 1)

        hang_up(call)
        assert wait_metric(b, PORTS, 0) == 0 and b.metric(ENDED) == 1
        assert a.metric(ENDED) == 0 and a.metric(f"{M}media_sessions") == 0
    finally:
        pbx.close()
        phone.close()
