"""Media through a real relay process: RTP/RTCP both ways, latching, SRTP, leaks, re-INVITE, hold.

Every test runs on both media backends: ``userspace`` (the relay on 127.0.0.1,
as a user would start it) and ``kernel`` (tests/kernelnet.py: the relay in a
network namespace of its own with nftables forwarding every latched stream, the
test's peers in another; needs root). With the kernel backend the relay's
packet counters follow the kernel's a moment later (it reads them a few times
a second), so counts are waited for rather than read once.

The signalling is done by the plain-socket peers of ``tests/media_peers.py`` (a
phone over UDP, the PBX on its phone-home TCP connection) or by SIPp; the media
endpoints are Python UDP sockets whose addresses go into the SDP. Each endpoint
sends to the relay address the SDP *it received* names and records everything it
gets, so every assertion is about what crossed the relay on the wire.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import media_scenarios as ms
from tests.conftest import needs_sipp
from tests.kernelnet import OTHER_IP as KERNEL_OTHER_IP
from tests.kernelnet import kernel_relay, why_no_kernel
from tests.media_peers import (
    MediaEndpoint,
    Peers,
    Phone,
    establish,
    exchange,
    hang_up,
    pace,
    pbx_reinvite,
    phone_reinvite,
    rtp_header,
    wait_metric,
)
from tests.realpeers import DOMAIN, RelayProc, free_port, sipp
from tests.sipclient import SERIAL, assert_healthy
from tests.sipp_scenarios import CALL_ID_FORMAT

M = "pbx_relay_"
PACKETS = f"{M}media_packets_total"
OCTETS = f"{M}media_bytes_total"
SESSIONS = f"{M}media_sessions"
PORTS = f"{M}media_ports_in_use"
ENDED = f"{M}media_sessions_ended_total"
UNLATCHED = f'{M}media_dropped_total{{reason="unlatched_source"}}'
NO_DEST = f'{M}media_dropped_total{{reason="no_destination"}}'
NO_MEDIA = f'{M}media_timeouts_total'
OTHER_IP = "127.0.0.2"  # another local address: a stranger, or the phone on another network
_NO_KERNEL = why_no_kernel()
BACKENDS = ["userspace", pytest.param("kernel", marks=[
    pytest.mark.netns, pytest.mark.skipif(_NO_KERNEL is not None, reason=_NO_KERNEL or "")])]


def _bindable(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


needs_other_ip = pytest.mark.skipif(not _bindable(OTHER_IP), reason=f"{OTHER_IP} is not bindable here")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _relay(backend: str, relay_factory, tmp_path: Path, media: str = "") -> Iterator[RelayProc]:  # type: ignore[no-untyped-def]
    if backend == "userspace":
        yield relay_factory(media=media)
        return
    with kernel_relay(f"kc{os.getpid()}-", tmp_path / "kernel-relay", media) as (_net, relay):
        yield relay


@pytest.fixture
def relay(backend: str, relay_factory, tmp_path: Path) -> Iterator[RelayProc]:  # type: ignore[no-untyped-def]
    yield from _relay(backend, relay_factory, tmp_path)


@pytest.fixture
def quick_relay(backend: str, relay_factory, tmp_path: Path) -> Iterator[RelayProc]:  # type: ignore[no-untyped-def]
    yield from _relay(backend, relay_factory, tmp_path, "no_media_timeout = 2.0")


def _other_ip(relay: RelayProc) -> str:
    """Another address of the peers: a stranger, or the phone on another network."""
    return OTHER_IP if relay.peer_host == "127.0.0.1" else KERNEL_OTHER_IP


@pytest.fixture
def peers(relay: RelayProc) -> Iterator[Peers]:
    p = Peers(relay)
    yield p
    p.close()


def _sdp_lines(body: bytes) -> list[bytes]:
    return body.split(b"\r\n")


def _unchanged_except_addresses(sent: bytes, got: bytes) -> None:
    """Every line but c=, m= and a=rtcp arrives byte for byte and in order."""
    moved = (b"c=", b"m=", b"a=rtcp:")
    keep = [line for line in _sdp_lines(sent) if not line.startswith(moved)]
    kept = [line for line in _sdp_lines(got) if not line.startswith(moved)]
    assert kept == keep, (sent, got)


def _two_fifos(positions: list[int]) -> bool:
    """The arrival order two FIFO paths in turn can produce: the packets sent up to
    some index came one way (userspace), the rest the other (kernel), each path in
    order - so only a packet still queued in userspace when its stream's entries
    reached the kernel can be overtaken (docs/media.md, "Kernel forwarding")."""
    def ordered(xs: list[int]) -> bool:
        return all(x < y for x, y in zip(xs, xs[1:], strict=False))
    return any(ordered([p for p in positions if p <= k]) and ordered([p for p in positions if p > k])
               for k in [-1, *positions])


def _assert_delivered(sender: MediaEndpoint, receiver: MediaEndpoint, since: int = 0,
                      sent_since: int = 0, *, relay: RelayProc) -> None:
    """≥ 99.9 % of what ``sender`` sent (from index ``sent_since``) reached ``receiver``
    (from its ``since``-th RTP packet on), each packet byte for byte, in order, once,
    and from the relay port the receiver sends to (symmetric RTP). With the kernel
    backend "in order" allows the one handover from userspace to the kernel."""
    sent = sender.talker.sent[sent_since:]
    got = [r for r in receiver.received if r.kind == "rtp"][since:]
    assert len(got) >= 0.999 * len(sent), f"{len(got)} of {len(sent)} packets arrived"
    datas = [r.data for r in got]
    assert len(set(datas)) == len(datas), "a packet arrived twice"
    index = {p: i for i, p in enumerate(sent)}
    positions = [index.get(d) for d in datas]
    assert None not in positions, "a packet arrived that the far end never sent (or changed)"
    if relay.peer_host == "127.0.0.1":
        assert positions == sorted(positions), "packets were reordered"  # type: ignore[type-var]
    else:
        assert _two_fifos(positions), "packets were reordered beyond the kernel handover"  # type: ignore[arg-type]
    assert {r.src for r in got} == {receiver.relay_rtp}, "media came from another port than the SDP said"


# ------------------------------------------------------------------ 1. audio
def test_audio_both_ways_through_the_relay(relay: RelayProc, peers: Peers) -> None:
    a, b = peers.endpoint(), peers.endpoint(pt=0)
    before = relay.metrics()
    call = establish(peers.phone, peers.pbx, a, b)
    # Each side was told the relay's address, never the other side's.
    assert a.relay_rtp != b.rtp_addr and b.relay_rtp != a.rtp_addr
    assert a.relay_rtp is not None and b.relay_rtp is not None
    assert a.relay_rtp[0] == b.relay_rtp[0] == relay.host
    assert a.relay_rtp != b.relay_rtp
    _unchanged_except_addresses(a.sdp(), call.pbx.offer.body)
    assert relay.metric(SESSIONS) == 1 and relay.metric(PORTS) == 4

    n = 1000  # each way, 500 packets/s: 2 s of two G.711 calls' worth
    exchange(a, b, n, rate=500)
    for _ in range(5):
        a.send_rtcp()
        b.send_rtcp()
    assert a.wait_for(n) >= 0.999 * n and b.wait_for(n) >= 0.999 * n
    a.wait_for(5, "rtcp", quiet=0)
    b.wait_for(5, "rtcp", quiet=0)
    _assert_delivered(a, b, relay=relay)
    _assert_delivered(b, a, relay=relay)
    assert [r.src for r in a.received if r.kind == "rtcp"] == [a.relay_rtcp] * 5
    assert [r.src for r in b.received if r.kind == "rtcp"] == [b.relay_rtcp] * 5

    # The relay counts exactly what it forwarded: what the two far ends received.
    forwarded = before.get(PACKETS, 0) + len(a.received) + len(b.received)
    assert wait_metric(relay, PACKETS, forwarded) == forwarded
    octets = before.get(OCTETS, 0) + sum(len(r.data) for r in a.received + b.received)
    assert wait_metric(relay, OCTETS, octets) == octets
    after = relay.metrics()
    assert after[PACKETS] - before.get(PACKETS, 0) == len(a.received) + len(b.received)
    assert after[OCTETS] - before.get(OCTETS, 0) == sum(len(r.data) for r in a.received + b.received)
    assert len(a.received) + len(b.received) >= 0.999 * (2 * n + 10)
    assert after.get(UNLATCHED, 0) == 0 and after.get(NO_DEST, 0) == 0

    hang_up(call)
    assert wait_metric(relay, SESSIONS, 0) == 0
    assert relay.metric(PORTS) == 0
    assert relay.metric(PACKETS) == after[PACKETS]  # ended legs keep their count


@needs_sipp
@pytest.mark.sipp
def test_sipp_rtp_stream_reaches_the_pbx(relay: RelayProc, peers: Peers, tmp_path: Path) -> None:
    """SIPp's own rtp_stream plays an A-law file from the phone; the PBX endpoint
    gets every packet and the file back byte for byte, and its own audio goes back
    to SIPp's port."""
    frames = 100  # 2 s
    audio = ms.write_alaw_tone(tmp_path / "tone.alaw", frames)
    b = peers.endpoint(pt=8)
    peers.pbx.pbx.assert_bound()
    run = sipp(tmp_path, "phone", ms.phone_plays_file(tmp_path / "tone.alaw", 8, 2600),
               f"{relay.host}:{relay.udp}", local_ip=relay.peer_host, local_port=free_port(),
               variables={"serial": SERIAL, "domain": DOMAIN})
    try:
        call = peers.pbx.answer(b.sdp())
        b.learn(call.offer.body)
        call.ack()
        b.talker.sent.clear()
        pace(50, frames, lambda _: b.send_rtp())
        bye = peers.pbx.request("BYE", timeout=10)
        call.ok(bye)
        assert run.wait(15) == 0, run.errors()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    got = b.rtp_payloads()
    assert len(got) >= 0.999 * frames, f"{len(got)} of {frames}"
    heads = [rtp_header(p) for p in got]
    assert {h[0] for h in heads} == {8} and len({h[3] for h in heads}) == 1
    assert [h[1] for h in heads] == [(heads[0][1] + i) & 0xFFFF for i in range(len(heads))]
    assert b"".join(p[12:] for p in got) == audio, "the audio changed on the way"
    m = relay.metrics()
    assert m[PACKETS] == 2 * frames, m  # SIPp's and the PBX's, nothing lost in the relay
    assert m.get(UNLATCHED, 0) == 0 and m.get(NO_DEST, 0) == 0
    assert m[SESSIONS] == 0 and m[PORTS] == 0


@needs_sipp
@pytest.mark.sipp
def test_sipp_pbx_rtp_stream_reaches_the_phone(relay: RelayProc, tmp_path: Path) -> None:
    """The other way round: SIPp is the PBX (phoned home over TCP) and plays the
    file after answering; the phone endpoint gets it whole."""
    frames = 100
    audio = ms.write_alaw_tone(tmp_path / "moh.alaw", frames, hz=300)
    run = sipp(tmp_path, "pbx", ms.pbx_answers_and_plays_file(tmp_path / "moh.alaw", 8),
               f"{relay.host}:{relay.tcp}", transport="t1", local_ip=relay.peer_host, local_port=free_port(),
               variables={"serial": SERIAL, "domain": DOMAIN}, auth=(SERIAL, relay.secrets[SERIAL]))
    phone, a = Phone(relay), MediaEndpoint(relay.peer_host, pt=8)
    try:
        relay.wait_registered(SERIAL)
        # SIPp matches the INVITE to its call 1 by Call-ID (tests/sipp_scenarios.py).
        pc = phone.invite(a.sdp(), call_id=CALL_ID_FORMAT.replace("%u", "1"))
        resp = pc.final()
        assert resp.status == 200, resp.raw
        a.learn(resp.body)
        pace(50, frames, lambda _: a.send_rtp())
        a.wait_for(frames, timeout=3)
        assert pc.bye().status == 200
        assert run.wait(15) == 0, run.errors()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        phone.close()
        a.close()
    got = a.rtp_payloads()
    assert len(got) >= 0.999 * frames, f"{len(got)} of {frames}"
    assert {rtp_header(p)[0] for p in got} == {8}
    assert b"".join(p[12:] for p in got) == audio, "the audio changed on the way"
    assert {r.src for r in a.received} == {a.relay_rtp}
    m = relay.metrics()
    assert m[PACKETS] == 2 * frames, m
    assert m.get(UNLATCHED, 0) == 0 and m.get(NO_DEST, 0) == 0
    assert m[SESSIONS] == 0 and m[PORTS] == 0


# --------------------------------------------------------------- 2. latching
@needs_other_ip
def test_third_party_sender_is_dropped(relay: RelayProc, peers: Peers) -> None:
    a, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a, b)
    assert a.relay_rtp and b.relay_rtp and a.relay_rtcp
    # Before anyone latched: a stranger on another IP guesses the phone's relay port.
    early = peers.endpoint(_other_ip(relay))
    early.talker.payload = b"INJECTED" * 20
    early.send_rtp(20, a.relay_rtp)
    assert wait_metric(relay, UNLATCHED, 20, timeout=2) == 20

    exchange(a, b, 20)
    a.send_rtcp()
    b.send_rtcp()
    assert b.wait_for(20) == 20 and a.wait_for(20) == 20
    # Latched now. Strangers: another IP at the phone's port, the signalling IP
    # but another port at the PBX's port and at the phone's RTCP port.
    s1 = peers.endpoint(_other_ip(relay))
    s2 = peers.endpoint(relay.peer_host)
    for s in (s1, s2):
        s.talker.payload = b"INJECTED" * 20
    assert wait_metric(relay, PACKETS, 42) == 42  # 20 RTP each way and one RTCP each
    before = relay.metrics()

    def step(_: int) -> None:
        a.send_rtp()
        b.send_rtp()
        s1.send_rtp(1, a.relay_rtp)
        s2.send_rtp(1, b.relay_rtp)
        s2.send_rtcp(a.relay_rtcp)

    pace(500, 300, step)
    b.wait_for(320)
    a.wait_for(320)
    assert wait_metric(relay, PACKETS, before[PACKETS] + 600) == before[PACKETS] + 600
    after = relay.metrics()
    assert after[UNLATCHED] - before[UNLATCHED] == 900
    assert after[PACKETS] - before[PACKETS] == 600  # only the call's own packets
    _assert_delivered(a, b, relay=relay)
    _assert_delivered(b, a, relay=relay)
    for e in (a, b):
        assert all(b"INJECTED" not in r.data for r in e.received)
        assert e.count("rtcp") == 1
    for s in (early, s1, s2):
        assert s.received == [], "the relay answered a stranger"
    hang_up(call)
    assert wait_metric(relay, PORTS, 0) == 0


# ------------------------------------------------------------------ 3. SRTP
def test_srtp_passes_untouched(relay: RelayProc, peers: Peers) -> None:
    a = peers.endpoint(random_payload=True)
    b = peers.endpoint(random_payload=True)
    crypto_a = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:32"
    crypto_a2 = "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj"
    crypto_b = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
    offer = a.sdp(proto="RTP/SAVP", attrs=[crypto_a, crypto_a2, "a=encryption:required"])
    answer = b.sdp(proto="RTP/SAVP", attrs=[crypto_b])
    call = establish(peers.phone, peers.pbx, a, b, offer=offer, answer=answer)

    got_offer, got_answer = call.pbx.offer.body, call.phone.answer.body  # type: ignore[union-attr]
    for line in (crypto_a, crypto_a2):
        assert line.encode() in _sdp_lines(got_offer)
    assert crypto_b.encode() in _sdp_lines(got_answer)
    assert b"RTP/SAVP" in got_offer and b"RTP/SAVP" in got_answer
    _unchanged_except_addresses(offer, got_offer)
    _unchanged_except_addresses(answer, got_answer)

    n = 200
    exchange(a, b, n)
    assert a.wait_for(n) == n and b.wait_for(n) == n
    _assert_delivered(a, b, relay=relay)  # random bytes after the header: the relay changed none
    _assert_delivered(b, a, relay=relay)
    hang_up(call)


# -------------------------------------------------------------- 4. no leaks
def test_thousand_calls_then_cancel_and_reject_leak_nothing(relay: RelayProc, peers: Peers) -> None:
    a, b = peers.endpoint(), peers.endpoint()
    before = relay.metrics()
    calls = 1000
    for i in range(calls):
        call = establish(peers.phone, peers.pbx, a, b)
        if i % 100 == 0:  # now and then, check the fresh ports really carry audio
            sent_a, sent_b, got_a, got_b = len(a.talker.sent), len(b.talker.sent), a.count(), b.count()
            exchange(a, b, 5, rate=1000)
            assert b.wait_for(got_b + 5, quiet=0) == got_b + 5 and a.wait_for(got_a + 5, quiet=0) == got_a + 5
            _assert_delivered(a, b, since=got_b, sent_since=sent_a, relay=relay)
            _assert_delivered(b, a, since=got_a, sent_since=sent_b, relay=relay)
        hang_up(call)
        if i == calls // 2:
            m = relay.metrics()
            assert m[SESSIONS] == 0 and m[PORTS] == 0, m
    m = relay.metrics()
    assert m[ENDED] - before.get(ENDED, 0) == calls
    assert m[SESSIONS] == 0 and m[PORTS] == 0, m

    # CANCEL while ringing.
    pc = peers.phone.invite(a.sdp())
    inv = peers.pbx.request("INVITE")
    tag = "cxl1"
    peers.pbx.reply(inv, 180, "Ringing", tag=tag)
    assert relay.metric(SESSIONS) == 1
    assert pc.cancel().status == 200
    cancel = peers.pbx.request("CANCEL")
    peers.pbx.reply(cancel, 200, "OK")
    peers.pbx.reply(inv, 487, "Request Terminated", tag=tag)
    assert pc.final().status == 487
    assert wait_metric(relay, SESSIONS, 0) == 0 and relay.metric(PORTS) == 0

    # Busy, after early media (183 with SDP) that really flowed.
    pc = peers.phone.invite(a.sdp())
    inv = peers.pbx.request("INVITE")
    b.learn(inv.body)
    peers.pbx.reply(inv, 183, "Session Progress", body=b.sdp(), tag="busy1")
    early = peers.phone.take(lambda m: m.status == 183)
    a.learn(early.body)
    got_a = a.count()
    b.send_rtp(10)
    assert a.wait_for(got_a + 10, quiet=0) == got_a + 10
    assert relay.metric(SESSIONS) == 1 and relay.metric(PORTS) == 4
    peers.pbx.reply(inv, 486, "Busy Here", tag="busy1")
    assert pc.final().status == 486
    assert wait_metric(relay, SESSIONS, 0) == 0 and relay.metric(PORTS) == 0

    # Busy straight away.
    pc = peers.phone.invite(a.sdp())
    inv = peers.pbx.request("INVITE")
    peers.pbx.reply(inv, 486, "Busy Here", tag="busy2")
    assert pc.final().status == 486
    m = relay.metrics()
    assert m[SESSIONS] == 0 and m[PORTS] == 0, m
    assert m[ENDED] - before.get(ENDED, 0) == calls + 3
    assert_healthy(relay)


def test_silent_call_times_out_rtcp_keeps_a_held_call(quick_relay: RelayProc) -> None:
    """no_media_timeout = 2 s: a call whose endpoints stop sending loses its media
    (ports freed); a call on hold that only sends RTCP keeps it."""
    relay = quick_relay
    p = Peers(relay)
    try:
        a1, b1, a2, b2 = (p.endpoint() for _ in range(4))
        phone2 = p.add(Phone(relay))
        silent = establish(p.phone, p.pbx, a1, b1)
        held = establish(phone2, p.pbx, a2, b2)
        assert relay.metric(SESSIONS) == 2 and relay.metric(PORTS) == 8
        exchange(a1, b1, 25)
        exchange(a2, b2, 25)
        assert b2.wait_for(25, quiet=0) == 25 and a2.wait_for(25, quiet=0) == 25
        # Hold: a=inactive both ways; from now on only RTCP flows on the held call.
        phone_reinvite(held, a2.sdp(attrs=["a=inactive"], version=2), b2.sdp(attrs=["a=inactive"], version=2))
        silent_since = time.monotonic()  # the first call's endpoints "crashed"

        gone_at = None
        deadline = silent_since + 6
        while time.monotonic() < deadline:
            a2.send_rtcp()
            b2.send_rtcp()
            if gone_at is None and relay.metric(SESSIONS) == 1:
                gone_at = time.monotonic()
            time.sleep(0.25)
        assert gone_at is not None, "the silent call's media was never torn down"
        # not before its 2 s without media (how much later depends on the machine's load)
        assert gone_at - silent_since >= 1.5, gone_at - silent_since
        # 6 s of RTCP only, three times the timeout: the held call is still anchored.
        m = relay.metrics()
        assert m[SESSIONS] == 1 and m[PORTS] == 4 and m[NO_MEDIA] == 1, m
        recent = [r for r in b2.received if r.kind == "rtcp" and r.at > deadline - 1]
        assert recent, "RTCP stopped flowing on the held call"
        # Resume: audio flows again on the same ports.
        phone_reinvite(held, a2.sdp(version=3), b2.sdp(version=3))
        exchange(a2, b2, 25)
        assert b2.wait_for(50, quiet=0) == 50 and a2.wait_for(50, quiet=0) == 50
        # Now the held call goes silent too.
        quiet_since = time.monotonic()
        assert wait_metric(relay, SESSIONS, 0, timeout=5) == 0
        assert time.monotonic() - quiet_since >= 1.5
        m = relay.metrics()
        assert m[PORTS] == 0 and m[NO_MEDIA] == 2, m
        # The dialogs themselves are still up: BYE ends them normally.
        hang_up(silent)
        hang_up(held)
        assert_healthy(relay)
    finally:
        p.close()


# -------------------------------------------------------- 5. new address
@needs_other_ip
def test_reinvite_with_new_phone_address_keeps_audio(relay: RelayProc, peers: Peers) -> None:
    a1, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a1, b)
    exchange(a1, b, 50)
    assert b.wait_for(50) == 50 and a1.wait_for(50) == 50

    # Same IP, new port (NAT rebinding): re-INVITE from the same SIP socket.
    a2 = peers.endpoint()
    _, resp = phone_reinvite(call, a2.sdp(version=2), b.sdp(version=2))
    a2.learn(resp.body)
    assert a2.relay_rtp == a1.relay_rtp, "the relay moved the call to other ports"
    got_b = b.count()
    exchange(a2, b, 50)
    assert b.wait_for(got_b + 50) == got_b + 50 and a2.wait_for(50) == 50
    _assert_delivered(a2, b, since=got_b, relay=relay)
    _assert_delivered(b, a2, sent_since=50, relay=relay)
    before = relay.metrics()
    a1.send_rtp(10)  # the old port, now that the new one is latched
    assert wait_metric(relay, UNLATCHED, before.get(UNLATCHED, 0) + 10, timeout=2) == before.get(
        UNLATCHED, 0) + 10
    assert b.count() == got_b + 50

    # Wi-Fi → LTE: a new IP for signalling and media. The old address is refused
    # at once, even before the new one sent anything.
    moved = peers.add(Phone(relay, host=_other_ip(relay)))
    call.phone.phone = moved
    a3 = peers.endpoint(_other_ip(relay))
    _, resp = phone_reinvite(call, a3.sdp(version=3), b.sdp(version=3))
    a3.learn(resp.body)
    before = relay.metrics()
    a2.send_rtp(10)
    a1.send_rtp(10)
    assert wait_metric(relay, UNLATCHED, before.get(UNLATCHED, 0) + 20, timeout=2) == before.get(
        UNLATCHED, 0) + 20
    got_b, got_a3 = b.count(), a3.count()
    sent_b = len(b.talker.sent)
    exchange(a3, b, 100)
    assert b.wait_for(got_b + 100) == got_b + 100 and a3.wait_for(100) == 100
    _assert_delivered(a3, b, since=got_b, relay=relay)
    _assert_delivered(b, a3, sent_since=sent_b, relay=relay)
    assert got_a3 == 0 and a2.count() == 50 and a1.count() == 50  # nothing went to the old address
    hang_up(call)
    assert wait_metric(relay, PORTS, 0) == 0


# ------------------------------------------------------------------- 6. hold
def test_hold_and_resume_both_styles(relay: RelayProc, peers: Peers) -> None:
    a, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a, b)
    exchange(a, b, 50)
    assert b.wait_for(50) == 50 and a.wait_for(50) == 50
    ports = (a.relay_rtp, b.relay_rtp)

    # RFC 3264 hold from the phone: sendonly / recvonly; the holder still sends.
    got_offer, got_answer = phone_reinvite(call, a.sdp(attrs=["a=sendonly"], version=2),
                                           b.sdp(attrs=["a=recvonly"], version=2))
    assert b"a=sendonly" in _sdp_lines(got_offer.body) and b"a=recvonly" in _sdp_lines(got_answer.body)
    a.send_rtp(50)
    assert b.wait_for(100) == 100
    # Resume.
    phone_reinvite(call, a.sdp(version=3), b.sdp(version=3))
    exchange(a, b, 50)
    assert b.wait_for(150) == 150 and a.wait_for(100) == 100

    # RFC 2543 hold from the PBX: c=0.0.0.0, which must reach the phone as it is.
    hold = b.sdp(conn="0.0.0.0", version=4)
    got_offer, got_answer = pbx_reinvite(call, hold, a.sdp(version=4))
    assert b"c=IN IP4 0.0.0.0" in _sdp_lines(got_offer.body), got_offer.body
    a.send_rtp(10)  # a phone that ignores the hold: the relay has nowhere to send it
    assert wait_metric(relay, NO_DEST, 10, timeout=2) == 10
    assert b.count() == 150
    # Resume; audio flows both ways on the very same relay ports.
    got_offer, got_answer = pbx_reinvite(call, b.sdp(version=5), a.sdp(version=5))
    a.learn(got_offer.body)
    b.learn(got_answer.body)
    exchange(a, b, 50)
    assert b.wait_for(200) == 200 and a.wait_for(150) == 150
    assert (a.relay_rtp, b.relay_rtp) == ports
    _assert_delivered(b, a, relay=relay)
    m = relay.metrics()
    assert m[SESSIONS] == 1 and m[PORTS] == 4, m
    hang_up(call)
    assert wait_metric(relay, PORTS, 0) == 0


# ------------------------------------------- relay bugs these tests found (fixed)
def test_cancelled_reinvite_keeps_the_call_audio(relay: RelayProc, peers: Peers) -> None:
    a, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a, b)
    exchange(a, b, 10)
    assert a.wait_for(10) == 10 and b.wait_for(10) == 10
    call.phone.reinvite(a.sdp(version=2))
    inv = peers.pbx.request("INVITE")
    peers.pbx.reply(inv, 100, "Trying")  # the relay holds a CANCEL until a 1xx (RFC 3261 §9.1)
    assert call.phone.cancel().status == 200
    cancel = peers.pbx.request("CANCEL")
    peers.pbx.reply(cancel, 200, "OK")
    peers.pbx.reply(inv, 487, "Request Terminated")
    assert call.phone.final().status == 487
    # RFC 3261 §9.1, RFC 3264 §8: only the re-INVITE failed; the call goes on as it was.
    exchange(a, b, 10)
    assert a.wait_for(20, timeout=1) == 20 and b.wait_for(20, timeout=1) == 20
    m = relay.metrics()
    assert m[SESSIONS] == 1 and m[PORTS] == 4, m
    hang_up(call)


def test_rejected_reinvite_keeps_the_old_media_address(relay: RelayProc, peers: Peers) -> None:
    a, b = peers.endpoint(), peers.endpoint()
    call = establish(peers.phone, peers.pbx, a, b)
    exchange(a, b, 10)
    assert a.wait_for(10) == 10 and b.wait_for(10) == 10
    offered = peers.endpoint()
    call.phone.reinvite(offered.sdp(version=2))
    inv = peers.pbx.request("INVITE")
    peers.pbx.reply(inv, 488, "Not Acceptable Here")
    assert call.phone.final().status == 488
    # RFC 3264 §8: a rejected offer changes nothing. The PBX plays on (music on
    # hold, say) to a phone that only listens: it must still reach the old address.
    b.send_rtp(10)
    assert a.wait_for(20, timeout=1) == 20, "the PBX's audio went to the rejected offer's address"
    assert offered.count() == 0
    hang_up(call)


def test_long_ringing_call_keeps_its_media(quick_relay: RelayProc) -> None:
    p = Peers(quick_relay)
    try:
        a, b = p.endpoint(), p.endpoint()
        pc = p.phone.invite(a.sdp())
        inv = p.pbx.request("INVITE")
        b.learn(inv.body)
        p.pbx.reply(inv, 180, "Ringing", tag="ring")
        time.sleep(3.2)  # rings longer than no_media_timeout (2 s); nobody sends media yet
        p.pbx.reply(inv, 200, "OK", body=b.sdp(), tag="ring")
        resp = pc.final()
        assert resp.status == 200
        a.learn(resp.body)
        p.pbx.request("ACK")
        exchange(a, b, 20)
        assert b.wait_for(20, timeout=1) == 20 and a.wait_for(20, timeout=1) == 20
    finally:
        p.close()


def test_the_handover_order_model_refuses_real_reordering() -> None:
    """The kernel tests' order check is not vacuous: a packet overtaken inside one path,
    or two swaps that no single hand-over explains, are refused."""
    assert _two_fifos([0, 1, 2, 3]) and _two_fifos([0, 2, 1, 3, 4]) and _two_fifos([2, 3, 0, 1])
    assert not _two_fifos([1, 0, 3, 2]) and not _two_fifos([2, 1, 0]) and not _two_fifos([0, 3, 2, 1])


# ------------------------------------------------------------ reused pairs
SMALL_RANGE_PAIRS = 16
IDLE = f'{M}media_dropped_total{{reason="idle_port"}}'


@pytest.fixture
def small_range_relay(backend: str, relay_factory, tmp_path: Path) -> Iterator[RelayProc]:  # type: ignore[no-untyped-def]
    # Below the ephemeral ports and above the default range other relays on 127.0.0.1 use.
    low = 20_000 + 2 * SMALL_RANGE_PAIRS * (os.getpid() % 350)
    yield from _relay(backend, relay_factory, tmp_path,
                      f"port_min = {low}\nport_max = {low + 2 * SMALL_RANGE_PAIRS}")


@needs_other_ip
def test_a_reused_pair_carries_the_next_call_not_the_last_ones_late_packets(
        small_range_relay: RelayProc) -> None:
    """Pairs stay bound after a call and are handed out again, least recently freed first:
    the first call's phone, still sending to its relay port after BYE, is dropped as
    ``idle_port`` while the pair is idle and as a stranger once a later call holds it;
    that later call's audio flows through the same pair, and no call binds a new one."""
    relay = small_range_relay
    peers = Peers(relay)
    try:
        a, b = peers.endpoint(), peers.endpoint()
        late = peers.endpoint(host=_other_ip(relay))  # the first call's phone, on another network
        first = establish(peers.phone, peers.pbx, late, b)
        late.send_rtp(5)
        assert b.wait_for(5, quiet=0) == 5
        old_port = late.relay_rtp
        hang_up(first)
        assert wait_metric(relay, SESSIONS, 0) == 0
        late.send_rtp(3, dest=old_port)
        assert wait_metric(relay, IDLE, 3) == 3

        # The next calls take the other pairs first; the first call's comes back last.
        for n in range(SMALL_RANGE_PAIRS):
            call = establish(peers.phone, peers.pbx, a, b)
            if a.relay_rtp == old_port:
                break
            assert n < SMALL_RANGE_PAIRS // 2, "a freed pair came back before the others"
            hang_up(call)
        else:
            pytest.fail("the first call's pair was never handed out again")
        assert n == SMALL_RANGE_PAIRS // 2 - 1, n  # after every other pair: 2 per call
        unlatched = relay.metric(UNLATCHED)
        sent_a, got_b = len(a.talker.sent), b.count()
        a.send_rtp(10)
        late.send_rtp(4, dest=old_port)  # the old phone: not a party to this call
        a.send_rtp(10)
        assert b.wait_for(got_b + 20) == got_b + 20
        _assert_delivered(a, b, since=got_b, sent_since=sent_a, relay=relay)
        assert wait_metric(relay, UNLATCHED, unlatched + 4) == unlatched + 4
        hang_up(call)
        assert relay.metric(f"{M}media_ports_bound") <= 2 * SMALL_RANGE_PAIRS
        assert_healthy(relay)
    finally:
        peers.close()
