"""INVITE transactions kept by the proxy (RFC 3261 §17.2.1, §16.7, §16.10).

Only INVITEs are stateful: the relay answers 100 Trying at once, absorbs
retransmissions, matches CANCEL, and on UDP retransmits downstream itself
(Timer A) because the caller stops retransmitting once it saw our 100.
Everything else is forwarded statelessly (RFC 3261 §16.11).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.proxy.flow import Flow
from relay.proxy.wake import Held
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

TxnKey = tuple[str, ...]


@dataclass(slots=True)
class InviteTransaction:
    key: TxnKey
    inbound: Flow
    created: float
    outbound: Flow | None = None
    forwarded: bytes = b""  # the INVITE as sent downstream (for Timer A)
    downstream: dict[str, str] = field(default_factory=dict)  # the forwarded INVITE: for CANCEL and ACK
    last_response: bytes | None = None
    final: bool = False
    got_provisional: bool = False
    retransmit_at: float | None = None
    interval: float = T1
    give_up_at: float = 0.0
    expires_at: float = 0.0
    call_id: str = ""
    cancelled: bool = False
    cancel_pending: bool = False  # CANCELled before any provisional: sent on the first one
    to_phone: bool = False  # the INVITE went PBX → phone
    local_final: bool = False  # the relay answered the caller itself (408)
    our_branch: str = ""
    upstream: list[Header] = field(default_factory=list)  # Via/From/To/Call-ID/CSeq as received
    released: bool = False  # was held, then forwarded to the woken phone's new flow
    held: Held | None = None  # waiting for a push-woken phone (outbound is None until then)


class TransactionTable:
    def __init__(self) -> None:
        self._txns: dict[TxnKey, InviteTransaction] = {}
        self._by_branch: dict[str, InviteTransaction] = {}

    def __len__(self) -> int:
        return len(self._txns)

    def get(self, key: TxnKey) -> InviteTransaction | None:
        return self._txns.get(key)

    def add(self, txn: InviteTransaction) -> None:
        self._txns[txn.key] = txn

    def link_branch(self, branch: str, txn: InviteTransaction) -> None:
        txn.our_branch = branch
        self._by_branch[branch] = txn

    def by_our_branch(self, branch: str) -> InviteTransaction | None:
        return self._by_branch.get(branch)

    def pending(self) -> int:
        """Transactions still waiting for a final answer (what a drain waits for)."""
        return sum(1 for t in self._txns.values() if not t.final)

    def remove(self, txn: InviteTransaction) -> None:
        self._txns.pop(txn.key, None)
        self._by_branch.pop(txn.our_branch, None)
