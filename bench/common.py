"""Shared pieces of the benchmarks: the relay process, SIPp, CPU/RSS probes.

Everything runs on 127.0.0.1; every process a benchmark starts is remembered
by PID in ``Procs`` and stopped by that PID (SIGINT/SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
RELAY_EXE = str(VENV_BIN / "pbx-relay") if (VENV_BIN / "pbx-relay").exists() else "pbx-relay"
SIPP = shutil.which("sipp") or "sipp"
SCENARIOS = BENCH / "scenarios"
DOMAIN = "relay.test"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile(n: int = 65536) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            return n
        except (ValueError, OSError):
            pass
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A port free for both TCP and UDP right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s2:
                s2.bind((HOST, port))
            return port
        except OSError:
            continue


# --------------------------------------------------------------- /proc probes
def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    return sum(cpu_split(pid))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_stat() -> dict[str, list[int]]:
    """/proc/stat per-CPU tick counters: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                parts = line.split()
                out[parts[0]] = [int(x) for x in parts[1:9]]
    return out


class MachineMeter:
    """Machine-wide busy time per CPU over a window, to tell what else was running."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.a = cpu_stat()

    def stop(self) -> dict[str, dict[str, float]]:
        wall = time.monotonic() - self.t0
        b = cpu_stat()
        out = {}
        for cpu, v in b.items():
            d = [y - x for x, y in zip(self.a[cpu], v, strict=False)]
            busy = d[0] + d[1] + d[2] + d[5] + d[6]
            out[cpu] = {
                "busy_pct": round(100 * busy / CLK_TCK / wall, 1),
                "steal_pct": round(100 * d[7] / CLK_TCK / wall, 1),
            }
        return out


# The longest wait_quiet may take: SIPp peers started before it must outlive it
# (sipp_uas_timeout).
QUIET_WAIT_MAX = 240.0


def wait_quiet(max_wait: float = QUIET_WAIT_MAX, threshold_pct: float = 20,
               window: float = 2.0) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until the whole machine is nearly idle: other work on
    a shared 2-core box (a test suite, a build) skews CPU figures and latencies."""
    t0 = time.monotonic()
    while True:
        m = MachineMeter()
        time.sleep(window)
        # The aggregate "cpu" line of /proc/stat already sums every CPU: its busy_pct
        # is in % of one core (up to 100 × nproc).
        busy = m.stop()["cpu"]["busy_pct"]
        if busy < threshold_pct or time.monotonic() - t0 > max_wait:
            return {"waited_s": round(time.monotonic() - t0 - window, 1), "busy_pct_of_core": round(busy, 1)}


def sipp_uas_timeout(duration: float) -> int:
    """``-timeout`` for a SIPp UAS started before a caller's run: the run, its grace, and
    the longest quiet-machine wait before it (else the UAS quits while the caller waits,
    and every call of the run fails)."""
    return int(duration + 120 + QUIET_WAIT_MAX)


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class CpuMeter:
    """CPU of several PIDs over a window: % of one core = Δticks / CLK_TCK / Δwall."""

    def __init__(self, pids: dict[str, int], trees: frozenset[str] = frozenset()):
        self.pids = pids
        self.trees = trees  # names measured with all their descendants (Kamailio's workers)
        self.t0 = time.monotonic()
        self.start = {n: self._ticks(n, p) for n, p in pids.items()}
        self.start_split = {n: self._split(n, p) for n, p in pids.items()}

    def _ticks(self, name: str, pid: int) -> int | None:
        split = self._split(name, pid)
        return sum(split) if split else None

    def _split(self, name: str, pid: int) -> tuple[int, int] | None:
        try:
            return tree_split(pid) if name in self.trees else cpu_split(pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return None

    def stop(self) -> dict[str, dict[str, float]]:
        wall = time.monotonic() - self.t0
        out: dict[str, dict[str, float]] = {}
        for n, p in self.pids.items():
            a, b = self.start[n], self._ticks(n, p)
            if a is None or b is None:
                continue
            cpu_s = (b - a) / CLK_TCK
            out[n] = {
                "cpu_s": round(cpu_s, 2),
                "wall_s": round(wall, 2),
                "pct_core": round(100 * cpu_s / wall, 1) if wall > 0 else 0.0,
            }
            s0, s1 = self.start_split.get(n), self._split(n, p)
            if s0 and s1:
                out[n]["user_s"] = round((s1[0] - s0[0]) / CLK_TCK, 2)
                out[n]["sys_s"] = round((s1[1] - s0[1]) / CLK_TCK, 2)
        return out


# ------------------------------------------------------------------ processes
@dataclass
class Procs:
    """Every child we start, by PID; ``stop_all`` ends exactly those."""

    items: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        log: Path,
        stdout: Path | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        out = open(stdout, "wb") if stdout else subprocess.DEVNULL
        pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        p = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=open(log, "wb"),
            cwd=cwd or ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=pre,
        )
        self.items.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 5) -> int | None:
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
            except ProcessLookupError:
                pass
        return p.returncode

    def stop_all(self) -> None:
        for _, p in reversed(self.items):
            self.stop(p)
        self.items.clear()


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# ---------------------------------------------------------------------- relay
@dataclass
class Relay:
    state_dir: Path
    udp: int
    tcp: int
    tls: int
    admin: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def http(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}{path}", timeout=timeout) as r:
            return str(r.read().decode())

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.http("/metrics").splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def registry(self) -> list[dict[str, object]]:
        return list(json.loads(self.http("/registry", timeout=30)))

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [*relay_exe(), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise RuntimeError(f"pbx-relay {' '.join(args)}: {out.stderr}")
        return out.stdout

    def add_pbx(self, serial: str) -> str:
        """``pbx-relay pbx add`` prints ``secret <value>``."""
        for line in self.cli("pbx", "add", serial).splitlines():
            if line.startswith("secret"):
                return line.split()[1]
        raise RuntimeError("no secret printed")


# run_sip.py --workers N: the relay as `run --workers N`, N nodes sharing a redis-server
# this script starts (docs/cluster.md, "Workers"); 0 = one process, as shipped by default.
WORKERS = 0
REDIS_URL = ""
LINK_SECRET = "bench-" + "0" * 40  # the workers' link secret (loopback only)


def free_run(count: int) -> int:
    """The first of ``count`` consecutive TCP ports free right now (worker i links at port + i)."""
    while True:
        first = free_port()
        try:
            held = []
            for i in range(1, count):
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(t)
                t.bind((HOST, first + i))
            return first
        except OSError:
            continue
        finally:
            for t in held:
                t.close()


def start_redis(procs: Procs, workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Debian's redis-server on a port of its own, nothing written to disk."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", HOST,
           "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    p = procs.start("redis", cmd, log=workdir / "redis.log", stdout=workdir / "redis.out")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return f"redis://{HOST}:{port}", p
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer in 10 s")


def flush_redis() -> None:
    """Empty the benchmark's redis-server: the PBX directory and registrations live there
    with --workers, and every benchmark starts from a fresh relay state."""
    host, port = REDIS_URL.removeprefix("redis://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.sendall(b"FLUSHALL\r\n")
        if not c.recv(16).startswith(b"+OK"):
            raise RuntimeError("redis-server did not flush")


def cluster_section() -> str:
    if not WORKERS:
        return ""
    return f"""
[cluster]
redis_url = "{REDIS_URL}"
node_id = "bench"
listen = "{HOST}:{free_run(WORKERS)}"
secret = "{LINK_SECRET}"
"""


def make_relay(workdir: Path, log_level: str = "info") -> Relay:
    state = workdir / "state"
    if state.exists():  # a fresh relay state for every benchmark (our own output dir only)
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    if REDIS_URL:
        flush_redis()
    r = Relay(state, free_port(), free_port(), free_port(), free_port(), state / "relay.toml")
    log_level = os.environ.get("BENCH_LOG_LEVEL") or log_level  # what the per-call INFO lines cost
    r.config.write_text(f"""
[relay]
domain = "{DOMAIN}"
state_dir = "{state}"
advertise = "{HOST}"
log_level = "{log_level}"

[sip]
udp = ["{HOST}:{r.udp}"]
tcp = ["{HOST}:{r.tcp}"]
tls = ["{HOST}:{r.tls}"]
digest_algorithms = ["MD5", "SHA-256"]

[media]
# BENCH_MEDIA=false: signalling only (SDP untouched), to split what media anchoring costs
enabled = {os.environ.get("BENCH_MEDIA", "true").lower()}

[admin]
listen = "{HOST}:{r.admin}"

[push]
mode = "{os.environ.get("BENCH_PUSH_MODE", "off")}"
{cluster_section()}""")
    return r


# CPU placement: with --pin (the default on 2+ cores) the relay gets the last core to
# itself and every load generator (SIPp, connector, sniffer, py-spy, this script)
# shares the others, so the relay is not preempted by its own load and its
# profile shows on-CPU time. pin() sets both.
PIN: dict[str, set[int] | None] = {"relay": None, "load": None}


def pin(enabled: bool) -> dict[str, list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    if enabled and len(cpus) >= 2:
        PIN["relay"], PIN["load"] = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, PIN["load"])  # children inherit it
    else:
        PIN["relay"] = PIN["load"] = None
    return {k: sorted(v) if v else cpus for k, v in PIN.items()}


def build_compiled(src: Path, out: Path) -> Path:
    """The compiled build of the tree ``src`` (setup.py: PBX_RELAY_COMPILE=1, mypyc), as an
    operator makes it (tests/compiledbuild.py), under ``out``/compiled; built once per ``out``."""
    work = (out / "compiled").resolve()
    if (work / "site").exists():
        return work / "site"
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # after any --relay-commit tree: only `tests` is looked up here
    from tests.compiledbuild import build_compiled as build

    print(f"building the compiled relay from {src} (a minute)", flush=True)
    return build(src, work, PYTHON)


def relay_exe() -> list[str]:
    """``pbx-relay``, or the relay of another source tree when BENCH_RELAY_SRC is set
    (run_sip.py --relay-commit: a ``git archive`` of that commit; PYTHONPATH points there)."""
    if os.environ.get("BENCH_RELAY_SRC"):
        return [PYTHON, "-P", "-m", "relay.cli"]  # -P: not the cwd (this tree) first on sys.path
    return [RELAY_EXE]


def start_relay(
    procs: Procs, r: Relay, workdir: Path, exe: list[str] | None = None, env: dict[str, str] | None = None
) -> Relay:
    workers = ["--workers", str(WORKERS)] if WORKERS else []
    cmd = [*(exe or relay_exe()), "--config", str(r.config), "run", *workers]
    r.proc = procs.start(
        "relay",
        cmd,
        log=workdir / "relay.log",
        stdout=workdir / "relay.out",
        cpus=PIN["relay"],
        env={**os.environ, **env} if env else None,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if r.proc.poll() is not None:
            raise RuntimeError(f"relay exited: {(workdir / 'relay.log').read_text()[-2000:]}")
        if re.search(rb"Point a softphone|workers serving", (workdir / "relay.out").read_bytes()):
            return r
        time.sleep(0.05)
    raise RuntimeError("relay did not start in 20 s")


# ------------------------------------------------------------- Kamailio anchor
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMAILIO_CFG = BENCH / "kamailio" / "kamailio.cfg"


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Kamailio forks its workers from the main process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def tree_split(pid: int) -> tuple[int, int]:
    """(utime, stime) summed over ``pid`` and its descendants, in clock ticks."""
    u = s = 0
    for p in descendants(pid):
        try:
            a, b = cpu_split(p)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        u, s = u + a, s + b
    return u, s


@dataclass
class Kamailio:
    """Kamailio 5.6 doing the relay's job (bench/kamailio/kamailio.cfg), for comparison."""

    workdir: Path
    udp: int
    tcp: int
    secret: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        serial_re = "^[0-9]+[.]" + DOMAIN.replace(".", "[.]") + "$"
        return [
            KAMAILIO,
            "-f",
            str(KAMAILIO_CFG),
            "-DD",  # foreground, no daemon: its PID is ours to stop
            "-E",
            "-m",
            "256",
            "-M",
            "16",
            "-Y",
            str(self.workdir),
            "-w",
            str(self.workdir),
            "-l",
            f"udp:{HOST}:{self.udp}",
            "-l",
            f"tcp:{HOST}:{self.tcp}",
            "-A",
            f'BENCH_DOMAIN="{DOMAIN}"',
            "-A",
            f'BENCH_SECRET="{self.secret}"',
            "-A",
            f'BENCH_SERIAL_RE="{serial_re}"',
        ]

    def ping(self, timeout: float = 0.5) -> bool:
        """OPTIONS over UDP, answered 200 by a worker once Kamailio runs."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            s.settimeout(timeout)
            port = s.getsockname()[1]
            msg = (
                f"OPTIONS sip:{HOST}:{self.udp} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bK{os.urandom(6).hex()}\r\n"
                f"From: <sip:probe@{HOST}>;tag=p\r\nTo: <sip:{HOST}:{self.udp}>\r\n"
                f"Call-ID: ping-{os.urandom(6).hex()}\r\nCSeq: 1 OPTIONS\r\n"
                "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
            s.sendto(msg.encode(), (HOST, self.udp))
            try:
                return s.recv(4096).startswith(b"SIP/2.0 200")
            except OSError:
                return False


def start_kamailio(procs: Procs, workdir: Path) -> Kamailio:
    """Kamailio on fresh ports, pinned like the relay (same CPU); the PBX's secret is made here."""
    workdir.mkdir(parents=True, exist_ok=True)
    k = Kamailio(workdir, free_port(), free_port(), os.urandom(12).hex())
    k.proc = procs.start(
        "kamailio", k.command(), log=workdir / "kamailio.log", cwd=workdir, cpus=PIN["relay"]
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if k.proc.poll() is not None:
            raise RuntimeError(f"kamailio exited: {(workdir / 'kamailio.log').read_text()[-2000:]}")
        if k.ping():
            return k
        time.sleep(0.1)
    raise RuntimeError("kamailio did not answer OPTIONS in 20 s")


# ----------------------------------------------------------------------- SIPp
def sipp_stats(path: Path) -> dict[str, str]:
    """Last row of a SIPp -trace_stat CSV (';'-separated, header on line 1)."""
    if not path.exists():
        return {}
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    if len(lines) < 2:
        return {}
    head = lines[0].split(";")
    row = lines[-1].split(";")
    return dict(zip(head, row, strict=False))


def pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, round(q / 100 * (len(v) - 1))))
    return v[k]


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    sipp_v = [
        x.strip()
        for x in subprocess.run([SIPP, "-v"], capture_output=True, text=True).stdout.splitlines()
        if "SIPp v" in x
    ]
    py = subprocess.run([PYTHON, "-V"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": py,
        "kernel": os.uname().release,
        "sipp": sipp_v[0] if sipp_v else "?",
    }
