#!/usr/bin/env python3
"""CPU per message for hostile shapes: parse alone, and parse + Proxy.on_message (issue 10).

No sockets, no trio: each message goes through ``parse_message`` (or
``StreamFramer``) and, for the second figure, ``Proxy.on_message`` /
``Proxy.on_parse_error`` exactly as relay/service.py calls them, on a proxy built
like bench/core_replay.py's. CPU time is ``time.process_time``; each figure is
the best of --repeat runs of a loop long enough to take ~0.2 s (the least
disturbed by whatever else shares the machine).

1. Route entries: an INVITE for a foreign domain whose Route entries all name
   the relay (so loose routing strips every one: the attack of issue 10, one
   30 KB datagram of ~1,900 entries). With the limits as shipped, more than
   MAX_ROUTES entries are refused by the parser (513); --lifted also measures
   the same counts with the Route limit lifted (monkeypatched here, relay/
   untouched), so that the proxy's own loop shows: parse alone must grow
   linearly, and so must parse + core once the core walks the route set once;
   --lifted also times that walk alone, as the core does it at d9440f1 and
   as it does it with SipMessage.pop_first_values (what the core should call).
2. The costliest shapes tests/test_sip_budget.py and tests/test_sdp.py look
   for, each at its limit: parse, SDP anchoring, stream framing.

    .venv/bin/python bench/run_parse.py [--lifted] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.environ.get("BENCH_RELAY_SRC") or str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_replay import HOST, UAC, make_proxy  # noqa: E402

from relay.media.sdp import NO_PORTS, SdpError, anchor_sdp  # noqa: E402
from relay.sip import SipParseError, StreamFramer, limits, parse_message  # noqa: E402
from relay.sip.framer import FramingLost  # noqa: E402
from relay.sip.headers import NameAddr  # noqa: E402
from relay.sip.uri import SipUri  # noqa: E402

PER_FIELD = 20  # Route entries per field: 1,000 entries in 50 fields, under MAX_HEADERS


def route_invite(n: int) -> bytes:
    entries = [f"<sip:{HOST};lr>" for _ in range(n)]
    fields = [", ".join(entries[i : i + PER_FIELD]) for i in range(0, n, PER_FIELD)]
    lines = [
        "INVITE sip:x@foreign.example SIP/2.0",
        f"Via: SIP/2.0/UDP {HOST}:5072;branch=z9hG4bK-bench;rport",
        *[f"Route: {f}" for f in fields],
        "From: <sip:a@foreign.example>;tag=1", "To: <sip:x@foreign.example>", "Call-ID: bench-routes",
        "CSeq: 1 INVITE", "Max-Forwards: 70", "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """CPU µs per call of ``fn``: best of ``repeat`` loops of ~0.2 s."""
    n = 1
    while True:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        if time.process_time() - t0 > 0.05:
            break
        n *= 4
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, time.process_time() - t0)
    return 1e6 * best / n


def parse_only(data: bytes) -> Callable[[], object]:
    def run() -> object:
        try:
            return parse_message(data)
        except SipParseError as e:
            return e
    return run


def parse_and_core(data: bytes) -> Callable[[], object]:
    proxy = make_proxy()

    def run() -> object:
        try:
            msg = parse_message(data)
        except SipParseError as e:
            return proxy.on_parse_error(e, UAC)
        return proxy.on_message(msg, UAC, 1.0)
    return run


def outcome(data: bytes) -> str:
    out = parse_and_core(data)()
    assert isinstance(out, list)
    return out[0].data.split(b"\r\n", 1)[0].decode() if out else "dropped"


def routes(counts: list[int], repeat: int, lifted: bool) -> None:
    what = ("Route limit lifted (bench only)" if lifted
            else f"limits as shipped, MAX_ROUTES={limits.MAX_ROUTES}")
    print(f"== Route entries naming the relay, INVITE to a foreign domain ({what})")
    print(f"   {'entries':>7} {'octets':>7} {'parse µs':>9} {'/entry':>7} {'parse+core µs':>14} "
          f"{'core µs':>8} {'/entry':>7}  answer")
    for n in counts:
        data = route_invite(n)
        p = per_call(parse_only(data), repeat)
        pc = per_call(parse_and_core(data), repeat)
        print(f"   {n:>7} {len(data):>7} {p:>9.1f} {p / n:>7.2f} {pc:>14.1f} {pc - p:>8.1f} "
              f"{(pc - p) / n:>7.2f}  {outcome(data)}")


def walk_rescanning(data: bytes) -> Callable[[], object]:
    """The core's loose-routing loop at d9440f1: read the route set, parse its
    first entry, pop it (one rewrite), read the set again — per entry."""
    def run() -> object:
        msg = parse_message(data)
        while True:
            top = msg.get_all("route")
            if not top or SipUri.parse(NameAddr.parse(top[0]).uri).host != HOST:
                return msg
            msg.pop_first_value("route")
    return run


def walk_once(data: bytes) -> Callable[[], object]:
    """The same walk with the primitives meant for it: the route set read once,
    each entry parsed once, the entries taken removed in one pass."""
    def run() -> object:
        msg = parse_message(data)
        ours = 0
        for value in msg.get_all("route"):
            if SipUri.parse(NameAddr.parse(value).uri).host != HOST:
                break
            ours += 1
        msg.pop_first_values("route", ours)
        return msg
    return run


def walks(counts: list[int], repeat: int) -> None:
    print("== the loose-routing walk alone (parse + strip every Route entry naming the relay)")
    print(f"   {'entries':>7} {'rescanning µs':>14} {'/entry':>7} {'one pass µs':>12} {'/entry':>7}")
    for n in counts:
        data = route_invite(n)
        old = per_call(walk_rescanning(data), repeat)
        new = per_call(walk_once(data), repeat)
        print(f"   {n:>7} {old:>14.1f} {old / n:>7.2f} {new:>12.1f} {new / n:>7.2f}")


def lift_route_limit() -> None:
    limits.LIST_LIMITS["route"] = ("MAX_ROUTES", 10**6)


# -- the costliest shapes ------------------------------------------------------------------

START = b"INVITE sip:bob@example.com SIP/2.0"
BASE = [b"Via: SIP/2.0/UDP pc33.example.com;branch=z9hG4bK776asdhds",
        b"From: Alice <sip:alice@example.com>;tag=1928301774", b"To: <sip:bob@example.com>",
        b"Call-ID: a84b4c76e66710@pc33.example.com", b"CSeq: 1 INVITE", b"Max-Forwards: 70"]


def sip(*fields: bytes) -> bytes:
    return b"\r\n".join([START, *BASE, *fields, b"Content-Length: 0"]) + b"\r\n\r\n"


def big_datagram() -> bytes:
    head = sip(*[b"X-C: " + b"," * 250 + b"x" * 7600] * 4)
    body = b"b" * (limits.MAX_MESSAGE_SIZE - len(head) - 8)
    return head.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)) + body


SIP_SHAPES: dict[str, bytes] = {
    "plain INVITE": sip(),
    "70 Vias, 13 params each": sip(*[b"Via: SIP/2.0/UDP h%d;branch=z9hG4bK%d" % (i, i) + b";p=1" * 13
                                     for i in range(limits.MAX_VIAS - 1)]),
    "256 one-octet fields": sip(*[b"X:a"] * (limits.MAX_HEADERS - len(BASE) - 1)),
    "one field folded over 1,000 lines": sip(b"X: a" + b"\r\n b" * (limits.MAX_LINES - 20)),
    "32 Contacts, 30 params each": sip(*[b"Contact: <sip:a@b" + b";x" * 15 + b">" + b";y" * 15]
                                       * limits.MAX_CONTACTS),
    "16 KiB of escaped quotes, folded": sip(b'Contact: "' + b'\\"' * 3900 + b"\r\n " + b'\\"' * 3900
                                            + b'" <sip:a@b>'),
    "16 KiB of '<' in a Route, folded": sip(b"Route: ," + b"<" * 7900 + b"\r\n " + b"<" * 7900),
    "64 Routes with quoted display names": sip(b"Route: " + b", ".join(
        [b'"a, b; \\"c\\"" <sip:relay.test;lr;x=1>'] * limits.MAX_ROUTES)),
    "32 KiB header, 1,000 commas, 32 KiB body": big_datagram(),
}

SDP_HEAD = [b"v=0", b"o=- 1 1 IN IP4 192.0.2.1", b"s=-", b"c=IN IP4 192.0.2.1", b"t=0 0"]


def sdp(*lines: bytes) -> bytes:
    return b"\r\n".join([*SDP_HEAD, *lines]) + b"\r\n"


SDP_SHAPES: dict[str, bytes] = {
    "SIPp offer": sdp(b"m=audio 6000 RTP/AVP 0", b"a=rtpmap:0 PCMU/8000"),
    "500 lines of b=": sdp(b"m=audio 4000 RTP/AVP 0", *[b"b=AS:64"] * 500),
    "6 m= x 80 a= lines": sdp(*[line for k in range(6)
                                for line in [b"m=audio %d RTP/AVP 0" % (4000 + 2 * k), *[b"a=x"] * 80]]),
    "32 addresses": sdp(b"m=audio 4000 RTP/AVP 0", *[b"c=IN IP6 2001:db8::%x" % i for i in range(31)]),
    "64 KiB in 4 KiB lines": sdp(b"m=audio 4000 RTP/AVP 0", *[b"a=x:" + b"y" * 4000] * 15),
}


def anchor(data: bytes) -> Callable[[], object]:
    def run() -> object:
        try:
            return anchor_sdp(data, "203.0.113.10", lambda s: [
                NO_PORTS if m.disabled else (20000 + 2 * m.index, 20001 + 2 * m.index) for m in s.media])
        except SdpError as e:
            return e
    return run


def framed(chunks: list[bytes]) -> Callable[[], object]:
    def run() -> object:
        framer = StreamFramer()
        try:
            return [e for c in chunks for e in framer.feed(c)]
        except FramingLost as e:
            return e
    return run


def shapes(repeat: int) -> None:
    print("== costliest SIP shapes, parse alone")
    for name, data in SIP_SHAPES.items():
        res = parse_only(data)()
        kind = f"refused {res.status}" if isinstance(res, SipParseError) else "parsed"
        print(f"   {name:<42} {len(data):>6} octets {per_call(parse_only(data), repeat):>8.1f} µs  {kind}")
    print("== costliest SDP bodies, anchor_sdp (scan + rewrite)")
    for name, data in SDP_SHAPES.items():
        res = anchor(data)()
        kind = f"refused ({res.reason[:40]})" if isinstance(res, SdpError) else "anchored"
        print(f"   {name:<42} {len(data):>6} octets {per_call(anchor(data), repeat):>8.1f} µs  {kind}")
    print("== stream framing (StreamFramer.feed), per stream")
    message = sip(b"X-Pad: y").replace(b"Content-Length: 0", b"Content-Length: 4000") + b"b" * 4000
    streams = {
        "64 KiB of LF, 1 KiB reads, then a message": [b"\n" * 1024] * 64 + [message],
        "a 4 KB body one octet per read": [message[: -4000]] + [bytes([c]) for c in message[-4000:]],
        "16,000 pings in one read": [b"\r\n\r\n" * 16000],
    }
    for name, chunks in streams.items():
        total = sum(len(c) for c in chunks)
        print(f"   {name:<44} {total:>6} octets {len(chunks):>5} reads "
              f"{per_call(framed(chunks), repeat):>9.1f} µs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lifted", action="store_true",
                    help="also measure 10/100/1,000 Route entries with the Route limit lifted")
    a = ap.parse_args()
    print(f"== run_parse: CPU per message (time.process_time, best of {a.repeat}); "
          f"load average {os.getloadavg()[0]:.2f}")
    routes([10, 32, 64, 100, 1000], a.repeat, lifted=False)
    if a.lifted:
        lift_route_limit()
        routes([10, 100, 1000], a.repeat, lifted=True)
        walks([10, 100, 1000], a.repeat)
    shapes(a.repeat)
    src = os.environ.get("BENCH_RELAY_SRC")
    print("  reproduce: " + (f"BENCH_RELAY_SRC={src} " if src else "")
          + ".venv/bin/python bench/run_parse.py" + (" --lifted" if a.lifted else "")
          + (f" --repeat {a.repeat}" if a.repeat != 5 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
