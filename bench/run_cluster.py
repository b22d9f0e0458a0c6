"""Issue 13, a simulated bigger site: 4 relay nodes, one Redis, 20,000 PBXs, calls between nodes.

On 127.0.0.1 of this machine: a redis-server of our own (ephemeral port, no RDB/AOF) and
four `pbx-relay run --workers 1` nodes (each its own state directory, SIP UDP/TCP/TLS
ports, admin port and cluster link port; one cluster secret; log_level warning; media
**off**: signalling only, SDP untouched, no RTP slice used).

1. **Directory.** `--pbxs` (20,000) serials with fresh secrets go straight into the shared
   directory `pbxrelay:directory` with `SharedDirectory.adopt` (the rows `pbx add` writes:
   realm, HA1 MD5, HA1 SHA-256 from `relay.pbx.digest.ha1`; one EVAL each over one
   connection) before the nodes start, so each node loads all of them at start-up.
2. **Registration.** One `bench/tls_pbxs.py --answer` client per node phones home with a
   quarter of the PBXs at once (TLS, or TCP with `--transport tcp`), digest SHA-256
   REGISTER, and holds every connection. Time until all are registered, registrations/s,
   node CPU per registration (handshake included), RSS per node (/proc), Redis
   `used_memory` and keys.
3. **Calls.** A UDP phone in this script (one socket) sends INVITE (no SDP) → 100 → 200 →
   ACK → BYE → 200 at `--rate` calls/s for `--duration` s to the four nodes in turn, for
   PBXs held by the next node ("cross": one node hop) or by the same node ("same"); the
   PBX clients answer at once. Three phases: same node; cross with every call to a PBX not
   called before (the holder cache cannot help: one lookup per call); cross over `--hot`
   PBXs per node (a PBX called about once a second: the cache, default TTL 5 s, answers
   most). Per phase: setup (INVITE sent → 200 read, in this script) p50/p99, failures,
   Redis commands per call (`CONFIG RESETSTAT` before, `INFO commandstats` after), CPU per
   call of every node, Redis, the phone and the PBX clients (/proc).

Everything runs on the machine's two cores together (no pinning): the figures are the
whole machine's, load generators included. Bounded: every wait has a limit, every child
is stopped by its PID, the state directories are removed; logs and `results.json` stay in
`bench/out/cluster-<date-time>/`.

    # 20,000 TLS PBXs, 200 calls/s × 15 s per phase:
    flock /tmp/bench.lock .venv/bin/python bench/run_cluster.py
    # a quick look:
    flock /tmp/bench.lock .venv/bin/python bench/run_cluster.py --transport tcp --pbxs 400 --rate 20 \\
        --duration 3
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH,
    DOMAIN,
    HOST,
    PYTHON,
    ROOT,
    CpuMeter,
    MachineMeter,
    Procs,
    Relay,
    free_port,
    machine,
    pctl,
    raise_nofile,
    rss_kib,
    show,
)

sys.path.insert(0, str(ROOT))
from relay.pbx.digest import ha1, new_secret  # noqa: E402
from relay.pbx.shared import SharedDirectory  # noqa: E402

NODES = 4
SECRET = "bench-cluster-secret-0123456789abcdef"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
RELAY_EXE = str(ROOT / ".venv" / "bin" / "pbx-relay")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------- Redis
@dataclass
class Redis:
    port: int
    proc: subprocess.Popen[bytes]

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args], capture_output=True, text=True, check=True, timeout=60
        ).stdout

    def info(self, section: str) -> dict[str, str]:
        return dict(line.split(":", 1) for line in self.cli("INFO", section).splitlines() if ":" in line)

    def commands(self) -> dict[str, int]:
        return {
            k.removeprefix("cmdstat_"): int(v.split("calls=")[1].split(",")[0])
            for k, v in self.info("commandstats").items()
            if k.startswith("cmdstat_")
        }

    def keys_by_prefix(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for key in self.cli("--scan").split():
            parts = key.split(":")
            counts[":".join(parts[:2]) + (":*" if len(parts) > 2 else "")] += 1
        return dict(counts)

    def memory(self) -> dict[str, object]:
        return {
            "used_memory": int(self.info("memory")["used_memory"]),
            "dbsize": int(self.cli("DBSIZE")),
            "keys": self.keys_by_prefix(),
        }


def start_redis(procs: Procs, tmp: Path, out: Path) -> Redis:
    port = free_port()
    p = procs.start(
        "redis",
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
            "--protected-mode",
            "yes",
        ],
        log=out / "redis.log",
        stdout=out / "redis.log",
    )
    r = Redis(port, p)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if r.cli("PING").strip() == "PONG":
                return r
        except subprocess.CalledProcessError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start in 10 s")


# ---------------------------------------------------------------------- nodes
def node_config(tmp: Path, i: int, redis: Redis) -> Relay:
    state = tmp / f"node{i}"
    state.mkdir()
    r = Relay(state, free_port(), free_port(), free_port(), free_port(), state / "relay.toml")
    r.config.write_text(f"""
[relay]
domain = "{DOMAIN}"
state_dir = "{state}"
advertise = "{HOST}"
log_level = "warning"

[sip]
udp = ["{HOST}:{r.udp}"]
tcp = ["{HOST}:{r.tcp}"]
tls = ["{HOST}:{r.tls}"]
digest_algorithms = ["MD5", "SHA-256"]

[media]
enabled = false

[admin]
listen = "{HOST}:{r.admin}"

[push]
mode = "off"

[provisioning]
enabled = false

[cluster]
redis_url = "redis://{HOST}:{redis.port}"
node_id = "node{i}"
listen = "{HOST}:{free_port()}"
secret = "{SECRET}"
""")
    return r


def start_node(procs: Procs, r: Relay, i: int, out: Path, timed: bool) -> None:
    stdout = out / f"node{i}.out"
    exe = [PYTHON, str(BENCH / "relay_timed.py")] if timed else [RELAY_EXE]
    r.proc = procs.start(
        f"node{i}",
        [*exe, "--config", str(r.config), "run", "--workers", "1"],
        log=out / f"node{i}.log",
        stdout=stdout,
        env={**os.environ, "RELAY_TIMED_OUT": str(out / f"node{i}.timed.jsonl")} if timed else None,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if r.proc.poll() is not None:
            raise RuntimeError(f"node{i} exited: {(out / f'node{i}.log').read_text()[-2000:]}")
        if b"Point a softphone" in stdout.read_bytes():
            return
        time.sleep(0.1)
    raise RuntimeError(f"node{i} did not start in 90 s")


def fill_directory(redis: Redis, count: int) -> tuple[list[dict[str, str]], float]:
    """``count`` PBXs in the shared directory, a quarter per node: serial → secret per node."""
    per_node: list[dict[str, str]] = [{} for _ in range(NODES)]
    rows = []
    now = time.time()
    for k in range(count):
        serial, secret = f"n{k % NODES}p{k // NODES:05d}", new_secret()
        per_node[k % NODES][serial] = secret
        rows.append(
            (serial, DOMAIN, ha1("MD5", serial, DOMAIN, secret), ha1("SHA-256", serial, DOMAIN, secret), now)
        )
    t0 = time.monotonic()
    added = SharedDirectory(HOST, redis.port).adopt(rows)
    seconds = time.monotonic() - t0
    assert added == count, (added, count)
    return per_node, seconds


# --------------------------------------------------------------- registration
def register(
    procs: Procs, nodes: list[Relay], secrets: list[dict[str, str]], a: argparse.Namespace, out: Path
) -> tuple[dict[str, object], list[subprocess.Popen[bytes]]]:
    clients = []
    meter = CpuMeter({f"node{i}": n.pid for i, n in enumerate(nodes)})
    t0 = time.monotonic()
    for i, n in enumerate(nodes):
        path = out / f"secrets{i}.json"
        path.write_text(json.dumps(secrets[i]))
        port = n.tls if a.transport == "tls" else n.tcp
        cmd = [
            PYTHON,
            str(BENCH / "tls_pbxs.py"),
            "--relay",
            f"{HOST}:{port}",
            "--secrets",
            str(path),
            "--domain",
            DOMAIN,
            "--concurrency",
            str(a.concurrency),
            "--hold",
            "1200",
            "--answer",
        ]
        cmd += ["--plain"] if a.transport == "tcp" else []
        clients.append(procs.start(f"pbxs{i}", cmd, log=out / f"pbxs{i}.log", stdout=out / f"pbxs{i}.out"))
    meter_clients = CpuMeter({f"pbxs{i}": c.pid for i, c in enumerate(clients)})
    lines: dict[int, dict[str, object]] = {}
    peak = [0] * NODES
    deadline = t0 + a.register_timeout
    while len(lines) < NODES and time.monotonic() < deadline:
        for i, c in enumerate(clients):
            peak[i] = max(peak[i], rss_kib(nodes[i].pid))
            text = (out / f"pbxs{i}.out").read_text()
            if i not in lines and text.strip():
                lines[i] = json.loads(text.splitlines()[0])
                lines[i]["done_after_s"] = round(time.monotonic() - t0, 2)
            elif c.poll() is not None and i not in lines:
                raise RuntimeError(f"pbxs{i} exited: {(out / f'pbxs{i}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    wall = time.monotonic() - t0
    cpu = meter.stop()
    cpu_clients = meter_clients.stop()
    ok = sum(int(x["registered"]) for x in lines.values())  # type: ignore[call-overload]
    res: dict[str, object] = {
        "clients": lines,
        "registered": ok,
        "failed": sum(int(x["failed"]) for x in lines.values()),  # type: ignore[call-overload]
        "seconds": round(wall, 2),
        "per_s": round(ok / wall, 1),
        "complete": len(lines) == NODES,
        "node_cpu": cpu,
        "client_cpu": cpu_clients,
        "node_cpu_per_registration_ms": round(1000 * sum(c["cpu_s"] for c in cpu.values()) / max(ok, 1), 3),
        "rss_peak_kib": peak,
    }
    return res, clients


# ---------------------------------------------------------------------- calls
@dataclass
class Call:
    cid: str
    serial: str
    node: int
    t0: float
    tag: str
    setup_ms: float | None = None
    state: str = "invite"
    code: int = 0
    bye_branch: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def headers(msg: bytes) -> tuple[str, dict[str, list[str]]]:
    lines = msg.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    compact = {"i": "call-id", "t": "to", "m": "contact", "v": "via", "f": "from"}
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        out.setdefault(compact.get(key, key), []).append(value.strip())
    return lines[0], out


class Phone:
    """One UDP socket; INVITE → 200 → ACK → BYE → 200 paced at a rate, several calls in flight."""

    def __init__(self, nodes: list[Relay]) -> None:
        self.nodes = nodes
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _send(self, text: str, node: int) -> None:
        self.sock.sendto(text.encode(), (HOST, self.nodes[node].udp))

    def _request(
        self, method: str, ruri: str, c: Call, to: str, cseq: int, branch: str, routes: list[str]
    ) -> str:
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:phone@{DOMAIN}>;tag={c.tag}",
            f"To: {to}",
            f"Call-ID: {c.cid}",
            f"CSeq: {cseq} {method}",
        ]
        lines += [f"Route: {r}" for r in routes]
        lines += [f"Contact: <sip:phone@{HOST}:{self.port}>", "Content-Length: 0"]
        return "\r\n".join(lines) + "\r\n\r\n"

    def invite(self, serial: str, node: int) -> Call:
        self.seq += 1
        c = Call(f"cl{self.seq}-{time.monotonic_ns()}", serial, node, time.perf_counter(), f"t{self.seq}")
        c.extra["branch"] = f"z9hG4bK-i{self.seq}x{time.monotonic_ns()}"
        ruri = f"sip:100@{serial}.{DOMAIN}"
        self._send(self._request("INVITE", ruri, c, f"<{ruri}>", 1, c.extra["branch"], []), node)
        return c

    def on_message(self, msg: bytes, calls: dict[str, Call]) -> None:
        if not msg.startswith(b"SIP/2.0 "):
            return
        start, h = headers(msg)
        c = calls.get(h.get("call-id", [""])[0])
        if c is None:
            return
        code = int(start.split()[1])
        method = h.get("cseq", ["0 X"])[0].split()[-1]
        if method == "INVITE" and code >= 200 and c.state == "invite":
            self._final(c, code, h)
        elif method == "BYE" and code >= 200 and c.state == "bye":
            c.state = "done" if code < 300 else "bye-failed"
            c.code = code if code >= 300 else c.code

    def _final(self, c: Call, code: int, h: dict[str, list[str]]) -> None:
        to = h["to"][0]
        ruri = f"sip:100@{c.serial}.{DOMAIN}"
        if code >= 300:
            c.state, c.code = "failed", code
            self._send(self._request("ACK", ruri, c, to, 1, c.extra["branch"], []), c.node)
            return
        c.setup_ms = (time.perf_counter() - c.t0) * 1000
        rr = [u.strip() for v in h.get("record-route", []) for u in v.split(",")]
        routes = list(reversed(rr))
        contact = h["contact"][0].split("<", 1)[1].split(">", 1)[0]
        self.seq += 1
        self._send(self._request("ACK", contact, c, to, 1, f"z9hG4bK-a{self.seq}", routes), c.node)
        c.state = "bye"
        self._send(self._request("BYE", contact, c, to, 2, f"z9hG4bK-b{self.seq}", routes), c.node)

    def run(self, plan: list[tuple[str, int]], rate: float, grace: float = 5.0) -> dict[str, object]:
        """Start ``plan``'s calls (serial, entry node) at ``rate``/s; wait for them at most ``grace`` s."""
        calls: dict[str, Call] = {}
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        t0 = time.perf_counter()
        k = 0
        while True:
            now = time.perf_counter()
            while k < len(plan) and now >= t0 + k / rate:
                c = self.invite(*plan[k])
                calls[c.cid] = c
                k += 1
            open_calls = sum(1 for c in calls.values() if c.state in ("invite", "bye"))
            if k == len(plan) and (open_calls == 0 or now > t0 + len(plan) / rate + grace):
                break
            wait = max(0.0, t0 + k / rate - now) if k < len(plan) else 0.05
            if sel.select(wait):
                while True:
                    try:
                        data = self.sock.recv(65535)
                    except BlockingIOError:
                        break
                    self.on_message(data, calls)
        sel.close()
        sent_s = len(plan) / rate
        setups = [c.setup_ms for c in calls.values() if c.setup_ms is not None]
        states = Counter(c.state if c.state != "failed" else f"failed {c.code}" for c in calls.values())
        # calls slower than 50 ms to set up: seconds into the phase, entry node, setup ms (stalls in time?)
        slow = [
            (round(c.t0 - t0, 3), c.node, round(c.setup_ms, 1))
            for c in calls.values()
            if c.setup_ms is not None and c.setup_ms > 50
        ]
        return {
            "slow_calls": sorted(slow),
            "calls": len(plan),
            "done": states.get("done", 0),
            "states": dict(states),
            "failed": len(plan) - states.get("done", 0),
            "offered_s": round(sent_s, 2),
            "setup_p50_ms": round(pctl(setups, 50), 2),
            "setup_p90_ms": round(pctl(setups, 90), 2),
            "setup_p99_ms": round(pctl(setups, 99), 2),
            "setup_max_ms": round(max(setups, default=0), 2),
        }


def plans(secrets: list[dict[str, str]], a: argparse.Namespace) -> dict[str, list[tuple[str, int]]]:
    """Each phase's calls: (serial, entry node). Entry nodes in turn; the PBX on the same node or
    the next one; distinct PBX slices per phase (a PBX of "cross, cold" was never called before)."""
    serials = [sorted(s) for s in secrets]
    n = int(a.rate * a.duration)
    q = len(serials[0]) // 3
    pools = {
        "same node": (0, 0, q),
        "cross, cold cache": (1, q, 2 * q),
        "cross, hot PBXs (cache)": (1, 2 * q, 2 * q + a.hot),
    }
    out = {}
    for name, (shift, lo, hi) in pools.items():
        out[name] = []
        for k in range(n):
            x = k % NODES
            pool = serials[(x + shift) % NODES][lo:hi]
            out[name].append((pool[(k // NODES) % len(pool)], x))
    out["_warm-up"] = [(serials[(k + 1) % NODES][-1 - k // NODES], k % NODES) for k in range(40)]
    return out


def gc_counters(nodes: list[Relay], out: Path) -> list[dict[str, dict[str, float]]]:
    """relay_timed.py's counters of every node now (SIGUSR1 appends a line to its file)."""
    files = [out / f"node{i}.timed.jsonl" for i in range(NODES)]
    before = [len(f.read_text().splitlines()) if f.exists() else 0 for f in files]
    for n in nodes:
        os.kill(n.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(
            f.exists() and len(f.read_text().splitlines()) > k for f, k in zip(files, before, strict=True)
        ):
            break
        time.sleep(0.05)
    return [json.loads(f.read_text().splitlines()[-1]) for f in files]


def phase(
    name: str,
    phone: Phone,
    plan: list[tuple[str, int]],
    a: argparse.Namespace,
    nodes: list[Relay],
    redis: Redis,
    clients: list[subprocess.Popen[bytes]],
) -> dict[str, object]:
    redis.cli("CONFIG", "RESETSTAT")
    pids = {f"node{i}": n.pid for i, n in enumerate(nodes)} | {"redis": redis.proc.pid, "phone": os.getpid()}
    pids |= {f"pbxs{i}": c.pid for i, c in enumerate(clients)}
    load0 = uptime()
    gc0 = gc_counters(nodes, a.outdir) if a.timed else []
    meter, mm = CpuMeter(pids), MachineMeter()
    res = phone.run(plan, a.rate)
    cpu, busy = meter.stop(), mm.stop()
    if a.timed:  # cyclic GC per node over the phase: collections and mean pause per generation
        res["gc"] = [
            {
                g: {
                    "count": b[g]["calls"] - a0[g]["calls"],
                    "mean_ms": round(
                        1000 * (b[g]["cpu_s"] - a0[g]["cpu_s"]) / max(b[g]["calls"] - a0[g]["calls"], 1), 1
                    ),
                }
                for g in ("gc_gen0", "gc_gen1", "gc_gen2")
            }
            for a0, b in zip(gc0, gc_counters(nodes, a.outdir), strict=True)
        ]
    cmds = redis.commands()
    done = max(int(res["done"]), 1)  # type: ignore[call-overload]
    nodes_cpu = sum(cpu[f"node{i}"]["cpu_s"] for i in range(NODES))
    res |= {
        "name": name,
        "rate": a.rate,
        "uptime_before": load0,
        "cpu": cpu,
        "machine_busy": busy,
        "redis_commands": cmds,
        "redis_per_call": round(sum(cmds.values()) / done, 3),
        "lookups_per_call": round(cmds.get("hmget", 0) / done, 3),
        "nodes_cpu_per_call_us": round(1e6 * nodes_cpu / done),
        "node_cpu_per_call_us": {
            f"node{i}": round(1e6 * cpu[f"node{i}"]["cpu_s"] / done) for i in range(NODES)
        },
        "redis_cpu_per_call_us": round(1e6 * cpu["redis"]["cpu_s"] / done),
        "phone_cpu_per_call_us": round(1e6 * cpu["phone"]["cpu_s"] / done),
        "pbxs_cpu_per_call_us": round(1e6 * sum(cpu[f"pbxs{i}"]["cpu_s"] for i in range(NODES)) / done),
    }
    log(
        f"{name}: {res['done']}/{res['calls']} done, setup p50 {res['setup_p50_ms']} ms "
        f"p99 {res['setup_p99_ms']} ms, Redis {res['redis_per_call']}/call, "
        f"nodes {res['nodes_cpu_per_call_us']} µs/call"
    )
    return res


# -------------------------------------------------------------------- report
def markdown(res: dict[str, object], cmd: str) -> str:
    m, reg = res["machine"], res["registration"]
    assert isinstance(m, dict) and isinstance(reg, dict)
    mem, nodes = res["redis_memory"], res["nodes"]
    assert isinstance(mem, dict) and isinstance(nodes, list)
    t = str(res["transport"]).upper()
    out = [
        f"## Issue 13: 4 nodes, {res['pbxs']:,} PBXs over {t}, calls between nodes "
        f"({res['started']}–{res['ended']} UTC)",
        "",
        f"Machine: `nproc` {m['nproc']}, {m['cpu']}, kernel {m['kernel']}, {m['python']}; "
        f"load before: `{res['uptime_before']}`; after: `{res['uptime_after']}`. "
        f"Commit {res['commit']}. redis-server and 4 `pbx-relay run --workers 1` nodes on 127.0.0.1, "
        "media off (signalling only), log_level warning, no CPU pinning: nodes, Redis and "
        "every load generator share the 2 cores.",
        "",
        "```",
        cmd,
        "```",
        "",
        f"Directory: {res['pbxs']:,} PBXs written with `SharedDirectory.adopt` in "
        f"{res['directory_s']} s (one EVAL per PBX, one connection); Redis after: "
        f"{mem['directory']['used_memory'] / 2**20:.1f} MiB used_memory, directory hash "
        f"{int(res['directory_hash_bytes']) / 2**20:.1f} MiB.",
        "",
        "| registration | figure |",
        "| --- | --- |",
        f"| registered / failed | {reg['registered']:,} / {reg['failed']} |",
        f"| time to register all (4 clients at once, {res['concurrency']} in flight each) "
        f"| {reg['seconds']} s |",
        f"| registrations/s (whole cluster) | {reg['per_s']} |",
        f"| node CPU per registration ({t} accept + digest REGISTER + claim) "
        f"| {reg['node_cpu_per_registration_ms']} ms |",
        "| RSS per node: started → registered (KiB per PBX) | "
        + "; ".join(
            f"{n['rss_start_kib'] / 1024:.0f} → {n['rss_registered_kib'] / 1024:.0f} MiB "
            f"({(n['rss_registered_kib'] - n['rss_start_kib']) / max(n['pbxs'], 1):.1f})"
            for n in nodes
        )
        + " |",
        f"| pbx_registered per node (/metrics) | {', '.join(str(n['pbx_registered']) for n in nodes)} |",
        f"| Redis used_memory: directory only → registered | {mem['directory']['used_memory'] / 2**20:.1f} → "
        f"{mem['registered']['used_memory'] / 2**20:.1f} MiB |",
        f"| Redis keys after registration | {mem['registered']['dbsize']:,}: {mem['registered']['keys']} |",
        "",
        f"Calls: INVITE (no SDP) → 200 → ACK → BYE → 200, {res['rate']}/s for {res['duration']} s per phase, "
        "from one UDP phone to the 4 nodes in turn; setup = INVITE sent → 200 read in the phone.",
        "",
        "| phase | done / calls | setup p50 / p99 ms | Redis cmds per call (HMGET per call) | "
        "CPU µs per call: 4 nodes (each) | Redis | phone | PBX clients | machine busy % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in res["phases"]:  # type: ignore[attr-defined]
        each = ", ".join(str(v) for v in p["node_cpu_per_call_us"].values())
        out.append(
            f"| {p['name']} | {p['done']} / {p['calls']} | {p['setup_p50_ms']} / {p['setup_p99_ms']} | "
            f"{p['redis_per_call']} ({p['lookups_per_call']}) | {p['nodes_cpu_per_call_us']} ({each}) | "
            f"{p['redis_cpu_per_call_us']} | {p['phone_cpu_per_call_us']} | {p['pbxs_cpu_per_call_us']} | "
            f"{p['machine_busy']['cpu']['busy_pct']} |"
        )
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- main
def node_state(n: Relay) -> dict[str, object]:
    m = n.metrics()
    return {
        "pbx_registered": int(m.get("pbx_relay_pbx_registered", -1)),
        "flows_open": int(m.get("pbx_relay_flows_open", -1)),
        "rss_kib": rss_kib(n.pid),
    }


def run(a: argparse.Namespace, tmp: Path, out: Path, procs: Procs) -> dict[str, object]:
    res: dict[str, object] = {
        "pbxs": a.pbxs,
        "transport": a.transport,
        "rate": a.rate,
        "duration": a.duration,
        "concurrency": a.concurrency,
        "machine": machine(),
        "uptime_before": uptime(),
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }
    a.outdir = out  # relay_timed.py's files (--timed)
    res["nofile"] = raise_nofile(max(65536, 3 * a.pbxs))
    redis = start_redis(procs, tmp, out)
    log(f"redis-server on port {redis.port}; writing {a.pbxs} PBXs into the shared directory")
    secrets, res["directory_s"] = fill_directory(redis, a.pbxs)
    res["directory_s"] = round(float(res["directory_s"]), 2)  # type: ignore[arg-type]
    res["directory_hash_bytes"] = int(redis.cli("MEMORY", "USAGE", "pbxrelay:directory", "SAMPLES", "0"))
    mem = {"directory": redis.memory()}
    nodes = [node_config(tmp, i, redis) for i in range(NODES)]
    for i, n in enumerate(nodes):
        start_node(procs, n, i, out, a.timed)
    time.sleep(2)
    start = [rss_kib(n.pid) for n in nodes]
    log(f"4 nodes up (RSS {[s // 1024 for s in start]} MiB); {a.pbxs} PBXs phone home over {a.transport}")
    reg, clients = register(procs, nodes, secrets, a, out)
    res["registration"] = reg
    log(f"registration: {reg['registered']} ok, {reg['failed']} failed in {reg['seconds']} s")
    time.sleep(3)
    mem["registered"] = redis.memory()
    res["redis_memory"] = mem
    res["nodes"] = [
        node_state(n) | {"rss_start_kib": start[i], "pbxs": len(secrets[i])} for i, n in enumerate(nodes)
    ]
    for st in res["nodes"]:  # type: ignore[attr-defined]
        st["rss_registered_kib"] = st.pop("rss_kib")
    phone = Phone(nodes)
    try:
        todo = plans(secrets, a)
        phone.run(todo.pop("_warm-up"), 20)  # links between nodes opened
        time.sleep(1)
        res["phases"] = [phase(name, phone, plan, a, nodes, redis, clients) for name, plan in todo.items()]
    finally:
        phone.close()
    res["nodes_after"] = [node_state(n) for n in nodes]
    res["alive"] = [n.proc is not None and n.proc.poll() is None for n in nodes]
    res["uptime_after"] = uptime()
    res["ended"] = time.strftime("%H:%M", time.gmtime())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pbxs", type=int, default=20_000, help="PBXs in all (a quarter per node)")
    ap.add_argument("--transport", choices=("tls", "tcp"), default="tls")
    ap.add_argument("--concurrency", type=int, default=200, help="connects+REGISTERs in flight per client")
    ap.add_argument("--rate", type=float, default=200.0, help="calls/s per phase")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--hot", type=int, default=50, help="PBXs per node in the hot phase")
    ap.add_argument("--register-timeout", type=float, default=300.0)
    ap.add_argument("--append-results", action="store_true", help="append the section to bench/RESULTS.md")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timed", action="store_true", help="nodes under relay_timed.py: GC pauses per phase")
    a = ap.parse_args()
    if a.pbxs < 12 * NODES or a.pbxs > 40_000 or a.rate * a.duration > 20_000 or a.duration > 120:
        ap.error("bounded: 48 ≤ --pbxs ≤ 40,000, --rate × --duration ≤ 20,000, --duration ≤ 120")
    cmd = "flock /tmp/bench.lock .venv/bin/python bench/run_cluster.py " + show(sys.argv[1:])
    out = a.out or BENCH / "out" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-cluster-"))
    procs = Procs()
    try:
        res = run(a, tmp, out, procs)
    finally:
        for name, p in reversed(procs.items):  # PBX clients first (SIGINT closes them), then nodes, Redis
            procs.stop(p, signal.SIGINT if name.startswith(("pbxs", "node")) else signal.SIGTERM, timeout=30)
        procs.items.clear()
        shutil.rmtree(tmp, ignore_errors=True)
    res["command"] = cmd
    (out / "results.json").write_text(json.dumps(res, indent=2))
    text = markdown(res, cmd)
    print(text)
    print(f"results: {out / 'results.json'}")
    if a.append_results:
        with (BENCH / "RESULTS.md").open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
