"""RFC 8599 in the proxy: push parameters in Contact and Request-URI, bindings, Path devices (pure)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from urllib.parse import unquote

from pbxcore.wire import PROVIDERS, PushTarget
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr
from relay.sip.message import Request, Response
from relay.sip.uri import SipUri

# The bindings read from one REGISTER: a phone registers one Contact, rarely two.
MAX_BINDINGS = 8


def push_target(params: dict[str, str | None]) -> PushTarget | None:
    """The device named by pn-provider/pn-prid/pn-param (RFC 8599 §4.1), or None."""
    provider = (params.get("pn-provider") or "").lower()
    prid = params.get("pn-prid")
    param = params.get("pn-param")
    if provider not in PROVIDERS or not prid or not param:
        return None
    return PushTarget(provider, unquote(prid), unquote(param))


def uri_push_target(uri: str) -> PushTarget | None:
    try:
        return push_target(SipUri.parse(uri).params)
    except SipParseError:
        return None


def user_of(value: str | None) -> str:
    """The user part of a From/To header value, "" when it has none."""
    if not value:
        return ""
    try:
        return unquote(SipUri.parse(NameAddr.parse(value).uri).user or "")
    except SipParseError:
        return ""


@dataclass(frozen=True, slots=True)
class Binding:
    target: PushTarget | None  # RFC 8599 push parameters, if any
    instance: str | None  # RFC 5626 "+sip.instance" (with ";reg-id" appended when present)
    contact_uri: str  # the Contact URI as the phone registered it
    expires: int  # what the phone asked for; 0 = remove

    @property
    def device(self) -> str | PushTarget:
        """What names the device across networks: its instance, else its push token."""
        assert self.instance is not None or self.target is not None
        return self.instance if self.instance is not None else self.target  # type: ignore[return-value]


def register_bindings(req: Request, default_expires: int = 3600) -> list[Binding]:
    """The Contacts of a phone's REGISTER that name a device: push parameters
    (RFC 8599) or an instance id (RFC 5626 §4.1)."""
    out: list[Binding] = []
    try:
        expires_hdr = req.get("expires")
        contacts = req.get_all("contact")
    except SipParseError:
        return out  # not ours to judge: the registrar answers a malformed REGISTER
    for value in contacts:
        if len(out) >= MAX_BINDINGS:
            break
        if value.strip() == "*":
            continue
        try:
            contact = NameAddr.parse(value)
            uri = SipUri.parse(contact.uri)
        except SipParseError:
            continue
        target = push_target(uri.params)
        instance = contact.params.get("+sip.instance")
        if instance:
            instance = instance.strip('"')
            reg_id = contact.params.get("reg-id")
            if reg_id:
                instance += f";reg-id={reg_id}"
        if target is None and not instance:
            continue
        raw = contact.params.get("expires") or expires_hdr
        try:
            expires = int(raw) if raw is not None else default_expires
        except ValueError:
            continue
        out.append(Binding(target, instance or None, contact.uri, max(expires, 0)))
    return out


def requested_expires(req: Request, default: int = 3600) -> int:
    """The longest registration a REGISTER asks for (RFC 3261 §10.2.1.1: each Contact's
    ``expires``, else the Expires header, else ``default``)."""
    try:
        header = req.get("expires")
        values = [NameAddr.parse(v).params.get("expires") for v in req.get_all("contact") if v.strip() != "*"]
    except SipParseError:
        return default
    asked = [v if v is not None else header for v in values] or [header]
    longest = 0
    for value in asked:
        try:
            longest = max(longest, int(value) if value is not None else default)
        except ValueError:
            continue
    return longest


def _target_hash(target: PushTarget) -> str:
    digest = hashlib.sha256(f"{target.provider}|{target.param}|{target.token}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:9]).decode()


def path_device_of(target: PushTarget, user: str) -> str:
    """What a Path token says of the device that registered along it: a hash of its
    push parameters and its AOR user. Signed with the token, so a PBX can neither
    point a wake-up at another device nor hand the call to another user."""
    return f"{_target_hash(target)}.{user}"


def path_user(path_device: str, target: PushTarget) -> str | None:
    """The AOR user of the Path's device if ``target`` is that device, else None."""
    thash, dot, user = path_device.partition(".")
    if not dot or thash != _target_hash(target):
        return None
    return user


def granted_expires(resp: Response) -> dict[str, int]:
    """Contact URI → expiry the registrar granted, from a 2xx to a REGISTER
    (RFC 3261 §10.3 step 8: each binding with its expires)."""
    out: dict[str, int] = {}
    try:
        default = resp.get("expires")
        contacts = resp.get_all("contact")
    except SipParseError:
        return out
    for value in contacts:
        try:
            contact = NameAddr.parse(value)
            raw = contact.params.get("expires") or default
            if raw is not None:
                out[contact.uri] = max(int(raw), 0)
        except (SipParseError, ValueError):
            continue
    return out
