"""Never ring twice (issue 10 item 6): a push the provider may have processed is not
sent again; one it provably did not process is, at once; and a push with no
answer is still logged and counted, as ``sent_unconfirmed``.

The whole path: PushService.wake → deliver → ApnsGateway/FcmGateway → HTTP/2 over
TLS → the fakes of tests/pushfakes.py, told to misbehave at the connection level
(tests/pushwire.py's Fault). What is asserted is what the phone would see — the
pushes in the fake's record for that device token — and the push log row.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from push.gateways import ApnsGateway, FcmGateway, deliver
from push.gateways import apns as apns_mod
from push.gateways import fcm as fcm_mod
from push.model import Outcome, PushMessage, PushResult, PushTarget
from push.service import DeviceUpdate, PushService, WakeRequest
from push.store import SqliteStore
from tests.pushfakes import Answer, FakeApns, FakeFcm, Fault

KEY = b"K" * 32
SERIAL, USER = "0123456789", "201"
APNS_TOKENS = ["a1" * 32, "b2" * 32]
FCM_TOKENS = ["fcm-a:APA91bDevice", "fcm-b:APA91bDevice"]


@dataclass
class Rig:
    """A push service over SQLite whose one real gateway talks to one fake."""

    fake: FakeApns | FakeFcm
    svc: PushService
    targets: list[PushTarget]

    def received(self, token: str) -> int:
        """Pushes the fake processed for ``token``: what that phone would get."""
        return sum(1 for r in self.fake.requests if r.token == token and r.method == "POST"
                   and r.path != "/token")

    async def wake(self, i: int, call_id: str) -> PushResult:
        target = self.targets[i]
        device = self.svc.device_id(target, SERIAL, USER)
        return await self.svc.wake(WakeRequest(device, call_id, "100", USER, "198.51.100.7:5060", 5.0,
                                               serial=SERIAL))

    async def last_log_row(self) -> dict[str, object]:
        """The newest push log row of the user (the log row holds no Call-ID)."""
        rows = await self.svc.user_log(SERIAL, USER)
        assert rows
        return max(rows, key=lambda r: float(r["at"]))

    def counted(self, outcome: str) -> int:
        provider = self.targets[0].provider
        value = self.svc.metrics.set.registry.get_sample_value(
            "pbx_push_pushes_total", {"provider": provider, "outcome": outcome})
        return int(value or 0)


@pytest.fixture(params=["apns", "fcm"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              ) -> AsyncIterator[Rig]:
    # A request with no answer gives up after 0.5 s here (10 s in production).
    monkeypatch.setattr(apns_mod, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(fcm_mod, "REQUEST_TIMEOUT", 0.5)
    fake: FakeApns | FakeFcm
    gw: ApnsGateway | FcmGateway
    if request.param == "apns":
        fake = FakeApns()
        gw = ApnsGateway(fake.base_url, key_pem=fake.p8_pem, key_id=fake.key_id, team_id=fake.team_id,
                         ca_file=fake.ca_file)
        targets = [PushTarget("apns", t, f"{fake.team_id}.com.example.app.voip") for t in APNS_TOKENS]
    else:
        fake = FakeFcm()
        gw = FcmGateway(service_account=fake.service_account, base_url=fake.base_url, ca_file=fake.ca_file)
        targets = [PushTarget("fcm", t, fake.project_id) for t in FCM_TOKENS]
    store = SqliteStore(tmp_path / "push.sqlite", KEY, threaded=False)
    svc = PushService(store, {gw.provider: gw}, KEY, clock=time.time)
    async with fake:
        for t in targets:
            await svc.register_device(DeviceUpdate(t, SERIAL, USER, "203.0.113.9", 5060, "tls"))
        yield Rig(fake, svc, targets)
        await svc.aclose()
    fake.close()


async def test_connection_closed_right_after_a_200_is_one_push(rig: Rig) -> None:
    """The incident: the provider answers 200, then closes the connection."""
    token = rig.targets[0].token
    rig.fake.fault(token, Fault.CLOSE_AFTER_ANSWER)
    result = await rig.wake(0, "call-1")
    assert (result.outcome, result.status, result.attempts) == (Outcome.SENT, 200, 1)
    assert rig.received(token) == 1
    assert (await rig.last_log_row())["outcome"] == "sent"
    # The next push notices the closed connection before writing and opens a new one.
    assert (await rig.wake(0, "call-2")).outcome is Outcome.SENT
    assert rig.received(token) == 2


async def test_goaway_below_an_inflight_request_resends_only_that_one(rig: Rig) -> None:
    first, second = (t.token for t in rig.targets)
    rig.fake.script(first, Answer(200, delay=0.3))  # stream 1 stays in flight...
    rig.fake.fault(second, Fault.GOAWAY_BEFORE)  # ...when stream 3 gets GOAWAY(last-stream-id 1)
    results: dict[int, PushResult] = {}

    async def wake(i: int) -> None:
        results[i] = await rig.wake(i, f"call-{i}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake, 0)
        await rig.fake.wait_for_async(1)
        nursery.start_soon(wake, 1)
    # Stream 3 was above last-stream-id: not processed, sent again at once, delivered once.
    assert (results[1].outcome, results[1].attempts) == (Outcome.SENT, 2)
    assert [a.reason for a in results[1].history] == ["GoAway", ""]
    assert rig.fake.not_processed == [(second, Fault.GOAWAY_BEFORE)]
    # Stream 1 was at or below it: answered after the GOAWAY, and that answer counts.
    assert (results[0].outcome, results[0].status, results[0].attempts) == (Outcome.SENT, 200, 1)
    assert (rig.received(first), rig.received(second)) == (1, 1)


async def test_refused_stream_is_sent_again_at_once(rig: Rig) -> None:
    token = rig.targets[0].token
    rig.fake.fault(token, Fault.REFUSE_STREAM)
    t0 = trio.current_time()
    result = await rig.wake(0, "call-1")
    assert (result.outcome, result.attempts) == (Outcome.SENT, 2)
    assert result.history[0].kind == "not_processed" and result.history[0].reason == "RefusedStream"
    assert trio.current_time() - t0 < 0.1 + 0.5  # no back-off sleep (0.1-0.2 s) before the resend
    assert rig.received(token) == 1 and rig.fake.not_processed == [(token, Fault.REFUSE_STREAM)]
    assert (await rig.last_log_row())["outcome"] == "sent"


@pytest.mark.parametrize(("fault", "reason_prefix"), [
    (Fault.STALL_THEN_RESET, "StreamReset:INTERNAL_ERROR"),
    (Fault.STALL_THEN_CLOSE, ""),  # EOF or a TLS error, as the kernel reports the close
])
async def test_processed_then_no_answer_is_sent_unconfirmed_never_twice(
        rig: Rig, fault: Fault, reason_prefix: str) -> None:
    token = rig.targets[0].token
    rig.fake.fault(token, fault)
    result = await rig.wake(0, "call-1")
    assert (result.outcome, result.status, result.attempts) == (Outcome.SENT_UNCONFIRMED, None, 1)
    assert result.reason.startswith(reason_prefix) and result.reason
    await trio.sleep(0.2)  # nothing else arrives later either
    assert rig.received(token) == 1
    row = await rig.last_log_row()
    assert (row["outcome"], row["attempts"]) == ("sent_unconfirmed", 1)
    assert rig.counted("sent_unconfirmed") == 1
    # The gateway carries on with a new connection.
    assert (await rig.wake(0, "call-2")).outcome is Outcome.SENT


async def test_no_answer_within_the_request_timeout_is_sent_unconfirmed(rig: Rig) -> None:
    token = rig.targets[0].token
    rig.fake.script(token, Answer(200, delay=3.0))
    result = await rig.wake(0, "call-1")
    assert (result.outcome, result.reason, result.attempts) == (Outcome.SENT_UNCONFIRMED, "Timeout", 1)
    assert rig.received(token) == 1
    assert (await rig.last_log_row())["outcome"] == "sent_unconfirmed"


@pytest.mark.parametrize("goaway", [True, False], ids=["goaway", "bare-close"])
async def test_connection_closed_while_idle_loses_no_push(rig: Rig, goaway: bool) -> None:
    """A provider closing an idle connection must not make the next push unknown (a
    call lost): the close is read before anything is written."""
    token = rig.targets[0].token
    assert (await rig.wake(0, "call-1")).outcome is Outcome.SENT
    accepted = rig.fake.connections_accepted
    rig.fake.close_connections(goaway=goaway)
    await trio.sleep(0.2)
    result = await rig.wake(0, "call-2")
    assert (result.outcome, result.attempts) == (Outcome.SENT, 1)
    assert rig.received(token) == 2 and rig.fake.connections_accepted == accepted + 1


async def test_requests_cancelled_together_leave_no_one_without_a_reader(rig: Rig) -> None:
    """Requests on one connection take turns reading it; when the reader and the
    next in line are cancelled at the same moment (their calls' deadlines), the
    requests still waiting must get their answers all the same, not sit out their
    request timeout (0.5 s here) and end unconfirmed. trio runs tasks woken together
    in random order: several rounds."""
    gw = rig.svc.gateways[rig.targets[0].provider]
    late, quick = rig.targets
    assert (await rig.wake(1, "warm-up")).outcome is Outcome.SENT  # one connection, open

    async def cut_short(call_id: str, deadline: float) -> None:
        assert (await deliver(gw, _message(late, call_id), deadline)).outcome is Outcome.FAILED

    for i in range(8):
        rig.fake.script(late.token, Answer(200, delay=2.0), Answer(200, delay=2.0))
        rig.fake.script(quick.token, Answer(200, delay=0.3))
        async with trio.open_nursery() as nursery:
            deadline = trio.current_time() + 0.15
            nursery.start_soon(cut_short, f"a{i}", deadline)
            nursery.start_soon(cut_short, f"b{i}", deadline)
            await trio.sleep(0.05)
            result = await deliver(gw, _message(quick, f"c{i}"), trio.current_time() + 5)
        assert (result.outcome, result.status, result.attempts) == (Outcome.SENT, 200, 1), i


def _message(target: PushTarget, call_id: str) -> PushMessage:
    return PushMessage(target, call_id, "100", USER, 5, time.time())
