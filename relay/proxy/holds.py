"""RFC 8599 §5.3.2 in the proxy: INVITEs held while a push wakes their phone.

An INVITE along a Path to a phone whose flow is dead (or a UDP phone that went
silent) is answered 100, a wake-up is asked of the push service, and the INVITE
waits — in memory only, at most the ring timeout — for the phone to register
again: then it goes out on the new flow (Flexisip's fork-late does the same).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pbxcore.wire import PushTarget, WakeOutcome, WakeRequest
from relay.proxy.counters import Counters
from relay.proxy.crosswake import WokenElsewhere
from relay.proxy.devices import PendingRegister, Registered
from relay.proxy.effects import AwaitDevice, Effect, Send, Wake
from relay.proxy.flow import Flow
from relay.proxy.replies import Replies, txn_key
from relay.proxy.transaction import (
    InviteTransaction,
    TransactionTable,
    TxnEvent,
    TxnKey,
    TxnState,
)
from relay.proxy.wake import user_of
from relay.sip.headers import Via
from relay.sip.message import Request

log = logging.getLogger("relay.calls")
K = TypeVar("K")

# RFC 3261 §8.2.6.2: a response copies these from the request.
COPIED = frozenset({"via", "from", "to", "call-id", "cseq"})


@dataclass(slots=True)
class Held:
    """An INVITE waiting for its phone to wake up and register."""

    req: Request  # after loose routing and Via stamping, before anything of ours
    via: Via  # its top Via, parsed
    serial: str
    mf: int  # Max-Forwards as received
    target: PushTarget
    tag: str  # our To tag on the 180 and on the final answer we may give
    user: str  # the AOR user that registered this device (from the Path token)
    device: str = ""  # cluster: the device's id in the shared state (relay/proxy/crosswake.py)


# What the coordinator does with a released INVITE: forward it on the woken phone's
# flow, reusing the held transaction.
Release = Callable[[InviteTransaction, Held, Flow, float], list[Effect]]


class Holds:
    """Held INVITEs by the device they wait for, and by the caller's flow."""

    def __init__(self, txns: TransactionTable, replies: Replies, counters: Counters, ring_timeout: float):
        self.txns = txns
        self.replies = replies
        self.counters = counters
        self.ring_timeout = ring_timeout
        self._by_target: dict[PushTarget, list[InviteTransaction]] = {}
        self._by_caller: dict[Flow, list[InviteTransaction]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_target.values())

    def hold(self, req: Request, source: Flow, via: Via, held: Held, now: float) -> list[Effect]:
        """Answer 100, ask for a push, keep the INVITE until the phone registers
        again (:meth:`release`) or the ring timeout ends (480)."""
        txn = InviteTransaction(
            key=txn_key(req, via), inbound=source, created=now, call_id=req.call_id,
            upstream=[h for h in req.headers if h.name in COPIED], to_phone=True, serial=held.serial,
            state=TxnState.HELD, give_up_at=now + self.ring_timeout, extra=held,
        )
        txn.last_response = self.replies.upstream(txn, 100, "Trying")
        self.txns.add(txn)
        self._by_target.setdefault(held.target, []).append(txn)
        self._by_caller.setdefault(source, []).append(txn)
        wake = Wake(txn.key, WakeRequest(
            req.call_id, caller=user_of(req.get("from")), callee=user_of(req.get("to")), src=source.remote,
            ring_timeout=self.ring_timeout, serial=held.serial, username=held.user, target=held.target))
        self.counters.inc("push_holds_total", "started")
        log.info("event=push_hold call_id=%s serial=%s provider=%s", req.call_id, held.serial,
                 held.target.provider)
        if held.device:  # the phone may register again through another node
            return [Send(source, txn.last_response), wake, AwaitDevice(held.device, self.ring_timeout)]
        return [Send(source, txn.last_response), wake]

    def on_wake_result(self, key: TxnKey, outcome: WakeOutcome, now: float) -> list[Effect]:
        """The push service's answer for a held INVITE: 180 Ringing once the push
        is on its way (Flexisip does the same), 480 when it could not be sent."""
        txn = self.txns.get(key)
        if txn is None or txn.state is not TxnState.HELD:
            return []  # answered, released or timed out meanwhile
        log.info("event=push_result call_id=%s outcome=%s", txn.call_id, outcome.value)
        if not outcome.may_ring:
            self.counters.inc("push_holds_total", "push_failed")
            return self.end(txn, now)
        if txn.ringing:
            return []
        txn.ringing = True
        txn.last_response = self.replies.upstream(txn, 180, "Ringing", _held(txn).tag)
        return [Send(txn.inbound, txn.last_response)]

    def end(self, txn: InviteTransaction, now: float) -> list[Effect]:
        """No phone came (ring timeout, failed push): 480, or 487 when the caller
        CANCELled meanwhile."""
        held = _held(txn)
        status, reason = (
            (487, "Request Terminated") if txn.cancel_pending else (480, "Temporarily Unavailable"))
        self._forget(txn, held)
        log.info("event=push_hold_ended call_id=%s status=%d", txn.call_id, status)
        txn.last_response = self.replies.upstream(txn, status, reason, held.tag)
        self.txns.finish(txn, TxnEvent.TIMEOUT, now)
        self.counters.inc("responses_sent_total", str(status))
        return [Send(txn.inbound, txn.last_response)]

    def caller_gone(self, flow: Flow) -> None:
        """The caller's connection closed: nobody is left to answer, a phone woken for
        these calls must not ring."""
        for txn in self._by_caller.get(flow, [])[:]:
            if txn.state is TxnState.HELD:
                self.counters.inc("push_holds_total", "caller_gone")
                log.info("event=push_hold_ended call_id=%s reason=caller_gone", txn.call_id)
                self._forget(txn, _held(txn))
                self.txns.move(txn, TxnEvent.ABANDONED)
                self.txns.remove(txn)

    def release(
        self, registered: Registered, pending: PendingRegister, now: float, forward: Release,
    ) -> list[Effect]:
        """The phone registered again: its held INVITEs go to the contact it registered
        (RFC 8599 §5.3.2), on its new flow. A CANCEL that came meanwhile follows the
        phone's first provisional response (RFC 3261 §9.1), so the app sees the call
        end instead of ringing for a call already gone."""
        out: list[Effect] = []
        for txn in self._by_target.get(registered.target, [])[:]:
            if txn.state is not TxnState.HELD:
                continue
            held = _held(txn)
            if held.serial != pending.serial or held.user != pending.username:
                # Another PBX's or another user's registration naming the same token: keep waiting.
                self.counters.inc("push_holds_total", "release_refused")
                continue
            self._forget(txn, held)
            held.req.set_uri(registered.contact_uri)
            self.counters.inc("push_holds_total", "released")
            log.info("event=push_release call_id=%s flow=%s", txn.call_id, pending.flow)
            out += forward(txn, held, pending.flow, now)
        return out

    def release_elsewhere(self, woken: WokenElsewhere, link: Flow, now: float, forward: Release,
                          ) -> list[Effect]:
        """The device registered again through another node, reached over ``link``:
        its held INVITEs (same PBX and user only) go to the contact it registered,
        routed by that node's Path entry."""
        out: list[Effect] = []
        for txns in list(self._by_target.values()):
            for txn in txns[:]:
                held = _held(txn)
                if txn.state is not TxnState.HELD or held.device != woken.device:
                    continue
                if (held.serial, held.user) != (woken.serial, woken.user):
                    self.counters.inc("push_holds_total", "release_refused")
                    continue
                self._forget(txn, held)
                held.req.set_uri(woken.contact)
                held.req.insert_before("Route", woken.path)
                self.counters.inc("push_holds_total", "released_elsewhere")
                log.info("event=push_release call_id=%s flow=%s", txn.call_id, link)
                out += forward(txn, held, link, now)
        return out

    def _forget(self, txn: InviteTransaction, held: Held) -> None:
        _drop(self._by_target, held.target, txn)
        _drop(self._by_caller, txn.inbound, txn)


def _held(txn: InviteTransaction) -> Held:
    held = txn.extra
    assert isinstance(held, Held), "a HELD transaction always carries its Held"
    return held


def _drop(index: dict[K, list[InviteTransaction]], key: K, txn: InviteTransaction) -> None:
    waiting = index.get(key)
    if waiting is not None:
        if txn in waiting:
            waiting.remove(txn)
        if not waiting:
            del index[key]
