#!/usr/bin/env python3
"""Issue 11 follow-up: CPU per forwarded packet of nftables layouts for the kernel media path.

No relay, no SIP: the network namespaces of tests/kernelnet.py, ``2 × calls`` UDP
endpoints in the peers' namespace paired as calls, and for each layout the relay's
table written directly (every direction latched from the start), then the same
rtpgen load as ``run_media.py --kernel`` (one pinned SCHED_FIFO sender per CPU,
sendmmsg on a raw socket, one recvmmsg receiver). The layouts alternate within one
run, ``--rounds`` times, with the two references (``ref-drop``, ``ref-sink``) of
run_media.py measured once per round, so that load from elsewhere on the machine
hits every layout alike. Layouts (docs/media.md, "Kernel forwarding"):

- ``maps4``: the table as of 1fd746c: prerouting looks up ``latched`` (→ mark),
  ``to_addr``, ``to_port``; forward looks up ``from_port`` (counter). 4 lookups.
- ``maps4f``: maps4 with IP fragments left to userspace (the table since this script).
- ``vmap2``: prerouting looks up ``latched`` as a verdict map whose element jumps
  to the direction's own chain of constants (destination, mark); forward as before.
  2 lookups, same hooks.
- ``netdev1``: a ``netdev`` table on the device: ingress looks up ``latched`` (a
  verdict map), the direction's chain rewrites all four fields with constants,
  counts (named counter) and ``fwd``s the packet to its next hop: the IP stack
  (routing, forward, output hooks) is skipped. 1 lookup.
- ``netdev4``: maps4's four maps in the netdev ingress chain, the source address a
  constant, ``fwd ip to ip daddr``: only right when every peer is on-link (as here).
- ``netdev5``: netdev4 with the next hop from a fifth map (``next_hop``, mark →
  gateway): what a relay whose peers are behind a router needs.

The inet layouts leave ``ip_forward`` and the forward fence as the relay has them;
the netdev ones keep the inet table's notrack and fence chains (nothing passes them).

Root. ``flock /tmp/bench.lock .venv/bin/python bench/run_nft_layouts.py --calls 1500 --rounds 3``
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run_media import (  # noqa: E402
    BENCH,
    DROP_TABLE,
    RELAY_PORTS,
    build_rtpgen,
    ksoftirqd_pids,
    per_packet,
    run_load_c,
    show_step,
    sinks,
)
from relay.media.ebpf import FastPath  # noqa: E402
from tests.kernelnet import PEER_IP, RELAY_IP, KernelNet, inside  # noqa: E402

TAG = 0x5250_0000
DEV = "kmr0"  # tests/kernelnet.py: the relay namespace's end of the veth
Dirs = list[tuple[int, int, int, int]]  # (source port, relay port, destination port, out port)


def _elements(table: str, name: str, items: list[str]) -> str:
    return "".join(f"add element {table} {name} {{ {', '.join(items[i:i + 500])} }}\n"
                   for i in range(0, len(items), 500))


LATCHED_MAPS = ("meta mark set ip saddr . udp sport . udp dport map @latched \\\n"
                "      ip daddr set meta mark map @to_addr udp dport set meta mark map @to_port")
FENCE = f"""
  chain forward {{ type filter hook forward priority filter; policy drop;
    meta mark & 0xffff0000 == 0x52500000 ip saddr set {RELAY_IP} \\
      udp sport set meta mark map @from_port accept; }}
  chain output {{ type filter hook output priority raw; policy accept;
    ip saddr {RELAY_IP} udp sport {RELAY_PORTS[0]}-{RELAY_PORTS[1]} notrack; }}
"""


def maps4(dirs: Dirs) -> str:
    lo, hi = RELAY_PORTS
    text = f"""table inet pbx_relay {{
  map latched {{ type ipv4_addr . inet_service . inet_service : mark; }}
  map to_addr {{ type mark : ipv4_addr; }}
  map to_port {{ type mark : inet_service; }}
  map from_port {{ type mark : inet_service; counter; }}
  chain prerouting {{ type filter hook prerouting priority raw; policy accept;
    ip daddr {RELAY_IP} udp dport {lo}-{hi} notrack udp checksum != 0 {LATCHED_MAPS}; }}
{FENCE}}}
"""
    t = "inet pbx_relay"
    return (text + _elements(t, "latched", [f"{PEER_IP} . {s} . {p} : {TAG | p:#x}" for s, p, _, _ in dirs])
            + _elements(t, "to_addr", [f"{TAG | p:#x} : {PEER_IP}" for _, p, _, _ in dirs])
            + _elements(t, "to_port", [f"{TAG | p:#x} : {d}" for _, p, d, _ in dirs])
            + _elements(t, "from_port", [f"{TAG | p:#x} : {o}" for _, p, _, o in dirs]))


def maps4f(dirs: Dirs) -> str:
    """maps4 with fragments left to userspace (``ip frag-off & 0x3fff == 0``), as adopted."""
    return maps4(dirs).replace("notrack udp checksum", "notrack ip frag-off & 0x3fff == 0 udp checksum")


def vmap2(dirs: Dirs) -> str:
    lo, hi = RELAY_PORTS
    chains = "".join(f"  chain d{p} {{ ip daddr set {PEER_IP} udp dport set {d} "
                     f"meta mark set {TAG | p:#x}; }}\n" for _, p, d, _ in dirs)
    text = f"""table inet pbx_relay {{
  map latched {{ type ipv4_addr . inet_service . inet_service : verdict; }}
  map from_port {{ type mark : inet_service; counter; }}
  chain prerouting {{ type filter hook prerouting priority raw; policy accept;
    ip daddr {RELAY_IP} udp dport {lo}-{hi} notrack udp checksum != 0 \\
      ip saddr . udp sport . udp dport vmap @latched; }}
{chains}{FENCE}}}
"""
    t = "inet pbx_relay"
    return (text + _elements(t, "latched", [f"{PEER_IP} . {s} . {p} : goto d{p}" for s, p, _, _ in dirs])
            + _elements(t, "from_port", [f"{TAG | p:#x} : {o}" for _, p, _, o in dirs]))


def netdev1(dirs: Dirs) -> str:
    lo, hi = RELAY_PORTS
    chains = "".join(
        f"  counter c{p} {{ }}\n  chain d{p} {{ ip daddr set {PEER_IP} udp dport set {d} "
        f"ip saddr set {RELAY_IP} "
        f'udp sport set {o} counter name "c{p}" fwd ip to {PEER_IP} device "{DEV}"; }}\n'
        for _, p, d, o in dirs)
    text = f"""table netdev pbx_relay {{
  map latched {{ type ipv4_addr . inet_service . inet_service : verdict; }}
  chain ingress {{ type filter hook ingress device "{DEV}" priority -500; policy accept;
    ip daddr {RELAY_IP} udp dport {lo}-{hi} ip frag-off & 0x3fff == 0 udp checksum != 0 \\
      ip saddr . udp sport . udp dport vmap @latched; }}
{chains}}}
table inet pbx_relay {{
  chain prerouting {{ type filter hook prerouting priority raw; policy accept;
    ip daddr {RELAY_IP} udp dport {lo}-{hi} notrack; }}
  chain forward {{ type filter hook forward priority filter; policy drop; }}
  chain output {{ type filter hook output priority raw; policy accept;
    ip saddr {RELAY_IP} udp sport {lo}-{hi} notrack; }}
}}
"""
    return text + _elements("netdev pbx_relay", "latched",
                            [f"{PEER_IP} . {s} . {p} : goto d{p}" for s, p, _, _ in dirs])


def netdev4(dirs: Dirs) -> str:
    """maps4's maps in a netdev ingress chain: no verdict map, no per-direction chain,
    the source rewritten with a constant, ``fwd`` to the rewritten destination (on-link)."""
    lo, hi = RELAY_PORTS
    text = f"""table netdev pbx_relay {{
  map latched {{ type ipv4_addr . inet_service . inet_service : mark; }}
  map to_addr {{ type mark : ipv4_addr; }}
  map to_port {{ type mark : inet_service; }}
  map from_port {{ type mark : inet_service; counter; }}
  chain ingress {{ type filter hook ingress device "{DEV}" priority -500; policy accept;
    ip daddr {RELAY_IP} udp dport {lo}-{hi} ip frag-off & 0x3fff == 0 udp checksum != 0 {LATCHED_MAPS} \\
      ip saddr set {RELAY_IP} udp sport set meta mark map @from_port fwd ip to ip daddr device "{DEV}"; }}
}}
table inet pbx_relay {{
  chain prerouting {{ type filter hook prerouting priority raw; policy accept;
    ip daddr {RELAY_IP} udp dport {lo}-{hi} notrack; }}
  chain forward {{ type filter hook forward priority filter; policy drop; }}
  chain output {{ type filter hook output priority raw; policy accept;
    ip saddr {RELAY_IP} udp sport {lo}-{hi} notrack; }}
}}
"""
    t = "netdev pbx_relay"
    return (text + _elements(t, "latched", [f"{PEER_IP} . {s} . {p} : {TAG | p:#x}" for s, p, _, _ in dirs])
            + _elements(t, "to_addr", [f"{TAG | p:#x} : {PEER_IP}" for _, p, _, _ in dirs])
            + _elements(t, "to_port", [f"{TAG | p:#x} : {d}" for _, p, d, _ in dirs])
            + _elements(t, "from_port", [f"{TAG | p:#x} : {o}" for _, p, _, o in dirs]))


def netdev5(dirs: Dirs) -> str:
    """netdev4 with the next hop from a map (what a relay whose peers are not on-link
    needs: the route's gateway, resolved by the relay when it installs the direction)."""
    text = netdev4(dirs).replace("fwd ip to ip daddr device", "fwd ip to meta mark map @next_hop device")
    text = text.replace("  map from_port", "  map next_hop { type mark : ipv4_addr; }\n  map from_port")
    hops = [f"{TAG | p:#x} : {PEER_IP}" for _, p, _, _ in dirs]
    return text + _elements("netdev pbx_relay", "next_hop", hops)


LAYOUTS: dict[str, Callable[[Dirs], str]] = {
    "maps4": maps4, "maps4f": maps4f, "vmap2": vmap2,
    "netdev1": netdev1, "netdev4": netdev4, "netdev5": netdev5, "tcbpf": maps4f}


def fast_path(net: KernelNet, dirs: Dirs) -> FastPath:
    """``tcbpf``: maps4f plus the relay's tc eBPF fast lane (relay/media/ebpf.py) on the
    relay's device, every direction in its map: the table sees only what it leaves."""
    with inside(net.relay_ns):
        fp = FastPath(RELAY_PORTS, [socket.if_nametoindex(DEV)])
    for s, p, d, o in dirs:
        fp.forward(p, (PEER_IP, s), RELAY_IP, o, (PEER_IP, d))
        fp.reset(p)
    return fp


def nft(net: KernelNet, text: str) -> None:
    subprocess.run(["ip", "netns", "exec", net.relay_ns, "nft", "-f", "-"], input=text, text=True, check=True)


def clear(net: KernelNet) -> None:
    for fam in ("inet", "netdev"):
        subprocess.run(["ip", "netns", "exec", net.relay_ns, "nft", "delete", "table", fam, "pbx_relay"],
                       capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--perf", action="store_true", help="perf record -a (999 Hz) during each layout's load")
    args = ap.parse_args()
    out = args.out or BENCH / "out" / f"nftlayouts-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    exe = build_rtpgen(out)
    net = KernelNet("nl-")
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    results: dict = {"cmd": " ".join(sys.argv), "uptime_before": uptime(), "runs": []}  # type: ignore[type-arg]
    try:
        net.up()
        with net.inside_peers():
            eps = []
            for _ in range(2 * args.calls):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
                s.bind((PEER_IP, 0))
                eps.append(s)
            ports = [s.getsockname()[1] for s in eps]
            relay = [RELAY_PORTS[0] + 2 * i for i in range(len(eps))]
            dirs = [(ports[i], relay[i], ports[i ^ 1], relay[i ^ 1]) for i in range(len(eps))]
            spec = [(s.fileno(), RELAY_IP, relay[i]) for i, s in enumerate(eps)]
            expect = [i ^ 1 for i in range(len(eps))]
            sink_socks = sinks([], len(eps), net.relay_ns)
            from bench.run_media import SINK_PORT

            for rnd in range(args.rounds):
                soft = ksoftirqd_pids()
                clear(net)
                nft(net, DROP_TABLE)
                drop = run_load_c(exe, spec, eps, expect, args.seconds, soft)
                subprocess.run(["ip", "netns", "exec", net.relay_ns, "nft", "delete", "table", "inet",
                                "bench_drop"], check=True)
                drop["target"] = "ref-drop"
                show_step(drop)
                sink = run_load_c(exe, [(fd, RELAY_IP, SINK_PORT + i) for i, (fd, _, _) in enumerate(spec)],
                                  sink_socks, list(range(len(spec))), args.seconds, soft)
                sink["target"] = "ref-sink"
                show_step(sink)
                results["runs"] += [{"round": rnd, "uptime": uptime(), **drop}, {"round": rnd, **sink}]
                names = args.layouts.split(",")
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # each first in turn
                    clear(net)
                    nft(net, LAYOUTS[name](dirs))
                    fp = fast_path(net, dirs) if name == "tcbpf" else None
                    perf = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-F", "999", "-o",
                                             str(out / f"perf-{name}-{rnd}.data"), "--", "sleep",
                                             str(args.seconds)]) if args.perf else None
                    res = run_load_c(exe, spec, eps, expect, args.seconds, soft)
                    if perf is not None:
                        perf.wait(timeout=60)
                    if fp is not None:
                        res["fast_path_packets"] = sum(fp.count(p)[0] for _, p, _, _ in dirs)
                        fp.close()
                    res["target"] = name
                    res.update(per_packet(res, drop, sink))
                    show_step(res)
                    results["runs"].append({"round": rnd, "uptime": uptime(), **res})
    finally:
        clear(net)
        net.down()
        results["uptime_after"] = uptime()
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
