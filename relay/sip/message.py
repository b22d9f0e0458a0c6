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
    """

    __slots__ = ("name", "raw_name", "value", "raw")

    def __init__(self, raw_name: str, value: str, raw: bytes | None = None):
        self.raw_name = raw_name
        self.name = canonical_name(raw_name)
        self.value = value
        self.raw = raw

    def serialise(self) -> bytes:
        """The field on the wire: as received unless built or changed here."""
        if self.raw is not None:
            return self.raw
        return to_bytes(f"{self.raw_name}: {self.value}") + CRLF

    def __repr__(self) -> str:
        return f"Header({self.raw_name!r}, {self.value!r})"


class SipMessage:
    """Common part of requests and responses."""

    __slots__ = ("start_line", "headers", "body", "_from_tag", "wire_size")

    def __init__(self, start_line: bytes, headers: list[Header], body: bytes = b""):
        self.start_line = start_line
        self.headers = headers
        self.body = body
        self._from_tag: str | None | bool = False  # False: not read yet
        # Octets it arrived in (the parser sets it; 0 for a message built here): what
        # an answer to a datagram is measured against (reflection, issue 10).
        self.wire_size = 0

    @property
    def from_tag(self) -> str | None:
        """The From tag, read once (routing asks for it several times per message)."""
        tag = self._from_tag
        if tag is False:
            tag = self._from_tag = NameAddr.parse(self.get("from") or "").tag
        return tag  # type: ignore[return-value]

    @from_tag.setter
    def from_tag(self, tag: str | None) -> None:
        """Remember the From tag read elsewhere (the parser reads it while validating)."""
        self._from_tag = tag

    # -- reading ---------------------------------------------------------
    def get(self, name: str) -> str | None:
        """Value of the first header called ``name`` (full lower-case name)."""
        for h in self.headers:
            if h.name == name:
                return h.value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, repeated headers and comma lists flattened.

        One pass, each field split once: O(size of those fields). A caller that
        walks a list (e.g. the Route set) reads it once with this and changes it
        once (``pop_first_values``), never re-reads it per element.
        """
        out: list[str] = []
        for h in self.headers:
            if h.name == name:
                out.extend(split_commas(h.value))
        return out

    def has(self, name: str) -> bool:
        """Whether a header called ``name`` (full lower-case name) is present."""
        return any(h.name == name for h in self.headers)

    @property
    def call_id(self) -> str:
        """The Call-ID ("" when missing: only a parse error reads it then)."""
        return self.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(sequence number, method) of CSeq."""
        num, method = (self.get("cseq") or "0 ?").split(None, 1)
        return int(num), method.strip()  # methods are case-sensitive (RFC 3261 §7.1)

    def vias(self) -> list[Via]:
        """Every Via value, parsed, top first."""
        return [Via.parse(v) for v in self.get_all("via")]

    def top_via(self) -> Via:
        """The first Via value, parsed (only the first Via field is split)."""
        for h in self.headers:
            if h.name == "via":
                return Via.parse(split_commas(h.value)[0])
        raise LookupError("no Via")

    def from_(self) -> NameAddr:
        """The From header, parsed."""
        return NameAddr.parse(self.get("from") or "")

    def to(self) -> NameAddr:
        """The To header, parsed."""
        return NameAddr.parse(self.get("to") or "")

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
        for i, h in enumerate(self.headers):
            if h.name == canonical:
                self.headers[i] = Header(h.raw_name, value)
                self.headers[i + 1 :] = [x for x in self.headers[i + 1 :] if x.name != canonical]
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
            values = split_commas(h.value)
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
        parts.extend(h.serialise() for h in self.headers)
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
