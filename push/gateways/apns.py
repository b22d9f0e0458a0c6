"""Apple Push Notification service client: one VoIP push per request, over HTTP/2.

Built from Apple's documentation:

- "Sending notification requests to APNs"
  (https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns):
  HTTP/2 and TLS 1.2+ to ``api.push.apple.com`` (``api.sandbox.push.apple.com``
  for development builds), ``POST /3/device/<device token>``, the ``apns-*``
  request headers, many concurrent streams on one connection.
- "Establishing a token-based connection to APNs"
  (https://developer.apple.com/documentation/usernotifications/establishing-a-token-based-connection-to-apns):
  provider token = JWT signed ES256 with the ``.p8`` key, header ``{"alg": "ES256",
  "kid": <key id>}``, claims ``{"iss": <team id>, "iat": <now>}``; refresh it no more
  than once every 20 minutes and no less than once every 60 minutes.
- "Handling notification responses from APNs"
  (https://developer.apple.com/documentation/usernotifications/handling-notification-responses-from-apns):
  status codes and ``reason`` strings, mapped below.
- The same "Sending notification requests" page, ``apns-push-type`` table: a
  ``voip`` push goes to the topic ``<bundle id>.voip`` (PushKit).

Request (what a softphone app receives, PushKit ``didReceiveIncomingPush``)::

    POST /3/device/<pn-prid>
    authorization: bearer <provider JWT>      (token auth only)
    apns-push-type: voip
    apns-topic: <bundle id>.voip
    apns-priority: 10
    apns-expiration: <sent_at + ttl, Unix seconds>
    apns-collapse-id: <first 32 hex digits of SHA-256(Call-ID)>

    {"aps":{},"pn":{"call-id":"<Call-ID>","caller":"<caller>","callee":"<callee>","type":"call"}}

The payload carries call metadata only, never SIP content. It does carry the
Call-ID in clear: the app needs it to match the INVITE the relay will forward once
the app has registered again (Flexisip's VoIP pushes carry it for the same reason),
and PushKit requires the app to report a CallKit call at once, which it can only
tie to the right INVITE with this id. ``caller`` is the From user part ("" when
unknown), ``callee`` the called user.

Decisions:

- Topic. RFC 8599 §9.2 makes pn-param ``<team id>.<bundle id>.<service>``;
  :attr:`PushTarget.apns_topic` strips the team id. Apple requires the ``.voip``
  suffix for ``apns-push-type: voip``. So: a topic ending in ``.voip`` is used as
  it is; a last label made only of service names joined by ``&`` (Linphone's
  ``remote&voip``, plain ``remote`` or ``apns``) is replaced by ``voip``; anything
  else gets ``.voip`` appended. We only ever send VoIP pushes, so the topic always
  ends in ``.voip``.
- ``403 ExpiredProviderToken`` is ``auth_expired``: mint a new token and retry once
  (``deliver`` allows one renewal per push). ``403 InvalidProviderToken`` is
  ``rejected``: the token's signature, key id or team id is wrong, and a new token
  made from the same key would be refused the same way; re-minting on every push
  would only earn ``429 TooManyProviderTokenUpdates``.
- ``410`` (any reason), ``400 BadDeviceToken`` and ``400 DeviceTokenNotForTopic`` are
  ``unregistered``: Apple says not to retry them, and the device must register a
  new token (or the right environment/topic) before a push can work again.
- ``429`` (``TooManyRequests`` and ``TooManyProviderTokenUpdates``) and every 5xx are
  ``retry``, honouring ``retry-after`` when APNs sends one.
- Certificate authentication: with ``cert_file`` and no signing key, the client
  presents that TLS certificate and sends no ``authorization`` header.
- No answer: a request APNs provably did not process (refused stream, above a
  GOAWAY's last-stream-id, no connection) is sent again at once; one that left
  without an answer (connection lost after the request was written, any other
  stream reset, no answer within 10 s) is *not*: a second VoIP push is a second
  CallKit call on the phone. It ends as ``sent_unconfirmed``, and the relay holds
  the call as if the push had been accepted (see :mod:`push.gateways.http2`).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from push.gateways.base import (
    CachedToken,
    clean_reason,
    collapse_id,
    post,
    protect_logs,
)
from push.gateways.http2 import Http2Client
from push.model import Attempt, PushMessage

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"

# Apple: refresh the provider token no more than once every 20 minutes and no less
# than once every 60 minutes. 55 minutes leaves room for clock skew.
TOKEN_REFRESH_MIN = 1200
TOKEN_REFRESH_MAX = 3300
TOKEN_REFRESH_DEFAULT = 1800
# Seconds one request may take when the deadline does not cut it shorter.
REQUEST_TIMEOUT = 10.0
# apns-topic values remembered (one per app a service pushes to; a handful).
TOPICS_CACHED = 64
# Service labels RFC 8599 / Linphone / Flexisip put after the bundle id in pn-param.
_SERVICE_LABELS = frozenset({"voip", "remote", "apns"})
# Reasons that mean "this device token is no use for this topic": stop using it.
_DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})


def voip_topic(topic: str) -> str:
    """``apns-topic`` for a VoIP push from the topic a device registered (see the
    module docstring)."""
    if topic.endswith(".voip"):
        return topic
    bundle, dot, last = topic.rpartition(".")
    if dot and last and set(last.split("&")) <= _SERVICE_LABELS:
        return f"{bundle}.voip"
    return f"{topic}.voip"


def voip_payload(msg: PushMessage) -> bytes:
    """The JSON body of the push (shape in the module docstring)."""
    body = {
        "aps": {},
        "pn": {"call-id": msg.call_id, "caller": msg.caller, "callee": msg.callee, "type": "call"},
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def classify(status: int, body: bytes, retry_after: float | None) -> Attempt:
    """One APNs answer as an :class:`Attempt`."""
    if status == 200:
        return Attempt("ok", status)
    reason = ""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        reason = clean_reason(parsed.get("reason"))
    reason = reason or f"HTTP{status}"
    if status == 410 or (status == 400 and reason in _DEAD_TOKEN_REASONS):
        return Attempt("unregistered", status, reason)
    if status == 403 and reason == "ExpiredProviderToken":
        return Attempt("auth_expired", status, reason)
    if status == 429 or status >= 500:
        return Attempt("retry", status, reason, retry_after)
    return Attempt("rejected", status, reason)


def _load_signing_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the APNs signing key must be a P-256 EC key (the .p8 file from Apple)")
    return key


class ApnsGateway:
    """APNs client over one long-lived HTTP/2 connection (:mod:`push.gateways.http2`).

    Token auth: ``key_file`` (path of the ``.p8``) or ``key_pem``, plus ``key_id`` and
    ``team_id``. Certificate auth: ``cert_file`` (and ``cert_key_file`` when the key
    is not in the same PEM), no signing key. ``ca_file`` replaces the system trust
    store (tests). ``token_refresh`` (seconds) is clamped into [1200, 3300].
    ``clock`` gives the wall-clock ``iat`` of the JWT.
    """

    provider = "apns"

    def __init__(
        self,
        base_url: str = PRODUCTION_URL,
        key_file: str | Path | None = None,
        key_id: str = "",
        team_id: str = "",
        *,
        key_pem: bytes | None = None,
        cert_file: str | Path | None = None,
        cert_key_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        token_refresh: float = TOKEN_REFRESH_DEFAULT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if key_file is not None and key_pem is not None:
            raise ValueError("give the APNs signing key as key_file or key_pem, not both")
        if key_file is not None:
            key_pem = Path(key_file).read_bytes()
        self._key: ec.EllipticCurvePrivateKey | None = None
        if key_pem is not None:
            if cert_file is not None:
                raise ValueError("APNs: use a signing key (token auth) or a certificate, not both")
            if not key_id or not team_id:
                raise ValueError("APNs token auth needs key_id and team_id")
            self._key = _load_signing_key(key_pem)
        elif cert_file is None:
            raise ValueError("APNs needs a signing key (key_file/key_pem) or a client certificate")
        self._key_id = key_id
        self._team_id = team_id
        self._refresh = float(min(max(token_refresh, TOKEN_REFRESH_MIN), TOKEN_REFRESH_MAX))
        self._clock = clock
        self._token = CachedToken()
        self._base = base_url.rstrip("/")

        tls = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        if cert_file is not None:
            tls.load_cert_chain(str(cert_file), str(cert_key_file) if cert_key_file is not None else None)
        protect_logs()
        # HTTP/2 only (ALPN "h2", no HTTP/1.1 fallback: APNs speaks HTTP/2 only).
        self._client = Http2Client(self._base, tls, request_timeout=REQUEST_TIMEOUT)
        self._bearer: tuple[int, bytes] = (0, b"")  # (token generation, b"bearer <JWT>")
        self._topics: dict[str, bytes] = {}  # registered topic -> apns-topic, bounded below

    @property
    def token_auth(self) -> bool:
        return self._key is not None

    def _provider_token(self) -> tuple[str, int]:
        """The cached JWT, minted again once ``token_refresh`` seconds old."""
        assert self._key is not None
        now = self._clock()
        token = self._token.valid(now)
        issued_at = self._token.expires_at - self._refresh
        if token is None or now < issued_at - 60:  # the wall clock went back: Apple would refuse it
            iat = int(now)
            token = jwt.encode(
                {"iss": self._team_id, "iat": iat}, self._key, algorithm="ES256",
                headers={"kid": self._key_id, "typ": None},
            )
            self._token.set(token, iat + self._refresh)
        return token, self._token.generation

    def _topic(self, topic: str) -> bytes:
        """``apns-topic`` for a registered topic, remembered: a service has a few apps."""
        value = self._topics.get(topic)
        if value is None:
            if len(self._topics) >= TOPICS_CACHED:
                self._topics.clear()
            value = self._topics[topic] = voip_topic(topic).encode("utf-8", "surrogateescape")
        return value

    async def send_once(self, msg: PushMessage) -> Attempt:
        headers = [
            (b"apns-push-type", b"voip"),
            (b"apns-topic", self._topic(msg.target.apns_topic)),
            (b"apns-priority", b"10"),
            (b"content-type", b"application/json"),
        ]
        per_request = (
            (b"apns-expiration", b"%d" % max(0, int(msg.sent_at + msg.ttl))),
            (b"apns-collapse-id", collapse_id(msg.call_id).encode("ascii")),
        )
        generation = 0
        if self._key is not None:
            token, generation = self._provider_token()
            if self._bearer[0] != generation:
                self._bearer = (generation, f"bearer {token}".encode("ascii"))
            headers.append((b"authorization", self._bearer[1]))
        path = f"/3/device/{quote(msg.target.token, safe='')}"
        attempt = await post(self._client, path, voip_payload(msg), headers, classify, self._clock,
                             per_request)
        if attempt.kind == "auth_expired":
            self._token.refused(generation)
        return attempt

    def credentials_expired(self) -> None:
        self._token.drop()

    async def aclose(self) -> None:
        await self._client.aclose()
