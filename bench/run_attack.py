"""Issue 10, attacks: a legitimate client's OPTIONS round trip while one source floods.

    .venv/bin/python bench/run_attack.py all                 # every attack below, ~4 minutes
    .venv/bin/python bench/run_attack.py udp --flooders 1     # UDP flood at line rate from one source
    .venv/bin/python bench/run_attack.py connections --count 20500 --sources 4
    .venv/bin/python bench/run_attack.py routes               # 30 KB datagrams, 1,900 Route entries each
    .venv/bin/python bench/run_attack.py invites              # INVITEs to an offline serial
    .venv/bin/python bench/run_attack.py digest               # wrong digest responses for a serial
    .venv/bin/python bench/run_attack.py mlines               # INVITEs with 16 m= lines to an online PBX

For each attack: a fresh relay (transport defaults, ``exempt = []`` so that loopback
sources are limited like any other), then three phases of ``--probe`` seconds each:
before, during and after the attack. The probe (tests/transport_attacks.py) sends one
OPTIONS every 20 ms from 127.0.0.30 and records each round trip (1 s without an answer
counts as lost). Per phase: probe p50/p99/max, lost, relay CPU (% of one core) and RSS.
The attacker sends from 127.0.0.2 (.3, .4, .5 for the connection flood). With --pin (the
default on 2+ cores) the relay has the last core to itself and the attacker and probe
share the others. Results: bench/out/attack-<stamp>/results.json.

The attacks:

- ``udp``: SIP OPTIONS datagrams as fast as Python sends them (tests/transport_attacks.py).
- ``connections``: ``--count`` idle TCP connections from ``--sources`` addresses.
- ``routes``: INVITEs of ~30 KB with 1,900 ``Route`` entries to a foreign Request-URI
  (over ``MAX_ROUTES``, relay/sip/limits.py: answered 513), 64 distinct datagrams in turn.
- ``invites``: INVITEs without SDP to ``sip:100@<serial>.relay.test`` of a serial added
  with ``pbx add`` and never registered (offline), 4,000 distinct ones (Call-ID, branch,
  tag) in turn.
- ``digest``: the attacker REGISTERs once without credentials for a serial added with
  ``pbx add``, takes the MD5 challenge's nonce, then sends REGISTERs (same Call-ID, CSeq
  going up, a new branch each) with that nonce and a wrong ``response`` (the relay bans
  after ``limits.auth_failures_before_ban`` failures, relay/proxy/authbans.py).
- ``mlines``: INVITEs with an SDP of 16 ``m=audio`` sections to an online PBX: this script
  runs a minimal PBX (its own process, ``run_attack.py _pbx``, from 127.0.0.20) that phones
  home over TCP, REGISTERs with digest (bench/connector.py's ``Registrar``), answers every
  INVITE 180 and leaves it ringing (a CANCEL gets 200 and 487). Before the phases, one
  INVITE without SDP from 127.0.0.21 checks that it rings (180), then is cancelled.

The four last ones are one process (``run_attack.py _flood KIND``) sending from one
socket as fast as it can, a second thread counting the answers by status; ``sent`` counts
datagrams the kernel took (a full socket buffer drops the rest, counted ``send_errors``).
The relay's counters at the end (refusals, drops, bans, parse errors, auth failures,
pending INVITEs, media ports) are in ``relay_counters``. The "during" phase starts 1 s
after the attack does; ``attack_window`` is the relay's CPU over the whole attack, from
its first message (per-source limits and bans act within that first second).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DOMAIN,
    HOST,
    PIN,
    PYTHON,
    ROOT,
    CpuMeter,
    Procs,
    machine,
    make_relay,
    pin,
    raise_nofile,
    rss_kib,
    show,
    start_relay,
)

ATTACKERS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
CLIENT = "127.0.0.30"
PBX_SOURCE = "127.0.0.20"  # the mlines PBX's TCP connection
CHECKER = "127.0.0.21"  # the one INVITE that checks the PBX rings
SCRIPT = str(Path(__file__).resolve())
KINDS = ["udp", "connections", "routes", "invites", "digest", "mlines"]
# The serial each attack is aimed at: in the directory (pbx add) for all three; only the
# mlines one registers.
SERIALS = {"invites": "0123456780", "digest": "0123456781", "mlines": "0123456789"}
FOREIGN = "sip:victim@203.0.113.9"  # a Request-URI of no domain of the relay's
ROUTES = 1_900
STREAMS = 16
WRONG = "0" * 32  # the guessed digest response (MD5: 32 hex digits)
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3}) ")
_TO = re.compile(rb"\r\n(?:to|t)[ \t]*:[ \t]*([^\r\n]+)", re.I)
_CALLID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.I)
_WWW = re.compile(rb"\r\nWWW-Authenticate[ \t]*:[ \t]*Digest[ \t]+([^\r\n]+)", re.I)
_COPY = re.compile(rb"^(via|v|from|f|to|t|call-id|i|cseq|record-route)[ \t]*:", re.I)


def verb(*args: str) -> list[str]:
    return [PYTHON, "-m", "tests.transport_attacks", *args]


# ------------------------------------------------------------------ messages
def sip_request(method: str, uri: str, local: tuple[str, int], *, call_id: str, cseq: int = 1,
                branch: str = "", from_: str = "", from_tag: str = "", to: str = "",
                extra: tuple[str, ...] | list[str] = (), body: bytes = b"") -> bytes:
    """A request over UDP from ``local``; random branch and From tag unless given."""
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch={branch or 'z9hG4bK' + os.urandom(6).hex()};rport",
        "Max-Forwards: 70",
        f"From: {from_ or f'<sip:attacker@{DOMAIN}>'};tag={from_tag or os.urandom(4).hex()}",
        f"To: {to or f'<{uri}>'}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:attacker@{local[0]}:{local[1]}>",
        *extra,
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sdp(host: str, streams: int, first_port: int = 40_000) -> bytes:
    """An offer with ``streams`` audio sections (nobody listens on its ports)."""
    lines = ["v=0", f"o=- 1 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0"]
    for k in range(streams):
        lines += [f"m=audio {first_port + 2 * k} RTP/AVP 0", "a=rtpmap:0 PCMU/8000"]
    return ("\r\n".join(lines) + "\r\n").encode()


def status_of(data: bytes) -> str:
    m = _STATUS.match(data)
    return m.group(1).decode() if m else "request"


def route_datagram(local: tuple[str, int], k: int) -> bytes:
    """~30 KB: 1,900 Route entries, 60 to a Route line, to a foreign Request-URI."""
    entries = [f"<sip:{i}@h;lr>" for i in range(ROUTES)]
    routes = [f"Route: {','.join(entries[j:j + 60])}" for j in range(0, ROUTES, 60)]
    return sip_request("INVITE", FOREIGN, local, call_id=f"routes{k}-{os.urandom(4).hex()}", extra=routes)


def digest_challenge(s: socket.socket, local: tuple[str, int], serial: str) -> tuple[dict[str, str], str]:
    """REGISTER without credentials until a 401 (3 tries, 2 s each): its MD5 challenge and
    the Call-ID used (the guesses go on with it)."""
    from connector import digest_params

    uri = f"sip:{serial}@{DOMAIN}"
    call_id = f"guess-{os.urandom(6).hex()}"
    for _ in range(3):
        s.send(sip_request("REGISTER", uri, local, call_id=call_id, from_=f"<{uri}>",
                           extra=("Expires: 600",)))
        deadline = time.monotonic() + 2.0
        while (left := deadline - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
            data = s.recv(70_000)
            if status_of(data) != "401":
                continue
            for value in _WWW.findall(data):
                p = digest_params(value.decode())
                if p.get("algorithm", "MD5").upper() == "MD5":
                    return p, call_id
    raise SystemExit("no MD5 challenge from the relay")


def attack_messages(kind: str, s: socket.socket, serial: str) -> tuple[list[bytes], dict[str, object]]:
    """The distinct messages ``kind`` sends in turn, and what it learnt setting up."""
    local = s.getsockname()
    info: dict[str, object] = {}
    if kind == "routes":
        msgs = [route_datagram(local, k) for k in range(64)]
        info["route_entries"] = msgs[0].count(b";lr>")
    elif kind == "invites":
        uri = f"sip:100@{serial}.{DOMAIN}"
        msgs = [sip_request("INVITE", uri, local, call_id=f"offline{k}-{os.urandom(4).hex()}")
                for k in range(4000)]
    elif kind == "mlines":
        uri, offer = f"sip:100@{serial}.{DOMAIN}", sdp(local[0], STREAMS)
        info["m_lines"] = offer.count(b"m=audio")
        msgs = [sip_request("INVITE", uri, local, call_id=f"mlines{k}-{os.urandom(4).hex()}", body=offer)
                for k in range(4000)]
    else:  # digest
        ch, call_id = digest_challenge(s, local, serial)
        uri = f"sip:{serial}@{DOMAIN}"
        info["nonce"] = ch.get("nonce", "")
        opaque = f', opaque="{ch["opaque"]}"' if "opaque" in ch else ""
        msgs = []
        for k in range(4000):
            auth = (f'Authorization: Digest username="{serial}", realm="{ch.get("realm", DOMAIN)}", '
                    f'nonce="{ch.get("nonce", "")}", uri="{uri}", response="{WRONG}", algorithm=MD5, '
                    f'qop=auth, nc={k + 1:08x}, cnonce="{os.urandom(4).hex()}"{opaque}')
            msgs.append(sip_request("REGISTER", uri, local, call_id=call_id, cseq=k + 2, from_=f"<{uri}>",
                                    extra=("Expires: 600", auth)))
    info["bytes_per_message"] = len(msgs[0])
    return msgs, info


# --------------------------------------------------------------- attacker
def flood(kind: str, target: tuple[str, int], source: str, duration: float, serial: str) -> dict[str, object]:
    """Send ``kind``'s messages from one socket on ``source`` as fast as this process can for
    ``duration`` s; a thread counts the answers by status."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect(target)
    msgs, info = attack_messages(kind, s, serial)
    s.setblocking(False)
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            if not select.select([s], [], [], 0.05)[0]:
                continue
            while True:
                try:
                    answers[status_of(s.recv(70_000))] += 1
                except (BlockingIOError, ConnectionRefusedError):
                    break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    n, sent, errors, i = len(msgs), 0, 0, 0
    t0 = time.monotonic()
    end = t0 + duration
    while time.monotonic() < end:
        for _ in range(256):
            try:
                s.send(msgs[i % n])
                sent += 1
            except OSError:  # full buffer (EAGAIN/ENOBUFS), ICMP refusal: a flood goes on
                errors += 1
            i += 1
    took = time.monotonic() - t0
    time.sleep(0.5)  # answers still on their way
    stop.set()
    reader.join()
    s.close()
    return {"kind": kind, "sent": sent, "send_errors": errors, "seconds": round(took, 2),
            "rate": round(sent / took), **info, "answers": dict(sorted(answers.items()))}


# -------------------------------------------------------------------- PBX
def answer(req: bytes, status: int, reason: str, tag: str, local: tuple[str, int]) -> bytes:
    """A response to ``req`` (Via, From, To with ``tag``, Call-ID, CSeq copied; Record-Route
    too below 300)."""
    out = [f"SIP/2.0 {status} {reason}".encode()]
    for h in req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        m = _COPY.match(h)
        if not m:
            continue
        name = m.group(1).lower()
        if name == b"record-route" and status >= 300:
            continue
        if name in (b"to", b"t") and b";tag=" not in h.lower():
            h += f";tag={tag}".encode()
        out.append(h)
    contact = f"Contact: <sip:pbx@{local[0]}:{local[1]};transport=tcp>"
    out += [contact.encode(), b"Content-Length: 0", b"", b""]
    return b"\r\n".join(out)


def pbx(relay: tuple[str, int], serial: str, secret: str, seconds: float) -> dict[str, object]:
    """A PBX phoned home over TCP from PBX_SOURCE: registers with digest (SHA-256), answers
    INVITEs 180 and leaves them ringing; CANCEL → 200 + 487, other requests → 200. Prints
    ``ready`` once registered; runs until SIGINT/SIGTERM or ``seconds``."""
    from connector import Framer, Registrar

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((PBX_SOURCE, 0))
    sock.settimeout(5)
    sock.connect(relay)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local = sock.getsockname()[:2]
    reg = Registrar(serial, secret, DOMAIN, "SHA-256", local, 600)
    sock.sendall(reg.request())
    framer, counts = Framer(), Counter[str]()
    ringing: dict[bytes, tuple[bytes, str]] = {}
    announced, why = False, "signal"
    end = time.monotonic() + seconds
    while not stop.is_set():
        if time.monotonic() > end:
            why = "seconds"
            break
        try:
            if not select.select([sock], [], [], 0.2)[0]:
                continue
        except InterruptedError:
            continue
        data = sock.recv(262_144)
        if not data:
            why = "relay closed"
            break
        for msg in framer.feed(data):
            m = _CALLID.search(msg)
            cid = m.group(1).strip() if m else b""
            if msg.startswith(b"SIP/2.0 "):
                if cid == reg.call_id.encode():
                    nxt = reg.on_response(msg)
                    if nxt:
                        sock.sendall(nxt)
                    if reg.registered and not announced:
                        print("ready", flush=True)
                        announced = True
                continue
            method = msg.split(b" ", 1)[0].decode(errors="replace")
            counts[method] += 1
            if method == "INVITE":
                tag = os.urandom(4).hex()
                ringing[cid] = (msg, tag)
                sock.sendall(answer(msg, 180, "Ringing", tag, local))
            elif method == "CANCEL":
                sock.sendall(answer(msg, 200, "OK", os.urandom(4).hex(), local))
                inv = ringing.pop(cid, None)
                if inv:
                    sock.sendall(answer(inv[0], 487, "Request Terminated", inv[1], local))
            elif method != "ACK":
                sock.sendall(answer(msg, 200, "OK", os.urandom(4).hex(), local))
    sock.close()
    return {"stopped": why, "registered": reg.registered, "received": dict(counts), "ringing": len(ringing)}


def check_pbx(target: tuple[str, int], serial: str) -> dict[str, object]:
    """One INVITE without SDP from CHECKER to the PBX: the answers until 180, then CANCEL
    and the answers until the INVITE's final one (ACKed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CHECKER, 0))
    s.connect(target)
    local = s.getsockname()
    uri, cid = f"sip:100@{serial}.{DOMAIN}", f"check-{os.urandom(6).hex()}"
    branch, ftag = "z9hG4bK" + os.urandom(6).hex(), os.urandom(4).hex()
    seen: list[str] = []

    def until(want: set[str], timeout: float = 3.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
            data = s.recv(70_000)
            first = data.split(b"\r\n", 1)[0].decode(errors="replace")
            is_response = first.startswith("SIP/2.0")
            seen.append(first.removeprefix("SIP/2.0 ") if is_response else first.split(" ")[0])
            if status_of(data) in want:
                return data
        return None

    try:
        s.send(sip_request("INVITE", uri, local, call_id=cid, branch=branch, from_tag=ftag))
        got = until({"180"} | {str(c) for c in range(300, 700)})
        rang = got is not None and status_of(got) == "180"
        s.send(sip_request("CANCEL", uri, local, call_id=cid, branch=branch, from_tag=ftag))
        final = until({str(c) for c in range(300, 700)})
        if final is not None:
            to = _TO.search(final)
            s.send(sip_request("ACK", uri, local, call_id=cid, branch=branch, from_tag=ftag,
                               to=to.group(1).decode() if to else ""))
        return {"rang": rang, "answers": seen}
    finally:
        s.close()


def helper(name: str, argv: list[str]) -> int:
    """``run_attack.py _flood KIND ...`` and ``run_attack.py _pbx ...``: one JSON line."""
    ap = argparse.ArgumentParser(prog=f"run_attack.py {name}")
    if name == "_flood":
        ap.add_argument("kind", choices=["routes", "invites", "digest", "mlines"])
        ap.add_argument("--target", required=True)
        ap.add_argument("--source", required=True)
        ap.add_argument("--duration", type=float, default=10.0)
        ap.add_argument("--serial", default="")
    else:
        ap.add_argument("--relay", required=True, help="the relay's TCP ip:port")
        ap.add_argument("--serial", required=True)
        ap.add_argument("--secret", required=True)
        ap.add_argument("--seconds", type=float, default=300.0, help="hard stop")
    a = ap.parse_args(argv)
    if name == "_flood":
        host, _, port = a.target.rpartition(":")
        out = flood(a.kind, (host, int(port)), a.source, min(a.duration, 600.0), a.serial)
    else:
        host, _, port = a.relay.rpartition(":")
        out = pbx((host, int(port)), a.serial, a.secret, min(a.seconds, 900.0))
    print(json.dumps(out), flush=True)
    return 0


# ----------------------------------------------------------------- phases
class RssPeak:
    """The relay's largest RSS while a phase runs (sampled every 0.1 s)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_kib(pid), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return round(self.peak / 1024, 1)


def phase(
    procs: Procs, out: Path, relay_pid: int, target: str, name: str, seconds: float,
) -> dict[str, object]:
    """Probe for ``seconds``: round trips, relay CPU and RSS over the same window."""
    cpu, rss = CpuMeter({"relay": relay_pid}), RssPeak(relay_pid)
    cmd = verb("probe", "--target", target, "--source", CLIENT, "--duration", str(seconds))
    p = procs.start(f"probe-{name}", cmd, log=out / f"probe-{name}.log", stdout=out / f"probe-{name}.json",
                    cpus=PIN["load"])
    p.wait(timeout=seconds + 30)
    probe = json.loads((out / f"probe-{name}.json").read_text())
    used = cpu.stop()["relay"]
    return {"probe": probe, "relay_cpu_pct": used["pct_core"], "relay_rss_mb_peak": rss.stop(),
            "relay_rss_mb_end": round(rss_kib(relay_pid) / 1024, 1)}


def flood_commands(args: argparse.Namespace, kind: str, target: str, tcp: str) -> list[list[str]]:
    if kind == "udp":
        return [verb("udp-flood", "--target", target, "--source", ATTACKERS[0],
                     "--duration", str(args.probe + 2)) for _ in range(args.flooders)]
    if kind == "connections":
        return [verb("tcp-flood", "--target", tcp, "--sources", ",".join(ATTACKERS[: args.sources]),
                     "--count", str(args.count), "--hold", str(args.probe), "--deadline", "120")]
    return [[PYTHON, SCRIPT, "_flood", kind, "--target", target, "--source", ATTACKERS[0],
             "--duration", str(args.probe + 2), "--serial", SERIALS.get(kind, "")]]


def start_pbx(procs: Procs, out: Path, tcp: str, secret: str, seconds: float) -> object:
    """The mlines PBX (``_pbx``), once it printed ``ready`` (registered)."""
    cmd = [PYTHON, SCRIPT, "_pbx", "--relay", tcp, "--serial", SERIALS["mlines"], "--secret", secret,
           "--seconds", str(seconds)]
    p = procs.start("pbx", cmd, log=out / "pbx.log", stdout=out / "pbx.json", cpus=PIN["load"])
    deadline = time.monotonic() + 15
    while b"ready" not in (out / "pbx.json").read_bytes():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"PBX did not register: {(out / 'pbx.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return p


KEEP = ("refused", "dropped", "accept_failures", "udp_bans", 'requests_in_total{method="OPTIONS"}',
        "parse_errors", "pbx_auth", "invite_transactions", "media_ports_in_use", "media_sessions",
        "internal_errors", "requests_forwarded", "forbidden", "overload")


def attack(args: argparse.Namespace, kind: str, base: Path) -> dict[str, object]:
    out = base / kind
    out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    relay = make_relay(out)
    with open(relay.config, "a") as f:
        f.write("\n[transport]\nexempt = []\n")
    secret = relay.add_pbx(SERIALS[kind]) if kind in SERIALS else ""
    try:
        start_relay(procs, relay, out)
        target, tcp = f"{HOST}:{relay.udp}", f"{HOST}:{relay.tcp}"
        res: dict[str, object] = {}
        pbx_proc = None
        if kind == "mlines":
            pbx_proc = start_pbx(procs, out, tcp, secret, 4 * args.probe + 120)
            res["pbx_check"] = check_pbx((HOST, relay.udp), SERIALS["mlines"])
        res["before"] = phase(procs, out, relay.pid, target, "before", args.probe)
        cmds = flood_commands(args, kind, target, tcp)
        floods = [procs.start(f"flood{i}", c, log=out / f"flood{i}.log", stdout=out / f"flood{i}.json",
                              cpus=PIN["load"]) for i, c in enumerate(cmds)]
        whole = CpuMeter({"relay": relay.pid})  # the whole flood, its first second included
        time.sleep(1.0)
        res["during"] = phase(procs, out, relay.pid, target, "during", args.probe)
        for p in floods:
            p.wait(timeout=300)
        used = whole.stop()["relay"]
        res["attack_window"] = {"seconds": used["wall_s"], "relay_cpu_pct": used["pct_core"]}
        res["attack"] = [json.loads((out / f"flood{i}.json").read_text()) for i in range(len(floods))]
        res["attack_commands"] = [show(c) for c in cmds]
        time.sleep(2.0)
        res["after"] = phase(procs, out, relay.pid, target, "after", args.probe)
        m = relay.metrics()
        res["relay_counters"] = {k: v for k, v in m.items() if any(w in k for w in KEEP)}
        if pbx_proc is not None:
            procs.stop(pbx_proc)  # type: ignore[arg-type]
            lines = (out / "pbx.json").read_text().split("\n")
            res["pbx"] = json.loads(next(x for x in reversed(lines) if x.startswith("{")))
        res["reproduce"] = reproduce(args, kind)
        return res
    finally:
        procs.stop_all()


def reproduce(args: argparse.Namespace, kind: str) -> str:
    extra = {"udp": ["--flooders", str(args.flooders)],
             "connections": ["--count", str(args.count), "--sources", str(args.sources)]}.get(kind, [])
    cmd = ["flock", "/tmp/bench.lock", ".venv/bin/python", "bench/run_attack.py", kind, *extra,
           "--probe", f"{args.probe:g}", *(["--no-pin"] if args.no_pin else [])]
    return show(cmd)


def summary(kind: str, r: dict[str, object]) -> str:
    lines = [f"== {kind}"]
    if "pbx_check" in r:
        lines.append(f"  PBX check (INVITE, CANCEL): {json.dumps(r['pbx_check'])}")
    for ph in ("before", "during", "after"):
        x = r[ph]
        assert isinstance(x, dict)
        p = x["probe"]
        lines.append(f"  {ph:6}  OPTIONS p50 {p['p50_ms']:7} ms  p99 {p['p99_ms']:7} ms  "
                     f"max {p['max_ms']:7} ms  lost {p['lost']}/{p['sent']}  "
                     f"relay CPU {x['relay_cpu_pct']:5}%  "
                     f"RSS peak {x['relay_rss_mb_peak']} MB end {x['relay_rss_mb_end']} MB")
    w = r["attack_window"]
    assert isinstance(w, dict)
    lines.append(f"  whole attack (from its start, {w['seconds']} s): relay CPU {w['relay_cpu_pct']}%")
    lines.append(f"  attack: {json.dumps(r['attack'])}")
    if "pbx" in r:
        lines.append(f"  PBX: {json.dumps(r['pbx'])}")
    lines.append(f"  relay: {json.dumps(r['relay_counters'])}")
    lines.append(f"  reproduce: {r['reproduce']}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("_flood", "_pbx"):
        return helper(sys.argv[1], sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", *KINDS])
    ap.add_argument("--probe", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--flooders", type=int, default=1, help="UDP flood processes, all from one source")
    ap.add_argument("--count", type=int, default=20_500, help="connections the flood opens")
    ap.add_argument("--sources", type=int, default=4, choices=[1, 2, 3, 4])
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", help="output directory (default bench/out/attack-<stamp>)")
    args = ap.parse_args()
    if not 1 <= args.probe <= 120:
        ap.error("--probe: 1 to 120 seconds")
    raise_nofile(args.count + 2000)
    cpus = pin(not args.no_pin)
    base = Path(args.out) if args.out else ROOT / "bench" / "out" / time.strftime("attack-%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = str(ROOT)
    results: dict[str, object] = {"machine": machine(), "cpus": cpus, "load_before": os.getloadavg(),
                                  "command": show([PYTHON, *sys.argv])}
    for kind in (KINDS if args.what == "all" else [args.what]):
        results[kind] = attack(args, kind, base)
        print(summary(kind, results[kind]), flush=True)  # type: ignore[arg-type]
        (base / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {base / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
