"""Media benchmark (issue 3, "Benchmark"): RTP through our relay vs rtpengine, same run.

N concurrent G.711 "calls": each call is two UDP endpoints (phone side, PBX side);
every endpoint sends 172-byte RTP packets (12-byte header + 160 bytes, PT 0,
seq/ts incrementing) at 50 packets/s to the relay port its SDP named, and counts
what arrives. Our relay's ports come from real SIP (phone INVITE over UDP with SDP,
the PBX phoned home over TCP with digest REGISTER answers 200 with SDP: the
relay rewrites both); rtpengine's from its ng protocol (bencode over UDP: offer,
answer). Same endpoints, same generator, same pinning (relay/rtpengine on the last
CPU, generator + this script on the others).

The generator: the endpoint sockets are bound in this process, then two forked
children share them, one sending (paced loop of ``sendto``, one slice of the
streams every 2 ms), one receiving (epoll + ``recv_into``, counting per socket).

    .venv/bin/python bench/run_media.py   # = --loads 50,100,200,400,600 --seconds 10 --profile 200

``--kernel`` (issue 11, root): the relay with ``[media] backend = "kernel"`` against
rtpengine, both in a network namespace of their own (tests/kernelnet.py: the relay's
10.78.0.1; this script, its endpoints and the generator in the peers' namespace,
10.78.0.2), so every packet crosses a veth pair both ways and the relay's nftables
table never touches the host. The generator is ``bench/rtpgen.c`` (compiled into the
output directory): one sender per CPU, each pinned to its CPU with its share of the
endpoints, each sending a 2 ms slice of the streams with one sendmmsg(2) on a raw
socket (IP and UDP headers written by rtpgen, source = the endpoint's own address and
port: the same packets as the endpoint's ``sendto``; ``--gen sendto`` for one
``sendto`` per packet), and one receiver that empties every endpoint socket with
recvmmsg(2) every 200 ms (no epoll, no wake-up per packet). Kernel forwarding runs in
softirq inline in the sender's system call, so one sender process was one core's worth
of load in all: with a single ``sendto`` sender the generator, not the relay, stopped
the run at ~1,500 calls.

Per load it runs, with the same endpoints and the same packets:

- ``ref-drop``: the packets dropped at the target namespace's ingress (raw prerouting,
  before the relay's table): what sending one costs the generator;
- ``ref-sink``: the packets delivered to UDP sockets in the target namespace (ports
  44000.., drained like the endpoints): what delivering one into a socket costs;
- ``kernel`` (the relay) and ``rtpengine``, each until loss ≥ 0.1 % or the generator
  does not keep up (≥ 1 % of its 2 ms ticks > 20 ms late, or < 99 % of the packets).

What is counted (``per_packet``): CPU per relayed packet = senders + ksoftirqd + the
target's process (all threads, /proc/<pid>/stat) − the senders' ``ref-drop`` cost per
packet × packets sent, divided by the packets that arrived. The kernel path's work is
in the senders' softirq; rtpengine's in its process (its ingress in the senders', its
sendmsg carries the far end's delivery). Reported two ways: ``us_per_pkt`` with the far
end's socket delivery (as in earlier runs) and ``us_per_pkt_relay`` without it (minus
``ref-sink`` − ``ref-drop`` per packet): the far end's delivery is another machine's
work in production and the same absolute amount for both targets, so including it
pulls the ratio towards 1. The receiving process is left out of both. The ``_machine``
figures are the same from the machine's busy time (2 CPUs × wall − idle − iowait −
steal, /proc/stat) minus the receiver: exact when nothing else runs, meaningless when
other work shares the box (then only the per-process figures hold).

    .venv/bin/python bench/run_media.py --kernel   # = --loads 250,500,1000,1500,2000,2500,3000 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    CLK_TCK,
    HOST,
    PIN,
    VENV_BIN,
    CpuMeter,
    MachineMeter,
    Procs,
    cpu_stat,
    free_port,
    make_relay,
    pin,
    raise_nofile,
    show,
    start_relay,
    wait_quiet,
)
from tests.media_peers import PbxUa, Phone, sdp_media_address  # noqa: E402

SERIAL = "0123456789"
PEER = HOST  # where the endpoints and SIP peers are; the peers' namespace address with --kernel
RATE = 50  # packets/s per direction per call (20 ms G.711)
PAYLOAD = bytes(range(160))
SLICES = 10  # the streams are sent in 10 slices per 20 ms (one every 2 ms)


# -------------------------------------------------------------------- endpoints
class Endpoint:
    """One side of a call's audio: a UDP socket that sends and receives (symmetric RTP)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        self.sock.bind((PEER, 0))
        self.port = self.sock.getsockname()[1]
        self.ssrc = random.getrandbits(32)
        self.dest: tuple[str, int] | None = None

    def sdp(self) -> bytes:
        lines = [
            "v=0",
            f"o=- {self.ssrc} 1 IN IP4 {PEER}",
            "s=-",
            f"c=IN IP4 {PEER}",
            "t=0 0",
            f"m=audio {self.port} RTP/AVP 0 101",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=ptime:20",
            "a=sendrecv",
        ]
        return ("\r\n".join(lines) + "\r\n").encode()

    def learn(self, body: bytes) -> None:
        self.dest = sdp_media_address(body)[0]


class RelayView:
    """What tests.media_peers needs of a relay: ports, secrets, a log."""

    def __init__(self, r, secret: str, log: Path, host: str = HOST):  # type: ignore[no-untyped-def]
        self.udp, self.tcp = r.udp, r.tcp
        self.host, self.peer_host = host, PEER
        self.secrets = {SERIAL: secret}
        self._log = log

    def log(self) -> str:
        return self._log.read_text(errors="replace")


def relay_calls(phone: Phone, pbx: PbxUa, n: int) -> list[tuple[Endpoint, Endpoint]]:
    """n calls phone → relay → PBX, each answered 200 with SDP and ACKed."""
    out = []
    for _ in range(n):
        a, b = Endpoint(), Endpoint()
        pc = phone.invite(a.sdp())
        bc = pbx.answer(b.sdp(), ring=False)
        b.learn(bc.offer.body)
        resp = pc.final()
        assert resp.status == 200, resp.raw
        a.learn(resp.body)
        bc.ack()
        out.append((a, b))
    return out


# -------------------------------------------------------------- rtpengine (ng)
def benc(x: object) -> bytes:
    if isinstance(x, bytes):
        return str(len(x)).encode() + b":" + x
    if isinstance(x, str):
        return benc(x.encode())
    if isinstance(x, int):
        return b"i%de" % x
    if isinstance(x, list):
        return b"l" + b"".join(benc(v) for v in x) + b"e"
    if isinstance(x, dict):
        return b"d" + b"".join(benc(k) + benc(v) for k, v in sorted(x.items())) + b"e"
    raise TypeError(x)


def bdec(s: bytes, i: int = 0) -> tuple[object, int]:
    c = s[i : i + 1]
    if c == b"i":
        j = s.index(b"e", i)
        return int(s[i + 1 : j]), j + 1
    if c in (b"l", b"d"):
        i += 1
        items = []
        while s[i : i + 1] != b"e":
            v, i = bdec(s, i)
            items.append(v)
        if c == b"l":
            return items, i + 1
        return {items[k].decode(): items[k + 1] for k in range(0, len(items), 2)}, i + 1  # type: ignore[union-attr]
    j = s.index(b":", i)
    n = int(s[i:j])
    return s[j + 1 : j + 1 + n], j + 1 + n


class Ng:
    def __init__(self, port: int, host: str = HOST):
        self.addr = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((PEER, 0))
        self.sock.settimeout(2)

    def __call__(self, **cmd: object) -> dict:  # type: ignore[type-arg]
        cookie = os.urandom(6).hex().encode()
        for _ in range(5):
            self.sock.sendto(cookie + b" " + benc(cmd), self.addr)
            try:
                while True:
                    data = self.sock.recv(65536)
                    if data.startswith(cookie + b" "):
                        out, _ = bdec(data, len(cookie) + 1)
                        assert isinstance(out, dict) and out.get("result") in (b"ok", b"pong"), out
                        return out
            except TimeoutError:
                continue
        raise RuntimeError("rtpengine: no answer on ng")


def rtpengine_calls(ng: Ng, n: int) -> list[tuple[Endpoint, Endpoint]]:
    out = []
    for _ in range(n):
        a, b = Endpoint(), Endpoint()
        cid, ft, tt = os.urandom(8).hex(), os.urandom(4).hex(), os.urandom(4).hex()
        off = ng(command="offer", **{"call-id": cid, "from-tag": ft, "sdp": a.sdp(), "ICE": "remove"})
        b.learn(off["sdp"])
        ans = ng(
            command="answer",
            **{"call-id": cid, "from-tag": ft, "to-tag": tt, "sdp": b.sdp(), "ICE": "remove"},
        )
        a.learn(ans["sdp"])
        out.append((a, b))
    return out


def start_rtpengine(
    procs: Procs, out: Path, host: str = HOST, netns: str | None = None,
    ports: tuple[int, int] = (30000, 39999),
) -> tuple[subprocess.Popen[bytes], int, list[str]]:
    port = free_port() if netns is None else 2223
    cmd = [
        "rtpengine",
        "--config-file=none",
        "-f",
        "-E",
        "--table=-1",
        f"--interface={host}",
        f"--listen-ng={host}:{port}",
        f"--port-min={ports[0]}",
        f"--port-max={ports[1]}",
        "--log-level=5",
        "--timeout=120",
        "--num-threads=2",
    ]
    full = cmd if netns is None else ["ip", "netns", "exec", netns, *cmd]
    p = procs.start("rtpengine", full, log=out / "rtpengine.log", cpus=PIN["relay"])
    ng = Ng(port, host)
    deadline = time.monotonic() + 10
    while True:
        try:
            ng(command="ping")
            return p, port, cmd
        except (RuntimeError, ConnectionRefusedError, AssertionError):
            if time.monotonic() > deadline or p.poll() is not None:
                tail = (out / "rtpengine.log").read_text()[-2000:]
                raise RuntimeError("rtpengine did not start: " + tail) from None
            time.sleep(0.2)


# ---------------------------------------------------------------- generator
def sender(socks: list[socket.socket], dests: list[tuple[str, int]], seconds: float, wfd: int) -> None:
    n = len(socks)
    buf = bytearray(12 + 160)
    buf[0], buf[1] = 0x80, 0
    buf[12:] = PAYLOAD
    ssrcs = [random.getrandbits(32) for _ in range(n)]
    seqs = [0] * n
    sent = [0] * n
    fails = 0
    pack = struct.pack_into
    slices = [list(range(k, n, SLICES)) for k in range(SLICES)]
    tick = 1.0 / RATE / SLICES
    start = time.monotonic() + 0.05
    end = start + seconds
    k = 0
    max_lag = 0.0
    late_ticks = 0
    while True:
        due = start + k * tick
        if due >= end:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            lag = now - due
            max_lag = max(max_lag, lag)
            if lag > 0.02:
                late_ticks += 1
        for i in slices[k % SLICES]:
            s = seqs[i]
            pack("!HII", buf, 2, s & 0xFFFF, (s * 160) & 0xFFFFFFFF, ssrcs[i])
            try:
                socks[i].sendto(buf, dests[i])
                sent[i] += 1
                seqs[i] = s + 1
            except OSError:
                fails += 1
        k += 1
    wall = time.monotonic() - start
    os.write(
        wfd,
        json.dumps(
            {
                "sent": sent,
                "fails": fails,
                "wall": wall,
                "max_lag_ms": round(max_lag * 1e3, 1),
                "late_ticks": late_ticks,
                "ticks": k,
            }
        ).encode(),
    )
    os.close(wfd)


def receiver(socks: list[socket.socket], stop_fd: int, wfd: int) -> None:
    ep = select.epoll()
    fds = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        fds[s.fileno()] = i
    ep.register(stop_fd, select.EPOLLIN)
    got = [0] * len(socks)
    buf = bytearray(2048)
    done = False
    while not done:
        for fd, _ in ep.poll(1.0):
            if fd == stop_fd:
                done = True
                continue
            i = fds[fd]
            s = socks[i]
            while True:
                try:
                    s.recv_into(buf)
                except BlockingIOError:
                    break
                got[i] += 1
    os.write(wfd, json.dumps({"got": got}).encode())
    os.close(wfd)


def read_all(fd: int) -> dict:  # type: ignore[type-arg]
    chunks = []
    while c := os.read(fd, 1 << 20):
        chunks.append(c)
    os.close(fd)
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


def run_load(
    calls: list[tuple[Endpoint, Endpoint]], seconds: float, pid: int, extra_pids: dict[str, int]
) -> dict:  # type: ignore[type-arg]
    """Every call's two endpoints send at 50 pps for ``seconds``; CPU of ``pid`` over it."""
    eps = [e for ab in calls for e in ab]
    socks = [e.sock for e in eps]
    dests = [e.dest for e in eps]
    # a warm-up packet each way latches every leg before the measured window
    for e in eps:
        e.sock.sendto(b"\x80\x00" + bytes(170), e.dest)
    time.sleep(0.3)
    for e in eps:
        e.sock.setblocking(False)
        try:
            while e.sock.recv(2048):
                pass
        except BlockingIOError:
            pass
    r_rd, r_wr = os.pipe()
    stop_rd, stop_wr = os.pipe()
    rpid = os.fork()
    if rpid == 0:
        os.close(r_rd)
        os.close(stop_wr)
        try:
            receiver(socks, stop_rd, r_wr)
        finally:
            os._exit(0)
    os.close(r_wr)
    os.close(stop_rd)
    s_rd, s_wr = os.pipe()
    meter = CpuMeter({"target": pid, **extra_pids, "receiver": rpid})
    mm = MachineMeter()
    st0 = cpu_stat()
    spid = os.fork()
    if spid == 0:
        os.close(s_rd)
        try:
            sender(socks, dests, seconds, s_wr)
        finally:
            os._exit(0)
    os.close(s_wr)
    meter.pids["sender"] = spid
    meter.start["sender"] = 0
    meter.start_split["sender"] = (0, 0)
    snd = read_all(s_rd)  # returns when the sender is done
    cpu = meter.stop()
    machine = mm.stop()
    st1 = cpu_stat()
    for c in machine:  # softirq apart: loopback delivery of what a CPU sends is not in its process's stime
        machine[c]["softirq_pct"] = round(
            100 * (st1[c][6] - st0[c][6]) / CLK_TCK / cpu["target"]["wall_s"], 1
        )
    os.waitpid(spid, 0)
    time.sleep(0.5)  # packets still in flight
    os.write(stop_wr, b"x")
    rcv = read_all(r_rd)
    os.waitpid(rpid, 0)
    os.close(stop_wr)
    # endpoint 2c sends to 2c+1 and vice versa
    sent, got = snd["sent"], rcv["got"]
    exp = [sent[i ^ 1] for i in range(len(sent))]
    tot_sent, tot_got = sum(sent), sum(got)
    wall = snd["wall"]
    worst = max((1 - got[i] / exp[i]) if exp[i] else 0 for i in range(len(got)))
    return {
        "calls": len(calls),
        "target_pps": len(eps) * RATE,
        "sent_pps": round(tot_sent / wall),
        "forwarded_pps": round(tot_got / wall),
        "loss_pct": round(100 * (tot_sent - tot_got) / tot_sent, 4) if tot_sent else None,
        "worst_stream_loss_pct": round(100 * worst, 3),
        "send_fails": snd["fails"],
        "gen_max_lag_ms": snd["max_lag_ms"],
        "gen_late_ticks": snd["late_ticks"],
        "gen_kept_up": snd["late_ticks"] <= snd["ticks"] * 0.01
        and tot_sent >= 0.99 * len(eps) * RATE * seconds,
        "cpu": cpu,
        "machine": machine,
        "target_pct_core": cpu.get("target", {}).get("pct_core"),
        "target_pct_core_per_10k_pps": round(cpu["target"]["pct_core"] / (tot_got / wall / 1e4), 2)
        if tot_got
        else None,
    }


def pyspy(pid: int, seconds: int, out: Path) -> dict:  # type: ignore[type-arg]
    raw = out / "pyspy.raw"
    cmd = [
        str(VENV_BIN / "py-spy"),
        "record",
        "-f",
        "raw",
        "-d",
        str(seconds),
        "-r",
        "200",
        "-p",
        str(pid),
        "-o",
        str(raw),
        "--nonblocking",
    ]
    return {
        "cmd": cmd,
        "proc": subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out / "pyspy.log", "wb")),
    }


def pyspy_summary(raw: Path, top: int = 20) -> dict:  # type: ignore[type-arg]
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        c = int(n)
        total += c
        frames = stack.split(";")
        self_t[re.sub(r":\d+\)", ")", frames[-1])] += c
        for f in {re.sub(r":\d+\)", ")", f) for f in frames}:
            incl[f] += c
    return {
        "samples": total,
        "self": [(f, round(100 * c / total, 1)) for f, c in self_t.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl.most_common(top)],
    }



# ------------------------------------------------------------ --kernel (issue 11)
KERNEL_LOADS = "250,500,1000,1500,2000,2500,3000"
RELAY_PORTS = (10000, 22000)  # 3,000 calls of two pairs each, for both targets
ENGINE_PORTS = (30000, 42000)
LOSS_LIMIT_PCT = 0.1  # the "< 0.1 % loss"
SINK_PORT = 44000  # the sink reference's sockets, in the target namespace: 44000.. (after ENGINE_PORTS)
DRAIN_MS = 200  # rtpgen recv empties every socket this often (no wake-ups per packet)


class MachineBusy:
    """CPU seconds the whole machine spent over a window: CPUs × wall − (idle + iowait +
    steal). Idle is measured exactly under NO_HZ; the busy tick counters are sampled
    and undercount (research/media-fastpath.md), so they are not summed."""

    def __init__(self) -> None:
        self.t0, self.free0 = time.monotonic(), self._free()

    @staticmethod
    def _free() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[3] + v[4] + v[7]

    def stop(self) -> float:
        wall = time.monotonic() - self.t0
        return (os.cpu_count() or 1) * wall - (self._free() - self.free0) / CLK_TCK


def build_rtpgen(out: Path) -> Path:
    exe = out / "rtpgen"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(BENCH / "rtpgen.c")], check=True)
    return exe


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def warm_up(eps: list[Endpoint]) -> None:
    """One packet from every endpoint (latches every leg), then drain what came back."""
    for e in eps:
        assert e.dest is not None
        e.sock.sendto(b"\x80\x00" + bytes(170), e.dest)
    time.sleep(0.5)
    for e in eps:
        e.sock.setblocking(False)
        try:
            while e.sock.recv(2048):
                pass
        except BlockingIOError:
            pass


def _rtpgen_sends(exe: Path, spec: list[tuple[int, str, int]], seconds: float, fds: list[int],
                  mode: list[str]) -> dict:  # type: ignore[type-arg]
    """One ``rtpgen send`` per CPU, each pinned to its CPU with every CPU-count-th
    endpoint; their reports merged back into the spec's order."""
    cpus = sorted(os.sched_getaffinity(0))
    parts = [list(range(k, len(spec), len(cpus))) for k in range(len(cpus))]
    texts = ["".join(f"{spec[i][0]} {spec[i][1]} {spec[i][2]}\n" for i in idx) for idx in parts]
    # SCHED_FIFO: a sender wakes every 2 ms for a short burst; at normal priority it
    # waited behind rtpengine's threads and whatever else ran (ticks 20-100 ms late).
    # Priority changes when the CPU time is spent, not how much: same for both targets.
    procs = [subprocess.Popen(["chrt", "-f", "10", "taskset", "-c", str(cpu), str(exe), "send", str(seconds),
                               str(RATE), *mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=fds)
             for cpu in cpus]
    for p, text in zip(procs, texts, strict=True):  # all started first: they begin within ms of each other
        assert p.stdin is not None
        p.stdin.write(text)
        p.stdin.close()
    reports = []
    for p in procs:
        assert p.stdout is not None
        reports.append(json.loads(p.stdout.read()))
        p.wait(timeout=seconds + 120)
    sent = [0] * len(spec)
    for idx, rep in zip(parts, reports, strict=True):
        for i, v in zip(idx, rep["sent"], strict=True):
            sent[i] = v
    return {"sent": sent, "fails": sum(r["fails"] for r in reports), "wall": max(r["wall"] for r in reports),
            "max_lag_ms": max(r["max_lag_ms"] for r in reports),
            "late_ticks": sum(r["late_ticks"] for r in reports), "ticks": sum(r["ticks"] for r in reports),
            "syscalls": sum(r.get("syscalls", 0) for r in reports), "senders": len(procs)}


def run_load_c(exe: Path, spec: list[tuple[int, str, int]], receivers: list[socket.socket],
               expect_from: list[int], seconds: float, pids: dict[str, int],
               mode: list[str] | None = None) -> dict:  # type: ignore[type-arg]
    """rtpgen: every endpoint of ``spec`` (fd, where to) sends 50 packets/s for
    ``seconds`` (one sender per CPU); what arrived per receiving socket (receiver j
    expects what sender ``expect_from[j]`` sent), the machine's CPU, the targets'
    and the generator's."""
    fds = sorted({fd for fd, _, _ in spec} | {s.fileno() for s in receivers})
    rspec = "".join(f"{s.fileno()} 0.0.0.0 0\n" for s in receivers)
    rcv = subprocess.Popen([str(exe), "recv", str(DRAIN_MS)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, pass_fds=fds, text=True)
    assert rcv.stdin is not None
    rcv.stdin.write(rspec)
    rcv.stdin.close()
    time.sleep(0.3)
    meter, busy, c0 = CpuMeter(dict(pids)), MachineBusy(), _children_cpu()
    sent_all = _rtpgen_sends(exe, spec, seconds, fds, mode or [])
    machine_s, cpu = busy.stop(), meter.stop()
    sender_s = _children_cpu() - c0
    time.sleep(0.5)  # packets still in flight
    rcv.terminate()
    rcv.stdin = None  # written and closed above; communicate() must not flush it
    got = json.loads(rcv.communicate(timeout=60)[0])["got"]
    receiver_s = _children_cpu() - c0 - sender_s
    sent, wall = sent_all["sent"], sent_all["wall"]
    tot_sent, tot_got = sum(sent), sum(got)
    exp = [sent[j] for j in expect_from]
    return {
        "calls": len(spec) // 2, "target_pps": len(spec) * RATE, "sent_pps": round(tot_sent / wall),
        "sent": tot_sent, "forwarded_pps": round(tot_got / wall), "forwarded": tot_got,
        "loss_pct": round(100 * (tot_sent - tot_got) / tot_sent, 4) if tot_sent else None,
        "worst_stream_loss_pct": round(100 * max((1 - got[i] / exp[i]) if exp[i] else 0
                                                for i in range(len(got))), 3),
        "send_fails": sent_all["fails"], "gen_max_lag_ms": sent_all["max_lag_ms"],
        "gen_late_ticks": sent_all["late_ticks"], "gen_syscalls": sent_all["syscalls"],
        "gen_senders": sent_all["senders"],
        "gen_kept_up": sent_all["late_ticks"] <= sent_all["ticks"] * 0.01
        and tot_sent >= 0.99 * len(spec) * RATE * seconds,
        "machine_cpu_s": round(machine_s, 3), "sender_cpu_s": round(sender_s, 3),
        "receiver_cpu_s": round(receiver_s, 3), "wall_s": round(wall, 3), "cpu": cpu,
    }


DROP_TABLE = f"""
table inet bench_drop {{
  chain prerouting {{
    type filter hook prerouting priority -350; policy accept;
    udp dport {RELAY_PORTS[0]}-{ENGINE_PORTS[1]} drop
  }}
}}
"""


def kernel_relay_proc(net, out: Path, fast_path: bool = True):  # type: ignore[no-untyped-def]
    """``pbx-relay run`` in the relay's namespace, media backend kernel, SIP log quiet;
    ``fast_path=False``: the nftables table alone (``kernel_fast_path = false``)."""
    from tests.kernelnet import PEER_IP, RELAY_IP
    from tests.realpeers import RelayProc, start_relay, write_config

    state = out / "relay"
    state.mkdir(parents=True, exist_ok=True)
    r = RelayProc(state, RELAY_IP, 5060, 5060, 5061, 9090, netns=net.relay_ns, peer_host=PEER_IP,
                  log_level="warning")
    media = (f'backend = "kernel"\nport_min = {RELAY_PORTS[0]}\nport_max = {RELAY_PORTS[1]}\n'
             f"no_media_timeout = 3600.0\nkernel_fast_path = {'true' if fast_path else 'false'}")
    # thousands of calls a second from the peers' one address: exempt from the
    # per-source admission buckets, as tests/kernelnet.py does for the tests,
    # ... and the per-PBX / per-source call limits raised for the loads offered here
    exempt = (f'[transport]\nexempt = ["127.0.0.1", "::1", "{PEER_IP}"]\n'
              "[limits]\nmedia_calls_per_source = 10000\nmedia_calls_per_pbx = 10000\n")
    write_config(r, exempt, media=media)
    r.add_pbx(SERIAL)
    start_relay(r, exempt, media=media)
    r.netns = None  # its admin endpoint, over the veth from here
    return r


def wait_handed_over(relay, streams: int, timeout: float = 60) -> float:  # type: ignore[no-untyped-def]
    key = 'pbx_relay_media_streams_forwarded{backend="kernel"}'
    deadline = time.monotonic() + timeout
    while (got := relay.metrics().get(key, 0)) < streams and time.monotonic() < deadline:
        time.sleep(0.2)
    return float(got)


def ksoftirqd_pids() -> dict[str, int]:
    """The kernel's softirq threads: packet work the CPUs could not do inline runs there."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().startswith("ksoftirqd/"):
                    out[(d / "comm").read_text().strip()] = int(d.name)
            except OSError:
                continue
    return out


def _per_sent(run: dict, *, machine: bool = False) -> float:  # type: ignore[type-arg]
    """CPU seconds per packet sent of a reference run: its senders (and the softirq
    threads), or the whole machine minus the receiving process."""
    if machine:
        return (run["machine_cpu_s"] - run["receiver_cpu_s"]) / max(run["sent"], 1)
    soft = sum(v.get("cpu_s", 0.0) for k, v in run["cpu"].items() if k.startswith("ksoftirqd"))
    return (run["sender_cpu_s"] + soft) / max(run["sent"], 1)


def per_packet(res: dict, drop: dict, sink: dict) -> dict:  # type: ignore[type-arg]
    """µs of CPU the target adds per relayed packet, two ways, both from the same runs.

    ``us_per_pkt`` (as measured before, "far end included"): kernel forwarding runs in
    softirq inline in the sender's system call (veth), so it shows in the senders' CPU;
    rtpengine's work shows in its process, its ingress in the senders too. Added =
    senders + softirq threads + the target's process − what the senders spent per packet
    in the ``drop`` reference (the same packets dropped at the target namespace's
    ingress) × packets sent. The receiving process is left out for both; the far end's
    socket delivery (ip_rcv → UDP lookup → enqueue) is in: in the senders' softirq for
    the kernel path, in rtpengine's sendmsg for rtpengine.

    ``us_per_pkt_relay`` ("relay side only"): minus what delivering one packet into a UDP
    socket costs, measured by the ``sink`` reference (the same packets delivered to sockets
    in the target's namespace, drained without wake-ups like the endpoints): in a real
    deployment the far end's delivery is another machine's work, and it is the same
    absolute amount for both targets, so counting it pulls every ratio towards 1.
    ``_machine``: the same from the machine's busy time (all CPUs − idle) minus the
    receiving process, which sees everything but also whatever else runs on the box."""
    fwd = max(res["forwarded"], 1)
    out = {}
    for suffix, machine in (("", False), ("_machine", True)):
        if machine:
            spent = res["machine_cpu_s"] - res["receiver_cpu_s"]
        else:
            proc = res["cpu"].get("target", {}).get("cpu_s", 0.0)
            spent = _per_sent(res) * res["sent"] + proc
        added = (spent - _per_sent(drop, machine=machine) * res["sent"]) / fwd
        delivery = _per_sent(sink, machine=machine) - _per_sent(drop, machine=machine)
        out[f"us_per_pkt{suffix}"] = round(1e6 * added, 2)
        out[f"us_per_pkt_relay{suffix}"] = round(1e6 * (added - delivery), 2)
        out[f"us_delivery{suffix}"] = round(1e6 * delivery, 2)
    out["us_per_pkt_process"] = round(1e6 * res["cpu"].get("target", {}).get("cpu_s", 0.0) / fwd, 2)
    return out


def show_step(res: dict) -> None:  # type: ignore[type-arg]
    print(f"{res['target']:9s} calls={res['calls']:5d} sent={res['sent_pps']:7d}/s "
          f"got={res['forwarded_pps']:7d}/s loss={res['loss_pct']}% worst={res['worst_stream_loss_pct']}% "
          f"snd/rcv={res['sender_cpu_s']}/{res['receiver_cpu_s']}s machine={res['machine_cpu_s']}s "
          f"proc={res['cpu'].get('target', {}).get('cpu_s')}s per-pkt={res.get('us_per_pkt')}us "
          f"relay-side={res.get('us_per_pkt_relay')}us (machine {res.get('us_per_pkt_machine')}/"
          f"{res.get('us_per_pkt_relay_machine')}, process {res.get('us_per_pkt_process')}, "
          f"delivery {res.get('us_delivery')}) gen_ok={res['gen_kept_up']} lag={res['gen_max_lag_ms']}ms",
          flush=True)


Spec = list[tuple[int, str, int]]  # rtpgen's: (socket fd, destination address, port)


def call_spec(calls: list[tuple[Endpoint, Endpoint]]) -> tuple[Spec, list[socket.socket]]:
    eps = [e for ab in calls for e in ab]
    return [(e.sock.fileno(), *e.dest) for e in eps if e.dest], [e.sock for e in eps]


def sinks(have: list[socket.socket], n: int, ns: str) -> list[socket.socket]:
    """``n`` UDP sockets on the relay's address, ports SINK_PORT.., in the target
    namespace (the ``sink`` reference: the far end's delivery, measured)."""
    from tests.kernelnet import RELAY_IP, inside

    with inside(ns):
        while len(have) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
            s.bind((RELAY_IP, SINK_PORT + len(have)))
            have.append(s)
    return have


def kernel_load(exe: Path, net, step: dict, ours: list, theirs: list, sink_socks: list,  # type: ignore[no-untyped-def,type-arg]
                seconds: float, pids: dict[str, int], mode: list[str]) -> list[dict]:  # type: ignore[type-arg]
    """One load: the two references, then each target not stopped yet (``step``).
    ``ref-drop`` sends rtpengine's calls' packets (to its ports): the relay's own would
    be forwarded by its tc eBPF lane, which runs before the drop rule; rtpengine's miss
    the lane's map (a lookup the relay's packets make too) and are dropped."""
    n = step["calls"]
    soft = ksoftirqd_pids()
    spec, eps = call_spec(theirs[:n])
    nft = ["ip", "netns", "exec", net.relay_ns, "nft"]
    subprocess.run([*nft, "-f", "-"], input=DROP_TABLE, text=True, check=True)
    try:
        drop = run_load_c(exe, spec, eps, [i ^ 1 for i in range(len(eps))], seconds, soft, mode)
    finally:
        subprocess.run([*nft, "delete", "table", "inet", "bench_drop"], check=True)
    drop["target"] = "ref-drop"
    show_step(drop)
    from tests.kernelnet import RELAY_IP

    sink = run_load_c(exe, [(fd, RELAY_IP, SINK_PORT + i) for i, (fd, _, _) in enumerate(spec)],
                      sink_socks[: len(spec)], list(range(len(spec))), seconds, soft, mode)
    sink["target"] = "ref-sink"
    show_step(sink)
    out = [drop, sink]
    for name, calls in (("kernel", ours), ("rtpengine", theirs)):
        if step["stopped"][name]:
            continue
        spec, eps = call_spec(calls[:n])
        res = run_load_c(exe, spec, eps, [i ^ 1 for i in range(len(eps))], seconds,
                         {"target": pids[name], **soft}, mode)
        res["target"] = name
        res.update(per_packet(res, drop, sink))
        show_step(res)
        out.append(res)
    return out


def main_kernel(args: argparse.Namespace, out: Path) -> None:
    """The relay's kernel backend against rtpengine, in network namespaces (root)."""
    global PEER
    from tests.kernelnet import PEER_IP, RELAY_IP, KernelNet

    PEER = PEER_IP
    loads = [int(x) for x in (args.loads or KERNEL_LOADS).split(",")]
    exe = build_rtpgen(out)
    net = KernelNet("bm-")
    procs = Procs()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results: dict = {"cmd": show([sys.executable, *sys.argv]), "steps": [],  # type: ignore[type-arg]
                     "uptime_before": uptime}
    relay = None
    try:
        net.up()
        relay = kernel_relay_proc(net, out, fast_path=not args.no_fast_path)
        results["kernel_fast_path"] = not args.no_fast_path
        with net.inside_peers():
            eng, port, eng_cmd = start_rtpengine(procs, out, RELAY_IP, net.relay_ns, ENGINE_PORTS)
            results["rtpengine_cmd"] = show(eng_cmd)
            phone, pbx = Phone(relay), PbxUa(relay)
            ng = Ng(port, RELAY_IP)
            ours: list = []  # type: ignore[type-arg]
            theirs: list = []  # type: ignore[type-arg]
            stopped: dict[str, str | None] = {"kernel": None, "rtpengine": None}
            sink_socks: list[socket.socket] = []
            mode = ["sendto"] if args.gen == "sendto" else []
            results["generator"] = args.gen
            for n in loads:
                if all(stopped.values()):
                    break
                if len(ours) < n:
                    ours += relay_calls(phone, pbx, n - len(ours))
                    warm_up([e for ab in ours for e in ab])
                    results.setdefault("handed_over", {})[n] = wait_handed_over(relay, 2 * n)
                if len(theirs) < n:
                    theirs += rtpengine_calls(ng, n - len(theirs))
                    warm_up([e for ab in theirs for e in ab])
                q = wait_quiet(max_wait=30, threshold_pct=30)
                step = {"calls": n, "stopped": stopped, "quiet": q, "uptime": subprocess.run(
                    ["uptime"], capture_output=True, text=True).stdout.strip()}
                sink_socks = sinks(sink_socks, 2 * n, net.relay_ns)
                runs = kernel_load(exe, net, step, ours, theirs, sink_socks, args.seconds,
                                   {"kernel": relay.proc.pid, "rtpengine": eng.pid}, mode)
                for res in runs:
                    res["quiet"], res["uptime"] = q, step["uptime"]
                    res["machine_busy_pct"] = round(100 * res["machine_cpu_s"] / res["wall_s"]
                                                    / (os.cpu_count() or 1), 1)
                    results["steps"].append(res)
                    name = res["target"]
                    if name not in stopped:
                        continue
                    if not res["gen_kept_up"]:
                        stopped[name] = f"generator could not keep up at {n} calls"
                    elif (res["loss_pct"] or 0) >= LOSS_LIMIT_PCT:
                        stopped[name] = f"loss {res['loss_pct']}% at {n} calls"
            results["stopped"] = stopped
            results["relay_metrics"] = {k: v for k, v in relay.metrics().items() if "media" in k}
    finally:
        procs.stop_all()
        if relay is not None:
            from tests.realpeers import stop_relay

            stop_relay(relay)
        net.down()
        results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"stopped: {results.get('stopped')}\nresults: {out / 'results.json'}")


# --------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loads", help=f"calls per step (default 50,100,200,400,600; --kernel: {KERNEL_LOADS})")
    ap.add_argument("--kernel", action="store_true",
                    help="the kernel media backend vs rtpengine, in network namespaces (root)")
    ap.add_argument("--no-fast-path", action="store_true",
                    help="--kernel: the relay's nftables table alone, without the tc eBPF lane")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--gen", choices=("sendmmsg", "sendto"), default="sendmmsg",
                    help="--kernel: how rtpgen sends (raw socket + sendmmsg, or one sendto per packet)")
    ap.add_argument("--profile", type=int, default=200, help="calls during the py-spy run (0: none)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument(
        "--relay-commit",
        help="benchmark the relay of this commit (git archive into the output dir), not the working tree",
    )
    args = ap.parse_args()
    out = args.out or BENCH / "out" / ("media-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    if args.kernel:  # unpinned: kernel forwarding runs in softirq on whichever CPU sent the packet
        pin(False)
        main_kernel(args, out)
        return
    placement = pin(not args.no_pin)
    loads = [int(x) for x in (args.loads or "50,100,200,400,600").split(",")]
    if args.relay_commit:  # as run_sip.py --relay-commit
        rev = subprocess.run(
            ["git", "rev-parse", "--short", args.relay_commit], capture_output=True, text=True, check=True
        ).stdout.strip()
        src = (out / f"src-{rev}").resolve()
        if not src.exists():
            src.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", rev], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        os.environ["BENCH_RELAY_SRC"] = str(src)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(src) + (os.pathsep + old if old else "")
    procs = Procs()
    results: dict = {"cmd": show([sys.executable, *sys.argv]), "placement": placement, "steps": []}  # type: ignore[type-arg]
    try:
        r = make_relay(out, log_level="warning")
        secret = r.add_pbx(SERIAL)  # before start: the relay reads its directory at start-up
        start_relay(procs, r, out)
        view = RelayView(r, secret, out / "relay.log")
        phone, pbx = Phone(view), PbxUa(view)  # type: ignore[arg-type]
        eng, _, eng_cmd = start_rtpengine(procs, out)
        results["rtpengine_cmd"] = show(eng_cmd)
        ng = Ng(_)
        ours: list = []  # type: ignore[type-arg]
        theirs: list = []  # type: ignore[type-arg]
        stopped = {"relay": None, "rtpengine": None}
        for n in loads:
            for name in ("relay", "rtpengine"):
                if stopped[name]:
                    continue
                calls = ours if name == "relay" else theirs
                t0 = time.monotonic()
                if len(calls) < n:
                    calls += (
                        relay_calls(phone, pbx, n - len(calls))
                        if name == "relay"
                        else rtpengine_calls(ng, n - len(calls))
                    )
                setup_s = time.monotonic() - t0
                q = wait_quiet(max_wait=15, threshold_pct=30)
                m0 = r.metrics() if name == "relay" else {}
                res = run_load(calls[:n], args.seconds, r.pid if name == "relay" else eng.pid, {})
                if name == "relay":
                    m1 = r.metrics()
                    res["relay_metrics_delta"] = {
                        k: m1[k] - m0.get(k, 0)
                        for k in m1
                        if k.startswith("pbx_relay_media") and m1[k] != m0.get(k, 0)
                    }
                res.update(target=name, setup_s=round(setup_s, 2), quiet=q)
                results["steps"].append(res)
                print(
                    f"{name:9s} calls={n:4d} sent={res['sent_pps']:6d}/s fwd={res['forwarded_pps']:6d}/s "
                    f"loss={res['loss_pct']}% worst={res['worst_stream_loss_pct']}% "
                    f"cpu={res['target_pct_core']}% per10k={res['target_pct_core_per_10k_pps']}% "
                    f"gen_ok={res['gen_kept_up']} lag={res['gen_max_lag_ms']}ms "
                    f"gen_cpu(s/r)={res['cpu'].get('sender', {}).get('pct_core')}/"
                    f"{res['cpu'].get('receiver', {}).get('pct_core')} "
                    f"cpu0/1 busy={res['machine']['cpu0']['busy_pct']}/{res['machine']['cpu1']['busy_pct']} "
                    f"softirq={res['machine']['cpu0']['softirq_pct']}/{res['machine']['cpu1']['softirq_pct']}",
                    flush=True,
                )
                if (res["loss_pct"] or 0) > 0.1:
                    stopped[name] = f"loss {res['loss_pct']}% at {n} calls"
                elif not res["gen_kept_up"]:
                    stopped[name] = f"generator could not keep up at {n} calls"
        results["stopped"] = stopped
        # idle: every call still set up, no packet; what the process costs by itself
        for name, pid in (("relay", r.pid), ("rtpengine", eng.pid)):
            m = CpuMeter({name: pid})
            time.sleep(5)
            results.setdefault("idle", {})[name] = {
                "calls": len(ours if name == "relay" else theirs),
                **m.stop()[name],
            }
        print("idle:", results["idle"], flush=True)
        if args.profile:
            n = args.profile
            if len(ours) < n:
                ours += relay_calls(phone, pbx, n - len(ours))
            wait_quiet(max_wait=15, threshold_pct=30)
            spy = pyspy(r.pid, int(args.seconds) - 2, out)
            res = run_load(ours[:n], args.seconds, r.pid, {})
            spy["proc"].wait(timeout=30)
            res["target"] = "relay+py-spy"
            results["steps"].append(res)
            results["pyspy"] = {"cmd": show(spy["cmd"]), **pyspy_summary(out / "pyspy.raw")}
            print(f"py-spy at {n} calls (loss {res['loss_pct']}%, cpu {res['target_pct_core']}%):")
            for f, pct in results["pyspy"]["self"][:15]:
                print(f"  self {pct:5.1f}%  {f}")
            for f, pct in results["pyspy"]["inclusive"][:15]:
                print(f"  incl {pct:5.1f}%  {f}")
        results["relay_log_tail"] = (out / "relay.log").read_text(errors="replace")[-3000:]
    finally:
        procs.stop_all()
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
