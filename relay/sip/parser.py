"""Parse one SIP message from bytes (RFC 3261 §7, §18.3, §25), byte-exact."""

from __future__ import annotations

import re

from relay.sip import limits
from relay.sip.errors import SipLimitExceeded, SipParseError
from relay.sip.headers import (
    SINGLE_VALUED,
    NameAddr,
    Via,
    canonical_name,
    is_digits,
    is_token,
    split_commas,
)
from relay.sip.message import Header, Request, Response, SipMessage, to_str

HEADER_END = b"\r\n\r\n"
_TOKEN = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")  # RFC 3261 §25.1 token
_WSP = (b" ", b"\t")
_VERSION = "SIP/2.0"


def split_head(data: bytes, datagram: bool = False) -> tuple[bytes, int]:
    """(header section without the final CRLFCRLF, offset of the body)."""
    end = data.find(HEADER_END)
    if end < 0:
        # A datagram that ends right after its last header line (no empty
        # line, RFC 4475 baddn.dat) still carries a complete header section.
        if datagram and data.endswith(b"\r\n"):
            return data[:-2], len(data)
        raise SipParseError("no end of header section")
    return data[:end], end + 4


def parse_message(data: bytes, *, datagram: bool = True) -> SipMessage:
    """Parse a whole message.

    ``datagram``: the bytes are one UDP datagram. RFC 3261 §18.3: without a
    Content-Length the body runs to the end of the datagram; octets past
    Content-Length are discarded (RFC 4475 dblreq.dat); a Content-Length
    larger than what arrived is an error (clerr.dat). For a stream, the framer
    hands over exactly head + Content-Length octets.
    """
    if len(data) > limits.MAX_MESSAGE_SIZE:
        raise SipParseError("message too large", status=513)
    head, body_at = split_head(data, datagram)
    if body_at > limits.MAX_HEADER_SECTION:
        raise SipParseError("header section too large", status=513)
    eol = head.find(b"\r\n")
    start = head if eol < 0 else head[:eol]
    if len(start) > limits.MAX_LINE_LENGTH:
        raise SipParseError("start line too long")
    try:
        headers = _parse_headers(head, len(start) + 2)
    except _Truncated as t:
        raise _answerable_limit(t.error, start, t.headers) from None
    msg = _start(start, headers)
    msg.wire_size = len(data)
    try:
        _check_size_limits(msg, head)
        cl = _content_length(msg)
        rest = data[body_at:]
        if cl is None:
            if not datagram:
                raise SipParseError("Content-Length missing on a stream")
            msg.body = rest
        elif cl > len(rest):
            raise SipParseError("Content-Length larger than the message")
        else:
            msg.body = rest[:cl]
        _validate(msg)
    except SipParseError as e:
        e.message = msg if _answerable(msg) else None
        raise
    return msg


class _Truncated(Exception):
    """A header section over MAX_LINES or MAX_HEADERS, and the fields read before it."""

    def __init__(self, error: SipLimitExceeded, headers: list[Header]):
        super().__init__(error.reason)
        self.error = error
        self.headers = headers


# A header section whose fields each sit on one line (no folding: the common
# case) is cut by one C pass: ``_FIELD.split`` returns, for each field, what lay
# before it (empty when the fields follow each other), the field and its name
# (a token, optional WSP, ':', a value without CR or LF, CRLF). Python then
# steps once per field, never per line or octet. Anything else — folding, a bare
# CR or LF, a bad name, too many fields, a long line — takes the line-by-line
# walk, which finds the same fields in what it accepts and gives the precise
# error for the rest.
_FIELD = re.compile(rb"(([A-Za-z0-9\-.!%*_+`'~]++)[ \t]*+:[^\r\n]*+\r\n)")

# Header names as received → (name as text, canonical name). Names are chosen by
# peers: bounded, emptied when full (like headers._CANONICAL).
_NAMES: dict[bytes, tuple[str, str]] = {}
_NAMES_MAX = 1024


def _parse_headers(head: bytes, offset: int) -> list[Header]:
    """The header fields of ``head`` from ``offset``, folded lines joined."""
    n = len(head)
    if offset >= n + 2:
        return []
    section = head[offset:] + b"\r\n"
    if len(section) <= limits.MAX_LINE_LENGTH and section.count(b"\r\n") <= limits.MAX_HEADERS:
        parts = _FIELD.split(section)
        if not any(parts[0::3]):  # nothing between or after the fields
            names = _NAMES
            headers: list[Header] = []
            for raw, name in zip(parts[1::3], parts[2::3], strict=True):
                known = names.get(name) or _learn_name(name)
                headers.append(Header(known[0], None, raw, known[1]))
            return headers
    return _parse_lines(head, offset)


def _learn_name(name: bytes) -> tuple[str, str]:
    if len(_NAMES) >= _NAMES_MAX:
        _NAMES.clear()
    text = name.decode("ascii")
    known = _NAMES[name] = (text, canonical_name(text))
    return known


def _parse_lines(head: bytes, offset: int) -> list[Header]:
    """The header fields of ``head`` from ``offset``, walked line by line.

    One step per physical line, at most MAX_LINES of them: the limit is checked
    as the lines are met, so a header section of thousands of short lines costs
    no more than MAX_LINES steps before it is refused.
    """
    headers: list[Header] = []
    n = len(head)
    pos = offset
    current_start = -1
    lines = 1  # the start line
    while pos <= n:
        lines += 1
        if lines > limits.MAX_LINES:
            raise _Truncated(SipLimitExceeded("MAX_LINES", "too many header lines"), headers)
        eol = head.find(b"\r\n", pos)
        if eol < 0:
            eol = n
        if eol - pos > limits.MAX_LINE_LENGTH:
            raise SipParseError("header line too long")
        if head[pos : pos + 1] in _WSP:
            if current_start < 0:
                raise SipParseError("continuation line before any header")
        else:
            if current_start >= 0:
                _append(headers, head[current_start:pos])
            current_start = pos
        pos = eol + 2
    if current_start >= 0:
        _append(headers, head[current_start:n] + b"\r\n")
    return headers


def _append(headers: list[Header], raw: bytes) -> None:
    if len(headers) == limits.MAX_HEADERS:
        raise _Truncated(SipLimitExceeded("MAX_HEADERS", "too many header fields"), headers)
    headers.append(_header(raw))


def _answerable_limit(error: SipLimitExceeded, start: bytes, headers: list[Header]) -> SipLimitExceeded:
    """``error``, with the message read so far when it is enough to answer it (RFC 3261 §8.2.6)."""
    try:
        msg = _start(start, headers)
    except SipParseError:
        return error
    error.message = msg if _answerable(msg) else None
    return error


def _header(raw: bytes) -> Header:
    """``raw`` is the full field including its trailing CRLF."""
    colon = raw.find(b":")
    if colon <= 0:
        raise SipParseError("header line without a colon")
    name = raw[:colon].rstrip(b" \t")
    if not _TOKEN.fullmatch(name):
        raise SipParseError("bad header name")
    # RFC 3261 §7.3.1: folding (CRLF followed by WSP) is equivalent to one SP.
    value = raw[colon + 1 : -2]
    if b"\r\n" in value:
        value = b" ".join(part.strip(b" \t") for part in value.split(b"\r\n"))
    return Header(name.decode("ascii"), to_str(value.strip(b" \t")), raw)


def _start(line: bytes, headers: list[Header]) -> SipMessage:
    text = to_str(line)
    if text[:4].upper() == "SIP/":
        parts = text.split(" ", 2)
        # RFC 3261 §7.1: "The SIP-Version string is case-insensitive".
        if len(parts) < 2 or parts[0].upper() != _VERSION:
            raise SipParseError("bad status line")
        code = parts[1]
        if len(code) != 3 or not is_digits(code) or not 100 <= int(code) <= 699:
            raise SipParseError("bad status code")
        reason = parts[2] if len(parts) == 3 else ""
        return Response(int(code), reason, headers, start_line=line)
    # RFC 3261 §25.1: Method SP Request-URI SP SIP-Version, single SPs, no LWS
    # inside the URI (RFC 4475 lwsstart.dat, trws.dat, lwsruri.dat).
    parts = text.split(" ")
    if len(parts) != 3:
        req = _answerable_stub(parts, headers, line)
        raise SipParseError("malformed request line", message=req)
    method, uri, version = parts
    if not is_token(method):
        raise SipParseError("bad method")
    req = Request(method, uri, headers, start_line=line)
    if version.upper() != _VERSION:
        if version.upper().startswith("SIP/"):
            raise SipParseError("SIP version not supported", status=505, message=req)
        raise SipParseError("bad SIP version", message=req)
    if not uri or uri.startswith("<") or ":" not in uri:
        raise SipParseError("bad Request-URI", message=req)
    if len(uri) > limits.MAX_URI_LENGTH:
        raise SipLimitExceeded("MAX_URI_LENGTH", "Request-URI Too Long", 414,
                               message=req if _answerable(req) else None)
    return req


def _answerable_stub(parts: list[str], headers: list[Header], line: bytes) -> Request | None:
    method = parts[0] if parts and parts[0] else None
    if method is None or not is_token(method):
        return None
    req = Request(method, "sip:invalid", headers, start_line=line)
    return req if _answerable(req) else None


def _content_length(msg: SipMessage) -> int | None:
    field: Header | None = None
    for h in msg.headers:
        if h.name == "content-length":
            if field is not None:
                raise SipParseError("more than one Content-Length")
            field = h
    if field is None:
        return None
    v = field.value
    if not is_digits(v) or len(v) > 10:
        raise SipParseError("bad Content-Length")
    cl = int(v)
    if cl > limits.MAX_MESSAGE_SIZE:
        raise SipParseError("body too large", status=513)
    return cl


def _check_size_limits(msg: SipMessage, head: bytes) -> None:
    """MAX_COMMAS, MAX_SEMICOLONS (over the whole header section), MAX_HEADER_VALUE."""
    # Two scans in C bound every later split: no list or parameter walk of this
    # message can visit more separators than these.
    if head.count(b",") > limits.MAX_COMMAS:
        raise SipLimitExceeded("MAX_COMMAS", "too many comma-separated values")
    if head.count(b";") > limits.MAX_SEMICOLONS:
        raise SipLimitExceeded("MAX_SEMICOLONS", "too many parameters")
    if len(head) > limits.MAX_HEADER_VALUE:  # else no value can be that long
        for h in msg.headers:
            if len(h.value) > limits.MAX_HEADER_VALUE:
                raise SipLimitExceeded("MAX_HEADER_VALUE", "header value too long")


def _split_lists(msg: SipMessage, fields: list[Header]) -> list[str]:
    """Count the values of every list with a limit (limits.LIST_LIMITS), each field split once.

    Over a limit → SipLimitExceeded (513). Via and (in a request) Contact fields
    are split, their values kept on the fields, and a request's Contact values
    returned for validation; Route, Record-Route and Path are only counted (the
    proxy reads them), and a field without a comma holds one value, so the
    common case costs no split.
    """
    contacts: list[str] = []
    counts: dict[str, int] = {}
    # A response is forwarded as it is: only its Vias are read (and so checked).
    validated = _VALIDATED_LISTS if isinstance(msg, Request) else _VIA_ONLY
    list_limits = limits.LIST_LIMITS
    for h in fields:
        name = h.name
        if name in validated:
            values = h.values()  # kept on the field: the proxy reads these again
            if name == "contact":
                contacts += values
            elif not values:
                # RFC 3261 §20.42: Via = HCOLON via-parm *(COMMA via-parm); the
                # proxy stamps and strips the first value of the first field.
                raise SipParseError("Via field without a value")
            n = len(values)
        else:
            n = _count_values(h.value)
        total = counts[name] = counts.get(name, 0) + n
        limit, cap = list_limits[name]
        if total > cap:
            raise SipLimitExceeded(limit, f"too many {_LIST_NAMES[name]} values")
    return contacts


def _count_values(value: str) -> int:
    """How many values a list field holds, never raising: a field the proxy reads
    later (Route, Record-Route, Path) is not refused here for being malformed,
    only for being too long; with an unterminated quote, every comma counts."""
    if "," not in value:
        return 1 if value else 0
    try:
        return len(split_commas(value))
    except SipParseError:
        return value.count(",") + 1


_VALIDATED_LISTS = frozenset({"via", "contact"})
_VIA_ONLY = frozenset({"via"})
_LIST_NAMES = {"via": "Via", "route": "Route", "record-route": "Record-Route", "path": "Path",
               "contact": "Contact"}


def _validate(msg: SipMessage) -> None:
    """Checks every element must make (RFC 3261 §8.2, §16.3; RFC 4475 §3.1.2).

    Only the fields checked here are decoded; what is parsed (Vias, From, To,
    CSeq, list values) stays on the fields for routing to read.
    """
    found: dict[str, Header] = {}
    list_fields: list[Header] = []
    list_limits = limits.LIST_LIMITS
    for h in msg.headers:
        name = h.name
        if name in found:
            if name in SINGLE_VALUED:
                raise SipParseError(f"more than one {name}")
        else:
            found[name] = h
        if name in list_limits:
            list_fields.append(h)
    for name in ("call-id", "cseq", "from", "to", "via"):
        if name not in found:
            raise SipParseError(f"missing {name}")
    contacts = _split_lists(msg, list_fields)
    cseq = found["cseq"].value.split()
    if len(cseq) != 2 or not is_digits(cseq[0]) or int(cseq[0]) > limits.MAX_CSEQ:
        raise SipParseError("bad CSeq")
    found["cseq"].cseq()  # kept: the transaction key and the loop hash read it
    for h in list_fields:
        if h.name == "via":
            h.vias()  # every Via parsed (and kept: routing reads the top one)
    if isinstance(msg, Request):
        # a response is forwarded as it is: Via and CSeq are all we route on
        _validate_request(msg, found, cseq[1], contacts)


def _validate_request(msg: Request, found: dict[str, Header], cseq_method: str,
                      contacts: list[str]) -> None:
    if cseq_method != msg.method:
        raise SipParseError("CSeq method does not match the request line")
    mf = found.get("max-forwards")
    if mf is not None and (not is_digits(mf.value) or int(mf.value) > limits.MAX_MAX_FORWARDS):
        raise SipParseError("bad Max-Forwards")
    found["from"].name_addr()  # parsed once, kept for routing (from_tag, loop hash, tokens)
    found["to"].name_addr()
    for v in contacts:
        if v != "*":
            na = NameAddr.parse(v)
            if na.display is None and "<" not in v and "?" in na.uri:
                # RFC 3261 §20: an addr-spec with ',', ';' or '?' must be in <>
                raise SipParseError("Contact URI with headers must be in <>")


def _answerable(msg: SipMessage) -> bool:
    """Enough is readable to build an error response (RFC 3261 §8.2.6)."""
    try:
        if not msg.get("cseq"):
            return False
        via = split_commas(msg.get("via") or "")
        if not via:
            return False
        Via.parse(via[0])
        return isinstance(msg, Request)
    except SipParseError:
        return False
