"""A SIP peer in plain sockets for the tests: messages as bytes, digest, a PBX over TCP."""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import time
from dataclasses import dataclass, field

from tests.realpeers import DOMAIN, RelayProc

SERIAL = "0123456789"
OTHER = "9876543210"  # a second PBX in the directory, never registered unless a test says so
HOST = "127.0.0.1"
QUIET = 0.3  # seconds of silence that count as "nothing more is coming" on a socket


# ------------------------------------------------------------ SIP as bytes
@dataclass
class Msg:
    """A SIP message as the test sees it: start line, headers (lower-case names), body."""

    start: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""

    @property
    def status(self) -> int | None:
        parts = self.start.split(" ", 2)
        if parts[0].upper() == "SIP/2.0" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1])
        return None

    def get(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


def parse(raw: bytes) -> Msg:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    msg = Msg(lines[0], body=body, raw=raw)
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and msg.headers:
            n, v = msg.headers[-1]
            msg.headers[-1] = (n, v + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        msg.headers.append((name.strip().lower(), value.strip()))
    return msg


def rand(n: int = 8) -> str:
    return os.urandom(n).hex()


def request(
    method: str, uri: str, *, transport: str = "UDP", local: tuple[str, int] = (HOST, 5060),
    to: str | None = None, from_: str | None = None, cseq: int = 1, call_id: str | None = None,
    branch: str | None = None, extra: list[str] | None = None, body: bytes = b"",
) -> bytes:
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};branch={branch or 'z9hG4bK' + rand()};rport",
        "Max-Forwards: 70",
        f"From: {from_ or f'<sip:tester@{DOMAIN}>'};tag={rand(4)}",
        f"To: {to or f'<{uri}>'}",
        f"Call-ID: {call_id or rand()}@test",
        f"CSeq: {cseq} {method}",
        *(extra or []),
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --------------------------------------------------------------------- UDP
def udp_socket(host: str = HOST) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def drain(sock: socket.socket, quiet: float = QUIET) -> list[bytes]:
    """Everything that arrives until the socket has been quiet for ``quiet`` seconds."""
    out = []
    while select.select([sock], [], [], quiet)[0]:
        out.append(sock.recv(70_000))
    return out


def options_barrier(relay: RelayProc, sock: socket.socket, tries: int = 6) -> list[bytes]:
    """Send ``OPTIONS sip:relay.test`` from ``sock`` and wait for its 200.

    The relay reads its UDP socket in order and answers each datagram before it
    reads the next, and loopback keeps order: whatever it answered to what
    ``sock`` sent before is already queued ahead of this 200. Returns those
    earlier datagrams. Retransmits like a UAC (a flood may have filled the
    relay's receive buffer); fails if no 200 ever comes.
    """
    call_id = rand()
    data = request("OPTIONS", f"sip:{DOMAIN}", local=sock.getsockname(), call_id=call_id)
    before: list[bytes] = []
    for _ in range(tries):
        sock.sendto(data, (relay.host, relay.udp))
        deadline = time.monotonic() + 0.5
        while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
            got = sock.recv(70_000)
            m = parse(got)
            if m.get("call-id") == f"{call_id}@test":
                assert m.status == 200, got
                assert m.get("allow") and "INVITE" in (m.get("allow") or "")
                return before
            before.append(got)
    raise AssertionError(f"no 200 to OPTIONS sip:{DOMAIN} (alive={relay.alive()})\n{relay.log()[-3000:]}")


def assert_healthy(relay: RelayProc) -> None:
    """The relay process runs and answers OPTIONS over UDP with 200."""
    assert relay.alive(), relay.log()[-3000:]
    with udp_socket(relay.peer_host) as s:
        assert options_barrier(relay, s) == []
    assert relay.metric("pbx_relay_internal_errors_total") == 0, relay.log()[-3000:]


def udp_call(relay: RelayProc, data: bytes, sock: socket.socket | None = None) -> list[Msg]:
    """Send one request, return every response up to the first final one (or silence)."""
    own = sock is None
    s = sock or udp_socket()
    try:
        s.sendto(data, (HOST, relay.udp))
        out: list[Msg] = []
        while select.select([s], [], [], 2.0)[0]:
            m = parse(s.recv(70_000))
            out.append(m)
            if (m.status or 0) >= 200:
                break
        return out
    finally:
        if own:
            s.close()


def invite(relay: RelayProc, uri: str) -> Msg:
    """An INVITE from a phone over UDP; returns its final response and ACKs it."""
    with udp_socket() as s:
        local = s.getsockname()
        branch = "z9hG4bK" + rand()
        call_id = rand()
        data = request("INVITE", uri, local=local, branch=branch, call_id=call_id,
                       from_=f"<sip:200@{SERIAL}.{DOMAIN}>",
                       extra=[f"Contact: <sip:200@{local[0]}:{local[1]}>"])
        got = udp_call(relay, data, s)
        assert got, f"no answer to INVITE {uri}"
        final = got[-1]
        assert final.status is not None and final.status >= 200, final.raw
        if final.status >= 300:
            inv = parse(data)
            ack = "\r\n".join([
                f"ACK {uri} SIP/2.0", f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch={branch};rport",
                "Max-Forwards: 70", f"From: {inv.get('from')}", f"To: {final.get('to')}",
                f"Call-ID: {call_id}@test", "CSeq: 1 ACK", "Content-Length: 0", "", "",
            ]).encode()
            s.sendto(ack, (HOST, relay.udp))
            assert drain(s, 0.1) == [], "an ACK was answered"
        return final


# --------------------------------------------------------------------- TCP
class Stream:
    """A TCP connection to the relay that frames what comes back by Content-Length."""

    def __init__(self, relay: RelayProc, source: str | None = None):
        """``source``: the local address to connect from (another 127.0.0.0/8 address
        is another source to the relay: its bans and limits)."""
        self.sock = socket.create_connection((relay.host, relay.tcp), timeout=5,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.eof = False

    @property
    def local(self) -> tuple[str, int]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, timeout: float) -> bool:
        if self.eof or not select.select([self.sock], [], [], timeout)[0]:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def recv(self, timeout: float = 3.0) -> Msg | None:
        deadline = time.monotonic() + timeout
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                m = re.search(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", self.buf[:end], re.I)
                total = end + 4 + (int(m.group(1)) if m else 0)
                if len(self.buf) >= total:
                    raw, self.buf = self.buf[:total], self.buf[total:]
                    return parse(raw)
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                return None

    def closed_within(self, timeout: float) -> bool:
        """True when the relay closes the connection within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            self._fill(left)
        return self.eof

    def close(self) -> None:
        self.sock.close()


def digest_params(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r'([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', text):
        out[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return out


HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def authorization(challenge: str, user: str, secret: str, uri: str, method: str = "REGISTER") -> str:
    """RFC 7616 / RFC 8760 digest with qop=auth, computed here, not by the relay's code."""
    p = digest_params(challenge.removeprefix("Digest "))
    alg = p.get("algorithm", "MD5")
    h = HASHES[alg]

    def hx(s: str) -> str:
        return h(s.encode()).hexdigest()

    cnonce, nc = rand(), "00000001"
    assert "auth" in p["qop"].split(",")
    ha1 = hx(f"{user}:{p['realm']}:{secret}")
    ha2 = hx(f"{method}:{uri}")
    response = hx(f"{ha1}:{p['nonce']}:{nc}:{cnonce}:auth:{ha2}")
    return (f'Digest username="{user}", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
            f'response="{response}", algorithm={alg}, cnonce="{cnonce}", qop=auth, nc={nc}')


def pbx_register(
    stream: Stream, serial: str, *, cseq: int, call_id: str, expires: int | None = 600,
    auth: str | None = None, contact: str | None = None,
) -> Msg:
    uri = f"sip:{serial}@{DOMAIN}"
    ip, port = stream.local
    extra = [f"Contact: {contact or f'<sip:{serial}@{ip}:{port};transport=tcp>'}"]
    if expires is not None:
        extra.append(f"Expires: {expires}")
    if auth:
        extra.append(f"Authorization: {auth}")
    stream.send(request("REGISTER", uri, transport="TCP", local=(ip, port), to=f"<{uri}>",
                        from_=f"<{uri}>", cseq=cseq, call_id=call_id, extra=extra))
    resp = stream.recv()
    assert resp is not None, "no answer to REGISTER"
    assert resp.get("call-id") == f"{call_id}@test" and resp.get("cseq") == f"{cseq} REGISTER"
    return resp


def challenge(resp: Msg, algorithm: str) -> str:
    assert resp.status == 401, resp.raw
    values = resp.get_all("www-authenticate")
    found = [v for v in values if digest_params(v.removeprefix("Digest ")).get("algorithm") == algorithm]
    assert found, f"no {algorithm} challenge in {values}"
    return found[0]


class Pbx:
    """A PBX phoned home over TCP; the connection stays open while the test runs."""

    def __init__(self, relay: RelayProc, serial: str = SERIAL, algorithm: str = "MD5",
                 expires: int | None = 600):
        self.relay, self.serial = relay, serial
        self.stream = Stream(relay)
        self.call_id = rand()
        self.cseq = 0
        resp = self.register(expires, algorithm)
        assert resp.status == 200, resp.raw

    def register(self, expires: int | None, algorithm: str = "MD5", contact: str | None = None) -> Msg:
        self.cseq += 1
        first = pbx_register(self.stream, self.serial, cseq=self.cseq, call_id=self.call_id,
                             expires=expires, contact=contact)
        auth = authorization(challenge(first, algorithm), self.serial, self.relay.secrets[self.serial],
                             f"sip:{self.serial}@{DOMAIN}")
        self.cseq += 1
        return pbx_register(self.stream, self.serial, cseq=self.cseq, call_id=self.call_id,
                            expires=expires, auth=auth, contact=contact)

    def binding(self) -> dict[str, object] | None:
        return next((r for r in self.relay.registry() if r["serial"] == self.serial), None)

    def assert_bound(self) -> None:
        reg = self.binding()
        assert reg is not None, f"PBX {self.serial} lost its registration"
        ip, port = self.stream.local
        assert (reg["transport"], reg["ip"], reg["port"]) == ("tcp", ip, port), reg

    def assert_nothing_received(self) -> None:
        m = self.stream.recv(timeout=0.05)
        assert m is None, f"forwarded to the PBX: {m.raw[:300]!r}"
        assert not self.stream.eof, "the relay closed the PBX's connection"


