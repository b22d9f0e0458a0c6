"""What of a phone's request goes to the PBX, and what of the PBX's answer comes back (pure).

Header fields are allow-listed both ways, never block-listed: a field we did not
think of stays behind. Hop-by-hop fields (RFC 9110 §7.6.1: Connection and the fields
it names, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade) are in
neither list, so they never cross; HTTP/2 forbids them anyway (RFC 9113 §8.2.2).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from relay.pbx.directory import valid_serial

PREFIX = "/provisioning/"

# Request fields a provisioning server needs, and why:
REQUEST_FIELDS = frozenset({
    "user-agent",  # servers pick the template by phone model and firmware (Yealink, Snom, Polycom, ...)
    "authorization",  # HTTP Basic/Digest of the provisioning server itself (phones support both)
    "accept", "accept-encoding", "accept-language",  # content negotiation; encodings pass through
    "if-modified-since", "if-none-match",  # phones poll for changes: 304 saves the download
    "if-match", "if-unmodified-since",
    "range", "if-range",  # resumed firmware downloads
    "cache-control",
})
# Response fields a phone needs, and why some are not among them:
RESPONSE_FIELDS = frozenset({
    "content-type", "content-length", "content-encoding", "content-language",
    "content-disposition", "content-range", "accept-ranges",
    "etag", "last-modified", "cache-control", "expires", "vary", "date",
    "www-authenticate",  # the provisioning server's own authentication
    "location",  # redirects; a relative one stays inside the PBX's provisioning tree
    "retry-after",
})
# Hop-by-hop fields (RFC 9110 §7.6.1) and HTTP/2's connection-specific ones (RFC 9113
# §8.2.2): meaningful for one connection only, never carried across the link.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Never forwarded to the PBX whatever the configuration says: hop-by-hop, the
# relay's own framing, and cookies. Every PBX on a relay shares one origin
# (the relay's name), so a cookie set by one PBX would be sent to every other.
NEVER = HOP_BY_HOP | {
    "host", "cookie", "set-cookie",
    # the relay says who the client is (Forwarded); a phone must not claim it
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
}


class BadTarget(Exception):
    """The request target is not /provisioning/<serial>/<path> or leaves the PBX's tree."""


@dataclass(frozen=True)
class Target:
    """A phone's request target, split: which PBX, and the path (with query) for it."""

    serial: str
    path: str  # starts with "/", query string included


def parse_target(target: bytes) -> Target:
    """``/provisioning/<serial>/<path>[?query]`` → Target; BadTarget otherwise.

    Only origin-form (RFC 9112 §3.2.1). The path is checked with :func:`safe_path`.
    An invalid serial is a BadTarget too: the caller answers it as an unknown one."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadTarget("not ASCII") from None
    if not text.startswith(PREFIX):
        raise BadTarget("not under /provisioning/")
    serial, slash, rest = text[len(PREFIX):].partition("/")
    if not slash or not valid_serial(serial):
        raise BadTarget("no serial")
    path = "/" + rest
    if not safe_path(path):
        raise BadTarget("path leaves the provisioning tree")
    return Target(serial, path)


def safe_path(path: str) -> bool:
    """True when ``path`` (with its query) stays inside whatever tree it is appended to.

    A PBX's provisioning URL is a subtree of its web server, whose other parts (the
    admin UI) must stay out of reach: no ``.``/``..`` segment, no encoded slash,
    backslash or NUL in any segment (servers that decode them would climb out),
    nothing but printable ASCII."""
    if not path.startswith("/") or any(not 0x21 <= ord(c) <= 0x7E for c in path):
        return False
    for segment in path.partition("?")[0].split("/"):
        raw = unquote_to_bytes(segment)
        if raw in (b".", b"..") or any(b in raw for b in (b"/", b"\\", b"\x00")):
            return False
    return True


def forwarded(client_ip: str, host: str) -> str:
    """RFC 7239 Forwarded value: the phone's address (so the PBX can tell phones apart
    and throttle one that guesses MAC addresses) and the Host it asked for."""
    addr = ipaddress.ip_address(client_ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    node = f'"[{addr}]"' if addr.version == 6 else str(addr)
    value = f"for={node};proto=https"
    if host and all(c.isalnum() or c in ".-:[]" for c in host):
        value += f';host="{host}"'
    return value


def request_fields(
    fields: list[tuple[bytes, bytes]], extra: frozenset[str] = frozenset(),
) -> list[tuple[bytes, bytes]]:
    """The phone's header fields that go to the PBX: REQUEST_FIELDS plus ``extra``
    (``provisioning.extra_request_headers``), never one of NEVER. Names lower-case."""
    allowed = (REQUEST_FIELDS | extra) - NEVER
    return [(n.lower(), v) for n, v in fields if n.lower().decode("latin-1") in allowed]


def response_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The PBX's response fields that go to the phone."""
    return [(n.lower(), v) for n, v in fields if n.lower().decode("latin-1") in RESPONSE_FIELDS]


def content_length(fields: list[tuple[bytes, bytes]]) -> int | None:
    """The response's Content-Length, None when absent or not one plain number."""
    values = {v.strip() for n, v in fields if n.lower() == b"content-length"}
    if len(values) != 1:
        return None
    value = values.pop()
    return int(value) if value.isdigit() else None


def end_to_end(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``fields`` without pseudo-headers, hop-by-hop fields and Host, names lower-case:
    what the agent passes between the link and the PBX's web server, both ways."""
    out = []
    for name, value in fields:
        n = name.lower()
        if n.startswith(b":") or n.decode("latin-1") in HOP_BY_HOP or n == b"host":
            continue
        out.append((n, value))
    return out
