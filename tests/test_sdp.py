"""SDP parse and rewrite: c=, m= ports, a=rtcp and ICE change, every other line byte for byte."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from relay.media.sdp import (
    ICE_ATTRIBUTES,
    MAX_ICE_CANDIDATES,
    MAX_MEDIA_STREAMS,
    MAX_PORT_COUNT,
    MAX_SDP_ADDRESSES,
    MAX_SDP_ATTRIBUTES,
    MAX_SDP_LINE_LENGTH,
    MAX_SDP_LINES,
    MAX_SDP_SIZE,
    NO_PORTS,
    WORK_PER_BODY,
    SdpError,
    SdpLimitExceeded,
    anchor_sdp,
    parse_sdp,
    rewrite_sdp,
)
from tests.workmeter import work_of

RELAY = "203.0.113.10"
RELAY6 = "2001:db8:ffff::10"


def body(*lines: bytes, eol: bytes = b"\r\n", trailing: bool = True) -> bytes:
    return eol.join(lines) + (eol if trailing else b"")


def sdp_error(data: bytes) -> SdpError:
    with pytest.raises(SdpError) as info:
        parse_sdp(data)
    return info.value


# -- audio, video, several streams ---------------------------------------------------------


def test_audio_only_offer() -> None:
    offer = body(
        b"v=0",
        b"o=alice 2890844526 2890844526 IN IP4 192.168.1.20",
        b"s=-",
        b"c=IN IP4 192.168.1.20",
        b"t=0 0",
        b"m=audio 49170 RTP/AVP 0 8 101",
        b"a=rtpmap:0 PCMU/8000",
        b"a=rtpmap:8 PCMA/8000",
        b"a=rtpmap:101 telephone-event/8000",
        b"a=fmtp:101 0-16",
        b"a=ptime:20",
    )
    s = parse_sdp(offer)
    assert s.session_conn == "192.168.1.20"
    [m] = s.media
    assert (m.index, m.kind, m.port, m.port_count, m.proto) == (0, "audio", 49170, 1, "RTP/AVP")
    assert m.fmts == ("0", "8", "101")
    assert (m.conn, m.family, m.direction, m.held) == ("192.168.1.20", "IP4", "sendrecv", False)
    assert (m.rtcp_port, m.rtcp_addr, m.rtcp_mux) == (None, None, False)
    assert (m.crypto, m.fingerprint, m.zrtp, m.disabled) == (False, False, False, False)

    assert rewrite_sdp(offer, RELAY, [(10000, 10001)]) == body(
        b"v=0",
        b"o=alice 2890844526 2890844526 IN IP4 192.168.1.20",
        b"s=-",
        b"c=IN IP4 203.0.113.10",
        b"t=0 0",
        b"m=audio 10000 RTP/AVP 0 8 101",
        b"a=rtpmap:0 PCMU/8000",
        b"a=rtpmap:8 PCMA/8000",
        b"a=rtpmap:101 telephone-event/8000",
        b"a=fmtp:101 0-16",
        b"a=ptime:20",
    )


def test_audio_and_video() -> None:
    offer = body(
        b"v=0",
        b"o=- 1 1 IN IP4 10.0.0.5",
        b"s=call",
        b"c=IN IP4 10.0.0.5",
        b"b=AS:2048",
        b"t=0 0",
        b"m=audio 4000 RTP/AVP 9",
        b"a=rtpmap:9 G722/8000",
        b"m=video 4002 RTP/AVP 96",
        b"b=TIAS:2000000",
        b"a=rtpmap:96 H264/90000",
        b"a=fmtp:96 profile-level-id=42e01f;packetization-mode=1",
        b"a=content:main",
    )
    assert [(m.kind, m.port, m.conn) for m in parse_sdp(offer).media] == [
        ("audio", 4000, "10.0.0.5"), ("video", 4002, "10.0.0.5")]
    assert rewrite_sdp(offer, RELAY, [(20000, 20001), (20002, 20003)]) == body(
        b"v=0",
        b"o=- 1 1 IN IP4 10.0.0.5",
        b"s=call",
        b"c=IN IP4 203.0.113.10",
        b"b=AS:2048",
        b"t=0 0",
        b"m=audio 20000 RTP/AVP 9",
        b"a=rtpmap:9 G722/8000",
        b"m=video 20002 RTP/AVP 96",
        b"b=TIAS:2000000",
        b"a=rtpmap:96 H264/90000",
        b"a=fmtp:96 profile-level-id=42e01f;packetization-mode=1",
        b"a=content:main",
    )


SEVERAL = body(
    b"v=0",
    b"o=- 7 7 IN IP4 10.1.1.1",
    b"s=-",
    b"t=0 0",
    b"m=audio 5000 RTP/AVP 0",
    b"c=IN IP4 10.1.1.1",
    b"a=rtcp:5001",
    b"m=video 0 RTP/AVP 31",
    b"c=IN IP4 10.1.1.1",
    b"a=rtcp:5003 IN IP4 10.1.1.1",
    b"m=image 5004 udptl t38",
    b"c=IN IP4 10.1.1.1",
    b"a=T38FaxVersion:0",
)


def test_several_streams_one_disabled() -> None:
    s = parse_sdp(SEVERAL)
    assert s.session_conn is None
    assert [(m.kind, m.port, m.disabled) for m in s.media] == [
        ("audio", 5000, False), ("video", 0, True), ("image", 5004, False)]
    assert s.media[2].proto == "udptl"
    # The disabled stream takes NO_PORTS: it stays port 0, its a=rtcp goes, its c=
    # still names the relay (the peer's address is not passed on).
    assert rewrite_sdp(SEVERAL, RELAY, [(30000, 30001), NO_PORTS, (30002, 30003)]) == body(
        b"v=0",
        b"o=- 7 7 IN IP4 10.1.1.1",
        b"s=-",
        b"t=0 0",
        b"m=audio 30000 RTP/AVP 0",
        b"c=IN IP4 203.0.113.10",
        b"a=rtcp:30001",
        b"m=video 0 RTP/AVP 31",
        b"c=IN IP4 203.0.113.10",
        b"m=image 30002 udptl t38",
        b"c=IN IP4 203.0.113.10",
        b"a=T38FaxVersion:0",
    )


def test_ports_must_match_the_m_lines() -> None:
    with pytest.raises(ValueError, match="disabled"):
        rewrite_sdp(SEVERAL, RELAY, [(30000, 30001), (30002, 30003), (30004, 30005)])
    with pytest.raises(ValueError, match="3 m= lines"):
        rewrite_sdp(SEVERAL, RELAY, [(30000, 30001), (30004, 30005)])
    with pytest.raises(ValueError, match="out of range"):
        rewrite_sdp(SEVERAL, RELAY, [(70000, None), NO_PORTS, (30002, 30003)])
    with pytest.raises(ValueError, match="without an RTP port"):
        rewrite_sdp(SEVERAL, RELAY, [(0, 5), NO_PORTS, (30002, 30003)])
    for bad in ("relay.example.com", "0.0.0.0", "::", "fe80::1%eth0", ""):
        with pytest.raises(ValueError):
            rewrite_sdp(SEVERAL, bad, [(30000, 30001), NO_PORTS, (30002, 30003)])


def test_relay_rejects_an_enabled_stream_with_no_ports() -> None:
    out = rewrite_sdp(SEVERAL, RELAY, [(30000, 30001), NO_PORTS, NO_PORTS])
    assert b"m=image 0 udptl t38\r\n" in out
    assert [m.port for m in parse_sdp(out).media] == [30000, 0, 0]


def test_session_and_media_level_c() -> None:
    offer = body(
        b"v=0",
        b"o=- 1 1 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 192.0.2.1",
        b"t=0 0",
        b"m=audio 4000 RTP/AVP 0",
        b"m=video 4002 RTP/AVP 96",
        b"c=IN IP4 198.51.100.7",
        b"a=rtpmap:96 VP8/90000",
    )
    s = parse_sdp(offer)
    assert s.session_conn == "192.0.2.1"
    assert [m.conn for m in s.media] == ["192.0.2.1", "198.51.100.7"]   # media level wins
    out = rewrite_sdp(offer, RELAY, [(6000, 6001), (6002, 6003)])
    assert out == body(
        b"v=0",
        b"o=- 1 1 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 203.0.113.10",
        b"t=0 0",
        b"m=audio 6000 RTP/AVP 0",
        b"m=video 6002 RTP/AVP 96",
        b"c=IN IP4 203.0.113.10",
        b"a=rtpmap:96 VP8/90000",
    )


def test_media_without_any_c_is_refused_unless_disabled() -> None:
    no_c = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"t=0 0", b"m=audio 4000 RTP/AVP 0")
    assert "no c=" in sdp_error(no_c).reason
    disabled = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"t=0 0", b"m=audio 0 RTP/AVP 0")
    [m] = parse_sdp(disabled).media
    assert (m.conn, m.family) == (None, None)
    assert rewrite_sdp(disabled, RELAY, [NO_PORTS]) == disabled


# -- IPv6 ---------------------------------------------------------------------------------

V4_OFFER = body(
    b"v=0",
    b"o=- 3 3 IN IP4 192.168.0.10",
    b"s=-",
    b"c=IN IP4 192.168.0.10",
    b"t=0 0",
    b"m=audio 7078 RTP/AVP 0",
    b"a=rtcp:7079 IN IP4 192.168.0.10",
)
V6_OFFER = body(
    b"v=0",
    b"o=- 3 3 IN IP6 2001:db8::5",
    b"s=-",
    b"c=IN IP6 2001:db8::5",
    b"t=0 0",
    b"m=audio 7078 RTP/AVP 0",
    b"a=rtcp:7079 IN IP6 2001:db8::5",
)


def test_ipv6_offer() -> None:
    s = parse_sdp(V6_OFFER)
    [m] = s.media
    assert (s.session_conn, m.conn, m.family) == ("2001:db8::5", "2001:db8::5", "IP6")
    assert (m.rtcp_port, m.rtcp_addr) == (7079, "2001:db8::5")
    assert rewrite_sdp(V6_OFFER, RELAY6, [(11000, 11001)]) == body(
        b"v=0",
        b"o=- 3 3 IN IP6 2001:db8::5",
        b"s=-",
        b"c=IN IP6 2001:db8:ffff::10",
        b"t=0 0",
        b"m=audio 11000 RTP/AVP 0",
        b"a=rtcp:11001 IN IP6 2001:db8:ffff::10",
    )


def test_ipv4_offer_to_ipv6_relay_and_back() -> None:
    v6 = rewrite_sdp(V4_OFFER, RELAY6, [(11000, 11001)])
    assert v6 == body(
        b"v=0",
        b"o=- 3 3 IN IP4 192.168.0.10",       # o= is the session's identity: untouched
        b"s=-",
        b"c=IN IP6 2001:db8:ffff::10",
        b"t=0 0",
        b"m=audio 11000 RTP/AVP 0",
        b"a=rtcp:11001 IN IP6 2001:db8:ffff::10",
    )
    back = rewrite_sdp(v6, RELAY, [(12000, 12001)])
    assert back == body(
        b"v=0",
        b"o=- 3 3 IN IP4 192.168.0.10",
        b"s=-",
        b"c=IN IP4 203.0.113.10",
        b"t=0 0",
        b"m=audio 12000 RTP/AVP 0",
        b"a=rtcp:12001 IN IP4 203.0.113.10",
    )
    assert rewrite_sdp(V6_OFFER, RELAY, [(12000, 12001)]) == back.replace(
        b"o=- 3 3 IN IP4 192.168.0.10", b"o=- 3 3 IN IP6 2001:db8::5")


def test_address_family_must_match() -> None:
    base = [b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"t=0 0", b"m=audio 4000 RTP/AVP 0"]
    for c in (b"c=IN IP4 2001:db8::1", b"c=IN IP6 192.0.2.1", b"c=IN IP4 300.1.1.1",
              b"c=IN IP6 fe80::1%eth0", b"c=IN IP4 01.2.3.4"):
        sdp_error(body(*base, c))
    with pytest.raises(SdpError):
        parse_sdp(body(*base, b"c=IN IP4 192.0.2.1", b"a=rtcp:4001 IN IP6 192.0.2.1"))


def test_multicast_and_fqdn_connection_addresses() -> None:
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 224.2.1.1/127/3",
                 b"t=0 0", b"m=audio 4000 RTP/AVP 0", b"m=audio 4002 RTP/AVP 0",
                 b"c=IN IP4 media.example.com")
    assert [m.conn for m in parse_sdp(offer).media] == ["224.2.1.1", "media.example.com"]
    out = rewrite_sdp(offer, RELAY, [(5000, 5001), (5002, 5003)])
    assert out.count(b"c=IN IP4 203.0.113.10\r\n") == 2
    assert b"224.2.1.1" not in out and b"example.com" not in out


# -- hold (RFC 3264 §8.4) ---------------------------------------------------------------


def test_hold_by_direction_attributes() -> None:
    offer = body(
        b"v=0",
        b"o=- 1 2 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 192.0.2.1",
        b"t=0 0",
        b"a=sendonly",                       # session level: the default for every stream
        b"m=audio 4000 RTP/AVP 0",
        b"m=audio 4002 RTP/AVP 0",
        b"a=inactive",
        b"m=video 4004 RTP/AVP 96",
        b"a=recvonly",                       # media level wins over the session's sendonly
        b"m=video 4006 RTP/AVP 96",
        b"a=sendrecv",
    )
    s = parse_sdp(offer)
    assert [(m.direction, m.held) for m in s.media] == [
        ("sendonly", True), ("inactive", True), ("recvonly", False), ("sendrecv", False)]
    out = rewrite_sdp(offer, RELAY, [(8000, 8001), (8002, 8003), (8004, 8005), (8006, 8007)])
    assert [line for line in out.split(b"\r\n") if line.startswith(b"a=")] == [
        b"a=sendonly", b"a=inactive", b"a=recvonly", b"a=sendrecv"]
    assert [(m.direction, m.held) for m in parse_sdp(out).media] == [
        (m.direction, m.held) for m in s.media]


def test_old_style_hold_connection_address_is_kept() -> None:
    offer = body(
        b"v=0",
        b"o=- 1 2 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 0.0.0.0",
        b"t=0 0",
        b"m=audio 4000 RTP/AVP 0",
        b"a=rtcp:4001 IN IP4 0.0.0.0",
        b"m=audio 4002 RTP/AVP 0",
        b"c=IN IP6 ::",
        b"m=video 4004 RTP/AVP 96",
        b"c=IN IP4 192.0.2.1",
    )
    s = parse_sdp(offer)
    assert [(m.conn, m.held) for m in s.media] == [
        ("0.0.0.0", True), ("::", True), ("192.0.2.1", False)]
    assert rewrite_sdp(offer, RELAY, [(8000, 8001), (8002, 8003), (8004, 8005)]) == body(
        b"v=0",
        b"o=- 1 2 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 0.0.0.0",
        b"t=0 0",
        b"m=audio 8000 RTP/AVP 0",
        b"a=rtcp:8001 IN IP4 0.0.0.0",
        b"m=audio 8002 RTP/AVP 0",
        b"c=IN IP6 ::",
        b"m=video 8004 RTP/AVP 96",
        b"c=IN IP4 203.0.113.10",
    )


# -- RTCP (RFC 3605, RFC 5761) --------------------------------------------------------------

RTCP_OFFER = body(
    b"v=0",
    b"o=- 1 1 IN IP4 192.0.2.1",
    b"s=-",
    b"c=IN IP4 192.0.2.1",
    b"t=0 0",
    b"m=audio 4000 RTP/AVP 0",
    b"a=rtcp:4011",
    b"m=audio 4002 RTP/AVP 0",
    b"a=rtcp:53020 IN IP4 126.16.64.4",
    b"m=audio 4004 RTP/AVP 0",
    b"a=ptime:20",
)


def test_rtcp_attribute_with_and_without_address() -> None:
    s = parse_sdp(RTCP_OFFER)
    assert [(m.rtcp_port, m.rtcp_addr) for m in s.media] == [
        (4011, None), (53020, "126.16.64.4"), (None, None)]
    out = rewrite_sdp(RTCP_OFFER, RELAY, [(9000, 9001), (9002, 9003), (9004, 9005)])
    assert out == body(
        b"v=0",
        b"o=- 1 1 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 203.0.113.10",
        b"t=0 0",
        b"m=audio 9000 RTP/AVP 0",
        b"a=rtcp:9001",                              # kept though now RTP + 1: harmless
        b"m=audio 9002 RTP/AVP 0",
        b"a=rtcp:9003 IN IP4 203.0.113.10",
        b"m=audio 9004 RTP/AVP 0",                   # RTP + 1: nothing to add
        b"a=ptime:20",
    )


def test_rtcp_attribute_added_when_not_rtp_plus_one() -> None:
    out = rewrite_sdp(RTCP_OFFER, RELAY, [(9000, 9001), (9002, 9003), (9004, 9101)])
    assert out.endswith(b"m=audio 9004 RTP/AVP 0\r\na=rtcp:9101\r\na=ptime:20\r\n")
    assert parse_sdp(out).media[2].rtcp_port == 9101
    # A section without attributes, last in a body without a final line ending.
    bare = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                b"m=audio 4000 RTP/AVP 0", b"b=AS:64", eol=b"\n", trailing=False)
    assert rewrite_sdp(bare, RELAY, [(9000, 8000)]) == body(
        b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 203.0.113.10", b"t=0 0",
        b"m=audio 9000 RTP/AVP 0", b"b=AS:64", b"a=rtcp:8000", eol=b"\n", trailing=False)


def test_session_level_rtcp_attribute_is_dropped() -> None:
    # RFC 3605 defines a=rtcp at media level only; at session level it would only
    # pass on the peer's address.
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                 b"a=rtcp:4001 IN IP4 192.0.2.1", b"m=audio 4000 RTP/AVP 0")
    assert b"a=rtcp" not in rewrite_sdp(offer, RELAY, [(9000, 9001)])


def test_rtcp_mux() -> None:
    offer = body(
        b"v=0",
        b"o=- 1 1 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 192.0.2.1",
        b"t=0 0",
        b"m=audio 4000 RTP/AVP 0",
        b"a=rtcp:4000",
        b"a=rtcp-mux",
        b"a=rtcp-fb:* nack",
        b"m=video 4002 RTP/AVPF 96",
        b"a=rtcp-mux",
        b"a=rtcp-rsize",
    )
    s = parse_sdp(offer)
    assert [(m.rtcp_mux, m.rtcp_port) for m in s.media] == [(True, 4000), (True, None)]
    # rtcp None: RTCP rides on the RTP port; a=rtcp names it (RFC 8858 §4.2), none is added.
    assert rewrite_sdp(offer, RELAY, [(9000, None), (9010, None)]) == body(
        b"v=0",
        b"o=- 1 1 IN IP4 192.0.2.1",
        b"s=-",
        b"c=IN IP4 203.0.113.10",
        b"t=0 0",
        b"m=audio 9000 RTP/AVP 0",
        b"a=rtcp:9000",
        b"a=rtcp-mux",
        b"a=rtcp-fb:* nack",
        b"m=video 9010 RTP/AVPF 96",
        b"a=rtcp-mux",
        b"a=rtcp-rsize",
    )


def test_bad_rtcp_attribute() -> None:
    base = [b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
            b"m=audio 4000 RTP/AVP 0"]
    for a in (b"a=rtcp:", b"a=rtcp:abc", b"a=rtcp:70000", b"a=rtcp", b"a=rtcp:4001 IN IP4",
              b"a=rtcp:4001 IN IP9 1.2.3.4", b"a=rtcp:-1", b"a=rtcp:4_001"):
        sdp_error(body(*base, a))


# -- secured media passes through untouched ------------------------------------------------


def test_srtp_crypto_lines_are_kept() -> None:
    crypto = [
        b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
        b"a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32"
        b" UNENCRYPTED_SRTCP",
    ]
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                 b"m=audio 4000 RTP/SAVP 0", *crypto, b"a=rtpmap:0 PCMU/8000")
    [m] = parse_sdp(offer).media
    assert (m.proto, m.crypto, m.fingerprint) == ("RTP/SAVP", True, False)
    out = rewrite_sdp(offer, RELAY, [(9000, 9001)])
    assert out == body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 203.0.113.10",
                       b"t=0 0", b"m=audio 9000 RTP/SAVP 0", *crypto, b"a=rtpmap:0 PCMU/8000")


def test_dtls_srtp_fingerprint_and_setup_are_kept() -> None:
    fp = (b"a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B:"
          b"19:E5:7C:AB:3E:4B:65:2E:7D:46:3F:54:42:CD:54:F1")
    offer = body(
        b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
        fp,                                            # session level (RFC 8122 §5)
        b"m=audio 4000 UDP/TLS/RTP/SAVP 111",
        b"a=setup:actpass",
        b"a=tls-id:abc3de65cddef001be82",
        b"a=rtpmap:111 opus/48000/2",
        b"m=video 4002 UDP/TLS/RTP/SAVPF 96",
        fp.replace(b"4A:AD", b"0B:11"),
        b"a=setup:active",
    )
    s = parse_sdp(offer)
    assert [(m.proto, m.fingerprint, m.crypto) for m in s.media] == [
        ("UDP/TLS/RTP/SAVP", True, False), ("UDP/TLS/RTP/SAVPF", True, False)]
    out = rewrite_sdp(offer, RELAY, [(9000, 9001), (9002, 9003)])
    assert out == (offer.replace(b"c=IN IP4 192.0.2.1", b"c=IN IP4 203.0.113.10")
                   .replace(b"m=audio 4000", b"m=audio 9000").replace(b"m=video 4002", b"m=video 9002"))


def test_zrtp_hash_is_kept() -> None:
    zh = b"a=zrtp-hash:1.10 fe30efd02423cb054e50efd0248742ac7a52c8f91bc2df881ae642c371ba46df"
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                 b"m=audio 4000 RTP/AVP 0", zh)
    assert parse_sdp(offer).media[0].zrtp
    out = rewrite_sdp(offer, RELAY, [(9000, 9001)])
    assert out.split(b"\r\n")[6] == zh


# -- ICE (RFC 8839) ------------------------------------------------------------------------


def test_ice_attributes_removed_at_both_levels() -> None:
    offer = body(
        b"v=0",
        b"o=jdoe 2890844526 2890842807 IN IP4 10.0.1.1",
        b"s=",
        b"c=IN IP4 192.0.2.3",
        b"t=0 0",
        b"a=ice-options:trickle ice2",
        b"a=ice-pwd:asd88fgpdd777uzjYhagZg",
        b"a=ice-ufrag:8hhY",
        b"a=ice-lite",
        b"m=audio 45664 RTP/AVP 0",
        b"b=RS:0",
        b"b=RR:0",
        b"a=rtpmap:0 PCMU/8000",
        b"a=candidate:1 1 UDP 2130706431 10.0.1.1 8998 typ host",
        b"a=candidate:2 1 UDP 1694498815 192.0.2.3 45664 typ srflx raddr 10.0.1.1 rport 8998",
        b"a=remote-candidates:1 192.0.2.3 45664",
        b"a=ice-mismatch",
        b"a=ice-pacing:50",
        b"a=ice-ufrag:9uB6",
        b"a=end-of-candidates",
        b"a=x-candidate-note:kept",                   # not an ICE attribute
    )
    out = rewrite_sdp(offer, RELAY, [(9000, 9001)])
    assert out == body(
        b"v=0",
        b"o=jdoe 2890844526 2890842807 IN IP4 10.0.1.1",
        b"s=",
        b"c=IN IP4 203.0.113.10",
        b"t=0 0",
        b"m=audio 9000 RTP/AVP 0",
        b"b=RS:0",
        b"b=RR:0",
        b"a=rtpmap:0 PCMU/8000",
        b"a=x-candidate-note:kept",
    )


# -- line endings and forms ----------------------------------------------------------------


def test_lf_only_body_stays_lf() -> None:
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                 b"m=audio 4000 RTP/AVP 0", b"a=candidate:1 1 UDP 1 192.0.2.1 4000 typ host",
                 b"a=rtpmap:0 PCMU/8000", eol=b"\n")
    out = rewrite_sdp(offer, RELAY, [(9000, 9100)])
    assert out == body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 203.0.113.10",
                       b"t=0 0", b"m=audio 9000 RTP/AVP 0", b"a=rtcp:9100", b"a=rtpmap:0 PCMU/8000",
                       eol=b"\n")
    assert b"\r" not in out


def test_each_line_keeps_its_own_ending_and_the_last_its_absence() -> None:
    offer = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\ns=-\r\nc=IN IP4 192.0.2.1\nt=0 0\r\n"
             b"m=audio 4000 RTP/AVP 0\na=rtpmap:0 PCMU/8000\r\na=ice-ufrag:x")
    assert rewrite_sdp(offer, RELAY, [(9000, 9001)]) == (
        b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\ns=-\r\nc=IN IP4 203.0.113.10\nt=0 0\r\n"
        b"m=audio 9000 RTP/AVP 0\na=rtpmap:0 PCMU/8000")
    # A trailing empty line (some UAs add one) is kept as it is.
    trailing = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                    b"m=audio 4000 RTP/AVP 0", b"")
    assert rewrite_sdp(trailing, RELAY, [(9000, 9001)]).endswith(b"m=audio 9000 RTP/AVP 0\r\n\r\n")


def test_port_count_form_is_kept() -> None:
    # Decision: only the port digits change, so "/2" stays. The relay then serves
    # 2 pairs (9000/9001, 9002/9003, RFC 8866 §5.14) or rejects it with NO_PORTS.
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                 b"m=video 49170/2 RTP/AVP 31")
    [m] = parse_sdp(offer).media
    assert (m.port, m.port_count) == (49170, 2)
    out = rewrite_sdp(offer, RELAY, [(9000, 9001)])
    assert out.endswith(b"m=video 9000/2 RTP/AVP 31\r\n")
    assert (parse_sdp(out).media[0].port, parse_sdp(out).media[0].port_count) == (9000, 2)
    assert "port count" in sdp_error(offer.replace(b"/2", b"/%d" % (MAX_PORT_COUNT + 1))).reason
    assert "port count" in sdp_error(offer.replace(b"/2", b"/0")).reason


def test_spacing_of_the_m_line_is_kept() -> None:
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0",
                 b"m=audio  4000  RTP/AVP 0  8 ")
    assert rewrite_sdp(offer, RELAY, [(9000, 9001)]).endswith(b"m=audio  9000  RTP/AVP 0  8 \r\n")


def test_rewrite_is_idempotent() -> None:
    once = rewrite_sdp(RTCP_OFFER, RELAY, [(9000, 9001), (9002, 9503), (9004, 9505)])
    assert rewrite_sdp(once, RELAY, [(9000, 9001), (9002, 9503), (9004, 9505)]) == once


# -- refused bodies ------------------------------------------------------------------------

HEAD = [b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0"]


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "v=0"),
    (b"hello", "v=0"),
    (body(b"o=- 1 1 IN IP4 192.0.2.1", b"v=0", b"m=audio 4000 RTP/AVP 0"), "v=0"),
    (body(b"", *HEAD, b"m=audio 4000 RTP/AVP 0"), "v=0"),
    (body(*HEAD), "no m= line"),
    (body(*HEAD, b"m=audio"), "bad m="),
    (body(*HEAD, b"m=audio 4000"), "bad m="),
    (body(*HEAD, b"m=audio abc RTP/AVP 0"), "bad m="),
    (body(*HEAD, b"m=audio -1 RTP/AVP 0"), "bad m="),
    (body(*HEAD, b"m=audio 4000 RTP//AVP 0"), "bad m="),
    (body(*HEAD, b"m=audio 123456 RTP/AVP 0"), "bad m="),
    (body(*HEAD, b"m=audio 70000 RTP/AVP 0"), "out of range"),
    (body(*HEAD, b"m=au\xc3\xa9dio 4000 RTP/AVP 0"), "bad m="),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c=IN IP4"), "bad c="),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c="), "bad c="),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c=IN IP5 1.2.3.4"), "address type"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c=ATM NSAP 47.0005.80"), "network type"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c=IN IP4 -bad-"), "bad address"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c=IN IP4 1.2.3"), "bad address"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c=IN IP4 \xff\xfe"), "bad c="),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"C=IN IP4 10.0.0.1"), "<type>=<value>"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b" c=IN IP4 10.0.0.1"), "<type>=<value>"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"c =IN IP4 10.0.0.1"), "<type>=<value>"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"a=x\rc=IN IP4 10.0.0.1"), "bare CR"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"a=x\x00"), "NUL"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"v=0", b"m=audio 4002 RTP/AVP 0"), "second v="),
    (body(*HEAD, *[b"m=audio %d RTP/AVP 0" % (4000 + 2 * i) for i in range(MAX_MEDIA_STREAMS + 1)]),
     f"more than {MAX_MEDIA_STREAMS}"),
    (body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"a=" + b"x" * MAX_SDP_SIZE), "larger than"),
])
def test_refused(data: bytes, reason: str) -> None:
    err = sdp_error(data)
    assert reason in err.reason
    with pytest.raises(SdpError):
        rewrite_sdp(data, RELAY, [(9000, 9001)])


def test_limits_are_inclusive() -> None:
    streams = [b"m=audio %d RTP/AVP 0" % (4000 + 2 * i) for i in range(MAX_MEDIA_STREAMS)]
    assert len(parse_sdp(body(*HEAD, *streams)).media) == MAX_MEDIA_STREAMS
    # a body of exactly MAX_SDP_SIZE octets, in lines of at most MAX_SDP_LINE_LENGTH
    head = body(*HEAD, b"m=audio 4000 RTP/AVP 0")
    line = b"a=x:" + b"y" * (MAX_SDP_LINE_LENGTH - 4) + b"\r\n"
    full, rest = divmod(MAX_SDP_SIZE - len(head), len(line))
    data = head + line * full + b"a=x:" + b"y" * (rest - 6) + b"\r\n"
    assert len(data) == MAX_SDP_SIZE
    assert len(parse_sdp(data).media) == 1


def sdp_limit(data: bytes) -> SdpLimitExceeded:
    with pytest.raises(SdpLimitExceeded) as info:
        parse_sdp(data)
    return info.value


def streams(n: int) -> list[bytes]:
    return [b"m=audio %d RTP/AVP 0" % (4000 + 2 * i) for i in range(n)]


def test_media_streams_limit_is_typed() -> None:
    assert len(parse_sdp(body(*HEAD, *streams(MAX_MEDIA_STREAMS))).media) == MAX_MEDIA_STREAMS
    e = sdp_limit(body(*HEAD, *streams(MAX_MEDIA_STREAMS + 1)))
    assert e.limit == "MAX_MEDIA_STREAMS"
    assert isinstance(e, SdpError)  # the media layer's 488, unchanged


def test_lines_limit() -> None:
    filler = [b"b=AS:64"] * (MAX_SDP_LINES - len(HEAD) - 1)
    assert len(parse_sdp(body(*HEAD, b"m=audio 4000 RTP/AVP 0", *filler)).media) == 1
    assert sdp_limit(body(*HEAD, b"m=audio 4000 RTP/AVP 0", *filler, b"b=AS:64")).limit == "MAX_SDP_LINES"
    # empty lines count too: they are lines a peer makes us step over
    assert sdp_limit(body(*HEAD, b"m=audio 4000 RTP/AVP 0", *[b""] * MAX_SDP_LINES)).limit == (
        "MAX_SDP_LINES")


def test_line_length_limit() -> None:
    at = b"a=x:" + b"y" * (MAX_SDP_LINE_LENGTH - 4)
    assert len(parse_sdp(body(*HEAD, b"m=audio 4000 RTP/AVP 0", at)).media) == 1
    e = sdp_limit(body(*HEAD, b"m=audio 4000 RTP/AVP 0", at + b"y"))
    assert e.limit == "MAX_SDP_LINE_LENGTH"
    # the last line, without a line ending, is held to it too
    assert sdp_limit(body(*HEAD, b"m=audio 4000 RTP/AVP 0", at + b"y", trailing=False)).limit == (
        "MAX_SDP_LINE_LENGTH")


@pytest.mark.parametrize("session_level", [True, False])
def test_attributes_per_level(session_level: bool) -> None:
    attrs = [b"a=x-%d" % i for i in range(MAX_SDP_ATTRIBUTES)]

    def offer(extra: list[bytes]) -> bytes:
        if session_level:
            return body(*HEAD, *attrs, *extra, b"m=audio 4000 RTP/AVP 0")
        return body(*HEAD, b"m=audio 4000 RTP/AVP 0", *attrs, *extra)

    assert len(parse_sdp(offer([])).media) == 1
    assert sdp_limit(offer([b"a=sendonly"])).limit == "MAX_SDP_ATTRIBUTES"


def test_each_level_counts_its_own_attributes() -> None:
    attrs = [b"a=x-%d" % i for i in range(MAX_SDP_ATTRIBUTES)]
    two = body(*HEAD, *attrs, b"m=audio 4000 RTP/AVP 0", *attrs)
    assert len(parse_sdp(two).media) == 1


def test_ice_candidates_limit() -> None:
    cand = b"a=candidate:1 1 UDP 2130706431 10.0.1.1 8998 typ host"
    per = MAX_ICE_CANDIDATES // 2
    offer = body(*HEAD, *[line for m in streams(2) for line in [m, *[cand] * per]])
    out = rewrite_sdp(offer, RELAY, [(9000, 9001), (9002, 9003)])
    assert b"candidate" not in out
    assert sdp_limit(offer + cand + b"\r\n").limit == "MAX_ICE_CANDIDATES"


def test_addresses_limit() -> None:
    # one c= at session level (HEAD), then c= and a=rtcp with an address per section
    per_section = [b"c=IN IP4 192.0.2.7", b"a=rtcp:53020 IN IP4 192.0.2.7"]
    offer = body(*HEAD, *[line for m in streams(MAX_MEDIA_STREAMS) for line in [m, *per_section]])
    assert len(parse_sdp(offer).media) == MAX_MEDIA_STREAMS  # what a real body can need
    repeated = [b"c=IN IP4 192.0.2.%d" % i for i in range(MAX_SDP_ADDRESSES - 1)]
    assert len(parse_sdp(body(*HEAD, b"m=audio 4000 RTP/AVP 0", *repeated)).media) == 1
    e = sdp_limit(body(*HEAD, b"m=audio 4000 RTP/AVP 0", *repeated, b"c=IN IP4 192.0.2.99"))
    assert e.limit == "MAX_SDP_ADDRESSES"


def test_size_limit_is_typed() -> None:
    assert sdp_limit(body(*HEAD, b"m=audio 4000 RTP/AVP 0", b"a=" + b"x" * MAX_SDP_SIZE)).limit == (
        "MAX_SDP_SIZE")


def test_unknown_lines_and_text_pass_through() -> None:
    offer = body(b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", "s=Café ☎".encode(), b"i=\xff\xfe raw",
                 b"c=IN IP4 192.0.2.1", b"t=0 0", b"y=unknown type", b"m=audio 4000 RTP/AVP 0",
                 b"a=x-vendor:{\"json\": true}", b"k=prompt")
    out = rewrite_sdp(offer, RELAY, [(9000, 9001)])
    assert out == offer.replace(b"c=IN IP4 192.0.2.1", b"c=IN IP4 203.0.113.10").replace(
        b"m=audio 4000", b"m=audio 9000")


# -- real peers ----------------------------------------------------------------------------

# SIPp's built-in uac scenario, [media_port]=6000, [local_ip]=127.0.0.1.
SIPP = (b"v=0\r\n"
        b"o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
        b"s=-\r\n"
        b"c=IN IP4 127.0.0.1\r\n"
        b"t=0 0\r\n"
        b"m=audio 6000 RTP/AVP 0\r\n"
        b"a=rtpmap:0 PCMU/8000\r\n")


def test_sipp_offer() -> None:
    [m] = parse_sdp(SIPP).media
    assert (m.port, m.conn, m.fmts) == (6000, "127.0.0.1", ("0",))
    assert rewrite_sdp(SIPP, RELAY, [(16384, 16385)]) == (
        b"v=0\r\n"
        b"o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
        b"s=-\r\n"
        b"c=IN IP4 203.0.113.10\r\n"
        b"t=0 0\r\n"
        b"m=audio 16384 RTP/AVP 0\r\n"
        b"a=rtpmap:0 PCMU/8000\r\n")


# baresip 3.x with the ice and dtls_srtp modules, audio and video; rtcp-mux offered.
BARESIP = (b"v=0\r\n"
           b"o=- 1968453218 3436478122 IN IP4 192.168.178.37\r\n"
           b"s=-\r\n"
           b"c=IN IP4 192.168.178.37\r\n"
           b"t=0 0\r\n"
           b"a=tool:baresip 3.10.1\r\n"
           b"a=ice-lite\r\n"
           b"m=audio 10612 UDP/TLS/RTP/SAVPF 96 9 0 8 101\r\n"
           b"b=AS:64\r\n"
           b"a=rtpmap:96 opus/48000/2\r\n"
           b"a=fmtp:96 stereo=1;sprop-stereo=1\r\n"
           b"a=rtpmap:9 G722/8000\r\n"
           b"a=rtpmap:0 PCMU/8000\r\n"
           b"a=rtpmap:8 PCMA/8000\r\n"
           b"a=rtpmap:101 telephone-event/8000\r\n"
           b"a=fmtp:101 0-15\r\n"
           b"a=rtcp:10613\r\n"
           b"a=sendrecv\r\n"
           b"a=label:1\r\n"
           b"a=mid:0\r\n"
           b"a=ice-ufrag:bNpU\r\n"
           b"a=ice-pwd:jhP1AqEmKw2D8fDcJp1RlK\r\n"
           b"a=candidate:1 1 UDP 2130706175 192.168.178.37 10612 typ host\r\n"
           b"a=candidate:1 2 UDP 2130706174 192.168.178.37 10613 typ host\r\n"
           b"a=end-of-candidates\r\n"
           b"a=fingerprint:sha-256 A2:8E:4C:F9:16:0B:2D:76:5A:55:13:4B:CB:EE:40:C7:"
           b"5D:3B:2E:98:41:6B:7F:A4:AF:21:D8:1D:1E:28:77:E5\r\n"
           b"a=setup:actpass\r\n"
           b"a=rtcp-rsize\r\n"
           b"a=rtcp-mux\r\n"
           b"a=ssrc:2385315716 cname:sip:alice@example.com\r\n"
           b"a=ptime:20\r\n"
           b"m=video 10614 UDP/TLS/RTP/SAVPF 96\r\n"
           b"b=AS:1500\r\n"
           b"a=rtpmap:96 VP8/90000\r\n"
           b"a=fmtp:96 max-fs=3600\r\n"
           b"a=rtcp-fb:* nack pli\r\n"
           b"a=framerate:15.00\r\n"
           b"a=content:main\r\n"
           b"a=label:2\r\n"
           b"a=mid:1\r\n"
           b"a=rtcp:10615\r\n"
           b"a=candidate:1 1 UDP 2130706175 192.168.178.37 10614 typ host\r\n"
           b"a=fingerprint:sha-256 A2:8E:4C:F9:16:0B:2D:76:5A:55:13:4B:CB:EE:40:C7:"
           b"5D:3B:2E:98:41:6B:7F:A4:AF:21:D8:1D:1E:28:77:E5\r\n"
           b"a=setup:actpass\r\n"
           b"a=rtcp-mux\r\n"
           b"a=sendrecv\r\n")


def test_baresip_offer() -> None:
    s = parse_sdp(BARESIP)
    assert [(m.kind, m.port, m.rtcp_port, m.rtcp_mux, m.fingerprint, m.direction) for m in s.media] == [
        ("audio", 10612, 10613, True, True, "sendrecv"), ("video", 10614, 10615, True, True, "sendrecv")]
    out = rewrite_sdp(BARESIP, RELAY, [(40000, None), (40002, 40003)])
    expected = [line for line in BARESIP.split(b"\r\n")
                if not line.startswith((b"a=ice-", b"a=candidate", b"a=end-of-candidates"))]
    expected = [b"c=IN IP4 203.0.113.10" if line.startswith(b"c=") else line for line in expected]
    expected[expected.index(b"m=audio 10612 UDP/TLS/RTP/SAVPF 96 9 0 8 101")] = (
        b"m=audio 40000 UDP/TLS/RTP/SAVPF 96 9 0 8 101")
    expected[expected.index(b"m=video 10614 UDP/TLS/RTP/SAVPF 96")] = b"m=video 40002 UDP/TLS/RTP/SAVPF 96"
    expected[expected.index(b"a=rtcp:10613")] = b"a=rtcp:40000"
    expected[expected.index(b"a=rtcp:10615")] = b"a=rtcp:40003"
    assert out == b"\r\n".join(expected)
    assert b"192.168.178.37" not in out.replace(b"o=- 1968453218 3436478122 IN IP4 192.168.178.37", b"")


# -- properties ----------------------------------------------------------------------------


def examples(n: int) -> settings:
    # no deadline: a loaded CI machine must not turn slowness into failures
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
                min_size=1, max_size=12)
# free text (s=, i=, attribute values): any octets but the line breaks and NUL, UTF-8 or not
TEXT = st.one_of(
    st.binary(max_size=24).map(lambda b: b.translate(None, b"\r\n\x00")),
    st.sampled_from(["Café ☎".encode(), "通話".encode(), b"\xff\xfe", b" lead and trail "]),
)
IP4 = st.ip_addresses(v=4).filter(lambda a: not a.is_unspecified).map(str)
IP6 = st.ip_addresses(v=6).filter(lambda a: not a.is_unspecified).map(str)


@st.composite
def conn_line(draw: st.DrawFn) -> bytes:
    family, addr = draw(st.one_of(
        st.tuples(st.just("IP4"), IP4),
        st.tuples(st.just("IP6"), IP6),
        st.tuples(st.just("IP4"), st.just("0.0.0.0")),
        st.tuples(st.just("IP6"), st.sampled_from(["::", "0:0:0:0:0:0:0:0"])),
        st.tuples(st.just("IP4"), st.just("host.example.net")),
    ))
    return f"c=IN {family} {addr}".encode()


ATTRIBUTE = st.one_of(
    st.sampled_from([
        b"a=rtpmap:0 PCMU/8000", b"a=rtpmap:96 opus/48000/2", b"a=fmtp:101 0-15", b"a=ptime:20",
        b"a=sendrecv", b"a=sendonly", b"a=recvonly", b"a=inactive", b"a=rtcp-mux", b"a=rtcp-rsize",
        b"a=rtcp-fb:* nack pli", b"a=setup:actpass", b"a=mid:audio", b"a=group:BUNDLE 0 1",
        b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
        b"a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B",
        b"a=zrtp-hash:1.10 fe30efd02423cb054e50efd0248742ac7a52c8f91bc2df881ae642c371ba46df",
        b"a=candidate:1 1 UDP 2130706431 10.0.1.1 8998 typ host", b"a=ice-ufrag:8hhY",
        b"a=ice-pwd:asd88fgpdd777uzjYhagZg", b"a=ice-options:trickle", b"a=ice-lite",
        b"a=ice-mismatch", b"a=end-of-candidates", b"a=remote-candidates:1 10.0.1.1 8998",
        b"a=candidates", b"a=ice", b"b=AS:64", b"i=stream", b"k=prompt", b"y=whatever",
    ]),
    st.builds(lambda t, v: b"a=x-" + t.encode() + b":" + v, TOKEN, TEXT),
    st.builds(lambda p: b"a=rtcp:%d" % p, st.integers(0, 65535)),
    st.builds(lambda p, c: b"a=rtcp:%d %s" % (p, c[2:]), st.integers(0, 65535), conn_line()),
)


@st.composite
def m_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([b"audio", b"video", b"image", b"application", b"text"]))
    port = draw(st.one_of(st.just(0), st.integers(1, 65535)))
    count = draw(st.one_of(st.just(b""), st.builds(lambda n: b"/%d" % n, st.integers(1, MAX_PORT_COUNT))))
    proto = draw(st.sampled_from([b"RTP/AVP", b"RTP/SAVP", b"RTP/SAVPF", b"UDP/TLS/RTP/SAVPF", b"udptl"]))
    fmts = draw(st.lists(st.sampled_from([b"0", b"8", b"9", b"96", b"101", b"t38"]), min_size=1, max_size=4))
    return b"m=%s %d%s %s %s" % (kind, port, count, proto, b" ".join(fmts))


@st.composite
def sdp_bodies(draw: st.DrawFn) -> bytes:
    lines = [b"v=0", b"o=- %d 1 IN IP4 192.0.2.1" % draw(st.integers(0, 2**32)), b"s=" + draw(TEXT)]
    lines += draw(st.lists(st.sampled_from([b"i=session", b"u=http://example.com/", b"e=a@b.example",
                                            b"p=+1 617 555-6011"]), max_size=2))
    session_c = draw(st.booleans())
    if session_c:
        lines.append(draw(conn_line()))
    lines.append(b"t=0 0")
    lines += draw(st.lists(ATTRIBUTE, max_size=4))
    for _ in range(draw(st.integers(1, 5))):
        lines.append(draw(m_line()))
        if not session_c or draw(st.booleans()):
            lines.append(draw(conn_line()))
        lines += draw(st.lists(ATTRIBUTE, max_size=6))
    if draw(st.booleans()):
        lines.append(b"")
    return body(*lines, eol=draw(st.sampled_from([b"\r\n", b"\n"])), trailing=draw(st.booleans()))


@st.composite
def allocations(draw: st.DrawFn, disabled: list[bool]) -> list[tuple[int, int | None]]:
    ports: list[tuple[int, int | None]] = []
    for off in disabled:
        if off or draw(st.integers(0, 9)) == 0:     # a disabled stream, or one the relay rejects
            ports.append(NO_PORTS)
            continue
        rtp = draw(st.integers(1, 65534))
        rtcp = draw(st.one_of(st.just(rtp + 1), st.none(), st.integers(1, 65535)))
        ports.append((rtp, rtcp))
    return ports


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in data.splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        out.append((content, line[len(content):]))
    return out


def unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:   # an FQDN
        return False


def rewritten_by_us(content: bytes) -> bool:
    if content.startswith((b"c=", b"m=", b"a=rtcp:")):
        return True
    return content.startswith(b"a=") and content[2:].split(b":", 1)[0] in ICE_ATTRIBUTES


@given(data=st.data(), offer=sdp_bodies(), v6=st.booleans())
@examples(200)
def test_rewrite_changes_only_its_lines(data: st.DataObject, offer: bytes, v6: bool) -> None:
    before = parse_sdp(offer)
    address = data.draw(IP6 if v6 else IP4)
    ports = data.draw(allocations([m.disabled for m in before.media]))
    out = rewrite_sdp(offer, address, ports)

    # Every line we do not own: same bytes, same order, same ending.
    old = [(c, e) for c, e in split(offer) if not rewritten_by_us(c)]
    new = [(c, e) for c, e in split(out) if not rewritten_by_us(c)]
    assert [c for c, _ in new] == [c for c, _ in old]
    # The body's last line may have gained an ending when a line was added after it.
    assert [e for _, e in new[:-1]] == [e for _, e in old[:-1]]
    assert out.endswith((b"\n",)) == offer.endswith(b"\n")
    assert not [c for c, _ in split(out) if c.startswith(b"a=") and rewritten_by_us(c)
                and not c.startswith(b"a=rtcp:")]

    after = parse_sdp(out)
    assert len(after.media) == len(before.media)
    for m0, m1, (rtp, rtcp) in zip(before.media, after.media, ports, strict=True):
        assert m1.port == rtp
        assert (m1.kind, m1.proto, m1.fmts, m1.port_count) == (m0.kind, m0.proto, m0.fmts, m0.port_count)
        assert (m1.direction, m1.rtcp_mux, m1.crypto, m1.fingerprint, m1.zrtp) == (
            m0.direction, m0.rtcp_mux, m0.crypto, m0.fingerprint, m0.zrtp)
        if m0.conn is None:
            assert m1.conn is None
        elif unspecified(m0.conn):
            assert (m1.conn, m1.held) == (m0.conn, True)
        else:
            assert (m1.conn, m1.family) == (address, "IP6" if v6 else "IP4")
        if rtp == 0:
            assert (m1.rtcp_port, m1.rtcp_addr) == (None, None)
            continue
        if m0.rtcp_port is not None or (rtcp is not None and rtcp != rtp + 1):
            assert m1.rtcp_port == (rtp if rtcp is None else rtcp)
        else:
            assert m1.rtcp_port is None
        if m0.rtcp_addr is None:
            assert m1.rtcp_addr is None
        else:
            assert m1.rtcp_addr == (m0.rtcp_addr if unspecified(m0.rtcp_addr) else address)
    # rewriting again with the same allocation changes nothing
    assert rewrite_sdp(out, address, ports) == out


@given(st.binary(max_size=600))
@examples(300)
def test_arbitrary_bytes_only_raise_sdp_error(data: bytes) -> None:
    for candidate in (data, b"v=0\r\n" + data):
        try:
            parse_sdp(candidate)
        except SdpError:
            pass


FRAGMENTS = st.sampled_from([
    b"v=0", b"m=audio ", b"m=video 0 ", b"RTP/AVP ", b"0", b"1", b"65536", b"/", b"/2", b" ", b"  ",
    b"c=IN IP4 ", b"c=IN IP6 ", b"IP4", b"IP6", b"192.0.2.1", b"::", b"0.0.0.0", b"::ffff:1.2.3.4",
    b"a=rtcp:", b"a=rtcp-mux", b"a=candidate:", b"a=sendonly", b"a=", b"\r\n", b"\n", b"\r", b"\x00",
    b"\xff", b"\xc3\xa9", b"%eth0", b"example.com", b"-", b"C=", b"=",
])


@given(st.lists(FRAGMENTS, max_size=40), st.sampled_from([b"\r\n", b"\n"]))
@examples(700)
def test_sdp_like_garbage_only_raises_sdp_error(parts: list[bytes], eol: bytes) -> None:
    data = b"v=0" + eol + b"".join(parts)
    try:
        s = parse_sdp(data)
    except SdpError:
        return
    ports = [NO_PORTS if m.disabled else (20000 + 2 * m.index, 20001 + 2 * m.index) for m in s.media]
    out = rewrite_sdp(data, RELAY, ports)
    assert [m.port for m in parse_sdp(out).media] == [p for p, _ in ports]


@given(offer=sdp_bodies(), at=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=4))
@examples(150)
def test_mutated_sdp_only_raises_sdp_error(offer: bytes, at: int, junk: bytes) -> None:
    at %= len(offer)
    for data in (offer[:at] + junk + offer[at:], offer[:at] + junk + offer[at + len(junk):]):
        try:
            s = parse_sdp(data)
        except SdpError:
            continue
        ports = [NO_PORTS if m.disabled else (20000 + 2 * m.index, None) for m in s.media]
        rewrite_sdp(data, RELAY6, ports)


# -- a fixed work budget per body (WORK_PER_BODY) -------------------------------------------

# Lines a hostile body is made of: every kind the scan treats apart, at both levels.
HOSTILE_LINES = st.sampled_from([
    b"", b"b=AS:64", b"a=x", b"a=sendonly", b"a=rtcp:9", b"a=rtcp:9 IN IP6 2001:db8::1",
    b"a=rtcp:9 IN IP4 " + b"a" * 60 + b".example", b"c=IN IP4 192.0.2.1", b"c=IN IP6 ::1",
    b"a=candidate:1 1 UDP 2130706431 10.0.1.1 8998 typ host", b"a=ice-ufrag:x", b"m=audio 4000 RTP/AVP 0",
    b"m=video 0 RTP/AVP " + b"96 " * 600, b"a=fmtp:96 " + b"x" * 3000, b"a=" + b":" * 2000,
])


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    lines = [*HEAD, b"m=audio 4000 RTP/AVP 0"]
    for _ in range(draw(st.integers(1, 4))):
        lines += [draw(HOSTILE_LINES)] * draw(st.integers(1, 600))
    return body(*lines, eol=draw(st.sampled_from([b"\r\n", b"\n"])))


def _anchor(data: bytes) -> bytes:
    return anchor_sdp(data, RELAY, lambda sdp: [
        NO_PORTS if m.disabled else (20000 + 2 * m.index, 20001 + 2 * m.index) for m in sdp.media])


@given(hostile_bodies())
@settings(max_examples=150, deadline=None, phases=[p for p in settings.default.phases if p.name != "explain"],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_anchoring_any_body_stays_within_the_budget(data: bytes) -> None:
    outcome, work = work_of(lambda: _anchor(data))
    assert isinstance(outcome, bytes | SdpError), outcome
    target(float(work), label="anchor work")
    assert work <= WORK_PER_BODY, (work, len(data))


def test_sipp_offer_is_a_small_part_of_the_budget() -> None:
    out, work = work_of(lambda: _anchor(SIPP))
    assert isinstance(out, bytes)
    assert work < WORK_PER_BODY // 20
