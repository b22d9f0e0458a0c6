"""Values shared by the push service's parts: what a push is and how it went (wire types: pbxcore.wire).

Plain data, no I/O. Times named ``*_at`` are wall-clock Unix seconds (they
end up in the push log and in APNs' ``apns-expiration``); ``deadline`` is on
trio's clock (``trio.current_time()``), the one the retry loop sleeps on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pbxcore.wire import PROVIDERS, PushTarget, WakeOutcome

__all__ = ["PROVIDERS", "Attempt", "Outcome", "PushMessage", "PushResult", "PushTarget"]

# What a push came to: the wire type the relay also reads (pbxcore.wire.WakeOutcome).
Outcome = WakeOutcome


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

    kind: str  # "ok" | "unregistered" | "retry" | "rejected" | "auth_expired"
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
