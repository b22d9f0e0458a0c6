"""StreamFramer: splitting a TCP/TLS byte stream into SIP messages (RFC 3261 §18.3)."""

from __future__ import annotations

import pytest

from relay.sip import (
    FramingLost,
    Invalid,
    Ping,
    Request,
    Response,
    SipMessage,
    SipParseError,
    StreamFramer,
    limits,
)
from relay.sip.framer import StreamEvent

CRLF = b"\r\n"


def message(n: int, body: bytes = b"", *, method: bytes = b"OPTIONS",
            cl: bytes | None = None, extra: tuple[bytes, ...] = ()) -> bytes:
    lines = [
        method + b" sip:bob@example.com SIP/2.0",
        b"Via: SIP/2.0/TCP pc33.example.com;branch=z9hG4bK%d" % n,
        b"From: <sip:alice@example.com>;tag=%d" % n,
        b"To: <sip:bob@example.com>",
        b"Call-ID: call-%d@example.com" % n,
        b"CSeq: %d %s" % (n, method),
        *extra,
        b"Content-Length: " + (cl if cl is not None else b"%d" % len(body)),
    ]
    return CRLF.join(lines) + CRLF + CRLF + body


def response(n: int) -> bytes:
    return CRLF.join([
        b"SIP/2.0 200 OK",
        b"Via: SIP/2.0/TCP pc33.example.com;branch=z9hG4bK%d" % n,
        b"From: <sip:alice@example.com>;tag=%d" % n,
        b"To: <sip:bob@example.com>;tag=b%d" % n,
        b"Call-ID: call-%d@example.com" % n,
        b"CSeq: %d OPTIONS" % n,
        b"l: 0",
    ]) + CRLF + CRLF


def feed_all(framer: StreamFramer, chunks: list[bytes]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    return events


def wire(events: list[StreamEvent]) -> list[bytes | str]:
    """Events as comparable values: messages by their bytes."""
    out: list[bytes | str] = []
    for e in events:
        if isinstance(e, SipMessage):
            out.append(e.serialise())
        elif isinstance(e, Ping):
            out.append("ping")
        else:
            out.append(f"invalid {e.error.status}")
    return out


def test_several_messages_in_one_feed() -> None:
    msgs = [message(1, b"one"), response(2), message(3, b"\x00\r\n\r\nthree", method=b"INFO")]
    framer = StreamFramer()
    events = framer.feed(b"".join(msgs))
    assert wire(events) == msgs
    assert isinstance(events[0], Request)
    assert isinstance(events[1], Response)
    assert isinstance(events[2], SipMessage)
    assert events[2].body == b"\x00\r\n\r\nthree"
    assert framer.buffered == 0


def test_one_message_byte_by_byte() -> None:
    data = message(7, b"v=0\r\n\r\n")
    framer = StreamFramer()
    events: list[StreamEvent] = []
    for i in range(len(data)):
        got = framer.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert got == [], i
            assert framer.buffered == i + 1
        events.extend(got)
    assert wire(events) == [data]
    assert framer.buffered == 0


def test_body_split_across_feeds_waits_for_content_length() -> None:
    data = message(1, b"0123456789")
    framer = StreamFramer()
    assert framer.feed(data[:-4]) == []
    assert framer.feed(data[-4:-1]) == []
    events = framer.feed(data[-1:] + message(2)[:10])
    assert wire(events) == [data]
    assert framer.buffered == 10


def test_message_ending_exactly_at_chunk_boundary_then_next() -> None:
    a, b = message(1, b"x"), message(2, b"y")
    framer = StreamFramer()
    assert wire(framer.feed(a)) == [a]
    assert wire(framer.feed(b)) == [b]


def test_crlfcrlf_is_a_ping() -> None:
    framer = StreamFramer()
    assert wire(framer.feed(b"\r\n\r\n")) == ["ping"]
    assert wire(framer.feed(b"\r\n\r\n\r\n\r\n")) == ["ping", "ping"]
    a = message(1)
    assert wire(framer.feed(b"\r\n\r\n" + a + b"\r\n\r\n")) == ["ping", a, "ping"]
    assert framer.buffered == 0


def test_ping_split_over_feeds() -> None:
    framer = StreamFramer()
    for part in (b"\r", b"\n", b"\r"):
        assert framer.feed(part) == []
    assert wire(framer.feed(b"\n")) == ["ping"]


def test_lone_crlf_is_skipped() -> None:
    a, b = message(1), message(2)
    framer = StreamFramer()
    # a pong (single CRLF) before, between and after messages
    assert wire(framer.feed(b"\r\n" + a + b"\r\n" + b)) == [a, b]
    # alone it may be the start of a ping: nothing yet, then the next message
    assert framer.feed(b"\r\n") == []
    assert wire(framer.feed(a)) == [a]
    assert framer.buffered == 0


def test_missing_content_length_loses_framing() -> None:
    data = message(1).replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(FramingLost):
        StreamFramer().feed(data)


@pytest.mark.parametrize("cl", [b"-999", b"abc", b"5x", b"", b"\xc2\xb2", b"12345678901"])
def test_bad_content_length_loses_framing(cl: bytes) -> None:
    with pytest.raises(FramingLost) as info:
        StreamFramer().feed(message(1, cl=cl))
    assert info.value.status == 400


@pytest.mark.parametrize("dup", [b"Content-Length: 0", b"l: 0", b"content-length : 5"])
def test_duplicate_content_length_loses_framing(dup: bytes) -> None:
    with pytest.raises(FramingLost):
        StreamFramer().feed(message(1, extra=(dup,)))


def test_compact_and_folded_content_length_frame() -> None:
    # RFC 3261 §7.3.1: HCOLON ends in SWS, so the value may sit on a continuation line.
    compact = message(1, b"abc").replace(b"Content-Length: 3", b"l: 3")
    folded = message(2, b"abcd").replace(b"Content-Length: 4", b"CONTENT-LENGTH :\r\n 4")
    framer = StreamFramer()
    events = framer.feed(compact + folded)
    assert wire(events) == [compact, folded]
    assert [e.body for e in events if isinstance(e, SipMessage)] == [b"abc", b"abcd"]


def test_header_section_over_limit_without_end_loses_framing_513() -> None:
    framer = StreamFramer()
    framer.feed(b"OPTIONS sip:bob@example.com SIP/2.0\r\n")
    with pytest.raises(FramingLost) as info:
        for _ in range(limits.MAX_HEADER_SECTION // 1000 + 1):
            framer.feed(b"X-Filler: " + b"f" * 990 + CRLF)
    assert info.value.status == 513


def test_header_section_just_under_the_limit_waits() -> None:
    framer = StreamFramer()
    assert framer.feed(b"O" * limits.MAX_HEADER_SECTION) == []
    with pytest.raises(FramingLost):
        framer.feed(b"O")


def test_content_length_over_message_limit_loses_framing_513() -> None:
    data = message(1, cl=b"%d" % limits.MAX_MESSAGE_SIZE)
    with pytest.raises(FramingLost) as info:
        StreamFramer().feed(data)
    assert info.value.status == 513


def test_framing_lost_is_a_sip_parse_error() -> None:
    # callers that answer 400/513 before closing can catch one type
    assert issubclass(FramingLost, SipParseError)


def test_after_framing_is_lost_every_feed_raises() -> None:
    framer = StreamFramer()
    with pytest.raises(FramingLost):
        framer.feed(message(1, cl=b"-1"))
    with pytest.raises(FramingLost):
        framer.feed(message(2))
    with pytest.raises(FramingLost):
        framer.feed(b"")


def test_messages_before_lost_framing_are_delivered() -> None:
    good = [message(1), b"\r\n\r\n", message(2, b"body")]
    framer = StreamFramer()
    events = framer.feed(b"".join(good) + message(3, cl=b"-5"))
    assert wire(events) == [good[0], "ping", good[2]]
    with pytest.raises(FramingLost):
        framer.feed(b"")


def test_invalid_message_is_an_event_and_the_next_still_comes_out() -> None:
    bad = message(1, b"xyz").replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
    also_bad = message(2).replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1)
    good = message(3, b"ok")
    framer = StreamFramer()
    events = framer.feed(bad + also_bad + good)
    assert len(events) == 3
    assert isinstance(events[0], Invalid)
    assert events[0].error.status == 400
    # the error carries what is needed to answer (RFC 3261 §8.2.6)
    assert events[0].error.message is not None
    assert events[0].error.message.call_id == "call-1@example.com"
    assert isinstance(events[1], Invalid)
    assert events[1].error.status == 505
    assert wire(events[2:]) == [good]
    assert framer.buffered == 0


def test_invalid_message_body_does_not_leak_into_the_next() -> None:
    # the broken message's body looks like a message; Content-Length says it is a body
    inner = message(9)
    bad = message(1, inner, extra=(b"To: <sip:dup@example.com>",))
    good = message(2)
    events = StreamFramer().feed(bad + good)
    assert len(events) == 2
    assert isinstance(events[0], Invalid)
    assert wire(events[1:]) == [good]


@pytest.mark.parametrize("split", [1, 2, 3, 5, 17, 64, 1000])
def test_any_chunking_gives_the_same_events(split: int) -> None:
    stream = b"".join([
        b"\r\n", message(1, b"a\r\n\r\nb"), b"\r\n\r\n", response(2),
        message(3).replace(b"CSeq: 3 OPTIONS", b"CSeq: 3 BYE"), message(4, b"\x00" * 50),
    ])
    whole = wire(StreamFramer().feed(stream))
    assert whole == [message(1, b"a\r\n\r\nb"), "ping", response(2), "invalid 400",
                     message(4, b"\x00" * 50)]
    chunks = [stream[i : i + split] for i in range(0, len(stream), split)]
    assert wire(feed_all(StreamFramer(), chunks)) == whole
