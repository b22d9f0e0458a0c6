"""Firebase Cloud Messaging client: one high-priority data message per request.

Built from Google's documentation:

- "FCM HTTP v1 API", ``projects.messages.send``
  (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send):
  ``POST https://fcm.googleapis.com/v1/projects/<project>/messages:send`` with
  ``Authorization: Bearer <OAuth 2.0 access token>``.
- "Using OAuth 2.0 for Server to Server Applications"
  (https://developers.google.com/identity/protocols/oauth2/service-account): the
  access token comes from POSTing a JWT assertion signed RS256 with the service
  account's key (claims ``iss`` client_email, ``scope``, ``aud`` token_uri, ``iat``,
  ``exp`` ≤ 1 h) to ``token_uri`` with grant type
  ``urn:ietf:params:oauth:grant-type:jwt-bearer``; it lasts ``expires_in`` seconds.
- "FCM ErrorCode" (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode)
  and "FCM error codes" (https://firebase.google.com/docs/cloud-messaging/error-codes):
  error bodies ``{"error": {"code", "message", "status", "details": [{"@type":
  "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": ...}]}}``.

Message (what the app's ``FirebaseMessagingService.onMessageReceived`` gets as
``data``; no ``notification`` block, so the app is woken and decides what to show)::

    {"message": {
        "token": "<pn-prid>",
        "data": {"type": "call", "call-id": "<Call-ID>", "caller": "<caller>", "callee": "<callee>"},
        "android": {"priority": "high", "ttl": "<ttl>s", "collapse_key": "<SHA-256(Call-ID) prefix>"}}}

All data values are strings (FCM requires it). The Call-ID is sent for the same
reason as with APNs (see :mod:`push.gateways.apns`): the app matches it with the
INVITE the relay forwards once the app has registered again.

Decisions:

- ``errorCode UNREGISTERED`` (HTTP 404) is ``unregistered``. A 404 *without* that
  code is ``rejected``: a wrong project id or base URL answers 404 too, and must not
  make us delete every Android device.
- ``INVALID_ARGUMENT`` (HTTP 400) covers a bad registration token *and* a bad
  message. Google's token-management guide ("Best practices for FCM registration
  token management", https://firebase.google.com/docs/cloud-messaging/manage-tokens,
  "Detect invalid token responses from the FCM backend") says that with a valid
  payload an INVALID_ARGUMENT means the token is invalid; our payload has a fixed shape, but a
  caller string can still make it invalid, so only an error that points at the token
  is ``unregistered``: a ``google.rpc.BadRequest`` field violation on
  ``message.token``, or a message about the "registration token" (Google's example:
  "The registration token is not a valid FCM registration token"). Any other
  INVALID_ARGUMENT is ``rejected``.
- ``UNAUTHENTICATED`` (HTTP 401) is ``auth_expired``: fetch a new access token and
  retry once. ``THIRD_PARTY_AUTH_ERROR`` (also 401) is ``rejected``: Google documents
  it as the APNs certificate / web-push key stored in Firebase being invalid, which a
  new Google access token does not fix.
- ``QUOTA_EXCEEDED`` (429), ``UNAVAILABLE`` (503), ``INTERNAL`` (500) and every 5xx are
  ``retry``, honouring ``Retry-After``. ``SENDER_ID_MISMATCH``, ``PERMISSION_DENIED``
  (403) and other 4xx are ``rejected``.
- Token endpoint: 5xx, 408, 429 and network errors are ``retry`` (transient);
  any other 4xx (``invalid_grant``: key deleted or clock skew; ``invalid_client``...)
  is ``rejected`` with the OAuth ``error`` as reason. One fetch is in flight at a
  time; sends waiting for it share its result, success or failure.
- The project is the gateway's (``project_id``, default the service account's); a
  device's pn-param is not used to pick one, since a service account can only send
  for its own project.
- No answer: as with APNs (:mod:`push.gateways.apns`), a send FCM provably did not
  process is sent again at once, one that left without an answer is not and ends as
  ``sent_unconfirmed``. A duplicate high-priority data message wakes the app twice
  and shows a second incoming call unless the app itself drops the repeated
  Call-ID; ``collapse_key`` merges only messages still waiting for an offline
  device. So the rule is the same: never twice.
- Sends go over HTTP/2 (:mod:`push.gateways.http2`); the access-token request, a
  few per hour, goes through httpx to the account's ``token_uri``.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from push.gateways.base import (
    CachedToken,
    clean_reason,
    collapse_id,
    network_attempt,
    parse_retry_after,
    post,
    protect_logs,
)
from push.gateways.http2 import Http2Client
from push.model import Attempt, PushMessage

FCM_URL = "https://fcm.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
# Google caps the assertion's lifetime (exp - iat) at one hour.
ASSERTION_LIFETIME = 3600
# Refresh the access token this long before it expires (at most half its lifetime),
# so that no send goes out with a token that dies on the way.
REFRESH_MARGIN = 300.0
# FCM: android.ttl is 0 to 2,419,200 s (4 weeks).
TTL_MAX = 2_419_200
REQUEST_TIMEOUT = 10.0
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


def fcm_message(msg: PushMessage) -> dict[str, Any]:
    """The ``messages:send`` body (shape in the module docstring)."""
    return {
        "message": {
            "token": msg.target.token,
            "data": {"type": "call", "call-id": msg.call_id, "caller": msg.caller, "callee": msg.callee},
            "android": {
                "priority": "high",
                "ttl": f"{min(max(int(msg.ttl), 0), TTL_MAX)}s",
                "collapse_key": collapse_id(msg.call_id),
            },
        }
    }


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def classify(status: int, body: bytes, retry_after: float | None) -> Attempt:
    """One ``messages:send`` answer as an :class:`Attempt`."""
    if 200 <= status < 300:
        return Attempt("ok", status)
    err = _json(body)
    err = err.get("error") if isinstance(err, dict) else None
    err = err if isinstance(err, dict) else {}
    g_status = clean_reason(err.get("status"))
    message = err.get("message")
    message = message if isinstance(message, str) else ""
    error_code = ""
    fields: list[str] = []
    details = err.get("details")
    for d in details if isinstance(details, list) else []:
        if not isinstance(d, dict):
            continue
        if d.get("@type") == _FCM_ERROR_TYPE and not error_code:
            error_code = clean_reason(d.get("errorCode"))
        elif d.get("@type") == _BAD_REQUEST_TYPE and isinstance(d.get("fieldViolations"), list):
            fields += [str(v.get("field")) for v in d["fieldViolations"] if isinstance(v, dict)]
    reason = error_code or g_status or f"HTTP{status}"

    if error_code == "UNREGISTERED":
        return Attempt("unregistered", status, reason)
    if "INVALID_ARGUMENT" in (error_code, g_status) or status == 400:
        if "message.token" in fields or "registration token" in message.lower():
            return Attempt("unregistered", status, reason)
        return Attempt("rejected", status, reason)
    if error_code == "THIRD_PARTY_AUTH_ERROR":
        return Attempt("rejected", status, reason)
    if status == 401 or g_status == "UNAUTHENTICATED":
        return Attempt("auth_expired", status, reason)
    if status == 429 or status >= 500 or error_code in ("QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"):
        return Attempt("retry", status, reason, retry_after)
    return Attempt("rejected", status, reason)


def classify_token_error(status: int, body: bytes, retry_after: float | None) -> Attempt:
    """A failed access-token request (OAuth 2.0 error response, RFC 6749 §5.2)."""
    parsed = _json(body)
    error = clean_reason(parsed.get("error")) if isinstance(parsed, dict) else ""
    if status >= 500 or status in (408, 429):
        return Attempt("retry", status, error or "TokenEndpoint", retry_after)
    return Attempt("rejected", status, error or "TokenEndpoint")


def _load_service_account(
    service_account_file: str | Path | None, service_account: Mapping[str, Any] | None
) -> Mapping[str, Any]:
    if (service_account_file is None) == (service_account is None):
        raise ValueError("give the FCM service account as service_account_file or service_account")
    if service_account_file is not None:
        loaded = json.loads(Path(service_account_file).read_text())
        if not isinstance(loaded, dict):
            raise ValueError("the FCM service account file is not a JSON object")
        return loaded
    assert service_account is not None
    return service_account


class FcmGateway:
    """FCM HTTP v1 client: sends over one long-lived HTTP/2 connection
    (:mod:`push.gateways.http2`), access tokens through an httpx client of its own.

    ``service_account_file`` (path of the JSON key Google gives) or
    ``service_account`` (the parsed dict). ``project_id`` defaults to the account's.
    ``token_uri`` from the account is honoured (tests point it at a fake).
    ``clock``: wall clock for the assertion's ``iat``/``exp`` and the token's expiry.
    """

    provider = "fcm"

    def __init__(
        self,
        service_account_file: str | Path | None = None,
        *,
        service_account: Mapping[str, Any] | None = None,
        base_url: str = FCM_URL,
        project_id: str | None = None,
        ca_file: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        account = _load_service_account(service_account_file, service_account)
        try:
            self._client_email = str(account["client_email"])
            pem = str(account["private_key"]).encode()
        except KeyError as exc:
            raise ValueError(f"the FCM service account lacks {exc.args[0]!r}") from None
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the FCM service account's private_key is not an RSA key")
        self._key = key
        self._key_id = str(account.get("private_key_id") or "")
        self._token_uri = str(account.get("token_uri") or DEFAULT_TOKEN_URI)
        project = project_id or account.get("project_id")
        if not project:
            raise ValueError("FCM needs a project_id (none in the service account)")
        self._project = str(project)
        self._send_path = f"/v1/projects/{quote(self._project, safe='')}/messages:send"
        self._clock = clock
        self._token = CachedToken()
        self._lock = trio.Lock()
        self._fetches = 0  # token requests started
        self._fetch_error: Attempt | None = None  # how the last one failed, if it did

        tls = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        protect_logs()
        self._client = httpx.AsyncClient(
            http2=True, verify=tls, timeout=httpx.Timeout(REQUEST_TIMEOUT), trust_env=False,
        )
        self._sender = Http2Client(base_url.rstrip("/"), tls, request_timeout=REQUEST_TIMEOUT)
        self._bearer: tuple[int, bytes] = (0, b"")  # (token generation, b"Bearer <token>")

    @property
    def project_id(self) -> str:
        return self._project

    def _assertion(self, now: int) -> str:
        claims = {
            "iss": self._client_email,
            "scope": SCOPE,
            "aud": self._token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self._key_id} if self._key_id else None
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    async def _access_token(self) -> tuple[str, int] | Attempt:
        """The cached access token and its generation, fetched when missing or near
        its end; an :class:`Attempt` when the token endpoint failed."""
        token = self._token.valid(self._clock())
        if token is not None:
            return token, self._token.generation
        seen = self._fetches
        async with self._lock:
            token = self._token.valid(self._clock())
            if token is not None:
                return token, self._token.generation
            if self._fetches != seen and self._fetch_error is not None:
                # Another send fetched while we waited, and failed: share its answer
                # rather than hammering the endpoint once per waiting send.
                return self._fetch_error
            self._fetches += 1
            self._fetch_error = None
            result = await self._fetch_token()
            if isinstance(result, Attempt):
                self._fetch_error = result
                return result
            return result, self._token.generation

    async def _fetch_token(self) -> str | Attempt:
        now = self._clock()
        form = {"grant_type": GRANT_TYPE, "assertion": self._assertion(int(now))}
        try:
            resp = await self._client.post(self._token_uri, data=form)
        except (httpx.HTTPError, OSError) as exc:
            return network_attempt(exc)
        if resp.status_code != 200:
            retry_after = parse_retry_after(resp.headers.get("retry-after"), self._clock())
            return classify_token_error(resp.status_code, resp.content, retry_after)
        parsed = _json(resp.content)
        token = parsed.get("access_token") if isinstance(parsed, dict) else None
        if not isinstance(token, str) or not token:
            return Attempt("retry", resp.status_code, "BadTokenResponse")
        try:
            lifetime = float(parsed.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 3600.0
        lifetime = max(lifetime, 0.0)
        self._token.set(token, now + lifetime - min(REFRESH_MARGIN, lifetime / 2))
        return token

    async def send_once(self, msg: PushMessage) -> Attempt:
        got = await self._access_token()
        if isinstance(got, Attempt):
            return got
        token, generation = got
        if self._bearer[0] != generation:
            self._bearer = (generation, f"Bearer {token}".encode("ascii", "replace"))
        body = json.dumps(fcm_message(msg), separators=(",", ":"), ensure_ascii=False).encode()
        headers = [(b"authorization", self._bearer[1]), (b"content-type", b"application/json; charset=UTF-8")]
        attempt = await post(self._sender, self._send_path, body, headers, classify, self._clock)
        if attempt.kind == "auth_expired":
            self._token.refused(generation)
        return attempt

    def credentials_expired(self) -> None:
        self._token.drop()

    async def aclose(self) -> None:
        await self._sender.aclose()
        await self._client.aclose()
