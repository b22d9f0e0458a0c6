"""The shell's side of the core's one output channel: carry out every effect the proxy returns (trio).

Events from the transports, the push link and the timer task go into the proxy
through :class:`Dispatcher`; the effects that come back are executed here in
order — sends on the transports, push effects on the push link, media effects on
the media backend — and the timer task is woken when the core's next timer moved
earlier. A bug in the core costs one event, never the relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import trio

from pbxcore.wire import WakeOutcome
from relay.media.backend import carry_out
from relay.media.session import MediaBackend
from relay.proxy.core import Proxy
from relay.proxy.effects import (
    LOCATE_FAILED,
    AwaitDevice,
    ClaimPbx,
    ClusterEffect,
    DeviceGone,
    DeviceSeen,
    Effect,
    ForgetPbx,
    LocatePbx,
    ReleasePbx,
    Send,
    ShareBan,
    Wake,
    Woken,
)
from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.message import SipMessage

log = logging.getLogger("relay")

Sender = Callable[[list[Send]], None]
PushSink = Callable[[Wake | DeviceSeen | DeviceGone], None]
ClusterSink = Callable[[ClusterEffect], None]


class Dispatcher:
    """Feeds events to the proxy and executes what it returns."""

    def __init__(self, proxy: Proxy, send: Sender, backend: MediaBackend | None = None) -> None:
        self.proxy = proxy
        self.send = send
        self.backend = backend
        self.push: PushSink | None = None  # set once the push link exists
        self.cluster: ClusterSink | None = None  # set once the cluster node runs (docs/cluster.md)
        self.timer_moved = trio.Event()  # set when the core's next timer came earlier
        self.armed = float("inf")

    # ----------------------------------------------------------------- events
    def on_message(self, msg: SipMessage, flow: Flow) -> None:
        try:
            effects = self.proxy.on_message(msg, flow, trio.current_time())
        except Exception:
            # A bug must cost one message, never the relay (and never its content
            # in the log: only the call id and the flow).
            self._internal_error(f"call_id={msg.call_id} flow={flow}")
            return
        self.run(effects)

    def on_error(self, err: SipParseError, flow: Flow) -> None:
        log.info("event=bad_message flow=%s status=%d reason=%r", flow, err.status, err.reason)
        self._guarded(lambda: self.proxy.on_parse_error(err, flow), f"flow={flow}")

    def on_opened(self, flow: Flow) -> None:
        self.proxy.on_flow_opened(flow)

    def on_closed(self, flow: Flow) -> None:
        self._guarded(lambda: self.proxy.on_flow_closed(flow), f"flow={flow}")

    def on_keepalive(self, flow: Flow) -> None:
        self.proxy.on_keepalive(flow, trio.current_time())

    def count(self, name: str, n: int = 1) -> None:
        """The transports' and the forwarder's counters (``name`` or ``name:label``)."""
        family, _, label = name.partition(":")
        self.proxy.counters.inc(family, label, n)

    def on_wake_result(self, key: tuple[str, ...], outcome: WakeOutcome) -> None:
        self._guarded(lambda: self.proxy.on_wake_result(key, outcome, trio.current_time()), "where=wake")

    def on_located(self, locate: LocatePbx, link: Flow | None, outcome: str) -> None:
        self._guarded(lambda: self.proxy.on_located(locate, link, outcome, trio.current_time()),
                      "where=locate")

    def on_timer(self) -> None:
        self._guarded(lambda: self.proxy.on_timer(trio.current_time()), "where=timers")

    # ---------------------------------------------------------------- effects
    def run(self, effects: Iterable[Effect]) -> None:
        """Execute ``effects`` in order; consecutive sends go out as one batch. What an
        effect leads to at once (the proxy's answer to a bind, a push or a lookup that
        cannot happen) is executed in its place, depth first — from a stack, not by
        recursion: a range full of ports held by another program makes one refill after
        another, which recursed once per batch until RecursionError."""
        sends: list[Send] = []
        stack: list[Iterator[Effect]] = [iter(effects)]
        while stack:
            e = next(stack[-1], None)
            if e is None:
                stack.pop()
                continue
            if type(e) is Send:
                sends.append(e)
                continue
            if sends:
                self.send(sends)
                sends = []
            more = self._other(e)
            if more:
                stack.append(iter(more))
        if sends:
            self.send(sends)
        if self.proxy.next_timer() < self.armed:
            self.timer_moved.set()

    def _other(self, e: Effect) -> list[Effect]:
        """Carry out one effect that is not a Send; what the proxy answers to it at once."""
        if isinstance(e, Wake | DeviceSeen | DeviceGone):
            if self.push is not None:
                self.push(e)
            elif isinstance(e, Wake):
                return self.proxy.on_wake_result(e.key, WakeOutcome.FAILED, trio.current_time())
            return []
        if isinstance(e, ClaimPbx | ReleasePbx | LocatePbx | ForgetPbx | ShareBan | AwaitDevice | Woken):
            if self.cluster is not None:
                self.cluster(e)
            elif isinstance(e, LocatePbx):
                return self.proxy.on_located(e, None, LOCATE_FAILED, trio.current_time())
            return []
        assert self.backend is not None and not isinstance(e, Send), "media effects need a media backend"
        bound = carry_out(self.backend, e)
        return [] if bound is None else self.proxy.on_ports_bound(*bound)

    def _guarded(self, event: Callable[[], list[Effect]], where: str) -> None:
        try:
            effects = event()
        except Exception:
            self._internal_error(where)
            return
        self.run(effects)

    def _internal_error(self, where: str) -> None:
        self.proxy.counters.inc("internal_errors_total")
        log.exception("event=internal_error %s", where)
