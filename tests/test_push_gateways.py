"""Push gateways: the shared retry policy, APNs and FCM answers, the dry-run gateway.

Two halves. The policy and the answer tables are tested as pure functions and
through ``deliver`` with a scripted in-memory gateway on trio's MockClock (no
sockets, so autojump is safe). The APNs and FCM clients are tested over real TLS
HTTP/2 against the fakes in ``tests/pushfakes.py``, with real (short) sleeps.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from push.gateways import ApnsGateway, FcmGateway, LogGateway, collapse_id, deliver
from push.gateways import apns as apns_mod
from push.gateways import fcm as fcm_mod
from push.gateways.base import (
    BACKOFF_MAX,
    CachedToken,
    Step,
    backoff,
    next_step,
    parse_retry_after,
    protect_logs,
)
from push.model import Attempt, Outcome, PushMessage, PushResult, PushTarget
from tests.pushfakes import Answer, FakeApns, FakeFcm

APNS_TOKEN = "a1b2c3d4" * 8
FCM_TOKEN = "fcm-registration-token:APA91bSecretSecretSecret"


def _msg(provider: str = "apns", token: str = APNS_TOKEN, param: str = "TEAM123456.com.example.phone.voip",
         call_id: str = "3848276298220188511@pbx.example", ttl: int = 30, sent_at: float = 1_800_000_000.0,
         ) -> PushMessage:
    return PushMessage(PushTarget(provider, token, param), call_id, "100", "201", ttl, sent_at)


# ------------------------------------------------------------------ policy (pure)


def _step(kind: str, **kw: object) -> Step:
    args: dict[str, object] = {"retries": 0, "auth_renewed": False, "now": 0.0, "deadline": 30.0,
                               "jitter": 1.0}
    retry_after = kw.pop("retry_after", None)
    args.update(kw)
    return next_step(Attempt(kind, 503, "x", retry_after), **args)  # type: ignore[arg-type]


def test_final_kinds() -> None:
    assert _step("ok") == Step(Outcome.SENT)
    assert _step("ok", dry_run=True) == Step(Outcome.DRY_RUN)
    assert _step("unregistered") == Step(Outcome.UNREGISTERED)
    assert _step("rejected") == Step(Outcome.REJECTED)
    assert _step("something-new") == Step(Outcome.REJECTED)


def test_auth_expired_renews_once_then_rejects() -> None:
    assert _step("auth_expired") == Step(None, 0.0, renew_credentials=True)
    assert _step("auth_expired", auth_renewed=True) == Step(Outcome.REJECTED)


def test_unknown_fate_is_never_sent_again() -> None:
    # A request that left without an answer may have rung the phone: no retry, ever.
    assert _step("unknown") == Step(Outcome.SENT_UNCONFIRMED)
    assert _step("unknown", retries=3, now=1.0) == Step(Outcome.SENT_UNCONFIRMED)


def test_not_processed_is_sent_again_at_once_then_backs_off() -> None:
    assert _step("not_processed") == Step(None, 0.0)
    assert _step("not_processed", retries=1) == Step(None, pytest.approx(0.4))
    assert _step("not_processed", retries=1, now=29.7) == Step(Outcome.FAILED)  # deadline first


def test_backoff_doubles_from_0_2_to_5_with_jitter() -> None:
    assert [backoff(n, 1.0) for n in range(7)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert backoff(0, 0.0) == pytest.approx(0.1)  # jitter keeps at least half
    assert backoff(10_000, 0.5) <= BACKOFF_MAX


def test_retry_honours_retry_after_and_deadline() -> None:
    step = _step("retry", retries=0)
    assert step.outcome is None and step.delay == pytest.approx(0.2)
    assert _step("retry", retry_after=1.0) == Step(None, 1.0)
    assert _step("retry", retries=5, retry_after=1.0) == Step(None, 5.0)  # back-off wins when longer
    # A sleep that would end at or past the deadline is not taken.
    assert _step("retry", now=29.9) == Step(Outcome.FAILED)
    assert _step("retry", retry_after=60.0) == Step(Outcome.FAILED)


def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("1", now) == 1.0
    assert parse_retry_after(" 2.5 ", now) == 2.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now) == 10.0
    assert parse_retry_after(email.utils.formatdate(now - 10, usegmt=True), now) == 0.0
    assert parse_retry_after("99999999999", now) == 3600.0


def test_collapse_id_fits_apns_and_hides_nothing_it_should_not() -> None:
    cid = collapse_id("x" * 500 + "@host")
    assert len(cid.encode()) <= 64 and cid.isalnum()
    assert cid == collapse_id("x" * 500 + "@host") != collapse_id("y@host")
    assert "host" not in cid


def test_cached_token_burst_of_refusals_mints_once() -> None:
    t = CachedToken()
    gen1 = t.set("T1", 100.0)
    # Three concurrent sends used T1 and were refused; the first renewal drops it...
    for _ in range(3):
        t.refused(gen1)
    t.drop()
    assert t.valid(0.0) is None
    t.set("T2", 100.0)
    # ...the two late ones must not drop T2, which nobody has refused.
    t.drop()
    t.drop()
    assert t.valid(0.0) == "T2"
    # An explicit call with no refusal pending for T2 after T2 was refused: drops.
    t.refused(t.generation)
    t.drop()
    assert t.valid(0.0) is None


# ------------------------------------------------------- deliver on trio's MockClock


class ScriptedGateway:
    """Answers from a script; each entry is an Attempt or a number of seconds to hang."""

    provider = "apns"

    def __init__(self, script: Sequence[Attempt | float], repeat_last: bool = False):
        self.script = list(script)
        self.repeat_last = repeat_last
        self.calls: list[float] = []
        self.renewals = 0

    async def send_once(self, msg: PushMessage) -> Attempt:
        self.calls.append(trio.current_time())
        step = self.script[0] if (self.repeat_last and len(self.script) == 1) else self.script.pop(0)
        if isinstance(step, Attempt):
            return step
        await trio.sleep(step)
        return Attempt("ok", 200)

    def credentials_expired(self) -> None:
        self.renewals += 1

    async def aclose(self) -> None:
        pass


async def test_deliver_503_three_times_then_200(autojump_clock: trio.testing.MockClock) -> None:
    busy = Attempt("retry", 503, "ServiceUnavailable")
    gw = ScriptedGateway([busy, busy, busy, Attempt("ok", 200)])
    t0 = trio.current_time()
    result = await deliver(gw, _msg(), t0 + 30)
    assert result.outcome is Outcome.SENT and result.status == 200
    assert result.attempts == 4 and [a.status for a in result.history] == [503, 503, 503, 200]
    gaps = [b - a for a, b in zip(gw.calls, gw.calls[1:], strict=False)]
    for gap, full in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert full / 2 <= gap <= full + 1e-9
    assert result.latency_ms == pytest.approx((gw.calls[-1] - t0) * 1000)


async def test_deliver_503_forever_fails_before_deadline(autojump_clock: trio.testing.MockClock) -> None:
    gw = ScriptedGateway([Attempt("retry", 503, "ServiceUnavailable")], repeat_last=True)
    deadline = trio.current_time() + 1.5
    result = await deliver(gw, _msg(), deadline)
    assert result.outcome is Outcome.FAILED
    assert (result.status, result.reason) == (503, "ServiceUnavailable")
    assert trio.current_time() < deadline
    assert 3 <= result.attempts <= 5


async def test_deliver_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    gw = ScriptedGateway([Attempt("retry", 429, "TooManyRequests", 2.0), Attempt("ok", 200)])
    result = await deliver(gw, _msg(), trio.current_time() + 10)
    assert result.outcome is Outcome.SENT
    assert gw.calls[1] - gw.calls[0] >= 2.0


async def test_deliver_retry_after_beyond_deadline_fails_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    gw = ScriptedGateway([Attempt("retry", 429, "TooManyRequests", 120.0)])
    t0 = trio.current_time()
    result = await deliver(gw, _msg(), t0 + 10)
    assert (result.outcome, result.status, result.attempts) == (Outcome.FAILED, 429, 1)
    assert trio.current_time() == t0


async def test_deliver_renews_credentials_once(autojump_clock: trio.testing.MockClock) -> None:
    expired = Attempt("auth_expired", 403, "ExpiredProviderToken")
    gw = ScriptedGateway([expired, Attempt("ok", 200)])
    assert (await deliver(gw, _msg(), trio.current_time() + 5)).outcome is Outcome.SENT
    assert gw.renewals == 1 and gw.calls[0] == gw.calls[1]  # retried at once

    gw = ScriptedGateway([expired, expired, Attempt("ok", 200)])
    result = await deliver(gw, _msg(), trio.current_time() + 5)
    assert (result.outcome, result.status, result.reason) == (Outcome.REJECTED, 403, "ExpiredProviderToken")
    assert gw.renewals == 1 and result.attempts == 2


async def test_deliver_final_answers_stop_at_once(autojump_clock: trio.testing.MockClock) -> None:
    for kind, outcome in (("unregistered", Outcome.UNREGISTERED), ("rejected", Outcome.REJECTED)):
        gw = ScriptedGateway([Attempt(kind, 410, "Unregistered"), Attempt("ok", 200)])
        result = await deliver(gw, _msg(), trio.current_time() + 5)
        assert (result.outcome, result.attempts) == (outcome, 1)


async def test_deliver_bounds_a_hanging_request_by_the_deadline(
        autojump_clock: trio.testing.MockClock) -> None:
    gw = ScriptedGateway([3600.0])
    t0 = trio.current_time()
    result = await deliver(gw, _msg(), t0 + 2.0, started=t0 - 1.0)
    assert (result.outcome, result.reason) == (Outcome.FAILED, "DeadlineExceeded")
    assert trio.current_time() == pytest.approx(t0 + 2.0)
    assert result.latency_ms == pytest.approx(3000.0)


async def test_deliver_survives_a_gateway_bug(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ScriptedGateway):
        async def send_once(self, msg: PushMessage) -> Attempt:
            raise KeyError(f"https://api.push.apple.com/3/device/{msg.target.token}")

    result = await deliver(Broken([]), _msg(), trio.current_time() + 5)
    assert (result.outcome, result.reason, result.attempts) == (Outcome.REJECTED, "KeyError", 1)
    assert "event=push_gateway_error provider=apns error=KeyError" in caplog.text
    assert APNS_TOKEN not in caplog.text


# ------------------------------------------------------------------ answer tables


@pytest.mark.parametrize(("status", "body", "kind"), [
    (200, b"", "ok"),
    (410, b'{"reason":"Unregistered","timestamp":1700000000000}', "unregistered"),
    (410, b'{"reason":"ExpiredToken"}', "unregistered"),
    (400, b'{"reason":"BadDeviceToken"}', "unregistered"),
    (400, b'{"reason":"DeviceTokenNotForTopic"}', "unregistered"),
    (400, b'{"reason":"BadTopic"}', "rejected"),
    (403, b'{"reason":"ExpiredProviderToken"}', "auth_expired"),
    (403, b'{"reason":"InvalidProviderToken"}', "rejected"),
    (413, b'{"reason":"PayloadTooLarge"}', "rejected"),
    (429, b'{"reason":"TooManyRequests"}', "retry"),
    (429, b'{"reason":"TooManyProviderTokenUpdates"}', "retry"),
    (500, b'{"reason":"InternalServerError"}', "retry"),
    (503, b"<html>down</html>", "retry"),
])
def test_apns_answers(status: int, body: bytes, kind: str) -> None:
    attempt = apns_mod.classify(status, body, None)
    assert (attempt.kind, attempt.status) == (kind, status)
    if status == 503:
        assert attempt.reason == "HTTP503"


def _fcm_error(code: int, status: str, error_code: str | None = None, message: str = "x",
               fields: Sequence[str] = ()) -> bytes:
    import json

    details: list[object] = []
    if error_code:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": error_code})
    if fields:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": f, "description": "bad"} for f in fields]})
    return json.dumps({"error": {"code": code, "message": message, "status": status,
                                 "details": details}}).encode()


@pytest.mark.parametrize(("status", "body", "kind", "reason"), [
    (200, b'{"name":"projects/p/messages/1"}', "ok", ""),
    (404, _fcm_error(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
     "unregistered", "UNREGISTERED"),
    (404, _fcm_error(404, "NOT_FOUND", None, "Requested entity was not found."), "rejected", "NOT_FOUND"),
    (400, _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                     "The registration token is not a valid FCM registration token"),
     "unregistered", "INVALID_ARGUMENT"),
    (400, _fcm_error(400, "INVALID_ARGUMENT", None, "Invalid value", ["message.token"]),
     "unregistered", "INVALID_ARGUMENT"),
    (400, _fcm_error(400, "INVALID_ARGUMENT", None, "Invalid value at 'message.data[0].value'",
                     ["message.data[0].value"]), "rejected", "INVALID_ARGUMENT"),
    (401, _fcm_error(401, "UNAUTHENTICATED", None, "Request had invalid authentication credentials."),
     "auth_expired", "UNAUTHENTICATED"),
    (401, _fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"), "rejected", "THIRD_PARTY_AUTH_ERROR"),
    (403, _fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"), "rejected", "SENDER_ID_MISMATCH"),
    (403, _fcm_error(403, "PERMISSION_DENIED"), "rejected", "PERMISSION_DENIED"),
    (429, _fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), "retry", "QUOTA_EXCEEDED"),
    (500, _fcm_error(500, "INTERNAL", "INTERNAL"), "retry", "INTERNAL"),
    (503, _fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"), "retry", "UNAVAILABLE"),
    (502, b"<html>bad gateway</html>", "retry", "HTTP502"),
])
def test_fcm_answers(status: int, body: bytes, kind: str, reason: str) -> None:
    attempt = fcm_mod.classify(status, body, 7.0)
    assert (attempt.kind, attempt.status, attempt.reason) == (kind, status, reason)
    if kind == "retry":
        assert attempt.retry_after == 7.0


@pytest.mark.parametrize(("status", "body", "kind", "reason"), [
    (400, b'{"error":"invalid_grant","error_description":"Invalid JWT Signature."}', "rejected",
     "invalid_grant"),
    (401, b'{"error":"invalid_client"}', "rejected", "invalid_client"),
    (500, b'{"error":"internal_failure"}', "retry", "internal_failure"),
    (503, b"", "retry", "TokenEndpoint"),
    (429, b"", "retry", "TokenEndpoint"),
])
def test_fcm_token_endpoint_answers(status: int, body: bytes, kind: str, reason: str) -> None:
    attempt = fcm_mod.classify_token_error(status, body, None)
    assert (attempt.kind, attempt.status, attempt.reason) == (kind, status, reason)


def test_provider_reasons_are_cleaned_for_logs() -> None:
    attempt = apns_mod.classify(400, b'{"reason":"Bad\\nThing status=200 ' + b"x" * 200 + b'"}', None)
    assert "\n" not in attempt.reason and " " not in attempt.reason and len(attempt.reason) <= 64


@pytest.mark.parametrize(("topic", "expected"), [
    ("com.example.phone.voip", "com.example.phone.voip"),
    ("com.example.phone", "com.example.phone.voip"),
    ("org.linphone.phone.remote&voip", "org.linphone.phone.voip"),
    ("org.linphone.phone.voip&remote", "org.linphone.phone.voip"),
    ("org.linphone.phone.remote", "org.linphone.phone.voip"),
    ("com.example.apns", "com.example.voip"),
    ("phone", "phone.voip"),
])
def test_apns_voip_topic(topic: str, expected: str) -> None:
    assert apns_mod.voip_topic(topic) == expected


def test_payload_shapes_carry_no_sip() -> None:
    import json

    msg = _msg()
    assert json.loads(apns_mod.voip_payload(msg)) == {
        "aps": {}, "pn": {"call-id": msg.call_id, "caller": "100", "callee": "201", "type": "call"}}
    body = fcm_mod.fcm_message(_msg("fcm", FCM_TOKEN, "my-project", ttl=45))
    assert body == {"message": {
        "token": FCM_TOKEN,
        "data": {"type": "call", "call-id": msg.call_id, "caller": "100", "callee": "201"},
        "android": {"priority": "high", "ttl": "45s", "collapse_key": collapse_id(msg.call_id)}}}
    assert "notification" not in body["message"]


# ------------------------------------------------------------------ dry run, logs


async def test_log_gateway_is_a_dry_run_and_logs_no_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = b"k" * 32
    gw = LogGateway("apns", device_key=key, max_sent=2)
    msgs = [_msg(call_id=f"c{i}") for i in range(3)]
    for m in msgs:
        result = await deliver(gw, m, trio.current_time() + 5)
        assert (result.outcome, result.attempts) == (Outcome.DRY_RUN, 1)
    assert list(gw.sent) == msgs[1:]  # bounded
    assert msgs[0].target.device_id(key) in caplog.text
    assert APNS_TOKEN not in caplog.text
    assert "100" not in caplog.text.replace("status", "")  # no caller number either
    await gw.aclose()


def test_http_stack_logs_lose_the_device_token(caplog: pytest.LogCaptureFixture) -> None:
    protect_logs()
    protect_logs()  # idempotent
    assert len(logging.getLogger("httpx").filters) == 1
    caplog.set_level(logging.DEBUG, logger="hpack")
    logging.getLogger("hpack.hpack").debug("Adding %s=%s to the header table", b":path", APNS_TOKEN.encode())
    caplog.set_level(logging.INFO, logger="httpx")
    logging.getLogger("httpx").info('HTTP Request: %s %s "%s %d %s"', "POST",
                                    f"https://api.push.apple.com/3/device/{APNS_TOKEN}", "HTTP/2", 200, "OK")
    assert "api.push.apple.com" in caplog.text and APNS_TOKEN not in caplog.text


# ------------------------------------------------- APNs over TLS HTTP/2 to FakeApns

TOPIC_PARAM = "TEAM123456.com.example.app.voip"


class WallClock:
    """A wall clock the test can move (the gateways' ``clock``), offset from real time
    because the fakes check ``iat`` against the real one."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def apns() -> AsyncIterator[FakeApns]:
    async with FakeApns() as fake:
        yield fake
    fake.close()


def _apns_gateway(fake: FakeApns, **kw: object) -> ApnsGateway:
    return ApnsGateway(fake.base_url, key_pem=fake.p8_pem, key_id=fake.key_id, team_id=fake.team_id,
                       ca_file=fake.ca_file, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def apns_gw(apns: FakeApns) -> AsyncIterator[ApnsGateway]:
    gw = _apns_gateway(apns)
    yield gw
    await gw.aclose()


def _apns_msg(token: str = APNS_TOKEN, call_id: str = "call-1@pbx", param: str = TOPIC_PARAM) -> PushMessage:
    return PushMessage(PushTarget("apns", token, param), call_id, "100", "201", 30, time.time())


async def _deliver(gw: ApnsGateway | FcmGateway, msg: PushMessage, within: float = 5.0) -> PushResult:
    return await deliver(gw, msg, trio.current_time() + within)


async def test_apns_request_is_what_apple_documents(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    other = "0f" * 32
    msgs = [_apns_msg(), _apns_msg(other, "call-2@pbx"),
            _apns_msg(call_id="call-3@pbx", param="TEAM123456.com.example.app")]  # no .voip in pn-param
    for m in msgs:
        result = await _deliver(apns_gw, m)
        assert (result.outcome, result.status, result.attempts) == (Outcome.SENT, 200, 1)
    recs = apns.requests
    assert [r.path for r in recs] == [f"/3/device/{t}" for t in (APNS_TOKEN, other, APNS_TOKEN)]
    for r, m in zip(recs, msgs, strict=True):
        assert r.http_version == "2" and r.status == 200
        assert (r.push_type, r.topic, r.priority) == ("voip", "com.example.app.voip", 10)
        assert r.expiration == int(m.sent_at + m.ttl)
        assert r.collapse_id == collapse_id(m.call_id) and m.call_id not in r.collapse_id
        assert r.body == {"aps": {}, "pn": {"call-id": m.call_id, "caller": "100", "callee": "201",
                                            "type": "call"}}
        assert r.jwt_header == {"alg": "ES256", "kid": apns.key_id}
        assert r.jwt_claims["iss"] == apns.team_id
        assert abs(r.jwt_claims["iat"] - time.time()) < 60
    # One provider token for all three pushes (Apple: not more than one per 20 minutes).
    assert len({r.headers["authorization"] for r in recs}) == 1
    assert apns.provider_token_updates == 1


async def test_apns_many_concurrent_pushes_share_one_token(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    results: list[PushResult] = []

    async def one(i: int) -> None:
        results.append(await _deliver(apns_gw, _apns_msg(call_id=f"c{i}")))

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
    assert [r.outcome for r in results] == [Outcome.SENT] * 100
    assert apns.provider_token_updates == 1 and len(apns.requests) == 100


async def test_apns_expired_provider_token_is_reminted_exactly_once(
        apns: FakeApns, apns_gw: ApnsGateway) -> None:
    assert (await _deliver(apns_gw, _apns_msg())).outcome is Outcome.SENT
    apns.script(APNS_TOKEN, (403, "ExpiredProviderToken"))
    result = await _deliver(apns_gw, _apns_msg(call_id="c2"))
    assert (result.outcome, result.attempts) == (Outcome.SENT, 2)
    assert [a.reason for a in result.history] == ["ExpiredProviderToken", ""]
    assert (await _deliver(apns_gw, _apns_msg(call_id="c3"))).outcome is Outcome.SENT
    auths = [r.headers["authorization"] for r in apns.requests]
    assert auths[0] == auths[1] != auths[2] == auths[3]
    assert apns.provider_token_updates == 2


async def test_apns_token_refused_again_after_renewal_is_rejected(apns: FakeApns) -> None:
    # A wall clock 70 minutes slow: every token we make is "older than one hour".
    gw = _apns_gateway(apns, clock=WallClock(-4200))
    try:
        result = await _deliver(gw, _apns_msg())
    finally:
        await gw.aclose()
    assert (result.outcome, result.status, result.reason) == (Outcome.REJECTED, 403, "ExpiredProviderToken")
    assert result.attempts == 2 and len(apns.requests) == 2


async def test_apns_token_is_refreshed_after_token_refresh_seconds(apns: FakeApns) -> None:
    apns.min_token_interval = 0  # the fake counts Apple's 20 minutes in real time
    clock = WallClock(-1300)
    gw = _apns_gateway(apns, clock=clock, token_refresh=60)  # clamped up to 1200 s
    try:
        await _deliver(gw, _apns_msg())
        clock.offset += 1199
        await _deliver(gw, _apns_msg(call_id="c2"))
        clock.offset += 1
        await _deliver(gw, _apns_msg(call_id="c3"))
    finally:
        await gw.aclose()
    iats = [r.jwt_claims["iat"] for r in apns.requests]
    # The offsets ride on the real wall clock: a second may tick between the sends.
    assert iats[0] == iats[1] and 1200 <= iats[2] - iats[0] <= 1202
    assert all(r.status == 200 for r in apns.requests)


async def test_apns_410_is_unregistered_after_one_attempt(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    apns.script(APNS_TOKEN, (410, "Unregistered"), 200)
    result = await _deliver(apns_gw, _apns_msg())
    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.UNREGISTERED, 410, "Unregistered", 1)
    assert len(apns.requests) == 1


async def test_apns_bad_device_token_is_unregistered(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    result = await _deliver(apns_gw, _apns_msg(token="not-hex-zz"))
    assert (result.outcome, result.status, result.reason) == (Outcome.UNREGISTERED, 400, "BadDeviceToken")


async def test_apns_429_retry_after_is_honoured(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    apns.script(APNS_TOKEN, (429, "TooManyRequests", {"retry-after": "1"}))
    result = await _deliver(apns_gw, _apns_msg())
    assert (result.outcome, result.attempts) == (Outcome.SENT, 2)
    first, second = apns.requests
    assert first.status == 429 and second.status == 200
    assert second.received_trio - first.received_trio >= 1.0


async def test_apns_503_three_times_then_200_is_sent(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    apns.script(APNS_TOKEN, *[(503, "ServiceUnavailable")] * 3)
    deadline = trio.current_time() + 4.0
    result = await deliver(apns_gw, _apns_msg(), deadline)
    assert (result.outcome, result.status, result.attempts) == (Outcome.SENT, 200, 4)
    assert [a.status for a in result.history] == [503, 503, 503, 200]
    assert trio.current_time() < deadline


async def test_apns_503_forever_fails_before_the_deadline(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    apns.default = (503, "ServiceUnavailable")
    deadline = trio.current_time() + 1.0
    result = await deliver(apns_gw, _apns_msg(), deadline)
    assert result.outcome is Outcome.FAILED
    # On a loaded machine the last attempt may be the one the deadline cuts short.
    assert (result.status, result.reason) in ((503, "ServiceUnavailable"), (None, "DeadlineExceeded"))
    assert trio.current_time() <= deadline + 0.05 and result.attempts >= 2
    assert [a.status for a in result.history[:2]] == [503, 503]


async def test_apns_slow_answer_is_cut_by_the_deadline(apns: FakeApns, apns_gw: ApnsGateway) -> None:
    apns.script(APNS_TOKEN, Answer(200, delay=3.0))
    t0 = trio.current_time()
    result = await deliver(apns_gw, _apns_msg(), t0 + 0.3)
    assert (result.outcome, result.reason) == (Outcome.FAILED, "DeadlineExceeded")
    assert trio.current_time() - t0 < 0.8
    # The cancelled stream did not break the shared HTTP/2 connection.
    assert (await _deliver(apns_gw, _apns_msg(call_id="c2"))).outcome is Outcome.SENT


async def test_connection_refused_fails_with_a_reason(apns: FakeApns) -> None:
    await apns.stop_async()  # the port is now closed: a gateway that is down
    gw = _apns_gateway(apns)
    try:
        t0 = trio.current_time()
        result = await deliver(gw, _apns_msg(), t0 + 0.5)
    finally:
        await gw.aclose()
    assert result.outcome is Outcome.FAILED and result.status is None
    assert result.reason == "ConnectError" and result.attempts >= 2
    assert trio.current_time() - t0 < 0.5


async def test_apns_certificate_auth_sends_no_authorization(apns: FakeApns) -> None:
    gw = ApnsGateway(apns.base_url, cert_file=apns.cert_file, cert_key_file=apns.key_file,
                     ca_file=apns.ca_file)
    try:
        result = await _deliver(gw, _apns_msg())
    finally:
        await gw.aclose()
    # The fake does token auth only, so it misses the token; what matters is that none was sent.
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "MissingProviderToken")
    assert "authorization" not in apns.requests[0].headers


def test_apns_constructor_checks_its_credentials(tmp_path: Path) -> None:
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fake = FakeApns()
    try:
        p8 = fake.write_p8(tmp_path)
        with pytest.raises(ValueError, match="signing key"):
            ApnsGateway("https://127.0.0.1:1")
        with pytest.raises(ValueError, match="key_id and team_id"):
            ApnsGateway("https://127.0.0.1:1", key_file=p8)
        with pytest.raises(ValueError, match="P-256"):
            ApnsGateway("https://127.0.0.1:1", key_pem=rsa_pem, key_id="K", team_id="T")
    finally:
        fake.close()


async def test_apns_logs_carry_no_token_jwt_or_payload(
        apns: FakeApns, apns_gw: ApnsGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    apns.script(APNS_TOKEN, (503, "ServiceUnavailable"), (410, "Unregistered"))
    await _deliver(apns_gw, _apns_msg(call_id="secret-call-id@pbx"))
    text = caplog.text
    assert ("event=push_attempt provider=apns attempt=2 kind=unregistered status=410 reason=Unregistered"
            in text)
    jwt_token = apns.requests[0].headers["authorization"].split()[1]
    for secret in (APNS_TOKEN, jwt_token, jwt_token.split(".")[2], "secret-call-id", "MIG"):
        assert secret not in text


# ----------------------------------------------------- FCM over TLS HTTP/2 to FakeFcm


@pytest.fixture
async def fcm() -> AsyncIterator[FakeFcm]:
    async with FakeFcm() as fake:
        yield fake
    fake.close()


@pytest.fixture
async def fcm_gw(fcm: FakeFcm) -> AsyncIterator[FcmGateway]:
    gw = FcmGateway(service_account=fcm.service_account, base_url=fcm.base_url, ca_file=fcm.ca_file)
    yield gw
    await gw.aclose()


def _fcm_msg(token: str = FCM_TOKEN, call_id: str = "call-1@pbx") -> PushMessage:
    return PushMessage(PushTarget("fcm", token, "pbx-relay-test"), call_id, "100", "201", 30, time.time())


async def test_fcm_request_is_what_google_documents(fcm: FakeFcm, tmp_path: Path) -> None:
    # From the key file, as an operator configures it; the project comes from the file.
    gw = FcmGateway(fcm.write_service_account(tmp_path / "sa.json"), base_url=fcm.base_url,
                    ca_file=fcm.ca_file)
    try:
        assert gw.project_id == fcm.project_id
        m = _fcm_msg()
        result = await _deliver(gw, m)
    finally:
        await gw.aclose()
    assert (result.outcome, result.status, result.attempts) == (Outcome.SENT, 200, 1)
    (auth,) = fcm.auth_requests
    assert auth.http_version == "2" and auth.status == 200
    assert auth.body["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert auth.jwt_header["alg"] == "RS256" and auth.jwt_header["kid"] == fcm.private_key_id
    claims = auth.jwt_claims
    assert (claims["iss"], claims["aud"]) == (fcm.client_email, fcm.token_uri)
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert claims["exp"] - claims["iat"] == 3600
    (send,) = fcm.requests
    assert send.http_version == "2" and send.path == f"/v1/projects/{fcm.project_id}/messages:send"
    assert send.access_token and send.status == 200
    assert send.body == {"message": {
        "token": FCM_TOKEN,
        "data": {"type": "call", "call-id": m.call_id, "caller": "100", "callee": "201"},
        "android": {"priority": "high", "ttl": "30s", "collapse_key": collapse_id(m.call_id)}}}


async def test_fcm_token_fetched_once_for_50_concurrent_sends(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    results: list[PushResult] = []

    async def one(i: int) -> None:
        results.append(await _deliver(fcm_gw, _fcm_msg(call_id=f"c{i}")))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert [r.outcome for r in results] == [Outcome.SENT] * 50
    assert fcm.token_requests == 1 and len({r.access_token for r in fcm.requests}) == 1


async def test_fcm_401_after_expire_tokens_gets_a_new_token(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    assert (await _deliver(fcm_gw, _fcm_msg())).outcome is Outcome.SENT
    fcm.expire_tokens()
    result = await _deliver(fcm_gw, _fcm_msg(call_id="c2"))
    assert (result.outcome, result.attempts) == (Outcome.SENT, 2)
    assert [(a.status, a.reason) for a in result.history] == [(401, "UNAUTHENTICATED"), (200, "")]
    assert fcm.token_requests == 2
    assert fcm.requests[0].access_token == fcm.requests[1].access_token != fcm.requests[2].access_token


async def test_fcm_401_with_a_fresh_token_is_rejected(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script(FCM_TOKEN, "UNAUTHENTICATED", "UNAUTHENTICATED")
    result = await _deliver(fcm_gw, _fcm_msg())
    assert (result.outcome, result.status, result.attempts) == (Outcome.REJECTED, 401, 2)
    assert fcm.token_requests == 2


async def test_fcm_unregistered(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script(FCM_TOKEN, "UNREGISTERED")
    result = await _deliver(fcm_gw, _fcm_msg())
    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.UNREGISTERED, 404, "UNREGISTERED", 1)


async def test_fcm_malformed_registration_token_is_unregistered(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    result = await _deliver(fcm_gw, _fcm_msg(token="not a token!"))
    assert (result.outcome, result.status, result.reason) == (Outcome.UNREGISTERED, 400, "INVALID_ARGUMENT")


async def test_fcm_sender_id_mismatch_is_rejected(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script(FCM_TOKEN, "SENDER_ID_MISMATCH")
    result = await _deliver(fcm_gw, _fcm_msg())
    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.REJECTED, 403, "SENDER_ID_MISMATCH", 1)


async def test_fcm_quota_exceeded_and_unavailable_are_retried(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script(FCM_TOKEN, "QUOTA_EXCEEDED", "UNAVAILABLE")
    result = await _deliver(fcm_gw, _fcm_msg())
    assert (result.outcome, result.attempts) == (Outcome.SENT, 3)
    assert [a.reason for a in result.history] == ["QUOTA_EXCEEDED", "UNAVAILABLE", ""]


async def test_fcm_retry_after_beyond_the_deadline_ends_the_push(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script(FCM_TOKEN, ("QUOTA_EXCEEDED", {"Retry-After": "30"}))
    t0 = trio.current_time()
    result = await deliver(fcm_gw, _fcm_msg(), t0 + 5)
    assert (result.outcome, result.status, result.attempts) == (Outcome.FAILED, 429, 1)
    assert result.history[0].retry_after == 30.0 and trio.current_time() - t0 < 1.0


async def test_fcm_token_endpoint_outage_is_retried(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script_token((503, "temporarily_unavailable"))
    results: list[PushResult] = []

    async def one(i: int) -> None:
        results.append(await _deliver(fcm_gw, _fcm_msg(call_id=f"c{i}")))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert [r.outcome for r in results] == [Outcome.SENT] * 10
    # The failed fetch was shared by the sends waiting on it; one more fetch succeeded.
    assert fcm.token_requests == 2
    assert all(r.history[0].kind == "retry" and r.history[0].status == 503 for r in results)


async def test_fcm_invalid_grant_is_rejected(fcm: FakeFcm, fcm_gw: FcmGateway) -> None:
    fcm.script_token((400, "invalid_grant"))
    result = await _deliver(fcm_gw, _fcm_msg())
    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.REJECTED, 400, "invalid_grant", 1)
    assert fcm.requests == []


async def test_fcm_logs_carry_no_token(
        fcm: FakeFcm, fcm_gw: FcmGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fcm.script(FCM_TOKEN, "UNAVAILABLE", "UNREGISTERED")
    assert (await _deliver(fcm_gw, _fcm_msg())).outcome is Outcome.UNREGISTERED
    access = fcm.requests[0].access_token
    for secret in (FCM_TOKEN, access, fcm.auth_requests[0].body["assertion"][-40:], "PRIVATE KEY"):
        assert secret not in caplog.text
