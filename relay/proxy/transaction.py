"""INVITE transactions kept by the proxy: an explicit state machine (RFC 3261 §17, §16.7, §16.10).

Only INVITEs are stateful: the relay answers 100 Trying at once, absorbs
retransmissions, matches CANCEL, and on UDP retransmits downstream itself (Timer A)
because the caller stops retransmitting once it saw our 100. Everything else is
forwarded statelessly (RFC 3261 §16.11).

The states and what moves between them (h11's ``_state.py`` is the model: the table
is the documentation, and a transition not in it raises)::

    HELD ──released──▶ CALLING ──provisional──▶ PROCEEDING ──final──▶ COMPLETED ──linger_end──▶ TERMINATED
      │                   │  ╲                      │                     ▲ final (retransmitted, forked 2xx)
      │                   │   ╲────────final────────┼────────────────────▶┘
      ├──timeout──▶ ANSWERED ◀──timeout─────────────┘   (Timer B, Timer C, ring timeout, push failed)
      │               │  ▲ final (a late answer: ACKed if an error, passed up if a 2xx)
      │               └──┘──linger_end──▶ TERMINATED
      └──abandoned──▶ TERMINATED  (the caller's connection closed while the phone slept)

A live transaction is an :class:`InviteTransaction`. Once it is COMPLETED or ANSWERED
it lingers LINGER seconds, at 400 calls/s some 13,000 of them, and only what the
lingering needs is kept (:class:`Finished`): the answer a retransmitted INVITE gets,
the flows and the Via/From/To/... an ACK or a late answer needs, no parsed message.
The table stores it as one plain tuple of strings, bytes and numbers, which CPython's
cyclic collector stops tracking: a full collection does not scan the lingering
transactions at all (issue 9: they were most of what it scanned, ~15 objects each,
and its pauses were the call-setup p99; bench/RESULTS.md).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from relay.proxy.flow import Flow
from relay.sip.message import Header

# RFC 3261 §17.1.1.1 / Table 4.
T1 = 0.5
TIMER_B = 64 * T1  # give up on a downstream that never answered: 408
# Completed transactions linger to absorb retransmitted INVITEs and the ACK of
# a non-2xx final (Timer H = 64*T1; RFC 6026 "Accepted" for 2xx is the same).
LINGER = 64 * T1
# Proxy Timer C (RFC 3261 §16.6 item 11) is "greater than 3 minutes"; a phone
# that rings longer than this gets 408 from the relay.
TIMER_C = 180.0
# Stale timer entries (for transactions that moved on or ended) tolerated before the
# heap is rebuilt from the live transactions: bounds the heap to about twice the table.
HEAP_SLACK = 1024

TxnKey = tuple[str, ...]


class TxnState(Enum):
    """Where an INVITE transaction is (see the module docstring for the diagram)."""

    HELD = "held"  # waiting for a push-woken phone; nothing sent downstream yet
    CALLING = "calling"  # forwarded, no provisional yet: Timer A (UDP) and Timer B run
    PROCEEDING = "proceeding"  # a provisional came: Timer C runs
    COMPLETED = "completed"  # the callee's final answer went upstream; lingering
    ANSWERED = "answered"  # the relay answered upstream itself (408/480/487); lingering
    TERMINATED = "terminated"


class TxnEvent(Enum):
    """What can happen to an INVITE transaction."""

    RELEASED = "released"  # a held INVITE goes out on the woken phone's new flow
    PROVISIONAL = "provisional"  # 101-199 from downstream (100 is hop by hop and ignored)
    FINAL = "final"  # 200-699 from downstream
    TIMEOUT = "timeout"  # Timer B/C, ring timeout or a failed push: the relay answers
    LINGER_END = "linger_end"  # retransmissions of the final can no longer come
    ABANDONED = "abandoned"  # the caller's connection closed while the phone slept


S, E = TxnState, TxnEvent
TRANSITIONS: dict[tuple[TxnState, TxnEvent], TxnState] = {
    (S.HELD, E.RELEASED): S.CALLING,
    (S.HELD, E.TIMEOUT): S.ANSWERED,
    (S.HELD, E.ABANDONED): S.TERMINATED,
    (S.CALLING, E.PROVISIONAL): S.PROCEEDING,
    (S.CALLING, E.FINAL): S.COMPLETED,
    (S.CALLING, E.TIMEOUT): S.ANSWERED,
    (S.PROCEEDING, E.PROVISIONAL): S.PROCEEDING,
    (S.PROCEEDING, E.FINAL): S.COMPLETED,
    (S.PROCEEDING, E.TIMEOUT): S.ANSWERED,
    # A retransmitted final, or a second 2xx of a forking callee: passed up again.
    (S.COMPLETED, E.PROVISIONAL): S.COMPLETED,
    (S.COMPLETED, E.FINAL): S.COMPLETED,
    (S.COMPLETED, E.LINGER_END): S.TERMINATED,
    # The callee answers after the relay gave up: ACK an error, pass a 2xx up (§16.7 step 5).
    (S.ANSWERED, E.PROVISIONAL): S.ANSWERED,
    (S.ANSWERED, E.FINAL): S.ANSWERED,
    (S.ANSWERED, E.LINGER_END): S.TERMINATED,
}
del S, E
LIVE = frozenset({TxnState.HELD, TxnState.CALLING, TxnState.PROCEEDING})


class TransactionStateError(Exception):
    """A transition the table does not allow: a bug in the caller, never input."""


@dataclass(slots=True)
class Downstream:
    """What of the forwarded INVITE a CANCEL or an ACK for a non-2xx must repeat
    (RFC 3261 §9.1, §17.1.1.3): Request-URI, top Via, From, To, Call-ID, CSeq, Route."""

    uri: str
    via: str
    from_: str
    to: str
    call_id: str
    cseq: int
    route: str


@dataclass(slots=True)
class InviteTransaction:
    """One INVITE the relay keeps: its server side (``inbound``) and client side
    (``outbound``), the timers of both, and what a CANCEL or an ACK will need."""

    key: TxnKey
    inbound: Flow
    created: float
    call_id: str
    upstream: list[Header]  # Via/From/To/Call-ID/CSeq as received: what our own answers copy
    to_phone: bool = False  # the INVITE went PBX → phone
    serial: str = ""  # the PBX whose call it is (either direction)
    state: TxnState = TxnState.CALLING
    outbound: Flow | None = None
    forwarded: bytes = b""  # the INVITE as sent downstream: Timer A resends it; dropped once answered
    downstream: Downstream | None = None
    last_response: bytes | None = None  # what a retransmitted INVITE is answered with
    our_branch: str = ""
    retransmit_at: float | None = None  # Timer A
    interval: float = T1
    give_up_at: float = 0.0  # Timer B, Timer C or the ring timeout
    cancel_pending: bool = False  # CANCELled before any provisional: sent on the first one
    cancelled: bool = False  # a CANCEL went downstream
    released: bool = False  # was held, then forwarded to the woken phone's new flow
    relocated: bool = False  # sent again after the cached node said it does not hold the PBX (cluster)
    ringing: bool = False  # held, and the 180 went upstream once the push was out
    extra: Any = None  # what a component keeps with it (the held INVITE); Any: mypyc
    timer_gen: int = 0

    def move(self, event: TxnEvent) -> TxnState:
        """Apply ``event``; raises TransactionStateError if the table has no such transition."""
        self.state = _step(self.state, event)
        return self.state

    @property
    def live(self) -> bool:
        """Still waiting for a final answer (what a drain waits for)."""
        return self.state in LIVE

    @property
    def got_provisional(self) -> bool:
        return self.state is TxnState.PROCEEDING

    def next_deadline(self) -> float:
        """The earliest of this (live) transaction's running timers."""
        if self.retransmit_at is not None:
            return min(self.retransmit_at, self.give_up_at)
        return self.give_up_at


@dataclass(frozen=True, slots=True)
class Finished:
    """A transaction that answered upstream (COMPLETED or ANSWERED) and lingers: what a
    retransmitted INVITE, the ACK of a released call's error and a late answer from
    downstream still need. A value made for each look-up (see :class:`TransactionTable`)."""

    key: TxnKey
    state: TxnState
    call_id: str
    last_response: bytes | None
    to_phone: bool
    released: bool
    our_branch: str
    inbound: Flow
    outbound: Flow | None
    downstream: Downstream | None

    live = False


# Finished as the table keeps it: only str, bytes, int, bool and None, in exact tuples, so
# that the cyclic collector untracks it (CPython untracks a tuple of untracked items during
# a young collection it takes part in, one holding tuples maybe at the next; a NamedTuple
# or a dataclass instance it tracks for good).
_FlowFields = tuple[str, str, int, str, int]
_DownFields = tuple[str, str, str, str, str, int, str]
_Packed = tuple[str, str, bytes | None, bool, bool, str, _FlowFields, _FlowFields | None, _DownFields | None]


def _flow_fields(f: Flow) -> _FlowFields:
    return (f.transport, f.remote_ip, f.remote_port, f.local_ip, f.local_port)


def _pack(txn: InviteTransaction | Finished) -> _Packed:
    d = txn.downstream
    return (
        txn.state.value, txn.call_id, txn.last_response, txn.to_phone, txn.released, txn.our_branch,
        _flow_fields(txn.inbound), None if txn.outbound is None else _flow_fields(txn.outbound),
        None if d is None else (d.uri, d.via, d.from_, d.to, d.call_id, d.cseq, d.route),
    )


def _unpack(key: TxnKey, p: _Packed) -> Finished:
    state, call_id, last, to_phone, released, branch, inbound, outbound, down = p
    return Finished(
        key, TxnState(state), call_id, last, to_phone, released, branch, Flow(*inbound),
        None if outbound is None else Flow(*outbound), None if down is None else Downstream(*down),
    )


class TransactionTable:
    """Transactions by key (RFC 3261 §17.2.3) and by the branch the relay sent them
    with. Live ones have one timer each (a heap; entries name their transaction by
    key, so a transaction that ended is freed at once, not when its entry comes due).
    Finished ones linger in the order they finished (every linger is LINGER long: a
    queue, no heap), kept packed (see :class:`Finished`)."""

    def __init__(self) -> None:
        self._txns: dict[TxnKey, InviteTransaction] = {}  # live
        self._done: dict[TxnKey, _Packed] = {}  # lingering
        self._expiry: deque[tuple[float, TxnKey]] = deque()  # lingering, oldest first
        self._by_branch: dict[str, TxnKey] = {}
        self._heap: list[tuple[float, int, TxnKey, int]] = []  # (when, seq, key, gen), live only
        self._seq = 0
        # Live transactions per source IP and per PBX serial (admission caps, issue 10).
        self.live_by_source: dict[str, int] = {}
        self.live_by_serial: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._txns) + len(self._done)

    @property
    def live_count(self) -> int:
        """Transactions in a LIVE state (what a drain waits for)."""
        return len(self._txns)

    def get(self, key: TxnKey) -> InviteTransaction | None:
        """The live transaction ``key``."""
        return self._txns.get(key)

    def finished(self, key: TxnKey) -> Finished | None:
        """The lingering transaction ``key``."""
        packed = self._done.get(key)
        return None if packed is None else _unpack(key, packed)

    def find(self, key: TxnKey) -> InviteTransaction | Finished | None:
        """Transaction ``key``, live or lingering."""
        return self._txns.get(key) or self.finished(key)

    def by_our_branch(self, branch: str) -> InviteTransaction | Finished | None:
        key = self._by_branch.get(branch)
        return None if key is None else self.find(key)

    def add(self, txn: InviteTransaction, branch: str = "") -> None:
        """Keep ``txn``, a live transaction (and find it by ``branch``, the one it went
        downstream with)."""
        assert txn.live, "only a live transaction is added"
        self._txns[txn.key] = txn
        self._count_live(txn, 1)
        if branch:
            self.link_branch(txn, branch)
        self.schedule(txn)

    def link_branch(self, txn: InviteTransaction, branch: str) -> None:
        txn.our_branch = branch
        self._by_branch[branch] = txn.key

    def move(self, txn: InviteTransaction, event: TxnEvent) -> TxnState:
        """``txn.move(event)`` for a live transaction that stays live or is abandoned
        (a final answer goes through :meth:`finish`)."""
        state = txn.move(event)
        assert txn.live or state is TxnState.TERMINATED, "a final answer goes through finish()"
        return state

    def finish(self, txn: InviteTransaction, event: TxnEvent, now: float) -> None:
        """A live transaction got its final answer (``FINAL``) or gave one itself
        (``TIMEOUT``; ``txn.last_response`` is that answer): it lingers LINGER seconds
        to absorb retransmissions, packed."""
        txn.move(event)
        assert not txn.live
        if self._txns.get(txn.key) is txn:
            del self._txns[txn.key]
            self._count_live(txn, -1)
        self._done[txn.key] = _pack(txn)
        self._expiry.append((now + LINGER, txn.key))

    def answered_again(self, fin: Finished, event: TxnEvent, last_response: bytes | None) -> Finished:
        """A lingering transaction took ``event`` (a retransmitted or late answer from
        downstream, which may replace what retransmitted INVITEs get)."""
        state = _step(fin.state, event)
        assert state is fin.state, "a lingering transaction lingers until LINGER_END"
        if self._done.get(fin.key) is None:
            return fin
        fin = Finished(fin.key, state, fin.call_id, last_response, fin.to_phone, fin.released,
                       fin.our_branch, fin.inbound, fin.outbound, fin.downstream)
        self._done[fin.key] = _pack(fin)
        return fin

    def remove(self, txn: InviteTransaction) -> None:
        """Forget a live transaction that ends without an answer of its own (abandoned,
        or refused on its way out)."""
        if self._txns.get(txn.key) is txn:
            del self._txns[txn.key]
            self._count_live(txn, -1)
        if self._by_branch.get(txn.our_branch) == txn.key:
            del self._by_branch[txn.our_branch]

    def _count_live(self, txn: InviteTransaction, step: int) -> None:
        for table, key in ((self.live_by_source, txn.inbound.remote_ip), (self.live_by_serial, txn.serial)):
            n = table.get(key, 0) + step
            if n > 0:
                table[key] = n
            else:
                table.pop(key, None)

    # ------------------------------------------------------------------ timers
    def schedule(self, txn: InviteTransaction) -> None:
        """(Re)arm live ``txn``'s one timer at its next deadline; any earlier entry is stale."""
        txn.timer_gen += 1
        self._seq += 1
        heapq.heappush(self._heap, (txn.next_deadline(), self._seq, txn.key, txn.timer_gen))
        if len(self._heap) > 2 * len(self._txns) + HEAP_SLACK:
            self._compact()

    def next_due(self) -> float | None:
        """When the next live timer or linger ends."""
        heap, expiry = self._heap, self._expiry
        while heap:  # entries of transactions that moved on or finished go first
            _, _, key, gen = heap[0]
            txn = self._txns.get(key)
            if txn is not None and txn.timer_gen == gen:
                break
            heapq.heappop(heap)
        if heap and expiry:
            return min(heap[0][0], expiry[0][0])
        if heap:
            return heap[0][0]
        return expiry[0][0] if expiry else None

    def due(self, now: float) -> list[InviteTransaction]:
        """Live transactions whose timer has come, each once, oldest deadline first."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, key, gen = heapq.heappop(heap)
            txn = self._txns.get(key)
            if txn is not None and txn.timer_gen == gen:
                out.append(txn)
        return out

    def expire(self, now: float) -> int:
        """End the lingers due by ``now`` (LINGER_END); how many ended."""
        expiry, done = self._expiry, self._done
        n = 0
        while expiry and expiry[0][0] <= now:
            _, key = expiry.popleft()
            packed = done.pop(key, None)
            if packed is None:
                continue
            _step(TxnState(packed[0]), TxnEvent.LINGER_END)
            branch = packed[5]
            if self._by_branch.get(branch) == key and key not in self._txns:
                del self._by_branch[branch]
            n += 1
        return n

    def _compact(self) -> None:
        self._heap = [(t.next_deadline(), i, t.key, t.timer_gen) for i, t in enumerate(self._txns.values())]
        heapq.heapify(self._heap)
        self._seq = len(self._heap)


def _step(state: TxnState, event: TxnEvent) -> TxnState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransactionStateError(f"{event.value} in state {state.value}") from None
