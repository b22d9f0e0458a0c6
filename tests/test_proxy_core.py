"""Routing through the sans-I/O proxy core, driven with raw SIP bytes.

A PBX (serial 0123456789) phones home over TCP; a softphone behind NAT talks
UDP (or TCP) to the relay. Every assertion is on the bytes the core returns.
"""

from __future__ import annotations

import pytest

from relay.proxy.flow import Flow
from relay.proxy.identity import OUR_BRANCH
from relay.proxy.invites import PendingLimits
from relay.proxy.routetokens import TOKEN_FROM_PBX, TOKEN_FROM_PHONE, TOKEN_PATH, Claim, dialog_id
from relay.proxy.transaction import LINGER, T1, TIMER_B, TIMER_C
from relay.sip import Request, SipParseError, parse_message
from tests.proxyharness import (
    ADVERTISE,
    OTHER_SERIAL,
    PBX_DOMAIN,
    PBX_TCP,
    PBX_TCP2,
    PBX_TCP_B,
    PBX_UDP,
    PHONE_MOVED,
    PHONE_TCP,
    PHONE_UDP,
    SERIAL,
    STRANGER,
    Out,
    feed,
    make_proxy,
    one,
    outs,
    register_pbx,
    request,
    response_to,
    route_user,
)

OUTBOUND = f"Route: <sip:{ADVERTISE};lr>"
PHONE_CONTACT = "Contact: <sip:200@192.168.1.20:5062>"
PBX_CONTACT = "Contact: <sip:201@10.1.1.1:5060;transport=tcp>"
SDP = (
    "v=0\r\no=- 1 1 IN IP4 192.168.1.20\r\ns=-\r\nc=IN IP4 192.168.1.20\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\n"
)


class World:
    """A proxy with the PBX phoned home, and the dead-flow set the test controls."""

    def __init__(self, pbx_flow: Flow = PBX_TCP):
        self.proxy, self.dead = make_proxy()
        self.pbx_flow = pbx_flow
        register_pbx(self.proxy, pbx_flow, now=0.0)

    def feed(self, data: bytes, flow: Flow, now: float = 1.0) -> list[Out]:
        return feed(self.proxy, data, flow, now)


@pytest.fixture
def world() -> World:
    return World()


def phone_invite(
    uri: str = f"sip:201@{PBX_DOMAIN}", *, flow: Flow = PHONE_UDP, branch: str = "z9hG4bKphone1",
    call_id: str = "call-1", headers: list[str] | None = None, **kw: object,
) -> bytes:
    return request(
        "INVITE", uri, flow=flow, via_host="192.168.1.20", via_port=5062, branch=branch,
        call_id=call_id, headers=[OUTBOUND, PHONE_CONTACT, "Content-Type: application/sdp"]
        if headers is None else headers, body=SDP, **kw,  # type: ignore[arg-type]
    )


def refusal(world: World, data: bytes, flow: Flow = PHONE_UDP) -> Out:
    """The request is answered to its sender, and nothing goes anywhere else."""
    resp = one(world.feed(data, flow))
    assert resp.flow == flow
    return resp


# ----------------------------------------------------------- phone → PBX INVITE


def test_invite_is_trying_at_once_and_forwarded_to_the_pbx(world: World) -> None:
    data = phone_invite()
    trying, fwd = world.feed(data, PHONE_UDP)

    assert trying.flow == PHONE_UDP
    assert trying.status == 100
    assert trying.msg.get("call-id") == "call-1@test"
    assert trying.msg.to().tag is None  # 100 carries no To tag
    tv = trying.msg.top_via()
    assert (tv.branch, tv.params["received"], tv.params["rport"]) == ("z9hG4bKphone1", "192.0.2.20", "40001")

    assert fwd.flow == PBX_TCP
    req = fwd.req
    assert (req.method, req.uri) == ("INVITE", f"sip:201@{PBX_DOMAIN}")
    ours, theirs = req.vias()
    assert (ours.transport, ours.host, ours.port) == ("TCP", ADVERTISE, 5060)
    assert ours.branch and ours.branch.startswith(OUR_BRANCH)
    assert world.proxy.tokens.back(ours.params["pf"] or "", 1.0) == PHONE_UDP
    # RFC 3581: the phone asked for rport, so both received and rport are set
    assert (theirs.host, theirs.port, theirs.branch) == ("192.168.1.20", 5062, "z9hG4bKphone1")
    assert theirs.params["received"] == "192.0.2.20"
    assert theirs.params["rport"] == "40001"
    assert req.get("max-forwards") == "69"
    assert not req.has("route")
    # double Record-Route: UDP on the phone's side, TCP on the PBX's side (RFC 5658),
    # each with the From tag of the request that made the route (ftag)
    rr = req.get_all("record-route")
    assert len(rr) == 2
    assert rr[0].endswith(f"@{ADVERTISE}:5060;transport=tcp;lr;ftag=ftag1>")
    assert rr[1].endswith(f"@{ADVERTISE}:5060;lr;ftag=ftag1>")
    assert route_user(rr[0]) == route_user(rr[1])
    # the phone sent it: kind "c", and the serial of the PBX
    # bound to this dialog: its Call-ID and the caller's From tag
    assert world.proxy.tokens.read(route_user(rr[0]), 1.0) == Claim(
        TOKEN_FROM_PHONE, PHONE_UDP, SERIAL, dialog_id("call-1@test", "ftag1"))
    # what the proxy does not touch goes on byte for byte
    assert req.body == SDP.encode()
    assert PHONE_CONTACT.encode() + b"\r\n" in fwd.data
    assert len(world.proxy.txns) == 1


def test_via_without_rport_gets_received_only(world: World) -> None:
    data = phone_invite(rport=False)
    _, fwd = world.feed(data, PHONE_UDP)
    theirs = fwd.req.vias()[1]
    assert theirs.params["received"] == "192.0.2.20"
    assert "rport" not in theirs.params


def test_single_record_route_when_both_sides_share_the_socket() -> None:
    world = World(PBX_UDP)
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    assert fwd.flow == PBX_UDP
    rr = fwd.req.get_all("record-route")
    assert len(rr) == 1
    assert rr[0] == f"<sip:{route_user(rr[0])}@{ADVERTISE}:5060;lr;ftag=ftag1>"
    assert fwd.req.top_via().transport == "UDP"


def test_missing_max_forwards_is_inserted(world: World) -> None:
    _, fwd = world.feed(phone_invite(max_forwards=None), PHONE_UDP)
    assert fwd.req.get("max-forwards") == "69"


def test_retransmitted_invite_gets_only_the_100_again(world: World) -> None:
    data = phone_invite()
    trying, _ = world.feed(data, PHONE_UDP, 1.0)
    again = one(world.feed(data, PHONE_UDP, 1.5))
    assert again.flow == PHONE_UDP
    assert again.data == trying.data
    assert len(world.proxy.txns) == 1
    assert world.proxy.counters.get("retransmissions_absorbed_total") == 1


def test_responses_go_back_to_the_phone_without_our_via(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    assert world.feed(response_to(fwd.data, 100, "Trying"), PBX_TCP, 1.1) == []

    ringing = one(world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.2))
    assert ringing.flow == PHONE_UDP
    assert ringing.status == 180
    assert [v.branch for v in ringing.msg.vias()] == ["z9hG4bKphone1"]

    ok_data = response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT])
    ok = one(world.feed(ok_data, PBX_TCP, 1.3))
    assert ok.flow == PHONE_UDP
    assert ok.status == 200
    assert [v.branch for v in ok.msg.vias()] == ["z9hG4bKphone1"]
    assert ok.msg.get_all("record-route") == fwd.req.get_all("record-route")
    # a retransmitted 2xx (the PBX has not seen the ACK yet) still reaches the phone
    assert one(world.feed(ok_data, PBX_TCP, 1.8)).status == 200
    # a retransmitted INVITE now gets the final answer
    assert one(world.feed(phone_invite(), PHONE_UDP, 1.9)).status == 200


def phone_ack(to_tag: str = "uas1", branch: str = "z9hG4bKphone1", call_id: str = "call-1") -> bytes:
    """The phone's ACK for a non-2xx final to phone_invite() (same branch, RFC 3261 §17.1.1.3)."""
    return request(
        "ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
        branch=branch, call_id=call_id, to_tag=to_tag, headers=[OUTBOUND],
    )


def test_retransmitted_non2xx_final_is_forwarded_and_reacked_end_to_end(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    busy = response_to(fwd.data, 486, "Busy Here")
    first = one(world.feed(busy, PBX_TCP, 1.1))
    assert (first.flow, first.status) == (PHONE_UDP, 486)
    ack = one(world.feed(phone_ack(), PHONE_UDP, 1.2))
    assert (ack.flow, ack.req.method) == (PBX_TCP, "ACK")
    assert ack.req.top_via().branch == fwd.req.top_via().branch
    # the ACK got lost: the PBX retransmits its 486, the phone sees it and ACKs again
    again = one(world.feed(busy, PBX_TCP, 1.6))
    assert (again.flow, again.data) == (PHONE_UDP, first.data)
    assert one(world.feed(phone_ack(), PHONE_UDP, 1.7)).flow == PBX_TCP
    # a retransmitted INVITE gets the 486 again, nothing goes to the PBX
    assert one(world.feed(phone_invite(), PHONE_UDP, 1.8)).data == first.data


def test_response_for_a_gone_transaction_is_forwarded_statelessly(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    ok_data = response_to(fwd.data, 200, "OK")
    world.feed(ok_data, PBX_TCP, 1.1)
    world.proxy.on_timer(1.1 + LINGER + 1)
    assert len(world.proxy.txns) == 0
    late = one(world.feed(ok_data, PBX_TCP, 40.0))
    assert (late.flow, late.status) == (PHONE_UDP, 200)


def test_response_to_a_dead_tcp_phone_is_dropped(world: World) -> None:
    _, fwd = world.feed(phone_invite(flow=PHONE_TCP), PHONE_TCP)
    world.dead.add(PHONE_TCP)
    assert world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP) == []
    assert world.proxy.counters.get("dropped_total", "response_flow_gone") == 1


# ------------------------------------------------------------------------ CANCEL


def phone_cancel(branch: str = "z9hG4bKphone1", call_id: str = "call-1") -> bytes:
    return request(
        "CANCEL", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
        branch=branch, call_id=call_id, headers=[OUTBOUND],
    )


def test_cancel_is_answered_and_forwarded_with_the_invite_branch(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.1)

    ok, cancel = world.feed(phone_cancel(), PHONE_UDP, 2.0)
    assert (ok.flow, ok.status, ok.msg.cseq) == (PHONE_UDP, 200, (1, "CANCEL"))
    assert cancel.flow == PBX_TCP
    c = cancel.req
    assert (c.method, c.uri) == ("CANCEL", fwd.req.uri)
    # RFC 3261 §9.1: the same top Via (so the same branch) as the INVITE it cancels
    assert [h.value for h in c.iter_headers("via")] == [next(fwd.req.iter_headers("via")).value]
    assert c.top_via().branch == fwd.req.top_via().branch
    for name in ("from", "to", "call-id"):
        assert c.get(name) == fwd.req.get(name)
    assert c.cseq == (1, "CANCEL")
    assert not c.has("route")
    assert not c.has("record-route")

    # the PBX's 200 to our CANCEL stops here; its 487 goes to the phone
    assert world.feed(response_to(cancel.data, 200, "OK"), PBX_TCP, 2.1) == []
    terminated = one(world.feed(response_to(fwd.data, 487, "Request Terminated"), PBX_TCP, 2.2))
    assert (terminated.flow, terminated.status) == (PHONE_UDP, 487)

    # the phone's ACK for the 487 reaches the PBX's INVITE server transaction
    ack = request(
        "ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
        branch="z9hG4bKphone1", call_id="call-1", to_tag="uas1", headers=[OUTBOUND],
    )
    fwd_ack = one(world.feed(ack, PHONE_UDP, 2.3))
    assert fwd_ack.flow == PBX_TCP
    assert fwd_ack.req.top_via().branch == fwd.req.top_via().branch


def test_second_cancel_is_answered_not_forwarded_again(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.1)
    assert len(world.feed(phone_cancel(), PHONE_UDP, 2.0)) == 2
    again = one(world.feed(phone_cancel(), PHONE_UDP, 2.5))
    assert again.status == 200


def test_cancel_before_any_provisional_waits_for_one(world: World) -> None:
    # RFC 3261 §9.1: the CANCEL goes downstream only once the callee answered 1xx.
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    ok = one(world.feed(phone_cancel(), PHONE_UDP, 1.5))
    assert (ok.flow, ok.status) == (PHONE_UDP, 200)
    cancel = one(world.feed(response_to(fwd.data, 100, "Trying"), PBX_TCP, 1.6))
    assert (cancel.flow, cancel.req.method) == (PBX_TCP, "CANCEL")
    assert cancel.req.top_via().branch == fwd.req.top_via().branch
    assert world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.7) != []  # the 180 goes up
    again = world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.8)
    assert [o.flow for o in again] == [PHONE_UDP]  # no second CANCEL



def test_cancel_after_final_is_answered_only(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    world.feed(response_to(fwd.data, 200, "OK"), PBX_TCP, 1.1)
    ok = one(world.feed(phone_cancel(), PHONE_UDP, 2.0))
    assert (ok.flow, ok.status) == (PHONE_UDP, 200)


def test_cancel_without_invite_is_481(world: World) -> None:
    resp = refusal(world, phone_cancel(branch="z9hG4bKnothing"))
    assert resp.status == 481


# ------------------------------------------------------ REGISTER through to the PBX


def phone_register(flow: Flow = PHONE_UDP) -> bytes:
    aor = f"sip:201@{PBX_DOMAIN}"
    return request(
        "REGISTER", f"sip:{PBX_DOMAIN}", flow=flow, via_host="192.168.1.20", via_port=5062,
        from_uri=aor, to_uri=aor, call_id="phone-reg",
        headers=[OUTBOUND, f"Contact: <sip:201@192.168.1.20:5062;transport={flow.transport}>",
                 "Expires: 600"],
    )


def register_phone(world: World, flow: Flow = PHONE_UDP) -> str:
    """The phone registers with the PBX through us; returns the Path value the PBX keeps."""
    fwd = one(world.feed(phone_register(flow), flow, 1.0))
    assert fwd.flow == world.pbx_flow
    path = fwd.req.get_all("path")
    assert len(path) == 1
    ok = one(world.feed(response_to(fwd.data, 200, "OK", headers=[f"Path: {path[0]}"]), world.pbx_flow))
    assert (ok.flow, ok.status) == (flow, 200)
    return path[0]


def test_phone_register_is_forwarded_with_path(world: World) -> None:
    fwd = one(world.feed(phone_register(), PHONE_UDP, 1.0))
    assert fwd.flow == PBX_TCP
    req = fwd.req
    assert req.uri == f"sip:{PBX_DOMAIN}"
    path = req.get_all("path")
    assert len(path) == 1
    # no ftag on a Path: requests along it always go to the phone
    assert path[0].startswith("<sip:") and path[0].endswith(f"@{ADVERTISE}:5060;transport=tcp;lr>")
    assert world.proxy.tokens.read(route_user(path[0]), 1.0) == Claim(TOKEN_PATH, PHONE_UDP, SERIAL, "")
    assert not req.has("record-route")
    assert not req.has("route")
    assert req.top_via().branch.startswith(OUR_BRANCH)  # type: ignore[union-attr]
    assert len(world.proxy.txns) == 0  # non-INVITE: stateless

    ok = one(world.feed(response_to(fwd.data, 200, "OK"), PBX_TCP))
    assert (ok.flow, ok.status) == (PHONE_UDP, 200)
    assert len(ok.msg.vias()) == 1


PBX_TAG = "pbxtag1"  # the PBX's From tag on the calls it makes


def pbx_invite(
    path: str, branch: str = "z9hG4bKpbx1", call_id: str = "call-in", flow: Flow = PBX_TCP,
) -> bytes:
    return request(
        "INVITE", "sip:201@192.168.1.20:5062", flow=flow, via_host="10.1.1.1", branch=branch,
        from_uri=f"sip:100@{PBX_DOMAIN}", from_tag=PBX_TAG, to_uri=f"sip:201@{PBX_DOMAIN}",
        call_id=call_id, headers=[f"Route: {path}", PBX_CONTACT, "Content-Type: application/sdp"],
        body=SDP,
    )


def test_pbx_invite_along_path_reaches_the_phone_flow(world: World) -> None:
    path = register_phone(world)
    trying, fwd = world.feed(pbx_invite(path), PBX_TCP, 2.0)
    assert (trying.flow, trying.status) == (PBX_TCP, 100)
    assert fwd.flow == PHONE_UDP
    req = fwd.req
    assert req.uri == "sip:201@192.168.1.20:5062"
    assert not req.has("route")
    ours = req.top_via()
    assert (ours.transport, ours.host, ours.port) == ("UDP", ADVERTISE, 5060)
    assert world.proxy.tokens.back(ours.params["pf"] or "", 1.0) == PBX_TCP
    rr = req.get_all("record-route")
    assert len(rr) == 2
    assert rr[0].endswith(f"@{ADVERTISE}:5060;lr;ftag={PBX_TAG}>")  # facing the phone (UDP)
    assert rr[1].endswith(f";transport=tcp;lr;ftag={PBX_TAG}>")  # facing the PBX (TCP)
    # the PBX sent it: kind "s"; the phone's flow is still the one the token names
    claim = world.proxy.tokens.read(route_user(rr[0]), 1.0)
    assert (claim.kind, claim.flow, claim.serial) == (TOKEN_FROM_PBX, PHONE_UDP, SERIAL)
    assert req.get("max-forwards") == "69"

    ringing = one(world.feed(response_to(fwd.data, 180, "Ringing"), PHONE_UDP, 2.1))
    assert (ringing.flow, ringing.status) == (PBX_TCP, 180)
    assert [v.branch for v in ringing.msg.vias()] == ["z9hG4bKpbx1"]


def test_pbx_invite_to_a_live_tcp_phone_flow_is_forwarded(world: World) -> None:
    path = register_phone(world, PHONE_TCP)
    _, fwd = world.feed(pbx_invite(path), PBX_TCP, 2.0)
    assert fwd.flow == PHONE_TCP
    # both sides TCP on the same socket: one Record-Route
    assert len(fwd.req.get_all("record-route")) == 1


def test_pbx_invite_to_a_dead_tcp_phone_flow_is_430(world: World) -> None:
    path = register_phone(world, PHONE_TCP)
    world.dead.add(PHONE_TCP)
    resp = refusal(world, pbx_invite(path), PBX_TCP)
    assert resp.status == 430
    assert world.proxy.counters.get("flow_failed_total") == 1


def test_dead_udp_phone_flow_cannot_be_known_and_is_tried(world: World) -> None:
    path = register_phone(world, PHONE_UDP)
    world.dead.add(PHONE_UDP)
    assert [o.flow for o in world.feed(pbx_invite(path), PBX_TCP, 2.0)] == [PBX_TCP, PHONE_UDP]


# ------------------------------------------------------------------ in-dialog

PBX_TARGET = "sip:201@10.1.1.1:5060;transport=tcp"  # PBX_CONTACT's URI
PHONE_TARGET = "sip:200@192.168.1.20:5062"  # PHONE_CONTACT's URI


def dialog_request(
    method: str, route_set: list[str], *, flow: Flow, uri: str, from_tag: str, to_tag: str,
    cseq: int = 2, call_id: str = "call-1", branch: str | None = None,
) -> bytes:
    """A request inside a dialog: From carries the sender's own tag, To the peer's."""
    return request(
        method, uri, flow=flow, via_host="10.1.1.1" if flow.remote_ip.startswith("203.") else "192.168.1.20",
        branch=branch, from_tag=from_tag, to_tag=to_tag, call_id=call_id, cseq=cseq,
        headers=[f"Route: {', '.join(route_set)}"] if route_set else [],
    )


def phone_call(world: World, invite: bytes | None = None) -> tuple[list[str], list[str]]:
    """The phone calls (From tag ftag1), the PBX answers (To tag uas1).

    Returns the route sets of the phone (UAC: Record-Route reversed, RFC 3261
    §12.1.2) and of the PBX (UAS: as is, §12.1.1).
    """
    _, fwd = world.feed(invite or phone_invite(), PHONE_UDP, 1.0)
    ok = one(world.feed(response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT]), world.pbx_flow, 1.1))
    assert (ok.flow, ok.status) == (PHONE_UDP, 200)
    rr = ok.msg.get_all("record-route")
    return list(reversed(rr)), rr


def pbx_call(world: World, phone_tag: str = "ph-tag") -> tuple[list[str], list[str]]:
    """The PBX calls the registered phone along its Path; the phone answers.

    Returns the route sets of the PBX (UAC) and of the phone (UAS).
    """
    path = register_phone(world)
    _, fwd = world.feed(pbx_invite(path, call_id="call-in"), PBX_TCP, 2.0)
    assert fwd.flow == PHONE_UDP
    ok = one(world.feed(response_to(fwd.data, 200, "OK", to_tag=phone_tag, headers=[PHONE_CONTACT]),
                        PHONE_UDP, 2.1))
    assert (ok.flow, ok.status) == (PBX_TCP, 200)
    rr = ok.msg.get_all("record-route")
    return list(reversed(rr)), rr


def test_in_dialog_requests_follow_the_record_route(world: World) -> None:
    phone_routes, pbx_routes = phone_call(world)

    ack = one(world.feed(dialog_request("ACK", phone_routes, flow=PHONE_UDP, uri=PBX_TARGET, cseq=1,
                                        from_tag="ftag1", to_tag="uas1"), PHONE_UDP, 1.2))
    assert ack.flow == PBX_TCP
    assert ack.req.uri == PBX_TARGET
    assert not ack.req.has("route")
    assert ack.req.top_via().branch.startswith(OUR_BRANCH)  # type: ignore[union-attr]

    bye = one(world.feed(dialog_request("BYE", pbx_routes, flow=PBX_TCP, uri=PHONE_TARGET,
                                        from_tag="uas1", to_tag="ftag1"), PBX_TCP, 5.0))
    assert bye.flow == PHONE_UDP
    assert bye.req.method == "BYE"
    assert not bye.req.has("route")
    assert bye.req.get("max-forwards") == "69"
    bye_ok = one(world.feed(response_to(bye.data, 200, "OK"), PHONE_UDP, 5.1))
    assert (bye_ok.flow, bye_ok.status) == (PBX_TCP, 200)

    bye2 = one(world.feed(dialog_request("BYE", phone_routes, flow=PHONE_UDP, uri=PBX_TARGET, cseq=3,
                                         from_tag="ftag1", to_tag="uas1"), PHONE_UDP, 6.0))
    assert bye2.flow == PBX_TCP
    assert not bye2.req.has("route")
    bye2_ok = one(world.feed(response_to(bye2.data, 200, "OK"), PBX_TCP, 6.1))
    assert (bye2_ok.flow, bye2_ok.status) == (PHONE_UDP, 200)


@pytest.mark.parametrize("pbx_flow", [PBX_TCP_B, PBX_TCP2], ids=["same-ip-new-port", "other-ip"])
def test_bye_from_the_pbx_on_another_connection_reaches_the_phone(world: World, pbx_flow: Flow) -> None:
    # Direction comes from ftag, not from the source flow: the PBX's BYE carries
    # its own From tag (uas1), not the dialog creator's (ftag1).
    _, pbx_routes = phone_call(world)
    bye = one(world.feed(dialog_request("BYE", pbx_routes, flow=pbx_flow, uri=PHONE_TARGET,
                                        from_tag="uas1", to_tag="ftag1"), pbx_flow, 5.0))
    assert (bye.flow, bye.req.method) == (PHONE_UDP, "BYE")
    assert not bye.req.has("route")
    # the 200 goes back on the connection the BYE came in on
    bye_ok = one(world.feed(response_to(bye.data, 200, "OK"), PHONE_UDP, 5.1))
    assert (bye_ok.flow, bye_ok.status) == (pbx_flow, 200)


def test_bye_from_the_phone_on_a_new_network_reaches_the_pbx(world: World) -> None:
    phone_routes, _ = phone_call(world)
    bye = one(world.feed(dialog_request("BYE", phone_routes, flow=PHONE_MOVED, uri=PBX_TARGET,
                                        from_tag="ftag1", to_tag="uas1"), PHONE_MOVED, 5.0))
    assert (bye.flow, bye.req.method) == (PBX_TCP, "BYE")
    bye_ok = one(world.feed(response_to(bye.data, 200, "OK"), PBX_TCP, 5.1))
    assert (bye_ok.flow, bye_ok.status) == (PHONE_MOVED, 200)


def test_pbx_created_dialog_bye_from_the_phone_reaches_the_pbx(world: World) -> None:
    _, phone_routes = pbx_call(world)
    bye = one(world.feed(dialog_request("BYE", phone_routes, flow=PHONE_UDP, uri=PBX_TARGET,
                                        from_tag="ph-tag", to_tag=PBX_TAG, call_id="call-in"),
                         PHONE_UDP, 5.0))
    assert (bye.flow, bye.req.method) == (PBX_TCP, "BYE")
    assert not bye.req.has("route")
    bye_ok = one(world.feed(response_to(bye.data, 200, "OK"), PBX_TCP, 5.1))
    assert (bye_ok.flow, bye_ok.status) == (PHONE_UDP, 200)


@pytest.mark.parametrize("pbx_flow", [PBX_TCP, PBX_TCP_B], ids=["registered-flow", "second-flow"])
def test_pbx_created_dialog_bye_from_the_pbx_reaches_the_phone(world: World, pbx_flow: Flow) -> None:
    pbx_routes, _ = pbx_call(world)
    bye = one(world.feed(dialog_request("BYE", pbx_routes, flow=pbx_flow, uri=PHONE_TARGET,
                                        from_tag=PBX_TAG, to_tag="ph-tag", call_id="call-in"),
                         pbx_flow, 5.0))
    assert (bye.flow, bye.req.method) == (PHONE_UDP, "BYE")
    assert not bye.req.has("route")
    bye_ok = one(world.feed(response_to(bye.data, 200, "OK"), PHONE_UDP, 5.1))
    assert (bye_ok.flow, bye_ok.status) == (pbx_flow, 200)


def test_pbx_created_dialog_bye_from_the_phone_on_a_new_network_reaches_the_pbx(world: World) -> None:
    _, phone_routes = pbx_call(world)
    bye = one(world.feed(dialog_request("BYE", phone_routes, flow=PHONE_MOVED, uri=PBX_TARGET,
                                        from_tag="ph-tag", to_tag=PBX_TAG, call_id="call-in"),
                         PHONE_MOVED, 5.0))
    assert bye.flow == PBX_TCP


def test_route_without_ftag_falls_back_to_the_source_flow(world: World) -> None:
    # An RFC 2543 phone sends no From tag: the Record-Route has no ftag, and the
    # direction is "from the PBX's registered flow → phone, else → PBX".
    invite = phone_invite().replace(b";tag=ftag1", b"")
    phone_routes, pbx_routes = phone_call(world, invite)
    assert all(r.endswith(";lr>") and "ftag" not in r for r in pbx_routes)
    bye = one(world.feed(dialog_request("BYE", pbx_routes, flow=PBX_TCP, uri=PHONE_TARGET,
                                        from_tag="uas1", to_tag="x"), PBX_TCP, 5.0))
    assert bye.flow == PHONE_UDP
    bye2 = one(world.feed(dialog_request("BYE", phone_routes, flow=PHONE_UDP, uri=PBX_TARGET,
                                         from_tag="x", to_tag="uas1", cseq=3), PHONE_UDP, 6.0))
    assert bye2.flow == PBX_TCP


def test_path_token_back_to_its_own_source_is_a_loop(world: World) -> None:
    path = register_phone(world)
    data = request("MESSAGE", "sip:201@192.168.1.20", flow=PHONE_UDP, via_host="192.168.1.20",
                   headers=[f"Route: {path}"])
    assert refusal(world, data).status == 482
    # an INVITE too, and it leaves no transaction behind
    assert refusal(world, pbx_invite(path, flow=PHONE_UDP)).status == 482
    assert len(world.proxy.txns) == 0


def test_in_dialog_from_phone_while_pbx_offline_is_480(world: World) -> None:
    phone_routes, _ = phone_call(world)
    world.proxy.on_flow_closed(PBX_TCP)
    bye = dialog_request("BYE", phone_routes, flow=PHONE_UDP, uri=PBX_TARGET, from_tag="ftag1",
                         to_tag="uas1")
    assert refusal(world, bye).status == 480


# --------------------------------------------------------------- refusals


def test_unknown_serial_answers_like_an_offline_one(world: World) -> None:
    unknown = refusal(world, phone_invite("sip:201@5555555555.relay.test", branch="z9hG4bKu"))
    offline = refusal(world, phone_invite(f"sip:201@{OTHER_SERIAL}.relay.test", branch="z9hG4bKo"))
    assert (unknown.status, unknown.msg.reason) == (offline.status, offline.msg.reason) == (
        480, "Temporarily Unavailable")
    assert len(unknown.data) - len(offline.data) == len("5555555555") - len(OTHER_SERIAL)


def test_known_serial_not_registered_is_480(world: World) -> None:
    assert refusal(world, phone_invite(f"sip:201@{OTHER_SERIAL}.relay.test")).status == 480


@pytest.mark.parametrize("uri", [
    "sip:x@example.com",
    "sip:201@192.0.2.50:5060",
    f"sip:201@a.{PBX_DOMAIN}",  # not a direct sub-domain of ours
    f"sip:201@{PBX_DOMAIN}.example.com",
])
def test_foreign_destination_is_403(world: World, uri: str) -> None:
    assert refusal(world, phone_invite(uri)).status == 403
    assert world.proxy.counters.get("forbidden_total", "foreign_domain") == 1


def test_pbx_calling_its_own_domain_is_a_loop(world: World) -> None:
    data = request("INVITE", f"sip:201@{PBX_DOMAIN}", flow=PBX_TCP)
    assert refusal(world, data, PBX_TCP).status == 482


def test_forged_token_is_403(world: World) -> None:
    forged = f"Route: <sip:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@{ADVERTISE};lr>"
    data = phone_invite(headers=[forged])
    assert refusal(world, data).status == 403
    assert world.proxy.counters.get("forbidden_total", "bad_token") == 1


def test_altered_token_is_403(world: World) -> None:
    path = register_phone(world)
    token = route_user(path)
    i = len(token) // 2
    altered = path.replace(token, token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:])
    resp = refusal(world, pbx_invite(altered), PBX_TCP)
    assert resp.status == 403


def test_path_token_is_refused_to_anyone_but_the_pbx(world: World) -> None:
    # A Path token leads to the flow signed into it, and only the PBX (from its
    # registered address, on any of its connections) may use it.
    path = register_phone(world)
    data = request("MESSAGE", "sip:201@192.0.2.250", flow=STRANGER, headers=[f"Route: {path}"])
    assert refusal(world, data, STRANGER).status == 403
    data = request("MESSAGE", "sip:201@192.0.2.250", flow=PBX_TCP, headers=[f"Route: {path}"])
    out = one(world.feed(data, PBX_TCP))
    assert out.flow == PHONE_UDP
    assert out.req.uri == "sip:201@192.0.2.250"  # the Request-URI does not pick the target


def test_record_route_token_never_leads_to_a_third_flow(world: World) -> None:
    # Whatever From tag a stranger puts in, a dialog token leads to the phone it
    # names or to the PBX of its serial.
    _, pbx_routes = phone_call(world)
    for from_tag, to_tag in (("ftag1", "t"), ("uas1", "ftag1")):
        data = dialog_request("MESSAGE", pbx_routes, flow=STRANGER, uri="sip:x@192.0.2.250",
                              from_tag=from_tag, to_tag=to_tag)
        assert one(world.feed(data, STRANGER)).flow in (PHONE_UDP, PBX_TCP)


def test_record_route_token_works_only_in_its_own_dialog(world: World) -> None:
    """A token copied out of a dialog (another Call-ID, or neither tag the dialog's
    creator's) routes nothing: 403 to the sender, nothing anywhere else."""
    _, pbx_routes = phone_call(world)
    for call_id, from_tag, to_tag in (("call-1", "other", "t"), ("other-call", "ftag1", "uas1")):
        data = dialog_request("BYE", pbx_routes, flow=STRANGER, uri="sip:x@192.0.2.250",
                              from_tag=from_tag, to_tag=to_tag, call_id=call_id)
        assert refusal(world, data, STRANGER).status == 403
    assert world.proxy.counters.get("forbidden_total", "token_other_dialog") == 2


def test_record_route_token_expires_after_a_day(world: World) -> None:
    phone_routes, _ = phone_call(world)  # at t = 1 s
    register_pbx(world.proxy, PBX_TCP, now=85_000.0)  # the PBX stayed registered all along

    def bye(cseq: int) -> bytes:
        return dialog_request("BYE", phone_routes, flow=PHONE_UDP, uri=PBX_TARGET, from_tag="ftag1",
                              to_tag="uas1", cseq=cseq)

    assert one(world.feed(bye(3), PHONE_UDP, 86_000.0)).flow == PBX_TCP  # a day, rounded up to the hour
    late = one(world.feed(bye(5), PHONE_UDP, 90_001.0))
    assert (late.flow, late.status) == (PHONE_UDP, 403)
    assert world.proxy.counters.get("forbidden_total", "token_expired") == 1


def test_max_forwards_zero_is_483(world: World) -> None:
    assert refusal(world, phone_invite(max_forwards=0)).status == 483


def test_max_forwards_zero_to_us_is_still_answered(world: World) -> None:
    data = request("OPTIONS", "sip:relay.test", flow=PHONE_UDP, max_forwards=0)
    assert refusal(world, data).status == 200


def test_proxy_require_is_420_with_unsupported(world: World) -> None:
    data = phone_invite(headers=[OUTBOUND, "Proxy-Require: foo, bar"])
    resp = refusal(world, data)
    assert resp.status == 420
    assert resp.msg.get("unsupported") == "foo, bar"


def test_tel_uri_is_416(world: World) -> None:
    assert refusal(world, phone_invite("tel:+15551234567")).status == 416


def test_request_uri_with_headers_is_400(world: World) -> None:
    assert refusal(world, phone_invite(f"sip:201@{PBX_DOMAIN}?Subject=hi")).status == 400


@pytest.mark.parametrize("uri", ["sip:relay.test", f"sip:{ADVERTISE}", f"sip:{ADVERTISE}:5060"])
def test_options_to_us_is_200(world: World, uri: str) -> None:
    resp = refusal(world, request("OPTIONS", uri, flow=PHONE_UDP))
    assert resp.status == 200
    assert "INVITE" in (resp.msg.get("allow") or "")
    assert resp.msg.to().tag


def test_invite_to_us_is_404(world: World) -> None:
    assert refusal(world, phone_invite("sip:relay.test")).status == 404


@pytest.mark.parametrize("uri,status", [
    ("sip:x@example.com", 403),
    ("sip:201@5555555555.relay.test", 480),
    (f"sip:201@{OTHER_SERIAL}.relay.test", 480),
    ("tel:+15551234567", 416),
])
def test_refused_invite_is_stateless_and_a_retransmission_is_refused_again(
    world: World, uri: str, status: int,
) -> None:
    data = phone_invite(uri)
    first = refusal(world, data)
    assert first.status == status
    assert len(world.proxy.txns) == 0
    again = refusal(world, data)
    assert (again.status, again.msg.top_via().branch) == (status, "z9hG4bKphone1")
    assert len(world.proxy.txns) == 0
    assert world.proxy.counters.get("retransmissions_absorbed_total") == 0
    assert world.proxy.counters.get("responses_sent_total", f"{status}") == 2


def test_ack_to_a_refusal_with_nowhere_to_go_is_dropped(world: World) -> None:
    for uri in ("sip:x@example.com", "sip:201@5555555555.relay.test", f"sip:201@{OTHER_SERIAL}.relay.test"):
        data = phone_invite(uri)
        refused = refusal(world, data)
        to_tag = refused.msg.to().tag
        assert to_tag
        ack = request(
            "ACK", uri, flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
            branch="z9hG4bKphone1", call_id="call-1", to_tag=to_tag, headers=[OUTBOUND],
        )
        assert world.feed(ack, PHONE_UDP, 1.5) == []


def test_ack_to_a_refusal_ends_at_the_relay(world: World) -> None:
    # 480 while OTHER_SERIAL is offline; it phones home before the phone's ACK
    # arrives. No state was kept, but the ACK carries the To tag the relay derived
    # from the INVITE: it acknowledges the relay's own answer and ends there
    # (RFC 3261 §17.1.1.3, as Kamailio's sl), never routed to the PBX nor answered.
    refused = refusal(world, phone_invite(f"sip:201@{OTHER_SERIAL}.relay.test"))
    assert refused.status == 480
    register_pbx(world.proxy, PBX_UDP, now=1.0, serial=OTHER_SERIAL, secret="other")
    ack = request(
        "ACK", f"sip:201@{OTHER_SERIAL}.relay.test", flow=PHONE_UDP, via_host="192.168.1.20",
        via_port=5062, branch="z9hG4bKphone1", call_id="call-1", to_tag=refused.msg.to().tag,
        headers=[OUTBOUND],
    )
    assert world.feed(ack, PHONE_UDP, 1.5) == []
    assert world.proxy.counters.get("dropped_total", "ack_of_own_refusal") == 1
    assert len(world.proxy.txns) == 0


def test_cancel_of_a_refused_invite_is_481(world: World) -> None:
    refusal(world, phone_invite("sip:201@5555555555.relay.test"))
    assert refusal(world, phone_cancel()).status == 481


@pytest.mark.parametrize("uri,headers", [
    ("sip:x@example.com", [OUTBOUND]),
    ("tel:+15551234567", []),
    (f"sip:201@{PBX_DOMAIN}?Subject=hi", []),
    ("sip:relay.test", []),
    ("sip:201@5555555555.relay.test", []),
    (f"sip:201@{OTHER_SERIAL}.relay.test", []),
    (f"sip:201@{PBX_DOMAIN}", ["Proxy-Require: foo"]),
    (f"sip:201@{PBX_DOMAIN}", [f"Route: <sip:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@{ADVERTISE};lr>"]),
])
def test_ack_is_never_answered(world: World, uri: str, headers: list[str]) -> None:
    ack = request("ACK", uri, flow=PHONE_UDP, to_tag="t1", headers=headers)
    assert world.feed(ack, PHONE_UDP) == []


def test_ack_with_max_forwards_zero_is_not_answered(world: World) -> None:
    ack = request("ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, to_tag="t1", max_forwards=0)
    assert world.feed(ack, PHONE_UDP) == []


# ------------------------------------------------------------------ responses


def test_response_with_a_foreign_via_is_dropped(world: World) -> None:
    data = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKsomeone\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.20;branch=z9hG4bKx\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert world.feed(data, PBX_TCP) == []
    assert world.proxy.counters.get("dropped_total", "response_not_ours") == 1


def test_response_with_a_bad_flow_token_is_dropped(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    pf = fwd.req.top_via().params["pf"] or ""
    i = len(pf) // 2
    bad = pf[:i] + ("A" if pf[i] != "A" else "B") + pf[i + 1:]
    data = response_to(fwd.data, 180, "Ringing").replace(pf.encode(), bad.encode())
    assert world.feed(data, PBX_TCP) == []
    assert world.proxy.counters.get("dropped_total", "response_bad_token") == 1
    no_pf = response_to(fwd.data, 180, "Ringing").replace(b";pf=" + pf.encode(), b"")
    assert world.feed(no_pf, PBX_TCP) == []


def test_response_with_our_via_only_is_dropped(world: World) -> None:
    # e.g. the answer to a CANCEL the relay generated itself
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    lone = response_to(fwd.data, 200, "OK")
    req = fwd.req
    top = next(h for h in req.headers if h.name == "via").value
    lines = [ln for ln in lone.split(b"\r\n") if not ln.startswith(b"Via:")]
    lines.insert(1, b"Via: " + top.encode())
    assert world.feed(b"\r\n".join(lines), PBX_TCP) == []


# ---------------------------------------------------------------------- timers


def test_invite_to_udp_pbx_is_retransmitted_until_provisional() -> None:
    world = World(PBX_UDP)
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 0.0)
    proxy = world.proxy
    assert proxy.on_timer(0.0) == []  # the registry sweep
    assert proxy.next_timer() == pytest.approx(T1)
    assert proxy.on_timer(0.4) == []
    sent = []
    for now in (0.5, 1.0, 1.5, 2.5, 3.5):
        sent += [(now, o) for o in outs(proxy.on_timer(now))]
    assert [t for t, _ in sent] == [0.5, 1.5, 3.5]
    for _, o in sent:
        assert o.flow == PBX_UDP
        assert o.data == fwd.data
    assert proxy.next_timer() == pytest.approx(4.5)  # the registry sweep comes before Timer A (7.5)
    assert proxy.counters.get("invite_retransmissions_total") == 3

    one(world.feed(response_to(fwd.data, 180, "Ringing"), PBX_UDP, 4.0))
    for now in (7.5, 15.5, 31.5, 40.0):
        assert proxy.on_timer(now) == []  # Timer B no longer applies once it rang

    world.feed(response_to(fwd.data, 200, "OK"), PBX_UDP, 50.0)
    assert len(proxy.txns) == 1
    assert proxy.on_timer(50.0 + LINGER - 0.1) == []
    assert len(proxy.txns) == 1
    proxy.on_timer(50.0 + LINGER)
    assert len(proxy.txns) == 0


def test_100_from_udp_pbx_stops_retransmissions_and_timer_b() -> None:
    world = World(PBX_UDP)
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 0.0)
    proxy = world.proxy
    assert len(outs(proxy.on_timer(0.5))) == 1
    assert world.feed(response_to(fwd.data, 100, "Trying"), PBX_UDP, 0.7) == []
    for now in (1.5, 3.5, 7.5, 15.5, 31.5, TIMER_B, 100.0):
        assert proxy.on_timer(now) == []
    # no final within Timer C: CANCEL downstream (it did answer), 408 upstream
    out = outs(proxy.on_timer(TIMER_C))
    assert [(o.flow, o.msg.cseq[1]) for o in out] == [(PBX_UDP, "CANCEL"), (PHONE_UDP, "INVITE")]
    assert out[1].status == 408


def test_late_provisional_does_not_replace_the_final(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    world.feed(response_to(fwd.data, 200, "OK"), PBX_TCP, 1.1)
    world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.2)
    assert one(world.feed(phone_invite(), PHONE_UDP, 1.5)).status == 200


def test_invite_to_udp_pbx_with_no_answer_times_out_with_408() -> None:
    world = World(PBX_UDP)
    trying, fwd = world.feed(phone_invite(), PHONE_UDP, 0.0)
    proxy = world.proxy
    retransmits: list[float] = []
    timeout: list[Out] = []
    now = 0.0
    while now < TIMER_B + 1 and not timeout:
        now = round(now + 0.25, 2)
        for o in outs(proxy.on_timer(now)):
            if o.flow == PBX_UDP:
                assert o.data == fwd.data
                retransmits.append(now)
            else:
                timeout.append(o)
    assert retransmits == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert now == TIMER_B
    resp = one(timeout)
    assert resp.flow == PHONE_UDP
    assert resp.status == 408
    assert resp.msg.top_via().branch == "z9hG4bKphone1"
    assert resp.msg.get("call-id") == trying.msg.get("call-id")
    assert resp.msg.to().tag
    assert proxy.counters.get("invite_timeouts_total") == 1
    # a retransmitted INVITE now gets the 408, nothing goes to the PBX
    assert one(world.feed(phone_invite(), PHONE_UDP, TIMER_B + 0.5)).status == 408
    assert proxy.on_timer(TIMER_B + LINGER - 0.1) == []
    assert len(proxy.txns) == 1
    proxy.on_timer(TIMER_B + LINGER)
    assert len(proxy.txns) == 0


def test_invite_to_tcp_pbx_is_not_retransmitted_and_timer_c_cancels(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 0.0)
    proxy = world.proxy
    for now in (0.5, 1.5, 3.5, TIMER_B + 1):
        assert proxy.on_timer(now) == []
    world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 2.0)
    # a provisional other than 100 restarts Timer C (RFC 3261 §16.7 step 2)
    assert proxy.on_timer(TIMER_C) == []
    assert proxy.on_timer(2.0 + TIMER_C - 0.1) == []
    out = outs(proxy.on_timer(2.0 + TIMER_C))
    assert [(o.flow, o.msg.cseq[1]) for o in out] == [(PBX_TCP, "CANCEL"), (PHONE_UDP, "INVITE")]
    assert out[0].req.top_via().branch == fwd.req.top_via().branch
    assert out[1].status == 408
    # the PBX's 487 after our CANCEL is not passed on (the phone has its 408):
    # the relay ACKs it itself (RFC 3261 §17.1.1.3)
    terminated = response_to(fwd.data, 487, "Request Terminated")
    ack = one(world.feed(terminated, PBX_TCP, TIMER_C + 2.1))
    assert_relay_ack(ack, fwd)
    # a retransmitted 487 is ACKed again, still not passed on
    assert one(world.feed(terminated, PBX_TCP, TIMER_C + 2.5)).data == ack.data
    # the phone's ACK for our 408 is absorbed, not forwarded
    assert world.feed(phone_ack(to_tag=out[1].msg.to().tag or ""), PHONE_UDP, TIMER_C + 2.6) == []
    assert proxy.counters.get("invite_timeouts_total") == 1
    proxy.on_timer(2.0 + TIMER_C + LINGER)
    assert len(proxy.txns) == 0


def assert_relay_ack(ack: Out, fwd: Out, to_tag: str = "uas1") -> None:
    """The relay's own ACK for a non-2xx to the INVITE it forwarded (``fwd``):
    same Request-URI, top Via (branch), From, Call-ID and CSeq number; the To of
    the response, with the callee's tag; CSeq method ACK (RFC 3261 §17.1.1.3)."""
    assert ack.flow == fwd.flow
    a, inv = ack.req, fwd.req
    assert (a.method, a.uri) == ("ACK", inv.uri)
    assert [h.value for h in a.iter_headers("via")] == [next(inv.iter_headers("via")).value]
    for name in ("from", "call-id"):
        assert a.get(name) == inv.get(name)
    assert a.to().tag == to_tag
    assert a.to().uri == inv.to().uri
    assert a.cseq == (inv.cseq[0], "ACK")
    assert f"CSeq: {inv.cseq[0]} ACK\r\n".encode() in ack.data
    assert not a.has("record-route")
    assert a.body == b""


def test_after_timer_b_408_a_late_final_is_acked_by_the_relay() -> None:
    world = World(PBX_UDP)
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 0.0)
    proxy = world.proxy
    timeout = [o for o in outs(proxy.on_timer(TIMER_B)) if o.flow == PHONE_UDP]
    assert one(timeout).status == 408
    busy = response_to(fwd.data, 486, "Busy Here")
    ack = one(world.feed(busy, PBX_UDP, TIMER_B + 1))
    assert_relay_ack(ack, fwd)
    # a late provisional is not passed on either
    assert world.feed(response_to(fwd.data, 180, "Ringing"), PBX_UDP, TIMER_B + 1.5) == []
    assert world.feed(phone_ack(to_tag=timeout[0].msg.to().tag or ""), PHONE_UDP, TIMER_B + 2) == []
    assert proxy.counters.get("responses_forwarded_total") == 0


def test_ack_for_a_forwarded_final_is_not_absorbed_like_the_ack_for_our_408(world: World) -> None:
    # only local_final absorbs the ACK: an ACK for the PBX's own 486 goes through
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    world.feed(response_to(fwd.data, 486, "Busy Here"), PBX_TCP, 1.1)
    ack = one(world.feed(phone_ack(), PHONE_UDP, 1.2))
    assert (ack.flow, ack.req.method, ack.req.to().tag) == (PBX_TCP, "ACK", "uas1")


def test_refused_invites_keep_no_state(world: World) -> None:
    for i in range(20):
        refusal(world, phone_invite("sip:x@example.com", branch=f"z9hG4bKa{i}", call_id=f"c{i}"))
        refusal(world, phone_invite("tel:+1555", branch=f"z9hG4bKb{i}", call_id=f"d{i}"))
    assert len(world.proxy.txns) == 0
    world.proxy.on_timer(2.0)
    assert world.proxy.next_timer() == pytest.approx(3.0)  # only the registry sweep


# -------------------------------------------------------------------- overload


def test_too_many_invite_transactions_is_503_with_retry_after(world: World) -> None:
    world.proxy.invites.max_transactions = 2
    forwarded = []
    for i in range(2):
        trying, fwd = world.feed(phone_invite(branch=f"z9hG4bKov{i}", call_id=f"ov{i}"), PHONE_UDP, 1.0)
        assert (trying.status, fwd.flow) == (100, PBX_TCP)
        forwarded.append(fwd)
    assert len(world.proxy.txns) == 2

    busy = refusal(world, phone_invite(branch="z9hG4bKov2", call_id="ov2"))
    assert busy.status == 503
    assert busy.msg.get("retry-after") == "5"
    assert busy.msg.top_via().branch == "z9hG4bKov2"
    assert len(world.proxy.txns) == 2
    assert world.proxy.counters.get("overload_total", "total") == 1
    # the INVITEs in flight go on: a retransmission is still absorbed
    assert one(world.feed(phone_invite(branch="z9hG4bKov0", call_id="ov0"), PHONE_UDP, 1.5)).status == 100
    # requests other than INVITE are stateless and still forwarded
    msg = one(world.feed(request("MESSAGE", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP), PHONE_UDP))
    assert msg.flow == PBX_TCP
    # once the transactions end and linger out, INVITEs are taken again
    for fwd in forwarded:
        world.feed(response_to(fwd.data, 486, "Busy Here"), PBX_TCP, 2.0)
    world.proxy.on_timer(2.0 + LINGER)
    assert len(world.proxy.txns) == 0
    trying, fwd = world.feed(phone_invite(branch="z9hG4bKov3", call_id="ov3"), PHONE_UDP, 40.0)
    assert (trying.status, fwd.flow) == (100, PBX_TCP)


def test_overload_refusal_of_a_pbx_invite_along_path(world: World) -> None:
    path = register_phone(world)
    world.proxy.invites.max_transactions = 0
    resp = refusal(world, pbx_invite(path), PBX_TCP)
    assert resp.status == 503
    assert resp.msg.get("retry-after")


def test_next_timer_is_bounded_by_the_registry_sweep(world: World) -> None:
    world.proxy.on_timer(10.0)
    assert world.proxy.next_timer() == pytest.approx(11.0)


def test_parse_error_request_is_answered(world: World) -> None:
    data = phone_invite().replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1)
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    resp = one(outs(world.proxy.on_parse_error(info.value, PHONE_UDP)))
    assert (resp.flow, resp.status) == (PHONE_UDP, 505)
    assert isinstance(info.value.message, Request)


def test_invented_methods_share_one_counter(world: World) -> None:
    for i in range(50):
        world.feed(request(f"X{i}", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP), PHONE_UDP)
    methods = [label for m, label, _ in world.proxy.counters.items() if m.name == "requests_in_total"]
    assert world.proxy.counters.get("requests_in_total", "other") == 50
    assert world.proxy.counters.get("requests_in_total", "REGISTER") == 2  # the PBX's, in World()
    assert sorted(methods) == ["REGISTER", "other"]


def test_unknown_method_is_forwarded_to_the_pbx(world: World) -> None:
    fwd = one(world.feed(request("FOO", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP), PHONE_UDP))
    assert (fwd.flow, fwd.req.method) == (PBX_TCP, "FOO")


def test_cseq_method_is_case_sensitive(world: World) -> None:
    # RFC 3261 §7.1: method names are case-sensitive; "invite" is an extension
    # method, not INVITE, and so is a CSeq that says "invite".
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    lower = response_to(fwd.data, 486, "Busy Here").replace(b"CSeq: 1 INVITE", b"CSeq: 1 invite")
    assert parse_message(lower).cseq == (1, "invite")
    out = one(world.feed(lower, PBX_TCP, 1.1))  # relayed statelessly along the Via …
    assert out.flow == PHONE_UDP
    # … but not taken as the INVITE's final: the transaction still waits
    assert one(world.feed(phone_invite(), PHONE_UDP, 1.2)).status == 100

    ext = request("invite", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, headers=[OUTBOUND])
    fwd_ext = one(world.feed(ext, PHONE_UDP, 2.0))  # no 100, no transaction, no Record-Route
    assert (fwd_ext.flow, fwd_ext.req.method, fwd_ext.req.cseq) == (PBX_TCP, "invite", (1, "invite"))
    assert not fwd_ext.req.has("record-route")
    assert len(world.proxy.txns) == 1


# ------------------------------------- bugs found by these tests, now fixed


def test_2xx_after_our_408_is_still_forwarded_to_the_caller(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 0.0)
    world.feed(response_to(fwd.data, 180, "Ringing"), PBX_TCP, 1.0)
    out = outs(world.proxy.on_timer(1.0 + TIMER_C))
    assert [o.status for o in out if o.flow == PHONE_UDP] == [408]
    ok_data = response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT])
    ok = one(world.feed(ok_data, PBX_TCP, 1.0 + TIMER_C + 0.1))
    assert (ok.flow, ok.status) == (PHONE_UDP, 200)


def test_request_routed_back_to_the_pbx_flow_it_came_from_is_a_loop(world: World) -> None:
    _, pbx_routes = phone_call(world)
    data = dialog_request("BYE", pbx_routes, flow=PBX_TCP, uri=PHONE_TARGET,
                          from_tag="ftag1", to_tag="uas1")  # the phone's From tag
    assert refusal(world, data, PBX_TCP).status == 482


def test_stateless_refusal_repeats_its_to_tag(world: World) -> None:
    data = phone_invite("sip:x@example.com")
    first = refusal(world, data)
    again = refusal(world, data)
    assert again.data == first.data


def test_path_token_lasts_the_registration_it_was_minted_for(world: World) -> None:
    """The phone asked for 600 s (Expires in its REGISTER): its Path works for that, plus
    an hour's margin, rounded up to the hour; then the PBX gets 403, not the phone."""
    path = register_phone(world)  # at t = 1 s, Expires: 600
    register_pbx(world.proxy, PBX_TCP, now=6_000.0)
    ok = world.feed(pbx_invite(path, branch="z9hG4bKp1", call_id="c1"), PBX_TCP, 7_000.0)
    assert [o.flow for o in ok] == [PBX_TCP, PHONE_UDP]
    late = one(world.feed(pbx_invite(path, branch="z9hG4bKp2", call_id="c2"), PBX_TCP, 7_201.0))
    assert (late.flow, late.status) == (PBX_TCP, 403)
    assert world.proxy.counters.get("forbidden_total", "token_expired") == 1


def test_pending_invites_are_capped_per_source_and_the_others_keep_calling() -> None:
    w = World.__new__(World)
    w.proxy, w.dead = make_proxy(pending=PendingLimits(per_source=3, per_pbx=5))
    w.pbx_flow = PBX_TCP
    register_pbx(w.proxy, PBX_TCP, now=0.0)
    flood = [w.feed(phone_invite(branch=f"z9hG4bKfl{i}", call_id=f"fl{i}"), PHONE_UDP) for i in range(4)]
    assert [o[0].status for o in flood] == [100, 100, 100, 503]  # the fourth: over the source's share
    assert flood[3][0].msg.get("retry-after") and len(flood[3]) == 1
    assert w.proxy.counters.get("overload_total", "per_source") == 1
    # another phone still calls the same PBX, up to the PBX's share (5 pending in all)
    other = [w.feed(phone_invite(flow=PHONE_TCP, branch=f"z9hG4bKot{i}", call_id=f"ot{i}"), PHONE_TCP)
             for i in range(3)]
    assert [o[0].status for o in other] == [100, 100, 503]
    assert w.proxy.counters.get("overload_total", "per_pbx") == 1
    # the PBX answers one of the flood: that source may call again
    (back,) = w.feed(response_to(flood[0][1].data, 486, "Busy Here"), PBX_TCP)
    assert back.status == 486
    assert w.feed(phone_invite(branch="z9hG4bKfl9", call_id="fl9"), PHONE_UDP)[0].status == 100
