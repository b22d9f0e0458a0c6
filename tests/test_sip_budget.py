"""A fixed work budget per SIP message, whatever its shape (relay/sip/limits.py, "work budget").

Hypothesis builds adversarial messages — thousands of commas, quotes, semicolons,
backslashes, '<' and '>', long folded fields, hundreds of Route fields — and
steers towards the costliest (``target``). Work is counted as Python line events
in relay/sip (tests/workmeter.py): deterministic, so these tests cannot flake
under load; the time per message is measured in bench/run_parse.py.

The budget holds for parsing, for reading a parsed message the way the proxy
does (every list, each value parsed, the loose-routing walk, ``serialise``),
and for stream framing in any chunking, with padding between messages.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, assume, given, settings, target
from hypothesis import strategies as st

from relay.sip import Request, SipMessage, SipParseError, StreamFramer, limits, parse_message
from relay.sip.framer import FramingLost, Invalid, Ping
from relay.sip.headers import NameAddr
from relay.sip.uri import SipUri
from tests.workmeter import work_of

# What a call of StreamFramer.feed may cost besides the messages it completes:
# a constant, however many octets of padding or partial message it carries.
WORK_PER_FEED = 60

EXAMPLES = int(os.environ.get("SIP_BUDGET_EXAMPLES", "100"))


def budget(n: int) -> settings:
    # no deadline: a loaded machine must not turn slowness into failures; the
    # explain phase is off because it installs its own trace function
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much],
                    phases=[p for p in settings.default.phases if p.name != "explain"])


START = b"INVITE sip:bob@example.com SIP/2.0"
BASE = [b"Via: SIP/2.0/UDP pc33.example.com;branch=z9hG4bK776asdhds",
        b"From: Alice <sip:alice@example.com>;tag=1928301774", b"To: <sip:bob@example.com>",
        b"Call-ID: a84b4c76e66710@pc33.example.com", b"CSeq: 1 INVITE", b"Max-Forwards: 70"]

# The pieces hostile values are made of: every character a scanner treats
# specially, and the URI-shaped runs that make values parse further.
UNITS = [b",", b";", b'"', b"\\", b"<", b">", b" ", b"\t", b"=", b"a", b"@", b":", b"\r\n ",
         b"<sip:a@h;lr>", b"sip:relay.test", b'"a,b;c<"', b";lr", b";p=1", b"\\\"", b",\r\n "]
NAMES = [b"Route", b"Record-Route", b"Via", b"v", b"Contact", b"m", b"Path", b"From", b"To",
         b"Proxy-Require", b"Supported", b"X-Adversary"]


@st.composite
def hostile_fields(draw: st.DrawFn) -> list[bytes]:
    """Fields whose values repeat a hostile pattern, spread over one or many fields."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        pattern = b"".join(draw(st.lists(st.sampled_from(UNITS), min_size=1, max_size=4)))
        repeat = draw(st.integers(1, 8000))
        fields = draw(st.integers(1, 400))
        per_field = max(1, repeat // fields)
        prefix = draw(st.sampled_from([b"", b"<sip:relay.test;lr>", b"SIP/2.0/UDP h;branch=z9hG4bK1"]))
        for _ in range(min(fields, repeat)):
            out.append(name + b": " + prefix + pattern * per_field)
    return out


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    fields = draw(hostile_fields())
    position = draw(st.integers(0, len(BASE)))
    lines = [START, *BASE[:position], *fields, *BASE[position:], b"Content-Length: 0"]
    data = b"\r\n".join(lines) + b"\r\n\r\n"
    if draw(st.booleans()):
        data = data[: limits.MAX_MESSAGE_SIZE]  # cut anywhere: a truncated datagram
    return data


def read_like_the_proxy(m: SipMessage) -> int:
    """What the proxy reads of a message: every list, each value parsed, the top
    Via, From/To, the loose-routing walk and removal, and the bytes out. A list
    the parser only counts (Route, Record-Route, Path …) may still hold a broken
    quoted string: reading it raises SipParseError, which the proxy turns into
    a counted drop, as it does here."""
    seen = 0
    for name in ("via", "contact", "route", "record-route", "path", "proxy-require", "supported"):
        try:
            values = m.get_all(name)
        except SipParseError:
            continue
        for value in values:
            seen += 1
            try:
                if name in ("contact", "route", "record-route", "path"):
                    SipUri.parse(NameAddr.parse(value).uri)
            except SipParseError:
                pass
    m.top_via()
    if isinstance(m, Request):
        m.from_()
        m.to()
    try:
        routes = m.get_all("route")
        m.pop_first_values("route", len(routes) // 2)
    except SipParseError:
        pass
    m.serialise()
    return seen


# Values that parse, made as costly as the limits allow: quoted display names
# full of separators and escapes, URIs and parameter lists near their limits.
_DISPLAY = st.sampled_from([b"", b"Alice ", b'"a, b; <c> \\"d\\"" ', b'"' + b"\\\"" * 200 + b'" '])
_PARAMS = st.integers(0, limits.MAX_PARAMS - 2).map(lambda n: b"".join(b";p%d=v" % i for i in range(n)))


@st.composite
def list_values(draw: st.DrawFn, name: bytes) -> list[bytes]:
    if name == b"Via":
        return [b"SIP/2.0/UDP h%d.example.com;branch=z9hG4bK%d" % (i, i) + draw(_PARAMS)
                for i in range(draw(st.integers(0, limits.MAX_VIAS - 1)))]
    cap = {b"Route": limits.MAX_ROUTES, b"Record-Route": limits.MAX_RECORD_ROUTES,
           b"Path": limits.MAX_PATHS, b"Contact": limits.MAX_CONTACTS}[name]
    user = b"u" * draw(st.integers(1, limits.MAX_URI_LENGTH - 40))
    return [draw(_DISPLAY) + b"<sip:" + user + b"@relay.test" + draw(_PARAMS) + b";lr>"
            + draw(_PARAMS) for _ in range(draw(st.integers(0, cap)))]


@st.composite
def big_valid_messages(draw: st.DrawFn) -> bytes:
    fields: list[bytes] = []
    for name in (b"Via", b"Route", b"Record-Route", b"Path", b"Contact"):
        values = draw(list_values(name))
        per_field = draw(st.integers(1, 8))
        sep = draw(st.sampled_from([b", ", b",\r\n ", b" ,\t"]))
        for i in range(0, len(values), per_field):
            fields.append(name + b": " + sep.join(values[i : i + per_field]))
    lines = [START, *BASE, *fields, b"Content-Length: 0"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@budget(EXAMPLES * 2)
@given(hostile_messages())
def test_parsing_any_shape_stays_within_the_budget(data: bytes) -> None:
    outcome, work = work_of(lambda: parse_message(data))
    assert isinstance(outcome, SipMessage | SipParseError), outcome
    target(float(work), label="parse work")
    assert work <= limits.WORK_PER_MESSAGE, (work, len(data))


@budget(EXAMPLES * 3 // 2)
@given(hostile_messages() | big_valid_messages())
def test_reading_a_parsed_message_stays_within_the_budget(data: bytes) -> None:
    try:
        m = parse_message(data)
    except SipParseError:
        assume(False)  # over a limit: refused, nothing for the proxy to read
        return
    outcome, work = work_of(lambda: read_like_the_proxy(m))
    assert isinstance(outcome, int), outcome
    target(float(work), label="read work")
    assert work <= limits.WORK_PER_MESSAGE, (work, len(data))


@budget(EXAMPLES)
@given(hostile_messages(), st.binary(max_size=0) | st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"]),
       st.integers(0, 20_000), st.integers(0, 20_000), st.data())
def test_framing_any_chunking_stays_within_the_budget(
    data: bytes, pad: bytes, pads: int, body: int, draw: st.DataObject,
) -> None:
    message = data.replace(b"Content-Length: 0", b"Content-Length: %d" % body) + b"b" * body
    stream = pad * pads + message + pad * min(pads, 3) + message
    sizes = draw.draw(st.lists(st.integers(1, 4096), min_size=1, max_size=60))
    chunks: list[bytes] = []
    pos = 0
    while pos < len(stream):
        size = sizes[len(chunks) % len(sizes)] if len(chunks) < 200 else len(stream)
        chunks.append(stream[pos : pos + size])
        pos += size

    def frame() -> list[object]:
        framer = StreamFramer()
        events: list[object] = []
        try:
            for chunk in chunks:
                events.extend(framer.feed(chunk))
        except FramingLost as e:
            events.append(e)
        return events

    events, work = work_of(frame)
    assert isinstance(events, list), events
    assert all(isinstance(e, SipMessage | Ping | Invalid | FramingLost) for e in events)
    messages = 2
    target(float(work), label="framing work")
    assert work <= messages * limits.WORK_PER_MESSAGE + WORK_PER_FEED * len(chunks), (work, len(chunks))


def test_the_budget_is_far_above_what_a_plain_call_costs() -> None:
    """The budget is a ceiling for hostile shapes, not a target: an ordinary INVITE
    costs a small part of it (so a regression that makes parsing per-character
    again shows as a failure above, not as a slow creep here)."""
    plain = b"\r\n".join([START, *BASE, b"Content-Length: 0"]) + b"\r\n\r\n"
    m, work = work_of(lambda: parse_message(plain))
    assert isinstance(m, Request)
    assert work < limits.WORK_PER_MESSAGE // 20


def test_the_old_per_route_rescan_would_not_fit() -> None:
    """The budget catches what issue 10 measured: the loose-routing walk done as
    'read the route set, pop one entry, read it again' costs the square of the
    Route count (1,000 entries: 0.9 s at d9440f1)."""
    routes = b"Route: " + b", ".join([b"<sip:relay.test;lr>"] * limits.MAX_ROUTES)
    m = parse_message(b"\r\n".join([START, *BASE, routes, b"Content-Length: 0"]) + b"\r\n\r\n")

    def walk_by_rescanning() -> None:
        while m.get_all("route"):
            m.pop_first_value("route")

    _, quadratic = work_of(walk_by_rescanning)
    m = parse_message(b"\r\n".join([START, *BASE, routes, b"Content-Length: 0"]) + b"\r\n\r\n")
    _, linear = work_of(lambda: m.pop_first_values("route", len(m.get_all("route"))))
    assert linear * 10 < quadratic
