"""parse_message: start lines, header forms, byte-exact pass-through, limits, datagram framing."""

from __future__ import annotations

import pytest

from relay.sip import Request, Response, SipParseError, SipUri, limits, parse_message
from relay.sip.headers import COMPACT_FORMS

CRLF = b"\r\n"

VIA = b"Via: SIP/2.0/UDP pc33.example.com:5060;branch=z9hG4bK776asdhds"
FROM = b"From: Alice <sip:alice@example.com>;tag=1928301774"
TO = b"To: Bob <sip:bob@example.com>"
CALL_ID = b"Call-ID: a84b4c76e66710@pc33.example.com"


def msg(start: bytes, *headers: bytes, body: bytes = b"", cl: bool = True) -> bytes:
    """A message from its lines; Content-Length matching ``body`` unless cl=False."""
    lines = [start, *headers]
    if cl:
        lines.append(b"Content-Length: %d" % len(body))
    return CRLF.join(lines) + CRLF + CRLF + body


def options(*extra: bytes, body: bytes = b"", cl: bool = True, cseq: bytes = b"1 OPTIONS",
            start: bytes = b"OPTIONS sip:bob@example.com SIP/2.0") -> bytes:
    return msg(start, VIA, FROM, TO, CALL_ID, b"CSeq: " + cseq, b"Max-Forwards: 70", *extra,
               body=body, cl=cl)


def parse_error(data: bytes, *, datagram: bool = True) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        parse_message(data, datagram=datagram)
    return info.value


# -- start lines ------------------------------------------------------------------


def test_request_line_and_headers() -> None:
    data = options(b"Subject: hello")
    m = parse_message(data)
    assert isinstance(m, Request)
    assert (m.method, m.uri) == ("OPTIONS", "sip:bob@example.com")
    assert m.call_id == "a84b4c76e66710@pc33.example.com"
    assert m.cseq == (1, "OPTIONS")
    assert m.get("subject") == "hello"
    assert m.get("max-forwards") == "70"
    assert m.top_via().branch == "z9hG4bK776asdhds"
    assert m.top_via().port == 5060
    assert m.from_().tag == "1928301774"
    assert m.to().uri == "sip:bob@example.com"
    assert m.body == b""
    assert m.serialise() == data


def test_response_with_body() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n"
    data = msg(b"SIP/2.0 200 OK", VIA, FROM, TO + b";tag=a6c85cf", CALL_ID,
               b"CSeq: 314159 INVITE", b"Content-Type: application/sdp", body=body)
    m = parse_message(data)
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (200, "OK")
    assert m.to().tag == "a6c85cf"
    assert m.cseq == (314159, "INVITE")
    assert m.body == body
    assert m.serialise() == data


def test_response_reason_phrase_may_have_spaces_or_be_empty() -> None:
    m = parse_message(msg(b"SIP/2.0 480 Temporarily Unavailable", VIA, FROM, TO, CALL_ID,
                          b"CSeq: 1 INVITE"))
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (480, "Temporarily Unavailable")
    m = parse_message(msg(b"SIP/2.0 100 ", VIA, FROM, TO, CALL_ID, b"CSeq: 1 INVITE"))
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (100, "")


@pytest.mark.parametrize("code", [b"99", b"700", b"1000", b"20x", b"\xc2\xb2\xc2\xb2\xc2\xb2"])
def test_bad_status_code(code: bytes) -> None:
    data = msg(b"SIP/2.0 " + code + b" Odd", VIA, FROM, TO, CALL_ID, b"CSeq: 1 INVITE")
    assert parse_error(data).status == 400


def test_sip_version_is_case_insensitive() -> None:
    # RFC 3261 §7.1: "The SIP-Version string is case-insensitive".
    m = parse_message(options(start=b"OPTIONS sip:bob@example.com sip/2.0"))
    assert isinstance(m, Request)
    assert m.method == "OPTIONS"
    r = parse_message(msg(b"sip/2.0 200 OK", VIA, FROM, TO, CALL_ID, b"CSeq: 1 OPTIONS"))
    assert isinstance(r, Response)
    assert r.status == 200


def test_unsupported_version_is_505_with_an_answerable_message() -> None:
    e = parse_error(options(start=b"OPTIONS sip:bob@example.com SIP/7.0"))
    assert e.status == 505
    # enough was read to build the 505 (RFC 3261 §8.2.6)
    assert isinstance(e.message, Request)
    assert e.message.call_id == "a84b4c76e66710@pc33.example.com"


@pytest.mark.parametrize("start", [
    b"OPTIONS sip:bob@example.com HTTP/1.1",
    b"OPTIONS  sip:bob@example.com SIP/2.0",
    b"OPTIONS sip:bob@example.com SIP/2.0 ",
    b"OPTIONS sip:bob@example.com",
    b"OPTIONS <sip:bob@example.com> SIP/2.0",
    b"OPTIONS bob SIP/2.0",
    b"OPT(ONS sip:bob@example.com SIP/2.0",
])
def test_malformed_request_line_is_400(start: bytes) -> None:
    assert parse_error(options(start=start)).status == 400


def test_methods_are_case_sensitive_tokens() -> None:
    # RFC 3261 §7.1: the method name is case-sensitive; CSeq must name the same.
    data = options(cseq=b"1 options")
    assert parse_error(data).status == 400
    m = parse_message(options(start=b"options sip:bob@example.com SIP/2.0", cseq=b"1 options"))
    assert isinstance(m, Request)
    assert m.method == "options"


# -- header names -----------------------------------------------------------------


def test_compact_forms_map_to_full_names() -> None:
    data = msg(
        b"INVITE sip:bob@example.com SIP/2.0",
        b"v: SIP/2.0/UDP pc33.example.com;branch=z9hG4bKx",
        b"f: <sip:alice@example.com>;tag=1",
        b"t: <sip:bob@example.com>",
        b"i: compact@example.com",
        b"CSeq: 2 INVITE",
        b"m: <sip:alice@192.0.2.4>",
        b"c: application/sdp",
        b"s: compact forms",
        b"k: path, outbound",
        b"e: gzip",
        b"o: presence",
        b"r: <sip:carol@example.com>",
        b"u: talk",
        b"x: 1800",
        b"b: <sip:dave@example.com>",
        b"l: 5",
        body=b"v=0\r\n",
        cl=False,
    )
    m = parse_message(data)
    expect = {
        "via": "SIP/2.0/UDP pc33.example.com;branch=z9hG4bKx",
        "from": "<sip:alice@example.com>;tag=1",
        "to": "<sip:bob@example.com>",
        "call-id": "compact@example.com",
        "contact": "<sip:alice@192.0.2.4>",
        "content-type": "application/sdp",
        "subject": "compact forms",
        "supported": "path, outbound",
        "content-encoding": "gzip",
        "event": "presence",
        "refer-to": "<sip:carol@example.com>",
        "allow-events": "talk",
        "session-expires": "1800",
        "referred-by": "<sip:dave@example.com>",
        "content-length": "5",
    }
    for name, value in expect.items():
        assert m.get(name) == value, name
    assert m.call_id == "compact@example.com"
    assert m.body == b"v=0\r\n"
    assert m.get_all("supported") == ["path", "outbound"]
    # the wire keeps the compact names
    assert m.serialise() == data
    assert [h.raw_name for h in m.headers][:3] == ["v", "f", "t"]


def test_compact_form_table_is_rfc_3261() -> None:
    # RFC 3261 §7.3.3 / §20: the compact forms every element must understand.
    for short, full in {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact",
                        "l": "content-length", "c": "content-type", "e": "content-encoding",
                        "s": "subject", "k": "supported"}.items():
        assert COMPACT_FORMS[short] == full


def test_header_names_are_case_insensitive_and_may_have_space_before_colon() -> None:
    data = msg(b"OPTIONS sip:bob@example.com SIP/2.0",
               b"VIA   :SIP/2.0/UDP h.example.com;branch=z9hG4bK1",
               b"fRoM\t: <sip:a@example.com>;tag=2",
               b"TO:<sip:b@example.com>",
               b"call-ID:    abc",
               b"cseq : 7 OPTIONS",
               b"X-Custom-Thing :  some  value ")
    m = parse_message(data)
    assert m.top_via().host == "h.example.com"
    assert m.from_().tag == "2"
    assert m.to().uri == "sip:b@example.com"
    assert m.call_id == "abc"
    assert m.cseq == (7, "OPTIONS")
    # inner whitespace stays, surrounding whitespace goes
    assert m.get("x-custom-thing") == "some  value"
    assert [h.raw_name for h in m.headers][:2] == ["VIA", "fRoM"]
    assert m.serialise() == data


@pytest.mark.parametrize("line", [b"Bad Name: x", b"B@d: x", b": novalue", b"NoColonHere"])
def test_bad_header_line_is_400(line: bytes) -> None:
    assert parse_error(options(line)).status == 400


def test_continuation_before_any_header_is_400() -> None:
    data = msg(b"OPTIONS sip:bob@example.com SIP/2.0", b" folded", VIA, FROM, TO, CALL_ID,
               b"CSeq: 1 OPTIONS")
    assert parse_error(data).status == 400


# -- folding (RFC 3261 §7.3.1) -----------------------------------------------------


def test_folded_header_unfolds_to_one_space_but_serialises_exactly() -> None:
    subject = b"Subject: I know you're there,\r\n         pick up the phone   \r\n\t  and talk to me!"
    via = b"Via: SIP/2.0/UDP pc33.example.com\r\n ;branch=z9hG4bKfold"
    data = msg(b"OPTIONS sip:bob@example.com SIP/2.0", via, FROM, TO, CALL_ID,
               b"CSeq:\r\n 9\r\n OPTIONS", subject)
    m = parse_message(data)
    assert m.get("subject") == "I know you're there, pick up the phone and talk to me!"
    assert m.cseq == (9, "OPTIONS")
    assert m.top_via().branch == "z9hG4bKfold"
    assert m.serialise() == data
    # the raw field keeps its continuation lines
    assert [h.raw for h in m.headers if h.name == "subject"] == [subject + CRLF]


def test_fold_right_after_the_colon() -> None:
    data = options(b"Subject:\r\n  late start")
    m = parse_message(data)
    assert m.get("subject") == "late start"
    assert m.serialise() == data


def test_folded_last_header() -> None:
    data = options(cl=False)[:-2] + b"X-Last: one\r\n two\r\n\r\n"
    m = parse_message(data)
    assert m.get("x-last") == "one two"
    assert m.serialise() == data


# -- lists and repeated headers -----------------------------------------------------


def test_get_all_flattens_commas_and_repeats_in_order() -> None:
    data = msg(
        b"INVITE sip:bob@example.com SIP/2.0",
        b"Via: SIP/2.0/UDP p1.example.com;branch=z9hG4bKa, SIP/2.0/TCP p2.example.com;branch=z9hG4bKb",
        b"Via: SIP/2.0/UDP p3.example.com;branch=z9hG4bKc",
        FROM, TO, CALL_ID, b"CSeq: 1 INVITE",
        b'Contact: "Smith, John" <sip:j@192.0.2.1>;q=0.5, <sip:j@192.0.2.2;x=a,b>',
        b"Route: <sip:p1.example.com;lr>,<sip:p2.example.com;lr>",
        b"Route: <sip:p3.example.com;lr>",
        b"Allow: INVITE, ACK ,CANCEL",
    )
    m = parse_message(data)
    assert [v.host for v in m.vias()] == ["p1.example.com", "p2.example.com", "p3.example.com"]
    assert [v.branch for v in m.vias()] == ["z9hG4bKa", "z9hG4bKb", "z9hG4bKc"]
    assert m.top_via().host == "p1.example.com"
    assert m.get_all("contact") == ['"Smith, John" <sip:j@192.0.2.1>;q=0.5',
                                     "<sip:j@192.0.2.2;x=a,b>"]
    assert m.get_all("route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>",
                                  "<sip:p3.example.com;lr>"]
    assert m.get_all("allow") == ["INVITE", "ACK", "CANCEL"]
    assert m.get_all("record-route") == []
    assert m.serialise() == data


def test_contact_star() -> None:
    data = msg(b"REGISTER sip:example.com SIP/2.0", VIA, FROM, TO, CALL_ID,
               b"CSeq: 2 REGISTER", b"Contact: *", b"Expires: 0")
    m = parse_message(data)
    assert m.get_all("contact") == ["*"]
    assert m.get("expires") == "0"


def test_contact_addr_spec_with_uri_headers_must_be_in_angle_brackets() -> None:
    # RFC 3261 §20: an addr-spec with ',', ';' or '?' must use the name-addr form.
    bad = options(b"Contact: sip:a@example.com?Route=%3Csip:x%3E")
    assert parse_error(bad).status == 400
    good = parse_message(options(b"Contact: <sip:a@example.com?Route=%3Csip:x%3E>"))
    assert good.get_all("contact") == ["<sip:a@example.com?Route=%3Csip:x%3E>"]


# -- byte-exact pass-through ----------------------------------------------------------


ODD = msg(
    b"INVITE sip:bob@example.com;transport=tcp SIP/2.0",
    b"Via:   SIP/2.0/UDP  pc33.example.com ;branch=z9hG4bK1 ;rport",
    b"v:SIP/2.0/TCP p2.example.com;branch=z9hG4bK2",
    b"Max-Forwards:\t70",
    b'From:"Ren\xc3\xa9 \xe2\x98\x8e" <sip:rene@example.com>;tag=x',
    b"To :  <sip:bob@example.com>",
    b"i:odd@example.com",
    b"CSeq: 1  INVITE",
    b"Subject: latin-1 \xe9t\xe9, stray \xff\xfe, DEL \x7f, BEL \x07",
    b"X-Folded: a,\r\n b,\r\n\t c",
    b"Content-Type: application/octet-stream",
    body=b"\x00\x01binary\r\n\r\nbody\xff",
)


def test_odd_octets_and_utf8_survive() -> None:
    m = parse_message(ODD)
    assert m.serialise() == ODD
    assert m.from_().display == '"Ren\u00e9 \u260e"'
    subject = m.get("subject")
    assert subject is not None
    assert "\u00e9" not in subject  # 0xE9 alone is not UTF-8: kept as an escaped octet
    assert subject.encode("utf-8", "surrogateescape") == (
        b"latin-1 \xe9t\xe9, stray \xff\xfe, DEL \x7f, BEL \x07")
    assert m.body == b"\x00\x01binary\r\n\r\nbody\xff"


@pytest.mark.parametrize("change", ["set", "set_new", "insert", "append", "remove", "set_uri"])
def test_changing_one_header_leaves_every_other_byte_alone(change: str) -> None:
    m = parse_message(ODD)
    before = [h.serialise() for h in m.headers]
    if change == "set":
        m.set("Max-Forwards", "69")
    elif change == "set_new":
        m.set("Record-Route", "<sip:relay.example.net;lr>")
    elif change == "insert":
        m.insert("Via", "SIP/2.0/TLS relay.example.net;branch=z9hG4bKrelay")
    elif change == "append":
        m.append("X-Relay", "1")
    elif change == "remove":
        m.remove("subject")
    else:
        assert isinstance(m, Request)
        m.set_uri("sip:bob@192.0.2.9:5070")
    out = m.serialise()
    after = [h.serialise() for h in m.headers]
    # every untouched header is the same bytes, in the same order
    untouched = [b for b in before if b in after]
    assert untouched == [b for b in after if b in before]
    changed_count = {"set": 1, "set_new": 0, "insert": 0, "append": 0, "remove": 1,
                     "set_uri": 0}[change]
    assert len(untouched) == len(before) - changed_count
    for raw in untouched:
        assert raw in out
    assert out.endswith(b"\r\n\r\n\x00\x01binary\r\n\r\nbody\xff")
    assert parse_message(out).serialise() == out
    if change == "set":
        assert b"Max-Forwards: 69\r\n" in out
        assert b"Max-Forwards:\t70" not in out
        # the header stays in its place (between the Vias and From)
        assert out.index(b"v:SIP/2.0/TCP") < out.index(b"Max-Forwards: 69") < out.index(b"From:")
    elif change == "insert":
        assert out.split(CRLF)[1] == b"Via: SIP/2.0/TLS relay.example.net;branch=z9hG4bKrelay"
        assert parse_message(out).top_via().host == "relay.example.net"
    elif change == "remove":
        assert b"Subject" not in out
    elif change == "set_uri":
        assert out.startswith(b"INVITE sip:bob@192.0.2.9:5070 SIP/2.0\r\n")
        assert out[out.index(CRLF):] == ODD[ODD.index(CRLF):]


def test_set_removes_later_duplicates_and_keeps_compact_name() -> None:
    m = parse_message(ODD)
    m.set("Via", "SIP/2.0/UDP only.example.com;branch=z9hG4bKonly")
    out = m.serialise()
    assert out.count(b"branch=") == 1
    assert b"v:SIP/2.0/TCP" not in out
    assert b"Via: SIP/2.0/UDP only.example.com;branch=z9hG4bKonly\r\n" in out


def test_set_body_updates_content_length() -> None:
    m = parse_message(options())
    m.set_body(b"hello")
    out = m.serialise()
    assert out.endswith(b"Content-Length: 5\r\n\r\nhello")
    assert parse_message(out, datagram=False).body == b"hello"


# -- scalar fields -----------------------------------------------------------------


def test_cseq_limits() -> None:
    top = parse_message(options(cseq=b"%d OPTIONS" % limits.MAX_CSEQ))
    assert top.cseq == (limits.MAX_CSEQ, "OPTIONS")
    e = parse_error(options(cseq=b"%d OPTIONS" % (limits.MAX_CSEQ + 1)))
    assert e.status == 400
    assert "CSeq" in e.reason


@pytest.mark.parametrize("cseq", [b"OPTIONS", b"1", b"-1 OPTIONS", b"1 OPTIONS extra",
                                  b"x1 OPTIONS", b"\xc2\xb2 OPTIONS", b"\xd9\xa1 OPTIONS"])
def test_bad_cseq_is_400(cseq: bytes) -> None:
    # '\xc2\xb2' is '²' and '\xd9\xa1' is Arabic-Indic one: str.isdigit() says yes to both.
    assert parse_error(options(cseq=cseq)).status == 400


def test_cseq_method_mismatch_is_400() -> None:
    e = parse_error(options(cseq=b"1 INVITE"))
    assert e.status == 400
    assert "CSeq" in e.reason


@pytest.mark.parametrize("mf", [b"256", b"-1", b"seventy", b"\xc2\xb2", b"\xd9\xa7\xd9\xa0"])
def test_bad_max_forwards_is_400(mf: bytes) -> None:
    data = options().replace(b"Max-Forwards: 70", b"Max-Forwards: " + mf)
    assert parse_error(data).status == 400


def test_max_forwards_bounds_accepted() -> None:
    for mf in (b"0", b"255"):
        m = parse_message(options().replace(b"Max-Forwards: 70", b"Max-Forwards: " + mf))
        assert m.get("max-forwards") == mf.decode()


@pytest.mark.parametrize("port", [b"0", b"65536", b"\xc2\xb2", b"\xd9\xa5\xd9\xa0", b"x"])
def test_bad_via_port_is_400(port: bytes) -> None:
    data = options().replace(b"pc33.example.com:5060", b"pc33.example.com:" + port)
    assert parse_error(data).status == 400


@pytest.mark.parametrize("missing", [b"Via", b"From", b"To", b"Call-ID", b"CSeq"])
def test_missing_mandatory_header_is_400(missing: bytes) -> None:
    lines = [line for line in options().split(CRLF) if not line.startswith(missing + b":")]
    data = CRLF.join(lines)
    assert parse_error(data).status == 400


@pytest.mark.parametrize("dup", [
    b"Call-ID: other@example.com",
    b"i: other@example.com",
    b"Content-Length: 0",
    b"l: 0",
    b"CSeq: 1 OPTIONS",
    b"To: <sip:carol@example.com>",
    b"f: <sip:eve@example.com>;tag=9",
    b"Max-Forwards: 70",
])
def test_duplicate_single_valued_header_is_400(dup: bytes) -> None:
    e = parse_error(options(dup))
    assert e.status == 400
    assert "more than one" in e.reason


# -- Content-Length and datagrams (RFC 3261 §18.3) ------------------------------------


def test_missing_content_length_on_a_datagram_takes_the_rest() -> None:
    data = options(cl=False, body=b"the whole\r\nrest\x00")
    m = parse_message(data, datagram=True)
    assert m.body == b"the whole\r\nrest\x00"
    assert m.serialise() == data


def test_missing_content_length_on_a_stream_is_400() -> None:
    assert parse_error(options(cl=False), datagram=False).status == 400


def test_content_length_larger_than_the_datagram_is_400() -> None:
    data = options(body=b"12345").replace(b"Content-Length: 5", b"Content-Length: 6")
    assert parse_error(data).status == 400


def test_trailing_octets_past_content_length_are_dropped() -> None:
    data = options(body=b"12345")
    m = parse_message(data + b"garbage\r\nINVITE sip:x SIP/2.0\r\n")
    assert m.body == b"12345"
    assert m.serialise() == data


@pytest.mark.parametrize("cl", [b"-1", b"five", b"5 5", b"+5", b"\xc2\xb2", b"\xd9\xa5",
                                b"99999999999"])
def test_bad_content_length_is_400(cl: bytes) -> None:
    data = options(body=b"12345").replace(b"Content-Length: 5", b"Content-Length: " + cl)
    assert parse_error(data).status == 400


def test_content_length_over_the_message_limit_is_513() -> None:
    data = options().replace(b"Content-Length: 0", b"Content-Length: %d"
                             % (limits.MAX_MESSAGE_SIZE + 1))
    assert parse_error(data).status == 513


def test_datagram_without_the_empty_line() -> None:
    # the header section still ends with CRLF (RFC 4475 baddn.dat is sent like this)
    data = options()[:-2]
    m = parse_message(data)
    assert m.body == b""
    assert m.serialise() == data + CRLF


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\n\r\n", b"OPTIONS sip:a@b SIP/2.0",
                                  b"OPTIONS sip:a@b SIP/2.0\r\nVia: x"])
def test_truncated_input_is_400(data: bytes) -> None:
    assert parse_error(data).status == 400


# -- limits (limits.py) --------------------------------------------------------------


def test_message_over_max_size_is_513() -> None:
    body = b"x" * limits.MAX_MESSAGE_SIZE
    e = parse_error(options(body=body))
    assert e.status == 513


def test_message_at_max_size_parses() -> None:
    head = options(body=b"")
    # fill to exactly the limit: the body length changes the Content-Length digits
    size = limits.MAX_MESSAGE_SIZE - len(head) - 4
    data = options(body=b"y" * size)
    assert len(data) == limits.MAX_MESSAGE_SIZE
    assert len(parse_message(data).body) == size


def test_header_section_over_limit_is_513() -> None:
    filler = [b"X-Filler-%d: %s" % (i, b"f" * 1000) for i in range(40)]
    data = options(*filler)
    assert len(data) > limits.MAX_HEADER_SECTION
    assert parse_error(data).status == 513


def test_too_many_headers_is_513() -> None:
    base = len(parse_message(options()).headers)
    ok = options(*[b"X-H: %d" % i for i in range(limits.MAX_HEADERS - base)])
    assert len(parse_message(ok).headers) == limits.MAX_HEADERS
    over = options(*[b"X-H: %d" % i for i in range(limits.MAX_HEADERS - base + 1)])
    assert parse_error(over).status == 513


def test_folded_lines_count_as_one_header() -> None:
    base = len(parse_message(options()).headers)
    folded = b"X-H: a" + b"\r\n b" * 300
    m = parse_message(options(folded, *[b"X-H: %d" % i for i in range(limits.MAX_HEADERS - base - 1)]))
    assert len(m.headers) == limits.MAX_HEADERS


def test_header_line_over_max_length_is_400() -> None:
    prefix = b"X-Long: "
    at_limit = prefix + b"a" * (limits.MAX_LINE_LENGTH - len(prefix))
    assert parse_message(options(at_limit)).get("x-long") == "a" * (
        limits.MAX_LINE_LENGTH - len(prefix))
    e = parse_error(options(at_limit + b"a"))
    assert e.status == 400
    assert "too long" in e.reason


def test_one_physical_line_over_max_length_is_400_even_when_folded() -> None:
    line = b"b" * (limits.MAX_LINE_LENGTH + 1)
    assert parse_error(options(b"X-Long: a\r\n " + line)).status == 400
    # many short folded lines adding up to more than the limit are fine
    ok = b"X-Long: a" + b"\r\n " + b"\r\n ".join([b"c" * 1000] * 10)
    assert len(parse_message(options(ok)).get("x-long") or "") > limits.MAX_LINE_LENGTH


def test_start_line_over_max_length_is_400() -> None:
    uri = b"sip:" + b"u" * limits.MAX_LINE_LENGTH + b"@example.com"
    e = parse_error(options(start=b"OPTIONS " + uri + b" SIP/2.0"))
    assert e.status == 400
    assert "too long" in e.reason


# -- URIs ----------------------------------------------------------------------------


def test_request_uri_is_kept_as_written_and_parses_as_sip_uri() -> None:
    m = parse_message(options(start=b"OPTIONS sips:%61lice;x=1@[2001:db8::1]:5061;transport=tls"
                              b";lr?Subject=hi SIP/2.0"))
    assert isinstance(m, Request)
    assert m.uri == "sips:%61lice;x=1@[2001:db8::1]:5061;transport=tls;lr?Subject=hi"
    u = SipUri.parse(m.uri)
    assert (u.scheme, u.user, u.host, u.port) == ("sips", "%61lice;x=1", "2001:db8::1", 5061)
    assert u.params == {"transport": "tls", "lr": None}
    assert u.headers == "Subject=hi"


def test_non_sip_request_uri_parses_and_sip_uri_says_416() -> None:
    m = parse_message(options(start=b"OPTIONS tel:+15551234567 SIP/2.0"))
    assert isinstance(m, Request)
    with pytest.raises(SipParseError) as info:
        SipUri.parse(m.uri)
    assert info.value.status == 416
