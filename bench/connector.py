#!/usr/bin/env python3
"""Phone-home connector: plays the PBX's side of the relay connection for a SIPp UAS.

SIPp cannot both register as a client and serve new incoming calls, so this
small program does what a PBX behind NAT does:

1. connects to the SIPp UAS over plain TCP (``--uas``),
2. opens TCP to the relay (``--relay``) and sends ``REGISTER sip:<serial>@<domain>``
   with digest authentication (MD5 or SHA-256, qop=auth; RFC 8760),
3. re-registers every ``--reregister`` seconds on the same connection,
4. pipes every other SIP message both ways, whole messages only (framed by
   Content-Length), so that its own REGISTERs never land inside another message.

Answers to its own REGISTERs (same Call-ID) are consumed here; everything else
goes to the UAS unchanged, and the UAS's answers go back to the relay unchanged.
Prints ``ready <local ip:port>`` once registered; on SIGINT/SIGTERM or when a side
closes, prints its counters to stderr and exits.

    python bench/connector.py --relay 127.0.0.1:5060 --uas 127.0.0.1:5070 \
        --serial 0123456789 --secret S3cr3t --domain relay.test --algorithm SHA-256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import selectors
import signal
import socket
import sys
import time

ALGS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
_CL = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.I)
_CALLID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.I)
_CSEQ_INVITE = re.compile(rb"\r\ncseq[ \t]*:[ \t]*\d+[ \t]+INVITE", re.I)
_WWW = re.compile(rb"\r\nWWW-Authenticate[ \t]*:[ \t]*Digest[ \t]+([^\r\n]+)", re.I)
_PARAM = re.compile(r'([A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)')


class Framer:
    """Whole SIP messages out of a byte stream (Content-Length framing, RFC 3261 §18.3)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out = []
        while buf:
            if buf[:2] == b"\r\n":  # keepalive CRLF(s) between messages
                del buf[:2]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            m = _CL.search(buf, 0, end + 2)
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(buf) < total:
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
        return out


def digest_params(value: str) -> dict[str, str]:
    return {k.lower(): v.strip('"') for k, v in _PARAM.findall(value)}


class Registrar:
    """The PBX's REGISTER client state: Call-ID, CSeq, nonce, nc."""

    def __init__(
        self, serial: str, secret: str, domain: str, algorithm: str, local: tuple[str, int], expires: int
    ):
        self.serial, self.secret, self.domain, self.alg = serial, secret, domain, algorithm
        self.local = local
        self.expires = expires
        self.call_id = f"reg-{serial}-{os.getpid()}-{os.urandom(4).hex()}"
        self.cseq = 0
        self.challenge: dict[str, str] | None = None
        self.nc = 0
        self.registered = False
        self.auth_rounds = 0

    def request(self) -> bytes:
        self.cseq += 1
        ruri = f"sip:{self.serial}@{self.domain}"
        ip, port = self.local
        lines = [
            f"REGISTER {ruri} SIP/2.0",
            f"Via: SIP/2.0/TCP {ip}:{port};branch=z9hG4bK{os.urandom(6).hex()};rport",
            f"From: <sip:{self.serial}@{self.domain}>;tag={os.urandom(4).hex()}",
            f"To: <sip:{self.serial}@{self.domain}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} REGISTER",
            f"Contact: <sip:{self.serial}@{ip}:{port};transport=tcp>",
            "Max-Forwards: 70",
            f"Expires: {self.expires}",
            "User-Agent: pbx-relay-bench-connector",
        ]
        if self.challenge is not None:
            lines.append("Authorization: " + self._authorization(ruri))
        lines += ["Content-Length: 0", "", ""]
        return "\r\n".join(lines).encode()

    def _authorization(self, uri: str) -> str:
        c = self.challenge
        assert c is not None
        h = ALGS[self.alg]
        self.nc += 1
        nc = f"{self.nc:08x}"
        cnonce = os.urandom(8).hex()
        ha1 = h(f"{self.serial}:{c['realm']}:{self.secret}".encode()).hexdigest()
        ha2 = h(f"REGISTER:{uri}".encode()).hexdigest()
        resp = h(f"{ha1}:{c['nonce']}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        return (
            f'Digest username="{self.serial}", realm="{c["realm"]}", nonce="{c["nonce"]}", '
            f'uri="{uri}", response="{resp}", algorithm={self.alg}, qop=auth, '
            f'nc={nc}, cnonce="{cnonce}"'
        )

    def on_response(self, msg: bytes) -> bytes | None:
        """Handle an answer to our REGISTER; returns the next REGISTER to send, if any."""
        status = int(msg[8:11])
        if status == 401:
            self.auth_rounds += 1
            if self.auth_rounds > 3:
                raise SystemExit(f"connector: digest refused for {self.serial}")
            for value in _WWW.findall(msg):
                p = digest_params(value.decode())
                if p.get("algorithm", "MD5").upper() == self.alg:
                    self.challenge = p
                    self.nc = 0
                    return self.request()
            raise SystemExit(f"connector: relay offered no {self.alg} challenge")
        if status == 200:
            self.registered = True
            self.auth_rounds = 0
            return None
        if status >= 200:
            first = msg.split(b"\r\n", 1)[0]
            raise SystemExit(f"connector: REGISTER answered {first!r}")
        return None


def parse_hp(s: str) -> tuple[str, int]:
    h, _, p = s.rpartition(":")
    return h, int(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relay", required=True, help="relay TCP ip:port")
    ap.add_argument("--uas", required=True, help="SIPp UAS TCP ip:port")
    ap.add_argument("--serial", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--algorithm", default="SHA-256", choices=sorted(ALGS))
    ap.add_argument("--expires", type=int, default=600)
    ap.add_argument("--reregister", type=float, default=60.0, help="seconds between re-REGISTERs")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="hard stop")
    a = ap.parse_args()

    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # 1. the UAS (SIPp listens once started; retry for a few seconds)
    deadline = time.monotonic() + 10
    while True:
        try:
            uas = socket.create_connection(parse_hp(a.uas), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                print("connector: cannot reach the UAS", file=sys.stderr)
                return 2
            time.sleep(0.05)
    # 2. phone home
    relay = socket.create_connection(parse_hp(a.relay), timeout=5)
    for s in (uas, relay):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reg = Registrar(a.serial, a.secret, a.domain, a.algorithm, relay.getsockname()[:2], a.expires)
    relay.sendall(reg.request())
    from_relay, from_uas = Framer(), Framer()
    cid = reg.call_id.encode()
    counts = {"to_uas": 0, "to_relay": 0, "registers": 1}
    early: list[bytes] = []
    while not reg.registered:  # blocking: nothing else arrives before we are bound
        data = relay.recv(65536)
        if not data:
            print("connector: relay closed during REGISTER", file=sys.stderr)
            return 2
        for msg in from_relay.feed(data):
            m = _CALLID.search(msg)
            if m and m.group(1).strip() == cid and msg.startswith(b"SIP/2.0 "):
                nxt = reg.on_response(msg)
                if nxt:
                    relay.sendall(nxt)
                    counts["registers"] += 1
            else:
                early.append(msg)
    lip, lport = relay.getsockname()[:2]
    local = f"{lip}:{lport}"
    print(f"ready {local}", flush=True)

    if early:
        uas.sendall(b"".join(early))
        counts["to_uas"] += len(early)
    for s in (uas, relay):
        s.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(relay, selectors.EVENT_READ, "relay")
    sel.register(uas, selectors.EVENT_READ, "uas")
    # PBX-side share of the setup time: INVITE read from the relay → 200 read from the UAS.
    pending: dict[bytes, float] = {}
    pbx_side: list[float] = []
    next_reg = time.monotonic() + a.reregister
    end = time.monotonic() + a.max_seconds
    why = "signal"
    while not stop:
        now = time.monotonic()
        if now >= end:
            why = "max-seconds"
            break
        if now >= next_reg:
            relay.sendall(reg.request())
            counts["registers"] += 1
            next_reg = now + a.reregister
        for key, _ in sel.select(timeout=min(0.5, max(0.0, next_reg - now))):
            try:
                data = key.fileobj.recv(262144)
            except OSError:
                data = b""
            if not data:
                why = f"{key.data} closed"
                stop = True
                break
            if key.data == "relay":
                out = []
                now = time.monotonic()
                for msg in from_relay.feed(data):
                    if msg.startswith(b"INVITE "):
                        m = _CALLID.search(msg)
                        if m:
                            pending[m.group(1).strip()] = now
                    if msg.startswith(b"SIP/2.0 "):
                        m = _CALLID.search(msg)
                        if m and m.group(1).strip() == cid:
                            nxt = reg.on_response(msg)
                            if nxt:
                                relay.sendall(nxt)
                                counts["registers"] += 1
                            continue
                    out.append(msg)
                if out:
                    uas.sendall(b"".join(out))
                    counts["to_uas"] += len(out)
            else:
                msgs = from_uas.feed(data)
                now = time.monotonic()
                for msg in msgs:
                    if msg.startswith(b"SIP/2.0 200") and _CSEQ_INVITE.search(msg):
                        m = _CALLID.search(msg)
                        t0 = pending.pop(m.group(1).strip(), None) if m else None
                        if t0 is not None:
                            pbx_side.append(now - t0)
                if msgs:
                    relay.sendall(b"".join(msgs))
                    counts["to_relay"] += len(msgs)
    print(
        f"connector: stopped ({why}) " + " ".join(f"{k}={v}" for k, v in counts.items()),
        file=sys.stderr,
        flush=True,
    )
    if pbx_side:
        v = sorted(pbx_side)
        q = {p: round(1000 * v[min(len(v) - 1, int(p / 100 * len(v)))], 3) for p in (50, 99)}
        print(
            f"connector: pbx_side_invite_to_200_ms n={len(v)} p50={q[50]} p99={q[99]} "
            f"max={round(1000 * v[-1], 3)}",
            file=sys.stderr,
            flush=True,
        )
    for s in (uas, relay):
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
