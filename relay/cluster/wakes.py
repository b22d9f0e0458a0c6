"""Wake-ups across nodes, the shell's part: the store and the link (relay/proxy/crosswake.py says why).

``AwaitDevice`` (a node holds a call for a device) becomes ``pbxrelay:waiting:<device>``
in the shared state for the ring timeout; ``Woken`` (the device registered again through
this node) asks the store who awaits the device and, if another node does, sends that
node the core's message over their link. Nothing waits on the SIP path: each effect is a
task, at most :data:`MAX_IN_FLIGHT` at once (more are dropped and counted: the call they
were for rings out as on one node), and every store call gives up after its timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from relay.cluster.links import LinkFailed
from relay.cluster.state import SharedState, SharedStateUnavailable
from relay.proxy.effects import AwaitDevice, Woken
from relay.proxy.flow import Flow

log = logging.getLogger("relay.cluster")

# Store calls and link sends for wake-ups at once, at most. Each is one held call (a
# phone asleep when its call came) or one registration of a phone with push
# parameters; the per-source and per-PBX limits on INVITEs bound the first, the
# transports' per-source gates the second.
MAX_IN_FLIGHT = 1000

FlowTo = Callable[[str, str], Awaitable[Flow]]  # (node id, address) → the link's flow
Send = Callable[[Flow, bytes], bool]


class CrossWakes:
    """Carries out ``AwaitDevice`` and ``Woken`` for one node."""

    def __init__(self, node_id: str, flow_to: FlowTo, send: Send, count: Callable[[str], None]) -> None:
        self.node_id = node_id
        self._flow_to = flow_to
        self._send = send
        self._count = count
        self.in_flight = 0
        self._state: SharedState | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, state: SharedState) -> None:
        """Take effects until cancelled."""
        self._state = state
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    def submit(self, effect: AwaitDevice | Woken) -> None:
        """Start the effect's work; never blocks."""
        if self._nursery is None or self.in_flight >= MAX_IN_FLIGHT:
            self._count("cluster_wakes_total:dropped")
            return
        self.in_flight += 1
        work = self._await if isinstance(effect, AwaitDevice) else self._woken
        self._nursery.start_soon(self._guarded, work, effect)

    async def _guarded(self, work: Callable[..., Awaitable[None]], effect: AwaitDevice | Woken) -> None:
        try:
            await work(effect)
        except SharedStateUnavailable:
            self._count("cluster_store_errors_total:wake")
        except (LinkFailed, ValueError) as e:
            self._count("cluster_wakes_total:failed")
            log.warning("event=cluster_wake_failed error=%s", e)
        finally:
            self.in_flight -= 1

    async def _await(self, effect: AwaitDevice) -> None:
        assert self._state is not None
        await self._state.await_device(effect.device, self.node_id, effect.seconds)
        self._count("cluster_wakes_total:awaited")

    async def _woken(self, effect: Woken) -> None:
        assert self._state is not None
        node = await self._state.awaiting_node(effect.device)
        if node is None or node == self.node_id:
            return  # nobody else holds a call for it (the usual case: a refresh)
        address = await self._state.node_address(node)
        if address is None:
            self._count("cluster_wakes_total:node_gone")
            return
        link = await self._flow_to(node, address)
        sent = self._send(link, effect.message)
        self._count("cluster_wakes_total:" + ("told" if sent else "failed"))
