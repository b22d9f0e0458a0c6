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
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import Enum

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
    expires_at: float = 0.0  # end of the linger
    cancel_pending: bool = False  # CANCELled before any provisional: sent on the first one
    cancelled: bool = False  # a CANCEL went downstream
    released: bool = False  # was held, then forwarded to the woken phone's new flow
    relocated: bool = False  # sent again after the cached node said it does not hold the PBX (cluster)
    ringing: bool = False  # held, and the 180 went upstream once the push was out
    extra: object = None  # what a component keeps with the transaction (the held INVITE)
    timer_gen: int = 0

    def move(self, event: TxnEvent) -> TxnState:
        """Apply ``event``; raises TransactionStateError if the table has no such transition."""
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise TransactionStateError(f"{event.value} in state {self.state.value}") from None
        return self.state

    @property
    def live(self) -> bool:
        """Still waiting for a final answer (what a drain waits for)."""
        return self.state in LIVE

    @property
    def got_provisional(self) -> bool:
        return self.state is TxnState.PROCEEDING

    def next_deadline(self) -> float:
        """The earliest of this transaction's running timers."""
        if not self.live:
            return self.expires_at
        if self.retransmit_at is not None:
            return min(self.retransmit_at, self.give_up_at)
        return self.give_up_at


@dataclass(order=True, slots=True)
class _Entry:
    when: float
    seq: int
    key: TxnKey = field(compare=False)
    gen: int = field(compare=False)


class TransactionTable:
    """Transactions by key (RFC 3261 §17.2.3) and by the branch the relay sent them
    with, and one timer per transaction. Timer entries name their transaction by
    key, so a transaction that ended is freed at once, not when its entry comes due."""

    def __init__(self) -> None:
        self._txns: dict[TxnKey, InviteTransaction] = {}
        self._by_branch: dict[str, InviteTransaction] = {}
        self._heap: list[_Entry] = []
        self._seq = 0
        self.live_count = 0  # transactions in a LIVE state, kept as they move
        # ... and per source IP and per PBX serial (admission caps, issue 10)
        self.live_by_source: dict[str, int] = {}
        self.live_by_serial: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._txns)

    def get(self, key: TxnKey) -> InviteTransaction | None:
        return self._txns.get(key)

    def by_our_branch(self, branch: str) -> InviteTransaction | None:
        return self._by_branch.get(branch)

    def add(self, txn: InviteTransaction, branch: str = "") -> None:
        """Keep ``txn`` (and find it by ``branch``, the one it went downstream with)."""
        self._txns[txn.key] = txn
        if txn.live:
            self._count_live(txn, 1)
        if branch:
            self.link_branch(txn, branch)
        self.schedule(txn)

    def link_branch(self, txn: InviteTransaction, branch: str) -> None:
        txn.our_branch = branch
        self._by_branch[branch] = txn

    def move(self, txn: InviteTransaction, event: TxnEvent) -> TxnState:
        """``txn.move(event)``, keeping the count of live transactions right."""
        was_live = txn.live
        state = txn.move(event)
        if was_live and not txn.live:
            self._count_live(txn, -1)
            txn.forwarded = b""  # no more Timer A: the INVITE's bytes are not needed
            txn.extra = None
        return state

    def finish(self, txn: InviteTransaction, event: TxnEvent, now: float) -> None:
        """A live transaction got its final answer (``FINAL``) or gave one itself
        (``TIMEOUT``): it lingers LINGER seconds to absorb retransmissions."""
        self.move(txn, event)
        txn.expires_at = now + LINGER
        self.schedule(txn)

    def remove(self, txn: InviteTransaction) -> None:
        if self._txns.get(txn.key) is txn:
            del self._txns[txn.key]
            if txn.live:
                self._count_live(txn, -1)
        if self._by_branch.get(txn.our_branch) is txn:
            del self._by_branch[txn.our_branch]

    def _count_live(self, txn: InviteTransaction, step: int) -> None:
        self.live_count += step
        for table, key in ((self.live_by_source, txn.inbound.remote_ip), (self.live_by_serial, txn.serial)):
            n = table.get(key, 0) + step
            if n > 0:
                table[key] = n
            else:
                table.pop(key, None)

    # ------------------------------------------------------------------ timers
    def schedule(self, txn: InviteTransaction) -> None:
        """(Re)arm ``txn``'s one timer at its next deadline; any earlier entry is stale."""
        txn.timer_gen += 1
        self._seq += 1
        heapq.heappush(self._heap, _Entry(txn.next_deadline(), self._seq, txn.key, txn.timer_gen))
        if len(self._heap) > 2 * len(self._txns) + HEAP_SLACK:
            self._compact()

    def next_due(self) -> float | None:
        return self._heap[0].when if self._heap else None

    def due(self, now: float) -> list[InviteTransaction]:
        """Transactions whose timer has come, each once, oldest deadline first."""
        out = []
        heap = self._heap
        while heap and heap[0].when <= now:
            entry = heapq.heappop(heap)
            txn = self._txns.get(entry.key)
            if txn is not None and txn.timer_gen == entry.gen:
                out.append(txn)
        return out

    def _compact(self) -> None:
        self._heap = [
            _Entry(t.next_deadline(), i, t.key, t.timer_gen) for i, t in enumerate(self._txns.values())
        ]
        heapq.heapify(self._heap)
        self._seq = len(self._heap)
