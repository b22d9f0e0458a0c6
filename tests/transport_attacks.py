"""Attackers and a probe for the transport tests and bench/run_attack.py, each its own process.

    python -m tests.transport_attacks udp-flood --target 127.0.0.1:5060 --source 127.0.0.2 --duration 5
    python -m tests.transport_attacks tcp-flood --target 127.0.0.1:5060 --sources 127.0.0.2,127.0.0.3 \\
        --count 20000 --hold 5
    python -m tests.transport_attacks probe --target 127.0.0.1:5060 --source 127.0.0.30 --duration 5

Each prints one JSON line with what it did. Addresses are loopback ones (127.0.0.0/8 is
all on lo, so each is a distinct source) or ones inside a namespace the caller made.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DOMAIN = "relay.test"


def options(source: tuple[str, int], call_id: str, cseq: int = 1) -> bytes:
    """An OPTIONS for the relay itself (answered 200 by the relay, never forwarded)."""
    return (
        f"OPTIONS sip:{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bK{call_id}{cseq};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=p{cseq}\r\nTo: <sip:{DOMAIN}>\r\n"
        f"Call-ID: {call_id}@probe\r\nCSeq: {cseq} OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _target(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------ UDP flood
def udp_flood(target: tuple[str, int], source: str, duration: float, rate: float = 0.0) -> dict[str, float]:
    """Send SIP OPTIONS datagrams from ``source`` as fast as this process can (or at
    ``rate``/s) for ``duration`` seconds. A full socket buffer just drops."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect(target)
    s.setblocking(False)
    payloads = [options(s.getsockname(), f"flood{i}") for i in range(64)]
    sent = 0
    t0 = time.monotonic()
    end = t0 + duration
    while (now := time.monotonic()) < end:
        burst = 256 if rate <= 0 else max(0, int((now - t0) * rate) - sent)
        for i in range(burst):
            try:
                s.send(payloads[i & 63])
                sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
        if rate > 0 and burst == 0:
            time.sleep(0.001)
    s.close()
    return {"sent": sent, "seconds": duration, "rate": sent / duration}


# ------------------------------------------------------------------ TCP flood
def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass
class _Held:
    socks: dict[int, socket.socket]
    poller: select.poll


def _reap(held: _Held) -> int:
    """Close the connections the relay reset or closed; returns how many."""
    gone = 0
    for fd, ev in held.poller.poll(0):
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            s = held.socks.pop(fd)
            held.poller.unregister(fd)
            s.close()
            gone += 1
    return gone


def tcp_flood(target: tuple[str, int], sources: list[str], count: int, hold: float,
              deadline: float = 60.0) -> dict[str, float]:
    """Open ``count`` connections round-robin from ``sources`` as fast as possible;
    keep every one the relay keeps, close the ones it refuses; then hold what is
    left for ``hold`` seconds. Never writes a byte (an idle attacker)."""
    _raise_nofile(count + 1000)
    held = _Held({}, select.poll())
    opened = failed = refused = 0
    t0 = time.monotonic()
    for i in range(count):
        if time.monotonic() - t0 > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((sources[i % len(sources)], 0))
            s.settimeout(5)
            s.connect(target)
        except OSError:
            s.close()
            failed += 1
            continue
        opened += 1
        held.socks[s.fileno()] = s
        held.poller.register(s.fileno(), select.POLLIN)
        if i % 200 == 199:
            refused += _reap(held)
    time.sleep(0.5)
    refused += _reap(held)
    flood_s = time.monotonic() - t0
    end = time.monotonic() + hold
    while time.monotonic() < end:
        time.sleep(0.2)
        refused += _reap(held)
    kept = len(held.socks)
    for s in held.socks.values():
        s.close()
    return {"attempted": count, "opened": opened, "connect_failed": failed, "refused": refused,
            "kept": kept, "flood_seconds": flood_s}


# ---------------------------------------------------------------------- probe
def probe(target: tuple[str, int], source: str, duration: float, interval: float = 0.02,
          timeout: float = 1.0) -> dict[str, object]:
    """A legitimate client: one OPTIONS every ``interval`` s from ``source``; the
    round trip of each (ms), and how many got no answer within ``timeout``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    local = s.getsockname()
    rtts: list[float] = []
    lost = 0
    n = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        n += 1
        call_id = f"probe{os.getpid()}x{n}"
        t = time.monotonic()
        s.sendto(options(local, call_id, n), target)
        want = f"{call_id}@probe".encode()
        while (left := t + timeout - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
            if want in s.recv(70_000):
                rtts.append((time.monotonic() - t) * 1000)
                break
        else:
            lost += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
    s.close()
    return {"sent": n, "answered": len(rtts), "lost": lost, **percentiles(rtts)}


def percentiles(ms: list[float]) -> dict[str, float]:
    """p50/p99/max of a list of milliseconds (empty → NaN)."""
    if not ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    xs = sorted(ms)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return {"p50_ms": round(xs[len(xs) // 2], 2), "p99_ms": round(p99, 2), "max_ms": round(xs[-1], 2)}


# ------------------------------------------------------------------- spawning
ROOT = Path(__file__).resolve().parent.parent


def spawn(*args: str) -> subprocess.Popen[str]:
    """Run one of the verbs above as its own process (it prints one JSON line)."""
    return subprocess.Popen([sys.executable, "-m", "tests.transport_attacks", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def result(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    """The JSON line a spawned verb printed."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="transport_attacks")
    sub = p.add_subparsers(dest="verb", required=True)
    u = sub.add_parser("udp-flood", help="SIP OPTIONS datagrams from one source, as fast as possible")
    u.add_argument("--target", required=True)
    u.add_argument("--source", required=True)
    u.add_argument("--duration", type=float, default=5.0)
    u.add_argument("--rate", type=float, default=0.0, help="datagrams/s (0: as fast as possible)")
    t = sub.add_parser("tcp-flood", help="many idle TCP connections from a few sources")
    t.add_argument("--target", required=True)
    t.add_argument("--sources", required=True, help="comma-separated source IPs")
    t.add_argument("--count", type=int, default=20_000)
    t.add_argument("--hold", type=float, default=0.0, help="seconds to hold what the relay kept")
    t.add_argument("--deadline", type=float, default=60.0, help="stop opening after this many seconds")
    r = sub.add_parser("probe", help="a legitimate client's OPTIONS round trips")
    r.add_argument("--target", required=True)
    r.add_argument("--source", required=True)
    r.add_argument("--duration", type=float, default=5.0)
    r.add_argument("--interval", type=float, default=0.02)
    a = p.parse_args(argv)
    target = _target(a.target)
    if a.verb == "udp-flood":
        out: dict[str, object] = dict(udp_flood(target, a.source, a.duration, a.rate))
    elif a.verb == "tcp-flood":
        out = dict(tcp_flood(target, a.sources.split(","), a.count, a.hold, a.deadline))
    else:
        out = probe(target, a.source, a.duration, a.interval)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:
        print(json.dumps({"error": errno.errorcode.get(e.errno or 0, str(e))}), flush=True)
        sys.exit(1)
