"""Header names, comma splitting, parameters, Via and name-addr values (RFC 3261 §7.3, §25)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.sip.errors import SipParseError

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

# token characters (RFC 3261 §25.1).
TOKEN_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
)


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


_COMMA_SPECIAL = re.compile(r'[",<>\\]')


def split_commas(value: str) -> list[str]:
    """Split a header value at commas outside quotes and <...> (RFC 3261 §7.3.1)."""
    if '"' not in value and "<" not in value:
        # Via, Allow, Supported, Require…: nothing can hide a comma (the hot path:
        # every message has Vias).
        return [p for p in (x.strip() for x in value.split(",")) if p]
    parts: list[str] = []
    depth = 0
    quoted = False
    escaped_at = -1
    start = 0
    # Only the few special characters are visited, not every character.
    for m in _COMMA_SPECIAL.finditer(value):
        i = m.start()
        ch = value[i]
        if quoted:
            if i == escaped_at:
                continue
            if ch == "\\":
                escaped_at = i + 1  # quoted-pair: the next character is literal
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    if quoted:
        raise SipParseError("unterminated quoted string")
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``;name=value;flag`` (leading ';' optional). Names lower-cased."""
    params: dict[str, str | None] = {}
    for item in _split_outside_quotes(text, ";"):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            params[k.strip().lower()] = v.strip()
        else:
            params[item.lower()] = None
    return params


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    if '"' not in text:
        return text.split(sep)
    out: list[str] = []
    quoted = False
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == sep:
            out.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise SipParseError("unterminated quoted string")
    out.append(text[start:])
    return out


@dataclass(slots=True)
class Via:
    """One Via value: ``SIP/2.0/<transport> <host>[:port];params``."""

    transport: str  # upper-case: UDP, TCP, TLS, ...
    host: str  # without IPv6 brackets
    port: int | None
    params: dict[str, str | None]

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @classmethod
    def parse(cls, value: str) -> Via:
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


def _check_host(host: str) -> str:
    if not host or any(c in host for c in ' \t<>"'):
        raise SipParseError("bad host")
    return host


def _port(text: str) -> int:
    text = text.strip()
    if not is_digits(text) or len(text) > 5 or not 0 < int(text) < 65536:
        raise SipParseError("bad port")
    return int(text)


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(slots=True)
class NameAddr:
    """``"Display" <uri>;params`` or a bare ``uri;params`` (RFC 3261 §20.10)."""

    display: str | None
    uri: str
    params: dict[str, str | None]

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        value = value.strip()
        lt = _find_lt(value)
        if lt >= 0:
            gt = value.find(">", lt)
            if gt < 0:
                raise SipParseError("unterminated <")
            display = value[:lt].strip() or None
            if display is not None and not display.startswith('"'):
                # an unquoted display name is a run of tokens (RFC 4475 baddn.dat)
                if any(
                    ord(c) > 127 or (c not in " \t" and ord(c) not in TOKEN_CHARS)
                    for c in display
                ):
                    raise SipParseError("bad display name")
            uri = value[lt + 1 : gt].strip()
            return cls(display, uri, parse_params(value[gt + 1 :]))
        # addr-spec form: header params start at the first ';' (RFC 3261 §20)
        semi = value.find(";")
        uri, ptext = (value, "") if semi < 0 else (value[:semi].rstrip(), value[semi + 1 :])
        if not uri or " " in uri or "\t" in uri:
            raise SipParseError("bad URI")
        return cls(None, uri, parse_params(ptext))

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")


def _find_lt(value: str) -> int:
    quoted = False
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            return i
        i += 1
    if quoted:
        raise SipParseError("unterminated quoted string")
    return -1
