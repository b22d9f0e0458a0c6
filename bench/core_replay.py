#!/usr/bin/env python3
"""The relay's SIP core alone: one call's messages through parse + Proxy, in-process.

No sockets, no trio: the messages of the call that bench/run_sip.py drives
(INVITE, 180, 200, ACK, BYE, 200 — shaped like SIPp's, with the relay's own
Via/Record-Route echoed by the "PBX") are fed to ``parse_message`` /
``StreamFramer`` and ``Proxy.on_message`` exactly as relay/transport/flows.py
does, and the CPU time per call is measured (time.process_time). The same for a
phone REGISTER with Path and its 200. The messages are recorded on one proxy and
replayed, timed, on a fresh one with the same key (same branches and tokens), so
building them is not in the figure. Subtracting this from the relay's CPU per call
in a real run gives what the transport layer (trio, sockets, kernel) costs.

    .venv/bin/python bench/core_replay.py --calls 3000 [--cprofile 25]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import sys
import time
from pathlib import Path

# The relay under test: this tree, or the one run_sip.py --relay-commit unpacked.
sys.path.insert(0, os.environ.get("BENCH_RELAY_SRC") or str(Path(__file__).resolve().parent.parent))

from relay.pbx.digest import DigestAuth, ha1  # noqa: E402
from relay.proxy.core import Proxy, ProxyConfig  # noqa: E402
from relay.proxy.flow import Flow  # noqa: E402
from relay.sip import StreamFramer, parse_message  # noqa: E402
from relay.sip.message import Request, Response  # noqa: E402

DOMAIN = "relay.test"
SERIAL = "0123456789"
HOST = "127.0.0.1"
PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
UAC = Flow("udp", HOST, 5072, HOST, 5060)  # the SIPp caller
PBX = Flow("tcp", HOST, 41000, HOST, 5060)  # the connector's phone-home connection
SDP = (
    "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
D = f"{SERIAL}.{DOMAIN}"


def make_proxy() -> Proxy:
    key = hashlib.sha256(b"bench").digest()
    directory = {SERIAL: {a: ha1(a, SERIAL, DOMAIN, "x") for a in ("MD5", "SHA-256")}}
    cfg = ProxyConfig(domain=DOMAIN, advertise=HOST, ports=dict(PORTS), local_names=frozenset({HOST}))
    p = Proxy(cfg, key, DigestAuth(key, DOMAIN, ("MD5", "SHA-256")))
    p.on_directory(directory)
    p.on_flow_opened(PBX)
    p.registrar.registry.bind(SERIAL, PBX, 1e12)
    return p


def crlf(lines: list[str], body: str = "") -> bytes:
    return ("\r\n".join(lines) + f"\r\nContent-Length: {len(body)}\r\n\r\n" + body).encode()


def uac_request(method: str, i: int, cseq: int, ruri: str, route: list[str], to: str) -> bytes:
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {HOST}:5072;branch=z9hG4bK-9-{i}-{cseq}-{method};rport",
    ]
    lines += [f"Route: {r}" for r in route]
    lines += [
        f"From: <sip:201@{D}>;tag=9u{i}",
        f"To: {to}",
        f"Call-ID: {i}-9@{HOST}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:201@{HOST}:5072>",
        "Max-Forwards: 70",
    ]
    if method == "INVITE":
        lines += ["Subject: bench", "Content-Type: application/sdp"]
        return crlf(lines, SDP)
    return crlf(lines)


def uas_response(req: Request, code: int, reason: str, i: int, rr: bool, sdp: bool = False) -> bytes:
    lines = [f"SIP/2.0 {code} {reason}"]
    lines += [f"Via: {v}" for v in req.get_all("via")]
    if rr:
        lines += [f"Record-Route: {r}" for r in req.get_all("record-route")]
    to = req.get("to") or ""
    lines += [
        f"From: {req.get('from')}",
        f"To: {to if 'tag=' in to else to + f';tag=9s{i}'}",
        f"Call-ID: {req.call_id}",
        f"CSeq: {req.get('cseq')}",
    ]
    if req.method == "INVITE":
        lines.append(f"Contact: <sip:100@{HOST}:5070;transport=TCP>")
    if sdp:
        lines.append("Content-Type: application/sdp")
        return crlf(lines, SDP)
    return crlf(lines)


Inputs = list[tuple[Flow, bytes]]


def one_call(p: Proxy, i: int, now: float, framer: StreamFramer, rec: Inputs) -> None:
    """Drive one call through ``p``, recording every message the relay receives."""
    ruri = f"sip:100@{D}"

    def from_uac(data: bytes) -> list:
        rec.append((UAC, data))
        return p.on_message(parse_message(data, datagram=True), UAC, now)

    def from_pbx(data: bytes) -> list:
        rec.append((PBX, data))
        out = []
        for msg in framer.feed(data):
            out += p.on_message(msg, PBX, now)
        return out

    out = from_uac(uac_request("INVITE", i, 1, ruri, [], f"<{ruri}>"))
    assert len(out) == 2, out  # 100 Trying back, INVITE on to the PBX
    inv = parse_message(out[-1].data, datagram=False)
    assert isinstance(inv, Request)
    from_pbx(uas_response(inv, 180, "Ringing", i, True))
    ok = from_pbx(uas_response(inv, 200, "OK", i, True, sdp=True))
    resp = parse_message(ok[0].data, datagram=True)
    assert isinstance(resp, Response) and resp.status == 200
    route = list(reversed(resp.get_all("record-route")))  # UAC route set (RFC 3261 §12.1.2)
    to = resp.get("to") or ""
    target = f"sip:100@{HOST}:5070;transport=TCP"
    ack = from_uac(uac_request("ACK", i, 1, target, route, to))
    assert ack and ack[0].flow == PBX, ack
    fwd_bye = from_uac(uac_request("BYE", i, 2, target, route, to))
    bye = parse_message(fwd_bye[0].data, datagram=False)
    assert isinstance(bye, Request)
    done = from_pbx(uas_response(bye, 200, "OK", i, False))
    assert done and done[0].flow == UAC


def one_register(p: Proxy, i: int, now: float, framer: StreamFramer, rec: Inputs) -> None:
    ruri = f"sip:{D}"
    lines = [
        f"REGISTER {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {HOST}:5072;branch=z9hG4bK-9-{i}-r;rport",
        f"From: <sip:100@{D}>;tag=9r{i}",
        "To: <sip:100@" + D + ">",
        f"Call-ID: r{i}-9@{HOST}",
        "CSeq: 1 REGISTER",
        f"Contact: <sip:100@{HOST}:5072>",
        "Supported: path",
        "Max-Forwards: 70",
        "Expires: 300",
    ]
    data = crlf(lines)
    rec.append((UAC, data))
    out = p.on_message(parse_message(data, datagram=True), UAC, now)
    fwd = parse_message(out[0].data, datagram=False)
    assert isinstance(fwd, Request) and fwd.has("path")
    resp = ["SIP/2.0 200 OK"] + [f"Via: {v}" for v in fwd.get_all("via")]
    resp += [
        f"From: {fwd.get('from')}",
        f"To: {fwd.get('to')};tag=9g{i}",
        f"Call-ID: {fwd.call_id}",
        f"CSeq: {fwd.get('cseq')}",
        f"Contact: <sip:100@{HOST}:5072>;expires=300",
        f"Path: {fwd.get('path')}",
    ]
    data = crlf(resp)
    rec.append((PBX, data))
    back = [o for msg in framer.feed(data) for o in p.on_message(msg, PBX, now)]
    assert back and back[0].flow == UAC


def replay(p: Proxy, inputs: Inputs, now: float) -> int:
    """What flows.py does per datagram / per TCP read, minus the sockets."""
    framer = StreamFramer()
    sent = 0
    for src, data in inputs:
        if src is UAC:
            sent += len(p.on_message(parse_message(data, datagram=True), UAC, now))
        else:
            for msg in framer.feed(data):
                sent += len(p.on_message(msg, PBX, now))
    return sent


def parse_only(inputs: Inputs) -> int:
    """The same inputs through parse_message / StreamFramer alone: the SIP layer's share."""
    framer = StreamFramer()
    parsed = 0
    for src, data in inputs:
        if src is UAC:
            parse_message(data, datagram=True)
            parsed += 1
        else:
            parsed += len(framer.feed(data))
    return parsed


def parse_per_item(fn, n: int, per_item_msgs: int) -> float:
    """CPU µs per item of parsing alone (same recorded inputs as per_item)."""
    rec: Inputs = []
    a = make_proxy()
    fa = StreamFramer()
    for i in range(n):
        fn(a, i, 2.0, fa, rec)
    times = []
    for _ in range(REPEAT):
        t0 = time.process_time()
        parsed = parse_only(rec)
        times.append(time.process_time() - t0)
        assert parsed == per_item_msgs * n, (parsed, per_item_msgs * n)
    return 1e6 * min(times) / n


def per_item(fn, n: int, expect_out: int, prof: cProfile.Profile | None = None) -> float:
    """Record n items on one proxy, replay them on a fresh proxy with the same key
    (same branches and tokens), time the replay: CPU µs per item."""
    rec: Inputs = []
    a = make_proxy()
    fa = StreamFramer()
    for i in range(n):
        fn(a, i, 2.0, fa, rec)
    times = []
    for _ in range(1 if prof else REPEAT):
        b = make_proxy()
        warm: Inputs = []
        for i in range(100):
            fn(b, 10_000_000 + i, 1.0, StreamFramer(), warm)
        if prof:
            prof.enable()
        t0 = time.process_time()
        sent = replay(b, rec, 2.0)
        times.append(time.process_time() - t0)
        if prof:
            prof.disable()
        assert sent == expect_out * n, (sent, expect_out * n)
    # The fastest of REPEAT runs: the least disturbed by whatever else shares the machine.
    return 1e6 * min(times) / n


REPEAT = 5


def fast_split_experiment() -> None:
    """Bench-only experiment (relay/ untouched): give split_commas and _split_outside_quotes
    a fast path for the common case, same results, to size that hot spot. No comma → one
    value; no quote → str.split. Anything with a quote still takes the original loop."""
    import relay.proxy.forwarding as core_mod
    import relay.sip.headers as hdr
    import relay.sip.message as msg_mod
    import relay.sip.parser as parser_mod

    slow_commas, slow_split = hdr.split_commas, hdr._split_outside_quotes

    def split_commas(value: str) -> list[str]:
        if "," not in value and '"' not in value:
            v = value.strip()
            return [v] if v else []
        return slow_commas(value)

    def split_outside_quotes(text: str, sep: str) -> list[str]:
        if '"' not in text:
            return text.split(sep)
        return slow_split(text, sep)

    for mod in (hdr, msg_mod, core_mod, parser_mod):
        if hasattr(mod, "split_commas"):
            mod.split_commas = split_commas
    hdr._split_outside_quotes = split_outside_quotes


# A PBX's REGISTER as phone-home clients send it (digest, +sip.instance, Path support).
PBX_REGISTER = (
    b"REGISTER sip:0123456789@relay.test SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.10:41000;branch=z9hG4bK-524287-1---5c1b3d6f0a9e2c47;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:0123456789@192.0.2.10:41000;transport=tcp>;expires=600;"
    b"+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-0123456789ab>\"\r\n"
    b"To: <sip:0123456789@relay.test>\r\n"
    b"From: <sip:0123456789@relay.test>;tag=a73kszlfl\r\n"
    b"Call-ID: 1j9FpLxk3uxtm8tn@192.0.2.10\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Expires: 600\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, NOTIFY, REFER\r\n"
    b"Supported: path, outbound\r\n"
    b"User-Agent: PBX 5.0\r\n"
    b'Authorization: Digest username="0123456789", realm="relay.test", '
    b'nonce="abcdefabcdefabcdefabcdefabcdef01", uri="sip:0123456789@relay.test", '
    b'response="0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", '
    b'algorithm=SHA-256, qop=auth, nc=00000001, cnonce="xyz"\r\n'
    b"Content-Length: 0\r\n\r\n"
)


def retained_register(n: int) -> float:
    """Bytes of Python heap one parsed PBX REGISTER holds once routing has read it
    (tracemalloc): what an idle PBX connection costs while its transport keeps the
    last message it read (RESULTS.md §5, bug 3)."""
    import gc
    import tracemalloc

    tracemalloc.start()
    gc.collect()
    before = tracemalloc.take_snapshot()
    kept = []
    for _ in range(n):
        m = StreamFramer().feed(PBX_REGISTER)[0]
        assert isinstance(m, Request)
        m.top_via(), m.from_tag, m.to(), m.get_all("contact"), m.get("authorization"), m.cseq
        kept.append(m)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(d.size_diff for d in after.compare_to(before, "filename")) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--cprofile", type=int, default=0, help="also print the top N functions (cProfile)")
    ap.add_argument(
        "--fast-split",
        action="store_true",
        help="experiment: fast paths for split_commas/_split_outside_quotes (monkeypatched here)",
    )
    ap.add_argument("--retained", type=int, default=0,
                    help="also: heap bytes per parsed PBX REGISTER kept after routing read it (N messages)")
    a = ap.parse_args()
    if a.fast_split:
        fast_split_experiment()
    call = per_item(one_call, a.calls, 7)
    reg = per_item(one_register, a.calls, 2)
    call_parse = parse_per_item(one_call, a.calls, 6)
    reg_parse = parse_per_item(one_register, a.calls, 2)
    print(
        f"== core_replay: relay SIP core only (parse_message/StreamFramer + Proxy.on_message "
        f"+ serialise), no sockets, no trio; {a.calls} of each, CPU time (process_time), best of {REPEAT}"
        + (
            "\n   EXPERIMENT --fast-split: split_commas/_split_outside_quotes fast paths patched in"
            if a.fast_split
            else ""
        )
    )
    print(
        f"  call (INVITE, 180, 200, ACK, BYE, 200 in; 100, INVITE, 180, 200, ACK, BYE, 200 out): "
        f"{call:.0f} µs per call, of which parsing the 6 messages in {call_parse:.0f} µs"
    )
    print(f"  phone REGISTER with Path + its 200: {reg:.0f} µs per REGISTER, of which parsing "
          f"{reg_parse:.0f} µs")
    if a.cprofile:
        prof = cProfile.Profile()
        per_item(one_call, a.calls, 7, prof)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.cprofile)
        text = s.getvalue()
        print("  cProfile of the call replay (sorted by own time; cProfile inflates small functions):")
        print("\n".join("    " + x for x in text[text.find("ncalls") :].splitlines() if x.strip()))
    if a.retained:
        held = retained_register(a.retained)
        print(f"  a parsed PBX REGISTER, once read as routing reads it, holds {held:.0f} "
              f"bytes of heap (tracemalloc, {a.retained} kept)")
    src = os.environ.get("BENCH_RELAY_SRC")
    print(
        "  reproduce: "
        + (f"BENCH_RELAY_SRC={src} " if src else "")
        + f".venv/bin/python bench/core_replay.py --calls {a.calls}"
        + (f" --cprofile {a.cprofile}" if a.cprofile else "")
        + (" --fast-split" if a.fast_split else "")
        + (f" --retained {a.retained}" if a.retained else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
