"""Header names, comma splitting, parameters, Via and name-addr values (RFC 3261 §7.3, §25)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.sip import limits
from relay.sip.errors import SipLimitExceeded, SipParseError

# RFC 3261 §7.3.3 and the IANA registry: compact form → full name.
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Headers that may appear once only (RFC 3261 §7.3.1, §20); a second one → 400
# (RFC 4475 §3.3.8 multi01.dat, §3.3.9 mcl01.dat).
SINGLE_VALUED = frozenset({"to", "from", "call-id", "cseq", "max-forwards", "content-length"})

# token (RFC 3261 §25.1).
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# An unquoted display name: tokens separated by LWS (RFC 3261 §25.1 display-name).
_UNQUOTED_DISPLAY = re.compile(r"[A-Za-z0-9\-.!%*_+`'~ \t]*")


def is_token(text: str) -> bool:
    """``token`` (RFC 3261 §25.1): one C match, whatever the length."""
    return _TOKEN.fullmatch(text) is not None


def is_digits(text: str) -> bool:
    """``1*DIGIT`` (RFC 5234: ASCII 0-9 only).

    ``str.isdigit()`` alone also takes '²' (int() then raises ValueError) and
    '٥' (int() reads it as 5): header values are decoded text, so both occur.
    """
    return text.isascii() and text.isdigit()


_CANONICAL: dict[str, str] = {}
_CANONICAL_MAX = 1024  # header names are chosen by peers: bounded, emptied when full


def canonical_name(raw_name: str) -> str:
    """Lower-case full header name; compact forms expanded."""
    name = _CANONICAL.get(raw_name)
    if name is None:
        lower = raw_name.lower()
        name = COMPACT_FORMS.get(lower, lower)
        if len(_CANONICAL) >= _CANONICAL_MAX:
            _CANONICAL.clear()
        _CANONICAL[raw_name] = name
    return name


# Scanning a header value. Each pattern matches, in C and without backtracking
# (possessive quantifiers), a run of text up to the next separator that is not
# inside a quoted string (RFC 3261 §25.1: quoted-string = DQUOTE *(qdtext /
# quoted-pair) DQUOTE) or, for lists, inside <...>. So Python steps once per
# separator, never once per character: the number of steps a value can cost is
# capped by limits.MAX_COMMAS / MAX_SEMICOLONS, its length only costs C time.
# A '<' opens a URI that runs to the next '>' (RFC 3261 §20: name-addr; an
# addr-spec has no '<' or '>' of its own), so '<' does not nest.
_QUOTED = r'"(?:[^"\\]++|\\.)*+"'
_LIST_ELEMENT = re.compile(r'(?:[^",<]++|' + _QUOTED + r'|<[^>]*+>?)*+', re.DOTALL)
_PARAM_ELEMENT = re.compile(r'(?:[^";]++|' + _QUOTED + r')*+', re.DOTALL)
_UNQUOTED_LIST_ELEMENT = re.compile(r'(?:[^,<]++|<[^>]*+>?)++', re.DOTALL)  # no '"' in the text
_BEFORE_LT = re.compile(r'(?:[^"<]++|' + _QUOTED + r')*+', re.DOTALL)


def split_commas(value: str) -> list[str]:
    """Split a header value at commas outside quotes and <...> (RFC 3261 §7.3.1).

    Empty elements are dropped; an unterminated quoted string → SipParseError.
    """
    if "," not in value and '"' not in value:
        # One value (From, To, Contact, a Route entry, most Vias): nothing to split
        # (a '"' must still be checked for its closing one).
        value = value.strip()
        return [value] if value else []
    if '"' not in value:
        if "<" not in value:
            # Via, Allow, Supported, Require…: nothing can hide a comma.
            return [p for p in (x.strip() for x in value.split(",")) if p]
        # Route / Record-Route / Path lists: commas hide only inside <...>; the
        # elements, in one C call (empty ones are dropped below, as by _split).
        return [p for p in (x.strip() for x in _UNQUOTED_LIST_ELEMENT.findall(value)) if p]
    return [p for p in (x.strip() for x in _split(_LIST_ELEMENT, value, ",")) if p]


def _split(element: re.Pattern[str], text: str, sep: str) -> list[str]:
    """``text`` cut at each ``sep`` that ``element`` stops at (one C match per piece)."""
    out: list[str] = []
    pos = 0
    end = len(text)
    while True:
        stop = _run_end(element, text, pos)
        out.append(text[pos:stop])
        if stop == end:
            return out
        if text[stop] != sep:  # an opening '"' without its closing one
            raise SipParseError("unterminated quoted string")
        pos = stop + 1


def _run_end(element: re.Pattern[str], text: str, pos: int) -> int:
    """Where ``element`` (which also matches the empty string) stops, from ``pos``."""
    m = element.match(text, pos)
    return pos if m is None else m.end()


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``;name=value;flag`` (leading ';' optional). Names lower-cased.

    More than ``limits.MAX_PARAMS`` parameters → SipLimitExceeded (513).
    """
    if not text:
        return {}
    items = _split_outside_quotes(text, ";")
    if len(items) > limits.MAX_PARAMS + 1:  # +1: the empty part before a leading ';'
        raise SipLimitExceeded("MAX_PARAMS", "too many parameters")
    params: dict[str, str | None] = {}
    count = 0
    for item in items:
        k, eq, v = item.partition("=")
        k = k.strip()
        if eq:
            params[k.lower()] = v.strip()
        elif k:
            params[k.lower()] = None
        else:
            continue  # an empty item (";;", a leading or trailing ';')
        count += 1
    if count > limits.MAX_PARAMS:
        raise SipLimitExceeded("MAX_PARAMS", "too many parameters")
    return params


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split at ``sep`` (';') outside quoted strings (quoted-pair aware)."""
    if '"' not in text:
        return text.split(sep)
    if sep != ";":
        raise ValueError(f"no scanner for {sep!r}")
    return _split(_PARAM_ELEMENT, text, sep)


# "SIP/2.0/UDP host[:port][;params]": upper-case transport, a host name or IPv4
# address, a port of 1-5 digits, no LWS. Anything else takes Via.parse_general.
_VIA_SHAPE = re.compile(r"SIP/2\.0/([A-Z]+) ([A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?(?:;(.*))?", re.DOTALL)


@dataclass(slots=True)
class Via:
    """One Via value: ``SIP/2.0/<transport> <host>[:port];params``."""

    transport: str  # upper-case: UDP, TCP, TLS, ...
    host: str  # without IPv6 brackets
    port: int | None
    params: dict[str, str | None]

    # Written out, not generated: mypyc compiles a written __init__, while the one
    # @dataclass generates stays interpreted (one of the commonest objects a message makes).
    def __init__(self, transport: str, host: str, port: int | None, params: dict[str, str | None]) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params

    @property
    def branch(self) -> str | None:
        """The branch parameter (RFC 3261 §8.1.1.7), None when absent."""
        return self.params.get("branch")

    @classmethod
    def parse(cls, value: str) -> Via:
        """Parse one Via value; SipParseError when malformed, 513 over MAX_PARAMS."""
        m = _VIA_SHAPE.fullmatch(value)
        if m is not None:
            # The shape nearly every peer sends: one C match, same result as below.
            transport, host, port, ptext = m.groups()
            if port is None:
                return cls(transport, host, None, parse_params(ptext or ""))
            if 0 < int(port) < 65536:
                return cls(transport, host, int(port), parse_params(ptext or ""))
        return cls.parse_general(value)

    @classmethod
    def parse_general(cls, value: str) -> Via:
        """``parse`` for every shape RFC 3261 §20.42 allows (LWS around '/', IPv6 …);
        ``parse`` takes a shortcut for the usual one and agrees with this."""
        semi = value.find(";")
        head, ptext = (value, "") if semi < 0 else (value[:semi], value[semi + 1 :])
        # "SIP / 2.0 / UDP host:port" — LWS is allowed around the slashes.
        parts = head.split("/", 2)
        if len(parts) != 3:
            raise SipParseError("bad Via sent-protocol")
        if parts[0].strip().upper() != "SIP" or parts[1].strip() != "2.0":
            raise SipParseError("bad Via sent-protocol")
        rest = parts[2].strip().split(None, 1)
        if len(rest) != 2:
            raise SipParseError("bad Via sent-by")
        transport = rest[0].upper()
        host, port = split_hostport(rest[1].strip())
        return cls(transport, host, port, parse_params(ptext))

    def sent_by(self) -> str:
        """``host[:port]`` as written (transaction matching, RFC 3261 §17.2.3)."""
        return f"{format_host(self.host)}:{self.port}" if self.port else format_host(self.host)


def split_hostport(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` → (host, port)."""
    if not text:
        raise SipParseError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError("bad IPv6 reference")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise SipParseError("bad host:port")
        return host, _port(rest[1:])
    if text.count(":") == 1:
        host, p = text.split(":")
        return _check_host(host), _port(p)
    if ":" in text:
        raise SipParseError("bad host:port")
    return _check_host(text), None


_BAD_HOST = re.compile(r'[ \t<>"]')


def _check_host(host: str) -> str:
    if not host or _BAD_HOST.search(host) is not None:
        raise SipParseError("bad host")
    return host


def _port(text: str) -> int:
    text = text.strip()
    if not is_digits(text) or len(text) > 5 or not 0 < int(text) < 65536:
        raise SipParseError("bad port")
    return int(text)


def format_host(host: str) -> str:
    """A host as written in a URI or Via: IPv6 in brackets (RFC 3261 §25.1)."""
    return f"[{host}]" if ":" in host else host


@dataclass(slots=True)
class NameAddr:
    """``"Display" <uri>;params`` or a bare ``uri;params`` (RFC 3261 §20.10)."""

    display: str | None
    uri: str
    params: dict[str, str | None]

    # Written out, not generated: mypyc compiles a written __init__, while the one
    # @dataclass generates stays interpreted (one of the commonest objects a message makes).
    def __init__(self, display: str | None, uri: str, params: dict[str, str | None]) -> None:
        self.display = display
        self.uri = uri
        self.params = params

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        """Parse one value of From, To, Contact, Route, Record-Route or Path."""
        value = value.strip()
        lt = _find_lt(value) if '"' in value else value.find("<")
        if lt == 0:  # "<uri>;params", the usual shape: no display name
            gt = value.find(">")
            if gt < 0:
                raise SipParseError("unterminated <")
            uri = check_uri_length(value[1:gt].strip())
            return cls(None, uri, parse_params(value[gt + 1 :]))
        if lt > 0:
            gt = value.find(">", lt)
            if gt < 0:
                raise SipParseError("unterminated <")
            display = value[:lt].strip() or None
            if display is not None and not display.startswith('"'):
                # an unquoted display name is a run of tokens (RFC 4475 baddn.dat)
                if _UNQUOTED_DISPLAY.fullmatch(display) is None:
                    raise SipParseError("bad display name")
            uri = check_uri_length(value[lt + 1 : gt].strip())
            return cls(display, uri, parse_params(value[gt + 1 :]))
        # addr-spec form: header params start at the first ';' (RFC 3261 §20)
        semi = value.find(";")
        uri, ptext = (value, "") if semi < 0 else (value[:semi].rstrip(), value[semi + 1 :])
        if not uri or " " in uri or "\t" in uri:
            raise SipParseError("bad URI")
        return cls(None, check_uri_length(uri), parse_params(ptext))

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (From/To), None when absent."""
        return self.params.get("tag")


def check_uri_length(uri: str) -> str:
    """``uri``, or SipLimitExceeded (513) when it is over ``limits.MAX_URI_LENGTH``."""
    if len(uri) > limits.MAX_URI_LENGTH:
        raise SipLimitExceeded("MAX_URI_LENGTH", "URI too long")
    return uri


def _find_lt(value: str) -> int:
    """Index of the first '<' outside quoted strings, or -1 (one C match)."""
    if '"' not in value:
        return value.find("<")
    stop = _run_end(_BEFORE_LT, value, 0)
    if stop == len(value):
        return -1
    if value[stop] == '"':
        raise SipParseError("unterminated quoted string")
    return stop
