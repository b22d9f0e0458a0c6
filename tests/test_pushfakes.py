"""The APNs and FCM fakes check what Apple and Google document, and answer on demand.

Plain httpx is the client here, so these tests pin the fakes, not our push clients.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.pushfakes import FCM_SCOPE, Answer, FakeApns, FakeFcm, Fault, running

DEVICE = "a1b2c3d4" * 8  # 64 hex digits, like an APNs device token
TOPIC = "com.example.app.voip"
FCM_TOKEN = "fcm-device-1:APA91bFakeToken_x"


def h2(fake: FakeApns | FakeFcm) -> httpx.AsyncClient:
    return httpx.AsyncClient(http1=False, http2=True, verify=fake.client_ssl_context(), timeout=5)


# --------------------------------------------------------------------------- APNs


@pytest.fixture
async def apns() -> AsyncIterator[FakeApns]:
    async with FakeApns() as fake:
        yield fake


def voip_headers(provider_token: str, **extra: str) -> dict[str, str]:
    h = {
        "authorization": f"bearer {provider_token}",
        "apns-topic": TOPIC,
        "apns-push-type": "voip",
        "apns-priority": "10",
        "apns-expiration": str(int(time.time()) + 30),
    }
    h.update(extra)
    return h


async def push(
    client: httpx.AsyncClient, fake: FakeApns, provider_token: str, token: str = DEVICE, **extra: str
) -> httpx.Response:
    return await client.post(
        f"{fake.base_url}/3/device/{token}", headers=voip_headers(provider_token, **extra),
        content=b'{"aps":{},"call_id":"c1"}',
    )


async def test_apns_signed_request_gets_200_and_apns_id(apns: FakeApns) -> None:
    tok = apns.make_provider_token()
    async with h2(apns) as c:
        r = await push(c, apns, tok)
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200 and r.content == b""
    uuid.UUID(r.headers["apns-id"])
    rec = (await apns.wait_for_async(1))[0]
    assert (rec.token, rec.topic, rec.push_type, rec.priority) == (DEVICE, TOPIC, "voip", 10)
    assert rec.http_version == "2" and rec.body == {"aps": {}, "call_id": "c1"}
    assert rec.jwt_header["kid"] == apns.key_id and rec.jwt_claims["iss"] == apns.team_id
    assert rec.apns_id == r.headers["apns-id"] and rec.expiration is not None


async def test_apns_echoes_the_callers_apns_id(apns: FakeApns) -> None:
    mine = str(uuid.uuid4())
    async with h2(apns) as c:
        r = await push(c, apns, apns.make_provider_token(), **{"apns-id": mine})
    assert r.status_code == 200 and r.headers["apns-id"] == mine


async def test_apns_token_signed_with_another_key_is_invalid(apns: FakeApns) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"iss": apns.team_id, "iat": int(time.time())}, other, algorithm="ES256",
                        headers={"kid": apns.key_id})
    async with h2(apns) as c:
        r = await push(c, apns, forged)
    assert r.status_code == 403 and r.json() == {"reason": "InvalidProviderToken"}
    assert "apns-id" in r.headers


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda f: jwt.encode({"iss": f.team_id, "iat": int(time.time())}, f.private_key,
                              algorithm="ES256", headers={"kid": "WRONGKID00"}), "InvalidProviderToken"),
        (lambda f: jwt.encode({"iss": "OTHERTEAM0", "iat": int(time.time())}, f.private_key,
                              algorithm="ES256", headers={"kid": f.key_id}), "InvalidProviderToken"),
        (lambda f: f.make_provider_token(iat=time.time() + 600), "InvalidProviderToken"),
        (lambda f: f.make_provider_token(iat=time.time() - 7200), "ExpiredProviderToken"),
    ],
    ids=["wrong-kid", "wrong-iss", "iat-in-future", "iat-2h-old"],
)
async def test_apns_rejects_bad_provider_tokens(apns: FakeApns, make: Any, reason: str) -> None:
    async with h2(apns) as c:
        r = await push(c, apns, make(apns))
    assert r.status_code == 403 and r.json()["reason"] == reason


async def test_apns_missing_provider_token(apns: FakeApns) -> None:
    async with h2(apns) as c:
        r = await c.post(f"{apns.base_url}/3/device/{DEVICE}", content=b"{}",
                         headers={"apns-topic": TOPIC, "apns-push-type": "voip"})
    assert r.status_code == 403 and r.json()["reason"] == "MissingProviderToken"


async def test_apns_refuses_http1(apns: FakeApns) -> None:
    async with httpx.AsyncClient(http1=True, http2=False, verify=apns.client_ssl_context()) as c:
        r = await push(c, apns, apns.make_provider_token())
    assert r.http_version == "HTTP/1.1" and r.status_code == 505
    assert apns.requests[-1].http_version == "1.1"


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"apns-topic": "com.other.app.voip"}, 400, "TopicDisallowed"),
        ({"apns-topic": ""}, 400, "MissingTopic"),
        ({"apns-push-type": "alert"}, 400, "InvalidPushType"),
        ({"apns-priority": "7"}, 400, "BadPriority"),
        ({"apns-expiration": "soon"}, 400, "BadExpirationDate"),
        ({"apns-id": "not-a-uuid"}, 400, "BadMessageId"),
        ({"apns-collapse-id": "x" * 65}, 400, "BadCollapseId"),
        ({"token": "not-hex!"}, 400, "BadDeviceToken"),
        ({"body": b""}, 400, "PayloadEmpty"),
        ({"body": b'{"aps":{},"pad":"' + b"x" * 5120 + b'"}'}, 413, "PayloadTooLarge"),
        ({"body": b"[1, 2]"}, 400, "BadPayload"),
        ({"method": "GET"}, 405, "MethodNotAllowed"),
        ({"path": "/3/devices/abc"}, 404, "BadPath"),
    ],
)
async def test_apns_request_checks(apns: FakeApns, change: dict[str, Any], status: int, reason: str) -> None:
    change = dict(change)
    token = change.pop("token", DEVICE)
    body = change.pop("body", b'{"aps":{}}')
    method = change.pop("method", "POST")
    path = change.pop("path", f"/3/device/{token}")
    headers = {k: v for k, v in voip_headers(apns.make_provider_token(), **change).items() if v}
    async with h2(apns) as c:
        r = await c.request(method, apns.base_url + path, headers=headers, content=body)
    assert (r.status_code, r.json()["reason"]) == (status, reason)
    assert apns.requests[-1].status == status and not apns.requests[-1].scripted


async def test_apns_voip_payload_of_exactly_5120_bytes_is_fine(apns: FakeApns) -> None:
    head, tail = b'{"aps":{},"pad":"', b'"}'
    body = head + b"x" * (5120 - len(head) - len(tail)) + tail
    async with h2(apns) as c:
        r = await c.post(f"{apns.base_url}/3/device/{DEVICE}", content=body,
                         headers=voip_headers(apns.make_provider_token()))
    assert r.status_code == 200


async def test_apns_too_many_provider_token_updates(apns: FakeApns) -> None:
    first = apns.make_provider_token()
    second = apns.make_provider_token(iat=time.time() - 5)  # a different token, same key
    async with h2(apns) as c:
        assert (await push(c, apns, first)).status_code == 200
        assert (await push(c, apns, first)).status_code == 200  # the same token: no update
        r = await push(c, apns, second)
        assert r.status_code == 429 and r.json()["reason"] == "TooManyProviderTokenUpdates"
        apns.min_token_interval = 0.0
        assert (await push(c, apns, second)).status_code == 200
    assert apns.provider_token_updates == 2


async def test_apns_scripted_answers_then_success(apns: FakeApns) -> None:
    apns.script(DEVICE, (410, "Unregistered"), (429, "TooManyRequests", {"retry-after": "1"}),
                (503, "ServiceUnavailable"))
    tok = apns.make_provider_token()
    async with h2(apns) as c:
        r410 = await push(c, apns, tok)
        r429 = await push(c, apns, tok)
        r503 = await push(c, apns, tok)
        r200 = await push(c, apns, tok)
        other = await push(c, apns, tok, token="ff" * 32)  # other tokens unaffected
    body = r410.json()
    assert r410.status_code == 410 and body["reason"] == "Unregistered"
    assert abs(body["timestamp"] / 1000 - time.time()) < 60  # milliseconds since the Epoch
    assert r429.status_code == 429 and r429.headers["retry-after"] == "1"
    assert r429.json() == {"reason": "TooManyRequests"}
    assert r503.status_code == 503 and r503.json()["reason"] == "ServiceUnavailable"
    assert r200.status_code == 200 and other.status_code == 200
    assert [r.scripted for r in apns.requests] == [True, True, True, False, False]
    assert all("apns-id" in r.headers for r in (r410, r429, r503, r200))


async def test_apns_scripted_expired_token_lets_the_next_token_in(apns: FakeApns) -> None:
    apns.script(DEVICE, (403, "ExpiredProviderToken"))
    async with h2(apns) as c:
        assert (await push(c, apns, apns.make_provider_token())).status_code == 403
        fresh = apns.make_provider_token(iat=time.time() - 1)
        assert (await push(c, apns, fresh)).status_code == 200  # not TooManyProviderTokenUpdates


async def test_apns_default_and_down_and_back(apns: FakeApns) -> None:
    tok = apns.make_provider_token()
    apns.default = (503, "ServiceUnavailable")
    async with h2(apns) as c:
        assert (await push(c, apns, tok)).status_code == 503
        apns.default = None
        assert (await push(c, apns, tok)).status_code == 200
        await apns.stop_async()
        assert not apns.is_running
        with pytest.raises(httpx.TransportError):
            await push(c, apns, tok)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(apns.serve)  # the same port again
        assert url == apns.base_url
        async with h2(apns) as c:
            assert (await push(c, apns, tok)).status_code == 200
        apns.stop()


async def test_apns_delayed_answer(apns: FakeApns) -> None:
    apns.script(DEVICE, Answer(200, delay=0.3))
    async with h2(apns) as c:
        t0 = trio.current_time()
        r = await push(c, apns, apns.make_provider_token())
    assert r.status_code == 200 and trio.current_time() - t0 >= 0.3


async def test_apns_faults_seen_by_an_independent_client(apns: FakeApns) -> None:
    """The connection-level faults, as httpx sees them: refused and GOAWAY'd requests
    are not processed (not recorded), the others are."""
    tok = apns.make_provider_token()
    apns.fault(DEVICE, Fault.REFUSE_STREAM, Fault.CLOSE_AFTER_ANSWER, Fault.STALL_THEN_RESET)
    apns.stall = 0.05
    async with h2(apns) as c:
        with pytest.raises(httpx.RemoteProtocolError):  # RST_STREAM REFUSED_STREAM
            await push(c, apns, tok)
        assert apns.requests == [] and apns.not_processed == [(DEVICE, Fault.REFUSE_STREAM)]
        assert (await push(c, apns, tok)).status_code == 200  # then GOAWAY and a close
        with pytest.raises(httpx.RemoteProtocolError):  # processed, then RST_STREAM INTERNAL_ERROR
            await push(c, apns, tok)
        assert [r.status for r in apns.requests] == [200, 200]
        accepted = apns.connections_accepted
        assert accepted == 2  # the GOAWAY made httpx open a new connection
        apns.fault(DEVICE, Fault.GOAWAY_BEFORE)
        # httpcore resends a request above GOAWAY's last-stream-id on a new connection
        # itself (ConnectionNotAvailable): one push recorded, not processed once.
        assert (await push(c, apns, tok)).status_code == 200
    assert len(apns.requests) == 3 and apns.not_processed[-1] == (DEVICE, Fault.GOAWAY_BEFORE)
    assert apns.connections_accepted == accepted + 1


# --------------------------------------------------------------------------- FCM


SA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def fcm(nursery: trio.Nursery) -> FakeFcm:
    fake = FakeFcm(private_key=SA_KEY)
    await nursery.start(fake.serve)
    return fake


async def get_token(c: httpx.AsyncClient, fake: FakeFcm, assertion: str | None = None) -> httpx.Response:
    return await c.post(fake.token_uri, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": assertion or fake.make_assertion(),
    })


async def send(c: httpx.AsyncClient, fake: FakeFcm, message: dict[str, Any], access: str | None,
               project: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {access}"} if access else {}
    url = f"{fake.base_url}/v1/projects/{project or fake.project_id}/messages:send"
    return await c.post(url, json={"message": message}, headers=headers)


def wake(**android: Any) -> dict[str, Any]:
    return {"token": FCM_TOKEN, "data": {"call_id": "c1", "caller": "100"},
            "android": {"priority": "high", "ttl": "30s", **android}}


async def test_fcm_service_account_and_token_exchange(fcm: FakeFcm, tmp_path: Any) -> None:
    sa = json.loads(fcm.write_service_account(tmp_path / "sa.json").read_text())
    assert sa["type"] == "service_account" and sa["token_uri"] == f"{fcm.base_url}/token"
    assert sa["project_id"] == fcm.project_id and sa["private_key"].startswith("-----BEGIN PRIVATE KEY")
    # What a client does with only the file: sign an assertion with its key.
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": sa["client_email"], "scope": FCM_SCOPE, "aud": sa["token_uri"],
         "iat": now, "exp": now + 3600},
        sa["private_key"], algorithm="RS256", headers={"kid": sa["private_key_id"]},
    )
    async with h2(fcm) as c:
        r = await get_token(c, fcm, assertion)
    assert r.status_code == 200
    body = r.json()
    assert body["expires_in"] == 3599 and body["token_type"] == "Bearer" and body["access_token"]
    assert fcm.token_requests == 1 and fcm.auth_requests[0].jwt_claims["scope"] == FCM_SCOPE


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda f: jwt.encode({"iss": f.client_email, "scope": FCM_SCOPE, "aud": f.token_uri,
                               "iat": int(time.time()), "exp": int(time.time()) + 600},
                              OTHER_KEY,
                              algorithm="RS256"), "invalid_grant"),
        (lambda f: f.make_assertion(aud="https://oauth2.googleapis.com/token"), "invalid_grant"),
        (lambda f: f.make_assertion(iss="someone@else.iam.gserviceaccount.com"), "invalid_grant"),
        (lambda f: f.make_assertion(exp=int(time.time()) + 7200), "invalid_grant"),
        (lambda f: f.make_assertion(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
         "invalid_grant"),
        (lambda f: f.make_assertion(scope=""), "invalid_scope"),
    ],
    ids=["other-key", "wrong-aud", "wrong-iss", "exp-too-far", "expired", "no-scope"],
)
async def test_fcm_bad_assertions(fcm: FakeFcm, make: Any, error: str) -> None:
    async with h2(fcm) as c:
        r = await get_token(c, fcm, make(fcm))
    assert r.status_code == 400 and r.json()["error"] == error


async def test_fcm_wrong_grant_type(fcm: FakeFcm) -> None:
    async with h2(fcm) as c:
        r = await c.post(fcm.token_uri, data={"grant_type": "client_credentials",
                                              "assertion": fcm.make_assertion()})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


async def test_fcm_send_needs_an_access_token(fcm: FakeFcm) -> None:
    async with h2(fcm) as c:
        missing = await send(c, fcm, wake(), None)
        made_up = await send(c, fcm, wake(), "ya29.made-up")
    for r in (missing, made_up):
        err = r.json()["error"]
        assert r.status_code == 401 and err["code"] == 401 and err["status"] == "UNAUTHENTICATED"
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_fcm_send_with_token(fcm: FakeFcm) -> None:
    async with h2(fcm) as c:
        access = (await get_token(c, fcm)).json()["access_token"]
        r = await send(c, fcm, wake(), access)
    assert r.status_code == 200
    name = r.json()["name"]
    assert name.startswith(f"projects/{fcm.project_id}/messages/")
    rec = (await fcm.wait_for_async(1))[0]
    assert rec.token == FCM_TOKEN and rec.priority == "high" and rec.access_token == access
    assert rec.message["data"] == {"call_id": "c1", "caller": "100"} and rec.http_version == "2"


async def test_fcm_other_project_and_scope(fcm: FakeFcm) -> None:
    async with h2(fcm) as c:
        access = (await get_token(c, fcm)).json()["access_token"]
        other = await send(c, fcm, wake(), access, project="someone-elses-project")
        narrow = (await get_token(c, fcm, fcm.make_assertion(
            scope="https://www.googleapis.com/auth/devstorage.read_only"))).json()["access_token"]
        unscoped = await send(c, fcm, wake(), narrow)
    assert other.status_code == 403 and other.json()["error"]["status"] == "PERMISSION_DENIED"
    assert unscoped.status_code == 403 and unscoped.json()["error"]["status"] == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("message", "fcm_error"),
    [
        ({**wake(), "data": {"call_id": 12}}, False),
        (wake(ttl="30"), False),
        (wake(ttl=30), False),
        (wake(ttl="2419201s"), True),
        (wake(priority="urgent"), False),
        (wake(time_to_live=30), False),
        ({**wake(), "topic": "calls"}, False),
        ({"data": {"a": "b"}}, True),
        ({**wake(), "token": "bad token with spaces"}, True),
        ({**wake(), "data": {"google.x": "1"}}, True),
        ({**wake(), "data": {"pad": "x" * 4097}}, True),
    ],
    ids=["data-not-string", "ttl-no-unit", "ttl-number", "ttl-over-4-weeks", "bad-priority", "unknown-field",
         "token-and-topic", "no-target", "bad-token", "reserved-key", "too-big"],
)
async def test_fcm_invalid_messages(fcm: FakeFcm, message: dict[str, Any], fcm_error: bool) -> None:
    access = fcm.issue_access_token()
    async with h2(fcm) as c:
        r = await send(c, fcm, message, access)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == 400 and err["status"] == "INVALID_ARGUMENT"
    detail = err["details"][0]
    if fcm_error:
        assert detail == {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                          "errorCode": "INVALID_ARGUMENT"}
    else:
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"


async def test_fcm_accepts_documented_forms(fcm: FakeFcm) -> None:
    access = fcm.issue_access_token()
    async with h2(fcm) as c:
        for message in (wake(priority="HIGH", ttl="3.5s"), wake(priority="normal", ttl="0s"),
                        {"topic": "calls", "data": {"a": "b"}}, {"condition": "'a' in topics", "data": {}}):
            r = await send(c, fcm, message, access)
            assert r.status_code == 200, r.text


async def test_fcm_scripted_errors(fcm: FakeFcm) -> None:
    fcm.script(FCM_TOKEN, "UNREGISTERED", ("QUOTA_EXCEEDED", {"Retry-After": "2"}), "UNAVAILABLE",
               "SENDER_ID_MISMATCH")
    access = fcm.issue_access_token()
    async with h2(fcm) as c:
        answers = [await send(c, fcm, wake(), access) for _ in range(5)]
    gone = answers[0].json()
    assert answers[0].status_code == 404
    assert gone == {"error": {
        "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                     "errorCode": "UNREGISTERED"}],
    }}
    assert answers[1].status_code == 429 and answers[1].headers["retry-after"] == "2"
    assert answers[1].json()["error"]["details"][0]["errorCode"] == "QUOTA_EXCEEDED"
    assert answers[2].status_code == 503 and answers[2].json()["error"]["status"] == "UNAVAILABLE"
    assert answers[3].status_code == 403 and answers[3].json()["error"]["details"][0]["errorCode"] == (
        "SENDER_ID_MISMATCH")
    assert answers[4].status_code == 200
    assert [r.reason for r in fcm.requests] == ["UNREGISTERED", "QUOTA_EXCEEDED", "UNAVAILABLE",
                                                 "SENDER_ID_MISMATCH", ""]


async def test_fcm_expired_tokens_get_401_until_refreshed(fcm: FakeFcm) -> None:
    async with h2(fcm) as c:
        first = (await get_token(c, fcm)).json()["access_token"]
        assert (await send(c, fcm, wake(), first)).status_code == 200
        fcm.expire_tokens()
        r = await send(c, fcm, wake(), first)
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        second = (await get_token(c, fcm)).json()["access_token"]
        assert second != first and (await send(c, fcm, wake(), second)).status_code == 200
    assert fcm.token_requests == 2


async def test_fcm_token_endpoint_can_be_scripted(fcm: FakeFcm) -> None:
    fcm.script_token((503, "temporarily_unavailable"))
    async with h2(fcm) as c:
        down = await get_token(c, fcm)
        up = await get_token(c, fcm)
    assert down.status_code == 503 and down.json()["error"] == "temporarily_unavailable"
    assert up.status_code == 200


# --------------------------------------------------------------------------- synchronous use


def test_sync_tests_run_the_fakes_in_threads(tmp_path: Any) -> None:
    with running(FakeFcm(workdir=tmp_path / "fcm")) as fcm, running(FakeApns()) as apns:
        fcm.default = "UNAVAILABLE"
        with httpx.Client(http2=True, verify=fcm.client_ssl_context()) as c:
            access = c.post(fcm.token_uri, data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                                 "assertion": fcm.make_assertion()}).json()["access_token"]
            url = f"{fcm.base_url}/v1/projects/{fcm.project_id}/messages:send"
            r = c.post(url, json={"message": wake()}, headers={"authorization": f"Bearer {access}"})
        assert r.status_code == 503 and fcm.wait_for(1, timeout=2)[0].scripted
        with pytest.raises(TimeoutError):
            fcm.wait_for(2, timeout=0.1)
        provider_token = apns.make_provider_token()
        with httpx.Client(http2=True, verify=apns.client_ssl_context()) as c:
            r = c.post(f"{apns.base_url}/3/device/{DEVICE}", content=b'{"aps":{}}',
                       headers=voip_headers(provider_token))
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert apns.wait_for(1)[0].token == DEVICE
        apns.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{apns.base_url}/3/device/{DEVICE}", verify=apns.client_ssl_context(), timeout=2)
        apns.start_in_thread()  # back on the same port
        with httpx.Client(http2=True, verify=apns.client_ssl_context()) as c:
            r = c.post(f"{apns.base_url}/3/device/{DEVICE}", content=b'{"aps":{}}',
                       headers=voip_headers(provider_token))
            assert r.status_code == 200
            # ES256 signatures are randomised: signing the same claims again is a new token,
            # and a new token within 20 minutes is one update too many.
            r = c.post(f"{apns.base_url}/3/device/{DEVICE}", content=b'{"aps":{}}',
                       headers=voip_headers(apns.make_provider_token()))
            assert r.status_code == 429 and r.json()["reason"] == "TooManyProviderTokenUpdates"
    assert not fcm.is_running and not apns.is_running
