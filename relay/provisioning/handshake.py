"""The link handshake, both sides (pure): an HTTP/1.1 Upgrade authenticated with Digest.

The PBX side opens TLS to the relay's provisioning port and asks (RFC 9110 §7.8,
the Reverse HTTP pattern of draft-lentczner-rhttp: an Upgrade that turns the
connection around)::

    GET /.well-known/pbx-relay/link HTTP/1.1
    Host: <relay>
    Connection: Upgrade
    Upgrade: pbx-relay-link/1

The relay answers ``401`` with one ``WWW-Authenticate: Digest`` per algorithm (RFC
7616, most preferred first, the same realm, HA1 and nonces as the PBX's SIP
REGISTER: username = serial, password = the secret ``pbx-relay pbx add`` printed).
The PBX asks again with ``Authorization``; the relay answers ``101 Switching
Protocols`` and from the next byte on the connection is HTTP/2 with the *relay as
client* (RFC 9113 §3.4 prior knowledge: the relay sends the connection preface).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

LINK_PATH = "/.well-known/pbx-relay/link"
UPGRADE_TOKEN = "pbx-relay-link/1"
_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}

# auth-param = token BWS "=" BWS ( token / quoted-string ), RFC 9110 §11.2
_PARAM = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')


def auth_params(text: str) -> dict[str, str]:
    """``name=value, name="quoted"`` → {name (lower-case): value}; what does not parse
    ends the list (a malformed header gives fewer params, never an exception)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _PARAM.match(text, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[m.group(1).lower()] = value
        pos = m.end()
    return out


def digest_username(authorization: str) -> str | None:
    """The username (the PBX's serial) of a Digest Authorization value."""
    if authorization[:7].lower() != "digest ":
        return None
    return auth_params(authorization[7:]).get("username")


def is_link_request(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]]) -> bool:
    """A GET of LINK_PATH asking to upgrade to UPGRADE_TOKEN."""
    upgrade = [v for n, v in fields if n.lower() == b"upgrade"]
    return (method == b"GET" and target == LINK_PATH.encode()
            and any(UPGRADE_TOKEN.encode() in [t.strip().lower() for t in v.split(b",")] for v in upgrade))


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate: Digest`` the relay offered."""

    realm: str
    nonce: str
    algorithm: str
    qop: str
    opaque: str | None = None


def choose_challenge(values: list[str]) -> Challenge | None:
    """The first Digest challenge (the relay's preference) with an algorithm we know
    and qop=auth; None if there is none."""
    for value in values:
        if value[:7].lower() != "digest ":
            continue
        p = auth_params(value[7:])
        algorithm = p.get("algorithm", "MD5").upper()
        qops = [q.strip() for q in p.get("qop", "").split(",")]
        if algorithm in _HASHES and "auth" in qops and "realm" in p and "nonce" in p:
            return Challenge(p["realm"], p["nonce"], algorithm, "auth", p.get("opaque"))
    return None


def authorization(
    challenge: Challenge, username: str, secret: str, method: str, uri: str,
    cnonce: str | None = None, nc: int = 1,
) -> str:
    """The Authorization value answering ``challenge`` (RFC 7616 §3.4.1, qop=auth)."""
    h = _HASHES[challenge.algorithm]
    ha1 = h(f"{username}:{challenge.realm}:{secret}".encode()).hexdigest()
    ha2 = h(f"{method}:{uri}".encode()).hexdigest()
    cnonce = cnonce or secrets.token_hex(8)
    count = f"{nc:08x}"
    response = h(f"{ha1}:{challenge.nonce}:{count}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    value = (f'Digest username="{username}", realm="{challenge.realm}", nonce="{challenge.nonce}", '
             f'uri="{uri}", algorithm={challenge.algorithm}, qop=auth, nc={count}, '
             f'cnonce="{cnonce}", response="{response}"')
    if challenge.opaque is not None:
        value += f', opaque="{challenge.opaque}"'
    return value


def link_request(host: str, auth: str | None = None) -> list[tuple[str, str]]:
    """Header fields of the PBX side's upgrade request."""
    fields = [("Host", host), ("Connection", "Upgrade"), ("Upgrade", UPGRADE_TOKEN),
              ("User-Agent", "pbx-relay-link/1")]
    if auth is not None:
        fields.append(("Authorization", auth))
    return fields
