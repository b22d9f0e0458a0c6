"""Routing through the sans-I/O proxy core, driven with raw SIP bytes.

A PBX (serial 0123456789) phones home over TCP; a softphone behind NAT talks
UDP (or TCP) to the relay. Every assertion is on the bytes the core returns.
"""

from __future__ import annotations

import pytest

from relay.proxy.core import OUR_BRANCH
from relay.proxy.flow import Flow
from relay.proxy.transaction import LINGER, T1, TIMER_B, TIMER_C
from relay.sip import Request, SipParseError, parse_message
from tests.proxyharness import (
    ADVERTISE,
    OTHER_SERIAL,
    PBX_DOMAIN,
    PBX_TCP,
    PBX_UDP,
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
    assert world.proxy.tokens.verify(ours.params["pf"] or "") == (PHONE_UDP, "")
    # RFC 3581: the phone asked for rport, so both received and rport are set
    assert (theirs.host, theirs.port, theirs.branch) == ("192.168.1.20", 5062, "z9hG4bKphone1")
    assert theirs.params["received"] == "192.0.2.20"
    assert theirs.params["rport"] == "40001"
    assert req.get("max-forwards") == "69"
    assert not req.has("route")
    # double Record-Route: UDP on the phone's side, TCP on the PBX's side (RFC 5658)
    rr = req.get_all("record-route")
    assert len(rr) == 2
    assert rr[0].endswith(f"@{ADVERTISE}:5060;transport=tcp;lr>")
    assert rr[1].endswith(f"@{ADVERTISE}:5060;lr>")
    for value in rr:
        assert world.proxy.tokens.verify(route_user(value)) == (PHONE_UDP, SERIAL)
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
    assert rr[0] == f"<sip:{route_user(rr[0])}@{ADVERTISE}:5060;lr>"
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
    assert world.proxy.stats.c["retransmissions_absorbed_total"] == 1


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


def test_retransmitted_non2xx_final_is_absorbed(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    busy = response_to(fwd.data, 486, "Busy Here")
    assert one(world.feed(busy, PBX_TCP, 1.1)).status == 486
    assert world.feed(busy, PBX_TCP, 1.6) == []


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
    assert world.proxy.stats.c["dropped_total:response_flow_gone"] == 1


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
    world.feed(phone_invite(), PHONE_UDP, 1.0)
    assert len(world.feed(phone_cancel(), PHONE_UDP, 2.0)) == 2
    again = one(world.feed(phone_cancel(), PHONE_UDP, 2.5))
    assert again.status == 200


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
    assert path[0].startswith("<sip:") and path[0].endswith(f"@{ADVERTISE}:5060;transport=tcp;lr>")
    assert world.proxy.tokens.verify(route_user(path[0])) == (PHONE_UDP, SERIAL)
    assert not req.has("record-route")
    assert not req.has("route")
    assert req.top_via().branch.startswith(OUR_BRANCH)  # type: ignore[union-attr]
    assert len(world.proxy.txns) == 0  # non-INVITE: stateless

    ok = one(world.feed(response_to(fwd.data, 200, "OK"), PBX_TCP))
    assert (ok.flow, ok.status) == (PHONE_UDP, 200)
    assert len(ok.msg.vias()) == 1


def pbx_invite(path: str, branch: str = "z9hG4bKpbx1", call_id: str = "call-in") -> bytes:
    return request(
        "INVITE", "sip:201@192.168.1.20:5062", flow=PBX_TCP, via_host="10.1.1.1", branch=branch,
        from_uri=f"sip:100@{PBX_DOMAIN}", to_uri=f"sip:201@{PBX_DOMAIN}", call_id=call_id,
        headers=[f"Route: {path}", PBX_CONTACT, "Content-Type: application/sdp"], body=SDP,
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
    assert world.proxy.tokens.verify(ours.params["pf"] or "") == (PBX_TCP, "")
    rr = req.get_all("record-route")
    assert len(rr) == 2
    assert rr[0].endswith(f"@{ADVERTISE}:5060;lr>")  # facing the phone (UDP)
    assert rr[1].endswith(";transport=tcp;lr>")  # facing the PBX (TCP)
    assert world.proxy.tokens.verify(route_user(rr[0])) == (PHONE_UDP, SERIAL)
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
    assert world.proxy.stats.c["flow_failed_total"] == 1


def test_dead_udp_phone_flow_cannot_be_known_and_is_tried(world: World) -> None:
    path = register_phone(world, PHONE_UDP)
    world.dead.add(PHONE_UDP)
    assert [o.flow for o in world.feed(pbx_invite(path), PBX_TCP, 2.0)] == [PBX_TCP, PHONE_UDP]


# ------------------------------------------------------------------ in-dialog


def dialog_request(method: str, route_set: list[str], *, flow: Flow, uri: str, cseq: int = 2,
                   call_id: str = "call-1", branch: str | None = None) -> bytes:
    return request(
        method, uri, flow=flow, via_host="10.1.1.1" if flow == PBX_TCP else "192.168.1.20",
        branch=branch, from_tag="ftag1", to_tag="uas1", call_id=call_id, cseq=cseq,
        headers=[f"Route: {', '.join(route_set)}"] if route_set else [],
    )


def test_in_dialog_requests_follow_the_record_route(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    ok = one(world.feed(response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT]), PBX_TCP, 1.1))
    rr = ok.msg.get_all("record-route")
    phone_routes = list(reversed(rr))  # UAC: reversed (RFC 3261 §12.1.2)
    pbx_routes = rr  # UAS: as is (§12.1.1)
    pbx_target = "sip:201@10.1.1.1:5060;transport=tcp"

    ack = one(world.feed(dialog_request("ACK", phone_routes, flow=PHONE_UDP, uri=pbx_target, cseq=1),
                         PHONE_UDP, 1.2))
    assert ack.flow == PBX_TCP
    assert ack.req.uri == pbx_target
    assert not ack.req.has("route")
    assert ack.req.top_via().branch.startswith(OUR_BRANCH)  # type: ignore[union-attr]

    bye = one(world.feed(dialog_request("BYE", pbx_routes, flow=PBX_TCP, uri="sip:200@192.168.1.20:5062"),
                         PBX_TCP, 5.0))
    assert bye.flow == PHONE_UDP
    assert bye.req.method == "BYE"
    assert not bye.req.has("route")
    assert bye.req.get("max-forwards") == "69"
    bye_ok = one(world.feed(response_to(bye.data, 200, "OK"), PHONE_UDP, 5.1))
    assert (bye_ok.flow, bye_ok.status) == (PBX_TCP, 200)

    bye2 = one(world.feed(dialog_request("BYE", phone_routes, flow=PHONE_UDP, uri=pbx_target, cseq=3),
                          PHONE_UDP, 6.0))
    assert bye2.flow == PBX_TCP
    assert not bye2.req.has("route")
    bye2_ok = one(world.feed(response_to(bye2.data, 200, "OK"), PBX_TCP, 6.1))
    assert (bye2_ok.flow, bye2_ok.status) == (PHONE_UDP, 200)


def test_in_dialog_from_phone_while_pbx_offline_is_480(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP, 1.0)
    ok = one(world.feed(response_to(fwd.data, 200, "OK"), PBX_TCP, 1.1))
    world.proxy.on_flow_closed(PBX_TCP)
    bye = dialog_request("BYE", list(reversed(ok.msg.get_all("record-route"))), flow=PHONE_UDP,
                         uri="sip:201@10.1.1.1")
    assert refusal(world, bye).status == 480


# --------------------------------------------------------------- refusals


def test_unknown_serial_is_404(world: World) -> None:
    assert refusal(world, phone_invite("sip:201@5555555555.relay.test")).status == 404


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
    assert world.proxy.stats.c["forbidden_total:foreign_domain"] == 1


def test_pbx_calling_its_own_domain_is_a_loop(world: World) -> None:
    data = request("INVITE", f"sip:201@{PBX_DOMAIN}", flow=PBX_TCP)
    assert refusal(world, data, PBX_TCP).status == 482


def test_forged_token_is_403(world: World) -> None:
    forged = f"Route: <sip:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@{ADVERTISE};lr>"
    data = phone_invite(headers=[forged])
    assert refusal(world, data).status == 403
    assert world.proxy.stats.c["forbidden_total:bad_token"] == 1


def test_altered_token_is_403(world: World) -> None:
    path = register_phone(world)
    token = route_user(path)
    i = len(token) // 2
    altered = path.replace(token, token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:])
    resp = refusal(world, pbx_invite(altered), PBX_TCP)
    assert resp.status == 403


def test_stolen_path_token_leads_only_to_the_pbx(world: World) -> None:
    # A stranger reusing a phone's Path token reaches only the PBX, never the phone.
    path = register_phone(world)
    data = request("MESSAGE", "sip:201@192.168.1.20", flow=STRANGER, headers=[f"Route: {path}"])
    out = one(world.feed(data, STRANGER))
    assert out.flow == PBX_TCP


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


def test_refused_invite_retransmission_gets_the_same_answer(world: World) -> None:
    data = phone_invite("sip:x@example.com")
    first = refusal(world, data)
    again = refusal(world, data)
    assert again.data == first.data


def test_ack_for_our_own_refusal_is_absorbed(world: World) -> None:
    # 480 while OTHER_SERIAL is offline …
    assert refusal(world, phone_invite(f"sip:201@{OTHER_SERIAL}.relay.test")).status == 480
    # … then it phones home before the phone's ACK arrives: the ACK belongs to
    # our 480 (RFC 3261 §17.2.1) and must not go to the PBX.
    register_pbx(world.proxy, PBX_UDP, now=1.0, serial=OTHER_SERIAL, secret="other")
    ack = request(
        "ACK", f"sip:201@{OTHER_SERIAL}.relay.test", flow=PHONE_UDP, via_host="192.168.1.20",
        via_port=5062, branch="z9hG4bKphone1", call_id="call-1", to_tag="x", headers=[OUTBOUND],
    )
    assert world.feed(ack, PHONE_UDP, 1.5) == []


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
    assert world.proxy.stats.c["dropped_total:response_not_ours"] == 1


def test_response_with_a_bad_flow_token_is_dropped(world: World) -> None:
    _, fwd = world.feed(phone_invite(), PHONE_UDP)
    pf = fwd.req.top_via().params["pf"] or ""
    i = len(pf) // 2
    bad = pf[:i] + ("A" if pf[i] != "A" else "B") + pf[i + 1:]
    data = response_to(fwd.data, 180, "Ringing").replace(pf.encode(), bad.encode())
    assert world.feed(data, PBX_TCP) == []
    assert world.proxy.stats.c["dropped_total:response_bad_token"] == 1
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
    assert proxy.stats.c["invite_retransmissions_total"] == 3

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
    assert proxy.stats.c["invite_timeouts_total"] == 1
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
    # the PBX's 487 after our CANCEL is not passed on: the phone has its 408
    assert world.feed(response_to(fwd.data, 487, "Request Terminated"), PBX_TCP, TIMER_C + 2.1) == []
    proxy.on_timer(2.0 + TIMER_C + LINGER)
    assert len(proxy.txns) == 0


def test_refused_invites_linger_then_go(world: World) -> None:
    refusal(world, phone_invite("sip:x@example.com", branch="z9hG4bKa"))
    refusal(world, phone_invite("tel:+1555", branch="z9hG4bKb"))
    assert len(world.proxy.txns) == 2
    world.proxy.on_timer(1.0 + LINGER)
    assert len(world.proxy.txns) == 0


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
    counters = [k for k in world.proxy.stats.c if k.startswith("requests_in_total:")]
    assert world.proxy.stats.c["requests_in_total:other"] == 50
    assert world.proxy.stats.c["requests_in_total:REGISTER"] == 2  # the PBX's, in World()
    assert sorted(counters) == ["requests_in_total:REGISTER", "requests_in_total:other"]


def test_unknown_method_is_forwarded_to_the_pbx(world: World) -> None:
    fwd = one(world.feed(request("FOO", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP), PHONE_UDP))
    assert (fwd.flow, fwd.req.method) == (PBX_TCP, "FOO")
