"""Every limit of relay/sip/limits.py: at the limit accepted, one over refused with its answer.

A request over a limit raises SipLimitExceeded naming the limit, with the status
the RFC gives (513, 414 for the Request-URI) and the message when enough of it
was read to answer (RFC 3261 §8.2.6); a response over a limit has nothing to
answer (the proxy drops and counts it).
"""

from __future__ import annotations

import pytest

from relay.sip import Request, SipParseError, limits, parse_message
from relay.sip.errors import SipLimitExceeded
from relay.sip.headers import NameAddr, Via, parse_params, split_commas
from relay.sip.uri import SipUri

CRLF = b"\r\n"
VIA = b"Via: SIP/2.0/UDP pc33.example.com:5060;branch=z9hG4bK776asdhds"
BASE = [VIA, b"From: Alice <sip:alice@example.com>;tag=1928301774",
        b"To: Bob <sip:bob@example.com>", b"Call-ID: a84b4c76e66710@pc33.example.com"]


def request(*extra: bytes, start: bytes = b"INVITE sip:bob@example.com SIP/2.0") -> bytes:
    lines = [start, *BASE, b"CSeq: 1 INVITE", b"Max-Forwards: 70", *extra, b"Content-Length: 0"]
    return CRLF.join(lines) + CRLF + CRLF


def response(*extra: bytes) -> bytes:
    lines = [b"SIP/2.0 200 OK", *BASE, b"CSeq: 1 INVITE", *extra, b"Content-Length: 0"]
    return CRLF.join(lines) + CRLF + CRLF


def refused(data: bytes) -> SipLimitExceeded:
    with pytest.raises(SipLimitExceeded) as info:
        parse_message(data)
    return info.value


def assert_answerable(e: SipParseError) -> None:
    assert isinstance(e.message, Request)
    assert e.message.call_id == "a84b4c76e66710@pc33.example.com"


def vias(n: int) -> list[bytes]:
    return [b"Via: SIP/2.0/UDP p%d.example.com;branch=z9hG4bK%d" % (i, i) for i in range(n)]


# -- lists: one field per value, or all values in one field, count the same ------------

LISTS = [
    ("route", "MAX_ROUTES", limits.MAX_ROUTES, b"Route", b"<sip:p%d.example.com;lr>"),
    ("record-route", "MAX_RECORD_ROUTES", limits.MAX_RECORD_ROUTES, b"Record-Route",
     b"<sip:p%d.example.com;lr>"),
    ("path", "MAX_PATHS", limits.MAX_PATHS, b"Path", b"<sip:p%d.example.com;lr>"),
    ("contact", "MAX_CONTACTS", limits.MAX_CONTACTS, b"Contact",
     b"<sip:u%d@192.0.2.4>;expires=60"),
]


@pytest.mark.parametrize(("name", "limit", "cap", "field", "value"), LISTS)
@pytest.mark.parametrize("one_field", [True, False])
def test_list_at_the_limit_parses_one_over_is_513(
    name: str, limit: str, cap: int, field: bytes, value: bytes, one_field: bool,
) -> None:
    def fields(n: int) -> list[bytes]:
        values = [value % i for i in range(n)]
        if one_field:
            return [field + b": " + b", ".join(values)]
        return [field + b": " + v for v in values]

    m = parse_message(request(*fields(cap)))
    assert len(m.get_all(name)) == cap
    e = refused(request(*fields(cap + 1)))
    assert (e.limit, e.status) == (limit, 513)
    assert_answerable(e)


def test_vias_at_the_limit_parse_one_over_is_513() -> None:
    m = parse_message(request(*vias(limits.MAX_VIAS - 1)))  # + the one in BASE
    assert len(m.vias()) == limits.MAX_VIAS
    e = refused(request(*vias(limits.MAX_VIAS)))
    assert (e.limit, e.status) == ("MAX_VIAS", 513)
    assert_answerable(e)
    # the same values folded into one field
    folded = b"Via: " + b",\r\n ".join(v[5:] for v in vias(limits.MAX_VIAS))
    assert refused(request(folded)).limit == "MAX_VIAS"


def test_a_response_over_a_limit_has_nothing_to_answer() -> None:
    assert len(parse_message(response(*vias(limits.MAX_VIAS - 1))).vias()) == limits.MAX_VIAS
    e = refused(response(*vias(limits.MAX_VIAS)))
    assert e.limit == "MAX_VIAS"
    assert e.message is None  # the proxy drops it and counts parse_errors_total:513


def test_empty_list_fields_hold_no_value() -> None:
    m = parse_message(request(*[b"Route:"] * 10, b"Route: <sip:a.example.com;lr>"))
    assert m.get_all("route") == ["<sip:a.example.com;lr>"]


def test_a_route_with_a_broken_quote_is_counted_not_refused() -> None:
    # Route is only counted by the parser (the proxy reads it, and answers a
    # broken one); with an unterminated quote every comma counts as a separator
    broken = b'Route: "' + b", ".join([b"<sip:p.example.com;lr>"] * limits.MAX_ROUTES)
    m = parse_message(request(broken))
    with pytest.raises(SipParseError):
        m.get_all("route")
    assert refused(request(broken + b", <sip:q.example.com>")).limit == "MAX_ROUTES"


def test_a_response_contact_is_counted_not_validated() -> None:
    # a response is forwarded as it is: a Contact the relay does not read stays
    m = parse_message(response(b'Contact: "broken <sip:a@b>'))
    assert m.get("contact") == '"broken <sip:a@b>'
    contacts = b"Contact: " + b", ".join([b"<sip:u@h>"] * (limits.MAX_CONTACTS + 1))
    assert refused(response(contacts)).limit == "MAX_CONTACTS"


@pytest.mark.parametrize("via", [b"Via:", b"Via: ,", b"v: , ,"])
def test_a_via_field_without_a_value_is_400(via: bytes) -> None:
    # RFC 3261 §20.42: at least one via-parm; the proxy rewrites the first value
    # of the first Via field (received/rport) and strips it from responses
    with pytest.raises(SipParseError) as info:
        parse_message(request(via))
    assert info.value.status == 400
    with pytest.raises(SipParseError):
        parse_message(response(via))


# -- separators across the message -----------------------------------------------------


def _filler(char: bytes, n: int) -> list[bytes]:
    """``n`` of ``char`` in X- fields (not lists: only the whole-message count applies)."""
    per = 1000
    return [b"X-Filler-%d: %s" % (i, char * min(per, n - i * per)) for i in range(-(-n // per))]


@pytest.mark.parametrize(("char", "limit", "cap"), [
    (b",", "MAX_COMMAS", limits.MAX_COMMAS),
    (b";", "MAX_SEMICOLONS", limits.MAX_SEMICOLONS),
])
def test_separators_in_the_header_section(char: bytes, limit: str, cap: int) -> None:
    base = request().count(char)
    assert base < 10
    m = parse_message(request(*_filler(char, cap - base)))
    assert m.serialise().count(char) == cap
    e = refused(request(*_filler(char, cap - base + 1)))
    assert (e.limit, e.status) == (limit, 513)
    assert_answerable(e)


# -- parameters, URIs, values ----------------------------------------------------------


def test_parameters_per_value() -> None:
    params = ";".join(f"p{i}" for i in range(limits.MAX_PARAMS))
    assert len(parse_params(params)) == limits.MAX_PARAMS
    assert len(parse_params(";" + params)) == limits.MAX_PARAMS
    over = params + ";one-more"
    with pytest.raises(SipLimitExceeded) as info:
        parse_params(over)
    assert (info.value.limit, info.value.status) == ("MAX_PARAMS", 513)
    # in a message: a Via with one parameter too many is refused with 513
    via = b"Via: SIP/2.0/UDP h.example.com;branch=z9hG4bK1;" + over.encode()
    e = refused(request(via))
    assert e.limit == "MAX_PARAMS"
    assert_answerable(e)
    # an URI's parameters count on their own, apart from the header's
    uri = "sip:a@h;" + params
    assert len(SipUri.parse(uri).params) == limits.MAX_PARAMS
    assert len(NameAddr.parse(f"<{uri}>;{params}").params) == limits.MAX_PARAMS
    with pytest.raises(SipLimitExceeded):
        SipUri.parse(uri + ";x")


def test_quoted_semicolons_are_not_parameters() -> None:
    params = ";".join(f"p{i}" for i in range(limits.MAX_PARAMS - 1))
    got = parse_params(params + ';q="' + ";" * 100 + '"')
    assert got["q"] == '"' + ";" * 100 + '"'


def _uri(length: int) -> bytes:
    head = b"sip:"
    tail = b"@example.com"
    return head + b"u" * (length - len(head) - len(tail)) + tail


def test_request_uri_over_the_limit_is_414() -> None:
    at = _uri(limits.MAX_URI_LENGTH)
    m = parse_message(request(start=b"INVITE " + at + b" SIP/2.0"))
    assert isinstance(m, Request) and len(m.uri) == limits.MAX_URI_LENGTH
    e = refused(request(start=b"INVITE " + _uri(limits.MAX_URI_LENGTH + 1) + b" SIP/2.0"))
    assert (e.limit, e.status) == ("MAX_URI_LENGTH", 414)
    assert_answerable(e)


def test_a_uri_in_a_header_over_the_limit_is_513() -> None:
    at = _uri(limits.MAX_URI_LENGTH)
    assert parse_message(request(b"Contact: <" + at + b">")).get("contact")
    over = _uri(limits.MAX_URI_LENGTH + 1)
    for field in (b"Contact: <" + over + b">", b"Contact: " + over):
        e = refused(request(field))
        assert (e.limit, e.status) == ("MAX_URI_LENGTH", 513)
        assert_answerable(e)
    with pytest.raises(SipLimitExceeded):
        SipUri.parse(over.decode())
    with pytest.raises(SipLimitExceeded):
        NameAddr.parse("<" + over.decode() + ">")


def test_header_value_after_unfolding() -> None:
    line = b"c" * 1000
    n = limits.MAX_HEADER_VALUE // 1001  # 1000 octets and the SP of each fold
    value = b"a" + b"".join(b"\r\n " + line for _ in range(n))
    at = value + b"\r\n " + b"d" * (limits.MAX_HEADER_VALUE - 1 - 1001 * n - 1)
    m = parse_message(request(b"X-Long: " + at))
    assert len(m.get("x-long") or "") == limits.MAX_HEADER_VALUE
    e = refused(request(b"X-Long: " + at + b"d"))
    assert (e.limit, e.status) == ("MAX_HEADER_VALUE", 513)
    assert_answerable(e)


def test_physical_lines_are_counted_as_they_are_met() -> None:
    base = request().split(CRLF + CRLF)[0].count(CRLF) + 1  # lines, start line included
    fold = b"X-Folded: a" + b"\r\n b" * (limits.MAX_LINES - base - 1)
    m = parse_message(request(fold))
    head = m.serialise().split(CRLF + CRLF)[0]
    assert head.count(CRLF) + 1 == limits.MAX_LINES
    e = refused(request(fold + b"\r\n b"))
    assert (e.limit, e.status) == ("MAX_LINES", 513)
    # the fields before the fold were enough to answer
    assert_answerable(e)


def test_too_many_header_fields_is_answered_when_it_can_be() -> None:
    base = len(parse_message(request()).headers)
    e = refused(request(*[b"X-H: %d" % i for i in range(limits.MAX_HEADERS - base + 1)]))
    assert (e.limit, e.status) == ("MAX_HEADERS", 513)
    assert_answerable(e)


def test_a_limit_hit_before_via_is_read_cannot_be_answered() -> None:
    filler = [b"X-H: %d" % i for i in range(limits.MAX_HEADERS)]
    data = CRLF.join([b"INVITE sip:bob@example.com SIP/2.0", *filler, *BASE]) + CRLF + CRLF
    e = refused(data)
    assert e.limit == "MAX_HEADERS"
    assert e.message is None


# -- the helpers the proxy calls keep to the same limits ------------------------------------


def test_split_commas_and_via_parse_are_plain_parse_errors_for_bad_input() -> None:
    with pytest.raises(SipParseError) as info:
        split_commas('"unterminated, a')
    assert not isinstance(info.value, SipLimitExceeded)
    assert info.value.status == 400
    with pytest.raises(SipLimitExceeded):
        Via.parse("SIP/2.0/UDP h" + ";p" * (limits.MAX_PARAMS + 1))


def test_limits_are_ordered_sensibly() -> None:
    # a list at its limit must fit in a message: the limits do not contradict each other
    assert limits.MAX_VIAS + limits.MAX_ROUTES + limits.MAX_RECORD_ROUTES < limits.MAX_COMMAS
    assert limits.MAX_URI_LENGTH < limits.MAX_LINE_LENGTH < limits.MAX_HEADER_VALUE
    assert limits.MAX_HEADER_VALUE < limits.MAX_HEADER_SECTION < limits.MAX_MESSAGE_SIZE
    assert limits.MAX_HEADERS < limits.MAX_LINES
    assert set(limits.LIST_LIMITS) == {"via", "route", "record-route", "path", "contact"}
