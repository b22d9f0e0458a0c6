"""SipMessage changes: what they rewrite, what keeps its bytes (relay/sip/message.py)."""

from __future__ import annotations

from relay.sip import Request, parse_message
from relay.sip.headers import NameAddr, Via
from relay.sip.uri import SipUri
from tests.workmeter import work_of

CRLF = b"\r\n"


def invite(*extra: bytes) -> bytes:
    lines = [b"INVITE sip:bob@example.com SIP/2.0",
             b"Via: SIP/2.0/UDP pc33.example.com;branch=z9hG4bK1",
             *extra,
             b"From: <sip:alice@example.com>;tag=1", b"To: <sip:bob@example.com>",
             b"Call-ID: c1", b"CSeq: 1 INVITE", b"Max-Forwards: 70", b"Content-Length: 0"]
    return CRLF.join(lines) + CRLF + CRLF


ROUTES = [
    b"Route: <sip:a.example.com;lr>,  <sip:b.example.com;lr>",
    b"X-Between: keep me  ,as I am",
    b"route:<sip:c.example.com;lr>",
    b"Route: <sip:d.example.com;lr>, <sip:e.example.com;lr>,\r\n <sip:f.example.com;lr>",
]


def test_pop_first_values_spans_fields_and_rewrites_only_the_one_it_cuts() -> None:
    data = invite(*ROUTES)
    m = parse_message(data)
    taken = m.pop_first_values("route", 4)
    assert taken == ["<sip:a.example.com;lr>", "<sip:b.example.com;lr>",
                     "<sip:c.example.com;lr>", "<sip:d.example.com;lr>"]
    assert m.get_all("route") == ["<sip:e.example.com;lr>", "<sip:f.example.com;lr>"]
    out = m.serialise()
    # the two wholly consumed fields are gone, the one cut is rewritten once, the
    # rest (X-Between between them, and every other field) keeps its bytes
    assert out == data.replace(ROUTES[0] + CRLF, b"").replace(ROUTES[2] + CRLF, b"").replace(
        ROUTES[3], b"Route: <sip:e.example.com;lr>, <sip:f.example.com;lr>")


def test_pop_first_values_consuming_a_field_exactly_leaves_the_next_untouched() -> None:
    data = invite(*ROUTES)
    m = parse_message(data)
    assert len(m.pop_first_values("route", 2)) == 2
    assert m.serialise() == data.replace(ROUTES[0] + CRLF, b"")


def test_pop_first_values_more_than_there_are_takes_them_all() -> None:
    m = parse_message(invite(*ROUTES))
    assert len(m.pop_first_values("route", 100)) == 6
    assert not m.has("route")
    assert m.get("x-between") == "keep me  ,as I am"


def test_pop_first_values_zero_changes_nothing() -> None:
    data = invite(*ROUTES)
    m = parse_message(data)
    assert m.pop_first_values("route", 0) == []
    assert m.serialise() == data


def test_empty_fields_before_the_values_taken_go_with_them() -> None:
    m = parse_message(invite(b"Route:", b"Route: <sip:a.example.com;lr>, <sip:b.example.com;lr>"))
    assert m.pop_first_value("route") == "<sip:a.example.com;lr>"
    assert m.get_all("route") == ["<sip:b.example.com;lr>"]
    assert [h.value for h in m.iter_headers("route")] == ["<sip:b.example.com;lr>"]


def test_pop_first_value_of_a_missing_header_is_none() -> None:
    data = invite()
    m = parse_message(data)
    assert m.pop_first_value("route") is None
    assert m.serialise() == data


def test_quoted_commas_are_not_value_boundaries() -> None:
    m = parse_message(invite(b'Route: "a, b" <sip:a.example.com;lr>, <sip:b.example.com;lr>'))
    assert m.pop_first_values("route", 1) == ['"a, b" <sip:a.example.com;lr>']
    assert m.get_all("route") == ["<sip:b.example.com;lr>"]


def test_loose_routing_in_one_pass() -> None:
    """The recipe the proxy core follows (RFC 3261 §16.4): read the route set once,
    walk it until the first entry that is not ours, remove those entries at once."""
    ours = {"relay.example.net"}
    m = parse_message(invite(b"Route: <sip:tok1@relay.example.net;lr>",
                             b"Route: <sip:tok2@relay.example.net;lr>, <sip:pbx.example.com;lr>",
                             b"Route: <sip:relay.example.net;lr>"))
    routes = m.get_all("route")
    mine = 0
    token = None
    for value in routes:
        uri = SipUri.parse(NameAddr.parse(value).uri)
        if uri.host not in ours:
            break
        mine += 1
        token = uri.user or token
    m.pop_first_values("route", mine)
    assert (mine, token) == (2, "tok2")
    assert m.get_all("route") == ["<sip:pbx.example.com;lr>", "<sip:relay.example.net;lr>"]


# -- what the parser read is kept on the fields, and forgotten when a value changes ----------


def test_a_changed_value_is_read_again() -> None:
    m = parse_message(invite())
    assert m.top_via().host == "pc33.example.com" and m.from_tag == "1" and m.cseq == (1, "INVITE")
    fields = {h.name: h for h in m.headers}
    fields["via"].value = "SIP/2.0/TCP other.example.com;branch=z9hG4bK2, SIP/2.0/UDP h;branch=z9hG4bK3"
    fields["from"].value = "<sip:alice@example.com>;tag=changed"
    fields["cseq"].value = "7 INVITE"
    assert [v.host for v in m.vias()] == ["other.example.com", "h"]
    assert m.get_all("via")[1] == "SIP/2.0/UDP h;branch=z9hG4bK3"
    assert m.top_via().transport == "TCP"
    assert m.from_tag == "changed"
    assert m.cseq == (7, "INVITE")


def test_fields_changed_through_the_message_are_read_afresh() -> None:
    m = parse_message(invite())
    m.set("From", "<sip:bob@example.com>;tag=set")
    m.insert_before("Via", "SIP/2.0/TLS relay.example.net;branch=z9hG4bKrelay")
    assert m.from_tag == "set"
    assert [v.host for v in m.vias()] == ["relay.example.net", "pc33.example.com"]
    assert m.pop_first_value("via") == "SIP/2.0/TLS relay.example.net;branch=z9hG4bKrelay"
    assert m.top_via().host == "pc33.example.com"


def test_routing_reads_what_the_parser_already_parsed() -> None:
    """Top Via, every Via, From, To and CSeq are parsed while validating; routing asks
    for each several times per message and parses nothing: the first read after the
    parse costs exactly what any later read costs (counted, not timed: tests/workmeter.py),
    and a value changed in between makes the read cost more (it parses again)."""
    m = parse_message(invite(b"Via: SIP/2.0/UDP b.example.com:5070;branch=z9hG4bKb;rport"))
    assert isinstance(m, Request)

    def read() -> None:
        m.top_via(), m.vias(), m.from_tag, m.to(), m.cseq, m.get_all("via")

    _, first = work_of(read)
    _, second = work_of(read)
    assert first == second
    m.headers[0].value = "SIP/2.0/UDP c.example.com;branch=z9hG4bKc"
    _, after_change = work_of(read)
    _, one_parse = work_of(lambda: Via.parse("SIP/2.0/UDP c.example.com;branch=z9hG4bKc"))
    assert after_change >= second + one_parse
