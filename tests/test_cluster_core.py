"""The core's cluster events and effects (docs/cluster.md), two nodes in one test, no I/O.

Node A holds the PBX's flow; a phone on node B calls it. The test plays the shell:
it carries B's ``LocatePbx`` out by answering ``on_located`` with the link to A, and
moves each ``Send`` on a link to the other node's ``on_message``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from relay.pbx.digest import DigestAuth
from relay.proxy.clusterevents import NOT_HELD
from relay.proxy.core import ProxyConfig
from relay.proxy.effects import (
    LOCATE_BUSY,
    LOCATE_FAILED,
    LOCATED,
    NOWHERE,
    ClaimPbx,
    Effect,
    ForgetPbx,
    LocatePbx,
    ReleasePbx,
    Send,
)
from relay.proxy.flow import Flow
from relay.sip import parse_message
from tests.proxyharness import (
    DOMAIN,
    PBX_DOMAIN,
    PBX_TCP,
    SECRET,
    SERIAL,
    Out,
    RecordingProxy,
    directory_entry,
    outs,
    pbx_register,
    register_pbx,
    request,
    response_to,
)

A_IP, B_IP = "198.51.100.10", "198.51.100.11"  # the two nodes (documentation range)
CLUSTER_PORT = 5070
PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061, "cluster": CLUSTER_PORT}
# The one TCP link B opened to A's cluster listener, as each end sees it.
LINK_AT_B = Flow("cluster", A_IP, CLUSTER_PORT, B_IP, 40100)
LINK_AT_A = Flow("cluster", B_IP, 40100, A_IP, CLUSTER_PORT)
PHONE = Flow("udp", "192.0.2.20", 40001, B_IP, 5060)
PBX = PBX_TCP  # on node A
SDP = (
    "v=0\r\no=- 1 1 IN IP4 192.168.1.20\r\ns=-\r\nc=IN IP4 192.168.1.20\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\n"
)


def node(ip: str, key: bytes, *, cluster: bool = True) -> RecordingProxy:
    cfg = ProxyConfig(domain=DOMAIN, advertise=ip, ports=dict(PORTS), cluster=cluster)
    proxy = RecordingProxy(cfg, key, DigestAuth(key, DOMAIN, ("MD5",)), None)
    proxy.on_directory({SERIAL: directory_entry(SERIAL, SECRET)})
    return proxy


@dataclass
class Cluster:
    a: RecordingProxy
    b: RecordingProxy

    def at_b(self, data: bytes, flow: Flow = PHONE, now: float = 1.0) -> list[Effect]:
        """A message reaching node B; a LocatePbx is answered with the link to A."""
        effects = self.b.on_message(parse_message(data, datagram=flow.transport == "udp"), flow, now)
        out: list[Effect] = []
        for e in effects:
            if isinstance(e, LocatePbx):
                out += self.b.on_located(e, LINK_AT_B, LOCATED, now)
            else:
                out.append(e)
        return out

    def at_a(self, data: bytes, flow: Flow = LINK_AT_A, now: float = 1.0) -> list[Out]:
        return outs(self.a.on_message(parse_message(data, datagram=flow.transport == "udp"), flow, now))


@pytest.fixture
def cluster() -> Cluster:
    a, b = node(A_IP, b"a" * 32), node(B_IP, b"b" * 32)
    a.on_flow_opened(LINK_AT_A)
    b.on_flow_opened(LINK_AT_B)
    register_pbx(a, PBX)
    a.take_effects()
    return Cluster(a, b)


def invite(call_id: str = "xcall-1") -> bytes:
    return request("INVITE", f"sip:201@{PBX_DOMAIN}", flow=PHONE, via_host="192.168.1.20",
                   via_port=5062, branch="z9hG4bKxphone1", call_id=call_id,
                   headers=["Contact: <sip:200@192.168.1.20:5062>", "Content-Type: application/sdp"],
                   body=SDP)


def test_a_pbx_registering_is_claimed_with_its_expiry_and_a_token_naming_its_flow() -> None:
    a = node(A_IP, b"a" * 32)
    register_pbx(a, PBX, expires=600)
    claims = [e for e in a.take_effects() if isinstance(e, ClaimPbx)]
    assert claims == [ClaimPbx(SERIAL, PBX, 600)]
    token = a.claim_token(claims[0], 1.0)
    assert a.tokens.tokens.verify(token, 1.0) == (PBX, "n." + SERIAL)


def test_the_claim_is_released_when_the_flow_closes_the_pbx_unregisters_or_expires() -> None:
    a = node(A_IP, b"a" * 32)
    register_pbx(a, PBX)
    assert a.on_flow_closed(PBX) == [ReleasePbx(SERIAL)]

    register_pbx(a, PBX, now=10.0, expires=60)
    a.take_effects()
    assert ReleasePbx(SERIAL) in a.on_timer(71.0)


def test_a_single_node_neither_claims_nor_looks_up() -> None:
    solo = node(A_IP, b"a" * 32, cluster=False)
    register_pbx(solo, PBX)
    assert not [e for e in solo.take_effects() if isinstance(e, ClaimPbx)]
    assert solo.on_flow_closed(PBX) == []
    other = node(B_IP, b"b" * 32, cluster=False)
    (answer,) = outs(other.on_message(parse_message(invite(), datagram=True), PHONE, 1.0))
    assert answer.status == 480


def test_a_request_for_a_pbx_held_elsewhere_is_looked_up_and_sent_nowhere_yet(cluster: Cluster) -> None:
    effects = cluster.b.on_message(parse_message(invite(), datagram=True), PHONE, 1.0)
    assert len(effects) == 1 and isinstance(effects[0], LocatePbx)
    assert effects[0].serial == SERIAL


@pytest.mark.parametrize(("outcome", "status", "retry"), [
    (NOWHERE, 480, None), (LOCATE_FAILED, 503, "5"), (LOCATE_BUSY, 503, "1"),
])
def test_a_pbx_no_node_holds_gets_480_and_a_failed_lookup_503(
    cluster: Cluster, outcome: str, status: int, retry: str | None,
) -> None:
    (locate,) = cluster.b.on_message(parse_message(invite(), datagram=True), PHONE, 1.0)
    assert isinstance(locate, LocatePbx)
    (answer,) = outs(cluster.b.on_located(locate, None, outcome, 1.1))
    assert (answer.flow, answer.status, answer.msg.get("retry-after")) == (PHONE, status, retry)
    assert cluster.b.counters.get("cluster_lookups_total", outcome) == 1


def test_what_comes_from_another_node_is_never_looked_up_again(cluster: Cluster) -> None:
    """One hop only: node A does not hold the serial → 480 back on the link, no second lookup."""
    (fwd,) = [o for o in outs(cluster.at_b(invite())) if o.flow == LINK_AT_B]
    cluster.a.on_flow_closed(PBX)
    (answer,) = cluster.at_a(fwd.data)
    assert (answer.flow, answer.status) == (LINK_AT_A, 480)
    assert answer.msg.get(NOT_HELD.lower()) == SERIAL  # B may have cached A as the holder
    assert not [e for e in cluster.a.take_effects() if isinstance(e, LocatePbx)]


LINK_TO_C = Flow("cluster", "198.51.100.12", CLUSTER_PORT, B_IP, 40200)  # B's link to a node C


def not_held_at_a(cluster: Cluster, data: bytes) -> bytes:
    """Node A, which no longer holds the PBX, answers what B sent it: 480 with NOT_HELD."""
    cluster.a.on_flow_closed(PBX)
    (answer,) = cluster.at_a(data)
    assert answer.status == 480
    return answer.data


def test_an_invite_the_cached_node_no_longer_holds_goes_again_after_one_fresh_lookup(
    cluster: Cluster,
) -> None:
    """B forwarded on a cached holder (A); A says it does not hold the PBX: B asks the
    shared state afresh and sends the same INVITE to the node it names, the phone sees
    no 480."""
    trying, fwd = outs(cluster.at_b(invite()))
    effects = cluster.b.on_message(parse_message(not_held_at_a(cluster, fwd.data)), LINK_AT_B, 1.2)
    assert len(effects) == 1 and isinstance(effects[0], LocatePbx)
    relocate = effects[0]
    assert (relocate.serial, relocate.fresh, relocate.hop) == (SERIAL, True, None)
    (again,) = outs(cluster.b.on_located(relocate, LINK_TO_C, LOCATED, 1.3))
    assert (again.flow, again.data) == (LINK_TO_C, fwd.data)  # the same INVITE, same branch
    # C's 180 and 200 reach the phone through B as any answer.
    ringing = response_to(again.data, 180, "Ringing")
    (up,) = outs(cluster.b.on_message(parse_message(ringing), LINK_TO_C, 1.4))
    assert (up.flow, up.status) == (PHONE, 180)
    # Only once: a second NOT_HELD for the same INVITE goes up to the caller.
    assert cluster.b.counters.get("cluster_lookups_total", LOCATED) == 2


def test_an_invite_whose_fresh_lookup_finds_nobody_gets_480(cluster: Cluster) -> None:
    trying, fwd = outs(cluster.at_b(invite()))
    (relocate,) = cluster.b.on_message(parse_message(not_held_at_a(cluster, fwd.data)), LINK_AT_B, 1.2)
    assert isinstance(relocate, LocatePbx)
    (answer,) = outs(cluster.b.on_located(relocate, None, NOWHERE, 1.3))
    assert (answer.flow, answer.status) == (PHONE, 480)
    assert not answer.msg.has(NOT_HELD.lower())
    # The phone's ACK for it stays at B.
    ack = request("ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE, via_host="192.168.1.20", via_port=5062,
                  branch="z9hG4bKxphone1", call_id="xcall-1", to_tag=answer.msg.to().tag)
    assert cluster.b.on_message(parse_message(ack, datagram=True), PHONE, 1.4) == []


def test_a_second_not_held_for_the_same_invite_goes_to_the_caller(cluster: Cluster) -> None:
    trying, fwd = outs(cluster.at_b(invite()))
    not_held = not_held_at_a(cluster, fwd.data)
    (relocate,) = cluster.b.on_message(parse_message(not_held), LINK_AT_B, 1.2)
    assert isinstance(relocate, LocatePbx)
    cluster.b.on_located(relocate, LINK_AT_B, LOCATED, 1.3)
    effects = cluster.b.on_message(parse_message(not_held), LINK_AT_B, 1.4)
    assert ForgetPbx(SERIAL) in effects
    (up,) = outs([e for e in effects if not isinstance(e, ForgetPbx)])
    assert (up.flow, up.status) == (PHONE, 480)
    assert not up.msg.has(NOT_HELD.lower())


def test_any_other_request_not_held_there_makes_the_node_forget_the_holder(cluster: Cluster) -> None:
    options = request("OPTIONS", f"sip:{PBX_DOMAIN}", flow=PHONE, via_host="192.168.1.20",
                      via_port=5062, branch="z9hG4bKxopt1", call_id="xopt-1")
    (fwd,) = outs(cluster.at_b(options))
    effects = cluster.b.on_message(parse_message(not_held_at_a(cluster, fwd.data)), LINK_AT_B, 1.2)
    assert effects[0] == ForgetPbx(SERIAL)
    (up,) = outs(effects[1:])
    assert (up.flow, up.status) == (PHONE, 480)
    assert not up.msg.has(NOT_HELD.lower())  # never leaves the relay


def test_a_not_held_header_from_a_pbx_means_nothing_and_is_taken_off(cluster: Cluster) -> None:
    trying, fwd = outs(cluster.at_b(invite()))
    trying_a, to_pbx = cluster.at_a(fwd.data)
    busy = response_to(to_pbx.data, 480, "Temporarily Unavailable", headers=[f"{NOT_HELD}: 999"])
    effects = cluster.a.on_message(parse_message(busy), PBX, 1.2)
    assert not [e for e in effects if isinstance(e, LocatePbx | ForgetPbx)]
    (back,) = outs(effects)
    assert back.flow == LINK_AT_A and not back.msg.has(NOT_HELD.lower())


def test_a_register_over_a_node_link_is_refused_unchecked() -> None:
    a = node(A_IP, b"a" * 32)
    (answer,) = outs(a.on_message(parse_message(pbx_register(flow=LINK_AT_A)), LINK_AT_A, 1.0))
    assert answer.status == 403
    assert a.counters.get("pbx_auth_failures_total") == 0


def test_a_call_from_a_phone_on_b_to_the_pbx_on_a_and_back(cluster: Cluster) -> None:
    # INVITE: phone → B → link → A → PBX; 100 Trying from each node to its side.
    trying, fwd = outs(cluster.at_b(invite()))
    assert (trying.flow, trying.status) == (PHONE, 100)
    assert fwd.flow == LINK_AT_B
    via_b = fwd.req.vias()[0]
    assert (via_b.transport, via_b.host, via_b.port) == ("TCP", B_IP, CLUSTER_PORT)
    trying_a, to_pbx = cluster.at_a(fwd.data)
    assert (trying_a.flow, trying_a.status) == (LINK_AT_A, 100)
    assert to_pbx.flow == PBX
    assert [v.host for v in to_pbx.req.vias()] == [A_IP, B_IP, "192.168.1.20"]
    assert to_pbx.req.get("max-forwards") == "68"  # one hop more

    # 200: PBX → A → link → B → phone, each node taking its own Via off.
    ok = response_to(to_pbx.data, 200, "OK", headers=["Contact: <sip:201@10.1.1.1:5060;transport=tcp>"])
    (back,) = cluster.at_a(ok, PBX)
    assert back.flow == LINK_AT_A
    (to_phone,) = outs(cluster.at_b(back.data, LINK_AT_B))
    assert (to_phone.flow, to_phone.status) == (PHONE, 200)
    assert [v.host for v in to_phone.resp.vias()] == ["192.168.1.20"]

    # ACK and BYE from the phone along the route set: B, then A, then the PBX.
    route = [f"Route: {v}" for v in reversed(to_phone.resp.get_all("record-route"))]
    for method, cseq in (("ACK", 1), ("BYE", 2)):
        data = request(method, "sip:201@10.1.1.1:5060;transport=tcp", flow=PHONE, via_host="192.168.1.20",
                       call_id="xcall-1", to_tag="uas1", cseq=cseq, headers=route)
        (on_link,) = outs(cluster.at_b(data))
        assert on_link.flow == LINK_AT_B
        (at_pbx,) = cluster.at_a(on_link.data)
        assert (at_pbx.flow, at_pbx.req.method) == (PBX, method)
        assert not at_pbx.req.has("route")


def test_a_bye_from_the_pbx_goes_back_over_the_link_to_the_phone(cluster: Cluster) -> None:
    _, fwd = outs(cluster.at_b(invite()))
    _, to_pbx = cluster.at_a(fwd.data)
    rr = to_pbx.req.get_all("record-route")
    # The PBX's BYE: From/To swapped, the route set as the Record-Route it got.
    bye = request("BYE", "sip:200@192.168.1.20:5062", flow=PBX, via_host="10.1.1.1",
                  from_uri=f"sip:201@{PBX_DOMAIN}", from_tag="uas1", to_uri=f"sip:200@{PBX_DOMAIN}",
                  to_tag="ftag1", call_id="xcall-1", cseq=7, headers=[f"Route: {v}" for v in rr])
    (on_link,) = cluster.at_a(bye, PBX)
    assert on_link.flow == LINK_AT_A
    (to_phone,) = outs(cluster.at_b(on_link.data, LINK_AT_B))
    assert (to_phone.flow, to_phone.req.method) == (PHONE, "BYE")
    assert not to_phone.req.has("route")


def test_a_phone_registering_on_b_gets_paths_through_both_nodes_and_the_pbx_reaches_it(
    cluster: Cluster,
) -> None:
    """The reverse direction: the PBX's INVITE along the Path of a phone registered through B."""
    aor = f"sip:201@{PBX_DOMAIN}"
    reg = request("REGISTER", f"sip:{PBX_DOMAIN}", flow=PHONE, via_host="192.168.1.20", from_uri=aor,
                  to_uri=aor, call_id="xreg-1", headers=["Contact: <sip:201@192.168.1.20:5062>",
                                                         "Expires: 600"])
    (on_link,) = [o for o in outs(cluster.at_b(reg)) if o.flow == LINK_AT_B]
    (at_pbx,) = cluster.at_a(on_link.data)
    assert at_pbx.flow == PBX
    paths = at_pbx.req.get_all("path")
    assert len(paths) == 2
    ok = response_to(at_pbx.data, 200, "OK", headers=["Contact: <sip:201@192.168.1.20:5062>;expires=600"])
    (back,) = cluster.at_a(ok, PBX)
    (to_phone,) = [o for o in outs(cluster.at_b(back.data, LINK_AT_B)) if isinstance(o, Out)]
    assert (to_phone.flow, to_phone.status) == (PHONE, 200)

    pbx_invite = request("INVITE", "sip:201@192.168.1.20:5062", flow=PBX, via_host="10.1.1.1",
                         from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbx-tag", to_uri=aor,
                         call_id="xcall-2", headers=[f"Route: {p}" for p in paths])
    trying, to_b = cluster.at_a(pbx_invite, PBX)
    assert (trying.status, to_b.flow) == (100, LINK_AT_A)
    sent = [s for s in cluster.at_b(to_b.data, LINK_AT_B) if isinstance(s, Send)]
    assert [s.flow for s in sent] == [LINK_AT_B, PHONE]  # 100 back to A, the INVITE to the phone


# ------------------------------------------------ tokens that name their node
# Two workers of one machine: the same address, SIP ports and key; each its own
# cluster port and node id (relay/workers.py).
X_LINK_PORT, Y_LINK_PORT = 5070, 5071
AT_X = Flow("cluster", A_IP, 40300, A_IP, X_LINK_PORT)  # the link Y opened to X, at X
AT_Y = Flow("cluster", A_IP, X_LINK_PORT, A_IP, 40300)  # the same link, at Y
PBX_AGAIN = Flow("tcp", "203.0.113.7", 41005, A_IP, 5060)  # the PBX reconnected: landed on Y
PHONE_X = Flow("udp", "192.0.2.20", 40001, A_IP, 5060)


def worker(node_id: str, link_port: int) -> RecordingProxy:
    cfg = ProxyConfig(domain=DOMAIN, advertise=A_IP, ports={**PORTS, "cluster": link_port}, cluster=True,
                      node_id=node_id)
    key = b"k" * 32
    proxy = RecordingProxy(cfg, key, DigestAuth(key, DOMAIN, ("MD5",)), None)
    proxy.on_directory({SERIAL: directory_entry(SERIAL, SECRET)})
    return proxy


def phone_path_at_x(x: RecordingProxy) -> str:
    """The phone registers through X, where the PBX is: the Path entry X inserted."""
    aor = f"sip:201@{PBX_DOMAIN}"
    reg = request("REGISTER", f"sip:{PBX_DOMAIN}", flow=PHONE_X, via_host="192.168.1.20", from_uri=aor,
                  to_uri=aor, call_id="xreg-9", headers=["Contact: <sip:201@192.168.1.20:5062>",
                                                         "Expires: 600"])
    (at_pbx,) = outs(x.on_message(parse_message(reg, datagram=True), PHONE_X, 1.0))
    assert at_pbx.flow == PBX
    (path,) = at_pbx.req.get_all("path")
    ok = response_to(at_pbx.data, 200, "OK", headers=["Contact: <sip:201@192.168.1.20:5062>;expires=600"])
    outs(x.on_message(parse_message(ok), PBX, 1.1))
    return path


def pbx_invite_along(path: str) -> bytes:
    return request("INVITE", "sip:201@192.168.1.20:5062", flow=PBX_AGAIN, via_host="10.1.1.1",
                   from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbx-tag", to_uri=f"sip:201@{PBX_DOMAIN}",
                   call_id="xcall-9", headers=[f"Route: {path}"])


def test_a_path_token_names_its_node_and_another_node_sends_the_request_there() -> None:
    """The PBX reconnected and landed on Y; its INVITE along the Path X minted goes to X
    over the link, with no lookup of the serial, and X delivers it to the phone."""
    x, y = worker("edge-w0", X_LINK_PORT), worker("edge-w1", Y_LINK_PORT)
    register_pbx(x, PBX)
    path = phone_path_at_x(x)
    claim = y.tokens.read(path.split("sip:")[1].split("@")[0], 1.0)
    assert (claim.node, claim.flow, claim.kind) == ("edge-w0", PHONE_X, "p")
    register_pbx(y, PBX_AGAIN)
    y.take_effects()

    (to_node,) = y.on_message(parse_message(pbx_invite_along(path)), PBX_AGAIN, 2.0)
    assert isinstance(to_node, LocatePbx)
    assert (to_node.node, to_node.serial) == ("edge-w0", SERIAL)
    trying, on_link = outs(y.on_located(to_node, AT_Y, LOCATED, 2.0))
    assert (trying.flow, trying.status, on_link.flow) == (PBX_AGAIN, 100, AT_Y)
    assert on_link.req.get_all("route")[0] == path  # put back: X routes it as its own
    # Y's Record-Route names the link (the way to the phone's node), under Y's id.
    rr_y = [y.tokens.read(v.split("sip:")[1].split("@")[0], 2.0) for v in on_link.req.get_all("record-route")]
    assert {(c.node, c.flow) for c in rr_y} == {("edge-w1", AT_Y)}

    sent = [o for o in outs(x.on_message(parse_message(on_link.data), AT_X, 2.1))]
    assert [o.flow for o in sent] == [AT_X, PHONE_X]  # 100 back to Y, the INVITE to the phone
    assert not sent[1].req.has("route")


def test_a_token_naming_a_node_that_is_gone_gets_430_flow_failed() -> None:
    x, y = worker("edge-w0", X_LINK_PORT), worker("edge-w1", Y_LINK_PORT)
    register_pbx(x, PBX)
    path = phone_path_at_x(x)
    register_pbx(y, PBX_AGAIN)
    (to_node,) = [e for e in y.on_message(parse_message(pbx_invite_along(path)), PBX_AGAIN, 2.0)
                  if isinstance(e, LocatePbx)]
    (answer,) = outs(y.on_located(to_node, None, NOWHERE, 2.0))
    assert (answer.flow, answer.status, answer.msg.reason) == (PBX_AGAIN, 430, "Flow Failed")
    assert y.counters.get("flow_failed_total") == 1
    # Over a link, one hop only: the node that sent it does not send it further.
    again = parse_message(pbx_invite_along(path))
    (answer,) = outs(y.on_message(again, AT_Y, 2.1))
    assert answer.status == 430


def test_a_token_of_another_node_towards_the_pbx_is_routed_by_the_pbx_claim() -> None:
    """A Record-Route token X minted, used by the phone towards the PBX at Y (its UDP
    source re-spread): the PBX's registration decides, not the token's node."""
    x, y = worker("edge-w0", X_LINK_PORT), worker("edge-w1", Y_LINK_PORT)
    register_pbx(x, PBX)
    inv = request("INVITE", f"sip:201@{PBX_DOMAIN}", flow=PHONE_X, via_host="192.168.1.20",
                  via_port=5062, branch="z9hG4bKxphone9", call_id="xcall-10",
                  headers=["Contact: <sip:200@192.168.1.20:5062>"])
    trying, to_pbx = outs(x.on_message(parse_message(inv, datagram=True), PHONE_X, 1.0))
    ok = response_to(to_pbx.data, 200, "OK", headers=["Contact: <sip:201@10.1.1.1:5060;transport=tcp>"])
    (to_phone,) = outs(x.on_message(parse_message(ok), PBX, 1.1))
    route = [f"Route: {v}" for v in reversed(to_phone.resp.get_all("record-route"))]
    bye = request("BYE", "sip:201@10.1.1.1:5060;transport=tcp", flow=PHONE_X, via_host="192.168.1.20",
                  call_id="xcall-10", to_tag="uas1", cseq=2, headers=route)
    effects = y.on_message(parse_message(bye, datagram=True), PHONE_X, 1.2)
    (locate,) = effects
    assert isinstance(locate, LocatePbx) and (locate.node, locate.serial) == ("", SERIAL)
