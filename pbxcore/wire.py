"""What the relay and the push service exchange: push targets, device updates, wake-ups, outcomes, as JSON.

The relay's push client (relay/pushclient.py) and the push API (push/api.py) both
speak through these types and codec, in process or over HTTP. Decoding checks every
field (type, length, no control characters) and raises :class:`WireError` with the
message an API answers as 400; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

PROVIDERS = ("apns", "fcm")
TRANSPORTS = ("udp", "tcp", "tls")
# Field limits: RFC 8599 tokens (pn-prid) are provider-defined; APNs tokens are 64 hex
# digits, FCM registration tokens ~160-200 characters; 4096 leaves room for both. A
# serial is a DNS label (63); call ids and user parts are SIP tokens far below 256.
MAX_FIELD = {"provider": 16, "token": 4096, "param": 255, "serial": 64, "username": 256,
             "transport": 8, "call_id": 256, "caller": 256, "callee": 256, "src": 64, "device_id": 64}
RING_TIMEOUT_MIN, RING_TIMEOUT_MAX, RING_TIMEOUT_DEFAULT = 1.0, 120.0, 30.0


class WireError(ValueError):
    """A message that does not decode: the reason, fit to answer a caller (HTTP 400)."""


class WakeOutcome(StrEnum):
    """What one wake-up (a push, after its retries) came to. Also the push log's ``outcome``."""

    SENT = "sent"  # the provider accepted it (APNs 200, FCM 200)
    # The request left but no answer came (connection lost, stream reset, timeout):
    # the provider may have delivered it. Never sent again (a second VoIP push rings
    # twice); the relay treats it as sent and holds the call for the phone.
    SENT_UNCONFIRMED = "sent_unconfirmed"
    DRY_RUN = "dry_run"  # the log gateway: recorded, nothing sent
    UNREGISTERED = "unregistered"  # APNs 410 / 400 BadDeviceToken, FCM UNREGISTERED: token deleted
    REJECTED = "rejected"  # the provider refused this push for good (400, 403 after a fresh token, 413 ...)
    FAILED = "failed"  # 429/5xx/unreachable until the call's deadline ran out
    UNKNOWN_DEVICE = "unknown_device"  # no such device in the registry: nothing sent

    @property
    def may_ring(self) -> bool:
        """The phone may be woken: the relay answers 180 and holds the call for it."""
        return self in (WakeOutcome.SENT, WakeOutcome.SENT_UNCONFIRMED, WakeOutcome.DRY_RUN)


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
class DeviceUpdate:
    """A device's registration as the relay saw it (RFC 8599 Contact parameters)."""

    target: PushTarget
    serial: str
    username: str
    ip: str
    port: int
    transport: str


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A device named by its push target, the user who registered it and their PBX."""

    target: PushTarget
    serial: str
    username: str


@dataclass(frozen=True, slots=True)
class WakeRequest:
    """Wake one device for one call: the device by its target (``target`` with
    ``serial`` and ``username``, what the relay sends) or by its id (``device_id``, what
    a PBX or an operator may send); exactly one of the two."""

    call_id: str
    caller: str = ""  # caller number/user (From user part), "" when unknown
    callee: str = ""  # called number/user
    src: str = ""  # "ip:port" the call came from, "" when unknown
    ring_timeout: float = RING_TIMEOUT_DEFAULT  # seconds: the push's TTL and the retries' deadline
    serial: str = ""  # the PBX asking; when set, a device of another PBX is not woken
    username: str = ""  # with ``target``: the user who registered it
    target: PushTarget | None = None
    device_id: str = ""

    def resolve(self, key: bytes) -> str:
        """The id of the device to wake (``key``: the push service's key)."""
        if self.target is not None:
            return self.target.device_id(key, self.serial, self.username)
        return self.device_id


@dataclass(frozen=True, slots=True)
class WakeResult:
    """What a wake-up came to, as the push service answers it."""

    device_id: str
    outcome: WakeOutcome
    status: int | None = None  # the provider's last HTTP status
    reason: str = ""
    attempts: int = 0
    latency_ms: float = 0.0


# ------------------------------------------------------------------ encoding


def target_json(target: PushTarget, serial: str, username: str) -> dict[str, str]:
    """A device reference as JSON fields."""
    return {"provider": target.provider, "token": target.token, "param": target.param,
            "serial": serial, "username": username}


def device_update_json(update: DeviceUpdate) -> dict[str, Any]:
    """``PUT /v1/devices`` body."""
    return {**target_json(update.target, update.serial, update.username),
            "ip": update.ip, "port": update.port, "transport": update.transport}


def wake_request_json(req: WakeRequest) -> dict[str, Any]:
    """``POST /v1/wake`` body."""
    body: dict[str, Any] = {"call_id": req.call_id, "caller": req.caller, "callee": req.callee,
                            "src": req.src, "ring_timeout": req.ring_timeout}
    if req.target is not None:
        body.update(target_json(req.target, req.serial, req.username))
    else:
        body["device_id"] = req.device_id
        if req.serial:
            body["serial"] = req.serial
    return body


def wake_result_json(result: WakeResult) -> dict[str, Any]:
    """The answer to ``POST /v1/wake``."""
    return {"device_id": result.device_id, "outcome": result.outcome.value, "status": result.status,
            "reason": result.reason, "attempts": result.attempts, "latency_ms": round(result.latency_ms, 3)}


# ------------------------------------------------------------------ decoding


def text_field(data: dict[str, Any], key: str, *, required: bool = True) -> str:
    """A string field within its length limit and without control characters."""
    v = data.get(key)
    if v is None:
        if required:
            raise WireError(f"{key} is required")
        return ""
    if not isinstance(v, str):
        raise WireError(f"{key} must be a string")
    if required and not v:
        raise WireError(f"{key} must not be empty")
    limit = MAX_FIELD.get(key, 256)
    if len(v) > limit:
        raise WireError(f"{key} is longer than {limit} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise WireError(f"{key} contains control characters")
    return v


def digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit()`` alone also takes '²' or '١', which int()
    then refuses (or reads as another number)."""
    return text.isascii() and text.isdigit()


def number(v: object) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _ip(text: str, key: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise WireError(f"{key} {text!r} is not an IP address") from None


def _port(v: object, key: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError(f"{key} must be an integer" if v is not None else f"{key} is required")
    if not 0 < v < 65536:
        raise WireError(f"{key} must be 1..65535")
    return v


def _src(text: str) -> str:
    """"ip:port" (IPv6 as "[ip]:port") or empty, normalised."""
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not digits(port):
        raise WireError(f"src {text!r} is not ip:port")
    ip = _ip(host.strip("[]") if host.startswith("[") else host, "src")
    p = _port(int(port), "src port")
    return f"[{ip}]:{p}" if ":" in ip else f"{ip}:{p}"


def push_target_from_json(data: dict[str, Any]) -> PushTarget:
    """provider, token, param."""
    provider = text_field(data, "provider")
    if provider not in PROVIDERS:
        raise WireError(f"provider {provider!r} is not supported ({', '.join(PROVIDERS)})")
    return PushTarget(provider, text_field(data, "token"), text_field(data, "param"))


def device_ref_from_json(data: dict[str, Any]) -> DeviceRef:
    """provider, token, param, serial, username (``POST /v1/devices/unregister``)."""
    target = push_target_from_json(data)
    return DeviceRef(target, text_field(data, "serial"), text_field(data, "username"))


def device_update_from_json(data: dict[str, Any]) -> DeviceUpdate:
    """``PUT /v1/devices`` body."""
    ref = device_ref_from_json(data)
    transport = text_field(data, "transport").lower()
    return DeviceUpdate(ref.target, ref.serial, ref.username, _ip(text_field(data, "ip"), "ip"),
                        _port(data.get("port"), "port"), transport)


def wake_request_from_json(data: dict[str, Any]) -> WakeRequest:
    """``POST /v1/wake`` body: by device id, or by target, serial and username."""
    ring = data.get("ring_timeout", RING_TIMEOUT_DEFAULT)
    if not number(ring) or not RING_TIMEOUT_MIN <= ring <= RING_TIMEOUT_MAX:
        raise WireError(
            f"ring_timeout must be a number of seconds, {RING_TIMEOUT_MIN:g}..{RING_TIMEOUT_MAX:g}")
    call = WakeRequest(
        call_id=text_field(data, "call_id"), caller=text_field(data, "caller", required=False),
        callee=text_field(data, "callee", required=False), src=_src(text_field(data, "src", required=False)),
        ring_timeout=float(ring))
    if "device_id" in data:
        if "token" in data:
            raise WireError("give device_id or provider/token/param/serial/username, not both")
        return replace(call, device_id=text_field(data, "device_id"),
                       serial=text_field(data, "serial", required=False))
    ref = device_ref_from_json(data)
    return replace(call, target=ref.target, serial=ref.serial, username=ref.username)


def wake_result_from_json(data: object) -> WakeResult:
    """The answer to ``POST /v1/wake``; an outcome this side does not know is an error."""
    if not isinstance(data, dict):
        raise WireError("the wake answer is not a JSON object")
    try:
        outcome = WakeOutcome(str(data.get("outcome")))
    except ValueError:
        raise WireError(f"unknown wake outcome {str(data.get('outcome'))[:40]!r}") from None
    status = data.get("status")
    return WakeResult(
        device_id=str(data.get("device_id", "")), outcome=outcome,
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        reason=str(data.get("reason", ""))[:200], attempts=int(data.get("attempts") or 0),
        latency_ms=float(data.get("latency_ms") or 0.0),
    )
