"""What nodes share to hold the line together (docs/cluster.md): a source banned for
guessing digests on one node is refused on every node, legitimate sources untouched
("Shared bans"); a nonce one node gave is honoured by another ("The node key").

Two `pbx-relay run` nodes on a real redis-server; the guesser connects from 127.0.0.2 (its
own source to the relays), the legitimate PBX from 127.0.0.1.
"""

from __future__ import annotations

import trio

from relay.cluster import MemoryState
from relay.cluster.bans import SharedBans
from relay.cluster.state import SharedStateUnavailable
from relay.proxy.authbans import FIRST_BAN, MAX_FAILURES, AuthBans
from relay.proxy.effects import ShareBan
from tests.realpeers import DOMAIN, RelayProc
from tests.redisfixture import RedisServer
from tests.sipclient import Pbx, Stream, authorization, challenge, pbx_register, rand
from tests.test_cluster_nodes import SERIAL, nodes, redis_cli, redis_server, wait_for

__all__ = ["nodes", "redis_server"]  # the fixtures, by name
GUESSER = "127.0.0.2"


def bare_register(relay: RelayProc, source: str) -> int:
    """A REGISTER without credentials from ``source``: 401 (challenged) or 403 (banned)."""
    stream = Stream(relay, source)
    try:
        return pbx_register(stream, SERIAL, cseq=1, call_id=rand()).status or 0
    finally:
        stream.sock.close()


def guess(relay: RelayProc, source: str) -> int:
    """One wrong digest response from ``source``; the status it drew."""
    stream = Stream(relay, source)
    try:
        call_id = rand()
        first = pbx_register(stream, SERIAL, cseq=1, call_id=call_id)
        if first.status != 401:
            return first.status or 0
        auth = authorization(challenge(first, "MD5"), SERIAL, "wrong-secret", f"sip:{SERIAL}@{DOMAIN}")
        return pbx_register(stream, SERIAL, cseq=2, call_id=call_id, auth=auth).status or 0
    finally:
        stream.sock.close()


def test_a_source_banned_on_one_node_is_refused_on_every_node(
    nodes: tuple[RelayProc, RelayProc, RedisServer],
) -> None:
    a, b, redis = nodes
    b.secrets[SERIAL] = a.secrets[SERIAL]  # one directory for the cluster (relay/pbx/shared.py)
    assert bare_register(b, GUESSER) == 401  # not banned anywhere yet
    assert [guess(a, GUESSER) for _ in range(MAX_FAILURES)] == [403] * MAX_FAILURES
    assert a.metric("pbx_relay_pbx_auth_bans_total") == 1
    assert redis_cli(redis, "XLEN", "pbxrelay:bans") == "1"
    # B learns it within a poll: the guesser's bare REGISTER is refused unchecked...
    wait_for("B refuses the guesser", lambda: bare_register(b, GUESSER) == 403, timeout=5)
    assert b.metric("pbx_relay_pbx_auth_bans_shared_total") == 1
    assert b.metric('pbx_relay_pbx_auth_refused_total{reason="banned"}') >= 1
    # ... and so is the right secret from it (a ban holds for guessers who guessed right).
    stream = Stream(b, GUESSER)
    try:
        call_id = rand()
        first = pbx_register(stream, SERIAL, cseq=1, call_id=call_id)
        assert first.status == 403
    finally:
        stream.sock.close()
    # Everyone else is untouched: the PBX from 127.0.0.1 registers on B with B's secret.
    assert bare_register(b, "127.0.0.1") == 401
    pbx = Pbx(b, SERIAL)  # REGISTER → 401 → 200, asserted
    pbx.stream.sock.close()
    # A wrote the one log line fail2ban reads; B none (one ban, one line).
    assert "event=auth_banned source=127.0.0.2" in a.log()
    assert "event=auth_banned" not in b.log()


async def test_a_node_reads_the_bans_in_force_and_skips_its_own_and_ended_ones() -> None:
    clock = [1000.0]
    state = MemoryState(lambda: clock[0])
    await state.share_ban("192.0.2.1", 60, "node-a")
    await state.share_ban("192.0.2.2", 5, "node-a")
    await state.share_ban("192.0.2.3", 60, "node-b")  # node B's own
    clock[0] += 10  # 192.0.2.2's ban ended
    imposed: list[tuple[str, float]] = []
    node_b = SharedBans("node-b", lambda ip, seconds: imposed.append((ip, seconds)), lambda name: None)
    assert await node_b.read(state) == 1  # a node starting reads every ban in force
    assert imposed == [("192.0.2.1", 50.0)]
    assert await node_b.read(state) == 0  # nothing new: nothing imposed twice
    await state.share_ban("192.0.2.4", 60, "node-a")
    assert await node_b.read(state) == 1 and imposed[-1] == ("192.0.2.4", 60.0)


async def test_bans_wait_in_a_bounded_queue_and_a_silent_store_is_counted() -> None:
    counted: list[str] = []

    class Down(MemoryState):
        async def bans_after(self, cursor: str, count: int) -> tuple[list, str]:  # type: ignore[type-arg]
            raise SharedStateUnavailable("down")

    node = SharedBans("node-a", lambda ip, seconds: None, counted.append)
    for i in range(1500):  # SHARE_QUEUE is 1000: the rest is counted, the node never blocks
        node.share(ShareBan(f"192.0.2.{i % 250}", 60))
    assert counted.count("cluster_bans_dropped_total") == 500
    assert await node.read(Down()) == 0 and node.cursor == ""
    assert counted[-1] == "cluster_store_errors_total:read_bans"
    # and the queued bans are written once the writer runs
    state = MemoryState()
    async with trio.open_nursery() as n:
        n.start_soon(node.run, state)
        await trio.sleep(0.2)
        n.cancel_scope.cancel()
    bans, _ = await state.bans_after("", 2000)
    assert len(bans) == 1000 and {b.node_id for b in bans} == {"node-a"}


def test_impose_keeps_a_longer_ban_and_is_bounded() -> None:
    bans = AuthBans(max_sources=3)
    assert bans.impose("192.0.2.1", FIRST_BAN * 4, 0.0) is True
    assert bans.impose("192.0.2.1", FIRST_BAN, 1.0) is False  # already banned, longer
    assert bans.banned("192.0.2.1", FIRST_BAN * 3)  # the longer ban held
    for i in range(10):
        bans.impose(f"198.51.100.{i}", 60, 2.0)
    assert len(bans) == 3



def test_every_node_honours_a_nonce_another_node_gave(
    nodes: tuple[RelayProc, RelayProc, RedisServer],
) -> None:
    """The node key comes from the cluster secret, not each state directory's relay.key:
    a PBX whose authorised retry lands on another node (another worker, another A
    record) is registered there, not challenged again (a nonce B could not verify would
    draw a 401 "stale")."""
    a, b, _ = nodes
    stream_a, stream_b = Stream(a), Stream(b)
    try:
        call_id = rand()
        first = pbx_register(stream_a, SERIAL, cseq=1, call_id=call_id)
        auth = authorization(challenge(first, "MD5"), SERIAL, a.secrets[SERIAL], f"sip:{SERIAL}@{DOMAIN}")
        answer = pbx_register(stream_b, SERIAL, cseq=2, call_id=call_id, auth=auth)
        assert answer.status == 200, answer.raw
        assert b.metric("pbx_relay_pbx_auth_failures_total") == 0
    finally:
        stream_a.sock.close()
        stream_b.sock.close()
