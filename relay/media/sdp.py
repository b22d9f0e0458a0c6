"""Rewrite SDP so that both sides send their media to the relay; every other line byte for byte.

Sans-I/O: pure functions over bytes, no sockets, no clock, no globals.

``parse_sdp(body)`` reads what the relay needs (connection addresses, ports, RTCP,
direction) from an SDP offer or answer (RFC 8866, which obsoletes RFC 4566; RFC 3264).
``rewrite_sdp(body, address, ports)`` replaces the lines that say where to send media
— ``c=``, the ``m=`` ports, ``a=rtcp`` — with the relay's address and the ports it
allocated, removes ICE (the relay is the only path), and keeps every other line,
its order and its own line ending byte for byte. So ``a=crypto`` (SDES-SRTP),
``a=fingerprint``/``a=setup`` (DTLS-SRTP) and ``a=zrtp-hash`` reach the far end
unchanged, keys are negotiated end to end and the relay never holds one.

Both raise one error, ``SdpError``, for a body that is not SDP we can anchor.
**A caller must never forward such a body unchanged**: its ``m=`` lines would send
media around the relay (and disclose the peer's addresses), which is exactly what
anchoring exists to prevent. Reject it instead: a request carrying it (INVITE,
re-INVITE, UPDATE, PRACK) gets ``488 Not Acceptable Here`` (RFC 3261 §21.4.26);
a response or ACK carrying it cannot be forwarded and the call is ended. That
includes a body with no ``m=`` line at all: RFC 3264 §5 allows such an offer, but
there is nothing to anchor and no SIP endpoint we serve sends one. The caller passes
only ``application/sdp`` bodies; an SDP part inside ``multipart/*`` must be taken
out, rewritten and put back by the caller.

``rewrite_sdp`` raises ``ValueError`` for a mistake of its caller (a ``ports`` list
that does not match the ``m=`` lines, a port out of range, an address that is not
an IP literal), never for something a peer sent.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

# -- limits ---------------------------------------------------------------------------
# Each bounds what one body can cost or make the relay hold. Over one, the body is
# refused with SdpLimitExceeded (an SdpError: the caller answers 488, see above).

# The largest SDP body we read. It cannot be larger than the SIP message carrying
# it (relay.sip.limits.MAX_MESSAGE_SIZE, 65,535 octets, Kamailio's BUF_SIZE); the
# limit is repeated here so the module stays safe when fed from elsewhere. A call
# with audio, video and a few dozen codecs and candidates is 2-4 KiB.
MAX_SDP_SIZE: Final = 65_535

# Lines per body. Each costs a step of the scan; a SIP phone sends 10-40 (SIPp's
# offer 7, baresip's audio+video offer with ICE ~45), a WebRTC audio+video offer
# ~150. pjmedia (pjsip's SDP parser) holds at most 16 m= sections of 68
# attributes each by default (PJMEDIA_MAX_SDP_MEDIA, PJMEDIA_MAX_SDP_ATTR).
MAX_SDP_LINES: Final = 512

# One line's content. The longest lines seen are a=fingerprint with SHA-512 (~200
# octets), a=crypto with MKI and lifetime (~110), H.264/H.265 a=fmtp with
# parameter sets (~300); 4 KiB is ten times that. Lines are only read by C code
# (patterns, splits), so this bounds what one line can hold rather than CPU.
MAX_SDP_LINE_LENGTH: Final = 4096

# m= lines per SDP. Each enabled m= line is a request for two port pairs from the
# relay's range (one per side; 10000-20000 by default: 5,000 pairs), so a peer must
# not be able to ask for many with one message: 16 (pjmedia's default) let one
# INVITE hold 32 pairs. A phone sends 1-3 (audio, video, a T.38 or T.140 stream);
# a room system 5 (audio, main video, slides video with RFC 4796 a=content, BFCP,
# far-end camera control). Over it the body is refused.
MAX_MEDIA_STREAMS: Final = 6

# a= lines at one level (session level, or one m= section). pjmedia holds 68 by
# default (PJMEDIA_MAX_SDP_ATTR = 2 * PJMEDIA_MAX_SDP_FMT + 4); Asterisk builds it
# with 132 because WebRTC offers with many codecs and their rtcp-fb lines need
# it. A SIP phone's audio section has 5-20.
MAX_SDP_ATTRIBUTES: Final = 128

# a=candidate lines per body (RFC 8839 §5.1). They are removed, never forwarded
# (see ICE_ATTRIBUTES), so this only bounds the work: pjnath keeps 16 candidates
# per session by default (PJ_ICE_MAX_CAND), Asterisk builds it with 32 for
# WebRTC; 64 is twice that.
MAX_ICE_CANDIDATES: Final = 64

# Lines that carry an address (c=, and a=rtcp with one), per body. Each address is
# checked with the ipaddress module, the costliest step of a scan (~3-8 µs each,
# ten times a plain line). A body needs one c= per level and one a=rtcp per m=
# section (RFC 3605): 13 with MAX_MEDIA_STREAMS. Several c= in one section are
# for layered multicast only (RFC 8866 §5.7), not SIP telephony. No precedent
# found (pjmedia keeps one c= per level). 32 leaves room.
MAX_SDP_ADDRESSES: Final = 32

# The "/<number of ports>" of an m= line (RFC 8866 §5.14, hierarchically layered
# coding). rewrite_sdp keeps it, so the relay must then serve that many port pairs
# for the stream (see rewrite_sdp). Layered coding over several ports is not seen
# in SIP calls (scalable codecs signal their layers inside one RTP session); 4
# keeps the worst case of one SDP at MAX_MEDIA_STREAMS * 4 = 24 pairs (the media
# layer rejects such streams outright today).
MAX_PORT_COUNT: Final = 4

# The work budget: Python line events in this module that anchoring one body
# (anchor_sdp: scan and rewrite) may cost, whatever it holds. Both passes step
# once per line, at most MAX_SDP_LINES of them; what a line holds is read by C
# code (patterns, splits), and the one costly step per line, an address, is
# capped by MAX_SDP_ADDRESSES. tests/test_sdp.py searches for the costliest
# bodies with hypothesis and holds them under this: the worst found ~16,000
# (500 lines of b=), ~0.5 ms of CPU here; SIPp's offer costs ~400.
WORK_PER_BODY: Final = 30_000

# What rewrite_sdp takes for a stream without ports: a disabled stream (port 0 in
# the body), or one the relay rejects.
NO_PORTS: Final[tuple[int, None]] = (0, None)

# ICE attributes (RFC 8839 §5: candidate, remote-candidates, ice-lite,
# ice-mismatch, ice-ufrag, ice-pwd, ice-pacing, ice-options; RFC 8840:
# end-of-candidates). Candidates name the peer's own addresses (host, server
# reflexive, relayed), which must not reach the far end: it would run ICE checks
# (RFC 8445) to them and send media around the relay. The ufrag/pwd belong to
# checks the relay does not answer. With all of them gone each end sees a peer
# that does not do ICE and sends to the c=/m= address, which is the relay.
ICE_ATTRIBUTES: Final = frozenset({
    b"candidate", b"remote-candidates", b"end-of-candidates", b"ice-ufrag", b"ice-pwd",
    b"ice-options", b"ice-lite", b"ice-mismatch", b"ice-pacing",
})

# RFC 8866 §6.7, RFC 3264 §5.1: a stream's direction, media level over session
# level, sendrecv when neither says.
DIRECTIONS: Final = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})

Direction = Literal["sendrecv", "sendonly", "recvonly", "inactive"]


class SdpError(Exception):
    """A body that is not SDP the relay can anchor (see the module docstring)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SdpLimitExceeded(SdpError):
    """A body over one of the limits above; ``limit`` is the constant's name."""

    def __init__(self, limit: str, reason: str) -> None:
        super().__init__(reason)
        self.limit = limit


# -- model ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaStream:
    """One m= section, with session-level defaults applied."""

    index: int               # position among the m= lines, from 0
    kind: str                # audio, video, image (T.38), application, text, …
    port: int                # 0: disabled or rejected (RFC 3264 §5.1, §6)
    port_count: int          # the "/2" of "m=audio 49170/2", else 1
    proto: str               # RTP/AVP, RTP/SAVP, UDP/TLS/RTP/SAVPF, udptl, …
    fmts: tuple[str, ...]    # payload types / formats, as written
    conn: str | None         # media-level c= address, else session-level; None if neither
    family: str | None       # "IP4" or "IP6", of that c=
    rtcp_port: int | None    # a=rtcp (RFC 3605), None when absent
    rtcp_addr: str | None    # the address in a=rtcp, when it gives one
    rtcp_mux: bool           # a=rtcp-mux (RFC 5761 §5.1.1)
    direction: Direction
    held: bool               # sendonly/inactive, or c= 0.0.0.0 / :: (RFC 3264 §8.4)
    crypto: bool             # a=crypto (SDES, RFC 4568), informational
    fingerprint: bool        # a=fingerprint (DTLS-SRTP, RFC 8122 / 5763), informational
    zrtp: bool               # a=zrtp-hash (RFC 6189 §8.1), informational

    @property
    def disabled(self) -> bool:
        """Port 0: a disabled or rejected stream, which takes no port."""
        return self.port == 0


@dataclass(frozen=True, slots=True)
class Sdp:
    """What the relay reads of a body: the session-level c= and each m= section."""

    session_conn: str | None   # address of the session-level c=, if any
    media: list[MediaStream]


# -- parsing ------------------------------------------------------------------------------

# RFC 8866 §9: token-char = %x21 / %x23-27 / %x2A-2B / %x2D-2E / %x30-39 / %x41-5A / %x5E-7E
_TOKEN = rb"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
# RFC 8866 §5.14: m=<media> <port>[/<number of ports>] <proto> <fmt> ...
# (proto = token *("/" token)). Runs of spaces are tolerated; only the port is
# ever rewritten, in place. Fewer than one fmt is tolerated too: we never use them.
_M_LINE = re.compile(
    rb"m=(?P<kind>" + _TOKEN + rb") +(?P<port>[0-9]{1,5})(?:/(?P<count>[0-9]{1,5}))?"
    rb" +(?P<proto>" + _TOKEN + rb"(?:/" + _TOKEN + rb")*)(?P<fmts>(?: +[!-~]+)*) *"
)
# RFC 8866 §5.7: c=<nettype> <addrtype> <connection-address>
_C_LINE = re.compile(rb"c=(?P<net>[!-~]+) +(?P<type>[!-~]+) +(?P<addr>[!-~]+) *")
# RFC 3605 §2.1: "a=rtcp:" port [nettype space addrtype space connection-address]
_RTCP = re.compile(
    rb"a=rtcp:(?P<port>[0-9]{1,5})(?: +(?P<net>[!-~]+) +(?P<type>[!-~]+) +(?P<addr>[!-~]+))? *"
)
# RFC 8866 §9 allows an FQDN where an address goes (unicast-address = ... / FQDN).
_FQDN = re.compile(
    rb"(?=[0-9.-]*[A-Za-z])(?=.{1,253}\Z)"
    rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)

_Role = Literal["keep", "conn", "media", "rtcp", "drop"]


@dataclass(frozen=True, slots=True)
class _Conn:
    family: str        # "IP4" / "IP6"
    address: str
    unspecified: bool  # 0.0.0.0 or :: — old-style hold, RFC 3264 §8.4


@dataclass(slots=True)
class _Section:
    """Where one m= section's lines are, for the rewrite."""

    m_line: int
    port_span: tuple[int, int]       # of the port digits inside the m= line
    eol: bytes                       # line ending to give a line we add
    insert_at: int = -1              # where an added a=rtcp goes (line index)
    has_rtcp: bool = False


@dataclass(slots=True)
class _Layout:
    lines: list[tuple[bytes, bytes]]             # (content, line ending) per line
    roles: list[_Role]
    conns: dict[int, _Conn]                      # line index of a c= / a=rtcp → its address
    rtcp_tails: dict[int, bytes]                 # line index of an a=rtcp → what follows the port
    sections: list[_Section]
    sdp: Sdp


def _split_lines(body: bytes) -> list[tuple[bytes, bytes]]:
    """(content, ending) per line; each line keeps its own ending: CRLF, LF or none (last).

    RFC 8866 §5: lines end in CRLF, and parsers "SHOULD be tolerant and also accept
    lines terminated with a single newline character". A CR anywhere else, or a NUL,
    is refused (§9: text fields exclude NUL, CR and LF): a peer that reads a bare CR
    as a line break would see lines we did not. MAX_SDP_LINES and
    MAX_SDP_LINE_LENGTH are checked as the lines are met.
    """
    lines: list[tuple[bytes, bytes]] = []
    pos, end = 0, len(body)
    while pos < end:
        if len(lines) == MAX_SDP_LINES:
            raise SdpLimitExceeded("MAX_SDP_LINES", f"more than {MAX_SDP_LINES} lines")
        nl = body.find(b"\n", pos)
        if nl < 0:
            content, eol, pos = body[pos:], b"", end
        elif nl > pos and body[nl - 1] == 0x0D:
            content, eol, pos = body[pos:nl - 1], b"\r\n", nl + 1
        else:
            content, eol, pos = body[pos:nl], b"\n", nl + 1
        if len(content) > MAX_SDP_LINE_LENGTH:
            raise SdpLimitExceeded("MAX_SDP_LINE_LENGTH",
                                   f"line {len(lines) + 1} longer than {MAX_SDP_LINE_LENGTH} octets")
        if b"\r" in content or b"\x00" in content:
            raise SdpError(f"line {len(lines) + 1}: bare CR or NUL")
        lines.append((content, eol))
    return lines


def _port(digits: bytes, what: str) -> int:
    port = int(digits)   # digits are [0-9]{1,5}: no sign, no underscore, no overflow
    if port > 65535:
        raise SdpError(f"{what}: port {port} out of range")
    return port


def _address(net: bytes, addrtype: bytes, raw: bytes, what: str) -> _Conn:
    """<nettype> <addrtype> <connection-address> of c= (RFC 8866 §5.7) or a=rtcp (RFC 3605)."""
    if net != b"IN":   # RFC 8866 §5.7: IN is the only network type defined
        raise SdpError(f"{what}: network type {net!r}")
    if addrtype not in (b"IP4", b"IP6"):
        raise SdpError(f"{what}: address type {addrtype!r}")
    family = addrtype.decode()
    # RFC 8866 §5.7: a multicast address carries /<ttl>[/<number>] (IP4) or
    # /<number> (IP6); the address is what comes before.
    host = raw.split(b"/", 1)[0]
    text = host.decode("ascii")   # the line patterns admit only %x21-7E here
    ip = _ip_facts(text)
    if ip is None:
        if _FQDN.fullmatch(host) is None:
            raise SdpError(f"{what}: bad address {raw!r}")
        return _Conn(family, text, unspecified=False)
    version, scoped, unspecified = ip
    if scoped:
        raise SdpError(f"{what}: scoped address {raw!r}")
    if (version == 4) != (family == "IP4"):
        raise SdpError(f"{what}: {text} is not an {family} address")
    return _Conn(family, text, unspecified=unspecified)


# The same few addresses (a PBX's, an office NAT's) come back in every call's SDP, and
# ipaddress takes ~4 µs to read one: remembered, bounded (least recently used go).
@functools.lru_cache(maxsize=4096)
def _ip_facts(text: str) -> tuple[int, bool, bool] | None:
    """(IP version, has an IPv6 scope, is 0.0.0.0 / ::) of an IP literal; None if not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    scoped = isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None
    return ip.version, scoped, ip.is_unspecified


def _attribute_name(content: bytes) -> bytes:
    """RFC 8866 §5.13: a=<attribute-name>[:<attribute-value>]."""
    return content[2:].split(b":", 1)[0].rstrip(b" ")


@dataclass(slots=True)
class _Level:
    """What one level (the session, or one m= section) says, as its lines are read."""

    conn: _Conn | None = None            # its c= (the last one, when it repeats)
    direction: Direction | None = None   # its direction attribute (the last one)
    flags: set[bytes] = field(default_factory=set)   # its attribute names
    attributes: int = 0                  # its a= lines, for MAX_SDP_ATTRIBUTES


@dataclass(slots=True)
class _Media:
    """One m= section while it is read."""

    fields: re.Match[bytes]              # its m= line
    section: _Section
    level: _Level = field(default_factory=_Level)
    rtcp_port: int | None = None         # the first a=rtcp
    rtcp_conn: _Conn | None = None       # the address that a=rtcp gave, if any
    last_field: int = 0                  # last line of the section that stays
    first_attr: int | None = None        # first a= line of the section that stays


class _Scanner:
    """One pass over the lines of a body: a role per line, and what each level says."""

    def __init__(self, lines: list[tuple[bytes, bytes]]) -> None:
        self.lines = lines
        self.roles: list[_Role] = []
        self.conns: dict[int, _Conn] = {}        # line index of a c= / a=rtcp → its address
        self.rtcp_tails: dict[int, bytes] = {}   # line index of an a=rtcp → what follows the port
        self.session = _Level()
        self.media: list[_Media] = []
        self.candidates = 0
        self.addresses = 0

    def scan(self) -> _Layout:
        """The layout of the whole body (roles, addresses, sections) and what it says."""
        # RFC 8866 §5: a description begins with "v=" (§5.1: version 0).
        if not self.lines or self.lines[0][0] != b"v=0":
            raise SdpError("does not begin with v=0")
        for i, (content, _eol) in enumerate(self.lines):
            self.roles.append(self._line(i, content))
        if not self.media:
            raise SdpError("no m= line")
        sdp = Sdp(
            session_conn=self.session.conn.address if self.session.conn else None,
            media=[self._stream(n, media) for n, media in enumerate(self.media)],
        )
        sections = [media.section for media in self.media]
        return _Layout(self.lines, self.roles, self.conns, self.rtcp_tails, sections, sdp)

    def _line(self, i: int, content: bytes) -> _Role:
        if i > 0 and content == b"":
            # Empty lines are not SDP, but a trailing one is common; kept as they are.
            return "keep"
        # RFC 8866 §5: <type>=<value>, type one case-significant letter. Every type
        # is lower case; an upper-case one is refused because an endpoint that
        # reads "C=" as "c=" would learn an address we did not rewrite.
        kind, sep = content[:1], content[1:2]
        if sep != b"=" or not (b"a" <= kind <= b"z"):
            raise SdpError(f"line {i + 1}: not <type>=<value>")
        if kind == b"v" and i > 0:
            raise SdpError(f"line {i + 1}: a second v= (one session per body)")
        if kind == b"m":
            return self._media_line(i, content)
        media = self.media[-1] if self.media else None
        level = media.level if media else self.session
        role: _Role = "keep"
        if kind == b"c":
            role = self._conn_line(i, content, level)
        elif kind == b"a":
            role = self._attribute(i, content, media, level)
        if media is not None and role != "drop":
            media.last_field = i
            if kind == b"a" and media.first_attr is None:
                media.first_attr = i
        return role

    def _media_line(self, i: int, content: bytes) -> _Role:
        if len(self.media) == MAX_MEDIA_STREAMS:
            raise SdpLimitExceeded("MAX_MEDIA_STREAMS", f"more than {MAX_MEDIA_STREAMS} m= lines")
        m = _M_LINE.fullmatch(content)
        if m is None:
            raise SdpError(f"line {i + 1}: bad m= line")
        _port(m["port"], f"line {i + 1}: m=")
        count = 1 if m["count"] is None else int(m["count"])
        if not 1 <= count <= MAX_PORT_COUNT:
            raise SdpError(f"line {i + 1}: m= port count {count} outside 1..{MAX_PORT_COUNT}")
        self.media.append(_Media(m, _Section(i, m.span("port"), b""), last_field=i))
        return "media"

    def _conn_line(self, i: int, content: bytes, level: _Level) -> _Role:
        c = _C_LINE.fullmatch(content)
        if c is None:
            raise SdpError(f"line {i + 1}: bad c= line")
        # RFC 8866 §5.7: one c= per level; a second one at the same level is
        # rewritten like the first, and the last one read is what we report.
        level.conn = self.conns[i] = self._address(c, f"line {i + 1}: c=")
        return "conn"

    def _address(self, line: re.Match[bytes], what: str) -> _Conn:
        """The address of a c= or a=rtcp line: counted (MAX_SDP_ADDRESSES), then read."""
        self.addresses += 1
        if self.addresses > MAX_SDP_ADDRESSES:
            raise SdpLimitExceeded("MAX_SDP_ADDRESSES", f"{what}: more than {MAX_SDP_ADDRESSES} addresses")
        return _address(line["net"], line["type"], line["addr"], what)

    def _attribute(self, i: int, content: bytes, media: _Media | None, level: _Level) -> _Role:
        level.attributes += 1
        if level.attributes > MAX_SDP_ATTRIBUTES:
            raise SdpLimitExceeded("MAX_SDP_ATTRIBUTES",
                                   f"line {i + 1}: more than {MAX_SDP_ATTRIBUTES} a= lines at one level")
        name = _attribute_name(content)
        if name in ICE_ATTRIBUTES:
            if name == b"candidate":
                self.candidates += 1
                if self.candidates > MAX_ICE_CANDIDATES:
                    raise SdpLimitExceeded("MAX_ICE_CANDIDATES",
                                           f"more than {MAX_ICE_CANDIDATES} ICE candidates")
            return "drop"
        if name == b"rtcp":
            # RFC 3605 §2.1 defines a=rtcp at media level only. At session level
            # it means nothing and may carry the peer's address: dropped.
            return "drop" if media is None else self._rtcp(i, content, media)
        value = name.decode("latin-1")
        if value in DIRECTIONS and content[2:].rstrip(b" ") == name:
            # last one wins when a level (wrongly) repeats a direction
            level.direction = value  # type: ignore[assignment]
        level.flags.add(name)
        return "keep"

    def _rtcp(self, i: int, content: bytes, media: _Media) -> _Role:
        r = _RTCP.fullmatch(content)
        if r is None:
            raise SdpError(f"line {i + 1}: bad a=rtcp")
        rport = _port(r["port"], f"line {i + 1}: a=rtcp")
        if r["net"] is not None:
            self.conns[i] = self._address(r, f"line {i + 1}: a=rtcp")
            self.rtcp_tails[i] = content[r.end("port"):]
        # Several a=rtcp in one section are all rewritten alike; the first is the
        # one reported.
        if media.rtcp_port is None:
            media.rtcp_port = rport
            media.rtcp_conn = self.conns.get(i)
        media.section.has_rtcp = True
        return "rtcp"

    def _stream(self, n: int, media: _Media) -> MediaStream:
        """The n-th m= section with the session-level defaults applied."""
        m, section, level = media.fields, media.section, media.level
        effective = level.conn or self.session.conn
        port = int(m["port"])
        if effective is None and port != 0:
            # RFC 8866 §5.7: a c= in each media description or one at session level
            raise SdpError(f"m= line {n}: no c= for an enabled stream")
        # An a=rtcp we add goes first among the attributes (RFC 8866 §5: a= lines
        # come last in a section), or after the section's last line if it has none.
        section.insert_at = media.first_attr if media.first_attr is not None else media.last_field + 1
        section.eol = self.lines[section.m_line][1] or next((e for _, e in self.lines if e), b"\r\n")
        flags = level.flags | self.session.flags
        direction = level.direction or self.session.direction or "sendrecv"
        rtcp_conn = media.rtcp_conn
        return MediaStream(
            index=n,
            kind=m["kind"].decode("ascii"),
            port=port,
            port_count=1 if m["count"] is None else int(m["count"]),
            proto=m["proto"].decode("ascii"),
            fmts=tuple(f.decode("ascii") for f in m["fmts"].split()),
            conn=effective.address if effective else None,
            family=effective.family if effective else None,
            rtcp_port=media.rtcp_port,
            rtcp_addr=rtcp_conn.address if rtcp_conn else None,
            rtcp_mux=b"rtcp-mux" in level.flags,   # RFC 5761 §5.1.1: media level
            direction=direction,
            held=direction in ("sendonly", "inactive") or (effective is not None and effective.unspecified),
            crypto=b"crypto" in flags,
            fingerprint=b"fingerprint" in flags,
            zrtp=b"zrtp-hash" in flags,
        )


def _scan(body: bytes) -> _Layout:
    if len(body) > MAX_SDP_SIZE:
        raise SdpLimitExceeded("MAX_SDP_SIZE", f"SDP larger than {MAX_SDP_SIZE} octets")
    return _Scanner(_split_lines(body)).scan()


def parse_sdp(body: bytes) -> Sdp:
    """What the relay needs from an SDP body. Raises SdpError (see the module docstring)."""
    return _scan(body).sdp


# -- rewriting ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # the relay's own few addresses, read for every SDP
def _relay_family(address: str) -> bytes:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"relay address {address!r} is not an IP address") from None
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None):
        raise ValueError(f"relay address {address!r} cannot be sent to")
    return b"IP4" if ip.version == 4 else b"IP6"


def _check_ports(sdp: Sdp, ports: Sequence[tuple[int, int | None]]) -> None:
    if len(ports) != len(sdp.media):
        raise ValueError(f"{len(ports)} port allocations for {len(sdp.media)} m= lines")
    for stream, (rtp, rtcp) in zip(sdp.media, ports, strict=True):
        if rtp == 0:
            if rtcp is not None:
                raise ValueError(f"m= line {stream.index}: RTCP port without an RTP port")
            continue
        if stream.disabled:
            # RFC 3264 §5.1/§6: port 0 is a disabled or rejected stream and stays 0;
            # an allocation for it would never be used nor freed by the caller.
            raise ValueError(f"m= line {stream.index} is disabled (port 0) but got ports")
        for p in (rtp, rtcp):
            if p is not None and not 1 <= p <= 65535:
                raise ValueError(f"m= line {stream.index}: port {p} out of range")


def rewrite_sdp(body: bytes, address: str, ports: Sequence[tuple[int, int | None]]) -> bytes:
    """The body with the relay's ``address`` and ``ports`` in place of the peer's.

    ``ports[i]`` is ``(rtp_port, rtcp_port)`` for the i-th m= line, ``rtcp_port``
    None when RTCP is multiplexed on the RTP port (RFC 5761). A stream with port 0
    in the body is disabled (RFC 3264 §5.1, §6) and takes ``NO_PORTS`` = (0, None);
    passing NO_PORTS for an enabled stream rejects it (its port becomes 0).

    - every ``c=`` (session and media level) names ``address``, IN IP4 or IN IP6
      by its family, except ``c=... 0.0.0.0`` / ``::``: old-style hold (RFC 3264
      §8.4), which stays, so the peer still sends nothing;
    - every ``m=`` port becomes ``rtp_port`` — only the port digits change, so a
      "/<number of ports>" stays: the relay then has to serve that many pairs,
      ports rtp_port + 2k (RFC 8866 §5.14), or reject the stream with NO_PORTS;
    - ``a=rtcp:<port> [IN IP4 <addr>]`` gets the RTCP port (the RTP port under
      rtcp-mux, RFC 8858 §4.2) and ``address`` if it gave one; one is added when
      the RTCP port is not RTP + 1, the default it would otherwise imply (RFC 3605
      §2.1); in a disabled stream it is removed;
    - ICE attributes (``ICE_ATTRIBUTES``) are removed at both levels;
    - every other line, its order and its line ending stay byte for byte; so does
      the ending (or its absence) of the body's last line.
    """
    return _rewrite(_scan(body), address, ports)


def anchor_sdp(
    body: bytes, address: str, choose_ports: Callable[[Sdp], Sequence[tuple[int, int | None]]],
) -> bytes:
    """``parse_sdp`` and ``rewrite_sdp`` with one reading of the body: ``choose_ports``
    gets what was parsed and returns the ports for ``rewrite_sdp`` (the relay's
    per-call path; an SDP is scanned once, not twice). Raises SdpError."""
    layout = _scan(body)
    return _rewrite(layout, address, choose_ports(layout.sdp))


def _rewrite(layout: _Layout, address: str, ports: Sequence[tuple[int, int | None]]) -> bytes:
    family = _relay_family(address)
    _check_ports(layout.sdp, ports)
    relay_conn = b"IN " + family + b" " + address.encode("ascii")

    inserts: dict[int, list[tuple[bytes, bytes]]] = {}
    for n, section in enumerate(layout.sections):
        rtp, rtcp = ports[n]
        if rtp and rtcp is not None and rtcp != rtp + 1 and not section.has_rtcp:
            inserts.setdefault(section.insert_at, []).append((b"a=rtcp:%d" % rtcp, section.eol))

    out: list[tuple[bytes, bytes]] = []
    n = -1
    for i, ((content, eol), role) in enumerate(zip(layout.lines, layout.roles, strict=True)):
        out.extend(inserts.get(i, ()))
        if role == "keep":
            out.append((content, eol))
        elif role == "media":
            n += 1
            start, stop = layout.sections[n].port_span
            out.append((content[:start] + b"%d" % ports[n][0] + content[stop:], eol))
        elif role == "conn":
            if layout.conns[i].unspecified:
                out.append((content, eol))
            else:
                out.append((b"c=" + relay_conn, eol))
        elif role == "rtcp":
            rtp, rtcp = ports[n]
            if rtp == 0:
                continue
            line = b"a=rtcp:%d" % (rtp if rtcp is None else rtcp)
            given = layout.conns.get(i)
            if given is not None:
                if given.unspecified:
                    line += layout.rtcp_tails[i]
                else:
                    line += b" " + relay_conn
            out.append((line, eol))
        # role == "drop": ICE, or a session-level a=rtcp
    out.extend(inserts.get(len(layout.lines), ()))

    # out is never empty: the v= line is always kept.
    # A line we added after the body's last line, or a last line we dropped, must
    # not change whether the body ends with a line ending.
    last_eol = layout.lines[-1][1]
    fill = layout.sections[0].eol
    joined = [c + (e or fill) for c, e in out[:-1]]
    tail_content, tail_eol = out[-1]
    joined.append(tail_content + (last_eol and (tail_eol or last_eol)))
    return b"".join(joined)
