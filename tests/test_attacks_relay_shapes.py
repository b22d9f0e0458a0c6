"""Issue 10's attack table on a real relay: message shapes, media ports, Call-IDs.

Each test runs one row of the table against a real ``pbx-relay run`` (tests/attackrig.py:
per-source limits for everybody, media anchored) with the attacker on an address of its
own (127.0.0.66 / .67, both on lo), while a registered PBX and a phone on 127.0.0.1 call
through the relay. What is asserted is what crossed the wire and what the relay counts:
each attack message's answer, ``/metrics``, RTP packets counted at the far ends, the
PBX's registration; and the relay's RSS back within 50 MB of where it was.

Rows: "one 30 KB UDP datagram with ~1,900 Route entries" (docs/security.md, "Messages
built to cost CPU"), "156 INVITEs with 16 m= lines held all media ports" and one source's
share of the ports ("Holding every media port"), "a BYE or an INVITE reusing a live call's
Call-ID from a stranger" ("Ending or taking someone else's call by its Call-ID").
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from tests.attackrig import (
    ATTACKER,
    ATTACKER2,
    LEGIT,
    Rig,
    call_carries_rtp,
    make_rig,
    pbx_still_registers,
    rig,  # noqa: F401
)
from tests.media_peers import (
    Call,
    MediaEndpoint,
    PbxUa,
    Phone,
    establish,
    exchange,
    hang_up,
    wait_metric,
)
from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import SERIAL, Msg, Pbx, Stream, parse, rand, request

M = "pbx_relay_"
PORTS = f"{M}media_ports_in_use"
SESSIONS = f"{M}media_sessions"
ENDED = f"{M}media_sessions_ended_total"
INTERNAL = f"{M}internal_errors_total"
ROUTES = 1_900  # the threat's datagram: ~30 KB, ~1,900 Route entries
FOREIGN = "sip:victim@203.0.113.9"  # a Request-URI of no domain of the relay's


def _collect(sock: socket.socket, want: Callable[[Msg], bool], n: int, timeout: float = 5.0) -> list[Msg]:
    """Messages arriving on ``sock`` for which ``want`` holds, until ``n`` of them or ``timeout``."""
    out: list[Msg] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            m = parse(sock.recv(70_000))
            if want(m):
                out.append(m)
    return out


def _finals_by_call_id(msgs: list[Msg]) -> dict[str, int]:
    return {m.get("call-id") or "": m.status or 0 for m in msgs if (m.status or 0) >= 200}


def _reaching_pbx(pbx: PbxUa, quiet: float = 0.2) -> list[str]:
    """The start lines of what the PBX's connection gets until it is quiet for ``quiet`` s."""
    out = []
    while (m := pbx.stream.recv(quiet)) is not None:
        out.append(m.start.split()[0])
    return out


def _sdp(host: str, streams: int, first_port: int = 40_000) -> bytes:
    """An offer with ``streams`` audio sections (nobody listens on its ports)."""
    lines = ["v=0", f"o=- 1 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0"]
    for k in range(streams):
        lines += [f"m=audio {first_port + 2 * k} RTP/AVP 0", "a=rtpmap:0 PCMU/8000"]
    return ("\r\n".join(lines) + "\r\n").encode()


def _rtp_both_ways(call: Call, n: int) -> None:
    """``n`` more RTP packets each way arrive at the far ends of a call in progress."""
    got_a, got_b = call.a.count(), call.b.count()
    exchange(call.a, call.b, n)
    assert call.b.wait_for(got_b + n) == got_b + n, f"PBX got {call.b.count() - got_b} of {n}"
    assert call.a.wait_for(got_a + n) == got_a + n, f"phone got {call.a.count() - got_a} of {n}"


def _healthy_after(r: Rig) -> None:
    """After the attack: the legit phone calls the PBX with RTP, the PBX registers again,
    nothing hit a bug, and the RSS is back within 50 MB."""
    call_carries_rtp(r)
    pbx_still_registers(r)
    assert r.relay.alive() and r.relay.metric(INTERNAL) == 0, r.relay.log()[-3000:]
    r.assert_rss_back()


def _legit_call(r: Rig) -> Call:
    a, b = MediaEndpoint(LEGIT), MediaEndpoint(LEGIT)
    r.add(a)
    r.add(b)
    return establish(r.phone, r.pbx, a, b)


# ----------------------------------------------------- a. 1,900 Route entries
def _route_datagram(src: tuple[str, int], k: int) -> bytes:
    """~30 KB: 1,900 Route entries, 60 to a Route line, to a foreign Request-URI."""
    entries = [f"<sip:{i}@h;lr>" for i in range(ROUTES)]  # short entries: 1,900 in 30 KB
    routes = [f"Route: {','.join(entries[j:j + 60])}" for j in range(0, ROUTES, 60)]
    return request("INVITE", FOREIGN, local=src, call_id=f"routes{k}-{rand(4)}", extra=routes)


def test_nine_datagrams_of_1900_routes_each_get_513_and_calls_go_on(rig: Rig) -> None:  # noqa: F811
    """Nine 30 KB datagrams of 1,900 Route entries each (at d9440f1: 3.6 s of CPU each,
    the relay frozen 31 s) sent in the middle of a call: each is answered 513 (over
    MAX_ROUTES, relay/sip/limits.py), counted as a parse error, never forwarded; the call
    in progress carries RTP throughout, and a new call and a REGISTER go through after."""
    relay = rig.relay
    call = _legit_call(rig)
    _rtp_both_ways(call, 25)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ATTACKER, 0))
        datagrams = [_route_datagram(s.getsockname(), k) for k in range(9)]
        assert all(28_000 <= len(d) <= 32_000 for d in datagrams), [len(d) for d in datagrams]
        assert datagrams[0].count(b";lr>") == ROUTES
        for d in datagrams:
            s.sendto(d, (relay.host, relay.udp))
        _rtp_both_ways(call, 25)  # during: the call's media is not held up
        answers = _collect(s, lambda m: (m.status or 0) >= 200, 9)
    expected = {parse(d).get("call-id"): 513 for d in datagrams}
    assert _finals_by_call_id(answers) == expected, [a.start for a in answers]
    assert relay.metric(f'{M}parse_errors_total{{status="513"}}') == 9
    assert relay.metric(f"{M}requests_forwarded_total") == 1 + 1  # the call's INVITE and ACK only
    assert rig.pbx.stream.recv(0.1) is None, "something reached the PBX"
    _rtp_both_ways(call, 25)
    hang_up(call)
    assert wait_metric(relay, PORTS, 0) == 0
    _healthy_after(rig)


# ------------------------------------------------------- b. media ports held
def test_156_invites_of_16_streams_are_refused_488_and_hold_no_port(rig: Rig) -> None:  # noqa: F811
    """156 INVITEs with 16 m= lines each from one phone to a ringing PBX (at d9440f1 they
    held all 10,000 media ports): each is answered 488 by the relay (over
    MAX_MEDIA_STREAMS, 6), none reaches the PBX, no port is taken, and the legit phone
    calls the PBX with RTP both ways."""
    relay = rig.relay
    attacker = Phone(relay, host=ATTACKER)
    rig.add(attacker)
    offer = _sdp(ATTACKER, 16)
    assert offer.count(b"m=audio") == 16
    calls = [attacker.invite(offer) for _ in range(156)]
    finals = [c.final().status for c in calls]  # each ACKed (RFC 3261 §17.1.1.3)
    assert finals == [488] * 156, sorted(set(finals))
    assert relay.metric(f'{M}media_refused_total{{reason="unusable_sdp"}}') == 156
    assert relay.metric(PORTS) == 0 and relay.metric(SESSIONS) == 0
    # Nothing reaches the PBX: not the INVITEs, nor the ACKs of the relay's own 488s
    # (their To tag is the relay's: they end there, docs/relay.md).
    assert _reaching_pbx(rig.pbx) == [], "an attack INVITE or ACK reached the PBX"
    assert relay.metric(f'{M}dropped_total{{reason="ack_of_own_refusal"}}') == 156
    assert relay.metric(f"{M}requests_forwarded_total") == 0
    _healthy_after(rig)


def test_one_source_gets_its_share_of_media_ports_and_others_keep_calling(relay_factory) -> None:  # type: ignore[no-untyped-def]
    """With ``[limits] media_calls_per_source = 3``: an attacker opening calls of the
    largest SDP allowed (6 m= lines) to a PBX that rings and never answers holds 3 calls'
    ports (6 streams x 2 legs x 2 ports each) and no more: its next INVITEs are answered
    503 with Retry-After by the relay and never reach the PBX; another source still gets
    its own share; the legit phone calls the PBX with RTP both ways; once the PBX turns
    the calls down every port is free again."""
    r = make_rig(relay_factory, "[limits]\nmedia_calls_per_source = 3\n")
    try:
        relay = r.relay
        attackers = [Phone(relay, host=ATTACKER), Phone(relay, host=ATTACKER2)]
        for a in attackers:
            r.add(a)
        offer = _sdp(ATTACKER, 6)
        held = []
        for _ in range(3):
            call = attackers[0].invite(offer)
            inv = r.pbx.request("INVITE")  # the PBX rings: the call stays pending
            assert inv.get("call-id") == call.call_id
            r.pbx.reply(inv, 180, "Ringing", tag=rand(4))
            held.append(inv)
        assert wait_metric(relay, PORTS, 3 * 6 * 2 * 2) == 72

        over = [attackers[0].invite(offer) for _ in range(2)]
        for c in over:
            resp = c.final()
            assert resp.status == 503, resp.raw
            assert (resp.get("retry-after") or "").isdigit(), resp.raw
        assert relay.metric(f'{M}media_refused_total{{reason="over_share"}}') == 2
        # Neither those INVITEs nor the ACKs of the relay's own 503s reach the PBX.
        assert _reaching_pbx(r.pbx) == [], "an INVITE over the share, or its ACK, reached the PBX"
        assert relay.metric(f'{M}dropped_total{{reason="ack_of_own_refusal"}}') == 2
        assert relay.metric(PORTS) == 72

        # Another source has a share of its own, the legit phone too.
        other = attackers[1].invite(_sdp(ATTACKER2, 1))
        inv = r.pbx.request("INVITE")
        assert inv.get("call-id") == other.call_id
        r.pbx.reply(inv, 486, "Busy Here", tag=rand(4))
        assert other.final().status == 486
        r.pbx.request("ACK")
        call_carries_rtp(r)
        assert relay.metric(PORTS) == 72

        for inv in held:  # the PBX turns the attacker's calls down: their ports come back
            r.pbx.reply(inv, 486, "Busy Here", tag=rand(4))
        assert wait_metric(relay, PORTS, 0) == 0
        assert wait_metric(relay, SESSIONS, 0) == 0
        _healthy_after(r)
    finally:
        r.close()


# ------------------------------------------------- c. a live call's Call-ID
def _stranger_request(method: str, src: tuple[str, int], call: Call, *, to_tag: str | None,
                      body: bytes = b"") -> bytes:
    """``method`` from a stranger to the PBX's serial, on the live call's Call-ID, with
    tags of its own (no Route: it was never part of that dialog)."""
    uri = f"sip:100@{SERIAL}.{DOMAIN}"
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {src[0]}:{src[1]};branch=z9hG4bK{rand()};rport",
        "Max-Forwards: 70",
        f"From: <sip:201@{SERIAL}.{DOMAIN}>;tag={rand(4)}",
        f"To: <{uri}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call.phone.call_id}",
        f"CSeq: 7 {method}",
        f"Contact: <sip:201@{src[0]}:{src[1]}>",
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_strangers_bye_or_invite_on_a_live_call_id_leaves_its_media(rig: Rig) -> None:  # noqa: F811
    """A live call's Call-ID reused by a stranger (at d9440f1 either tore the call's
    media down): a BYE with forged tags reaches the PBX, which does not know that dialog
    and answers 481, and the stranger gets that 481; a new INVITE (no To tag) on that
    Call-ID is answered 482 by the relay and never reaches the PBX
    (``media_refused_total{reason="call_id_in_use"}``). The call keeps its ports and
    carries RTP both ways after each, and ends normally."""
    relay = rig.relay
    call = _legit_call(rig)
    _rtp_both_ways(call, 25)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ATTACKER, 0))
        src = s.getsockname()

        s.sendto(_stranger_request("BYE", src, call, to_tag=rand(4)), (relay.host, relay.udp))
        bye = rig.pbx.request("BYE")
        assert bye.get("call-id") == call.phone.call_id
        rig.pbx.reply(bye, 481, "Call/Transaction Does Not Exist")
        got = _collect(s, lambda m: (m.status or 0) >= 200, 1)
        assert [m.status for m in got] == [481], [m.start for m in got]
        _rtp_both_ways(call, 25)
        assert relay.metric(SESSIONS) == 1 and relay.metric(PORTS) == 4 and relay.metric(ENDED) == 0

        s.sendto(_stranger_request("INVITE", src, call, to_tag=None, body=_sdp(ATTACKER, 1)),
                 (relay.host, relay.udp))
        got = _collect(s, lambda m: (m.status or 0) >= 200, 1)
        assert [m.status for m in got] == [482], [m.start for m in got]
        assert relay.metric(f'{M}media_refused_total{{reason="call_id_in_use"}}') == 1
        assert rig.pbx.stream.recv(0.1) is None, "the stranger's INVITE reached the PBX"
    _rtp_both_ways(call, 25)
    assert relay.metric(SESSIONS) == 1 and relay.metric(PORTS) == 4 and relay.metric(ENDED) == 0
    hang_up(call)
    assert wait_metric(relay, ENDED, 1) == 1 and relay.metric(PORTS) == 0
    _healthy_after(rig)


def _pbx_from(relay: RelayProc, serial: str, source: str) -> PbxUa:
    """A PBX phoned home from ``source`` and registered (``PbxUa`` always uses 127.0.0.1)."""
    pbx = Pbx.__new__(Pbx)
    pbx.relay, pbx.serial, pbx.stream = relay, serial, Stream(relay, source=source)
    pbx.call_id, pbx.cseq = rand(), 0
    assert pbx.register(600).status == 200
    ua = PbxUa.__new__(PbxUa)
    ua.pbx, ua.stream, ua.relay, ua.pending = pbx, pbx.stream, relay, []
    return ua


STRANGER_PBX = "9876543210"  # the stranger's own PBX on the relay (another customer)
IN_USE = f'{M}media_refused_total{{reason="call_id_in_use"}}'


def _to_stranger_pbx(data: bytes) -> bytes:
    return data.replace(f"@{SERIAL}.{DOMAIN}".encode(), f"@{STRANGER_PBX}.{DOMAIN}".encode())


def _with_a_strangers_pbx(relay_factory) -> tuple[Rig, PbxUa, Call]:  # type: ignore[no-untyped-def]
    """The rig, plus the stranger's own PBX phoned home from ATTACKER2; the legit call up,
    carrying RTP."""
    r = make_rig(relay_factory, serials=(SERIAL, STRANGER_PBX))
    own = _pbx_from(r.relay, STRANGER_PBX, ATTACKER2)
    r.add(own)
    call = _legit_call(r)
    _rtp_both_ways(call, 25)
    return r, own, call


def _untouched_then_ended(r: Rig, call: Call) -> None:
    """The call kept its session and ports and carries RTP; then it ends normally."""
    relay = r.relay
    _rtp_both_ways(call, 25)
    assert relay.metric(SESSIONS) == 1 and relay.metric(ENDED) == 0 and relay.metric(PORTS) == 4
    hang_up(call)
    assert wait_metric(relay, ENDED, 1) == 1 and relay.metric(PORTS) == 0
    _healthy_after(r)


def test_a_bye_through_another_pbx_on_a_live_call_id_is_refused_and_the_call_goes_on(
        relay_factory) -> None:  # type: ignore[no-untyped-def]
    """The stranger has a PBX of its own on the relay (another customer, phoned home from
    ATTACKER2) and sends a BYE on the live call's Call-ID towards it: a Call-ID names one
    call, so the relay answers 481 itself, the stranger's PBX never sees it, and the call
    keeps its media session and ports and carries RTP both ways (sessions are found by
    Call-ID: before, the stranger's PBX's 200 ended the victim's call)."""
    r, own, call = _with_a_strangers_pbx(relay_factory)
    try:
        relay = r.relay
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ATTACKER, 0))
            for method, body in (("BYE", b""), ("UPDATE", _sdp(ATTACKER, 9))):
                req = _stranger_request(method, s.getsockname(), call, to_tag=rand(4), body=body)
                s.sendto(_to_stranger_pbx(req), (relay.host, relay.udp))
                answers = _collect(s, lambda m: (m.status or 0) >= 200, 1)
                assert [m.status for m in answers] == [481], [m.start for m in answers]
        assert own.stream.recv(0.2) is None, "the stranger's request reached its PBX"
        assert relay.metric(IN_USE) == 2
        _untouched_then_ended(r, call)
    finally:
        r.close()


def test_another_pbx_answering_with_a_live_call_id_does_not_touch_that_call(
        relay_factory) -> None:  # type: ignore[no-untyped-def]
    """The stranger's PBX answers a BYE of its own dialog, but writes the victim's Call-ID
    into its 200 (the Call-ID of a response is the responder's to write): the relay's Via
    names the request's call (``ci``), so that 200 is dropped, ends nothing, and the call
    carries RTP."""
    r, own, call = _with_a_strangers_pbx(relay_factory)
    try:
        relay = r.relay
        victim = call.phone.call_id
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ATTACKER, 0))
            req = _stranger_request("BYE", s.getsockname(), call, to_tag=rand(4))
            own_call = f"own-{rand()}".encode()
            s.sendto(_to_stranger_pbx(req).replace(victim.encode(), own_call), (relay.host, relay.udp))
            got = own.request("BYE")
            assert got.get("call-id") == own_call.decode()
            got.headers = [(n, victim if n.lower() == "call-id" else v) for n, v in got.headers]
            own.reply(got, 200, "OK")
            assert _collect(s, lambda m: (m.status or 0) >= 200, 1, timeout=0.5) == []
        assert relay.metric(f'{M}dropped_total{{reason="response_call_id_mismatch"}}') == 1
        _untouched_then_ended(r, call)
    finally:
        r.close()
