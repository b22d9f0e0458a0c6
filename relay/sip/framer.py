"""Split a TCP/TLS byte stream into SIP messages by Content-Length (RFC 3261 §18.3)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.sip import limits
from relay.sip.errors import SipParseError
from relay.sip.message import SipMessage
from relay.sip.parser import HEADER_END, parse_message


@dataclass(slots=True)
class Ping:
    """A CRLFCRLF keepalive (RFC 5626 §3.5.1); the answer is one CRLF (pong)."""


@dataclass(slots=True)
class Invalid:
    """A framed message that does not parse; framing itself is intact."""

    error: SipParseError


class FramingLost(SipParseError):
    """The stream cannot be split any more: the connection must be closed."""


StreamEvent = SipMessage | Ping | Invalid


class StreamFramer:
    """Feed bytes in, take whole messages out.

    Several messages in one read and one message over many reads both work.
    A message whose framing cannot be trusted (no or bad Content-Length,
    header section or body over the limits) raises FramingLost: RFC 3261 gives
    no way to resynchronise a stream, so the caller answers if it can and
    closes the connection (RFC 4475 ncl.dat, mcl01.dat). Messages framed
    before the break in the same call are returned first and the loss is raised
    by the next call (``feed(b"")`` will do); after a loss every call raises.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lost: FramingLost | None = None
        # How far the buffer has been searched for CRLFCRLF without finding it,
        # so a header that trickles in byte by byte is not rescanned each time.
        self._scanned = 0
        # (offset of the body, Content-Length) of the message whose header
        # section is complete but whose body is still arriving: read once, so
        # a body that trickles in does not make us re-read the header section
        # on every read (each octet of a stream is looked at a bounded number
        # of times, whatever the chunking).
        self._pending: tuple[int, int] | None = None

    def feed(self, data: bytes | bytearray) -> list[StreamEvent]:
        """The messages and pings completed by ``data``, in order (FramingLost: see the class)."""
        if self._lost is not None:
            raise self._lost
        self._buf += data
        events: list[StreamEvent] = []
        try:
            self._frame(events)
        except FramingLost as e:
            self._lost = e
            if not events:
                raise
            # The messages framed before the break are whole: hand them over
            # now, and raise the loss on the next call.
        return events

    def _frame(self, events: list[StreamEvent]) -> None:
        buf = self._buf
        while buf:
            if self._pending is None and not _skip_padding(buf, events):
                break  # maybe the start of a ping
            if not buf:
                break
            framed = self._pending or self._head(buf)
            if framed is None:
                break
            body_at, cl = framed
            if len(buf) < body_at + cl:
                self._pending = framed
                break
            raw = bytes(buf[: body_at + cl])
            del buf[: body_at + cl]
            self._scanned = 0
            self._pending = None
            try:
                events.append(parse_message(raw, datagram=False))
            except SipParseError as e:
                events.append(Invalid(e))

    def _head(self, buf: bytearray) -> tuple[int, int] | None:
        """(offset of the body, Content-Length) once the header section is complete."""
        end = buf.find(HEADER_END, max(0, self._scanned - 3))
        if end < 0:
            if len(buf) > limits.MAX_HEADER_SECTION:
                raise FramingLost("header section too large", status=513)
            self._scanned = len(buf)
            return None
        body_at = end + 4
        try:
            cl = _stream_content_length(bytes(buf[:end]))
            if body_at + cl > limits.MAX_MESSAGE_SIZE:
                raise FramingLost("message too large", status=513)
        except FramingLost as e:
            # Enough to answer 400/513 before closing (RFC 4475 ncl, mcl01).
            e.message = _readable(bytes(buf[:end]))
            raise
        return body_at, cl

    @property
    def buffered(self) -> int:
        """Octets received and not yet handed out as events."""
        return len(self._buf)


# A Content-Length field (full or compact name, RFC 3261 §7.3.3) at the start of
# a header line, and its value: everything up to a CRLF that is not followed by
# WSP. RFC 3261 §7.3.1: a field may be folded onto continuation lines (HCOLON
# ends in SWS), so "Content-Length:\r\n 5" is 5. One C search over the header
# section, whatever its number of lines.
_CONTENT_LENGTH = re.compile(
    rb"\r\n(?:content-length|l)[ \t]*:((?:[^\r]++|\r(?!\n)|\r\n(?=[ \t]))*+)", re.IGNORECASE
)


def _stream_content_length(head: bytes) -> int:
    found = _CONTENT_LENGTH.finditer(head)
    first = next(found, None)
    if first is None or next(found, None) is not None:
        raise FramingLost("Content-Length missing or repeated on a stream")
    v = first[1].replace(b"\r\n", b"").strip()
    if not v.isdigit() or len(v) > 10:
        raise FramingLost("bad Content-Length")
    return int(v)


# Leading CRLFs between messages: CRLFCRLF is a ping; a lone CRLF is a pong or
# padding and is skipped (RFC 5626 §3.5.1, RFC 3261 §7.5); so is a lone CR or
# LF. The run is read left to right — a ping first, then a CRLF, then one octet
# — and a CRLF or a lone octet only while 4 octets are left to look at: fewer
# may be the start of a ping still arriving. A run of any length costs a few C
# calls, not a Python step per octet (a peer can send megabytes of them):
# - read left to right, a run's pings are exactly its non-overlapping CRLFCRLFs
#   from the left (a CRLF token never starts inside one), so bytes.count finds
#   them;
# - only the end of a run that is all the buffer holds needs the step-by-step
#   reading, and that reading can start a few octets before the end: after
#   "\n\n" or "\r\r" (no token spans such a pair), or, where the octets
#   alternate CR LF CR LF…, every 4 octets (each is a ping).
_RUN = re.compile(rb"[\r\n]*+")
_PING_OCTETS = b"\r\n\r\n"
_PING = Ping()
_STEP_TAIL = 12  # a run this short is read step by step from its start


def _skip_padding(buf: bytearray, events: list[StreamEvent]) -> bool:
    """Consume the line ends at the start of ``buf``, a Ping for each CRLFCRLF.

    False when what is left (under 4 octets) may be the start of a ping.
    """
    m = _RUN.match(buf)
    end = 0 if m is None else m.end()
    if end == 0:
        return True
    if end < len(buf):  # a message follows: the whole run is read
        events.extend([_PING] * buf.count(_PING_OCTETS, 0, end))
        del buf[:end]
        return True
    start = _tail_start(buf)
    events.extend([_PING] * buf.count(_PING_OCTETS, 0, start))
    del buf[:start]
    return _step(buf, events)


def _tail_start(run: bytearray) -> int:
    """A position within the last 14 octets of ``run`` (all CR/LF) where the
    left-to-right reading from the start is certain to stand."""
    n = len(run)
    if n <= _STEP_TAIL:
        return 0
    # The last "\n\n" or "\r\r" that starts before n-9: the reading stands
    # between its two octets; from there to n-8 the octets alternate.
    pair = max(run.rfind(b"\n\n", 0, n - 7), run.rfind(b"\r\r", 0, n - 7))
    at = pair + 1
    if run[at : at + 1] == b"\n":
        at += 1  # a lone LF; what follows starts with CR
    # Alternating from ``at``: a ping every 4 octets, as far as they fit before n-8.
    return at + 4 * max(0, (n - 11 - at) // 4)


def _step(buf: bytearray, events: list[StreamEvent]) -> bool:
    """The reading one token at a time, over the last octets of a run (at most 14)."""
    while buf and buf[0] in b"\r\n":
        if buf[:4] == _PING_OCTETS:
            events.append(_PING)
            del buf[:4]
        elif buf[:2] == b"\r\n" and len(buf) >= 4:
            del buf[:2]
        elif len(buf) < 4 and _PING_OCTETS.startswith(bytes(buf)):
            return False
        else:
            del buf[:1]
    return True


def _readable(head: bytes) -> SipMessage | None:
    try:
        return parse_message(head + HEADER_END, datagram=True)
    except SipParseError as e:
        return e.message
