"""The push service's wire types as the proxy core uses them (temporary home).

TODO(lead): these move to the shared contract package (pbxcore) being built in
parallel; then this module goes and the core no longer imports ``push``.
"""

from __future__ import annotations

from dataclasses import dataclass

from push.model import PROVIDERS, Outcome, PushTarget

__all__ = ["PROVIDERS", "DELIVERED", "Outcome", "PushTarget", "WakeRequest"]

# Outcomes after which the phone may ring: the relay answers 180 and waits. A push whose
# answer was lost after it left (sent_unconfirmed) may well ring the phone: the call waits.
DELIVERED = frozenset({Outcome.SENT, Outcome.SENT_UNCONFIRMED, Outcome.DRY_RUN})


@dataclass(frozen=True, slots=True)
class WakeRequest:
    """Wake ``target``, registered by ``username`` at PBX ``serial``, for one call."""

    target: PushTarget
    serial: str
    username: str
    call_id: str
    caller: str  # From user part, "" when unknown
    callee: str  # To user part
    src: str  # "ip:port" the call came from
    ring_timeout: float  # seconds: the push's TTL and the retries' deadline
