#!/usr/bin/env python3
"""Setup times as seen on the wire at the caller's UDP port (needs root: AF_PACKET).

SIPp reads a 4 ms clock on this kernel (shared testing notes), too coarse for
loopback latencies, so this captures the caller's datagrams on ``lo`` with kernel
timestamps (SO_TIMESTAMPNS) and a classic BPF filter (UDP, the given port,
incoming copies only), and pairs them by Call-ID:

    request → 100 / 180 / 200   for the first INVITE or REGISTER of each Call-ID

Runs until SIGINT/SIGTERM or ``--max-seconds``, then writes JSON to ``--out``:
per-status lists of latencies in ms, and counts (requests, retransmitted
requests, calls with no 200, packets seen).

    python bench/sniff.py --port 5072 --out /tmp/setup.json
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import struct
import sys
import time

ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
SO_RCVBUFFORCE = 33
PACKET_OUTGOING = 4

_CALLID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.I)
_PATH = re.compile(rb"\r\npath[ \t]*:", re.I)
_CSEQ = re.compile(rb"\r\ncseq[ \t]*:[ \t]*\d+[ \t]+([A-Za-z]+)", re.I)


def bpf_udp_port(port: int) -> bytes:
    """ip proto 17 and (udp src port P or dst port P) and not outgoing (lo shows each
    packet twice); packet sockets of type SOCK_DGRAM see the IP header at offset 0."""
    ins = [
        (0x20, 0, 0, 0xFFFFF004),  # ld  [SKF_AD_OFF + SKF_AD_PKTTYPE]
        (0x15, 7, 0, PACKET_OUTGOING),  # jeq #OUTGOING → drop
        (0x30, 0, 0, 9),  # ldb [9]  (IP protocol)
        (0x15, 0, 5, 17),  # jeq #UDP, else drop
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)
        (0x48, 0, 0, 0),  # ldh [x+0]  (source port)
        (0x15, 3, 0, port),  # → accept
        (0x48, 0, 0, 2),  # ldh [x+2]  (destination port)
        (0x15, 1, 0, port),  # → accept
        (0x06, 0, 0, 0),  # drop
        (0x06, 0, 0, 0xFFFF),  # accept
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="the caller's (SIPp UAC's) UDP port")
    ap.add_argument(
        "--peer",
        action="store_true",
        help="--port is the callee's port instead (the relay's): for a caller with a socket per "
        "call (SIPp -t un), whose requests are the packets sent to it",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seconds", type=float, default=600)
    a = ap.parse_args()

    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    prog = bpf_udp_port(a.port)
    import ctypes

    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind(("lo", ETH_P_IP))
    s.settimeout(0.2)

    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("sniffing", flush=True)

    sent: dict[bytes, float] = {}  # Call-ID → time of the first INVITE/REGISTER
    seen: dict[tuple[bytes, int], float] = {}  # (Call-ID, status) → first time
    retrans = 0
    packets = 0
    with_path = 0  # 200s that carry a Path header (REGISTER: the relay's Path echoed by the registrar)
    port = a.port
    end = time.monotonic() + a.max_seconds
    tsize = struct.calcsize("ll")
    while not stop and time.monotonic() < end:
        try:
            data, anc, _, _ = s.recvmsg(65535, socket.CMSG_SPACE(tsize))
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        packets += 1
        ts = None
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == SCM_TIMESTAMPNS:
                sec, nsec = struct.unpack("ll", cdata[:tsize])
                ts = sec + nsec / 1e9
        if ts is None:
            ts = time.time()
        ihl = (data[0] & 0x0F) * 4
        sport = (data[ihl] << 8) | data[ihl + 1]
        payload = data[ihl + 8 :]
        m = _CALLID.search(payload)
        if not m:
            continue
        cid = m.group(1).strip()
        dport = (data[ihl + 2] << 8) | data[ihl + 3]
        if (dport == port) if a.peer else (sport == port):  # from the caller
            if payload.startswith((b"INVITE ", b"REGISTER ")):
                if cid in sent:
                    retrans += 1
                else:
                    sent[cid] = ts
        elif payload.startswith(b"SIP/2.0 "):
            c = _CSEQ.search(payload)
            if c and c.group(1).upper() in (b"INVITE", b"REGISTER"):
                key = (cid, int(payload[8:11]))
                if key not in seen:
                    seen[key] = ts
                    if key[1] == 200 and _PATH.search(payload):
                        with_path += 1
    out: dict[str, object] = {
        "packets": packets,
        "requests": len(sent),
        "request_retransmissions": retrans,
        "ok_with_path": with_path,
    }
    lat: dict[str, list[float]] = {}
    for (cid, status), t in seen.items():
        t0 = sent.get(cid)
        if t0 is not None:
            lat.setdefault(str(status), []).append(round((t - t0) * 1000, 4))
    out["latency_ms"] = lat
    # When were answers slow? Worst INVITE/REGISTER→200 per second of the run.
    if sent:
        first = min(sent.values())
        worst: dict[int, float] = {}
        for (cid, status), t in seen.items():
            t0 = sent.get(cid)
            if status == 200 and t0 is not None:
                sec = int(t0 - first)
                worst[sec] = max(worst.get(sec, 0.0), round((t - t0) * 1000, 1))
        out["worst_200_ms_by_second"] = [worst.get(i, None) for i in range(max(worst) + 1)] if worst else []
    out["without_200"] = len(sent) - len(lat.get("200", []))
    with open(a.out, "w") as f:
        json.dump(out, f)
    print(f"sniff: packets={packets} requests={len(sent)} retrans={retrans}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
