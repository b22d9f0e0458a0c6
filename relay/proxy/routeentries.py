"""The relay's own entries in a request it forwards: Path (RFC 3327) and Record-Route
(RFC 3261 §16.6 item 4, RFC 5658 double Record-Route), and which end a request routed by
one of them is going to."""

from __future__ import annotations

from relay.proxy.flow import Flow
from relay.proxy.forwarding import Hop
from relay.proxy.identity import RelayIdentity
from relay.proxy.routetokens import TOKEN_FROM_PBX, TOKEN_FROM_PHONE, TOKEN_PATH, RouteTokens
from relay.proxy.wake import Binding, path_device_of, register_bindings, requested_expires, user_of
from relay.sip.message import Request

DIALOG_FORMING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})


def add_route_entries(
    hop: Hop, tokens: RouteTokens, identity: RelayIdentity, push: bool, wall: float,
) -> list[Binding]:
    """Path on a phone's REGISTER (RFC 3327), Record-Route on a dialog-forming
    request (§16.6 item 4); the REGISTER's device bindings, when it has any."""
    req = hop.req
    if req.method == "REGISTER":
        # Requests from the PBX to this phone come back through us, on this very
        # flow (RFC 5626 §5.1). With push parameters, the token also names the
        # device and its AOR user: only that device can be woken along this Path,
        # and only that user's next registration gets the call.
        bindings = register_bindings(req)
        push_b = next((b for b in bindings if b.target is not None), None)
        device = ""
        if push_b is not None and push_b.target is not None and push:
            device = path_device_of(push_b.target, user_of(req.get("to")))
        token = tokens.path(hop.phone_flow, hop.serial, device, requested_expires(req), wall)
        req.insert_before("Path", f"<{identity.uri(token, hop.target)};lr>")
        return bindings
    if req.method in DIALOG_FORMING:
        kind = TOKEN_FROM_PBX if hop.to_phone else TOKEN_FROM_PHONE
        token = tokens.record_route(hop.phone_flow, kind, hop.serial, req, wall)
        ftag = req.from_tag
        rr = f";lr;ftag={ftag}>" if ftag else ";lr>"
        # Double Record-Route when the two sides use different sockets
        # (RFC 5658): each side must see the entry it can reach. Inside a
        # dialog (re-INVITE) it is harmless and keeps target refreshes simple.
        source, target = hop.source, hop.target
        if (source.transport, source.local_port) != (target.transport, target.local_port):
            req.insert_before("Record-Route", f"<{identity.uri(token, source)}{rr}")
        req.insert_before("Record-Route", f"<{identity.uri(token, target)}{rr}")
    return []


def towards_phone(req: Request, source: Flow, kind: str, ftag: str | None, pbx_flow: Flow | None) -> bool:
    """Which end of the dialog a token-routed request is for.

    A Path token is only ever used by the registrar, the PBX. For a Record-Route
    token, ``ftag`` is the From tag of the request that made the route and ``kind``
    says who sent it (TOKEN_FROM_PHONE/PBX): a request carrying that From tag comes
    from the same party (Kamailio's rr ``ftag`` rule). This holds when the PBX uses
    another connection or the phone another network; the source flow decides only
    when the route carries no ftag.
    """
    if kind == TOKEN_PATH:
        return True
    if ftag is not None and kind in (TOKEN_FROM_PHONE, TOKEN_FROM_PBX):
        from_creator = (req.from_tag or "") == ftag
        return from_creator == (kind == TOKEN_FROM_PBX)
    return pbx_flow is not None and pbx_flow == source
