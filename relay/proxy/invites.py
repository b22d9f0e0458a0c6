"""INVITE transactions at work: 100 Trying, retransmissions, CANCEL, responses, timers (RFC 3261 §16.7–§17).

The component the coordinator hands an INVITE to once routing decided where it
goes; it owns the transaction table (relay.proxy.transaction) and returns effects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from relay.proxy.counters import Counters
from relay.proxy.effects import Effect, Send
from relay.proxy.flow import Flow
from relay.proxy.forwarding import Hop
from relay.proxy.holds import Holds
from relay.proxy.mediacalls import MediaCalls
from relay.proxy.replies import Replies, txn_key
from relay.proxy.transaction import (
    T1,
    TIMER_B,
    TIMER_C,
    Downstream,
    Finished,
    InviteTransaction,
    TransactionTable,
    TxnEvent,
    TxnState,
)
from relay.sip import limits
from relay.sip.headers import Via
from relay.sip.message import Header, Request, Response

log = logging.getLogger("relay.calls")

SendBack = Callable[[bytes, Flow], list[Send]]


# INVITEs pending (not answered finally yet, ringing or held for a push) from one source
# IP, and for one PBX. One source ringing the whole table kept every other caller out
# (issue 10: an INVITE flood held 100,000 transactions). A large office behind one NAT
# rings a few hundred phones at once; a PBX with 2,000 calls ringing is past any office
# this relay serves (Kamailio's pike and Flexisip's DoS protection cap per source too).
MAX_PENDING_PER_SOURCE = 500
MAX_PENDING_PER_PBX = 2_000


@dataclass(frozen=True, slots=True)
class PendingLimits:
    """Caps on pending INVITEs (see the constants)."""

    per_source: int = MAX_PENDING_PER_SOURCE
    per_pbx: int = MAX_PENDING_PER_PBX


class InviteTransactions:
    """INVITEs the relay keeps state for. ``send_back`` puts a response on the flow it
    goes back on (or drops it when that connection is gone)."""

    def __init__(self, txns: TransactionTable, replies: Replies, counters: Counters, holds: Holds,
                 media: MediaCalls | None, send_back: SendBack, max_transactions: int,
                 limits: PendingLimits | None = None):
        self.txns = txns
        self.replies = replies
        self.counters = counters
        self.holds = holds
        self.media = media
        self.send_back = send_back
        self.max_transactions = max_transactions
        self.limits = limits or PendingLimits()

    def overloaded(self, source_ip: str, serial: str) -> str | None:
        """Why a new INVITE from ``source_ip`` for PBX ``serial`` gets 503 (RFC 3261
        §21.5.4), or None: the table is full, that source or that PBX has as many
        INVITEs pending as it may."""
        if len(self.txns) >= self.max_transactions:
            return "total"
        if source_ip and self.txns.live_by_source.get(source_ip, 0) >= self.limits.per_source:
            return "per_source"
        if self.txns.live_by_serial.get(serial, 0) >= self.limits.per_pbx:
            return "per_pbx"
        return None

    def absorb(self, req: Request, via: Via, source: Flow) -> list[Effect] | None:
        """What a request that belongs to a kept INVITE transaction gets instead of
        being routed — a retransmitted INVITE its last answer, the ACK of the relay's
        own answer nothing, the ACK of a released call's non-2xx the phone's new flow
        (RFC 3261 §17.2.3, §17.1.1.3) — or None: route it as usual."""
        if req.method == "INVITE":
            txn = self.txns.find(txn_key(req, via))
            if txn is None:
                return None
            self.counters.inc("retransmissions_absorbed_total")
            return [Send(source, txn.last_response)] if txn.last_response else []
        if req.method == "ACK":
            fin = self.txns.finished(txn_key(req, via, "INVITE"))
            if fin is not None and fin.state is TxnState.ANSWERED:
                return []  # ACK for the answer the relay generated itself
            if fin is not None and fin.released and fin.state is TxnState.COMPLETED:
                # The caller's Route names the flow the phone slept on; the INVITE
                # went out on the one it woke up on: so does the ACK.
                return self.downstream_request(fin, "ACK", req.get("to") or "")
            if fin is None and self.replies.acks_a_refusal(req):
                self.counters.inc("dropped_total", "ack_of_own_refusal")
                return []
        return None

    def next_due(self) -> float | None:
        return self.txns.next_due()

    def on_timer(self, now: float) -> list[Effect]:
        """Retransmissions, timeouts and expiries due by ``now``."""
        out: list[Effect] = []
        self.txns.expire(now)
        for txn in self.txns.due(now):
            out += self._on_timer(txn, now)
            if self.txns.get(txn.key) is txn:
                self.txns.schedule(txn)
        return out

    def start(
        self, hop: Hop, branch: str, our_via: str, upstream: list[Header], data: bytes, now: float,
        held: InviteTransaction | None,
    ) -> list[Effect]:
        """Keep the INVITE's transaction and answer 100 Trying at once (§16.7 step 2)."""
        req = hop.req
        txn = held or InviteTransaction(
            key=txn_key(req, hop.via), inbound=hop.source, created=now, call_id=req.call_id,
            upstream=upstream, to_phone=hop.to_phone, serial=hop.serial)
        txn.outbound = hop.target
        txn.forwarded = data
        txn.downstream = Downstream(
            uri=req.uri, via=our_via, from_=req.get("from") or "", to=req.get("to") or "",
            call_id=req.call_id, cseq=req.cseq[0], route=", ".join(req.get_all("route")))
        txn.give_up_at = now + TIMER_C
        if not hop.target.reliable:
            txn.retransmit_at = now + T1
            txn.give_up_at = now + TIMER_B
        out: list[Effect] = []
        if held is None:
            txn.last_response = self.replies.upstream(txn, 100, "Trying")
            self.txns.add(txn, branch)
            out.append(Send(hop.source, txn.last_response))
        else:
            # The caller had our 100 (and maybe our 180) long ago; the INVITE itself goes out.
            self.txns.move(txn, TxnEvent.RELEASED)
            txn.released = True
            self.txns.link_branch(txn, branch)
            self.txns.schedule(txn)
        log.info("event=invite call_id=%s serial=%s direction=%s from=%s to=%s", req.call_id, hop.serial,
                 "to_phone" if hop.to_phone else "to_pbx", hop.source, hop.target)
        out.append(Send(hop.target, data))
        return out


    def cancel(self, req: Request, source: Flow, via: Via) -> list[Effect]:
        txn = self.txns.find(txn_key(req, via, "INVITE"))
        if txn is None:
            # RFC 3261 §16.10 says forward statelessly; with no INVITE state we
            # would not know where the INVITE went, so we answer instead.
            return list(self.replies.refuse(req, source, 481, "Call/Transaction Does Not Exist"))
        out: list[Effect] = [self.replies.reply(req, source, 200, "OK")]
        log.info("event=cancel call_id=%s final=%s", req.call_id, not txn.live)
        if isinstance(txn, Finished):
            return out
        if self.media is not None:
            out += self.media.sessions.failed(txn.call_id)  # a CANCELled re-INVITE keeps the call's media
        if not txn.got_provisional:
            # RFC 3261 §9.1: "a CANCEL ... SHOULD NOT be sent" before a provisional
            # response: the callee could not match it yet. Sent on the first one.
            txn.cancel_pending = True
            return out
        return out + self._cancel_downstream(txn)


    def _cancel_downstream(self, txn: InviteTransaction) -> list[Effect]:
        if txn.outbound is None or txn.cancelled or txn.downstream is None:
            return []
        txn.cancelled = True
        self.counters.inc("cancels_forwarded_total")
        return self.downstream_request(txn, "CANCEL", txn.downstream.to)


    def downstream_request(self, txn: InviteTransaction | Finished, method: str, to: str) -> list[Effect]:
        """CANCEL, or ACK for a non-2xx: the forwarded INVITE's Request-URI, Route
        set, From, Call-ID, CSeq number and top Via (RFC 3261 §9.1, §17.1.1.3)."""
        t = txn.downstream
        if txn.outbound is None or t is None:
            return []
        headers = [Header("Via", t.via), Header("Max-Forwards", str(limits.DEFAULT_MAX_FORWARDS))]
        if t.route:
            headers.append(Header("Route", t.route))
        headers += [
            Header("From", t.from_), Header("To", to), Header("Call-ID", t.call_id),
            Header("CSeq", f"{t.cseq} {method}"), Header("Content-Length", "0"),
        ]
        return [Send(txn.outbound, Request(method, t.uri, headers).serialise())]

    # --------------------------------------------------------------- responses

    def on_response(
        self, resp: Response, txn: InviteTransaction | Finished, source: Flow, now: float,
    ) -> list[Effect]:
        """A response to an INVITE the relay keeps a transaction for (live or lingering)."""
        if isinstance(txn, Finished):
            return self._late_response(resp, txn, source, now)
        if resp.status < 200:
            # Any provisional, 100 included, ends Timer A and Timer B (RFC 3261
            # §17.1.1.2); from then on proxy Timer C applies, and one other
            # than 100 restarts it (§16.7 step 2).
            txn.retransmit_at = None
            self.txns.move(txn, TxnEvent.PROVISIONAL)
            give_up = now + TIMER_C if resp.status > 100 else txn.created + TIMER_C
            # Moved at most once a second, however fast 180s come in.
            if give_up > txn.give_up_at + 1.0 or txn.give_up_at < txn.created + TIMER_C:
                txn.give_up_at = give_up
            if txn.cancel_pending:
                # RFC 3261 §9.1: a CANCEL waits for a provisional response.
                txn.cancel_pending = False
                cancel = self._cancel_downstream(txn)
                if resp.status == 100:
                    return cancel
                return [*cancel, *self._response_up(resp, txn, source, now)]
        if resp.status == 100:
            return []  # hop by hop: we sent our own 100 already (§16.7 step 3)
        return self._response_up(resp, txn, source, now)


    def _response_up(
        self, resp: Response, txn: InviteTransaction, source: Flow, now: float,
    ) -> list[Effect]:
        """A response (not 100) to a live INVITE: passed up; a final one ends it."""
        effects: list[Effect] = []
        if self.media is not None:
            media_effects, ok = self.media.on_invite_response(resp, txn.to_phone, source, txn.inbound, now)
            if not ok:
                return list(media_effects)
            effects += media_effects
        txn.retransmit_at = None
        data = resp.serialise()
        txn.last_response = data
        if resp.status >= 200:
            # A failed call at INFO; an answered one is DEBUG: its "bye" line follows
            # (docs/relay.md, "What is logged": two INFO lines per call, as before issue 9).
            log.log(logging.INFO if resp.status >= 300 else logging.DEBUG,
                    "event=invite_final call_id=%s status=%d", txn.call_id, resp.status)
            self.txns.finish(txn, TxnEvent.FINAL, now)
        return [*effects, *self.send_back(data, txn.inbound)]

    def _late_response(self, resp: Response, fin: Finished, source: Flow, now: float) -> list[Effect]:
        """A response to an INVITE already answered upstream. COMPLETED: a retransmitted
        final or another 2xx of a forking callee, passed up again (a provisional too).
        ANSWERED, the caller has the relay's own answer: an error is ACKed by the relay
        (RFC 3261 §17.1.1.3), a 2xx still goes to the caller (§16.7 step 5)."""
        if resp.status == 100:
            return []  # hop by hop
        effects: list[Effect] = []
        if fin.state is TxnState.ANSWERED:
            if resp.status >= 300:
                return self.downstream_request(fin, "ACK", resp.get("to") or "")
            if resp.status < 200:
                return []
            # Not anchored now, but never to a phone with the peer its node named.
            MediaCalls.pass_on(resp, source, fin.inbound.node_link)
        elif self.media is not None:
            media_effects, ok = self.media.on_invite_response(resp, fin.to_phone, source, fin.inbound, now)
            if not ok:
                return list(media_effects)
            effects += media_effects
        data = resp.serialise()
        if resp.status >= 200:
            self.txns.answered_again(fin, TxnEvent.FINAL, data)
        return [*effects, *self.send_back(data, fin.inbound)]

    def _on_timer(self, txn: InviteTransaction, now: float) -> list[Effect]:
        if now >= txn.give_up_at:
            if txn.state is TxnState.HELD:
                # The woken phone did not register within the ring timeout.
                self.counters.inc("push_holds_total", "timeout")
                return self.holds.end(txn, now)
            return self._timeout(txn, now)
        if txn.retransmit_at is not None and now >= txn.retransmit_at and txn.outbound is not None:
            self.counters.inc("invite_retransmissions_total")
            txn.interval *= 2
            txn.retransmit_at = now + txn.interval
            return [Send(txn.outbound, txn.forwarded)]
        return []


    def _timeout(self, txn: InviteTransaction, now: float) -> list[Effect]:
        """Timer B (UDP, nothing heard) or C (rang too long): 408 upstream and, if the
        far end rang, CANCEL it (RFC 3261 §16.8)."""
        out = self._cancel_downstream(txn) if txn.got_provisional else []
        txn.last_response = self.replies.upstream(txn, 408, "Request Timeout")
        self.txns.finish(txn, TxnEvent.TIMEOUT, now)
        if self.media is not None:
            out += self.media.sessions.failed(txn.call_id)
        self.counters.inc("invite_timeouts_total")
        log.info("event=invite_timeout call_id=%s status=408", txn.call_id)
        out.append(Send(txn.inbound, txn.last_response))
        return out

