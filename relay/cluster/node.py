"""This relay as one node of a cluster: claims, lookups, heartbeat, links (trio shell; docs/cluster.md).

The proxy core says what the cluster must learn or answer — ``ClaimPbx``,
``ReleasePbx``, ``LocatePbx`` (relay/proxy/effects.py) — and :class:`ClusterNode`
does it against the shared state (:class:`relay.cluster.redis.RedisState`) and the
links to other nodes (:class:`relay.cluster.links.ClusterLinks`), then reports a
lookup's outcome back as an event. Nothing here waits on the SIP path: claims go
through a bounded queue, lookups are tasks bounded by ``max_pending_lookups``, and
every Redis call gives up after ``timeout``. With Redis gone the node serves its own
flows and says so in ``problem`` (``/readyz`` answers 503).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from pbxcore.redisconn import redis_address
from relay.cluster.bans import Impose, SharedBans
from relay.cluster.holders import CACHE_SIZE, CACHE_TTL, Holder, HolderCache
from relay.cluster.links import ClusterLinks, LinkFailed, LinkTls
from relay.cluster.redis import RedisState
from relay.cluster.state import SharedState, SharedStateUnavailable
from relay.cluster.wakes import CrossWakes
from relay.proxy.effects import (
    LOCATE_BUSY,
    LOCATE_FAILED,
    LOCATED,
    NOWHERE,
    AwaitDevice,
    ClaimPbx,
    ClusterEffect,
    ForgetPbx,
    LocatePbx,
    ReleasePbx,
    ShareBan,
    Woken,
)
from relay.proxy.flow import Flow
from relay.proxy.registrar import PbxRegistration
from relay.transport.flows import Transports

log = logging.getLogger("relay.cluster")

# Claims and releases waiting for Redis, at most. A PBX re-registers every few
# minutes to an hour, so even 20,000 PBXs make a few claims a second; the queue only
# fills while Redis is slow, and what it drops is claimed again by the PBX's next
# REGISTER or by the re-claim of every registration once Redis answers again.
CLAIM_QUEUE = 10_000
# A node is gone after this many heartbeats missed: its address expires with it.
HEARTBEATS_TO_LIVE = 3
# Heartbeats missed in a row before this node calls the store unreachable (/readyz 503,
# claims held back, all claimed again when it answers). One miss is retried after
# HEARTBEAT_RETRY: a node whose loop was busy for a moment (a registration storm, a full
# garbage collection) misses a 250 ms deadline without Redis being away, and must not
# flap its readiness and re-claim thousands of PBXs for it (bench/run_cluster.py saw it).
HEARTBEAT_MISSES_TO_DOWN = 2
HEARTBEAT_RETRY = 1.0

UNREACHABLE = "shared store unreachable"


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """What a node needs of relay.toml's [cluster] (relay/config.py ClusterSection)."""

    node_id: str
    redis_url: str
    listen_host: str
    listen_port: int
    advertise: str  # "host:port", or "" for the listen address
    secret: bytes
    timeout: float
    heartbeat: float
    max_links: int
    max_pending_lookups: int
    lookup_cache_size: int = CACHE_SIZE
    lookup_cache_ttl: float = CACHE_TTL
    link_tls: LinkTls | None = None  # cluster.link_tls: the links inside TLS


Located = Callable[[LocatePbx, Flow | None, str], None]


class ClusterNode:
    """Carries out the core's cluster effects; ``problem`` is None while the shared state answers."""

    def __init__(self, settings: NodeSettings, transports: Transports, located: Located,
                 claim_token: Callable[[ClaimPbx, float], str],
                 registrations: Callable[[], list[PbxRegistration]],
                 count: Callable[[str], None], impose_ban: Impose | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self._located = located
        self._claim_token = claim_token
        self._registrations = registrations
        self._count = count
        self.bans = SharedBans(settings.node_id, impose_ban or (lambda ip, seconds: None), count)
        self.links = ClusterLinks(transports, settings.node_id, settings.secret, settings.max_links,
                                  settings.timeout, count, settings.link_tls)
        self.wakes = CrossWakes(settings.node_id, self.links.flow_to, transports.send, count)
        self.problem: str | None = "starting"
        self._missed = 0  # heartbeats missed in a row
        self._unclaimed: set[str] = set()  # claims that missed their deadline, at most CLAIM_QUEUE
        self.address = ""
        self.pending_lookups = 0
        self.holders = HolderCache(settings.lookup_cache_size, settings.lookup_cache_ttl)
        self._state: SharedState | None = None
        self._nursery: trio.Nursery | None = None
        self._claims_in, self._claims_out = trio.open_memory_channel[tuple[str, str, str, float]](CLAIM_QUEUE)

    # ------------------------------------------------------------------ tasks
    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the shared state and the link listener, heartbeat and work the claim
        queue until cancelled; ``task_status`` gets the address other nodes use."""
        s = self.settings
        host, port, password = redis_address(s.redis_url)
        async with RedisState.open(host, port, timeout=s.timeout, password=password) as state:
            await self.run(state, task_status=task_status)

    async def run(self, state: SharedState,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """``serve`` on a state already open (tests pass a MemoryState)."""
        s = self.settings
        self._state = state
        async with trio.open_nursery() as nursery:
            port = await nursery.start(self.links.serve, s.listen_host, s.listen_port)
            self.address = s.advertise or f"{_bracket(s.listen_host)}:{port}"
            self._nursery = nursery
            await self._heartbeat()
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._claims)
            nursery.start_soon(self.bans.run, state)
            nursery.start_soon(self.wakes.run, state)
            log.info("event=cluster_node node=%s address=%s store=%s", self.node_id, self.address,
                     "up" if self.problem is None else "unreachable")
            task_status.started(self.address)

    async def _heartbeats(self) -> None:
        while True:
            every = self.settings.heartbeat
            await trio.sleep(min(HEARTBEAT_RETRY, every) if self._missed and self.problem is None else every)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        assert self._state is not None
        ttl = HEARTBEATS_TO_LIVE * self.settings.heartbeat
        try:
            await self._state.node_heartbeat(self.node_id, ttl, self.address)
        except SharedStateUnavailable as e:
            self._missed += 1
            self._store_failed("heartbeat", e)
            if self._missed >= HEARTBEAT_MISSES_TO_DOWN or self.problem == "starting":
                self._store_down("heartbeat", e)
            return
        self._missed = 0
        if self.problem is not None:
            if self.problem != "starting":
                log.warning("event=cluster_store_back node=%s (claiming this node's PBXs again)",
                            self.node_id)
            self.problem = None
            self._unclaimed.clear()
            self._reclaim()
        elif self._unclaimed:
            self._reclaim(self._unclaimed)
            self._unclaimed = set()

    def _store_failed(self, operation: str, e: Exception) -> None:
        """One call missed its deadline: counted; the store is called unreachable only
        by heartbeats missed in a row (_store_down)."""
        self._count("cluster_store_errors_total:" + operation)
        log.debug("event=cluster_store_slow node=%s operation=%s error=%s", self.node_id, operation, e)

    def _store_down(self, operation: str, e: Exception) -> None:
        if self.problem is None or self.problem == "starting":
            log.warning("event=cluster_store_unreachable node=%s operation=%s error=%s "
                        "(own flows keep working; not ready until it answers)", self.node_id, operation, e)
        self.problem = UNREACHABLE

    def _reclaim(self, only: set[str] | None = None) -> None:
        """Claim every registration held now (``only``: of these serials): Redis may have
        restarted empty, or claims were dropped or missed their deadline."""
        now = trio.current_time()
        for reg in self._registrations():
            ttl = reg.expires_at - now
            if ttl > 0 and (only is None or reg.serial in only):
                self._queue(ClaimPbx(reg.serial, reg.flow, ttl), now)

    async def _claims(self) -> None:
        assert self._state is not None
        async for op, serial, token, ttl in self._claims_out:
            if self.problem is not None:
                continue  # claimed again by _reclaim once the store answers
            try:
                if op == "claim":
                    await self._state.claim_pbx(serial, self.node_id, token, ttl)
                else:
                    await self._state.release_pbx(serial, self.node_id)
            except SharedStateUnavailable as e:
                self._store_failed(op, e)
                if op == "claim" and len(self._unclaimed) < CLAIM_QUEUE:
                    self._unclaimed.add(serial)  # claimed again after the next heartbeat
            except ValueError as e:  # a serial longer than a key part: never claimed
                log.warning("event=cluster_claim_refused serial_length=%d error=%s", len(serial), e)

    # ---------------------------------------------------------------- effects
    def submit(self, effect: ClusterEffect) -> None:
        """Carry out one cluster effect of the core; never blocks."""
        now = trio.current_time()
        if isinstance(effect, ClaimPbx):
            self.holders.forget(effect.serial)  # registered here now: no hop
            self._queue(effect, now)
        elif isinstance(effect, ForgetPbx):
            if self.holders.forget(effect.serial):
                self._count("cluster_lookup_cache_total:forgotten")
        elif isinstance(effect, ReleasePbx):
            self._put(("release", effect.serial, "", 0.0))
        elif isinstance(effect, ShareBan):
            self.bans.share(effect)
        elif isinstance(effect, AwaitDevice | Woken):
            self.wakes.submit(effect)
        elif self.pending_lookups >= self.settings.max_pending_lookups or self._nursery is None:
            self._located(effect, None, LOCATE_BUSY)
        else:
            self.pending_lookups += 1
            self._nursery.start_soon(self._locate, effect)

    def _queue(self, claim: ClaimPbx, now: float) -> None:
        self._put(("claim", claim.serial, self._claim_token(claim, now), claim.ttl))

    def _put(self, item: tuple[str, str, str, float]) -> None:
        try:
            self._claims_in.send_nowait(item)
        except trio.WouldBlock:
            self._count("cluster_claims_dropped_total")

    async def _locate(self, locate: LocatePbx) -> None:
        link: Flow | None = None
        try:
            if locate.node:
                outcome, link = await self._node_link(locate.node)
            else:
                outcome, link = await self._find(locate.serial, locate.fresh)
        except SharedStateUnavailable as e:
            self._store_failed("lookup", e)
            outcome = LOCATE_FAILED
        except LinkFailed as e:
            log.warning("event=cluster_link_failed serial=%s error=%s", locate.serial, e)
            outcome = LOCATE_FAILED
        except Exception:  # a bug costs one request, never the node
            self._count("internal_errors_total")
            log.exception("event=internal_error where=cluster_locate")
            outcome = LOCATE_FAILED
        finally:
            self.pending_lookups -= 1
        self._located(locate, link, outcome)

    async def _find(self, serial: str, fresh: bool = False) -> tuple[str, Flow | None]:
        """The link to the node holding ``serial``: the cached holder's (no Redis read),
        else the shared state's answer, remembered. ``fresh``: the cached node said it
        does not hold it: forget it and ask."""
        if fresh:
            if self.holders.forget(serial):
                self._count("cluster_lookup_cache_total:forgotten")
        else:
            cached = self.holders.get(serial, trio.current_time())
            if cached is not None:
                try:
                    link = await self.links.flow_to(cached.node_id, cached.address)
                except LinkFailed:
                    # Its node stopped or moved: the shared state knows better.
                    self.holders.forget(serial)
                    self._count("cluster_lookup_cache_total:forgotten")
                else:
                    self._count("cluster_lookup_cache_total:hit")
                    return LOCATED, link
            self._count("cluster_lookup_cache_total:miss")
        holder = await self._holder(serial)
        if holder is None:
            return NOWHERE, None
        link = await self.links.flow_to(holder.node_id, holder.address)
        self.holders.put(serial, holder, trio.current_time())
        return LOCATED, link

    async def _node_link(self, node_id: str) -> tuple[str, Flow | None]:
        """The link to ``node_id``, named by a token another node minted: the open one,
        else opened at the address its heartbeat gives (one read). NOWHERE: no such
        live node (or this one: the flow it named is gone)."""
        if node_id == self.node_id:
            return NOWHERE, None
        link = self.links.open_to(node_id)
        if link is not None:
            self._count("cluster_node_links_total:open")
            return LOCATED, link
        assert self._state is not None
        try:
            address = await self._state.node_address(node_id)
        except ValueError:
            return NOWHERE, None
        if address is None:
            return NOWHERE, None  # stopped heartbeating: its flows are gone with it
        self._count("cluster_node_links_total:opened")
        return LOCATED, await self.links.flow_to(node_id, address)

    async def _holder(self, serial: str) -> Holder | None:
        """The live node the shared state says holds ``serial`` (two reads), or None."""
        assert self._state is not None
        try:
            claim = await self._state.pbx_node(serial)
        except ValueError:
            return None  # longer than any serial: nobody claimed it
        if claim is None or claim.node_id == self.node_id:
            # Claimed by this node but not registered here: a claim left from before a
            # restart, or released meanwhile. One hop only: never back out.
            return None
        address = await self._state.node_address(claim.node_id)
        if address is None:
            return None  # its node stopped heartbeating: gone with its flows
        return Holder(claim.node_id, address)

    # ------------------------------------------------------------------ views
    def gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "cluster_store_up": ("1 while the shared state (Redis/Valkey) answers",
                                 int(self.problem is None)),
            "cluster_links_open": ("Links to and from other nodes open now, handshakes included",
                                   self.links.open),
            "cluster_lookups_pending": ("Lookups of a PBX's node in flight", self.pending_lookups),
            "cluster_lookup_cache_entries": ("PBXs whose holding node this node has cached",
                                             len(self.holders)),
            "cluster_claims_queued": ("Claims and releases waiting for the shared state",
                                      self._claims_out.statistics().current_buffer_used),
        }


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host

