"""SIP URIs (RFC 3261 §19.1): just enough structure to route on."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from relay.sip.errors import SipParseError
from relay.sip.headers import check_uri_length, format_host, parse_params, split_hostport

SIP_SCHEMES = frozenset({"sip", "sips"})
_URI_SPACE = re.compile(r"[ \t\r\n]")


@dataclass(slots=True)
class SipUri:
    """A sip: or sips: URI, split into what routing reads (user, host, port, params)."""

    scheme: str  # lower-case
    user: str | None  # as written (escapes kept)
    host: str  # lower-case, IPv6 without brackets
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str = ""  # the raw ?headers part, without '?'

    # Written out, not generated: mypyc compiles a written __init__, while the one
    # @dataclass generates stays interpreted (one of the commonest objects a message makes).
    def __init__(self, scheme: str, user: str | None, host: str, port: int | None,
                 params: dict[str, str | None] | None = None, headers: str = "") -> None:
        self.scheme = scheme
        self.user = user
        self.host = host
        self.port = port
        self.params = {} if params is None else params
        self.headers = headers

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse a sip:/sips: URI; 416 for another scheme, 513 over MAX_URI_LENGTH."""
        check_uri_length(text)
        colon = text.find(":")
        if colon <= 0:
            raise SipParseError("URI without scheme")
        scheme = text[:colon].lower()
        if scheme not in SIP_SCHEMES:
            raise SipParseError(f"not a SIP URI: {scheme}", status=416)
        rest = text[colon + 1 :]
        headers = ""
        # '@' appears only as the end of userinfo: user parts may hold '?' and
        # ';' (RFC 3261 §25.1 user-unreserved, RFC 4475 intmeth.dat) but no bare
        # '@', and neither may parameters or headers. '?' starts the headers
        # only after the hostport.
        at = rest.find("@")
        user: str | None = None
        if at >= 0:
            user = rest[:at]
            pw = user.find(":")
            if pw >= 0:
                user = user[:pw]
            rest = rest[at + 1 :]
        q = rest.find("?")
        if q >= 0:
            rest, headers = rest[:q], rest[q + 1 :]
        semi = rest.find(";")
        hostport, ptext = (rest, "") if semi < 0 else (rest[:semi], rest[semi + 1 :])
        host, port = split_hostport(hostport)
        if _URI_SPACE.search(text) is not None:
            raise SipParseError("whitespace in URI")
        return cls(scheme, user, host.lower(), port, parse_params(ptext), headers)

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out += [self.user, "@"]
        out.append(format_host(self.host))
        if self.port:
            out.append(f":{self.port}")
        for k, v in self.params.items():
            out.append(f";{k}" if v is None else f";{k}={v}")
        if self.headers:
            out.append("?" + self.headers)
        return "".join(out)
