"""Bans shared between nodes: a source one node bans for guessing digests is banned on all (docs/cluster.md).

The core bans a source after wrong digest responses (relay/proxy/authbans.py) and says
so with a ``ShareBan`` effect; :class:`SharedBans` writes it to the shared state and
reads, every :data:`BAN_POLL` seconds, the bans the other nodes wrote, which the core
then imposes (``Proxy.on_shared_ban``). Failures are counted per node: a guesser
spread over N nodes makes at most N x ``auth_failures_before_ban`` attempts before the
first ban, and none after it anywhere. A node starting (or its store back) reads every
ban still in force. Nothing waits on the SIP path: bans to share go through a bounded
queue, and a store that does not answer costs a counted error, retried next poll.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from relay.cluster.state import SharedState, SharedStateUnavailable
from relay.proxy.effects import ShareBan

log = logging.getLogger("relay.cluster")

# Seconds between reads of the bans other nodes shared: how long a banned guesser may go
# on at another node. A ban lasts a minute at least (authbans.FIRST_BAN); one read a
# second is one small Redis call per node per second.
BAN_POLL = 1.0
# Bans read per call, and calls per poll at most: a node starting reads up to
# MAX_SHARED_BANS (65,536) bans in its first poll.
BAN_BATCH = 1000
BATCHES_PER_POLL = 100
# Bans waiting to be written, at most. A node bans a source after 10 wrong answers at
# least, so this fills only while the store is slow during a guessing attack from over
# a thousand addresses; what it drops is still banned on this node.
SHARE_QUEUE = 1000

Impose = Callable[[str, float], None]  # (ip, seconds): the core bans it here too


class SharedBans:
    """Writes this node's bans to the shared state and imposes the other nodes' bans."""

    def __init__(self, node_id: str, impose: Impose, count: Callable[[str], None]) -> None:
        self.node_id = node_id
        self._impose = impose
        self._count = count
        self.cursor = ""  # the last shared ban read
        self._in, self._out = trio.open_memory_channel[ShareBan](SHARE_QUEUE)

    def share(self, ban: ShareBan) -> None:
        """Queue one of this node's bans for the other nodes; never blocks."""
        try:
            self._in.send_nowait(ban)
        except trio.WouldBlock:
            self._count("cluster_bans_dropped_total")

    async def run(self, state: SharedState) -> None:
        """Write the queued bans and read the others' until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, state)
            while True:
                await self.read(state)
                await trio.sleep(BAN_POLL)

    async def _write(self, state: SharedState) -> None:
        async for ban in self._out:
            try:
                await state.share_ban(ban.ip, ban.seconds, self.node_id)
            except SharedStateUnavailable:
                self._count("cluster_store_errors_total:share_ban")  # banned here still
            except ValueError as e:  # an address longer than a key part: not ours to share
                log.warning("event=cluster_ban_refused error=%s", e)

    async def read(self, state: SharedState) -> int:
        """Impose the bans shared since the last read; how many."""
        imposed = 0
        for _ in range(BATCHES_PER_POLL):
            try:
                bans, cursor = await state.bans_after(self.cursor, BAN_BATCH)
            except SharedStateUnavailable:
                self._count("cluster_store_errors_total:read_bans")
                break
            for ban in bans:
                if ban.node_id != self.node_id:
                    self._impose(ban.ip, ban.seconds)
                    imposed += 1
            if cursor == self.cursor:
                break
            self.cursor = cursor
        return imposed
