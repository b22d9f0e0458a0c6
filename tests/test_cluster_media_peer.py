"""Media anchored on one node learns the far side's address from the node it came through.

A phone on node B calls the PBX on node A: B anchors the media (where the call entered),
but the PBX's answer reaches B over the link, whose address is A's. A names the PBX's
IP in ``X-PbxRelay-Peer`` (relay/proxy/mediacalls.py PEER) and B latches the PBX's side on
that IP. Found by tests/test_cluster_netns.py: with the link's address, B sent the phone's
audio to node A and dropped the PBX's (two machines behind NAT: no audio either way).
Core only, no I/O: the test carries each Send on the link to the other node.
"""

from __future__ import annotations

from relay.media.effects import BindPorts
from relay.media.ports import PortPool
from relay.media.session import PBX as PBX_SIDE
from relay.media.session import PHONE as PHONE_SIDE
from relay.media.session import MediaSessions
from relay.pbx.digest import DigestAuth
from relay.proxy.core import ProxyConfig
from relay.proxy.effects import LOCATED, Effect, LocatePbx
from relay.proxy.flow import Flow
from relay.proxy.mediacalls import PEER
from relay.proxy.transaction import TIMER_C
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
    register_pbx,
    request,
    response_to,
)
from tests.test_cluster_core import A_IP, B_IP, LINK_AT_A, LINK_AT_B, PHONE, PORTS, invite

PBX_ANSWER = (
    "v=0\r\no=- 2 2 IN IP4 10.1.1.1\r\ns=-\r\nc=IN IP4 10.1.1.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
)
FORGED = "192.0.2.66"  # what a peer might put in the header itself
PBX_CONTACT = "Contact: <sip:201@10.1.1.1:5060;transport=tcp>"


def node(ip: str, key: bytes, first_port: int) -> tuple[RecordingProxy, MediaSessions]:
    media = MediaSessions(ip, PortPool(first_port, first_port + 100))
    cfg = ProxyConfig(domain=DOMAIN, advertise=ip, ports=dict(PORTS), cluster=True)
    proxy = RecordingProxy(cfg, key, DigestAuth(key, DOMAIN, ("MD5",)), media)
    proxy.on_directory({SERIAL: directory_entry(SERIAL, SECRET)})
    for e in proxy.start(0.0):  # the shell binds every pair it is asked to
        if isinstance(e, BindPorts):
            proxy.on_ports_bound(tuple(e.ports), ())
    return proxy, media


def located(b: RecordingProxy, effects: list[Effect]) -> list[Out]:
    out: list[Effect] = []
    for e in effects:
        out += b.on_located(e, LINK_AT_B, LOCATED, 1.0) if isinstance(e, LocatePbx) else [e]
    return outs(out)


def with_body(data: bytes, body: str, extra: str = "") -> bytes:
    return data.replace(b"Content-Length: 0\r\n\r\n",
                        f"{extra}Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                        .encode())


def test_the_anchoring_node_latches_the_pbx_on_the_address_its_node_names() -> None:
    a, media_a = node(A_IP, b"a" * 32, 20_000)
    b, media_b = node(B_IP, b"b" * 32, 30_000)
    a.on_flow_opened(LINK_AT_A)
    b.on_flow_opened(LINK_AT_B)
    register_pbx(a, PBX_TCP)
    # The phone's INVITE, with a header of its own naming some address: B anchors it.
    forged_invite = invite().replace(b"Content-Type:", f"{PEER}: {FORGED}\r\nContent-Type:".encode(), 1)
    _, to_link = located(b, b.on_message(parse_message(forged_invite, datagram=True), PHONE, 1.0))
    assert to_link.flow == LINK_AT_B and f"c=IN IP4 {B_IP}" in to_link.req.body.decode()
    _, to_pbx = outs(a.on_message(parse_message(to_link.data), LINK_AT_A, 1.0))
    assert to_pbx.flow == PBX_TCP and not to_pbx.req.has(PEER.lower())  # never towards a PBX
    assert media_a.sessions == {}  # A passes the call's media on

    # The PBX's 200, with a private address in its SDP and a forged header: A replaces it.
    ok = with_body(response_to(to_pbx.data, 200, "OK", headers=[PBX_CONTACT]),
                   PBX_ANSWER, f"{PEER}: {FORGED}\r\n")
    (back,) = outs(a.on_message(parse_message(ok), PBX_TCP, 1.0))
    assert back.flow == LINK_AT_A and back.resp.get_all(PEER.lower()) == [PBX_TCP.remote_ip]
    (to_phone,) = outs(b.on_message(parse_message(back.data), LINK_AT_B, 1.0))
    assert to_phone.flow == PHONE and not to_phone.resp.has(PEER.lower())  # never towards a phone

    (session,) = media_b.sessions.values()
    pbx_leg = session.streams[0].legs[PBX_SIDE]
    # Before its first packet the PBX's media goes to its public IP (its NAT) at the SDP's
    # port, and only that IP or the SDP's may latch it: not node A's, not the forged one.
    assert pbx_leg.rtp.destination() == (PBX_TCP.remote_ip, 6000)
    assert pbx_leg.rtp.allowed_ips == frozenset({PBX_TCP.remote_ip, "10.1.1.1"})
    phone_leg = session.streams[0].legs[PHONE_SIDE]
    assert phone_leg.rtp.allowed_ips == frozenset({PHONE.remote_ip, "192.168.1.20"})


def test_a_header_from_a_peer_is_never_believed_by_a_node_alone() -> None:
    """On a single node (no link) the header means nothing: the flow's address counts."""
    proxy, media = node(B_IP, b"b" * 32, 30_000)
    pbx = Flow("tcp", "203.0.113.7", 41000, B_IP, 5060)
    register_pbx(proxy, pbx)
    forged_invite = invite().replace(b"Content-Type:", f"{PEER}: {FORGED}\r\nContent-Type:".encode(), 1)
    _, to_pbx = outs(proxy.on_message(parse_message(forged_invite, datagram=True), PHONE, 1.0))
    ok = with_body(response_to(to_pbx.data, 200, "OK", headers=[PBX_CONTACT]),
                   PBX_ANSWER, f"{PEER}: {FORGED}\r\n")
    (to_phone,) = outs(proxy.on_message(parse_message(ok), pbx, 1.0))
    assert not to_phone.resp.has(PEER.lower()) and FORGED.encode() not in to_phone.data
    assert not to_pbx.req.has(PEER.lower()) and FORGED.encode() not in to_pbx.data
    # Nor on a message the media relay never reads: taken off on arrival, whatever the method.
    options = request("OPTIONS", f"sip:{PBX_DOMAIN}", flow=PHONE, via_host="192.168.1.20",
                      via_port=5062, call_id="opt-1", headers=[f"{PEER}: {FORGED}"])
    (fwd,) = outs(proxy.on_message(parse_message(options, datagram=True), PHONE, 1.0))
    assert fwd.flow == pbx and not fwd.req.has(PEER.lower()) and FORGED.encode() not in fwd.data
    (session,) = media.sessions.values()
    assert session.streams[0].legs[PBX_SIDE].rtp.allowed_ips == frozenset({pbx.remote_ip, "10.1.1.1"})
    assert session.streams[0].legs[PHONE_SIDE].rtp.allowed_ips == frozenset({PHONE.remote_ip, "192.168.1.20"})


def test_a_late_answer_after_the_relay_gave_up_names_no_pbx_to_the_phone() -> None:
    """Timer C on the anchoring node answered the phone itself (408); the PBX's 200 comes
    later through its node, which names the PBX's IP for B alone. B sends that 2xx on to
    the phone (RFC 3261 §16.7 step 5) without the header: the relay never tells a phone
    where a PBX is (the SDP of that late answer is passed as the PBX wrote it)."""
    a, _ = node(A_IP, b"a" * 32, 20_000)
    b, _ = node(B_IP, b"b" * 32, 30_000)
    a.on_flow_opened(LINK_AT_A)
    b.on_flow_opened(LINK_AT_B)
    register_pbx(a, PBX_TCP)
    _, to_link = located(b, b.on_message(parse_message(invite(), datagram=True), PHONE, 1.0))
    _, to_pbx = outs(a.on_message(parse_message(to_link.data), LINK_AT_A, 1.0))
    (gave_up,) = [o for o in outs(b.on_timer(1.0 + TIMER_C + 1.0)) if o.flow == PHONE]
    assert gave_up.status == 408

    ok = with_body(response_to(to_pbx.data, 200, "OK", headers=[PBX_CONTACT]), PBX_ANSWER)
    (back,) = outs(a.on_message(parse_message(ok), PBX_TCP, 190.0))
    assert back.flow == LINK_AT_A and back.resp.get(PEER.lower()) == PBX_TCP.remote_ip
    (late,) = outs(b.on_message(parse_message(back.data), LINK_AT_B, 190.0))
    assert late.flow == PHONE and late.status == 200
    assert not late.resp.has(PEER.lower()) and PBX_TCP.remote_ip.encode() not in late.data
