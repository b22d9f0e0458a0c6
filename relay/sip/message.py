"""SIP requests and responses: headers kept byte-exact unless the proxy changes them."""

from __future__ import annotations

from collections.abc import Iterator

from relay.sip.headers import NameAddr, Via, canonical_name, split_commas

CRLF = b"\r\n"
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # every octet survives a decode/encode round trip


def to_str(b: bytes) -> str:
    """Octets to text, every octet kept (surrogateescape)."""
    return b.decode(ENCODING, ERRORS)


def to_bytes(s: str) -> bytes:
    """Text back to the octets it was read from."""
    return s.encode(ENCODING, ERRORS)


class Header:
    """One header field line (with its folded continuation lines).

    ``raw`` is the field exactly as received, CRLFs included; it is what goes on
    the wire again unless the header was built or changed here (raw is None).

    Reading is lazy and remembered: the parser only finds where each field is and
    what it is called; ``value`` is decoded from ``raw`` on first use, and what
    is read from it — its comma-separated values (``values``), and the parsed
    form routing asks for (Via list, name-addr, CSeq: see SipMessage) — is kept
    on the field, so a proxy that asks for the top Via five times parses it once.
    Setting ``value`` forgets all of it. The memos are shared: callers treat what
    they return as read-only.
    """

    __slots__ = ("name", "raw_name", "_value", "raw", "_values", "_parsed")

    def __init__(self, raw_name: str, value: str | None, raw: bytes | None = None,
                 name: str | None = None):
        # value None: read from ``raw`` when first asked (a field received on one
        # line: ``name [WSP] ":" value CRLF``); name: the canonical name, when the
        # caller already knows it.
        self.raw_name = raw_name
        self.name = canonical_name(raw_name) if name is None else name
        self._value = value
        self.raw = raw
        self._values: list[str] | None = None
        # what the field's one reader made of it: list[Via], NameAddr or (int, str)
        self._parsed: list[Via] | NameAddr | tuple[int, str] | None = None

    @property
    def value(self) -> str:
        """The value, unfolded, without the WSP around it (RFC 3261 §7.3.1)."""
        v = self._value
        if v is None:
            raw = self.raw
            assert raw is not None
            v = self._value = raw[raw.index(b":") + 1 : -2].strip(b" \t").decode(ENCODING, ERRORS)
        return v

    @value.setter
    def value(self, value: str) -> None:
        """A new value: what was read from the old one is forgotten."""
        self._value = value
        self._values = None
        self._parsed = None

    def values(self) -> list[str]:
        """The comma-separated values of this field (``split_commas``), split once."""
        v = self._values
        if v is None:
            v = self._values = split_commas(self.value)
        return v

    def vias(self) -> list[Via]:
        """Every value of this (Via) field, parsed, once (SipParseError if one is malformed)."""
        v = self._parsed
        if isinstance(v, list):
            return v
        vias = self._parsed = [Via.parse(x) for x in self.values()]
        return vias

    def name_addr(self) -> NameAddr:
        """The value as one name-addr (From, To), parsed once."""
        a = self._parsed
        if isinstance(a, NameAddr):
            return a
        addr = self._parsed = NameAddr.parse(self.value)
        return addr

    def cseq(self) -> tuple[int, str]:
        """(sequence number, method) of a CSeq value, read once."""
        c = self._parsed
        if isinstance(c, tuple):
            return c
        num, method = self.value.split(None, 1)
        # methods are case-sensitive (RFC 3261 §7.1)
        cseq = self._parsed = int(num), method.strip()
        return cseq

    def serialise(self) -> bytes:
        """The field on the wire: as received unless built or changed here."""
        if self.raw is not None:
            return self.raw
        return to_bytes(f"{self.raw_name}: {self.value}") + CRLF

    def __repr__(self) -> str:
        return f"Header({self.raw_name!r}, {self.value!r})"


class SipMessage:
    """Common part of requests and responses."""

    __slots__ = ("start_line", "headers", "body", "wire_size")

    def __init__(self, start_line: bytes, headers: list[Header], body: bytes = b""):
        self.start_line = start_line
        self.headers = headers
        self.body = body
        # Octets it arrived in (the parser sets it; 0 for a message built here): what
        # an answer to a datagram is measured against (reflection, issue 10).
        self.wire_size = 0

    def _first(self, name: str) -> Header | None:
        for h in self.headers:
            if h.name == name:
                return h
        return None

    @property
    def from_tag(self) -> str | None:
        """The From tag (the From field is parsed once, however often routing asks)."""
        return self.from_().tag

    # -- reading ---------------------------------------------------------
    def get(self, name: str) -> str | None:
        """Value of the first header called ``name`` (full lower-case name)."""
        for h in self.headers:
            if h.name == name:
                return h.value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, repeated headers and comma lists flattened.

        One pass, each field split once (and its values kept on the field):
        O(size of those fields). A caller that walks a list (e.g. the Route set)
        reads it once with this and changes it once (``pop_first_values``),
        never re-reads it per element.
        """
        out: list[str] = []
        for h in self.headers:
            if h.name == name:
                out.extend(h.values())
        return out

    def has(self, name: str) -> bool:
        """Whether a header called ``name`` (full lower-case name) is present."""
        for h in self.headers:
            if h.name == name:
                return True
        return False

    @property
    def call_id(self) -> str:
        """The Call-ID ("" when missing: only a parse error reads it then)."""
        return self.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(sequence number, method) of CSeq."""
        h = self._first("cseq")
        return (0, "?") if h is None or not h.value else h.cseq()

    def vias(self) -> list[Via]:
        """Every Via value, parsed, top first (each field parsed once: read-only)."""
        out: list[Via] = []
        for h in self.headers:
            if h.name == "via":
                out.extend(h.vias())
        return out

    def top_via(self) -> Via:
        """The first Via value, parsed (only the first Via field is read)."""
        h = self._first("via")
        if h is None:
            raise LookupError("no Via")
        if isinstance(h._parsed, list):  # the parser read them all
            return h._parsed[0]
        return Via.parse(h.values()[0])

    def from_(self) -> NameAddr:
        """The From header, parsed (once: read-only)."""
        h = self._first("from")
        return NameAddr.parse("") if h is None else h.name_addr()

    def to(self) -> NameAddr:
        """The To header, parsed (once: read-only)."""
        h = self._first("to")
        return NameAddr.parse("") if h is None else h.name_addr()

    # -- changing --------------------------------------------------------
    def insert(self, name: str, value: str, index: int = 0) -> None:
        """Insert a new header field at ``index`` (the top by default)."""
        self.headers.insert(index, Header(name, value))

    def insert_before(self, name: str, value: str) -> None:
        """Insert above the first header of the same kind (or at the top)."""
        canonical = canonical_name(name)
        for i, h in enumerate(self.headers):
            if h.name == canonical:
                self.headers.insert(i, Header(name, value))
                return
        self.insert(name, value)

    def append(self, name: str, value: str) -> None:
        """Add a new header field at the end."""
        self.headers.append(Header(name, value))

    def remove(self, name: str) -> None:
        """Remove every header field called ``name`` (full lower-case name)."""
        self.headers = [h for h in self.headers if h.name != name]

    def set(self, name: str, value: str) -> None:
        """Replace the first header called ``name`` (others removed) or add it."""
        canonical = canonical_name(name)
        headers = self.headers
        for i, h in enumerate(headers):
            if h.name == canonical:
                headers[i] = Header(h.raw_name, value, None, canonical)
                for later in headers[i + 1 :]:
                    if later.name == canonical:
                        headers[i + 1 :] = [x for x in headers[i + 1 :] if x.name != canonical]
                        return
                return
        self.append(name, value)

    def pop_first_value(self, name: str) -> str | None:
        """Remove the first comma-separated value of ``name`` and return it (None if none)."""
        taken = self.pop_first_values(name, 1)
        return taken[0] if taken else None

    def pop_first_values(self, name: str, n: int) -> list[str]:
        """Remove the first ``n`` values of ``name`` (full lower-case name) in one pass.

        Values are counted across the fields of that name in order, as
        ``get_all`` lists them, and returned (fewer when there are fewer).
        Fields wholly consumed go, empty ones among them too; a field partly
        consumed is rewritten once with the values it keeps; every other field
        keeps its bytes. One pass over the headers, each split at most once: a
        proxy stripping k of its own Route entries (RFC 3261 §16.4) calls this
        once with n=k instead of k times with n=1 (each a split and a rewrite).
        """
        taken: list[str] = []
        if n <= 0:
            return taken
        kept: list[Header] = []
        for h in self.headers:
            if h.name != name or len(taken) >= n:
                kept.append(h)
                continue
            values = h.values()
            need = n - len(taken)
            taken.extend(values[:need])
            if len(values) > need:
                kept.append(Header(h.raw_name, ", ".join(values[need:])))
        self.headers = kept
        return taken

    def set_body(self, body: bytes) -> None:
        """Replace the body and its Content-Length."""
        self.body = body
        self.set("Content-Length", str(len(body)))

    # -- writing ---------------------------------------------------------
    def serialise(self) -> bytes:
        """The message on the wire: untouched header fields byte for byte."""
        parts = [self.start_line, CRLF]
        for h in self.headers:
            raw = h.raw
            parts.append(h.serialise() if raw is None else raw)
        parts.append(CRLF)
        parts.append(self.body)
        return b"".join(parts)

    def iter_headers(self, name: str) -> Iterator[Header]:
        """The header fields called ``name``, in order."""
        return (h for h in self.headers if h.name == name)


class Request(SipMessage):
    """A SIP request: method and Request-URI as written on the request line."""

    __slots__ = ("method", "uri")

    def __init__(
        self, method: str, uri: str, headers: list[Header], body: bytes = b"",
        start_line: bytes | None = None,
    ):
        super().__init__(start_line or to_bytes(f"{method} {uri} SIP/2.0"), headers, body)
        self.method = method
        self.uri = uri

    def set_uri(self, uri: str) -> None:
        """Replace the Request-URI (and the request line)."""
        self.uri = uri
        self.start_line = to_bytes(f"{self.method} {uri} SIP/2.0")

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(SipMessage):
    """A SIP response: status code and reason phrase."""

    __slots__ = ("status", "reason")

    def __init__(
        self, status: int, reason: str, headers: list[Header], body: bytes = b"",
        start_line: bytes | None = None,
    ):
        super().__init__(start_line or to_bytes(f"SIP/2.0 {status} {reason}"), headers, body)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# RFC 3261 §21 reason phrases for the responses the relay itself generates.
REASONS = {
    100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    414: "Request-URI Too Long", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    423: "Interval Too Brief", 430: "Flow Failed", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    487: "Request Terminated", 500: "Server Internal Error", 501: "Not Implemented",
    503: "Service Unavailable", 505: "Version Not Supported", 513: "Message Too Large",
}

# RFC 3261 §8.2.6.2: a response copies these from the request.
_COPIED = ("via", "from", "to", "call-id", "cseq")


def make_response(
    request: SipMessage, status: int, reason: str | None = None, *,
    to_tag: str | None = None, extra: list[tuple[str, str]] | None = None,
) -> Response:
    """A response built from a request per RFC 3261 §8.2.6 (no body)."""
    headers: list[Header] = []
    for h in request.headers:
        if h.name in _COPIED:
            if h.name == "to" and to_tag and status > 100 and ";tag=" not in h.value.replace(" ", ""):
                headers.append(Header(h.raw_name, f"{h.value};tag={to_tag}"))
            else:
                headers.append(h)
    for name, value in extra or ():
        headers.append(Header(name, value))
    headers.append(Header("Content-Length", "0"))
    return Response(status, reason or REASONS.get(status, "Unknown"), headers)
