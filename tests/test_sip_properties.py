"""Property tests: generated SIP messages round-trip byte for byte; garbage only ever raises
SipParseError (parse_message) or FramingLost (StreamFramer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.sip import (
    FramingLost,
    Invalid,
    Ping,
    Request,
    Response,
    SipMessage,
    SipParseError,
    StreamFramer,
    parse_message,
)
from relay.sip.framer import StreamEvent
from relay.sip.headers import Via, canonical_name


def examples(n: int) -> settings:
    # no deadline: a loaded CI machine must not turn slowness into failures
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"

tokens = st.text(TOKEN, min_size=1, max_size=10)
labels = st.text(ALNUM, min_size=1, max_size=8)
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
)
ports = st.one_of(st.none(), st.integers(1, 65535))
METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "INFO", "MESSAGE",
           "SUBSCRIBE", "NOTIFY", "REFER", "PRACK", "UPDATE", "PUBLISH"]
methods = st.one_of(st.sampled_from(METHODS), tokens)

# LWS between the words of a value: plain, or folded (RFC 3261 §7.3.1)
separators = st.sampled_from([" ", "  ", "\t", " \t ", "\r\n ", "\r\n\t", " \r\n   ", "\t\r\n\t"])
# around the colon: HCOLON = *( SP / HTAB ) ":" SWS
before_colon = st.sampled_from(["", "", "", " ", "\t", "  \t"])
after_colon = st.sampled_from(["", " ", " ", " ", "  ", "\t", "\r\n ", " \r\n\t"])

# a word of a free-form value: any octets but SP, HTAB, CR, LF (UTF-8 or not)
_TEXT_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters=" \t\r\n")
words = st.one_of(
    st.text(_TEXT_CHARS, min_size=1, max_size=8).map(lambda s: s.encode()),
    st.binary(min_size=1, max_size=6).filter(lambda b: not set(b) & {9, 10, 13, 32}),
)


@st.composite
def mixed_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.integers(0, 2 ** len(name) - 1))
    return "".join(c.swapcase() if flips >> i & 1 else c for i, c in enumerate(name))


@dataclass
class Built:
    data: bytes
    expected: list[tuple[str, str]]  # (canonical name, unfolded value), in order
    start: tuple[str, str] | tuple[int, str]  # (method, uri) or (status, reason)
    cseq: tuple[int, str]
    call_id: str
    body: bytes


def _unfolded(parts: list[bytes], seps: list[str]) -> str:
    """What .value must be: folds become one SP, other LWS stays as written."""
    out = parts[0]
    for sep, part in zip(seps, parts[1:], strict=True):
        out += (b" " if "\r\n" in sep else sep.encode()) + part
    return out.decode("utf-8", "surrogateescape")


@st.composite
def header_field(draw: st.DrawFn, names: list[str], parts: list[bytes]) -> tuple[bytes, str, str]:
    """(raw field with CRLF, canonical name, expected value)."""
    name = draw(mixed_case(draw(st.sampled_from(names))))
    seps = [draw(separators) for _ in parts[1:]]
    raw = name.encode() + draw(before_colon).encode() + b":"
    if parts and parts[0]:
        raw += draw(after_colon).encode()
    raw += parts[0] if parts else b""
    for sep, part in zip(seps, parts[1:], strict=True):
        raw += sep.encode() + part
    expected = _unfolded(parts, seps) if parts else ""
    return raw + b"\r\n", canonical_name(name), expected


_MANAGED = {"via", "from", "to", "call-id", "cseq", "max-forwards", "content-length", "contact"}
extra_names = st.one_of(
    st.sampled_from(["Subject", "s", "User-Agent", "Route", "Record-Route", "Supported", "k",
                     "Allow", "X-Custom", "Accept", "c", "Content-Type", "o", "Event"]),
    tokens,
).filter(lambda n: canonical_name(n) not in _MANAGED)


@st.composite
def name_addr(draw: st.DrawFn, tag: bool) -> list[bytes]:
    user = draw(st.text(ALNUM + "-_.!~*'+", min_size=1, max_size=8))
    scheme = draw(st.sampled_from(["sip", "sips", "SIP"]))
    uri = f"<{scheme}:{user}@{draw(hosts)}>"
    if tag:
        uri += f";tag={draw(tokens)}"
    kind = draw(st.sampled_from(["none", "token", "quoted"]))
    if kind == "token":
        return [*[w.encode() for w in draw(st.lists(tokens, min_size=1, max_size=3))],
                uri.encode()]
    if kind == "quoted":
        text = draw(st.text(st.characters(exclude_categories=["Cs", "Cc"],
                                          exclude_characters='"\\'), max_size=10))
        return [b'"' + text.encode() + b'"', uri.encode()]
    return [uri.encode()]


@st.composite
def sip_messages(draw: st.DrawFn) -> Built:
    is_request = draw(st.booleans())
    method = draw(methods)
    cseq_n = draw(st.integers(0, 2**32 - 1))
    body = draw(st.binary(max_size=120))
    call_id = draw(tokens) + "@" + draw(hosts)

    fields: list[tuple[bytes, str, str]] = []
    n_vias = draw(st.integers(1, 3))
    for _ in range(n_vias):
        transport = draw(st.sampled_from(["UDP", "TCP", "TLS", "udp", "WS"]))
        port = draw(ports)
        sent_by = draw(hosts) + (f":{port}" if port else "")
        params = f";branch=z9hG4bK{draw(tokens)}" + draw(st.sampled_from(["", ";rport", ";lr"]))
        fields.append(draw(header_field(
            ["Via", "v"], [f"SIP/2.0/{transport}".encode(), (sent_by + params).encode()])))
    fields.append(draw(header_field(["From", "f"], draw(name_addr(tag=True)))))
    fields.append(draw(header_field(["To", "t"], draw(name_addr(tag=not is_request)))))
    fields.append(draw(header_field(["Call-ID", "i"], [call_id.encode()])))
    fields.append(draw(header_field(["CSeq"], [str(cseq_n).encode(), method.encode()])))
    if is_request and draw(st.booleans()):
        fields.append(draw(header_field(["Max-Forwards"], [str(draw(st.integers(0, 255))).encode()])))
    zeros = draw(st.sampled_from(["", "", "", "0", "00"]))
    fields.append(draw(header_field(["Content-Length", "l"], [f"{zeros}{len(body)}".encode()])))
    for _ in range(draw(st.integers(0, 5))):
        parts = draw(st.lists(words, max_size=4))
        fields.append(draw(header_field([draw(extra_names)], parts)))
    fields = draw(st.permutations(fields))

    if is_request:
        uri = f"{draw(st.sampled_from(['sip', 'sips']))}:{draw(tokens)}@{draw(hosts)}"
        version = draw(st.sampled_from(["SIP/2.0", "SIP/2.0", "sip/2.0"]))
        start_line = f"{method} {uri} {version}".encode()
        start: tuple[str, str] | tuple[int, str] = (method, uri)
    else:
        status = draw(st.integers(100, 699))
        reason = draw(st.text(st.characters(exclude_categories=["Cs"],
                                            exclude_characters="\r\n"), max_size=20))
        start_line = f"SIP/2.0 {status} {reason}".encode()
        start = (status, reason)
    data = start_line + b"\r\n" + b"".join(f[0] for f in fields) + b"\r\n" + body
    return Built(data, [(f[1], f[2]) for f in fields], start, (cseq_n, method), call_id, body)


def _check(m: SipMessage, b: Built) -> None:
    assert [(h.name, h.value) for h in m.headers] == b.expected
    if isinstance(m, Request):
        assert (m.method, m.uri) == b.start
    else:
        assert isinstance(m, Response)
        assert (m.status, m.reason) == b.start
    assert m.cseq[0] == b.cseq[0]
    assert m.call_id == b.call_id
    assert m.body == b.body
    assert m.top_via().branch is not None


@examples(150)
@given(sip_messages())
def test_generated_messages_round_trip(b: Built) -> None:
    for datagram in (True, False):
        m = parse_message(b.data, datagram=datagram)
        assert m.serialise() == b.data
        _check(m, b)


@examples(60)
@given(sip_messages(), st.data())
def test_changing_one_header_keeps_the_others_byte_exact(b: Built, data: st.DataObject) -> None:
    m = parse_message(b.data)
    before = [h.serialise() for h in m.headers]
    i = data.draw(st.integers(0, len(m.headers) - 1))
    m.headers[i].value = "changed"
    m.headers[i].raw = None
    out = m.serialise()
    after = [h.serialise() for h in m.headers]
    assert after[:i] == before[:i] and after[i + 1 :] == before[i + 1 :]
    assert after[i] == m.headers[i].raw_name.encode() + b": changed\r\n"
    assert out == m.start_line + b"\r\n" + b"".join(after) + b"\r\n" + b.body


def _wire(events: list[StreamEvent]) -> list[object]:
    out: list[object] = []
    for e in events:
        if isinstance(e, SipMessage):
            out.append(e.serialise())
        elif isinstance(e, Ping):
            out.append("ping")
        else:
            out.append(("invalid", e.error.status))
    return out


@examples(50)
@given(st.lists(st.tuples(sip_messages(), st.booleans()), min_size=1, max_size=4), st.data())
def test_framing_any_chunking_yields_the_same_messages(
    items: list[tuple[Built, bool]], data: st.DataObject,
) -> None:
    stream = b""
    expected: list[object] = []
    for built, ping in items:
        if ping:
            stream += b"\r\n\r\n"
            expected.append("ping")
        stream += built.data
        expected.append(built.data)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    if data.draw(st.booleans()):
        cuts = list(range(len(stream)))  # byte by byte
    bounds = [0, *cuts, len(stream)]
    framer = StreamFramer()
    events: list[StreamEvent] = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        events.extend(framer.feed(stream[lo:hi]))
    assert _wire(events) == expected
    assert framer.buffered == 0
    for built, m in zip([b for b, _ in items], [e for e in events if isinstance(e, SipMessage)],
                        strict=True):
        _check(m, built)


# -- garbage in: only SipParseError out ---------------------------------------------


def _parse_only_sip_errors(data: bytes) -> None:
    for datagram in (True, False):
        try:
            m = parse_message(data, datagram=datagram)
        except SipParseError as e:
            assert isinstance(e.status, int) and 400 <= e.status <= 599
            continue
        # what parsed is a fixpoint: it serialises to something that parses to itself
        out = m.serialise()
        assert parse_message(out, datagram=datagram).serialise() == out


def _frame_only_framing_lost(data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(data)]
    framer = StreamFramer()
    try:
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            for e in framer.feed(data[lo:hi]):
                assert isinstance(e, SipMessage | Ping | Invalid)
                if isinstance(e, Invalid):
                    assert isinstance(e.error, SipParseError)
        framer.feed(b"")
    except FramingLost:
        pass


@examples(700)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _parse_only_sip_errors(data)
    _frame_only_framing_lost(data, [min(c, len(data)) for c in cuts])


@examples(500)
@given(st.lists(st.sampled_from([
    b"INVITE sip:a@b SIP/2.0", b"SIP/2.0 200 OK", b"Via: SIP/2.0/UDP h;branch=z9hG4bK1",
    b"v: SIP/2.0/TCP [::1]:5", b"From: <sip:a@b>;tag=1", b"f: a", b"To: b <sip:b@c>",
    b"t:", b"Call-ID: x", b"i: y", b"CSeq: 1 INVITE", b"CSeq: 99999999999 INVITE",
    b"Content-Length: 0", b"l: 5", b"Content-Length: -1", b"Max-Forwards: 70",
    b"Contact: *", b"m: <sip:c@d>", b" folded", b"\t", b"", b":", b"\x00", b"\xff\xfe",
    b"Content-Length: \xc2\xb2", b"CSeq: \xd9\xa1 INVITE", b'From: "unterminated <sip:a@b>',
]), max_size=14), st.binary(max_size=20), st.lists(st.integers(0, 400), max_size=4))
def test_sip_shaped_garbage(lines: list[bytes], body: bytes, cuts: list[int]) -> None:
    data = b"\r\n".join(lines) + b"\r\n\r\n" + body
    _parse_only_sip_errors(data)
    _frame_only_framing_lost(data + data, [min(c, 2 * len(data)) for c in cuts])


MUTATIONS = ["truncate", "flip", "insert", "delete", "duplicate"]
INSERTS = [b"\r", b"\n", b"\x00", b"\r\n", b"\r\n\r\n", b" ", b"\t", b":", b",", b";", b'"',
           b"<", b">", b"\xff", b"\r\n "]


@examples(150)
@given(sip_messages(), st.data())
def test_mutated_messages(b: Built, data: st.DataObject) -> None:
    raw = bytearray(b.data)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(MUTATIONS))
        i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "truncate":
            del raw[i:]
        elif kind == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            raw[i:i] = data.draw(st.sampled_from(INSERTS))
        elif kind == "delete":
            del raw[i : i + data.draw(st.integers(1, 4))]
        else:
            j = data.draw(st.integers(i, len(raw)))
            raw[j:j] = raw[i:j]
    mutated = bytes(raw)
    cuts = data.draw(st.lists(st.integers(0, len(mutated)), max_size=5))
    _parse_only_sip_errors(mutated)
    _frame_only_framing_lost(mutated, cuts)
    # the same damage followed by a good message on one stream
    _frame_only_framing_lost(mutated + b.data, [len(mutated)])


# -- the shortcuts agree with the general readers ----------------------------------------
# parse_message splits a header section without folding in two C scans and walks
# anything else line by line; Via.parse matches the usual shape in one C match
# and reads anything else with Via.parse_general. Each pair must agree.

_FOLDED = b"\r\nX-Folded: a\r\n b"


def _fields(m: SipMessage) -> list[tuple[str, str, str, bytes | None]]:
    return [(h.name, h.raw_name, h.value, h.raw) for h in m.headers]


@examples(200)
@given(sip_messages(), st.data())
def test_header_scan_agrees_with_the_line_walk(b: Built, data: st.DataObject) -> None:
    raw = bytearray(b.data)
    if data.draw(st.booleans()):  # some damage the scan must leave to the walk
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i:i] = data.draw(st.sampled_from(INSERTS))
    end = raw.find(b"\r\n\r\n")
    try:
        scanned = parse_message(bytes(raw))
    except SipParseError:
        return
    # the same message with one folded field at the end of its header section:
    # no scan for it, every field read line by line
    walked = parse_message(bytes(raw[:end]) + _FOLDED + bytes(raw[end:]))
    assert _fields(walked)[:-1] == _fields(scanned)
    assert walked.headers[-1].value == "a b"
    assert walked.body == scanned.body


via_pieces = st.lists(st.sampled_from([
    "SIP/2.0/UDP ", "SIP/2.0/TCP ", "SIP/2.0/udp ", "SIP / 2.0 / TLS ", "SIP/2.1/UDP ", "sip/2.0/UDP ",
    "host.example.com", "192.0.2.1", "[2001:db8::1]", "h", "-", ":", ":5060", ":0", ":65535", ":65536",
    ":00080", ":123456", ";branch=z9hG4bK1", ";rport", ";received=192.0.2.9", ";", ";;", "=", " ", "\t",
    '"', "<", "\u00e9", "\u3000", "\x1c", "A", "x=1;" * 20,
]), min_size=1, max_size=8).map("".join)


def _outcome(fn: Callable[[], Via]) -> object:
    try:
        return fn()
    except SipParseError as e:
        return (type(e), e.status, getattr(e, "limit", None))


@examples(500)
@given(via_pieces)
def test_via_shortcut_agrees_with_the_general_reader(value: str) -> None:
    assert _outcome(lambda: Via.parse(value)) == _outcome(lambda: Via.parse_general(value))
