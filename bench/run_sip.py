#!/usr/bin/env python3
"""SIP benchmarks of pbx-relay with SIPp, all on 127.0.0.1 (issue 2, "Benchmark").

    .venv/bin/python bench/run_sip.py calls --rate 200 --duration 30
    .venv/bin/python bench/run_sip.py maxrate
    .venv/bin/python bench/run_sip.py register --rates 500,1000,2000 --duration 10
    .venv/bin/python bench/run_sip.py tls --count 5000
    .venv/bin/python bench/run_sip.py profile --rate 200 --duration 15
    .venv/bin/python bench/run_sip.py all          # everything above, ~6 minutes

Each benchmark starts its own relay (``pbx-relay --config <toml> run``) on a fresh
state directory under bench/out/<stamp>/, prints its figures and the command that
reproduces them, writes them to results.json there, and stops every process it
started by PID. See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (  # noqa: E402
    BENCH,
    DOMAIN,
    HOST,
    PYTHON,
    ROOT,
    SCENARIOS,
    SIPP,
    CpuMeter,
    Kamailio,
    MachineMeter,
    Procs,
    Relay,
    build_compiled,
    cpu_ticks,
    descendants,
    free_port,
    machine,
    make_relay,
    nfds,
    pctl,
    pin,
    raise_nofile,
    rss_kib,
    show,
    sipp_stats,
    sipp_uas_timeout,
    start_kamailio,
    start_redis,
    start_relay,
    wait_quiet,
)

SERIAL = "0123456789"
EXT = "100"
SELF = "bench/run_sip.py"
# --spread: SIPp's caller opens a UDP socket per call (-t un), so calls come from many
# source ports - as from many phones - and SO_REUSEPORT spreads them over the workers
# (with one socket, every call of the run lands on one worker). The setup times are then
# sniffed at the callee's port (sniff.py --peer).
UAC_TRANSPORT = "u1"
EXTRA_PIDS: dict[str, int] = {}  # measured in every run beside the relay: redis-server with --workers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_line(path: Path, needle: bytes, proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        for line in data.splitlines():
            if needle in line:
                return line.decode(errors="replace")
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{what}: no {needle!r} within {timeout} s")


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = set(before) | set(after)
    out = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k.replace("pbx_relay_", ""): v for k, v in sorted(out.items()) if v}


def log_problems(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {
        "tracebacks": text.count("Traceback"),
        "errors": len(re.findall(r" ERROR ", text)),
        "warnings": len(re.findall(r" WARNING ", text)),
    }


# ===================================================================== pieces
class Bench:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.procs = Procs()

    def sipp_uas(
        self, name: str, xml: str, transport: str, port: int, timeout_s: int
    ) -> subprocess.Popen[bytes]:
        cmd = [
            SIPP,
            "-sf",
            str(SCENARIOS / xml),
            "-t",
            transport,
            "-i",
            HOST,
            "-p",
            str(port),
            "-nostdin",
            "-timeout",
            f"{timeout_s}s",
            "-max_recv_loops",
            "10000",
            "-trace_stat",
            "-stf",
            str(self.out / f"{name}_stat.csv"),
            "-fd",
            "1",
            "-trace_err",
            "-error_file",
            str(self.out / f"{name}_errors.log"),
        ]
        return self.procs.start(name, cmd, log=self.out / f"{name}.log", cwd=self.out)

    def connector(
        self,
        relay: Relay | Kamailio,
        uas_port: int,
        secret: str,
        name: str = "connector",
        algorithm: str = "SHA-256",
    ) -> subprocess.Popen[bytes]:
        cmd = [
            PYTHON,
            str(BENCH / "connector.py"),
            "--relay",
            f"{HOST}:{relay.tcp}",
            "--uas",
            f"{HOST}:{uas_port}",
            "--serial",
            SERIAL,
            "--secret",
            secret,
            "--domain",
            DOMAIN,
            "--algorithm",
            algorithm,
            "--reregister",
            "30",
        ]
        p = self.procs.start(name, cmd, log=self.out / f"{name}.log", stdout=self.out / f"{name}.out")
        wait_line(self.out / f"{name}.out", b"ready", p, 15, name)
        return p

    def sniffer(self, port: int, name: str, peer: bool = False) -> subprocess.Popen[bytes]:
        cmd = [
            PYTHON,
            str(BENCH / "sniff.py"),
            *(["--peer"] if peer else []),
            "--port",
            str(port),
            "--out",
            str(self.out / f"{name}_sniff.json"),
            "--max-seconds",
            "600",
        ]
        p = self.procs.start(
            f"{name}-sniff", cmd, log=self.out / f"{name}_sniff.log", stdout=self.out / f"{name}_sniff.out"
        )
        wait_line(self.out / f"{name}_sniff.out", b"sniffing", p, 10, "sniffer")
        return p

    def sipp_uac(
        self, name: str, xml: str, remote: str, rate: float, count: int, hold_ms: int, timeout_s: int
    ) -> tuple[list[str], int]:
        port = free_port()
        limit = int(rate * (hold_ms / 1000 + 3)) + 200
        cmd = [
            SIPP,
            remote,
            "-sf",
            str(SCENARIOS / xml),
            "-set",
            "serial",
            SERIAL,
            "-set",
            "domain",
            DOMAIN,
            "-s",
            EXT,
            "-t",
            UAC_TRANSPORT,
            # a socket per call (-t un): SIPp wants its cap under the open-files limit
            *(["-max_socket", "10000"] if UAC_TRANSPORT == "un" else []),
            "-i",
            HOST,
            "-p",
            str(port),
            "-r",
            str(rate),
            "-rp",
            "1000",
            "-m",
            str(count),
            "-l",
            str(limit),
            "-d",
            str(hold_ms),
            "-nostdin",
            "-timeout",
            f"{timeout_s}s",
            "-timeout_error",
            "-max_recv_loops",
            "10000",
            "-trace_stat",
            "-stf",
            str(self.out / f"{name}_stat.csv"),
            "-fd",
            "1",
            "-trace_err",
            "-error_file",
            str(self.out / f"{name}_errors.log"),
        ]
        return cmd, port

    def run_caller(
        self,
        name: str,
        xml: str,
        remote: str,
        rate: float,
        duration: float,
        hold_ms: int,
        pids: dict[str, int],
        relay: Relay | None = None,
        during: callable[[int], None] | None = None,
        grace_s: int = 60,
        anchor: Kamailio | None = None,
    ) -> dict[str, object]:
        """One SIPp UAC run at ``rate`` for ``duration`` s, sniffed, with CPU of ``pids``
        (``anchor``: Kamailio in the relay's place, its CPU summed over its processes)."""
        quiet = wait_quiet()
        if quiet["waited_s"] > 0.5 or quiet["busy_pct_of_core"] >= 25:
            log(
                f"  (waited {quiet['waited_s']} s for a quiet machine; "
                f"busy {quiet['busy_pct_of_core']} % of a core)"
            )
        count = max(1, int(rate * duration))
        timeout_s = int(duration + hold_ms / 1000 + grace_s)
        cmd, port = self.sipp_uac(name, xml, remote, rate, count, hold_ms, timeout_s)
        spread = UAC_TRANSPORT == "un"
        sniff = self.sniffer(int(remote.rsplit(":", 1)[1]) if spread else port, name, peer=spread)
        before = relay.metrics() if relay else {}
        rss0 = rss_kib(relay.pid) if relay else 0
        # "relay" as a tree: with --workers, the parent and its workers
        meter = CpuMeter({**pids, **EXTRA_PIDS, "sniffer": sniff.pid}, trees=frozenset({"kamailio", "relay"}))
        machine_meter = MachineMeter()
        t0 = time.monotonic()
        uac = self.procs.start(name, cmd, log=self.out / f"{name}.log", cwd=self.out)
        meter.pids["sipp_uac"] = uac.pid
        meter.start["sipp_uac"] = cpu_ticks(uac.pid)
        if during:
            during(uac.pid)
        # The relay's TCP sockets towards the PBX: bytes the kernel still holds (Send-Q).
        # If the relay reports flow_overflow while this stays ~0, its own writer task fell
        # behind, not the peer.
        sendq = {"max_send_q": 0, "max_recv_q": 0, "samples": 0}
        proxy = relay or anchor
        sampling = proxy is not None
        if proxy is not None:
            tcp_port = proxy.tcp

            def ss_sampler() -> None:
                while sampling_flag[0]:
                    try:
                        lines = subprocess.run(
                            ["ss", "-tnH"], capture_output=True, text=True, timeout=5
                        ).stdout.splitlines()
                    except (OSError, subprocess.TimeoutExpired):
                        return
                    for line in lines:
                        f = line.split()
                        if len(f) >= 4 and f[3].endswith(f":{tcp_port}"):
                            sendq["max_recv_q"] = max(sendq["max_recv_q"], int(f[1]))
                            sendq["max_send_q"] = max(sendq["max_send_q"], int(f[2]))
                    sendq["samples"] += 1
                    time.sleep(0.2)

            sampling_flag = [True]
            threading.Thread(target=ss_sampler, daemon=True).start()
        # SIPp's own CPU is read just before it exits: poll.
        last_uac_ticks = meter.start["sipp_uac"]
        while uac.poll() is None:
            try:
                last_uac_ticks = cpu_ticks(uac.pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
            if time.monotonic() - t0 > timeout_s + 10:
                self.procs.stop(uac, signal.SIGKILL)
            time.sleep(0.1)
        wall = time.monotonic() - t0
        if sampling:
            sampling_flag[0] = False
        cpu = meter.stop()
        mach = machine_meter.stop()
        uac_cpu = (last_uac_ticks - (meter.start["sipp_uac"] or 0)) / 100
        cpu["sipp_uac"] = {
            "cpu_s": round(uac_cpu, 2),
            "wall_s": round(wall, 2),
            "pct_core": round(100 * uac_cpu / wall, 1),
        }
        rc = uac.returncode
        self.procs.stop(sniff, signal.SIGTERM)
        after = relay.metrics() if relay else {}
        sn = json.loads((self.out / f"{name}_sniff.json").read_text())
        st = sipp_stats(self.out / f"{name}_stat.csv")
        lat = sn["latency_ms"]
        ok = int(st.get("SuccessfulCall(C)", 0) or 0)
        failed = int(st.get("FailedCall(C)", 0) or 0)
        active = wall - hold_ms / 1000
        res: dict[str, object] = {
            "target_rate": rate,
            "calls": count,
            "successful": ok,
            "failed": failed,
            "sipp_rc": rc,
            "sipp_retransmissions": int(st.get("Retransmissions(C)", 0) or 0),
            "wire_request_retransmissions": sn["request_retransmissions"],
            "ok_with_path": sn.get("ok_with_path", 0),
            "wall_s": round(wall, 2),
            "achieved_rate": round(ok / active, 1) if active > 0 else None,
            "setup_ms": {
                k: {
                    "n": len(v),
                    "p50": round(pctl(v, 50), 3),
                    "p99": round(pctl(v, 99), 3),
                    "max": round(max(v), 3),
                }
                for k, v in sorted(lat.items())
            },
            "sipp_rtd1_mean_ms": st.get("ResponseTime1(C)", ""),
            "cpu": cpu,
            "machine_cpu": mach,
            "quiet_wait": quiet,
            # machine-wide busy time minus what the processes we know about used (≥ 0; tick-sampled,
            # so a few % either way is noise): mostly whatever else runs on the box
            "other_load_pct": max(
                0.0,
                round(
                    sum(v["busy_pct"] for k, v in mach.items() if k != "cpu")
                    - sum(v["pct_core"] for v in cpu.values()),
                    1,
                ),
            ),
            "command": show(cmd),
        }
        if proxy:
            res["relay_pbx_socket"] = sendq
        if relay:
            res["relay_counters"] = counters_delta(before, after)
            res["relay_rss_kib"] = [rss0, rss_kib(relay.pid)]
        return res


def fmt_phase(label: str, r: dict[str, object]) -> str:
    cpu = r["cpu"]
    s200 = r["setup_ms"].get("200", {})
    parts = [
        f"{label}: {r['successful']}/{r['calls']} ok, failed {r['failed']}, "
        f"achieved {r['achieved_rate']}/s (target {r['target_rate']}), "
        f"setup→200 p50 {s200.get('p50')} ms p99 {s200.get('p99')} ms max {s200.get('max')} ms, "
        f"UDP retrans {r['wire_request_retransmissions']}",
        "    machine: "
        + " ".join(f"{k} {v['busy_pct']}% busy" for k, v in r["machine_cpu"].items() if k != "cpu")
        + f"; other processes ≈ {r['other_load_pct']} % of a core",
    ]
    if "relay_pbx_socket" in r:
        q = r["relay_pbx_socket"]
        overflow = r.get("relay_counters", {}).get('pbx_unregistered_total{reason="flow_closed"}', 0)
        parts.append(
            f"    proxy→PBX TCP socket: max Send-Q {q['max_send_q']} B, max Recv-Q {q['max_recv_q']} B "
            f"({q['samples']} samples, 5/s)" + ("; PBX CONNECTION CLOSED BY THE RELAY" if overflow else "")
        )
    for k in ("relay", "redis", "kamailio", "connector", "sipp_uas", "sipp_uac", "sniffer"):
        if k in cpu:
            c = cpu[k]
            parts.append(
                f"    CPU {k:9} {c['pct_core']:5.1f} % of a core  ({c['cpu_s']} s over {c['wall_s']} s; "
                f"user {c.get('user_s')} s, sys {c.get('sys_s')} s)"
            )
    return "\n".join(parts)


# ================================================================== Kamailio
def kamailio_log(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {"errors": text.count(" ERROR: "), "warnings": text.count(" WARNING: ")}


def kamailio_run(
    b: Bench,
    name: str,
    xml: str,
    uas_xml: str,
    steps: list[tuple[str, float]],
    duration: float,
    hold_ms: int,
    until_unsustained: bool = False,
) -> list[dict[str, object]]:
    """The anchor: the same SIPp caller and PBX (connector + SIPp UAS) with Kamailio in the
    relay's place, one run per (label, rate) of ``steps`` (``until_unsustained``: up to the
    first step not sustained); Kamailio is stopped afterwards."""
    runs: list[dict[str, object]] = []
    kam = start_kamailio(b.procs, b.out / "kamailio")
    try:
        port = free_port()
        uas = b.sipp_uas(f"{name}_uas", uas_xml, "t1", port, sipp_uas_timeout(duration) + 60 * len(steps))
        conn = b.connector(kam, port, kam.secret, name=f"{name}_connector")
        time.sleep(0.5)
        for label, rate in steps:
            log(f"{label}: SIPp → Kamailio → connector → SIPp, {rate}/s for {duration} s")
            r = b.run_caller(
                f"{name}_uac_{int(rate)}",
                xml,
                f"{HOST}:{kam.udp}",
                rate,
                duration,
                hold_ms,
                {"kamailio": kam.pid, "connector": conn.pid, "sipp_uas": uas.pid},
                anchor=kam,
                grace_s=30 if hold_ms == 0 else 60,
            )
            r["kamailio_processes"] = len(descendants(kam.pid))
            r["sustained"] = sustained(r)
            runs.append(r)
            log(f"  → {'sustained' if r['sustained'] else 'NOT sustained'}")
            if conn.poll() is not None:
                log(f"{label}: Kamailio closed the PBX connection; the rest is skipped")
                break
            if until_unsustained and not r["sustained"]:
                break
            time.sleep(1 if hold_ms == 0 else 2)  # let the last transactions linger out
    finally:
        alive = kam.proc is not None and kam.proc.poll() is None
        b.procs.stop(kam.proc, signal.SIGTERM, timeout=10)
        for name_, p in b.procs.items:
            if name_ in (f"{name}_uas", f"{name}_connector"):
                b.procs.stop(p, signal.SIGTERM)
    for r in runs:
        r["kamailio_log"] = kamailio_log(b.out / "kamailio" / "kamailio.log")
        r["kamailio_alive"] = alive
    return runs


def per_call_us(r: dict[str, object], who: str) -> float | None:
    """CPU per completed call; the relay's includes its redis-server's (--workers)."""
    c = r["cpu"].get(who)
    if not c or not r["successful"]:
        return None
    extra = r["cpu"].get("redis", {}).get("cpu_s", 0.0) if who == "relay" else 0.0
    return 1e6 * (c["cpu_s"] + extra) / r["successful"]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def print_versus(relay: dict[str, object], kam: dict[str, object], unit: str = "call") -> None:
    """relay vs Kamailio, same load: CPU per call, setup p50/p99, rate; ratios relay ÷ Kamailio."""
    ru, ku = per_call_us(relay, "relay"), per_call_us(kam, "kamailio")
    rs, ks = relay["setup_ms"].get("200", {}), kam["setup_ms"].get("200", {})
    print(
        f"  relay vs Kamailio: CPU per {unit} {ru or 0:.0f} vs {ku or 0:.0f} µs (×{ratio(ru, ku)}); "
        f"→200 p50 {rs.get('p50')} vs {ks.get('p50')} ms (×{ratio(rs.get('p50'), ks.get('p50'))}), "
        f"p99 {rs.get('p99')} vs {ks.get('p99')} ms; achieved {relay['achieved_rate']} vs "
        f"{kam['achieved_rate']}/s; failed {relay['failed']} vs {kam['failed']}"
    )


# ===================================================================== calls
def bench_calls(
    out: Path,
    rate: float,
    duration: float,
    hold_ms: int,
    direct: bool = True,
    profile_s: float = 0,
    kamailio: bool = False,
) -> dict[str, object]:
    b = Bench(out)
    results: dict[str, object] = {"rate": rate, "duration": duration, "hold_ms": hold_ms}
    try:
        if kamailio:
            (results["kamailio"],) = kamailio_run(
                b, "kam", "uac_call.xml", "uas_call.xml", [("calls", rate)], duration, hold_ms
            )
        relay = make_relay(out)
        secret = relay.add_pbx(SERIAL)
        start_relay(b.procs, relay, out)
        if direct:
            port = free_port()
            uas = b.sipp_uas("direct_uas", "uas_call.xml", "u1", port, sipp_uas_timeout(duration))
            time.sleep(0.3)
            log(f"calls: SIPp → SIPp directly, {rate}/s for {duration} s")
            results["direct"] = b.run_caller(
                "direct_uac", "uac_call.xml", f"{HOST}:{port}", rate, duration, hold_ms, {"sipp_uas": uas.pid}
            )
            b.procs.stop(uas, signal.SIGTERM)
        port = free_port()
        uas = b.sipp_uas("relay_uas", "uas_call.xml", "t1", port, sipp_uas_timeout(duration))
        conn = b.connector(relay, port, secret)
        time.sleep(0.5)
        idle = CpuMeter({"relay": relay.pid})
        time.sleep(2)
        results["relay_idle_cpu"] = idle.stop()["relay"]
        during = None
        if profile_s:

            def during(_pid: int) -> None:  # noqa: F811
                time.sleep(min(3, duration / 4))  # let the rate settle
                results["profile"] = start_pyspy(b, relay.pid, profile_s)

        log(
            f"calls: SIPp → relay → connector → SIPp, {rate}/s for {duration} s"
            + (f" (py-spy {profile_s} s)" if profile_s else "")
        )
        results["relay"] = b.run_caller(
            "relay_uac",
            "uac_call.xml",
            f"{HOST}:{relay.udp}",
            rate,
            duration,
            hold_ms,
            {"relay": relay.pid, "connector": conn.pid, "sipp_uas": uas.pid},
            relay=relay,
            during=during,
        )
        if profile_s:
            prof = results["profile"]
            b.procs.stop(prof["proc"], signal.SIGINT, timeout=30)
            prof.pop("proc")
            prof.update(analyse_pyspy(Path(prof["raw"])))
        results["relay_log"] = log_problems(out / "relay.log")
        results["relay_alive"] = relay.proc is not None and relay.proc.poll() is None
    finally:
        b.procs.stop_all()
    return results


def print_calls(res: dict[str, object], cmd: str) -> None:
    print(
        f"\n== calls: INVITE-100/180-200-ACK-(hold {res['hold_ms']} ms)-BYE over UDP, "
        f"{res['rate']}/s for {res['duration']} s"
    )
    if "direct" in res:
        print(fmt_phase("  SIPp → SIPp (direct)   ", res["direct"]))
    if "kamailio" in res:
        k = res["kamailio"]
        print(fmt_phase("  SIPp → Kamailio → SIPp ", k))
        print(
            f"  Kamailio CPU per call: {per_call_us(k, 'kamailio') or 0:.0f} µs "
            f"({k['kamailio_processes']} processes); log {k['kamailio_log']}, alive {k['kamailio_alive']}"
        )
    print(fmt_phase("  SIPp → relay → SIPp    ", res["relay"]))
    r = res["relay"]
    cpu = r["cpu"]["relay"]
    print(
        f"  relay CPU per call: {1e6 * cpu['cpu_s'] / max(1, r['successful']):.0f} µs; "
        f"idle relay {res['relay_idle_cpu']['pct_core']} % of a core"
    )
    if "kamailio" in res:
        print_versus(r, res["kamailio"])
    print(f"  relay counters: {json.dumps(r['relay_counters'])}")
    print(f"  relay log: {res['relay_log']}; relay alive after run: {res['relay_alive']}")
    if "profile" in res:
        print_profile(res["profile"])
    print(f"  reproduce: {cmd}")


# ==================================================================== py-spy
def start_pyspy(b: Bench, pid: int, seconds: float) -> dict[str, object]:
    spy = str(Path(PYTHON).parent / "py-spy")
    raw = b.out / "pyspy_raw.txt"
    cmd = [
        spy,
        "record",
        "--pid",
        str(pid),
        "-d",
        str(int(seconds)),
        "-r",
        "200",
        "-f",
        "raw",
        "-o",
        str(raw),
    ]
    p = b.procs.start("py-spy", cmd, log=b.out / "pyspy.log")
    return {"proc": p, "raw": str(raw), "command": show(cmd)}


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    if "/" not in f and f in ("core.py", "flowtoken.py", "transaction.py", "flow.py"):
        f = "relay/proxy/" + f  # py-spy prints some paths shortened
    for marker in ("/relay/", "/site-packages/", "/lib/python3"):
        if marker in f:
            f = f.split(marker, 1)[1] if marker != "/relay/" else "relay/" + f.split(marker, 1)[1]
            break
    return f"{m.group('fn')} ({f})"


# First match wins: which part of the relay a sample belongs to.
LAYERS = [
    ("SIP parsing (parse_message, StreamFramer)", ("parse_message (", "StreamFramer.")),
    ("proxy logic (Proxy.*: routing, headers, tokens, serialise)", ("Proxy.",)),
    ("handing messages to sockets (Transports.send: sendto / queue put)", ("Transports.send ",)),
    ("TCP writer tasks (Connection.writer → send_all)", ("Connection.writer",)),
    ("receiving (recvfrom / receive_some, incl. trio wait_readable)", ("serve_udp", "Transports._reader")),
    (
        "timers, directory poll, admin",
        ("RelayService._timers", "_directory_refresh", "serve_admin", "PbxDirectory."),
    ),
]


def layer_of(stack: str) -> str:
    for name, needles in LAYERS:
        if any(n in stack for n in needles):
            return name
    return "trio run loop / epoll (no relay frame)"


def analyse_pyspy(raw: Path) -> dict[str, object]:
    """Self and inclusive samples per function from py-spy's collapsed stacks."""
    layers: Counter[str] = Counter()
    idle_worker = 0
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return {"error": "no py-spy output"}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        if frames[-1].startswith(("WorkerThread._work", "BatchedStreamHandler._flusher")):
            # trio's idle worker thread blocked on its lock, the log flusher sleeping
            # (pbxcore/journal.py): py-spy does not see either as idle
            idle_worker += count
            continue
        total += count
        layers[layer_of(stack)] += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        leaf_file = frames[-1].rsplit("(", 1)[-1].rstrip(")")
        by_file[leaf_file] += count

    def top(c: Counter[str], n: int) -> list[tuple[str, int, float]]:
        return [(k, v, round(100 * v / total, 1)) for k, v in c.most_common(n)] if total else []

    return {
        "samples": total,
        "idle_worker_samples_excluded": idle_worker,
        "layers": top(layers, 10),
        "self_top": top(self_c, 25),
        "inclusive_top": top(incl, 40),
        "self_by_file": top(by_file, 15),
    }


def print_profile(p: dict[str, object]) -> None:
    print(
        f"  py-spy: {p.get('samples')} busy samples at 200 Hz "
        f"({p.get('idle_worker_samples_excluded')} samples "
        f"of trio's idle worker thread and the sleeping log flusher left out); "
        f"collapsed stacks (speedscope opens them) in {p.get('raw')}"
    )
    print(f"    command: {p.get('command')}")
    print("    by layer (first match in the stack):")
    for k, v, pct in p.get("layers", []):
        print(f"      {pct:5.1f} %  {v:6}  {k}")
    print("    self time by function:")
    for k, v, pct in p.get("self_top", [])[:15]:
        print(f"      {pct:5.1f} %  {v:6}  {k}")
    print("    inclusive time (relay/ functions):")
    n = 0
    for k, v, pct in p.get("inclusive_top", []):
        if "relay/" in k:
            print(f"      {pct:5.1f} %  {v:6}  {k}")
            n += 1
            if n >= 20:
                break
    print("    self time by file:")
    for k, v, pct in p.get("self_by_file", [])[:10]:
        print(f"      {pct:5.1f} %  {v:6}  {k}")


# =================================================================== maxrate
P99_LIMIT_MS = 200.0


def sustained(r: dict[str, object]) -> bool:
    """No failed call, no UDP retransmission, ≥97 % of the target rate, and p99 setup under
    200 ms (a relay past its capacity queues up and fails only later: T1 is 500 ms)."""
    p99 = r["setup_ms"].get("200", {}).get("p99", float("inf"))
    return (
        r["failed"] == 0
        and r["successful"] == r["calls"]
        and r["wire_request_retransmissions"] == 0
        and p99 < P99_LIMIT_MS
        and (r["achieved_rate"] or 0) >= 0.97 * r["target_rate"]
    )


def step_summary(rate: float, r: dict[str, object]) -> dict[str, object]:
    return {
        "rate": rate,
        "sustained": sustained(r),
        "failed": r["failed"],
        "achieved": r["achieved_rate"],
        "retrans": r["wire_request_retransmissions"],
        "setup_200": r["setup_ms"].get("200"),
        "cpu": {k: v["pct_core"] for k, v in r["cpu"].items()},
        "us_per_call": {k: round(u) for k in ("relay", "kamailio") if (u := per_call_us(r, k))},
        "other_load_pct": r["other_load_pct"],
        "pbx_connection_lost": bool(
            r.get("relay_counters", {}).get('pbx_unregistered_total{reason="flow_closed"}')
        ),
    }


def bench_maxrate(
    out: Path,
    start: float,
    step: float,
    top: float,
    duration: float,
    hold_ms: int,
    confirm: float,
    kamailio: tuple[float, float] | None = None,
) -> dict[str, object]:
    """Relay path at rising rates (one relay); the last clean rate is then re-run
    with the direct comparison for ``confirm`` seconds. ``kamailio`` = (start, step):
    Kamailio's path searched the same way first (its own start and step: it goes further)."""
    b = Bench(out / "search")
    steps = []
    best = 0.0
    res: dict[str, object] = {}
    if kamailio:
        rates, r0 = [], kamailio[0]
        while r0 <= top:
            rates.append(("maxrate", r0))
            r0 += kamailio[1]
        kb = Bench(out / "kamailio_search")
        try:
            runs = kamailio_run(kb, "kam", "uac_call.xml", "uas_call.xml", rates, duration, hold_ms, True)
        finally:
            kb.procs.stop_all()
        res["kamailio_steps"] = [step_summary(r["target_rate"], r) for r in runs]
        res["kamailio_best"] = max([r["target_rate"] for r in runs if r["sustained"]], default=0.0)
    try:
        relay = make_relay(b.out)
        secret = relay.add_pbx(SERIAL)
        start_relay(b.procs, relay, b.out)
        port = free_port()
        uas = b.sipp_uas("uas", "uas_call.xml", "t1", port, 900)
        conn = b.connector(relay, port, secret)
        rate = start
        while rate <= top:
            log(f"maxrate: relay path at {rate}/s for {duration} s")
            r = b.run_caller(
                f"uac_{int(rate)}",
                "uac_call.xml",
                f"{HOST}:{relay.udp}",
                rate,
                duration,
                hold_ms,
                {"relay": relay.pid, "connector": conn.pid, "sipp_uas": uas.pid},
                relay=relay,
            )
            ok = sustained(r)
            steps.append(step_summary(rate, r))
            log(f"  → {'sustained' if ok else 'NOT sustained'}: {steps[-1]}")
            if not ok:
                break
            best = rate
            rate += step
            time.sleep(2)  # let the last transactions linger out
    finally:
        b.procs.stop_all()
    res.update({"steps": steps, "best": best})
    if best and confirm:
        res["confirm"] = bench_calls(out / "confirm", best, confirm, hold_ms, kamailio=bool(kamailio))
    return res


# ================================================================= decompose
def bench_decompose(
    out: Path, rate: float, duration: float, hold_ms: int, fast_split: bool = False
) -> dict[str, object]:
    """Calls through a relay started as bench/relay_timed.py: CPU per call split into
    parsing, proxy decision + serialising, handing to sockets, and the rest (trio, recv)."""
    b = Bench(out)
    timed = out / "relay_timed.jsonl"
    res: dict[str, object] = {"rate": rate, "duration": duration, "fast_split": fast_split}
    try:
        relay = make_relay(out)
        secret = relay.add_pbx(SERIAL)
        start_relay(
            b.procs,
            relay,
            out,
            exe=[PYTHON, str(BENCH / "relay_timed.py")],
            env={"RELAY_TIMED_OUT": str(timed), "BENCH_FAST_SPLIT": "1" if fast_split else "0"},
        )
        port = free_port()
        uas = b.sipp_uas("uas", "uas_call.xml", "t1", port, sipp_uas_timeout(duration))
        conn = b.connector(relay, port, secret)
        time.sleep(0.5)
        log(f"decompose: calls at {rate}/s for {duration} s through the instrumented relay")
        r = b.run_caller(
            "uac",
            "uac_call.xml",
            f"{HOST}:{relay.udp}",
            rate,
            duration,
            hold_ms,
            {"relay": relay.pid, "connector": conn.pid, "sipp_uas": uas.pid},
            relay=relay,
            during=lambda _pid: os.kill(relay.pid, signal.SIGUSR1),
        )
        os.kill(relay.pid, signal.SIGUSR1)
        time.sleep(0.3)
        snaps = [json.loads(x) for x in timed.read_text().splitlines() if x.strip()]
        a, z = snaps[-2], snaps[-1]
        calls = max(1, int(r["successful"]))
        us = {}
        for k in ("udp_parse", "stream_frame_parse", "on_message", "transports_send"):
            us[k] = 1e6 * (z[k]["cpu_s"] - a[k]["cpu_s"]) / calls
        total = 1e6 * (z["process_cpu_s"] - a["process_cpu_s"]) / calls
        main_t = 1e6 * (z["main_thread_cpu_s"] - a["main_thread_cpu_s"]) / calls
        parts = {
            "parse (UDP parse_message + TCP StreamFramer.feed)": us["udp_parse"] + us["stream_frame_parse"],
            "proxy decision + serialise (Dispatcher.on_message minus Transports.send)": us["on_message"]
            - us["transports_send"],
            "handing to sockets (Transports.send: sendto, queue put)": us["transports_send"],
            "rest of the main thread (trio run loop, epoll, recvfrom/recv, TCP writer tasks, timers)": main_t
            - us["udp_parse"]
            - us["stream_frame_parse"]
            - us["on_message"],
            "other threads (trio worker thread: directory polling)": total - main_t,
        }
        gc_us = {
            g: round(1e6 * (z[f"gc_gen{g}"]["cpu_s"] - a[f"gc_gen{g}"]["cpu_s"]) / calls) for g in (0, 1, 2)
        }
        gc_n = {g: z[f"gc_gen{g}"]["calls"] - a[f"gc_gen{g}"]["calls"] for g in (0, 1, 2)}
        res["gc"] = {"us_per_call": gc_us, "collections": gc_n}
        res.update(
            {
                "calls": r,
                "per_call_us": {k: round(v) for k, v in parts.items()},
                "total_us_per_call": round(total),
                "proc_stat_us_per_call": round(1e6 * r["cpu"]["relay"]["cpu_s"] / calls),
            }
        )
    finally:
        b.procs.stop_all()
    return res


def print_decompose(res: dict[str, object], cmd: str) -> None:
    r = res["calls"]
    print(
        f"\n== decompose: where the relay's CPU per call goes, {res['rate']}/s for {res['duration']} s "
        f"(relay run as bench/relay_timed.py: thread CPU clocks around its layers)"
        + (
            "\n   EXPERIMENT --fast-split: split_commas/_split_outside_quotes fast paths "
            "patched into the relay"
            if res.get("fast_split")
            else ""
        )
    )
    print(fmt_phase("  SIPp → relay → SIPp    ", r))
    tot = res["total_us_per_call"]
    print(
        f"  relay CPU per call: {tot} µs (process clock; "
        f"/proc utime+stime says {res['proc_stat_us_per_call']} µs)"
    )
    for k, v in res["per_call_us"].items():
        print(f"    {v:6} µs  {100 * v / tot:5.1f} %  {k}")
    g = res["gc"]
    print(
        f"  of which cyclic GC (inside whichever layer allocated): µs per call by generation "
        f"{g['us_per_call']}, collections {g['collections']}"
    )
    print(f"  reproduce: {cmd}")


# ===================================================================== stall
def bench_stall(
    out: Path, rate: float, duration: float, stall_at: float, stall_s: float
) -> dict[str, object]:
    """Calls at ``rate``; the PBX side (the connector) stops reading for ``stall_s`` seconds
    (SIGSTOP/SIGCONT by PID), as a PBX on a congested uplink would. What does the relay do?"""
    b = Bench(out)
    res: dict[str, object] = {"rate": rate, "duration": duration, "stall_at": stall_at, "stall_s": stall_s}
    try:
        relay = make_relay(out)
        secret = relay.add_pbx(SERIAL)
        start_relay(b.procs, relay, out)
        port = free_port()
        uas = b.sipp_uas("uas", "uas_call.xml", "t1", port, sipp_uas_timeout(duration))
        conn = b.connector(relay, port, secret)

        def during(_pid: int) -> None:
            def stall() -> None:
                time.sleep(stall_at)
                os.kill(conn.pid, signal.SIGSTOP)
                time.sleep(stall_s)
                os.kill(conn.pid, signal.SIGCONT)

            threading.Thread(target=stall, daemon=True).start()

        log(f"stall: calls at {rate}/s; the PBX connector stops reading for {stall_s} s at t={stall_at} s")
        r = b.run_caller(
            "uac",
            "uac_call.xml",
            f"{HOST}:{relay.udp}",
            rate,
            duration,
            1000,
            {"relay": relay.pid, "sipp_uas": uas.pid},
            relay=relay,
            during=during,
            grace_s=10,
        )
        res["calls"] = r
        res["registered_after"] = [x["serial"] for x in relay.registry()]
        text = (out / "relay.log").read_text(errors="replace")
        res["relay_log_overflow_lines"] = [x for x in text.splitlines() if "overflow" in x][:3]
        res["connector_exit"] = (out / "connector.log").read_text(errors="replace").strip().splitlines()[:1]
        res["relay_alive"] = relay.proc is not None and relay.proc.poll() is None
    finally:
        b.procs.stop_all()
    return res


def print_stall(res: dict[str, object], cmd: str) -> None:
    r = res["calls"]
    c = r["relay_counters"]
    print(
        f"\n== stall: calls at {res['rate']}/s for {res['duration']} s; the PBX connection stops reading "
        f"for {res['stall_s']} s at t={res['stall_at']} s"
    )
    print(f"  calls: {r['successful']}/{r['calls']} ok, failed {r['failed']}")
    n480 = c.get('responses_sent_total{status="480"}', 0)
    gone = c.get('pbx_unregistered_total{reason="flow_closed"}', 0)
    print(
        f"  relay: 480 sent {n480}, PBX unregistered (flow closed) {gone}, "
        f"registered after the run: {res['registered_after']}"
    )
    print(f"  relay log: {res['relay_log_overflow_lines']}")
    print(f"  connector: {res['connector_exit']}")
    print(f"  reproduce: {cmd}")


# ================================================================== register
def bench_register(
    out: Path, rates: list[float], duration: float, kamailio: bool = False
) -> dict[str, object]:
    b = Bench(out)
    res: dict[str, object] = {"duration": duration, "steps": []}
    try:
        if kamailio:
            res["kamailio_steps"] = kamailio_run(
                b,
                "kam_reg",
                "uac_register.xml",
                "uas_register.xml",
                [("register", x) for x in rates],
                duration,
                0,
            )
        relay = make_relay(out)
        secret = relay.add_pbx(SERIAL)
        start_relay(b.procs, relay, out)
        port = free_port()
        uas = b.sipp_uas("reg_uas", "uas_register.xml", "t1", port, 900)
        conn = b.connector(relay, port, secret)
        time.sleep(0.5)
        for rate in rates:
            if conn.poll() is not None:
                # The relay closed the PBX's connection (see the stall benchmark): phone home again.
                log("register: the PBX connection was closed by the relay; the connector phones home again")
                res.setdefault("reconnects", 0)
                res["reconnects"] = int(res["reconnects"]) + 1
                b.procs.stop(uas, signal.SIGTERM)
                port = free_port()
                uas = b.sipp_uas(f"reg_uas_{int(rate)}", "uas_register.xml", "t1", port, 900)
                conn = b.connector(relay, port, secret, name=f"connector_{int(rate)}")
            log(f"register: phone REGISTERs with Path through the relay at {rate}/s for {duration} s")
            r = b.run_caller(
                f"reg_uac_{int(rate)}",
                "uac_register.xml",
                f"{HOST}:{relay.udp}",
                rate,
                duration,
                0,
                {"relay": relay.pid, "connector": conn.pid, "sipp_uas": uas.pid},
                relay=relay,
                grace_s=30,
            )
            r["sustained"] = sustained(r)
            r["pbx_connection_lost"] = conn.poll() is not None or bool(
                r["relay_counters"].get('pbx_unregistered_total{reason="flow_closed"}')
            )
            res["steps"].append(r)
            time.sleep(1)
        # Did the PBX side see the Path? (SIPp UAS echoes it; the relay's forwarded count says it went.)
        res["relay_log"] = log_problems(out / "relay.log")
        res["relay_alive"] = relay.proc is not None and relay.proc.poll() is None
    finally:
        b.procs.stop_all()
    return res


def print_register(res: dict[str, object], cmd: str) -> None:
    print(
        f"\n== register: phone REGISTER (Supported: path) over UDP → relay adds Path → PBX "
        f"connector/SIPp UAS answers 200, {res['duration']} s per rate"
    )
    kam = {k["target_rate"]: k for k in res.get("kamailio_steps", [])}
    for r in res["steps"]:
        k = kam.get(r["target_rate"])
        if k:
            print(fmt_phase(f"  Kamailio {k['target_rate']}/s", k).replace("setup→200", "REGISTER→200"))
            print(
                f"    Kamailio CPU per REGISTER: {per_call_us(k, 'kamailio') or 0:.0f} µs; "
                f"200s carrying Path: {k['ok_with_path']}; sustained: {k['sustained']}"
            )
        print(fmt_phase(f"  relay {r['target_rate']}/s", r).replace("setup→200", "REGISTER→200"))
        c = r["cpu"]["relay"]
        per = f"{1e6 * c['cpu_s'] / r['successful']:.0f} µs" if r["successful"] else "n/a"
        print(
            f"    relay CPU per REGISTER: {per}; "
            f"200s carrying the relay's Path back: {r['ok_with_path']}; sustained: {r['sustained']}"
            + (
                "; THE RELAY CLOSED THE PBX CONNECTION (flow_overflow)"
                if r.get("pbx_connection_lost")
                else ""
            )
        )
        if k:
            print_versus(r, k, unit="REGISTER")
    if kam:
        k0 = next(iter(kam.values()))
        print(f"  Kamailio log: {k0['kamailio_log']}; alive after run: {k0['kamailio_alive']}")
    print(f"  relay log: {res['relay_log']}; relay alive after run: {res['relay_alive']}")
    print(f"  reproduce: {cmd}")


# ======================================================================= tls
def bench_tls(
    out: Path, count: int, concurrency: int, transport: str = "tls", trace: bool = False
) -> dict[str, object]:
    from relay.pbx.directory import PbxDirectory

    b = Bench(out)
    res: dict[str, object] = {"count": count, "transport": transport}
    nofile = raise_nofile(max(65536, 2 * count + 1000))
    res["nofile"] = nofile
    try:
        relay = make_relay(out)
        log(f"tls: adding {count} PBXs to the directory (PbxDirectory.add)")
        t0 = time.monotonic()
        d = PbxDirectory(relay.state_dir / "pbx.sqlite")
        secrets = {f"T{i:06d}": d.add(f"T{i:06d}", DOMAIN) for i in range(count)}
        res["directory_add_s"] = round(time.monotonic() - t0, 1)
        (out / "secrets.json").write_text(json.dumps(secrets))
        if trace:
            start_relay(
                b.procs,
                relay,
                out,
                exe=[PYTHON, str(BENCH / "relay_timed.py")],
                env={"RELAY_TIMED_OUT": str(out / "relay_timed.jsonl"), "BENCH_TRACEMALLOC": "1"},
            )
        else:
            start_relay(b.procs, relay, out)
        time.sleep(2)
        res["rss_idle_kib"] = rss_kib(relay.pid)
        res["fds_idle"] = nfds(relay.pid)
        port = relay.tls if transport == "tls" else relay.tcp
        cmd = [
            PYTHON,
            str(BENCH / "tls_pbxs.py"),
            "--relay",
            f"{HOST}:{port}",
            "--secrets",
            str(out / "secrets.json"),
            "--domain",
            DOMAIN,
            "--concurrency",
            str(concurrency),
            "--hold",
            "300",
        ] + (["--plain"] if transport == "tcp" else [])
        log(f"tls: {count} PBXs phone home over {transport.upper()} ({concurrency} connects in flight)")
        meter = CpuMeter({"relay": relay.pid})
        peak = 0
        client = b.procs.start("tls_pbxs", cmd, log=out / "tls_pbxs.log", stdout=out / "tls_pbxs.out")
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(relay.pid))
            data = (out / "tls_pbxs.out").read_text() if (out / "tls_pbxs.out").exists() else ""
            if data.strip():
                line = data.strip().splitlines()[0]
                break
            if client.poll() is not None:
                raise RuntimeError(f"tls_pbxs exited: {(out / 'tls_pbxs.log').read_text()[-2000:]}")
            time.sleep(0.1)
        res["register_cpu"] = meter.stop()["relay"]
        res["client"] = json.loads(line) if line else {"error": "timeout"}
        time.sleep(3)  # settle
        m = relay.metrics()
        res["pbx_registered"] = m.get("pbx_relay_pbx_registered")
        res["flows_open"] = m.get("pbx_relay_flows_open")
        res["registry_entries"] = len(relay.registry())
        res["registry_tls"] = sum(1 for x in relay.registry() if x["transport"] == transport)
        res["rss_registered_kib"] = rss_kib(relay.pid)
        res["rss_peak_during_kib"] = max(peak, res["rss_registered_kib"])
        res["fds_registered"] = nfds(relay.pid)
        if trace:
            mem = out / "relay_timed.jsonl.mem"
            mem.unlink(missing_ok=True)
            os.kill(relay.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not mem.exists():
                time.sleep(0.5)
            time.sleep(1)  # let the writer finish
            res["tracemalloc"] = json.loads(mem.read_text())
        idle = CpuMeter({"relay": relay.pid})
        time.sleep(5)
        res["idle_cpu_with_pbxs"] = idle.stop()["relay"]
        per = (res["rss_registered_kib"] - res["rss_idle_kib"]) * 1024 / count
        res["rss_per_pbx_bytes"] = round(per)
        log("tls: closing the client's connections")
        b.procs.stop(client, signal.SIGINT, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and relay.metrics().get("pbx_relay_flows_open", 0) > 0:
            time.sleep(0.2)
        m = relay.metrics()
        res["after_close"] = {
            "flows_open": m.get("pbx_relay_flows_open"),
            "pbx_registered": m.get("pbx_relay_pbx_registered"),
            "rss_kib": rss_kib(relay.pid),
        }
        res["relay_counters"] = {k.replace("pbx_relay_", ""): v for k, v in m.items()}
        res["client_command"] = show(cmd)
        res["relay_log"] = log_problems(out / "relay.log")
        res["relay_alive"] = relay.proc is not None and relay.proc.poll() is None
    finally:
        b.procs.stop_all()
    return res


def print_tls(res: dict[str, object], cmd: str) -> None:
    c = res["client"]
    t = str(res["transport"]).upper()
    print(
        f"\n== {res['transport']}: {res['count']} PBXs phoned home over {t} "
        "(digest SHA-256 REGISTER, then idle)"
    )
    print(f"  directory: {res['count']} × PbxDirectory.add in {res['directory_add_s']} s")
    print(f"  client: {c}")  # noqa: T201
    print(
        f"  relay: pbx_registered {res['pbx_registered']}, flows_open {res['flows_open']}, "
        f"/registry {res['transport']} entries {res['registry_tls']}, "
        f"fds {res['fds_idle']} → {res['fds_registered']} "
        f"(RLIMIT_NOFILE {res['nofile']})"
    )
    print(
        f"  relay RSS: {res['rss_idle_kib'] / 1024:.1f} MiB idle → "
        f"{res['rss_registered_kib'] / 1024:.1f} MiB "
        f"with {res['count']} PBXs (peak {res['rss_peak_during_kib'] / 1024:.1f} MiB); "
        f"≈ {res['rss_per_pbx_bytes'] / 1024:.1f} KiB per PBX"
    )
    rc = res["register_cpu"]
    print(
        f"  relay CPU while they registered: {rc['cpu_s']} s over {rc['wall_s']} s "
        f"({1000 * rc['cpu_s'] / res['count']:.2f} ms per connection + REGISTER pair); "
        f"idle with them: {res['idle_cpu_with_pbxs']['pct_core']} % of a core"
    )
    if "tracemalloc" in res:
        tm = res["tracemalloc"]
        print(
            f"  tracemalloc (relay run as bench/relay_timed.py, BENCH_TRACEMALLOC=1): live Python heap "
            f"{tm['traced_kib'] / 1024:.1f} MiB = {tm['traced_kib'] * 1024 / res['count']:.0f} B per PBX; "
            "top sites:"
        )
        for x in tm["top"][:12]:
            print(f"    {x['kib']:9.1f} KiB  {x['count']:7}  {x['site']}")
        print("   by package / file:")
        for x in tm.get("by_group", [])[:10]:
            print(f"    {x['kib']:9.1f} KiB  {x['count']:7}  {x['group']}")
    print(f"  after the client closed: {res['after_close']}")
    print(f"  relay log: {res['relay_log']}; relay alive after run: {res['relay_alive']}")
    print(f"  client command: {res['client_command']}")
    print(f"  reproduce: {cmd}")


def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    dirty = git("status", "--porcelain", "--", "relay")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in relay/" if dirty else "")


# ====================================================================== main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (default bench/out/<stamp>)")
    ap.add_argument(
        "--relay-commit",
        metavar="REV",
        help="benchmark the relay of this commit (git archive into the output dir) "
        "instead of the working tree",
    )
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="benchmark the compiled build (setup.py, PBX_RELAY_COMPILE=1) of the working tree, "
        "or of --relay-commit: a wheel built into the output dir",
    )
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="do not give the relay a core of its own (default: relay on the last core, load on the rest)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="run the relay as `run --workers N` (N nodes sharing a redis-server this script starts; "
        "its CPU is shown apart as 'redis'); N > 1 implies --no-pin",
    )
    ap.add_argument(
        "--spread",
        action="store_true",
        help="SIPp's caller uses a UDP socket per call (-t un): calls from many source ports, "
        "spread over the workers (use it for every run that is compared)",
    )
    ap.add_argument(
        "--kamailio",
        action="store_true",
        help="calls, register, maxrate: the same load through Kamailio 5.6 (bench/kamailio/kamailio.cfg) "
        "in the same run, and the ratios",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calls", help="calls at one rate: direct vs through the relay")
    c.add_argument("--rate", type=float, default=200)
    c.add_argument("--duration", type=float, default=30)
    c.add_argument("--hold", type=int, default=1000, help="ms between ACK and BYE")
    c.add_argument("--no-direct", action="store_true")
    m = sub.add_parser(
        "maxrate", help="highest clean call rate through the relay, then direct vs relay there"
    )
    m.add_argument("--start", type=float, default=200)
    m.add_argument("--step", type=float, default=25)
    m.add_argument("--top", type=float, default=3000)
    m.add_argument("--duration", type=float, default=10)
    m.add_argument("--confirm", type=float, default=20, help="seconds of the final direct-vs-relay run")
    m.add_argument("--hold", type=int, default=1000)
    m.add_argument("--kamailio-start", type=float, default=500, help="with --kamailio: its first rate")
    m.add_argument("--kamailio-step", type=float, default=250, help="with --kamailio: its step")
    r = sub.add_parser("register", help="phone REGISTER/s with Path through the relay")
    r.add_argument("--rates", default="500,900,2000")
    r.add_argument("--duration", type=float, default=8)
    t = sub.add_parser("tls", help="relay memory with N PBXs phoned home over TLS")
    t.add_argument("--count", type=int, default=5000)
    t.add_argument("--concurrency", type=int, default=200)
    t.add_argument("--tcp", action="store_true", help="plain TCP instead of TLS (comparison)")
    t.add_argument("--tracemalloc", action="store_true", help="also list the live Python heap by site")
    p = sub.add_parser("profile", help="py-spy on the relay during a call run")
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--hold", type=int, default=1000)
    st = sub.add_parser("stall", help="calls while the PBX stops reading for a moment (relay send queue)")
    st.add_argument("--rate", type=float, default=200)
    st.add_argument("--duration", type=float, default=10)
    st.add_argument("--at", type=float, default=4)
    st.add_argument("--stall", type=float, default=2)
    dc = sub.add_parser("decompose", help="relay CPU per call split by layer (instrumented relay)")
    dc.add_argument("--rate", type=float, default=200)
    dc.add_argument("--duration", type=float, default=15)
    dc.add_argument("--hold", type=int, default=1000)
    dc.add_argument(
        "--fast-split", action="store_true", help="experiment: see bench/core_replay.py --fast-split"
    )
    cr = sub.add_parser("core", help="bench/core_replay.py: the SIP core alone, in-process")
    cr.add_argument("--calls", type=int, default=2000)
    sub.add_parser("all", help="every benchmark with its defaults")
    a = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (Path(a.out) if a.out else BENCH / "out" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    global UAC_TRANSPORT
    if a.spread:
        UAC_TRANSPORT = "un"
    if a.workers > 1 and not a.no_pin:
        a.no_pin = True
        print("--workers > 1: no pinning (the workers need every core; the load shares them)")
    placement = pin(not a.no_pin)
    redis_procs = Procs()
    atexit.register(redis_procs.stop_all)  # stopped by its PID even when a benchmark raises
    if a.workers:
        common.WORKERS = a.workers
        common.REDIS_URL, redis = start_redis(redis_procs, (out / "redis").resolve())
        EXTRA_PIDS["redis"] = redis.pid
    media = os.environ.get("BENCH_MEDIA", "true").lower()
    me = (
        ("BENCH_MEDIA=false " if media == "false" else "")
        + f".venv/bin/python {SELF}"
        + (" --no-pin" if a.no_pin else "")
        + (f" --workers {a.workers}" if a.workers else "")
        + (" --spread" if a.spread else "")
        + (" --kamailio" if a.kamailio else "")
    )
    if a.relay_commit:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", a.relay_commit],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
        src = (out / f"src-{rev}").resolve()
        if not src.exists():
            src.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "archive", rev], capture_output=True, cwd=ROOT, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        os.environ["BENCH_RELAY_SRC"] = str(src)
        os.environ["PYTHONPATH"] = str(src) + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
        )
        sys.path.insert(0, str(src))
        me += f" --relay-commit {rev}"
    if a.compiled:
        site = build_compiled(Path(os.environ.get("BENCH_RELAY_SRC") or ROOT), out)
        os.environ["BENCH_RELAY_SRC"] = str(site)
        os.environ["PYTHONPATH"] = str(site) + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
        )
        me += " --compiled"
    results: dict[str, object] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv[1:],
        "cpus": placement,
        "git": (f"{a.relay_commit} (git archive)" if a.relay_commit else git_state())
        + (" compiled (setup.py)" if a.compiled else ""),
        "relay_media_anchoring": media != "false",
        "relay_workers": a.workers,
        "uac_transport": UAC_TRANSPORT,
    }
    print(
        f"machine: {results['machine']}\ncpus: relay on {placement['relay']}, load on {placement['load']}"
        f"\ngit: {results['git']}\nrelay media anchoring (BENCH_MEDIA): {media != 'false'}"
        f"\nrelay workers: {a.workers or 'none (one process)'}; SIPp caller transport -t {UAC_TRANSPORT}"
        f"\noutput: {out}"
    )
    todo = (
        ["core", "calls", "profile", "decompose", "maxrate", "register", "tls", "stall"]
        if a.cmd == "all"
        else [a.cmd]
    )
    t_all = time.monotonic()
    for name in todo:
        d = (lambda k, v: getattr(a, k, v)) if a.cmd != "all" else (lambda k, v: v)
        if name == "calls":
            rate, dur, hold = d("rate", 200.0), d("duration", 30.0), d("hold", 1000)
            res = bench_calls(
                out / "calls", rate, dur, hold, direct=not d("no_direct", False), kamailio=a.kamailio
            )
            cmd = f"{me} calls --rate {rate:g} --duration {dur:g} --hold {hold}"
            print_calls(res, cmd)
        elif name == "maxrate":
            args = (
                d("start", 200.0),
                d("step", 25.0),
                d("top", 3000.0),
                d("duration", 10.0),
                d("hold", 1000),
                d("confirm", 20.0),
            )
            kam = (d("kamailio_start", 500.0), d("kamailio_step", 250.0)) if a.kamailio else None
            res = bench_maxrate(out / "maxrate", *args, kamailio=kam)
            cmd = (
                f"{me} maxrate --start {args[0]:g} --step {args[1]:g} --top {args[2]:g} "
                f"--duration {args[3]:g} --hold {args[4]} --confirm {args[5]:g}"
                + (f" --kamailio-start {kam[0]:g} --kamailio-step {kam[1]:g}" if kam else "")
            )
            print(
                "\n== maxrate: relay path at rising rates "
                f"({args[3]:g} s each; sustained = 0 failed, 0 UDP retransmissions, ≥97 % of target, "
                f"p99 setup < {P99_LIMIT_MS:g} ms)"
            )
            for s in res["steps"]:
                print(f"  {s}")
            print(f"  highest sustained rate: {res['best']}/s")
            if kam:
                print("  Kamailio path, the same way:")
                for s in res["kamailio_steps"]:
                    print(f"  {s}")
                kb = res["kamailio_best"]
                print(
                    f"  Kamailio's highest sustained rate: {kb}/s; relay ÷ Kamailio = "
                    f"{ratio(res['best'], kb)}"
                )
            if "confirm" in res:
                conf = res["confirm"]
                print_calls(
                    conf, f"{me} calls --rate {res['best']:g} --duration {args[5]:g} --hold {args[4]}"
                )
            print(f"  reproduce: {cmd}")
        elif name == "register":
            rates = [float(x) for x in str(d("rates", "500,900,2000")).split(",")]
            dur = d("duration", 8.0)
            res = bench_register(out / "register", rates, dur, kamailio=a.kamailio)
            print_register(
                res, f"{me} register --rates {','.join(f'{x:g}' for x in rates)} --duration {dur:g}"
            )
        elif name == "tls":
            n, conc = d("count", 5000), d("concurrency", 200)
            tm = d("tracemalloc", False)
            flag = " --tracemalloc" if tm else ""
            if not d("tcp", False):
                res = bench_tls(out / "tls", n, conc, trace=tm)
                print_tls(res, f"{me} tls --count {n} --concurrency {conc}{flag}")
            if a.cmd == "all" or d("tcp", False):
                results["tcp"] = bench_tls(out / "tcp", n, conc, transport="tcp", trace=tm)
                print_tls(results["tcp"], f"{me} tls --count {n} --concurrency {conc} --tcp{flag}")
                if d("tcp", False):
                    res = results["tcp"]
        elif name == "profile":
            rate, dur, secs, hold = d("rate", 200.0), d("duration", 20.0), d("seconds", 15.0), d("hold", 1000)
            res = bench_calls(out / "profile", rate, dur, hold, direct=False, profile_s=secs)
            print_calls(
                res, f"{me} profile --rate {rate:g} --duration {dur:g} --seconds {secs:g} --hold {hold}"
            )
        elif name == "stall":
            rate, dur, at, stall_s = d("rate", 200.0), d("duration", 10.0), d("at", 4.0), d("stall", 2.0)
            res = bench_stall(out / "stall", rate, dur, at, stall_s)
            print_stall(res, f"{me} stall --rate {rate:g} --duration {dur:g} --at {at:g} --stall {stall_s:g}")
        elif name == "decompose":
            rate, dur, hold = d("rate", 200.0), d("duration", 15.0), d("hold", 1000)
            fs = d("fast_split", False)
            res = bench_decompose(out / "decompose", rate, dur, hold)
            print_decompose(res, f"{me} decompose --rate {rate:g} --duration {dur:g} --hold {hold}")
            if a.cmd == "all" or fs:
                results["decompose_fast_split"] = bench_decompose(
                    out / "decompose_fast_split", rate, dur, hold, fast_split=True
                )
                print_decompose(
                    results["decompose_fast_split"],
                    f"{me} decompose --rate {rate:g} --duration {dur:g} --hold {hold} --fast-split",
                )
        elif name == "core":
            n = d("calls", 2000)
            cp = subprocess.run(
                [PYTHON, str(BENCH / "core_replay.py"), "--calls", str(n), "--cprofile", "20"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=300,
            )
            print("\n" + cp.stdout.rstrip())
            res = {"stdout": cp.stdout, "rc": cp.returncode}
        results[name] = res
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    redis_procs.stop_all()
    print(f"\nall done in {time.monotonic() - t_all:.0f} s; figures in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
