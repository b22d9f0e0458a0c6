"""Real processes for the tests: the relay as `pbx-relay run`, SIPp peers, a TLS pipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tests/test_compiled.py runs some tests again against the compiled build (setup.py)
# installed in this folder: the relays started here import its `relay` first (-P: not
# the checkout through the working directory).
COMPILED_SITE = os.environ.get("RELAY_TEST_COMPILED_SITE", "")
PYTHON = [sys.executable, "-P"] if COMPILED_SITE else [sys.executable]
PYTHONPATH = os.pathsep.join(p for p in (COMPILED_SITE, str(ROOT)) if p)
DOMAIN = "relay.test"


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP right now."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s2:
                s2.bind((host, port))
            return port
        except OSError:
            continue


@dataclass
class RelayProc:
    state_dir: Path
    host: str
    udp: int
    tcp: int
    tls: int
    admin: int
    proc: subprocess.Popen[bytes] | None = None
    secrets: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    netns: str | None = None
    log_path: Path | None = None
    log_level: str = "info"
    # Where the test's own peers (sockets, SIPp) sit: they reach the relay at ``host``
    # from this address (a network namespace of their own for the kernel media backend).
    peer_host: str = "127.0.0.1"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*PYTHON, "-m", "relay.cli", "--config", str(self.config_path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)

    def add_pbx(self, serial: str) -> str:
        out = self.cli("pbx", "add", serial)
        assert out.returncode == 0, out.stderr
        secret = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("secret"))
        self.secrets[serial] = secret
        return secret

    def http(self, path: str) -> str:
        if self.netns:
            out = subprocess.run(
                ["ip", "netns", "exec", self.netns, sys.executable, "-c",
                 f"import urllib.request;print(urllib.request.urlopen('http://{self.host}:{self.admin}{path}',"
                 "timeout=5).read().decode(),end='')"],
                capture_output=True, text=True, timeout=10, check=True,
            )
            return out.stdout
        with urllib.request.urlopen(f"http://{self.host}:{self.admin}{path}", timeout=5) as r:
            return str(r.read().decode())

    def registry(self) -> list[dict[str, object]]:
        return list(json.loads(self.http("/registry")))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.http("/metrics").splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def wait_registered(self, serial: str, timeout: float = 10) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.registry():
                if r["serial"] == serial:
                    return r
            time.sleep(0.05)
        raise AssertionError(f"PBX {serial} did not register")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


def write_config(r: RelayProc, extra: str = "", media: str = "", push: str | None = None,
                 provisioning: str = "") -> Path:
    """``extra``: lines for the [sip] table; ``media``: lines for the [media] table;
    ``push``: lines for the [push] table (None: no push service, mode = "off");
    ``provisioning``: lines for [provisioning] (empty: the port is off)."""
    path = r.state_dir / "relay.toml"
    path.write_text(f"""
[relay]
domain = "{DOMAIN}"
state_dir = "{r.state_dir}"
advertise = "{r.host}"
log_level = "{r.log_level}"

[sip]
udp = ["{r.host}:{r.udp}"]
tcp = ["{r.host}:{r.tcp}"]
tls = ["{r.host}:{r.tls}"]
# SIPp answers only the first challenge and only MD5 (shared/testing notes)
digest_algorithms = ["MD5", "SHA-256"]
{extra}

[media]
{media}

[admin]
listen = "{r.host}:{r.admin}"

[push]
{'mode = "off"' if push is None else push}

[provisioning]
# off unless a test asks: its default port (4433) is one for every relay on this host
{provisioning or "enabled = false"}
""")
    r.config_path = path
    return path


def start_relay(r: RelayProc, extra: str = "", media: str = "", push: str | None = None,
                provisioning: str = "") -> RelayProc:
    # provisioning only when asked: tests wrap write_config with the older signature
    write_config(r, extra, media, push, **({"provisioning": provisioning} if provisioning else {}))
    r.log_path = r.state_dir / "relay.log"
    # One process even with [cluster] redis_url (whose default is one worker per core):
    # each RelayProc is one node, reached on its own admin port.
    cmd = [*PYTHON, "-m", "relay.cli", "--config", str(r.config_path), "run", "--workers", "1"]
    if r.netns:
        cmd = ["ip", "netns", "exec", r.netns, *cmd]
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    r.proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=open(r.log_path, "wb"), cwd=ROOT, env=env,
    )
    deadline = time.monotonic() + 15
    assert r.proc.stdout is not None
    banner = b""
    while time.monotonic() < deadline:
        line = r.proc.stdout.readline()
        if not line:
            raise AssertionError(f"relay exited: {r.log()}")
        banner += line
        if b"Point a softphone" in line:
            break
    threading.Thread(target=r.proc.stdout.read, daemon=True).start()  # drain
    return r


def stop_relay(r: RelayProc) -> None:
    if r.proc is not None and r.proc.poll() is None:
        r.proc.send_signal(signal.SIGINT)
        try:
            r.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


# ---------------------------------------------------------------------- SIPp
SIPP = shutil.which("sipp")


@dataclass
class SippRun:
    proc: subprocess.Popen[bytes]
    workdir: Path
    name: str

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"SIPp {self.name} timed out\n{self.errors()}") from None

    def errors(self) -> str:
        out = []
        for p in sorted(self.workdir.glob(f"{self.name}*")):
            if p.suffix in (".log",) or p.name.endswith("_errors.log"):
                out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def messages(self) -> str:
        p = self.workdir / f"{self.name}_messages.log"
        return p.read_text(errors="replace") if p.exists() else ""


def sipp(
    workdir: Path, name: str, xml: str, remote: str, *, transport: str = "u1",
    local_ip: str = "127.0.0.1", local_port: int | None = None, variables: dict[str, str] | None = None,
    auth: tuple[str, str] | None = None, netns: str | None = None, extra: list[str] | None = None,
    timeout_s: int = 25,
) -> SippRun:
    assert SIPP, "sipp not installed (Debian sip-tester)"
    from tests.sipp_scenarios import CALL_ID_FORMAT

    sf = workdir / f"{name}.xml"
    sf.write_text(xml)
    cmd = [SIPP, remote, "-t", transport, "-i", local_ip, "-m", "1", "-l", "1", "-nostdin",
           "-cid_str", CALL_ID_FORMAT, "-timeout", f"{timeout_s}s", "-timeout_error",
           "-trace_msg", "-message_file", str(workdir / f"{name}_messages.log"),
           "-trace_err", "-error_file", str(workdir / f"{name}_errors.log"),
           "-max_recv_loops", "1000", "-deadcall_wait", "0"]
    if local_port:
        cmd += ["-p", str(local_port)]
    if auth:
        cmd += ["-au", auth[0], "-ap", auth[1]]
    cmd += ["-sf", str(sf)]
    for k, v in (variables or {}).items():
        cmd += ["-set", k, v]
    cmd += extra or []
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.log", "wb"),
                            cwd=workdir)
    return SippRun(proc, workdir, name)


# ------------------------------------------------------------------ TLS pipe
class TlsPipe:
    """Plain TCP on a local port ⇄ TLS to the relay: SIPp has no TLS (shared/testing)."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1"):
        self.target = target
        self.sock = socket.socket()
        self.sock.bind((listen_host, 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.tls_version: str | None = None
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self.sock.accept()
        except OSError:
            return
        upstream = self.ctx.wrap_socket(socket.create_connection(self.target))
        self.tls_version = upstream.version()
        self.upstream = upstream

        def pump(a: socket.socket, b: socket.socket) -> None:
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                self.closed.set()
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
