"""Rewriting a request on its way through (RFC 3261 §16.4–§16.6, RFC 3581): pure functions of a request.

Each works in one pass over the headers, whatever their number: a message with
thousands of Route or Via entries costs time linear in its size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from relay.proxy.flow import Flow
from relay.proxy.identity import OUR_BRANCH, RelayIdentity
from relay.proxy.keyedmac import Sha256Mac, urlsafe_b64
from relay.proxy.replies import txn_key
from relay.sip import limits
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr, Via, split_commas
from relay.sip.message import Header, Request
from relay.sip.uri import SipUri


@dataclass(slots=True)
class Hop:
    """A request on its way: where it came from and where it goes."""

    req: Request
    source: Flow
    via: Via  # its top Via as received (stamped)
    target: Flow
    serial: str  # the PBX the dialog or registration belongs to
    phone_flow: Flow  # the phone's flow, named in the tokens we mint
    mf: int  # Max-Forwards as received
    to_phone: bool

    # Written out, not generated: mypyc compiles a written __init__, while the one
    # @dataclass generates stays interpreted (one of the commonest objects a message makes).
    def __init__(self, req: Request, source: Flow, via: Via, target: Flow, serial: str, phone_flow: Flow,
                 mf: int, to_phone: bool) -> None:
        self.req = req
        self.source = source
        self.via = via
        self.target = target
        self.serial = serial
        self.phone_flow = phone_flow
        self.mf = mf
        self.to_phone = to_phone


def stamp_via(req: Request, via: Via, source: Flow) -> None:
    """RFC 3261 §18.2.1 ``received``, RFC 3581 ``rport``, on the top Via."""
    needs_received = via.host != source.remote_ip
    wants_rport = "rport" in via.params and not via.params.get("rport")
    if not needs_received and not wants_rport:
        return
    for i, h in enumerate(req.headers):
        if h.name == "via":
            values = split_commas(h.value)
            top = values[0]
            if wants_rport:
                top = set_param(top, "rport", str(source.remote_port))
            top = set_param(top, "received", source.remote_ip)
            req.headers[i] = Header(h.raw_name, ", ".join([top, *values[1:]]))
            return


def strip_own_routes(
    req: Request, identity: RelayIdentity,
) -> tuple[str | None, str | None, bool, list[str]]:
    """Loose routing (RFC 3261 §16.4): remove the leading Route entries naming us.

    Returns (the token of the last one that carried one, its ``ftag``, whether any
    Route entry is left, the entries removed). The values are split once and the
    headers rewritten once.
    """
    values = req.get_all("route")
    token: str | None = None
    ftag: str | None = None
    ours = 0
    for value in values:
        try:
            uri = SipUri.parse(NameAddr.parse(value).uri)
        except SipParseError:
            break
        if not identity.is_us(uri):
            break
        ours += 1
        if uri.user:
            token, ftag = uri.user, uri.params.get("ftag")
    stripped = req.pop_first_values("route", ours) if ours else []
    return token, ftag, ours < len(values), stripped


def max_forwards(req: Request) -> int:
    """Max-Forwards as received, or the default a proxy assumes when it is missing."""
    value = req.get("max-forwards")
    return int(value) if value is not None else limits.DEFAULT_MAX_FORWARDS


def decrement_max_forwards(req: Request, mf: int) -> None:
    """RFC 3261 §16.6 item 3."""
    if req.has("max-forwards"):
        req.set("Max-Forwards", str(mf - 1))
    else:
        req.insert_before("Max-Forwards", str(limits.DEFAULT_MAX_FORWARDS - 1))


def loop_hash(req: Request, node: str = "") -> str:
    """RFC 3261 §16.6 item 8: what must differ for a spiral not to be a loop. ``node``:
    this node's id in a cluster, whose nodes all write branches starting OUR_BRANCH: a
    request passing three nodes unchanged (an in-dialog one) is not a loop at the third."""
    data = f"{req.uri}|{req.from_tag or ''}|{req.call_id}|{req.cseq[0]}|{node}".encode()
    return hashlib.sha256(data).hexdigest()[:8]


def looped(req: Request, loop: str) -> bool:
    """RFC 3261 §16.3 item 4: one of our own Vias below the top carries this loop hash."""
    suffix = "." + loop
    for value in req.get_all("via")[1:]:
        if OUR_BRANCH in value:  # only our own Vias can tell a loop
            branch = Via.parse(value).branch or ""
            if branch.startswith(OUR_BRANCH) and branch.endswith(suffix):
                return True
    return False


class Branches:
    """Stateless-proxy branches (RFC 3261 §16.11): the same for a retransmission, for
    the CANCEL and for the ACK of a non-2xx of the same INVITE."""

    def __init__(self, key: bytes):
        self._mac = Sha256Mac(key)

    def branch(self, req: Request, via: Via, loop: str) -> str:
        key = txn_key(req, via, "INVITE")
        mac = self._mac.digest("|".join(key).encode())[:9]
        return f"{OUR_BRANCH}{urlsafe_b64(mac)}.{loop}"

    def call_mark(self, call_id: str) -> str:
        """What our Via carries as ``ci``: a MAC of the request's Call-ID. A response
        names its call by a Call-ID the responder writes; the relay finds media sessions
        by Call-ID, so an answer is believed only with the Call-ID of its request."""
        return urlsafe_b64(self._mac.digest(b"ci|" + call_id.encode())[:6])


def set_param(value: str, name: str, param: str) -> str:
    """Set ``;name=param`` on a Via value, replacing an empty or old one."""
    head, _, rest = value.partition(";")
    params = [p for p in rest.split(";") if p.strip()] if rest else []
    out = []
    done = False
    for p in params:
        if p.strip().split("=", 1)[0].strip().lower() == name:
            out.append(f"{name}={param}")
            done = True
        else:
            out.append(p.strip())
    if not done:
        out.append(f"{name}={param}")
    return ";".join([head.rstrip(), *out])
