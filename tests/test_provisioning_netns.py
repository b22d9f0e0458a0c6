"""Provisioning end to end behind NAT: curl as the phone, `pbx-relay link` and a real web
server as the PBX's side, `pbx-relay run` as the relay, each in its own network namespace.

Topology (tests/netns/up.sh, namespaces private to this run)::

    phone 10.77.1.2 ── [nat1] 203.0.113.2   ──┐
                                              [pub]  relay 198.51.100.10:4433
    pbx   10.77.2.2 ── [nat2] 203.0.113.130 ──┘      (the link: opened from behind NAT2)
    (web server 127.0.0.1:8080 and `pbx-relay link` inside the pbx namespace)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.provisioning_harness import files, origin
from tests.provisioning_origin import BLOCK
from tests.realpeers import ROOT, RelayProc, start_relay, stop_relay, write_config
from tests.test_nat import NETNS_DIR, RELAY_IP, Topology

SERIAL = "0123456789"
PORT = 4433
BIG_MIB = 100


def _why_skip() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    missing = [t for t in ("ip", "nft", "curl") if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (iproute2, nftables, curl)" if missing else None


_SKIP = _why_skip()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

RELAY_PROVISIONING = f"""listen = ["{RELAY_IP}:{PORT}"]
link_keepalive = 1.0
link_keepalive_timeout = 2.0
response_timeout = 20.0"""


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    prefix = f"prv{os.getpid()}-"
    env = dict(os.environ, PRT_NS_PREFIX=prefix, NAT_MODE="masq")
    t = Topology(prefix, *(f"{prefix}{r}" for r in ("phone", "nat1", "pub", "nat2", "pbx")))
    try:
        up = subprocess.run([str(NETNS_DIR / "up.sh")], env=env, capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield t
    finally:
        subprocess.run([str(NETNS_DIR / "down.sh")], env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    directory = tmp_path_factory.mktemp("www")
    return directory, files(directory)


@pytest.fixture(scope="module")
def side(topo: Topology, www: tuple[Path, dict[str, bytes]],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProc, subprocess.Popen[bytes]]]:
    """The relay in the public namespace; the web server and the agent behind NAT2."""
    state = tmp_path_factory.mktemp("relay")
    r = RelayProc(state, RELAY_IP, 5060, 5060, 5061, 9090, netns=topo.pub)
    write_config(r, media="enabled = false", provisioning=RELAY_PROVISIONING)
    r.add_pbx(SERIAL)
    agent_log = open(state.parent / "agent.log", "wb")  # noqa: SIM115 - closed below
    agent = None
    try:
        start_relay(r, media="enabled = false", provisioning=RELAY_PROVISIONING)
        with origin(www[0], netns=topo.pbx) as o:
            agent = subprocess.Popen(
                ["ip", "netns", "exec", topo.pbx, sys.executable, "-m", "relay.cli", "link",
                 "--relay", f"{RELAY_IP}:{PORT}", "--serial", SERIAL, "--target", o.url,
                 "--ca", str(state / "tls" / "cert.pem"), "--keepalive", "1", "--keepalive-timeout", "2"],
                env=dict(os.environ, PYTHONPATH=str(ROOT), PBX_LINK_SECRET=r.secrets[SERIAL]),
                stdout=agent_log, stderr=agent_log, cwd=ROOT)
            _wait_metric(r, "pbx_relay_provisioning_links_open", 1)
            yield r, agent
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)  # by PID: `ip netns exec` execs the agent itself
            try:
                agent.wait(timeout=5)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        agent_log.close()
        stop_relay(r)


def _wait_metric(r: RelayProc, name: str, value: float, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.metric(name) == value:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never {value}: {r.metrics()}\n{r.log()[-3000:]}")


def _curl(topo: Topology, r: RelayProc, path: str, out: Path, timeout: float = 120) -> int:
    """curl (Debian) in the phone's namespace; the HTTP status, the body in ``out``."""
    p = subprocess.run(
        ["ip", "netns", "exec", topo.phone, "curl", "-sS", "--cacert", str(r.state_dir / "tls" / "cert.pem"),
         "-o", str(out), "-w", "%{http_code}", f"https://{RELAY_IP}:{PORT}/provisioning/{SERIAL}/{path}"],
        capture_output=True, text=True, timeout=timeout)
    return int(p.stdout or 0)


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of ``pid``, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_curl_behind_nat_fetches_files_byte_identical(
    topo: Topology, side: tuple[RelayProc, subprocess.Popen[bytes]], www: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    r, _ = side
    for name, data in www[1].items():
        assert _curl(topo, r, f"files/{name}", tmp_path / name) == 200, r.log()[-2000:]
        assert (tmp_path / name).read_bytes() == data, name
    assert _curl(topo, r, "files/no-such-file.cfg", tmp_path / "missing") == 404


def test_a_100_mb_file_streams_without_being_held_in_memory(
    topo: Topology, side: tuple[RelayProc, subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    r, _ = side
    assert r.proc is not None
    before = _peak_rss(r.proc.pid)
    out = tmp_path / "big.bin"
    # /big/ is made by the web server as it sends: the file exists on no disk
    assert _curl(topo, r, f"big/{BIG_MIB}", out, timeout=300) == 200
    after = _peak_rss(r.proc.pid)
    expected = hashlib.sha256()
    for _ in range(BIG_MIB * 16):
        expected.update(BLOCK)
    assert out.stat().st_size == BIG_MIB * 2**20
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected.hexdigest()
    print(f"relay peak RSS {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after "
          f"streaming {BIG_MIB} MiB")
    assert after - before < 32 * 2**20, (before, after)


def _nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True, timeout=10)


DROP_LINK = f"""table ip provdrop {{
  chain linkdrop {{
    type filter hook forward priority -10; policy accept;
    tcp dport {PORT} drop
    tcp sport {PORT} drop
  }}
}}
"""


def test_link_dropped_mid_request_gives_502_and_the_agent_reconnects(
    topo: Topology, side: tuple[RelayProc, subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    r, agent = side
    links_before = r.metric("pbx_relay_provisioning_links_total")
    slow = subprocess.Popen(
        ["ip", "netns", "exec", topo.phone, "curl", "-sS", "--cacert", str(r.state_dir / "tls" / "cert.pem"),
         "-o", str(tmp_path / "slow"), "-w", "%{http_code}",
         f"https://{RELAY_IP}:{PORT}/provisioning/{SERIAL}/slow/15"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the request is at the PBX's web server, which takes its time
    # The NAT in front of the PBX starts dropping the link's packets (a router reboot,
    # a lost binding): neither end is told; the keepalives find out.
    _nft(topo.nat2, DROP_LINK)
    try:
        out, _ = slow.communicate(timeout=12)  # well before the web server's 15 s
        assert out == "502", r.log()[-3000:]
        _wait_metric(r, "pbx_relay_provisioning_links_open", 0)
    finally:
        _nft(topo.nat2, "delete table ip provdrop\n")
    assert agent.poll() is None
    _wait_metric(r, "pbx_relay_provisioning_links_open", 1, timeout=60)  # the agent came back by itself
    assert r.metric("pbx_relay_provisioning_links_total") == links_before + 1
    assert _curl(topo, r, "files/y000000000044.cfg", tmp_path / "again") == 200


def test_access_log_holds_networks_only_and_nothing_of_any_file_is_on_the_relays_disk(
    topo: Topology, side: tuple[RelayProc, subprocess.Popen[bytes]], www: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    r, _ = side
    assert _curl(topo, r, "files/0004f2abcdef.xml?token=t0k3n", tmp_path / "x") == 200
    db = r.state_dir / "provisioning-access.sqlite"
    deadline = time.monotonic() + 10
    rows: list[tuple[str, str, int]] = []
    while time.monotonic() < deadline and not rows:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            rows = list(c.execute("SELECT serial, client, status FROM access"))
        time.sleep(0.1)
    assert rows and {client for _, client, _ in rows} == {"203.0.113.0/24"}  # the phone's NAT, as a /24
    assert db.stat().st_mode & 0o777 == 0o600
    on_disk = b"".join(p.read_bytes() for p in r.state_dir.rglob("*") if p.is_file())
    needles = (b"203.0.113.2", b"10.77.1.2", b"t0k3n", b"0004f2abcdef", b"account.1.user_name", BLOCK[:64])
    for needle in needles:
        assert needle not in on_disk, needle
    firmware = www[1]["firmware.rom"]
    for offset in range(0, len(firmware) - 64, len(firmware) // 50):
        assert firmware[offset:offset + 64] not in on_disk
