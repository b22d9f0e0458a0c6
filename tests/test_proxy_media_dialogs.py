"""A live call's media is its dialog's: a stranger reusing its Call-ID cannot end or take it."""

from __future__ import annotations

from relay.media.effects import BindPorts, CloseLeg
from relay.media.ports import PortPool
from relay.media.session import MediaSessions
from relay.proxy.flow import Flow
from tests.proxyharness import (
    PBX_DOMAIN,
    PBX_TCP,
    PHONE_UDP,
    STRANGER,
    Out,
    feed,
    make_proxy,
    register_pbx,
    request,
    response_to,
)
from tests.test_proxy_core import OUTBOUND, PBX_CONTACT, SDP, phone_invite

ANSWER = SDP.replace("192.168.1.20", "10.1.1.1")


class Call:
    """A phone → PBX call with anchored media, established."""

    def __init__(self) -> None:
        self.media = MediaSessions("198.51.100.1", PortPool(10_000, 10_100))
        self.proxy, _ = make_proxy(self.media)
        for e in self.proxy.start(0.0):  # the shell binds every pair it is asked to
            if isinstance(e, BindPorts):
                self.proxy.on_ports_bound(tuple(e.ports), ())
        register_pbx(self.proxy, PBX_TCP, now=0.0)
        _, fwd = self.feed(phone_invite(call_id="live"), PHONE_UDP)
        ok = response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT, "Content-Type: application/sdp"])
        body = f"Content-Length: {len(ANSWER)}\r\n\r\n{ANSWER}".encode()
        ok = ok.replace(b"Content-Length: 0\r\n\r\n", body)
        (back,) = self.feed(ok, PBX_TCP)
        assert back.status == 200 and back.flow == PHONE_UDP
        assert self.media.sessions["live@test"].established

    def feed(self, data: bytes, flow: Flow) -> list[Out]:
        return feed(self.proxy, data, flow, 2.0)


def stranger_bye(call: Call) -> list[Out]:
    data = request("BYE", f"sip:201@{PBX_DOMAIN}", flow=STRANGER, via_host="203.0.113.9", call_id="live",
                   cseq=2, to_tag="guess", headers=[OUTBOUND])
    return call.feed(data, STRANGER)


def test_a_bye_the_far_end_refuses_leaves_the_media() -> None:
    call = Call()
    outs = stranger_bye(call)
    fwd = next(o for o in outs if o.flow == PBX_TCP)  # the PBX decides whose dialog it is
    (back,) = call.feed(response_to(fwd.data, 481, "Call/Transaction Does Not Exist"), PBX_TCP)
    assert back.status == 481 and back.flow == STRANGER
    assert "live@test" in call.media.sessions
    assert not any(isinstance(e, CloseLeg) for e in call.proxy.take_effects())


def test_a_bye_the_far_end_accepts_ends_the_media() -> None:
    call = Call()
    outs = stranger_bye(call)  # any BYE the PBX accepts is that call's BYE
    fwd = next(o for o in outs if o.flow == PBX_TCP)
    assert "live@test" in call.media.sessions  # not before the answer
    call.proxy.take_effects()
    (back,) = call.feed(response_to(fwd.data, 200, "OK"), PBX_TCP)
    assert back.status == 200
    assert "live@test" not in call.media.sessions
    assert sum(isinstance(e, CloseLeg) for e in call.proxy.take_effects()) == 2
    assert call.media.ports.in_use == 0


def test_a_new_invite_on_a_live_call_id_is_482_and_touches_nothing() -> None:
    call = Call()
    legs = [(leg.port, leg.rtp.latched) for leg in call.media.sessions["live@test"].legs()]
    call.proxy.take_effects()
    forged = phone_invite(flow=STRANGER, call_id="live", branch="z9hG4bKx", from_tag="evil")
    outs = call.feed(forged, STRANGER)
    resp = outs[-1]
    assert all(o.flow == STRANGER for o in outs)  # nothing reached the PBX
    assert resp.status == 482 and resp.flow == STRANGER
    assert [(leg.port, leg.rtp.latched) for leg in call.media.sessions["live@test"].legs()] == legs
    assert call.proxy.counters.get("media_refused_total", "call_id_in_use") == 1
    assert not any(isinstance(e, CloseLeg) for e in call.proxy.take_effects())


def test_one_source_gets_its_share_of_the_ports_and_others_keep_calling() -> None:
    media = MediaSessions("198.51.100.1", PortPool(10_000, 10_100), per_source=2, per_pbx=3)
    proxy, _ = make_proxy(media)
    for e in proxy.start(0.0):
        if isinstance(e, BindPorts):
            proxy.on_ports_bound(tuple(e.ports), ())
    register_pbx(proxy, PBX_TCP, now=0.0)

    def call(flow: Flow, n: int) -> list[Out]:
        return feed(proxy, phone_invite(flow=flow, call_id=f"share{n}", branch=f"z9hG4bKsh{n}"), flow, 1.0)

    first, second, third = call(PHONE_UDP, 1), call(PHONE_UDP, 2), call(PHONE_UDP, 3)
    for accepted in (first, second):
        assert [o.flow for o in accepted] == [PHONE_UDP, PBX_TCP]
    refused = third[-1]
    assert (refused.status, refused.flow) == (503, PHONE_UDP) and refused.msg.get("retry-after")
    assert all(o.flow == PHONE_UDP for o in third)  # nothing of it reached the PBX
    assert proxy.counters.get("media_refused_total", "over_share") == 1
    # another source still calls, until the PBX's share (3 calls) is full
    assert call(STRANGER, 4)[-1].flow == PBX_TCP
    assert call(STRANGER, 5)[-1].status == 503
    # a call that ends gives its share back
    (back,) = feed(proxy, response_to(first[-1].data, 486, "Busy Here"), PBX_TCP, 2.0)
    assert back.status == 486
    assert call(STRANGER, 6)[-1].flow == PBX_TCP


def test_an_answer_naming_another_calls_call_id_is_dropped_and_touches_nothing() -> None:
    """The Call-ID of a response is the callee's to write: a 200 to another INVITE (our
    branch, its own transaction) naming the live call's Call-ID is dropped, never anchored
    into that call's session nor passed up (``dropped_total{reason=response_call_id_mismatch}``)."""
    call = Call()
    legs = [(leg.port, leg.rtp.destination()) for leg in call.media.sessions["live@test"].legs()]
    _, fwd = call.feed(phone_invite(call_id="other", branch="z9hG4bKphone2"), PHONE_UDP)
    ok = response_to(fwd.data, 200, "OK", headers=[PBX_CONTACT, "Content-Type: application/sdp"])
    body = ANSWER.replace("10.1.1.1", "203.0.113.66")
    ok = ok.replace(b"Content-Length: 0\r\n\r\n", f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    ok = ok.replace(b"Call-ID: other@test", b"Call-ID: live@test")
    call.proxy.take_effects()
    assert call.feed(ok, PBX_TCP) == []
    assert call.proxy.counters.get("dropped_total", "response_call_id_mismatch") == 1
    assert [(leg.port, leg.rtp.destination()) for leg in call.media.sessions["live@test"].legs()] == legs


def test_the_ack_of_the_relays_own_refusal_ends_at_the_relay() -> None:
    """An INVITE the relay refuses itself (here 488: SDP it cannot anchor) is answered
    statelessly; the caller's ACK of that answer is hop by hop (RFC 3261 §17.1.1.3) and
    ends at the relay — it never reaches the PBX, which never saw the INVITE (Kamailio's
    sl module absorbs these ACKs the same way). Another ACK to that PBX still goes."""
    call = Call()
    sdp16 = SDP + "".join(f"m=audio {6000 + 2 * k} RTP/AVP 0\r\n" for k in range(15))  # over 6 streams
    bad = request("INVITE", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
                  branch="z9hG4bKbad1", call_id="bad", headers=[OUTBOUND, "Content-Type: application/sdp"],
                  body=sdp16)
    (refused,) = [o for o in call.feed(bad, PHONE_UDP) if o.status != 100]
    assert refused.status == 488 and refused.flow == PHONE_UDP
    tag = refused.resp.get("to").split("tag=")[1]
    ack = request("ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
                  branch="z9hG4bKbad1", call_id="bad", to_tag=tag, headers=[OUTBOUND])
    assert call.feed(ack, PHONE_UDP) == []
    assert call.proxy.counters.get("dropped_total", "ack_of_own_refusal") == 1
    other = request("ACK", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20", via_port=5062,
                    branch="z9hG4bKbad1", call_id="bad", to_tag="pbx-own-tag", headers=[OUTBOUND])
    assert [o.flow for o in call.feed(other, PHONE_UDP)] == [PBX_TCP]
