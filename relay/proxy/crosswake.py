"""Cluster: a phone woken for a call held on one node registers again through another (pure).

RFC 8599 §5.3.2 on one node: the INVITE waits in :class:`relay.proxy.holds.Holds` and
goes out once the woken phone registers again. In a cluster the phone's new connection
may land on another node (another worker, another machine): the node holding the INVITE
never sees that REGISTER. So (docs/cluster.md, "Wake-ups across nodes"):

1. the holding node says in the shared state that it awaits the device
   (``AwaitDevice``: key ``pbxrelay:waiting:<device id>``, its node id, for the ring
   timeout). The device id is an HMAC of the push target, serial and user under the
   cluster secret:
   no push token, nothing that names a phone's address, is written to the store;
2. the node the phone registers through, once the PBX accepted the registration, asks
   who awaits that device (``Woken``) and, if another node does, sends it over their
   link a message (:func:`woken_message`) naming the device, the PBX serial and user,
   the contact the phone registered and this node's Path entry for it;
3. the holding node releases its INVITEs for that device (same serial and user only)
   to that contact, routed by that Path entry, over the link: the registering node
   then routes it to the phone's new flow like any request on its Path.

The message is a NOTIFY with ``Event: x-pbxrelay-woken``, accepted only from a node link
(authenticated; relay/cluster/links.py) and never answered: an event between nodes, not
a SIP transaction. Everything here is pure: the shell does the store and the link.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbxcore.wire import PushTarget
from relay.sip.message import Request

WOKEN_EVENT = "x-pbxrelay-woken"
DEVICE_HEADER = "X-Pbxrelay-Device"
AOR_HEADER = "X-Pbxrelay-Aor"
# The longest contact or Path entry carried (a phone's Contact URI with its push
# parameters is a few hundred bytes; a Path entry of ours under 200).
MAX_ENTRY = 2048


@dataclass(frozen=True, slots=True)
class WokenElsewhere:
    """A device registered again through another node (step 3 above)."""

    device: str
    serial: str
    user: str
    contact: str  # the Contact URI the phone registered (RFC 8599: the released INVITE's R-URI)
    path: str  # the registering node's Path entry, "<sip:...;lr>"


def device_id(key: bytes, target: PushTarget, serial: str, user: str) -> str:
    """The device's name in the shared state: the push service's device id (an HMAC of
    the push target, PBX serial and user) under the cluster secret."""
    return target.device_id(key, serial, user)


def woken_message(woken: WokenElsewhere, via_host: str, branch: str) -> bytes:
    """The message the registering node sends the holding node over their link."""
    lines = [
        "NOTIFY sip:woken@cluster.invalid SIP/2.0",
        f"Via: SIP/2.0/TCP {via_host};branch={branch}",
        "Max-Forwards: 1",
        f"From: <sip:node@cluster.invalid>;tag={branch[-12:]}",
        "To: <sip:node@cluster.invalid>",
        f"Call-ID: {branch}",
        "CSeq: 1 NOTIFY",
        f"Event: {WOKEN_EVENT}",
        f"{DEVICE_HEADER}: {woken.device}",
        f"{AOR_HEADER}: {woken.serial};{woken.user}",
        f"Contact: <{woken.contact}>",
        f"Path: {woken.path}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def is_woken(req: Request) -> bool:
    """A woken message (whoever sent it: the caller checks it came over a node link)."""
    return req.method == "NOTIFY" and (req.get("event") or "").strip().lower() == WOKEN_EVENT


def parse_woken(req: Request) -> WokenElsewhere | None:
    """What a woken message says, or None when a part is missing or oversized."""
    device = (req.get(DEVICE_HEADER.lower()) or "").strip()
    serial, _, user = (req.get(AOR_HEADER.lower()) or "").strip().partition(";")
    contact = (req.get("contact") or "").strip()
    path = (req.get("path") or "").strip()
    if not (device and serial and contact.startswith("<") and contact.endswith(">") and path):
        return None
    if max(len(contact), len(path)) > MAX_ENTRY:
        return None
    return WokenElsewhere(device, serial, user, contact[1:-1], path)
