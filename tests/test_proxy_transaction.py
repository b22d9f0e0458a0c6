"""INVITE transactions (relay.proxy.transaction): the state table, lingering, and what a
finished call leaves for CPython's cyclic collector (issue 9: its full collections were
the call-setup p99 at 400 calls/s, and lingering transactions most of what they scanned)."""

from __future__ import annotations

import gc
import types
from collections.abc import Iterable, Iterator

import pytest

from relay.media.effects import BindPorts
from relay.media.ports import PortPool
from relay.media.session import MediaSessions
from relay.proxy.effects import Effect
from relay.proxy.flow import Flow
from relay.proxy.transaction import (
    LINGER,
    Finished,
    InviteTransaction,
    TransactionStateError,
    TransactionTable,
    TxnEvent,
    TxnState,
)
from tests.proxyharness import (
    PBX_DOMAIN,
    PBX_TCP,
    PHONE_UDP,
    Out,
    RecordingProxy,
    feed,
    make_proxy,
    one,
    register_pbx,
    request,
    response_to,
)
from tests.test_proxy_core import OUTBOUND, PBX_CONTACT, SDP, phone_invite

ANSWER = SDP.replace("192.168.1.20", "10.1.1.1")


def txn(key: str = "b1", state: TxnState = TxnState.CALLING) -> InviteTransaction:
    return InviteTransaction(key=(key, "192.0.2.20:5060", "INVITE"), inbound=PHONE_UDP, created=0.0,
                             call_id=f"{key}@test", upstream=[], serial="0123", state=state)


def test_a_finished_transaction_lingers_with_its_answer_then_goes() -> None:
    table = TransactionTable()
    t = txn()
    table.add(t, branch="z9hG4bKrelay1")
    assert (len(table), table.live_count, table.live_by_source) == (1, 1, {"192.0.2.20": 1})
    t.outbound, t.last_response = PBX_TCP, b"SIP/2.0 486 Busy Here\r\n\r\n"
    table.finish(t, TxnEvent.FINAL, now=10.0)
    assert (len(table), table.live_count, table.live_by_source) == (1, 0, {})
    fin = table.by_our_branch("z9hG4bKrelay1")
    assert isinstance(fin, Finished) and fin == table.find(t.key)
    assert (fin.state, fin.last_response, fin.inbound, fin.outbound, fin.live) == (
        TxnState.COMPLETED, b"SIP/2.0 486 Busy Here\r\n\r\n", PHONE_UDP, PBX_TCP, False)
    assert table.get(t.key) is None  # not live any more
    assert table.next_due() == 10.0 + LINGER
    assert table.expire(10.0 + LINGER - 0.01) == 0 and table.find(t.key) is not None
    assert table.expire(10.0 + LINGER) == 1
    assert (len(table), table.find(t.key), table.by_our_branch("z9hG4bKrelay1")) == (0, None, None)


def test_a_transition_the_table_does_not_have_raises() -> None:
    table = TransactionTable()
    t = txn(state=TxnState.HELD)
    table.add(t)
    with pytest.raises(TransactionStateError):
        table.move(t, TxnEvent.PROVISIONAL)  # a held INVITE went nowhere yet
    t.last_response = b"SIP/2.0 480 Temporarily Unavailable\r\n\r\n"
    table.finish(t, TxnEvent.TIMEOUT, now=0.0)
    fin = table.finished(t.key)
    assert fin is not None and fin.state is TxnState.ANSWERED
    with pytest.raises(TransactionStateError):
        table.answered_again(fin, TxnEvent.RELEASED, None)


def test_lingering_transactions_are_not_tracked_by_the_cyclic_collector() -> None:
    table = TransactionTable()
    for i in range(50):
        t = txn(f"b{i}")
        table.add(t, branch=f"z9hG4bKrelay{i}")
        t.outbound, t.last_response = PBX_TCP, b"SIP/2.0 200 OK\r\n\r\n"
        table.finish(t, TxnEvent.FINAL, now=1.0)
    del t
    untrack()
    assert tracked_reachable(table) <= 6  # the table and its dicts, deque and heap: nothing per transaction


# ------------------------------------------------------------------ whole calls


class Calls:
    """A proxy with media anchoring and the PBX phoned home; calls phone → PBX that end
    as a running relay's do: answered (200, ACK, BYE, 200) or refused (486, ACKed)."""

    def __init__(self) -> None:
        self.media = MediaSessions("198.51.100.1", PortPool(10_000, 12_000))
        self.proxy: RecordingProxy = make_proxy(self.media)[0]
        self.bind(self.proxy.start(0.0))
        register_pbx(self.proxy, PBX_TCP, now=0.0)
        self.finals: dict[int, bytes] = {}  # call → the final response the phone got

    def bind(self, effects: Iterable[Effect]) -> None:
        """Bind every port pair the media component asks for, as the shell does."""
        for e in effects:
            if isinstance(e, BindPorts):
                self.bind(self.proxy.on_ports_bound(tuple(e.ports), ()))

    def feed(self, data: bytes, flow: Flow, now: float) -> list[Out]:
        out = feed(self.proxy, data, flow, now)
        self.bind(self.proxy.take_effects())
        return out

    def call(self, i: int, now: float) -> None:
        invite = phone_invite(branch=f"z9hG4bKgc{i}", call_id=f"gc{i}")
        _, fwd = self.feed(invite, PHONE_UDP, now)
        self.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, now)
        if i % 4 == 3:
            self.finals[i] = one(self.feed(response_to(fwd.data, 486, "Busy Here"), PBX_TCP, now)).data
            ack = request("ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20",
                          via_port=5062, branch=f"z9hG4bKgc{i}", call_id=f"gc{i}", to_tag="uas1",
                          headers=[OUTBOUND])
            assert one(self.feed(ack, PHONE_UDP, now)).flow == PBX_TCP  # passed on, as the PBX sent the 486
            return
        ok = response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT, "Content-Type: application/sdp"])
        body = f"Content-Length: {len(ANSWER)}\r\n\r\n{ANSWER}".encode()
        ok = ok.replace(b"Content-Length: 0\r\n\r\n", body)
        self.finals[i] = one(self.feed(ok, PBX_TCP, now)).data
        bye = request("BYE", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20",
                      via_port=5062, call_id=f"gc{i}", cseq=2, to_tag="uas1", headers=[OUTBOUND])
        bye_fwd = one(self.feed(bye, PHONE_UDP, now))
        assert one(self.feed(response_to(bye_fwd.data, 200, "OK"), PBX_TCP, now)).flow == PHONE_UDP


@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@pytest.mark.usefixtures("no_cyclic_collector")
def test_finished_calls_keep_nothing_the_cyclic_collector_must_scan_or_free() -> None:
    """Per finished call (lingering for LINGER s to absorb retransmissions), the GC-tracked
    objects the core keeps, and the cyclic garbage it made, stay under a bound. At 1fd746c:
    ~14 tracked objects kept per call (the transaction, its parsed Via/From/To/Call-ID/CSeq
    headers, flows, timer entries, a token cache key) and ~16 of cyclic garbage (the media legs)."""
    calls = Calls()
    for i in range(8):  # every table, counter and label the calls use exists
        calls.call(i, 1.0)
    gc.collect()
    before = tracked_reachable(calls.proxy)
    n = 200
    for i in range(8, 8 + n):
        calls.call(i, 2.0)
    assert len(calls.proxy.txns) == 8 + n and calls.proxy.pending_invites == 0  # all lingering
    assert not calls.media.sessions  # every call's media ended
    calls.proxy.on_timer(2.0)  # the sweep (once a second) folds the ended legs' counts in
    garbage = gc.collect()
    untrack()
    kept = tracked_reachable(calls.proxy) - before
    assert kept <= n // 20, f"{kept / n:.2f} tracked objects kept per finished call"
    assert garbage <= n // 20, f"{garbage / n:.2f} objects of cyclic garbage per call"
    # ... and each still answers a retransmitted INVITE with the very bytes of its final
    for i in (9, 11, 8 + n - 1):
        again = calls.feed(phone_invite(branch=f"z9hG4bKgc{i}", call_id=f"gc{i}"), PHONE_UDP, 3.0)
        assert [o.data for o in again] == [calls.finals[i]]
    calls.proxy.on_timer(2.0 + LINGER)
    assert len(calls.proxy.txns) == 0


def untrack() -> None:
    """What CPython stops tracking (tuples and dicts of untracked items), it stops tracking
    during a collection; a tuple whose items were untracked in the same pass may need the
    next one. A running relay's young collections do both long before a full one."""
    gc.collect()
    gc.collect()


def tracked_reachable(root: object) -> int:
    """GC-tracked objects reachable from ``root`` (gc.get_referents), not through
    classes, modules or functions (the program, not its state)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    seen: set[int] = set()
    todo = [root]
    count = 0
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        count += gc.is_tracked(o)
        todo.extend(gc.get_referents(o))
    return count
