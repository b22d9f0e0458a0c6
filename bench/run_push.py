#!/usr/bin/env python3
"""Push benchmarks of pbx-relay (issue 4), all on 127.0.0.1, against the APNs/FCM fakes.

    .venv/bin/python bench/run_push.py wake --rate 50 --duration 20     # (1) INVITE → push latency
    .venv/bin/python bench/run_push.py wake --trace                     # (1) + where the time goes
    .venv/bin/python bench/run_push.py gateway --concurrency 50,200     # (2) pushes/s per provider
    .venv/bin/python bench/run_push.py gateway --baseline 8c133c8       # (2), before/after in one run
    .venv/bin/python bench/run_push.py all           # wake, wake --trace, wake --profile, gateway: ~5 min
    .venv/bin/python bench/run_push.py --quick all   # the same, short runs: ~2-5 min (quiet waits)

(1) ``wake``: a real relay process (``pbx-relay run``, ``[push] mode = "embedded"``)
whose push.toml points ``[apns]`` (or ``[fcm]``, ``--provider fcm``) at the fake of
tests/pushfakes.py, run in a process of its own by bench/push_fakes_server.py. A
PBX (raw TCP, digest REGISTER, in this script) phones home; N phones, each with its
own push token, REGISTER over TCP with RFC 8599 parameters through the relay (the
PBX answers 200 echoing Contact and Path) and close their connection. Then the PBX
sends INVITEs along each phone's Path, R-URI = its Contact (push parameters
included), at ``--rate`` per second for ``--duration`` s: one wake-up per phone.
The relay holds each INVITE, answers 100, pushes, answers 180 once the push is
accepted and 480 at the ring timeout (the PBX ACKs it). Latency = INVITE written
to the relay's socket (time.monotonic, just before the write) → the fake's
``received_mono`` for that phone's token; also INVITE → 100 / 180 at the PBX, and
the relay's CPU from /proc/<pid>/stat. ``--trace`` runs the relay through this
script (``relay-traced``: monkeypatched at start-up, relay/ and push/ untouched)
and timestamps each call at every stage of the wake-up.

(2) ``gateway``: one process (this script's ``gateway-client``, pinned to its own
core) drives ``push.gateways.deliver()`` on ApnsGateway or FcmGateway with K
concurrent senders for ``--seconds`` s against the fake in another process (the
other core); pushes/s, latency, client CPU (its own process_time), the fake's
CPU (/proc) over the same window, and duplicates at the fake (a second push for
the same token and call). ``--baseline REV``: each step runs again with REV's
push/ (``git archive``, imported through BENCH_PUSH_SRC) against the same fake.

Every process started is remembered by PID and stopped by that PID; each has a
hard time limit. Outputs (logs, results.json) go to bench/out/push-<stamp>/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH,
    DOMAIN,
    HOST,
    PIN,
    PYTHON,
    ROOT,
    CpuMeter,
    MachineMeter,
    Procs,
    Relay,
    free_port,
    machine,
    make_relay,
    pctl,
    pin,
    start_relay,
    wait_quiet,
)
from connector import Framer, Registrar  # noqa: E402
from run_sip import analyse_pyspy, counters_delta, log_problems, wait_line  # noqa: E402

SELF = "bench/run_push.py"
SERIAL = "0123456789"
TOPIC = "com.example.app.voip"
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rand(n: int = 6) -> str:
    return secrets.token_hex(n)


def stats_ms(values: list[float]) -> dict[str, float | int]:
    """p50/p90/p99/max/mean of seconds, in ms."""
    if not values:
        return {"n": 0}
    ms = [1000 * v for v in values]
    return {
        "n": len(ms),
        "p50": round(pctl(ms, 50), 3),
        "p90": round(pctl(ms, 90), 3),
        "p99": round(pctl(ms, 99), 3),
        "max": round(max(ms), 3),
        "mean": round(sum(ms) / len(ms), 3),
    }


def fmt_ms(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "n=0"
    return f"p50 {s['p50']} / p90 {s['p90']} / p99 {s['p99']} / max {s['max']} ms (n={s['n']})"


def http_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def other_load(mach: dict[str, dict[str, float]], ours: dict[str, dict[str, float]]) -> float:
    """Machine-wide busy time minus what our own processes used, % of one core (≥ 0;
    tick-sampled, so a few % either way is noise): whatever else ran on the box."""
    busy = sum(v["busy_pct"] for k, v in mach.items() if k != "cpu")
    return max(0.0, round(busy - sum(v["pct_core"] for v in ours.values()), 1))


def prom(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


# ================================================================== the fakes
def start_fake(procs: Procs, d: Path, provider: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """bench/push_fakes_server.py on the load core(s); returns (process, info.json)."""
    d.mkdir(parents=True, exist_ok=True)
    cmd = [
        PYTHON,
        str(BENCH / "push_fakes_server.py"),
        "--provider",
        provider,
        "--dir",
        str(d),
        "--max-seconds",
        "1800",
    ]
    out = d / "server.out"
    p = procs.start(f"fake_{provider}", cmd, log=d / "server.log", stdout=out, cpus=PIN["load"])
    wait_line(out, b"ready", p, 60, f"fake {provider}")
    info = json.loads((d / "info.json").read_text())
    info["dir"] = str(d)
    return p, info


def fake_dump(p: subprocess.Popen[bytes], info: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """What the fake received so far: {"requests": [(token, received_mono, status)], ...}."""
    f = Path(info["dir"]) / "requests.json"
    f.unlink(missing_ok=True)
    os.kill(p.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f.exists():
            return dict(json.loads(f.read_text()))
        if p.poll() is not None:
            raise RuntimeError(f"fake exited with {p.returncode}")
        time.sleep(0.05)
    raise RuntimeError("the fake did not dump its requests")


# ================================================================ (1) wake-ups
def push_relay(out: Path, info: dict[str, Any], ring_timeout: float) -> tuple[Relay, str]:
    """A relay config with ``[push] mode = "embedded"`` and a push.toml pointing the
    fake's provider at it. Returns (relay, push admin base URL)."""
    relay = make_relay(out)
    pdir = relay.state_dir / "push"
    pdir.mkdir(parents=True, exist_ok=True)
    admin = free_port()
    if info["provider"] == "apns":
        provider = f"""[apns]
key_file = "{info["key_file"]}"
key_id = "{info["key_id"]}"
team_id = "{info["team_id"]}"
base_url = "{info["base_url"]}"
ca_file = "{info["ca_file"]}"
"""
    else:
        provider = f"""[fcm]
service_account = "{info["service_account"]}"
base_url = "{info["base_url"]}"
ca_file = "{info["ca_file"]}"
"""
    push_toml = pdir / "push.toml"
    push_toml.write_text(f"""[push]
state_dir = "{pdir}"
[api]
listen = "{HOST}:{free_port()}"
[admin]
listen = "{HOST}:{admin}"
{provider}""")
    text = relay.config.read_text()
    new, n = re.subn(
        r'\[push\]\nmode = "[^"]*"\n',
        f'[push]\nmode = "embedded"\nconfig = "{push_toml}"\nring_timeout = {ring_timeout}\n',
        text,
    )
    if n != 1:
        raise RuntimeError("bench/common.py make_relay: no [push] mode line to replace")
    relay.config.write_text(new)
    return relay, f"http://{HOST}:{admin}"


class SipConn:
    """A TCP connection to the relay, whole SIP messages in and out (trio)."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.framer = Framer()
        self.pending: list[bytes] = []
        self.lock = trio.StrictFIFOLock()  # the sender and the reader (ACKs) both write

    @classmethod
    async def open(cls) -> SipConn:
        return cls(await trio.open_tcp_stream(HOST, RELAY_TCP[0]))  # TCP_NODELAY is trio's default

    @property
    def local(self) -> tuple[str, int]:
        ip, port = self.stream.socket.getsockname()[:2]
        return ip, port

    async def recv(self) -> bytes:
        while not self.pending:
            data = await self.stream.receive_some(262144)
            if not data:
                raise EOFError("relay closed the connection")
            self.pending.extend(self.framer.feed(data))
        return self.pending.pop(0)

    async def send(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    async def send_timed(self, data: bytes) -> float:
        """Send; return time.monotonic() taken just before the write (trio's send_all
        does not yield before the send(2) call; it may yield after it)."""
        async with self.lock:
            t = time.monotonic()
            await self.stream.send_all(data)
        return t


RELAY_TCP = [0]  # the relay's TCP port, for SipConn.open


def head(msg: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Start line and (lower-case name, value) of every header line (no folding: the
    relay does not fold)."""
    lines = msg.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
    hdrs = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        hdrs.append((name.strip().lower(), value.strip()))
    return lines[0], hdrs


def hget(hdrs: list[tuple[str, str]], *names: str) -> str:
    return next((v for n, v in hdrs if n in names), "")


def sip(lines: list[str], body: str = "") -> bytes:
    raw = body.encode()
    return ("\r\n".join([*lines, f"Content-Length: {len(raw)}", "", ""])).encode() + raw


class WakeRun:
    """The PBX and the phones of the wake benchmark (one trio run)."""

    def __init__(
        self,
        relay: Relay,
        secret: str,
        info: dict[str, Any],
        n: int,
        rate: float,
        ring_timeout: float,
        pids: dict[str, int],
        push_admin: str,
    ):
        self.relay, self.secret, self.info, self.n, self.rate = relay, secret, info, n, rate
        self.ring_timeout = ring_timeout
        self.pids = pids
        self.push_admin = push_admin
        self.provider = info["provider"]
        self.tokens = [
            secrets.token_hex(32) if self.provider == "apns" else f"bench-fcm-{i}:{rand(40)}"
            for i in range(n)
        ]
        self.param = f"{info['team_id']}.{TOPIC}" if self.provider == "apns" else info["project_id"]
        self.bindings: dict[str, tuple[str, str]] = {}  # user → (contact URI, Path)
        self.registered: dict[str, trio.Event] = {}
        self.calls: dict[str, dict[str, Any]] = {}  # Call-ID → what happened
        self.finals = 0
        self.all_final = trio.Event()
        self.other: dict[str, int] = {}
        self.res: dict[str, Any] = {}
        self.on_send_start: Callable[[], None] | None = None  # e.g. start py-spy

    # ------------------------------------------------------------ the PBX
    async def pbx_register(self) -> None:
        self.pbx = await SipConn.open()
        reg = Registrar(SERIAL, self.secret, DOMAIN, "SHA-256", self.pbx.local, 600)
        await self.pbx.send(reg.request())
        while not reg.registered:
            msg = await self.pbx.recv()
            if msg.startswith(b"SIP/2.0 ") and hget(head(msg)[1], "call-id", "i") == reg.call_id:
                nxt = reg.on_response(msg)
                if nxt:
                    await self.pbx.send(nxt)

    async def pbx_reader(self) -> None:
        while True:
            msg = await self.pbx.recv()
            now = time.monotonic()
            start, hdrs = head(msg)
            if start.startswith("REGISTER "):
                await self.answer_register(start, hdrs)
                continue
            if not start.startswith("SIP/2.0 "):
                self.other[start.split(" ", 1)[0]] = self.other.get(start.split(" ", 1)[0], 0) + 1
                continue
            call = self.calls.get(hget(hdrs, "call-id", "i"))
            if call is None:
                self.other["response"] = self.other.get("response", 0) + 1
                continue
            code = int(start[8:11])
            call.setdefault(f"t{code}", now)
            if code >= 200 and "final" not in call:
                call["final"] = code
                if code >= 300:
                    await self.pbx.send(self.ack(call, hget(hdrs, "to", "t")))
                self.finals += 1
                if self.finals == self.n:
                    self.all_final.set()

    async def answer_register(self, start: str, hdrs: list[tuple[str, str]]) -> None:
        """A phone's REGISTER forwarded by the relay: 200 echoing Via, Contact and Path."""
        contact = hget(hdrs, "contact", "m")
        path = hget(hdrs, "path")
        to = hget(hdrs, "to", "t")
        user = to.split("sip:", 1)[1].split("@", 1)[0]
        uri = contact[contact.index("<") + 1 : contact.index(">")]
        self.bindings[user] = (uri, path)
        lines = ["SIP/2.0 200 OK"]
        lines += [f"Via: {v}" for n, v in hdrs if n in ("via", "v")]
        lines += [
            f"From: {hget(hdrs, 'from', 'f')}",
            f"To: {to};tag=reg{rand(3)}",
            f"Call-ID: {hget(hdrs, 'call-id', 'i')}",
            f"CSeq: {hget(hdrs, 'cseq')}",
            f"Contact: <{uri}>;expires=600",
            f"Path: {path}",
        ]
        await self.pbx.send(sip(lines))

    def invite(self, i: int) -> tuple[str, bytes, dict[str, Any]]:
        uri, path = self.bindings[f"u{i}"]
        ip, port = self.pbx.local
        cid = f"push-{i}-{rand()}"
        call = {
            "i": i,
            "uri": uri,
            "path": path,
            "via": f"SIP/2.0/TCP {ip}:{port};branch=z9hG4bK{rand()}",
            "from": f"<sip:100@{SERIAL}.{DOMAIN}>;tag=inv{rand(3)}",
        }
        data = sip(
            [
                f"INVITE {uri} SIP/2.0",
                f"Via: {call['via']}",
                f"Route: {path}",
                "Max-Forwards: 70",
                f"From: {call['from']}",
                f"To: <sip:u{i}@{SERIAL}.{DOMAIN}>",
                f"Call-ID: {cid}",
                "CSeq: 1 INVITE",
                f"Contact: <sip:100@{ip}:{port};transport=tcp>",
                "Content-Type: application/sdp",
            ],
            SDP,
        )
        return cid, data, call

    @staticmethod
    def ack(call: dict[str, Any], to: str) -> bytes:
        return sip(
            [
                f"ACK {call['uri']} SIP/2.0",
                f"Via: {call['via']}",
                f"Route: {call['path']}",
                "Max-Forwards: 70",
                f"From: {call['from']}",
                f"To: {to}",
                f"Call-ID: {call['cid']}",
                "CSeq: 1 ACK",
            ]
        )

    # ------------------------------------------------------------ the phones
    async def phone(self, i: int, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            conn = await SipConn.open()
            ip, port = conn.local
            pn = f"pn-provider={self.provider};pn-prid={self.tokens[i]};pn-param={self.param}"
            aor = f"sip:u{i}@{SERIAL}.{DOMAIN}"
            cid = f"reg-{i}-{rand()}"
            await conn.send(
                sip(
                    [
                        f"REGISTER sip:{SERIAL}.{DOMAIN} SIP/2.0",
                        f"Via: SIP/2.0/TCP {ip}:{port};branch=z9hG4bK{rand()};rport",
                        "Max-Forwards: 70",
                        f"From: <{aor}>;tag=ph{rand(3)}",
                        f"To: <{aor}>",
                        f"Call-ID: {cid}",
                        "CSeq: 1 REGISTER",
                        f"Contact: <sip:u{i}@{ip}:{port};transport=tcp;{pn}>",
                        "Supported: path",
                        "Expires: 600",
                    ]
                )
            )
            with trio.fail_after(15):
                while True:
                    start, hdrs = head(await conn.recv())
                    if hget(hdrs, "call-id", "i") == cid and start.startswith("SIP/2.0 "):
                        code = int(start[8:11])
                        if code >= 200:
                            if code != 200:
                                raise RuntimeError(f"phone u{i}: REGISTER answered {start}")
                            break
            await conn.stream.aclose()  # the phone goes to sleep

    # ------------------------------------------------------------ the run
    async def main(self) -> None:
        await self.pbx_register()
        log(f"wake: PBX registered; {self.n} phones register with push parameters, then sleep")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pbx_reader)
            t = time.monotonic()
            limiter = trio.CapacityLimiter(50)
            async with trio.open_nursery() as phones:
                for i in range(self.n):
                    phones.start_soon(self.phone, i, limiter)
            self.res["phones_register_s"] = round(time.monotonic() - t, 2)
            # Every device in the push store, every phone connection closed in the relay.
            with trio.fail_after(60):
                while True:
                    m = prom(await trio.to_thread.run_sync(http_text, f"{self.push_admin}/metrics"))
                    r = await trio.to_thread.run_sync(self.relay.metrics)
                    if m.get("pbx_push_devices", 0) >= self.n and r.get("pbx_relay_flows_open", 9) <= 1:
                        break
                    await trio.sleep(0.2)
            self.res["devices_in_store"] = m.get("pbx_push_devices")
            quiet = await trio.to_thread.run_sync(lambda: wait_quiet(max_wait=90))
            self.res["quiet_wait"] = quiet
            before = await trio.to_thread.run_sync(self.relay.metrics)
            log(f"wake: {self.n} INVITEs at {self.rate}/s (ring timeout {self.ring_timeout} s)")
            meter = CpuMeter(dict(self.pids))
            total_meter = CpuMeter(dict(self.pids))
            machine_meter = MachineMeter()
            if self.on_send_start is not None:
                self.on_send_start()
            t0 = trio.current_time() + 0.05
            sent: dict[str, float] = {}
            for i in range(self.n):
                await trio.sleep_until(t0 + i / self.rate)
                cid, data, call = self.invite(i)
                call["cid"] = cid
                self.calls[cid] = call
                sent[cid] = await self.pbx.send_timed(data)
            await trio.sleep(1.0)  # the last pushes go out
            self.res["cpu_send_window"] = meter.stop()
            self.res["machine_cpu"] = machine_meter.stop()
            self.res["other_load_pct"] = other_load(self.res["machine_cpu"], self.res["cpu_send_window"])
            with trio.move_on_after(self.ring_timeout + 15):
                await self.all_final.wait()
            await trio.sleep(0.3)  # the last ACKs
            self.res["cpu_total"] = total_meter.stop()
            after = await trio.to_thread.run_sync(self.relay.metrics)
            self.res["relay_counters"] = counters_delta(before, after)
            pm = prom(await trio.to_thread.run_sync(http_text, f"{self.push_admin}/metrics"))
            self.res["push_metrics"] = {
                k.replace("pbx_push_", ""): v for k, v in pm.items() if "bucket" not in k
            }
            for cid, call in self.calls.items():
                call["sent"] = sent[cid]
            nursery.cancel_scope.cancel()
        await self.pbx.stream.aclose()


def read_trace(path: Path) -> dict[str, dict[str, float]]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def bench_wake(
    out: Path,
    provider: str,
    rate: float,
    duration: float,
    ring_timeout: float,
    trace: bool,
    profile: bool = False,
) -> dict[str, Any]:
    procs = Procs()
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "provider": provider,
        "rate": rate,
        "duration": duration,
        "ring_timeout": ring_timeout,
        "trace": trace,
        "profile": profile,
    }
    try:
        fake, info = start_fake(procs, out / f"fake_{provider}", provider)
        relay, push_admin = push_relay(out, info, ring_timeout)
        secret = relay.add_pbx(SERIAL)
        trace_file = out / "trace.json"
        env = None
        exe = None
        if trace:
            exe = [PYTHON, str(BENCH / "run_push.py"), "relay-traced"]
            env = {"BENCH_PUSH_TRACE": str(trace_file)}
        start_relay(procs, relay, out, exe=exe, env=env)
        RELAY_TCP[0] = relay.tcp
        n = max(1, int(rate * duration))
        run = WakeRun(
            relay,
            secret,
            info,
            n,
            rate,
            ring_timeout,
            {"relay": relay.pid, "fake": fake.pid, "bench": os.getpid()},
            push_admin,
        )
        spy: dict[str, Any] = {}
        if profile:

            def on_send_start() -> None:
                spy["proc"], spy["raw"], spy["command"] = start_pyspy(procs, out, relay.pid, duration)

            run.on_send_start = on_send_start
        trio.run(run.main)
        res.update(run.res)
        if profile:
            try:
                spy["proc"].wait(timeout=60)
            except subprocess.TimeoutExpired:
                procs.stop(spy["proc"])
            res["pyspy"] = {
                **analyse_pyspy(spy["raw"]),
                "command": spy["command"],
                "raw": str(spy["raw"]),
                "push_layers": push_layers(spy["raw"]),
            }
        dump = fake_dump(fake, info)
        if trace:
            trace_file.unlink(missing_ok=True)
            os.kill(relay.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not trace_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        procs.stop(relay.proc)  # type: ignore[arg-type]
        res["relay_log"] = log_problems(out / "relay.log")
        res.update(wake_figures(run, dump, out, relay, read_trace(trace_file) if trace else {}))
    finally:
        procs.stop_all()
    return res


def wake_figures(
    run: WakeRun, dump: dict[str, Any], out: Path, relay: Relay, trace: dict[str, dict[str, float]]
) -> dict[str, Any]:
    by_token: dict[str, list[tuple[float, int]]] = {}
    for token, mono, status in dump["requests"]:
        by_token.setdefault(token, []).append((mono, status))
    lat, t100, t180, tfinal = [], [], [], []
    finals: dict[str, int] = {}
    missing = 0
    statuses: dict[str, int] = {}
    rows = []
    for c in run.calls.values():
        got = by_token.get(run.tokens[c["i"]])
        if got:
            first = min(got)
            lat.append(first[0] - c["sent"])
            statuses[str(first[1])] = statuses.get(str(first[1]), 0) + 1
        else:
            missing += 1
        for k, lst in (("t100", t100), ("t180", t180)):
            if k in c:
                lst.append(c[k] - c["sent"])
        if "final" in c:
            finals[str(c["final"])] = finals.get(str(c["final"]), 0) + 1
            tfinal.append(c[f"t{c['final']}"] - c["sent"])
        rows.append((c["sent"], got[0][0] if got else None))
    fig: dict[str, Any] = {
        "wakeups": len(run.calls),
        "pushes_received": len(dump["requests"]),
        "calls_without_push": missing,
        "fake_status": statuses,
        "invite_to_push_ms": stats_ms(lat),
        "invite_to_100_ms": stats_ms(t100),
        "invite_to_180_ms": stats_ms(t180),
        "invite_to_final_ms": stats_ms(tfinal),
        "finals": finals,
        "pbx_other": run.other,
    }
    # Latency over the run: p50 per 5 s slice (a queue that grows shows here).
    rows.sort()
    if rows:
        t0 = rows[0][0]
        slices: dict[int, list[float]] = {}
        for s, r in rows:
            if r is not None:
                slices.setdefault(int((s - t0) // 5), []).append(r - s)
        fig["p50_by_5s_ms"] = [round(1000 * pctl(v, 50), 2) for _, v in sorted(slices.items())]
    db = relay.state_dir / "push" / "push.sqlite"
    if db.exists():
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows2 = con.execute("SELECT outcome, attempts, latency_ms FROM push_log").fetchall()
        fig["push_log"] = {
            "rows": len(rows2),
            "outcomes": {o: sum(1 for r in rows2 if r[0] == o) for o in {r[0] for r in rows2}},
            "max_attempts": max((r[1] for r in rows2), default=0),
            "latency_ms (wake() start → provider answer)": stats_ms([r[2] / 1000 for r in rows2]),
        }
    if trace:
        fig["stages_ms"] = trace_stages(run, trace, by_token)
    # Per call, ms from the INVITE's write: for a look at what happened when (calls.csv).
    stages = ["in", "hold", "wake", "deliver", "send", "h2", "written", "answer", "woken"]
    with open(out / "calls.csv", "w") as f:
        f.write("i,sent_mono,fake," + ",".join(stages) + ",t100,t180,final,final_status\n")
        for cid, c in sorted(run.calls.items(), key=lambda x: x[1]["sent"]):
            got = by_token.get(run.tokens[c["i"]])
            t = trace.get(cid, {})

            def ms(v: float | None, c: dict[str, Any] = c) -> str:
                return "" if v is None else f"{1000 * (v - c['sent']):.3f}"

            cols = [ms(min(got)[0] if got else None), *(ms(t.get(k)) for k in stages)]
            cols += [ms(c.get("t100")), ms(c.get("t180")), ms(c.get(f"t{c.get('final')}"))]
            f.write(f"{c['i']},{c['sent']:.6f}," + ",".join(cols) + f",{c.get('final', '')}\n")
    return fig


STAGES = [
    ("sent", "in", "INVITE written → relay has it framed and parsed (kernel, trio wake-up, parser)"),
    ("in", "hold", "→ proxy decides to hold it (loose routing, Path token, flow check)"),
    ("hold", "wake", "→ push service's wake() starts (100 sent, event channel, new task)"),
    ("wake", "deliver", "→ device read from SQLite (trio.to_thread, AES-GCM token decrypt)"),
    ("deliver", "send", "→ gateway send_once()"),
    ("send", "h2", "→ the gateway has built the request and picked the connection (headers, JWT cached)"),
    ("h2", "written", "→ HEADERS + DATA frames handed to the TLS stream (h2, hpack; batched writes)"),
    ("written", "fake", "→ request complete in the fake's handler (the fake reads: TLS, h2)"),
    ("fake", "answer", "→ answer back in the gateway (fake checks JWT + request, responds; client reads)"),
    ("answer", "woken", "→ wake() returns (push log row in SQLite, metrics, log lines)"),
    ("woken", "t180", "→ 180 read by the PBX"),
    # totals
    ("sent", "deliver", "total: INVITE written → the push service calls the gateway"),
    ("sent", "written", "total: INVITE written → push request written by the relay (it has left)"),
]


def trace_stages(
    run: WakeRun, trace: dict[str, dict[str, float]], by_token: dict[str, list[tuple[float, int]]]
) -> dict[str, Any]:
    per: dict[str, list[float]] = {f"{a}→{b}": [] for a, b, _ in STAGES}
    for cid, c in run.calls.items():
        t = dict(trace.get(cid, {}))
        t["sent"] = c["sent"]
        if "t180" in c:
            t["t180"] = c["t180"]
        got = by_token.get(run.tokens[c["i"]])
        if got:
            t["fake"] = min(got)[0]
        for a, b, _ in STAGES:
            if a in t and b in t:
                per[f"{a}→{b}"].append(t[b] - t[a])
    return {k: {"what": w, **stats_ms(per[f"{a}→{b}"])} for (a, b, w), k in zip(STAGES, per, strict=True)}


def print_wake(res: dict[str, Any], cmd: str) -> None:
    print(
        f"\n== wake: {res['wakeups']} wake-ups ({res['provider']}) at {res['rate']:g}/s for "
        f"{res['duration']:g} s through a real relay (embedded push service), ring timeout "
        f"{res['ring_timeout']:g} s"
        + (" — relay traced" if res["trace"] else "")
        + (" — py-spy on the relay" if res["profile"] else "")
    )
    print(
        f"  phones registered in {res['phones_register_s']} s; devices in the push store "
        f"{res['devices_in_store']:g}; quiet wait {res['quiet_wait']}"
    )
    print(
        f"  pushes at the fake {res['pushes_received']} (status {res['fake_status']}), "
        f"calls without a push {res['calls_without_push']}"
    )
    print(f"  INVITE → push at the fake: {fmt_ms(res['invite_to_push_ms'])}")
    print(f"  INVITE → 100 at the PBX:  {fmt_ms(res['invite_to_100_ms'])}")
    print(f"  INVITE → 180 at the PBX:  {fmt_ms(res['invite_to_180_ms'])}")
    print(f"  INVITE → final: {fmt_ms(res['invite_to_final_ms'])}; finals {res['finals']}")
    print(f"  p50 INVITE → push per 5 s slice: {res.get('p50_by_5s_ms')} ms")
    if "push_log" in res:
        pl = res["push_log"]
        print(
            f"  push_log: {pl['rows']} rows {pl['outcomes']}, max attempts {pl['max_attempts']}, "
            f"wake() → answer {fmt_ms(pl['latency_ms (wake() start → provider answer)'])}"
        )
    for k, label in (
        ("cpu_send_window", "while sending (first INVITE → last + 1 s)"),
        ("cpu_total", "whole run (until the last 480 + ACK)"),
    ):
        parts = []
        for name, c in res[k].items():
            parts.append(f"{name} {c['pct_core']} % ({c['cpu_s']} s / {c['wall_s']} s)")
        print(f"  CPU {label}: " + ", ".join(parts))
    tot = res["cpu_total"].get("relay")
    if tot:
        print(
            f"  relay CPU per wake-up (hold, push, 180, 480, ACK; whole run): "
            f"{1000 * tot['cpu_s'] / max(1, res['wakeups']):.2f} ms"
        )
    mc = res["machine_cpu"]
    print(
        "  machine: "
        + " ".join(f"{k} {v['busy_pct']}% busy" for k, v in mc.items() if k != "cpu")
        + f"; other processes ≈ {res['other_load_pct']} % of a core"
    )
    print(f"  relay counters: {json.dumps(res['relay_counters'])}")
    print(f"  push metrics: {json.dumps(res['push_metrics'])}")
    print(f"  relay log: {res['relay_log']}; PBX saw also: {res['pbx_other']}")
    if "stages_ms" in res:
        print("  where the time goes (per call, relay timestamps; p50 / p99 ms):")
        for k, v in res["stages_ms"].items():
            if v.get("n"):
                print(f"    {k:16} {v['p50']:8.3f} {v['p99']:8.3f}   {v['what']}")
    if "pyspy" in res:
        p = res["pyspy"]
        print(
            f"  py-spy on the relay while sending: {p.get('samples')} busy samples at 200 Hz "
            f"(idle worker thread left out); {p['raw']}\n    command: {p['command']}"
        )
        print("    by part (first match in the stack):")
        for k, v, pct in p["push_layers"]:
            print(f"      {pct:5.1f} %  {v:6}  {k}")
        print("    self time by function:")
        for k, v, pct in p.get("self_top", [])[:15]:
            print(f"      {pct:5.1f} %  {v:6}  {k}")
        print("    self time by file:")
        for k, v, pct in p.get("self_by_file", [])[:10]:
            print(f"      {pct:5.1f} %  {v:6}  {k}")
    print(f"  reproduce: {cmd}")


# ------------------------------------------------------------------ py-spy
# First match in the sample's stack wins: which part of the relay the time is spent in.
PUSH_LAYERS = [
    (
        "push store: SQLite device read + push log insert (SqliteStore, worker thread)",
        ("SqliteStore.", "push/store.py"),
    ),
    ("logging (push_attempt / push lines)", ("Logger._log", "Logger.handle", "Handler.handle")),
    (
        "APNs/FCM request (gateway send_once: push/gateways/http2.py, h2, TLS)",
        ("send_once (", "http2.py", "httpx/", "httpcore/", "h2/", "hpack/", "hyperframe/", "ssl.py"),
    ),
    (
        "push service around it (wake, deliver, metrics, relay push events)",
        ("PushService.", "deliver (", "InProcessPush.", "PushLink._deliver"),
    ),
    (
        "SIP: framing, parsing, proxy, sockets",
        (
            "StreamFramer",
            "parse_message",
            "Proxy.",
            "Transports.",
            "Dispatcher.on_message",
            "Connection.writer",
            "serve_udp",
            "_reader",
        ),
    ),
    ("timers (ring timeout → 480)", ("RelayService._timers",)),
    ("trio thread hand-off (to_thread: worker → loop wake-ups)", ("WorkerThread.", "WakeupSocketpair.")),
]


def push_layers(raw: Path) -> list[tuple[str, int, float]]:
    c: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith("WorkerThread._work"):
            continue  # trio's idle worker thread
        total += int(n)
        c[
            next(
                (name for name, needles in PUSH_LAYERS if any(x in stack for x in needles)),
                "trio run loop, epoll, other",
            )
        ] += int(n)
    return [(k, v, round(100 * v / total, 1)) for k, v in c.most_common()] if total else []


def start_pyspy(
    procs: Procs, out: Path, pid: int, seconds: float
) -> tuple[subprocess.Popen[bytes], Path, str]:
    raw = out / "pyspy.raw"
    cmd = [
        str(Path(PYTHON).parent / "py-spy"),
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
    p = procs.start("py-spy", cmd, log=out / "pyspy.log", cpus=PIN["load"])
    return p, raw, " ".join(cmd)


# ----------------------------------------------------------- relay-traced
def trace_http2(
    session: Any, stamp: Callable[[str, str], None], current: Any
) -> None:
    """Stamps "h2" when a push's request is queued in the HTTP/2 session and
    "written" when its frames are handed to the TLS stream (send_all follows at once)."""
    h2_open, h2_outgoing = session.open, session.outgoing
    queued: list[str] = []  # call ids whose request frames wait for the next write

    def _open(self: Any, *a: Any, **k: Any) -> Any:
        if current.get():
            stamp(current.get(), "h2")
            queued.append(current.get())
        return h2_open(self, *a, **k)

    def _outgoing(self: Any) -> bytes:
        data: bytes = h2_outgoing(self)
        for cid in queued:
            stamp(cid, "written")
        queued.clear()
        return data

    session.open = _open
    session.outgoing = _outgoing


def relay_traced(argv: list[str]) -> int:
    """``pbx-relay`` with a monotonic timestamp per Call-ID at each stage of a
    wake-up (monkeypatched here; relay/ and push/ untouched). SIGUSR1 and exit write
    them to $BENCH_PUSH_TRACE as {call_id: {stage: time.monotonic()}}."""
    import atexit
    import contextvars

    sys.path.insert(0, str(ROOT))
    import push.gateways.apns as ga
    import push.gateways.fcm as gf
    import push.gateways.http2 as gh
    import push.service as ps
    import relay.dispatch as rs
    import relay.proxy.holds as holds
    from relay.cli import main

    T: dict[str, dict[str, float]] = {}
    mono = time.monotonic

    def stamp(cid: str, stage: str) -> None:
        T.setdefault(cid, {}).setdefault(stage, mono())

    on_message = rs.Dispatcher.on_message

    def _on_message(self: Any, msg: Any, flow: Any) -> None:
        if getattr(msg, "method", None) == "INVITE":
            stamp(msg.call_id, "in")
        return on_message(self, msg, flow)

    rs.Dispatcher.on_message = _on_message  # type: ignore[method-assign]
    hold = holds.Holds.hold

    def _hold(self: Any, req: Any, *a: Any, **k: Any) -> Any:
        stamp(req.call_id, "hold")
        return hold(self, req, *a, **k)

    holds.Holds.hold = _hold  # type: ignore[method-assign]
    wake = ps.PushService.wake

    async def _wake(self: Any, req: Any) -> Any:
        stamp(req.call_id, "wake")
        try:
            return await wake(self, req)
        finally:
            stamp(req.call_id, "woken")  # the relay's on_wake_result follows at once

    ps.PushService.wake = _wake
    deliver = ps.deliver

    async def _deliver(gateway: Any, msg: Any, deadline: float, **kw: Any) -> Any:
        stamp(msg.call_id, "deliver")
        return await deliver(gateway, msg, deadline, **kw)

    ps.deliver = _deliver
    current: contextvars.ContextVar[str] = contextvars.ContextVar("bench_call_id", default="")
    for cls in (ga.ApnsGateway, gf.FcmGateway):
        orig = cls.send_once

        async def _send_once(self: Any, msg: Any, _orig: Any = orig) -> Any:
            stamp(msg.call_id, "send")
            current.set(msg.call_id)  # the HTTP/2 client runs in this task: its calls see it
            try:
                return await _orig(self, msg)
            finally:
                stamp(msg.call_id, "answer")

        cls.send_once = _send_once
    trace_http2(gh.H2Session, stamp, current)
    path = os.environ.get("BENCH_PUSH_TRACE")

    def dump(*_: Any) -> None:
        if path:
            tmp = path + ".tmp"
            Path(tmp).write_text(json.dumps(T))
            os.replace(tmp, path)

    signal.signal(signal.SIGUSR1, dump)
    atexit.register(dump)
    return main(argv)


# =========================================================== (2) gateways
def gateway_client(argv: list[str]) -> int:
    """One process: K tasks, each calling deliver() back to back for ``seconds`` s.
    Prints ``window-start``, ``window-end`` and ``result <json>``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--info", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--warmup", type=float, default=1.0)
    a = ap.parse_args(argv)
    # BENCH_PUSH_SRC: another tree's push/ (run_push.py gateway --baseline REV), for a
    # before/after against the same fake in the same run.
    sys.path.insert(0, os.environ.get("BENCH_PUSH_SRC") or str(ROOT))
    from push.gateways import ApnsGateway, FcmGateway, deliver
    from push.model import PushMessage, PushTarget

    info = json.loads(Path(a.info).read_text())
    provider = info["provider"]

    async def main() -> dict[str, Any]:
        if provider == "apns":
            gw: Any = ApnsGateway(
                base_url=info["base_url"],
                key_file=info["key_file"],
                key_id=info["key_id"],
                team_id=info["team_id"],
                ca_file=info["ca_file"],
            )
            param = f"{info['team_id']}.{TOPIC}"
        else:
            gw = FcmGateway(
                service_account_file=info["service_account"],
                base_url=info["base_url"],
                ca_file=info["ca_file"],
            )
            param = info["project_id"]
        state = {"counting": False, "stop": False}
        lat: list[float] = []
        outcomes: dict[str, int] = {}
        n_total = [0]

        async def sender(k: int) -> None:
            token = secrets.token_hex(32) if provider == "apns" else f"bench-fcm-{k}:{rand(40)}"
            target = PushTarget(provider, token, param)
            j = 0
            while not state["stop"]:
                j += 1
                msg = PushMessage(target, f"gw-{k}-{j}", "100", "201", 30, time.time())
                t = trio.current_time()
                r = await deliver(gw, msg, t + 10)
                n_total[0] += 1
                if state["counting"]:
                    lat.append(trio.current_time() - t)
                    outcomes[str(r.outcome)] = outcomes.get(str(r.outcome), 0) + 1

        # one push first: connection, TLS, provider token / OAuth access token
        first = await deliver(
            gw,
            PushMessage(
                PushTarget(provider, "ab" * 32 if provider == "apns" else "x:y", param),
                f"warm-{rand()}",  # a call id of its own: not a duplicate of another step's
                "",
                "",
                30,
                time.time(),
            ),
            trio.current_time() + 10,
        )
        async with trio.open_nursery() as nursery:
            for k in range(a.concurrency):
                nursery.start_soon(sender, k)
            await trio.sleep(a.warmup)
            state["counting"] = True
            c0, w0 = time.process_time(), trio.current_time()
            print("window-start", flush=True)
            await trio.sleep(a.seconds)
            state["counting"] = False
            c1, w1 = time.process_time(), trio.current_time()
            print("window-end", flush=True)
            state["stop"] = True
            nursery.cancel_scope.deadline = trio.current_time() + 15
        await gw.aclose()
        wall = w1 - w0
        done = sum(outcomes.values())
        return {
            "provider": provider,
            "concurrency": a.concurrency,
            "seconds": round(wall, 3),
            "first_push": str(first.outcome),
            "pushes": done,
            "pushes_per_s": round(done / wall, 1),
            "outcomes": outcomes,
            "latency_ms": stats_ms(lat),
            "client_cpu_s": round(c1 - c0, 3),
            "client_cpu_pct": round(100 * (c1 - c0) / wall, 1),
            "client_cpu_per_push_us": round(1e6 * (c1 - c0) / max(1, done), 1),
        }

    res = trio.run(main)
    print("result " + json.dumps(res), flush=True)
    return 0


def baseline_tree(out: Path, rev: str) -> Path:
    """``git archive REV push`` unpacked under ``out``: the push package as it was."""
    dest = out / f"baseline-{rev}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "push"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def gateway_step(
    procs: Procs, out: Path, fake: subprocess.Popen[bytes], info: dict[str, Any], k: int, seconds: float,
    client: str, src: Path | None,
) -> dict[str, Any]:
    """One client process (this tree's push/, or ``src``'s) with ``k`` senders."""
    quiet = wait_quiet(max_wait=90)
    name = f"client_{info['provider']}_{k}_{client.split()[0]}"
    cmd = [PYTHON, str(BENCH / "run_push.py"), "gateway-client", "--info",
           str(Path(info["dir"]) / "info.json"), "--concurrency", str(k), "--seconds", str(seconds)]
    env = {**os.environ, "BENCH_PUSH_SRC": str(src)} if src is not None else None
    stdout = out / f"{name}.out"
    log(f"gateway: {info['provider']}, {client} client, {k} concurrent senders, {seconds:g} s")
    dup0 = fake_dump(fake, info)["duplicates"]
    p = procs.start(name, cmd, log=out / f"{name}.log", stdout=stdout, cpus=PIN["relay"], env=env)
    wait_line(stdout, b"window-start", p, 60, name)
    meter = CpuMeter({"fake": fake.pid})
    mm = MachineMeter()
    wait_line(stdout, b"window-end", p, seconds + 60, name)
    fake_cpu = meter.stop()["fake"]
    mach = mm.stop()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        procs.stop(p, signal.SIGKILL)
    line = next((x for x in stdout.read_text().splitlines() if x.startswith("result ")), "")
    if not line:
        raise RuntimeError(f"{name}: no result; {(out / f'{name}.log').read_text()[-2000:]}")
    r: dict[str, Any] = json.loads(line[len("result ") :])
    ours = {"fake": fake_cpu, "client": {"pct_core": r["client_cpu_pct"]}}
    r.update(
        client=client,
        duplicates_at_fake=fake_dump(fake, info)["duplicates"] - dup0,
        other_load_pct=other_load(mach, ours),
        fake_cpu_pct=fake_cpu["pct_core"],
        fake_cpu_s=fake_cpu["cpu_s"],
        fake_cpu_per_push_us=round(1e6 * fake_cpu["cpu_s"] / max(1, r["pushes"]), 1),
        machine_cpu=mach,
        quiet_wait=quiet,
    )
    r["saturated"] = (
        "client"
        if r["client_cpu_pct"] >= 90 and r["client_cpu_pct"] >= r["fake_cpu_pct"]
        else "fake"
        if r["fake_cpu_pct"] >= 90
        else "neither (latency-bound: not enough senders?)"
    )
    return r


def bench_gateway(
    out: Path, provider: str, concurrency: list[int], seconds: float, baseline: str | None = None
) -> dict[str, Any]:
    """Each K: this tree's client, then (``baseline``: a git revision) that
    revision's, against the same fake process."""
    procs = Procs()
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"provider": provider, "runs": [], "baseline": baseline}
    clients: list[tuple[str, Path | None]] = [("current", None)]
    if baseline:
        clients.append((f"baseline {baseline}", baseline_tree(out, baseline)))
    try:
        fake, info = start_fake(procs, out / f"fake_{provider}", provider)
        for k in concurrency:
            for client, src in clients:
                res["runs"].append(gateway_step(procs, out, fake, info, k, seconds, client, src))
        res["fake_log"] = log_problems(Path(info["dir"]) / "server.log")
    finally:
        procs.stop_all()
    return res


def print_gateway(res: dict[str, Any], cmd: str) -> None:
    print(
        f"\n== gateway: deliver() on {res['provider']} in one process (own core) against the fake "
        "(own process, other core)"
    )
    for r in res["runs"]:
        mc = r["machine_cpu"]
        print(
            f"  K={r['concurrency']:4} [{r['client']}]: {r['pushes_per_s']:8.1f} pushes/s "
            f"({r['pushes']} in {r['seconds']} s, "
            f"{r['outcomes']}, {r['duplicates_at_fake']} duplicates at the fake); "
            f"latency {fmt_ms(r['latency_ms'])}\n"
            f"          client CPU {r['client_cpu_pct']} % ({r['client_cpu_per_push_us']} µs/push), "
            f"fake CPU {r['fake_cpu_pct']} % ({r['fake_cpu_per_push_us']} µs/push); "
            f"saturated: {r['saturated']}; machine "
            + " ".join(f"{k} {v['busy_pct']}%" for k, v in mc.items() if k != "cpu")
            + f", other processes ≈ {r['other_load_pct']} % of a core"
        )
    print(f"  fake log: {res['fake_log']}")
    print(f"  reproduce: {cmd}")


# ====================================================================== main
def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    dirty = git("status", "--porcelain", "--", "relay", "push")
    head = git("rev-parse", "--short", "HEAD")
    return head + (" + uncommitted changes in relay/ or push/" if dirty else "")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "relay-traced":
        return relay_traced(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "gateway-client":
        return gateway_client(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (default bench/out/push-<stamp>)")
    ap.add_argument(
        "--no-pin", action="store_true", help="do not give the relay / client under test a core of its own"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short runs: wake 5 s (250 wake-ups, ring timeout 3 s), gateway 3 s per step",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wake", help="(1) INVITE → push at the fake, through a real relay")
    w.add_argument("--rate", type=float, default=50)
    w.add_argument("--duration", type=float, default=None, help="seconds (default 20, --quick 5)")
    w.add_argument("--ring-timeout", type=float, default=None, help="seconds (default 5, --quick 3)")
    w.add_argument("--provider", choices=("apns", "fcm"), default="apns")
    w.add_argument("--trace", action="store_true", help="timestamp every stage inside the relay")
    w.add_argument("--profile", action="store_true", help="py-spy on the relay while sending")
    g = sub.add_parser("gateway", help="(2) pushes/s of ApnsGateway / FcmGateway in one process")
    g.add_argument("--providers", default="apns,fcm")
    g.add_argument("--concurrency", default="1,10,50,200")
    g.add_argument("--seconds", type=float, default=None, help="per step (default 10, --quick 3)")
    g.add_argument("--baseline", help="also run this git revision's push/ client, step by step")
    sub.add_parser("all", help="wake, wake --trace, wake --profile, gateway (with their defaults)")
    a = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (Path(a.out) if a.out else BENCH / "out" / f"push-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    placement = pin(not a.no_pin)
    me = f".venv/bin/python {SELF}" + (" --no-pin" if a.no_pin else "") + (" --quick" if a.quick else "")
    results: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv[1:],
        "cpus": placement,
        "git": git_state(),
    }
    print(
        f"machine: {results['machine']}\ncpus: relay / client under test on {placement['relay']}, "
        f"load and fakes on {placement['load']}\ngit: {results['git']}\noutput: {out}"
    )
    dflt_dur, dflt_ring, dflt_secs = (5.0, 3.0, 3.0) if a.quick else (20.0, 5.0, 10.0)
    t_all = time.monotonic()
    todo: list[tuple[str, dict[str, Any]]] = []
    if a.cmd in ("wake", "all"):
        rate = getattr(a, "rate", 50.0)
        dur = getattr(a, "duration", None) or dflt_dur
        ring = getattr(a, "ring_timeout", None) or dflt_ring
        provider = getattr(a, "provider", "apns")
        variants = (
            [(getattr(a, "trace", False), getattr(a, "profile", False))]
            if a.cmd == "wake"
            else [(False, False), (True, False), (False, True)]
        )
        for tr, pr in variants:
            todo.append(
                (
                    "wake" + ("_trace" if tr else "") + ("_profile" if pr else ""),
                    {
                        "rate": rate,
                        "duration": dur,
                        "ring": ring,
                        "provider": provider,
                        "trace": tr,
                        "profile": pr,
                    },
                )
            )
    if a.cmd in ("gateway", "all"):
        secs = getattr(a, "seconds", None) or dflt_secs
        ks = [int(x) for x in str(getattr(a, "concurrency", "1,10,50,200")).split(",")]
        for prov in str(getattr(a, "providers", "apns,fcm")).split(","):
            todo.append((f"gateway_{prov}", {"provider": prov, "ks": ks, "seconds": secs,
                                              "baseline": getattr(a, "baseline", None)}))
    for name, p in todo:
        if name.startswith("wake"):
            res = bench_wake(
                out / name, p["provider"], p["rate"], p["duration"], p["ring"], p["trace"], p["profile"]
            )
            cmd = (
                f"{me} wake --rate {p['rate']:g} --duration {p['duration']:g} "
                f"--ring-timeout {p['ring']:g} --provider {p['provider']}"
                + (" --trace" if p["trace"] else "")
                + (" --profile" if p["profile"] else "")
            )
            print_wake(res, cmd)
        else:
            res = bench_gateway(out / name, p["provider"], p["ks"], p["seconds"], p["baseline"])
            cmd = (
                f"{me} gateway --providers {p['provider']} --concurrency {','.join(map(str, p['ks']))} "
                f"--seconds {p['seconds']:g}" + (f" --baseline {p['baseline']}" if p["baseline"] else "")
            )
            print_gateway(res, cmd)
        res["command"] = cmd
        results[name] = res
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nall done in {time.monotonic() - t_all:.0f} s; figures in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
