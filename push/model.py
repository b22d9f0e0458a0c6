"""Values shared by the push service's parts: what a push is and how it went.

Plain data, no I/O. Times named ``*_at`` are wall-clock Unix seconds (they
end up in the push log and in APNs' ``apns-expiration``); ``deadline`` is on
trio's clock (``trio.current_time()``), the one the retry loop sleeps on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from enum import StrEnum

PROVIDERS = ("apns", "fcm")


class Outcome(StrEnum):
    """What one push (after its retries) came to. Also the push log's ``outcome``."""

    SENT = "sent"  # the provider accepted it (APNs 200, FCM 200)
    # The request left but no answer came (connection lost, stream reset, timeout):
    # the provider may have delivered it. Never sent again (a second VoIP push rings
    # twice); callers treat it as sent and hold the call for the phone.
    SENT_UNCONFIRMED = "sent_unconfirmed"
    DRY_RUN = "dry_run"  # the log gateway: recorded, nothing sent
    UNREGISTERED = "unregistered"  # APNs 410 / 400 BadDeviceToken, FCM UNREGISTERED: token deleted
    REJECTED = "rejected"  # the provider refused this push for good (400, 403 after a fresh token, 413 ...)
    FAILED = "failed"  # 429/5xx/unreachable until the call's deadline ran out
    UNKNOWN_DEVICE = "unknown_device"  # no such device in the registry: nothing sent


@dataclass(frozen=True, slots=True)
class PushTarget:
    """Who to wake, as RFC 8599 names it in a Contact URI.

    provider: ``pn-provider`` ("apns" | "fcm"); token: ``pn-prid`` (APNs device
    token, hex / FCM registration token); param: ``pn-param`` (APNs:
    ``<team id>.<bundle id>.voip``, RFC 8599 §9.2; FCM: the Firebase project id).
    """

    provider: str
    token: str
    param: str

    def device_id(self, key: bytes, serial: str = "", username: str = "") -> str:
        """Stable, non-reversible id of one registration of this push target: what
        logs, the API and the push log show instead of the token (DESIGN §3: no token
        in clear outside the registry).

        A device is the push target *for one user at one PBX*: the id covers the PBX
        serial and the AOR's user part, so a phone with accounts on two PBXs (or two
        users on one) is two devices that neither overwrite nor delete each other.
        The fields are JSON-encoded, so no choice of values ("a|b" + "c" against
        "a" + "b|c") makes two registrations collide. The registry always passes
        ``serial`` and ``username``; the defaults give a pseudonym of the bare
        target for code that has nothing else (the dry-run gateway's log line).
        """
        material = json.dumps([self.provider, self.param, self.token, serial, username])
        mac = hmac.new(key, material.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    @property
    def apns_topic(self) -> str:
        """APNs ``apns-topic``: pn-param without its leading team id (RFC 8599 §9.2)."""
        _, _, topic = self.param.partition(".")
        return topic or self.param


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One wake-up to deliver. Carries call metadata, never SIP content."""

    target: PushTarget
    call_id: str
    caller: str  # caller number/user (From user part), "" when unknown
    callee: str  # called number/user
    ttl: int  # seconds the push is worth delivering (the ring timeout)
    sent_at: float  # wall clock when the wake was asked for; expiration = sent_at + ttl
    device_id: str = ""  # the registry's id of the device being woken ("" when not from the registry)


@dataclass(slots=True)
class Attempt:
    """The answer to one HTTP request to a provider (no retry logic here)."""

    kind: str  # "ok" | "unregistered" | "retry" | "not_processed" | "unknown" | "rejected" | "auth_expired"
    status: int | None = None  # HTTP status, None when the request never got one
    reason: str = ""  # APNs "reason" / FCM error status or errorCode / exception class
    retry_after: float | None = None  # seconds, from a Retry-After header


@dataclass(slots=True)
class PushResult:
    """What a push came to after its retries; what the push log records."""

    outcome: Outcome
    status: int | None = None
    reason: str = ""
    attempts: int = 0
    latency_ms: float = 0.0  # from the wake request to the final answer
    history: list[Attempt] = field(default_factory=list)
