"""Shared helpers for driving the sans-I/O proxy core with raw SIP bytes.

Not a conftest: plain functions and one class, imported by the proxy/PBX tests.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pbxcore.wire import WakeOutcome
from relay.media.session import MediaSessions
from relay.pbx.digest import ALGORITHMS, DigestAuth, ha1
from relay.proxy.core import Proxy, ProxyConfig
from relay.proxy.effects import Effect, Send
from relay.proxy.flow import Flow
from relay.sip import Request, Response, SipMessage, SipUri, parse_message
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr

DOMAIN = "relay.test"
ADVERTISE = "198.51.100.10"
PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
KEY = b"k" * 32
SERIAL = "0123456789"
SECRET = "s3cret-pbx"
OTHER_SERIAL = "9876543210"  # in the directory, never registered
PBX_DOMAIN = f"{SERIAL}.{DOMAIN}"

# Our sockets and the peers' NATed addresses (documentation ranges only).
PBX_TCP = Flow("tcp", "203.0.113.7", 41000, ADVERTISE, 5060)
PBX_TCP2 = Flow("tcp", "203.0.113.8", 42000, ADVERTISE, 5060)
# A second connection of the PBX at PBX_TCP's address (new source port: a
# second flow, or the same PBX after its NAT rebound the mapping).
PBX_TCP_B = Flow("tcp", "203.0.113.7", 41002, ADVERTISE, 5060)
PBX_UDP = Flow("udp", "203.0.113.7", 41001, ADVERTISE, 5060)
PHONE_UDP = Flow("udp", "192.0.2.20", 40001, ADVERTISE, 5060)
PHONE_TCP = Flow("tcp", "192.0.2.21", 50001, ADVERTISE, 5060)
PHONE_MOVED = Flow("udp", "192.0.2.120", 40120, ADVERTISE, 5060)  # PHONE_UDP on another network
STRANGER = Flow("udp", "192.0.2.99", 5060, ADVERTISE, 5060)

CRLF = "\r\n"
_counter = itertools.count(1)


def directory_entry(serial: str, secret: str) -> dict[str, str]:
    return {a: ha1(a, serial, DOMAIN, secret) for a in ("MD5", "SHA-256")}


class RecordingProxy(Proxy):
    """The proxy, with every effect that is not a Send kept for the test to read
    (:meth:`take_effects`), and the TCP/TLS flows a test sends from opened for it
    the first time they appear, as the transport would."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.other: list[Effect] = []
        self.seen: set[Flow] = set()

    def keep(self, effects: Iterable[Effect]) -> list[Effect]:
        effects = list(effects)
        self.other += [e for e in effects if not isinstance(e, Send)]
        return effects

    def take_effects(self) -> list[Effect]:
        out, self.other = self.other, []
        return out

    def on_message(self, msg: SipMessage, source: Flow, now: float) -> list[Effect]:
        if source not in self.seen:
            self.seen.add(source)
            self.on_flow_opened(source)
        return self.keep(super().on_message(msg, source, now))

    def on_parse_error(self, err: SipParseError, source: Flow) -> list[Effect]:
        return self.keep(super().on_parse_error(err, source))

    def on_timer(self, now: float) -> list[Effect]:
        return self.keep(super().on_timer(now))

    def on_wake_result(self, key: tuple[str, ...], outcome: WakeOutcome, now: float) -> list[Effect]:
        return self.keep(super().on_wake_result(key, outcome, now))


class DeadFlows:
    """Flows the test kills: the transport reports each one closed."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def add(self, flow: Flow) -> None:
        self.proxy.on_flow_closed(flow)


def make_proxy(media: MediaSessions | None = None, **config: object) -> tuple[RecordingProxy, DeadFlows]:
    """A proxy over the test directory, and the means to kill its flows."""
    directory = {
        SERIAL: directory_entry(SERIAL, SECRET),
        OTHER_SERIAL: directory_entry(OTHER_SERIAL, "other"),
    }
    cfg = ProxyConfig(domain=DOMAIN, advertise=ADVERTISE, ports=dict(PORTS), **config)  # type: ignore[arg-type]
    auth = DigestAuth(KEY, DOMAIN, ("SHA-256", "MD5"))
    proxy = RecordingProxy(cfg, KEY, auth, media)
    proxy.on_directory(directory)
    return proxy, DeadFlows(proxy)


def uniq(prefix: str) -> str:
    return f"{prefix}{next(_counter)}"


def request(
    method: str,
    uri: str,
    *,
    flow: Flow,
    via_host: str = "10.0.0.1",
    via_port: int | None = 5060,
    branch: str | None = None,
    rport: bool = True,
    from_uri: str = f"sip:200@{PBX_DOMAIN}",
    from_tag: str = "ftag1",
    to_uri: str = f"sip:201@{PBX_DOMAIN}",
    to_tag: str | None = None,
    call_id: str | None = None,
    cseq: int = 1,
    max_forwards: int | None = 70,
    headers: list[str] | None = None,
    body: str = "",
) -> bytes:
    """A request as a UA behind NAT would send it (private Via sent-by)."""
    branch = branch or uniq("z9hG4bKua")
    sent_by = via_host if via_port is None else f"{via_host}:{via_port}"
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{flow.transport.upper()} {sent_by};branch={branch}" + (";rport" if rport else ""),
    ]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines += [
        f"From: <{from_uri}>;tag={from_tag}",
        f"To: <{to_uri}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id or uniq('call-')}@test",
        f"CSeq: {cseq} {method}",
    ]
    lines += headers or []
    lines.append(f"Content-Length: {len(body.encode())}")
    return (CRLF.join(lines) + CRLF + CRLF + body).encode()


def response_to(
    forwarded: bytes, status: int, reason: str, *, to_tag: str | None = "uas1",
    headers: list[str] | None = None,
) -> bytes:
    """What a UAS answers to a request it received (all Vias copied, RFC 3261 §8.2.6)."""
    req = parse_message(forwarded)
    assert isinstance(req, Request)
    lines = [f"SIP/2.0 {status} {reason}"]
    for h in req.headers:
        if h.name in ("via", "record-route", "from", "call-id", "cseq"):
            lines.append(f"{h.raw_name}: {h.value}")
        elif h.name == "to":
            tag = f";tag={to_tag}" if to_tag and status > 100 and "tag=" not in h.value else ""
            lines.append(f"To: {h.value}{tag}")
    lines += headers or []
    lines.append("Content-Length: 0")
    return (CRLF.join(lines) + CRLF + CRLF).encode()


@dataclass
class Out:
    """One message the proxy sent, parsed back."""

    flow: Flow
    data: bytes
    msg: SipMessage = field(init=False)

    def __post_init__(self) -> None:
        self.msg = parse_message(self.data, datagram=self.flow.transport == "udp")

    @property
    def status(self) -> int:
        assert isinstance(self.msg, Response), self.msg
        return self.msg.status

    @property
    def req(self) -> Request:
        assert isinstance(self.msg, Request), self.msg
        return self.msg

    @property
    def resp(self) -> Response:
        assert isinstance(self.msg, Response), self.msg
        return self.msg


def outs(effects: Iterable[Effect]) -> list[Out]:
    """The messages among ``effects``, parsed back."""
    return [Out(s.flow, s.data) for s in effects if isinstance(s, Send)]


def feed(proxy: Proxy, data: bytes, flow: Flow, now: float = 0.0) -> list[Out]:
    msg = parse_message(data, datagram=flow.transport == "udp")
    return outs(proxy.on_message(msg, flow, now))


def one(result: list[Out]) -> Out:
    assert len(result) == 1, [(o.flow, o.data[:40]) for o in result]
    return result[0]


# ---------------------------------------------------------------- digest


def challenges(msg: SipMessage) -> list[str]:
    """WWW-Authenticate values, one per header line (they contain commas)."""
    return [h.value for h in msg.iter_headers("www-authenticate")]


def challenge_params(value: str) -> dict[str, str]:
    assert value.startswith("Digest "), value
    return {k.lower(): v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', value[7:])}


def authorization(
    challenge: str, *, username: str = SERIAL, secret: str = SECRET, method: str = "REGISTER",
    uri: str = f"sip:{DOMAIN}", cnonce: str = "0a4f113b", nc: str = "00000001",
) -> str:
    """The Authorization value a PBX computes for one WWW-Authenticate (RFC 7616 §3.4.1)."""
    p = challenge_params(challenge)
    algorithm = p["algorithm"]
    h = ALGORITHMS[algorithm]
    a1 = h(f"{username}:{p['realm']}:{secret}".encode()).hexdigest()
    a2 = h(f"{method}:{uri}".encode()).hexdigest()
    response = h(f"{a1}:{p['nonce']}:{nc}:{cnonce}:auth:{a2}".encode()).hexdigest()
    return (
        f'Digest username="{username}", realm="{p["realm"]}", nonce="{p["nonce"]}", '
        f'uri="{uri}", response="{response}", algorithm={algorithm}, cnonce="{cnonce}", '
        f"qop=auth, nc={nc}"
    )


def pbx_register(
    serial: str = SERIAL, *, flow: Flow = PBX_TCP, expires: int | None = 3600,
    auth: str | None = None, contact: str | None = None, headers: list[str] | None = None,
    call_id: str = "pbx-reg", cseq: int = 1,
) -> bytes:
    hs = []
    if contact is None:
        contact = f"<sip:{serial}@10.1.1.1:5060;transport={flow.transport}>"
    if contact:
        hs.append(f"Contact: {contact}")
    if expires is not None:
        hs.append(f"Expires: {expires}")
    if auth:
        hs.append(f"Authorization: {auth}")
    hs += headers or []
    aor = f"sip:{serial}@{DOMAIN}"
    return request(
        "REGISTER", aor, flow=flow, via_host="10.1.1.1", from_uri=aor, to_uri=aor,
        from_tag="pbxtag", call_id=call_id, cseq=cseq, headers=hs,
    )


def register_pbx(
    proxy: Proxy, flow: Flow = PBX_TCP, now: float = 0.0, serial: str = SERIAL,
    secret: str = SECRET, algorithm: str = "MD5", expires: int = 3600,
) -> Out:
    """Challenge, answer, 200: the PBX is bound to ``flow``."""
    first = one(feed(proxy, pbx_register(serial, flow=flow, expires=expires), flow, now))
    assert first.status == 401
    challenge = next(
        c for c in challenges(first.msg) if f"algorithm={algorithm}" in c
    )
    auth = authorization(challenge, username=serial, secret=secret)
    ok = one(feed(proxy, pbx_register(serial, flow=flow, expires=expires, auth=auth, cseq=2), flow, now))
    assert ok.status == 200, ok.data
    return ok


def route_user(value: str) -> str:
    """The user part (our token) of a Route/Record-Route/Path value."""
    user = SipUri.parse(NameAddr.parse(value).uri).user
    assert user
    return user

