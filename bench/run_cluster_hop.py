"""Issue 13: what the node hop costs, with and without the holder cache (and TLS links).

redis-server and three `pbx-relay run` nodes on 127.0.0.1 (media off, log_level warning):
A holds the PBX (a plain-socket PBX over TCP that answers OPTIONS with 200), B forwards
with the holder cache (the default, 5 s), C with it off (`lookup_cache_ttl = 0`). One UDP
client sends OPTIONS for the PBX one after another and times each round trip:

    direct   client → A → PBX
    cached   client → B → link → A → PBX
    uncached client → C → (Redis: HMGET + GET) → link → A → PBX

and counts the Redis commands each series made (`INFO commandstats`). `--tls`: every
node with `[cluster] link_tls = true`.

    flock /tmp/bench.lock .venv/bin/python bench/run_cluster_hop.py --requests 2000 [--tls]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.realpeers import DOMAIN, RelayProc, free_port, start_relay, stop_relay, write_config  # noqa: E402
from tests.redisfixture import RedisServer  # noqa: E402
from tests.sipclient import Pbx  # noqa: E402

SERIAL = "0123456789"
SECRET = "bench-cluster-secret-0123456789abcdef"


def node(tmp: Path, redis: RedisServer, node_id: str, extra: str,
         directory_of: RelayProc | None) -> RelayProc:
    state = tmp / node_id
    state.mkdir()
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port(), log_level="warning")
    lines = (f'\n[cluster]\nredis_url = "redis://127.0.0.1:{redis.port}"\nnode_id = "{node_id}"\n'
             f'listen = "127.0.0.1:{free_port()}"\nsecret = "{SECRET}"\n{extra}')
    if directory_of is None:
        write_config(r, lines, "enabled = false")
        r.add_pbx(SERIAL)
    else:
        shutil.copy(directory_of.state_dir / "pbx.sqlite", state / "pbx.sqlite")
        r.secrets = dict(directory_of.secrets)
    return start_relay(r, lines, "enabled = false")


def answer_options(pbx: Pbx, stop: threading.Event) -> None:
    while not stop.is_set():
        msg = pbx.stream.recv(0.2)
        if msg is None or not msg.start.startswith("OPTIONS"):
            continue
        lines = ["SIP/2.0 200 OK"]
        for name in ("via", "from", "call-id", "cseq"):
            lines += [f"{name.title()}: {v}" for v in msg.get_all(name)]
        lines += [f"To: {msg.get('to')};tag=b1", "Content-Length: 0"]
        pbx.stream.send(("\r\n".join(lines) + "\r\n\r\n").encode())


def series(node: RelayProc, n: int) -> list[float]:
    """Round trips (ms) of ``n`` OPTIONS for the PBX through ``node``, one after another."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        port = s.getsockname()[1]
        for i in range(n):
            data = (f"OPTIONS sip:{SERIAL}.{DOMAIN} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-h{i}x{time.monotonic_ns()};rport\r\n"
                    f"Max-Forwards: 70\r\nFrom: <sip:bench@{DOMAIN}>;tag=h{i}\r\n"
                    f"To: <sip:{SERIAL}.{DOMAIN}>\r\n"
                    f"Call-ID: hop-{i}-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
            t0 = time.perf_counter()
            s.sendto(data.encode(), ("127.0.0.1", node.udp))
            reply = s.recv(65535)
            out.append((time.perf_counter() - t0) * 1000)
            assert reply.startswith(b"SIP/2.0 200"), reply[:80]
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def commands(redis: RedisServer) -> dict[str, int]:
    out = subprocess.run(["redis-cli", "-p", str(redis.port), "INFO", "commandstats"], capture_output=True,
                         text=True, check=True).stdout
    calls = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls[name.removeprefix("cmdstat_")] = int(rest.split("calls=")[1].split(",")[0])
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--tls", action="store_true", help="links between nodes inside TLS")
    args = ap.parse_args()
    tls = "link_tls = true\n" if args.tls else ""
    tmp = Path(tempfile.mkdtemp(prefix="cluster-hop-"))
    redis = RedisServer(tmp)
    redis.start()
    nodes: list[RelayProc] = []
    stop = threading.Event()
    try:
        a = node(tmp, redis, "node-a", tls, None)
        nodes.append(a)
        nodes.append(b := node(tmp, redis, "node-b", tls, a))
        nodes.append(c := node(tmp, redis, "node-c", tls + "lookup_cache_ttl = 0\n", a))
        pbx = Pbx(a)
        threading.Thread(target=answer_options, args=(pbx, stop), daemon=True).start()
        time.sleep(1.0)
        for n in (a, b, c):
            series(n, 50)  # warm-up: links open, caches and the JIT-less paths touched
        print(f"uptime: {os.popen('uptime').read().strip()}")
        print(f"links: {'TLS' if args.tls else 'TCP'}; {args.requests} OPTIONS per series, one at a time")
        print("| path | p50 ms | p90 ms | p99 ms | Redis HMGET / GET per request |")
        print("| --- | --- | --- | --- | --- |")
        for name, n in (("direct (A)", a), ("node hop, cache on (B)", b), ("node hop, cache off (C)", c)):
            subprocess.run(["redis-cli", "-p", str(redis.port), "CONFIG", "RESETSTAT"], check=True,
                           capture_output=True)
            rtt = series(n, args.requests)
            calls = commands(redis)
            per = f"{calls.get('hmget', 0) / args.requests:.3f} / {calls.get('get', 0) / args.requests:.3f}"
            print(f"| {name} | {pct(rtt, 0.5):.3f} | {pct(rtt, 0.9):.3f} | {pct(rtt, 0.99):.3f} | {per} |")
        print(f"uptime: {os.popen('uptime').read().strip()}")
    finally:
        stop.set()
        for n in nodes:
            stop_relay(n)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
