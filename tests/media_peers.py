"""Media peers for the end-to-end media tests: RTP endpoints and two tiny SIP user agents.

The SIP side is plain sockets, like ``tests/sipclient.py`` (whose ``Pbx`` registers a
PBX over TCP): a ``Phone`` that places calls over UDP and a ``PbxUa`` that answers
them on the PBX's phone-home connection, each keeping just enough dialog state
(route set, remote target, tags, CSeq) to send ACK, BYE, CANCEL and re-INVITEs
through the relay. The media side is a ``MediaEndpoint``: an RTP and an RTCP socket
whose address goes into the SDP, a thread that records every datagram it gets,
and an RTP packet builder (RFC 3550 §5.1 header, G.711 20 ms frames).
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import SERIAL, Msg, Pbx, parse, rand

HOST = "127.0.0.1"
Addr = tuple[str, int]
T = TypeVar("T")
FRAME = 160  # octets of G.711 in 20 ms at 8 kHz
SIP_WAIT = 5.0  # seconds a SIP peer waits for the next message before the test fails


# ------------------------------------------------------------------------ RTP
def rtp_packet(seq: int, ts: int, ssrc: int, pt: int, payload: bytes, marker: bool = False) -> bytes:
    """RFC 3550 §5.1: V=2, no padding, no extension, no CSRC."""
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def rtcp_rr(ssrc: int) -> bytes:
    """An empty receiver report (RFC 3550 §6.4.2): what a silent, held end still sends."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def rtp_header(data: bytes) -> tuple[int, int, int, int]:
    """(payload type, sequence number, timestamp, SSRC) of an RTP packet."""
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    assert b0 >> 6 == 2, f"not RTP version 2: {data[:12].hex()}"
    return b1 & 0x7F, seq, ts, ssrc


class Talker:
    """One RTP source: sequence number, timestamp and SSRC advance like a phone's."""

    def __init__(self, pt: int = 0, payload: bytes | None = None, random_payload: bool = False):
        self.pt = pt
        self.ssrc = struct.unpack("!I", os.urandom(4))[0]
        self.seq = struct.unpack("!H", os.urandom(2))[0]
        self.ts = struct.unpack("!I", os.urandom(4))[0]
        self.payload = payload
        self.random_payload = random_payload
        self.sent: list[bytes] = []

    def next(self) -> bytes:
        if self.random_payload:
            body = os.urandom(FRAME + 10)  # SRTP: "encrypted" frame + 80-bit auth tag
        elif self.payload is not None:
            body = self.payload
        else:
            # A recognisable frame per packet: a payload the relay changed or
            # mixed up with another packet's would not match what was sent.
            body = (struct.pack("!IH", self.ssrc, self.seq & 0xFFFF) * 27)[:FRAME]
        pkt = rtp_packet(self.seq, self.ts, self.ssrc, self.pt, body, marker=not self.sent)
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + FRAME) & 0xFFFFFFFF
        self.sent.append(pkt)
        return pkt


@dataclass
class Received:
    kind: str  # "rtp" or "rtcp"
    data: bytes
    src: Addr
    at: float


class MediaEndpoint:
    """An RTP port and an RTCP port; a thread records every datagram that arrives.

    ``relay_rtp`` / ``relay_rtcp`` is where the SDP this side received says to send.
    """

    def __init__(self, host: str = HOST, pt: int = 0, random_payload: bool = False):
        self.host = host
        self.rtp = self._bind(host)
        self.rtcp = self._bind(host)
        self.received: list[Received] = []
        self.relay_rtp: Addr | None = None
        self.relay_rtcp: Addr | None = None
        self.talker = Talker(pt, random_payload=random_payload)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(host: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((host, 0))
        return s

    @property
    def rtp_addr(self) -> Addr:
        return self.rtp.getsockname()  # type: ignore[no-any-return]

    @property
    def rtcp_addr(self) -> Addr:
        return self.rtcp.getsockname()  # type: ignore[no-any-return]

    def _run(self) -> None:
        socks = {self.rtp: "rtp", self.rtcp: "rtcp"}
        while not self._stop.is_set():
            ready = select.select(list(socks), [], [], 0.05)[0]
            for s in ready:
                try:
                    data, src = s.recvfrom(4096)
                except OSError:
                    return
                self.received.append(Received(socks[s], data, src[:2], time.monotonic()))

    # ---------------------------------------------------------------- SDP
    def sdp(self, *, proto: str = "RTP/AVP", conn: str | None = None, port: int | None = None,
            attrs: Iterable[str] = (), version: int = 1) -> bytes:
        """An offer or answer naming this endpoint (``conn``/``port`` override it: hold)."""
        pt = self.talker.pt
        name = {0: "PCMU", 8: "PCMA"}[pt]
        lines = [
            "v=0",
            f"o=- 4242 {version} IN IP4 {self.host}",
            "s=-",
            f"c=IN IP4 {conn or self.host}",
            "t=0 0",
            f"m=audio {self.rtp_addr[1] if port is None else port} {proto} {pt} 101",
            f"a=rtcp:{self.rtcp_addr[1]}",
            f"a=rtpmap:{pt} {name}/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            *attrs,
            "a=ptime:20",
        ]
        return ("\r\n".join(lines) + "\r\n").encode()

    def learn(self, body: bytes) -> None:
        """Where the SDP this side received says to send RTP and RTCP."""
        self.relay_rtp, self.relay_rtcp = sdp_media_address(body)

    # --------------------------------------------------------------- send
    def send_rtp(self, n: int = 1, dest: Addr | None = None) -> None:
        target = dest or self.relay_rtp
        assert target is not None, "no SDP learnt"
        for _ in range(n):
            self.rtp.sendto(self.talker.next(), target)

    def send_rtcp(self, dest: Addr | None = None) -> None:
        target = dest or self.relay_rtcp
        assert target is not None, "no SDP learnt"
        self.rtcp.sendto(rtcp_rr(self.talker.ssrc), target)

    # ------------------------------------------------------------ observe
    def rtp_payloads(self) -> list[bytes]:
        return [r.data for r in self.received if r.kind == "rtp"]

    def count(self, kind: str = "rtp") -> int:
        return sum(1 for r in self.received if r.kind == kind)

    def wait_for(self, n: int, kind: str = "rtp", timeout: float = 3.0, quiet: float = 0.2) -> int:
        """Wait until ``n`` datagrams of ``kind`` arrived (then ``quiet`` s more for
        extras), or ``timeout``; returns the count."""
        deadline = time.monotonic() + timeout
        while self.count(kind) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(quiet)
        return self.count(kind)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.rtp.close()
        self.rtcp.close()


def sdp_media_address(body: bytes) -> tuple[Addr, Addr]:
    """(RTP, RTCP) address of the first m= line: c=, m= port, a=rtcp (RFC 3605)."""
    text = body.decode()
    c = re.search(r"^c=IN IP4 (\S+)", text, re.M)
    m = re.search(r"^m=audio (\d+) ", text, re.M)
    assert c and m, text
    rtcp = re.search(r"^a=rtcp:(\d+)", text, re.M)
    port = int(m.group(1))
    return (c.group(1), port), (c.group(1), int(rtcp.group(1)) if rtcp else port + 1)


def pace(rate: float, n: int, step: Callable[[int], None]) -> None:
    """Call ``step(i)`` ``n`` times at ``rate`` per second (sleeping, not spinning)."""
    start = time.monotonic()
    for i in range(n):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        step(i)


def exchange(a: MediaEndpoint, b: MediaEndpoint, n: int, rate: float = 500.0) -> None:
    """``n`` RTP packets each way, interleaved, at ``rate`` packets/s per direction."""

    def step(_: int) -> None:
        a.send_rtp()
        b.send_rtp()

    pace(rate, n, step)


# ---------------------------------------------------------- SIP, common bits
def _response(req: Msg, code: int, reason: str, *, to_tag: str | None, contact: str | None,
              body: bytes = b"", record_route: bool = True) -> bytes:
    """RFC 3261 §8.2.6.2: Via (all), From, To (+tag), Call-ID, CSeq copied."""
    lines = [f"SIP/2.0 {code} {reason}"]
    lines += [f"Via: {v}" for v in req.get_all("via")]
    if record_route:
        lines += [f"Record-Route: {v}" for v in req.get_all("record-route")]
    lines.append(f"From: {req.get('from')}")
    to = req.get("to") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [f"To: {to}", f"Call-ID: {req.get('call-id')}", f"CSeq: {req.get('cseq')}"]
    if contact:
        lines.append(f"Contact: {contact}")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _uri_of(name_addr: str) -> str:
    m = re.search(r"<([^>]*)>", name_addr)
    return m.group(1) if m else name_addr.split(";")[0].strip()


def _split_header(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [p.strip() for p in re.split(r",(?=\s*<)", v) if p.strip()]
    return out


@dataclass
class Dialog:
    """One side's view of a dialog (RFC 3261 §12)."""

    call_id: str
    local: str  # our From/To value, with our tag
    remote: str  # theirs, with their tag
    route: list[str] = field(default_factory=list)
    target: str = ""
    cseq: int = 1


# ------------------------------------------------------------------- phone
class Phone:
    """A softphone over UDP: calls ``sip:<ext>@<serial>.<domain>`` through the relay."""

    def __init__(self, relay: RelayProc, host: str | None = None, serial: str = SERIAL):
        self.relay = relay
        self.serial = serial
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host or relay.peer_host, 0))
        self.local: Addr = self.sock.getsockname()
        self.pending: list[Msg] = []  # requests that arrived while we waited for a response

    def close(self) -> None:
        self.sock.close()

    def _send(self, data: bytes) -> None:
        self.sock.sendto(data, (self.relay.host, self.relay.udp))

    def recv(self, timeout: float = SIP_WAIT) -> Msg:
        if not select.select([self.sock], [], [], timeout)[0]:
            raise AssertionError(f"phone: nothing from the relay in {timeout} s\n{self.relay.log()[-2000:]}")
        return parse(self.sock.recv(70_000))

    def take(self, want: Callable[[Msg], bool], timeout: float = SIP_WAIT) -> Msg:
        """The first message (kept ones first) for which ``want(msg)`` is true; the
        others are kept for later, except provisional responses."""
        for i, m in enumerate(self.pending):
            if want(m):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(0.01, deadline - time.monotonic()))
            if want(m):
                return m
            if m.status is None or m.status >= 200:
                self.pending.append(m)

    def response(self, method: str, call_id: str | None = None, timeout: float = SIP_WAIT) -> Msg:
        """The next final response to ``method`` (in call ``call_id``)."""
        return self.take(lambda m: m.status is not None and m.status >= 200
                         and (m.get("cseq") or "").split()[-1] == method
                         and call_id in (None, m.get("call-id")), timeout)

    def request(self, method: str, timeout: float = SIP_WAIT) -> Msg:
        return self.take(lambda m: m.status is None and m.start.split()[0] == method, timeout)

    def _via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {self.local[0]}:{self.local[1]};branch={branch};rport"

    def invite(self, sdp: bytes, ext: str = "100", extra: list[str] | None = None,
               call_id: str | None = None) -> PhoneCall:
        """``call_id``: a given Call-ID (a SIPp peer matches calls by it)."""
        call = PhoneCall(self, ext, call_id or f"{rand()}@phone")
        call.send_invite(sdp, extra)
        return call


class PhoneCall:
    def __init__(self, phone: Phone, ext: str, call_id: str):
        self.phone = phone
        self.uri = f"sip:{ext}@{phone.serial}.{DOMAIN}"
        self.call_id = call_id
        self.dialog = Dialog(self.call_id, f"<sip:201@{phone.serial}.{DOMAIN}>;tag={rand(4)}",
                             f"<{self.uri}>", target=self.uri)
        self.invite_branch = ""
        self.invite_cseq = 0
        self.invite_in_dialog = False  # a re-INVITE: its CANCEL and non-2xx ACK are in the dialog too
        self.answer: Msg | None = None

    def _request(self, method: str, cseq: int, branch: str, body: bytes = b"",
                 in_dialog: bool = True, extra: list[str] | None = None) -> bytes:
        d = self.dialog
        uri = d.target if in_dialog else self.uri
        lines = [f"{method} {uri} SIP/2.0", f"Via: {self.phone._via(branch)}", "Max-Forwards: 70"]
        if in_dialog:
            lines += [f"Route: {r}" for r in d.route]
        lines += [f"From: {d.local}", f"To: {d.remote}", f"Call-ID: {self.call_id}",
                  f"CSeq: {cseq} {method}",
                  f"Contact: <sip:201@{self.phone.local[0]}:{self.phone.local[1]}>", *(extra or [])]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def send_invite(self, sdp: bytes, extra: list[str] | None = None) -> None:
        self.invite_branch = "z9hG4bK" + rand()
        self.invite_cseq = self.dialog.cseq
        self.invite_in_dialog = False
        self.phone._send(self._request("INVITE", self.invite_cseq, self.invite_branch, sdp,
                                       in_dialog=False, extra=extra))

    def final(self) -> Msg:
        """The INVITE's final response; a 2xx sets up the dialog and is ACKed."""
        resp = self.phone.response("INVITE", self.call_id)
        if resp.status is not None and 200 <= resp.status < 300:
            if self.answer is None:  # the route set is fixed by the first 2xx (RFC 3261 §12.1.2)
                self.dialog.route = list(reversed(_split_header(resp.get_all("record-route"))))
            self.answer = resp
            self.dialog.remote = resp.get("to") or ""
            self.dialog.target = _uri_of(resp.get("contact") or "")
            self.ack()
        else:
            # RFC 3261 §17.1.1.3: the ACK of a non-2xx is hop by hop, same branch.
            if self.answer is None:
                self.dialog.remote = resp.get("to") or ""
            self.phone._send(self._request("ACK", self.invite_cseq, self.invite_branch,
                                           in_dialog=self.invite_in_dialog))
        return resp

    def ack(self) -> None:
        self.phone._send(self._request("ACK", self.invite_cseq, "z9hG4bK" + rand()))

    def cancel(self) -> Msg:
        # RFC 3261 §9.1: the INVITE's Request-URI, Route, Call-ID, tags, CSeq number and Via.
        self.phone._send(self._request("CANCEL", self.invite_cseq, self.invite_branch,
                                       in_dialog=self.invite_in_dialog))
        return self.phone.response("CANCEL", self.call_id)

    def reinvite(self, sdp: bytes) -> None:
        """Send a re-INVITE; ``final()`` then gets its answer and ACKs it."""
        self.dialog.cseq += 1
        self.invite_cseq = self.dialog.cseq
        self.invite_branch = "z9hG4bK" + rand()
        self.invite_in_dialog = True
        self.phone._send(self._request("INVITE", self.invite_cseq, self.invite_branch, sdp))

    def bye(self) -> Msg:
        self.dialog.cseq += 1
        self.phone._send(self._request("BYE", self.dialog.cseq, "z9hG4bK" + rand()))
        return self.phone.response("BYE", self.call_id)

    def answer_request(self, req: Msg, body: bytes = b"") -> None:
        """200 to an in-dialog request from the PBX (re-INVITE, BYE)."""
        contact = f"<sip:201@{self.phone.local[0]}:{self.phone.local[1]}>"
        self.phone._send(_response(req, 200, "OK", to_tag=None, contact=contact, body=body,
                                   record_route=False))


# --------------------------------------------------------------------- PBX
class PbxUa:
    """The PBX on its phone-home TCP connection (``sipclient.Pbx`` registers it)."""

    def __init__(self, relay: RelayProc, serial: str = SERIAL):
        self.pbx = Pbx(relay, serial)
        self.stream = self.pbx.stream
        # Answers go out as several small writes (180, then 200): without this,
        # Nagle holds the second one for the relay's delayed ACK, 40 ms a call.
        self.stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.relay = relay
        self.pending: list[Msg] = []

    def close(self) -> None:
        self.stream.close()

    @property
    def contact(self) -> str:
        ip, port = self.stream.local
        return f"<sip:100@{ip}:{port};transport=tcp>"

    def recv(self, timeout: float = SIP_WAIT) -> Msg:
        m = self.stream.recv(timeout)
        if m is None:
            raise AssertionError(f"PBX: nothing from the relay in {timeout} s\n{self.relay.log()[-2000:]}")
        return m

    def take(self, want: Callable[[Msg], bool], timeout: float = SIP_WAIT) -> Msg:
        """The first message (kept ones first) for which ``want(msg)`` is true; the
        others are kept for later, except provisional responses."""
        for i, m in enumerate(self.pending):
            if want(m):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(0.01, deadline - time.monotonic()))
            if want(m):
                return m
            if m.status is None or m.status >= 200:
                self.pending.append(m)

    def response(self, method: str, call_id: str | None = None, timeout: float = SIP_WAIT) -> Msg:
        """The next final response to ``method`` (in call ``call_id``)."""
        return self.take(lambda m: m.status is not None and m.status >= 200
                         and (m.get("cseq") or "").split()[-1] == method
                         and call_id in (None, m.get("call-id")), timeout)

    def request(self, method: str, timeout: float = SIP_WAIT) -> Msg:
        return self.take(lambda m: m.status is None and m.start.split()[0] == method, timeout)

    def send(self, data: bytes) -> None:
        self.stream.send(data)

    def reply(self, req: Msg, code: int, reason: str, body: bytes = b"", tag: str | None = None) -> None:
        self.send(_response(req, code, reason, to_tag=tag, contact=self.contact, body=body))

    def answer(self, sdp: bytes, ring: bool = True) -> PbxCall:
        """Take the next INVITE, ring, answer 200 with ``sdp``; returns the call
        (its ``offer`` is the INVITE as the PBX got it). ``ack()`` waits for the ACK."""
        inv = self.request("INVITE")
        call = PbxCall(self, inv)
        if ring:
            self.reply(inv, 180, "Ringing", tag=call.tag)
        self.reply(inv, 200, "OK", body=sdp, tag=call.tag)
        return call


class PbxCall:
    def __init__(self, ua: PbxUa, invite: Msg):
        self.ua = ua
        self.offer = invite
        self.tag = rand(4)
        to = invite.get("to") or ""
        self.dialog = Dialog(invite.get("call-id") or "", f"{to};tag={self.tag}", invite.get("from") or "",
                             route=_split_header(invite.get_all("record-route")),
                             target=_uri_of(invite.get("contact") or ""), cseq=100)

    def ack(self) -> Msg:
        return self.ua.request("ACK")

    def _request(self, method: str, cseq: int, body: bytes = b"") -> bytes:
        d = self.dialog
        ip, port = self.ua.stream.local
        lines = [f"{method} {d.target} SIP/2.0",
                 f"Via: SIP/2.0/TCP {ip}:{port};branch=z9hG4bK{rand()}", "Max-Forwards: 70"]
        lines += [f"Route: {r}" for r in d.route]
        lines += [f"From: {d.local}", f"To: {d.remote}", f"Call-ID: {d.call_id}",
                  f"CSeq: {cseq} {method}", f"Contact: {self.ua.contact}"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def reinvite(self, sdp: bytes) -> int:
        """Send a re-INVITE towards the phone; returns its CSeq for the ACK."""
        self.dialog.cseq += 1
        self.ua.send(self._request("INVITE", self.dialog.cseq, sdp))
        return self.dialog.cseq

    def ack_reinvite(self, cseq: int) -> None:
        self.ua.send(self._request("ACK", cseq))

    def ok(self, req: Msg, body: bytes = b"") -> None:
        """200 to an in-dialog request (BYE, re-INVITE) from the phone."""
        self.ua.send(_response(req, 200, "OK", to_tag=None, contact=self.ua.contact, body=body,
                               record_route=False))


class Peers:
    """A PBX phoned home and a phone, and every endpoint a test opens: all closed
    at the end whatever happened. Endpoints sit on the relay's ``peer_host``. ``serial``:
    the PBX's."""

    def __init__(self, relay: RelayProc, serial: str = SERIAL):
        self.relay = relay
        self.opened: list[object] = []
        self.pbx = self.add(PbxUa(relay, serial))
        self.phone = self.add(Phone(relay))

    def add(self, thing: T) -> T:
        self.opened.append(thing)
        return thing

    def endpoint(self, host: str | None = None, pt: int = 0, random_payload: bool = False) -> MediaEndpoint:
        return self.add(MediaEndpoint(host or self.relay.peer_host, pt, random_payload))

    def close(self) -> None:
        for t in reversed(self.opened):
            try:
                t.close()  # type: ignore[attr-defined]
            except OSError:
                pass


# ------------------------------------------------------------- whole calls
@dataclass
class Call:
    phone: PhoneCall
    pbx: PbxCall
    a: MediaEndpoint  # the phone's media
    b: MediaEndpoint  # the PBX's media


def establish(phone: Phone, pbx: PbxUa, a: MediaEndpoint, b: MediaEndpoint,
              offer: bytes | None = None, answer: bytes | None = None) -> Call:
    """Phone calls the PBX: INVITE with ``a``'s SDP, 180, 200 with ``b``'s, ACK.
    Each endpoint learns the relay address from the SDP it got."""
    pc = phone.invite(offer if offer is not None else a.sdp())
    bc = pbx.answer(answer if answer is not None else b.sdp())
    b.learn(bc.offer.body)
    resp = pc.final()
    assert resp.status == 200, resp.raw
    a.learn(resp.body)
    bc.ack()
    return Call(pc, bc, a, b)


def hang_up(call: Call) -> None:
    """BYE from the phone, 200 from the PBX."""
    pc, bc = call.phone, call.pbx
    pc.dialog.cseq += 1
    pc.phone._send(pc._request("BYE", pc.dialog.cseq, "z9hG4bK" + rand()))
    bye = bc.ua.request("BYE")
    bc.ok(bye)
    resp = pc.phone.response("BYE", pc.call_id)
    assert resp.status == 200, resp.raw


def phone_reinvite(call: Call, offer: bytes, answer: bytes) -> tuple[Msg, Msg]:
    """Re-INVITE from the phone; returns (offer as the PBX got it, answer as the phone got it)."""
    call.phone.reinvite(offer)
    req = call.pbx.ua.request("INVITE")
    call.pbx.ok(req, answer)
    resp = call.phone.final()
    assert resp.status == 200, resp.raw
    call.pbx.ack()
    return req, resp


def pbx_reinvite(call: Call, offer: bytes, answer: bytes) -> tuple[Msg, Msg]:
    """Re-INVITE from the PBX; returns (offer as the phone got it, answer as the PBX got it)."""
    cseq = call.pbx.reinvite(offer)
    req = call.phone.phone.request("INVITE")
    call.phone.answer_request(req, answer)
    resp = call.pbx.ua.response("INVITE", call.pbx.dialog.call_id)
    assert resp.status == 200, resp.raw
    call.pbx.ack_reinvite(cseq)
    return req, resp


def wait_metric(relay: RelayProc, name: str, want: float, timeout: float = 5.0) -> float:
    """Poll /metrics until ``name`` equals ``want`` (or time runs out); returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = relay.metric(name)
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
