"""SharedState behaviour, the same tests against MemoryState and a real redis-server (issue 13)."""

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import coredis
import pytest
import trio

from relay.cluster import MemoryState, PbxClaim, RedisState, SharedState, SharedStateUnavailable
from relay.cluster.state import MAX_FLOW_TOKEN, MAX_KEY_PART
from tests import redisfixture
from tests.redisfixture import RedisServer

redis_server = redisfixture.redis_server  # the fixture, by name

# Long enough to survive a loaded machine between two calls, short enough to wait out.
SHORT = 1.0


@dataclass
class Subject:
    """A state under test and how to let time pass for it."""

    state: SharedState
    advance: Callable[[float], Awaitable[None]]


class ManualClock:
    """A clock the MemoryState tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["memory", "redis"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        clock = ManualClock()
        yield Subject(MemoryState(clock), clock.advance)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    async with RedisState.open("127.0.0.1", server.port, timeout=2.0) as state:
        yield Subject(state, trio.sleep)


async def test_claim_lookup_and_latest_claim_wins(subject: Subject) -> None:
    s = subject.state
    assert await s.pbx_node("PBX1") is None
    await s.claim_pbx("PBX1", "node-a", "tokA", 60)
    assert await s.pbx_node("PBX1") == PbxClaim("node-a", "tokA")
    await s.claim_pbx("PBX1", "node-b", "tokB", 60)
    assert await s.pbx_node("PBX1") == PbxClaim("node-b", "tokB")
    assert await s.pbx_node("PBX2") is None


async def test_release_only_by_the_holder(subject: Subject) -> None:
    s = subject.state
    await s.claim_pbx("PBX1", "node-a", "tokA", 60)
    await s.claim_pbx("PBX1", "node-b", "tokB", 60)
    assert await s.release_pbx("PBX1", "node-a") is False
    assert await s.pbx_node("PBX1") == PbxClaim("node-b", "tokB")
    assert await s.release_pbx("PBX1", "node-b") is True
    assert await s.pbx_node("PBX1") is None
    assert await s.release_pbx("PBX1", "node-b") is False


async def test_claim_expires_with_the_registration(subject: Subject) -> None:
    s = subject.state
    await s.claim_pbx("PBX1", "node-a", "tokA", SHORT)
    assert await s.pbx_node("PBX1") == PbxClaim("node-a", "tokA")
    await subject.advance(SHORT + 0.5)
    assert await s.pbx_node("PBX1") is None


async def test_shared_bans_in_order_after_a_cursor_until_they_end(subject: Subject) -> None:
    s = subject.state
    assert await s.bans_after("", 10) == ([], "")
    await s.share_ban("192.0.2.7", SHORT, "node-a")
    await s.share_ban("2001:db8::9", 60, "node-b")
    bans, cursor = await s.bans_after("", 10)
    assert [(b.ip, b.node_id) for b in bans] == [("192.0.2.7", "node-a"), ("2001:db8::9", "node-b")]
    assert 0 < bans[0].seconds <= SHORT and 59 < bans[1].seconds <= 60
    assert await s.bans_after(cursor, 10) == ([], cursor)  # nothing new
    await s.share_ban("192.0.2.8", 60, "node-a")
    first, cursor1 = await s.bans_after("", 1)  # at most count
    assert [b.ip for b in first] == ["192.0.2.7"]
    bans, cursor2 = await s.bans_after(cursor, 10)
    assert [b.ip for b in bans] == ["192.0.2.8"]
    await subject.advance(SHORT + 0.5)
    bans, _ = await s.bans_after("", 10)  # an ended ban is not handed out again
    assert [b.ip for b in bans] == ["2001:db8::9", "192.0.2.8"]


async def test_rate_counter_counts_in_a_fixed_window(subject: Subject) -> None:
    s = subject.state
    assert [await s.incr_rate("register:192.0.2.7", SHORT) for _ in range(3)] == [1, 2, 3]
    assert await s.incr_rate("register:192.0.2.8", SHORT) == 1
    await subject.advance(SHORT + 0.5)
    assert await s.incr_rate("register:192.0.2.7", SHORT) == 1


async def test_heartbeats_and_live_nodes(subject: Subject) -> None:
    s = subject.state
    assert await s.live_nodes() == frozenset()
    await s.node_heartbeat("node-a", SHORT)
    await s.node_heartbeat("node-b", 60)
    assert await s.live_nodes() == {"node-a", "node-b"}
    await subject.advance(SHORT + 0.5)
    assert await s.live_nodes() == {"node-b"}
    await s.node_heartbeat("node-a", 60)
    assert await s.live_nodes() == {"node-a", "node-b"}


async def test_a_heartbeat_publishes_the_node_address_until_it_expires(subject: Subject) -> None:
    s = subject.state
    assert await s.node_address("node-a") is None
    await s.node_heartbeat("node-a", SHORT, "10.0.0.11:5070")
    await s.node_heartbeat("node-b", 60)  # no address: none published
    assert await s.node_address("node-a") == "10.0.0.11:5070"
    assert await s.node_address("node-b") is None
    assert await s.live_nodes() == {"node-a", "node-b"}
    await subject.advance(SHORT + 0.5)
    assert await s.node_address("node-a") is None
    assert await s.live_nodes() == {"node-b"}


async def test_key_part_limit(subject: Subject) -> None:
    s = subject.state
    at_limit = "S" * MAX_KEY_PART
    await s.claim_pbx(at_limit, "node-a", "tok", 60)
    assert await s.pbx_node(at_limit) == PbxClaim("node-a", "tok")
    with pytest.raises(ValueError):
        await s.claim_pbx(at_limit + "S", "node-a", "tok", 60)
    longest_token = "t" * MAX_FLOW_TOKEN
    await s.claim_pbx("PBX1", "node-a", longest_token, 60)
    assert await s.pbx_node("PBX1") == PbxClaim("node-a", longest_token)
    with pytest.raises(ValueError):
        await s.claim_pbx("PBX1", "node-b", longest_token + "t", 60)
    assert await s.pbx_node("PBX1") == PbxClaim("node-a", longest_token)
    with pytest.raises(ValueError):
        await s.share_ban("", 60, "node-a")
    with pytest.raises(ValueError):
        await s.share_ban("192.0.2.7", 0, "node-a")
    with pytest.raises(ValueError):
        await s.share_ban("192.0.2.7", 60, "n" * (MAX_KEY_PART + 1))


async def test_memory_state_sweeps_entries_nobody_reads_again() -> None:
    clock = ManualClock()
    s = MemoryState(clock)
    for i in range(2000):
        await s.incr_rate(f"old{i}", 1)
    await clock.advance(2)
    for i in range(2000):
        await s.incr_rate(f"k{i}", 60)
    # The 2,000 expired counters were swept by the writes that followed, never read.
    assert 2000 <= len(s) < 2000 + 1024


async def test_shared_bans_kept_are_bounded(redis_server: RedisServer) -> None:
    """However many bans are shared, about ``max_bans`` are kept (Redis trims the stream
    by whole nodes of 100 entries: ``MAXLEN ~``), the newest ones."""
    async with RedisState.open("127.0.0.1", redis_server.port, max_bans=200) as s:
        for i in range(1000):
            await s.share_ban(f"198.51.{i // 256}.{i % 256}", 60, "node-a")
        kept: list[str] = []
        cursor = ""
        while True:
            bans, cursor = await s.bans_after(cursor, 500)
            if not bans:
                break
            kept += [b.ip for b in bans]
    assert 200 <= len(kept) <= 300 and kept[-1] == "198.51.3.231"
    memory = MemoryState(max_bans=200)
    for i in range(1000):
        await memory.share_ban(f"198.51.{i // 256}.{i % 256}", 60, "node-a")
    bans, _ = await memory.bans_after("", 1000)
    assert len(bans) == 200 and bans[-1].ip == "198.51.3.231"


# --- Redis only: what a real server shows ---------------------------------------------


async def test_every_key_is_namespaced_and_expires(redis_server: RedisServer) -> None:
    async with RedisState.open("127.0.0.1", redis_server.port) as s:
        await s.claim_pbx("PBX1", "node-a", "tok", 60)
        await s.share_ban("192.0.2.7", 30, "node-a")
        await s.share_ban("192.0.2.8", 60, "node-a")
        await s.share_ban("192.0.2.9", 10, "node-a")  # a shorter ban does not shorten the stream's life
        await s.incr_rate("register:192.0.2.7", 60)
        await s.node_heartbeat("node-a", 60)
    # A separate raw look at the server, not through the component under test.
    async with coredis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True) as raw:
        keys = sorted([k async for k in raw.scan_iter()])
        assert keys == ["pbxrelay:bans", "pbxrelay:nodes", "pbxrelay:pbx:PBX1",
                        "pbxrelay:rate:register:192.0.2.7"]
        for key in keys:
            assert 0 < await raw.pttl(key) <= 60_000, key
        assert await raw.pttl("pbxrelay:bans") > 50_000


async def test_two_nodes_see_each_others_claims(redis_server: RedisServer) -> None:
    async with (RedisState.open("127.0.0.1", redis_server.port) as a,
                RedisState.open("127.0.0.1", redis_server.port) as b):
        await a.claim_pbx("PBX1", "node-a", "tokA", 60)
        await a.node_heartbeat("node-a", 60)
        await b.node_heartbeat("node-b", 60)
        assert await b.pbx_node("PBX1") == PbxClaim("node-a", "tokA")
        # The PBX reconnects to node B; node A's late release must not drop B's claim.
        await b.claim_pbx("PBX1", "node-b", "tokB", 60)
        assert await a.release_pbx("PBX1", "node-a") is False
        assert await a.pbx_node("PBX1") == PbxClaim("node-b", "tokB")
        await b.share_ban("192.0.2.7", 60, "node-b")
        bans, _ = await a.bans_after("", 10)
        assert [(x.ip, x.node_id) for x in bans] == [("192.0.2.7", "node-b")]
        assert await a.incr_rate("invite:192.0.2.7", 60) == 1
        assert await b.incr_rate("invite:192.0.2.7", 60) == 2
        assert await a.live_nodes() == await b.live_nodes() == {"node-a", "node-b"}


async def test_redis_down_is_a_typed_error_then_recovers(redis_server: RedisServer) -> None:
    timeout = 1.0
    async with RedisState.open("127.0.0.1", redis_server.port, timeout=timeout) as s:
        await s.claim_pbx("PBX1", "node-a", "tokA", 60)
        redis_server.stop()
        for call in (s.pbx_node("PBX1"), s.bans_after("", 10), s.incr_rate("k", 60),
                     s.claim_pbx("PBX2", "node-a", "t", 60), s.live_nodes()):
            # The component's own deadline, plus slack for a loaded machine: never a hang.
            with trio.fail_after(timeout + 5):
                with pytest.raises(SharedStateUnavailable):
                    await call
        redis_server.start()  # same port, empty (no persistence)
        with trio.fail_after(timeout + 5):
            await s.claim_pbx("PBX1", "node-a", "tokA", 60)
        assert await s.pbx_node("PBX1") == PbxClaim("node-a", "tokA")


async def test_unreachable_from_the_start_is_a_typed_error(redis_server: RedisServer) -> None:
    redis_server.stop()
    async with RedisState.open("127.0.0.1", redis_server.port, timeout=1.0) as s:
        with trio.fail_after(6), pytest.raises(SharedStateUnavailable):
            await s.bans_after("", 10)
