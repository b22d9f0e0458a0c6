"""`pbx-relay run --workers N` (relay/workers.py, docs/cluster.md): N nodes behind the same SIP ports.

The real thing: a redis-server started by the test, one `pbx-relay run --workers 2` parent
and its two workers on 127.0.0.1 (ports picked free), SIPp as the PBX (TCP) and the phone
(UDP). The kernel (SO_REUSEPORT) picks the worker of each connection and each UDP source;
the test finds a phone source port that lands on the worker the PBX is not on.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from relay import config as config_mod
from relay.workers import (
    check_workers,
    default_workers,
    media_slice,
    parse_worker,
    worker_env,
    worker_overrides,
)
from tests import redisfixture
from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import DOMAIN, ROOT, RelayProc, free_port, sipp, write_config
from tests.redisfixture import RedisServer
from tests.sipclient import Pbx
from tests.test_cluster_nodes import SECRET, SERIAL, readyz, redis_cli, wait_for
from tests.test_systemd import SYSTEMD_ANALYZE, fake_root, needs_systemd_tools

redis_server = redisfixture.redis_server  # the fixture, by name


def ready_(w: RelayProc) -> bool:
    """/readyz says 200 (a worker being started again has no admin port yet: not ready)."""
    try:
        return readyz(w) == 200
    except urllib.error.URLError:
        return False


def free_run(count: int) -> int:
    """A port p with p .. p+count-1 all free (TCP): worker i takes p + i."""
    while True:
        base = free_port()
        try:
            for i in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue


# ------------------------------------------------------------ the pure parts


def load(tmp: Path, text: str) -> config_mod.RelayConfig:
    path = tmp / "relay.toml"
    path.write_text(f'[relay]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp}"\n{text}')
    return config_mod.load(path, environ={})


CLUSTER = f"""
[cluster]
redis_url = "redis://127.0.0.1:6379"
node_id = "edge"
listen = "127.0.0.1:5070"
advertise = "10.0.0.1:5070"
secret = "{SECRET}"
[push]
mode = "off"
"""


def test_each_worker_gets_its_node_id_ports_and_a_slice_of_the_rtp_range(tmp_path: Path) -> None:
    cfg = load(tmp_path, CLUSTER + '[admin]\nlisten = "127.0.0.1:9090"\n'
               "[media]\nport_min = 10000\nport_max = 20000\n")
    check_workers(cfg, 4)
    w = [worker_overrides(cfg, i, 4) for i in range(4)]
    assert w[0] == {"cluster.node_id": "edge-w0", "cluster.listen": "127.0.0.1:5070",
                    "cluster.advertise": "10.0.0.1:5070", "admin.listen": "127.0.0.1:0",
                    "media.port_min": 10000, "media.port_max": 12499}
    assert w[3] == {"cluster.node_id": "edge-w3", "cluster.listen": "127.0.0.1:5073",
                    "cluster.advertise": "10.0.0.1:5073", "admin.listen": "127.0.0.1:0",
                    "media.port_min": 17500, "media.port_max": 19999, "provisioning.enabled": False}
    slices = [media_slice(cfg, i, 4) for i in range(4)]
    assert all(a[1] < b[0] for a, b in zip(slices, slices[1:], strict=False))  # disjoint
    assert all(low % 2 == 0 and (high - low + 1) % 2 == 0 for low, high in slices)  # whole pairs
    # Each worker's configuration is a valid one.
    for i in range(4):
        config_mod.load(tmp_path / "relay.toml", w[i], environ={})
    assert parse_worker("3/4") == (3, 4)
    env = worker_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "7",
                      "RUNTIME_DIRECTORY": "/run/pbx-relay", "PATH": "/bin"}, 3)
    # systemd talks to the parent only; each worker counts its reloads in a directory of its own
    assert env == {"PATH": "/bin", "RUNTIME_DIRECTORY": "/run/pbx-relay/w3"}
    assert worker_env({"PATH": "/bin"}, 0) == {"PATH": "/bin"}
    # The parent is each worker's systemd: its own notify socket, and a watchdog.
    assert worker_env({"PATH": "/bin"}, 1, "/tmp/p/w1.sock", 30) == {
        "PATH": "/bin", "NOTIFY_SOCKET": "/tmp/p/w1.sock", "WATCHDOG_USEC": "30000000"}


@pytest.mark.parametrize(("text", "says"), [
    ("", "--workers 2 needs [cluster] redis_url"),  # the embedded push service too: no Redis, no workers
    (CLUSTER + "[media]\nport_min = 10000\nport_max = 10008\n", "workers need at least 12 ports"),
    # one nftables table and fence per network namespace: one process forwards media in the kernel
    (CLUSTER + '[media]\nbackend = "kernel"\n', "media.backend = 'kernel'"),
    (CLUSTER + '[media]\nbackend = "auto"\n', "media.backend = 'auto'"),
])
def test_what_workers_cannot_run_with_is_refused(tmp_path: Path, text: str, says: str) -> None:
    cfg = load(tmp_path, text)
    with pytest.raises(config_mod.ConfigError, match=says.replace("[", r"\[").replace(".", r"\.")):
        check_workers(cfg, 2)
    check_workers(cfg, 1)  # one process: no Redis needed, the default


def test_by_default_one_worker_per_core_when_redis_is_configured(tmp_path: Path) -> None:
    """The issue's default: `run` without --workers starts one worker per core with a shared
    store, one process without; the embedded push service (the default push.mode) too: its
    workers share that store (tests/test_workers_push.py)."""
    clustered = load(tmp_path, CLUSTER)
    assert default_workers(clustered, 4) == 4
    assert default_workers(clustered, 1) == 1
    assert default_workers(clustered, None) == 1
    # Media in the kernel: one process whatever the cores (its table is per namespace).
    assert default_workers(load(tmp_path, CLUSTER + '[media]\nbackend = "kernel"\n'), 4) == 1
    assert default_workers(clustered, 500) == 64  # MAX_WORKERS
    alone = load(tmp_path, '[push]\nmode = "off"\n')
    assert default_workers(alone, 8) == 1
    embedded = load(tmp_path, CLUSTER.replace('[push]\nmode = "off"', ""))
    assert embedded.push.mode == "embedded" and default_workers(embedded, 8) == 8
    check_workers(embedded, 8)
    embedded_alone = load(tmp_path, "")  # no Redis: one process, as before
    assert embedded_alone.push.mode == "embedded" and default_workers(embedded_alone, 8) == 1
    few_ports = load(tmp_path, CLUSTER + "[media]\nport_min = 30000\nport_max = 30011\n")
    assert default_workers(few_ports, 8) == 2  # each worker's slice holds 6 ports or more
    check_workers(few_ports, 2)


def test_workers_without_redis_url_exit_2_with_one_line(tmp_path: Path) -> None:
    r = RelayProc(tmp_path, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    write_config(r)
    out = subprocess.run([sys.executable, "-m", "relay.cli", "--config", str(r.config_path), "run",
                          "--workers", "2"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"pbx-relay: --workers 2 needs [cluster] redis_url in {r.config_path}: the workers are nodes "
        "sharing state in Redis/Valkey (docs/cluster.md; e.g. redis_url = \"redis://127.0.0.1:6379\" "
        "with Debian's redis-server)"]


# -------------------------------------------------------- real processes


@dataclass
class Parent:
    """`pbx-relay run --workers N` (``relay``: its admin port, admin.listen) and its workers,
    each reached as a RelayProc on the loopback admin port the parent says it has now."""

    proc: subprocess.Popen[bytes]
    relay: RelayProc
    count: int
    out: list[str] = field(default_factory=list)

    def views(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.relay.admin}/v1/workers", timeout=5) as r:
            return cast(list[dict[str, Any]], json.load(r))

    @property
    def workers(self) -> list[RelayProc]:
        """The workers as the parent knows them now (a worker being started: admin port 0)."""
        try:
            views = self.views()
        except (urllib.error.URLError, ConnectionError):
            views = [{"admin": None}] * self.count
        r = self.relay
        return [RelayProc(r.state_dir, r.host, r.udp, r.tcp, r.tls,
                          int(v["admin"].rpartition(":")[2]) if v["admin"] else 0,
                          secrets=r.secrets, log_path=r.log_path) for v in views]

    def children(self) -> list[int]:
        # Every thread's: trio starts a process from a worker thread.
        tasks = Path(f"/proc/{self.proc.pid}/task").glob("*/children")
        return sorted(int(pid) for t in tasks for pid in t.read_text().split())


def start_workers(tmp: Path, redis: RedisServer, count: int, extra: tuple[str, ...] = (),
                  push: str | None = None) -> Parent:
    parent = spawn_workers(tmp, redis, count, extra=extra, push=push)
    proc = parent.proc
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            raise AssertionError(f"the parent exited: {(tmp / 'relay.log').read_text()}")
        parent.out.append(line)
        if "workers serving" in line:
            break
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
    return parent


def spawn_workers(tmp: Path, redis: RedisServer, count: int, env: dict[str, str] | None = None,
                  extra: tuple[str, ...] = (), block_link_of: tuple[int, socket.socket] | None = None,
                  admin_port: int = 0, push: str | None = None) -> Parent:
    """The parent started, its workers not necessarily serving yet. ``push``: lines of
    relay.toml's [push] (None: push.mode = "off")."""
    r = RelayProc(tmp, "127.0.0.1", free_port(), free_port(), free_port(), admin_port or free_port(),
                  log_path=tmp / "relay.log")
    link = free_run(count or os.cpu_count() or 1)
    cluster = f"""
[cluster]
redis_url = "redis://127.0.0.1:{redis.port}"
node_id = "edge"
listen = "127.0.0.1:{link}"
secret = "{SECRET}"
heartbeat = 0.5
"""
    low = random.randrange(20000, 60000, 2)  # a range of our own, as tests/test_systemd.py picks one
    write_config(r, cluster, f"port_min = {low}\nport_max = {low + 399}", push)
    runtime = tmp / "run"  # as systemd's RuntimeDirectory=: the reload ledgers
    runtime.mkdir()
    r.add_pbx(SERIAL)
    if block_link_of is not None:  # someone else on worker i's cluster link port
        index, blocker = block_link_of
        blocker.bind(("127.0.0.1", link + index))
        blocker.listen(1)
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "--config", str(r.config_path), "run",
                             *(["--workers", str(count)] if count else []), *extra], stdout=subprocess.PIPE,
                            stderr=open(tmp / "relay.log", "wb"), cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), RUNTIME_DIRECTORY=str(runtime),
                                     **(env or {})))
    return Parent(proc, r, count)


def stop_workers(parent: Parent) -> int:
    if parent.proc.poll() is None:
        parent.proc.send_signal(signal.SIGTERM)
        try:
            return parent.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            parent.proc.kill()
    return parent.proc.wait()


@pytest.fixture
def two_workers(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Parent, RedisServer]]:
    parent = start_workers(tmp_path, redis_server, 2)
    try:
        yield parent, redis_server
    finally:
        children = parent.children() if parent.proc.poll() is None else []
        stop_workers(parent)
        for pid in children:  # all gone with the parent
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def worker_of_source(parent: Parent, port: int) -> int:
    """Which worker the kernel gives UDP from 127.0.0.1:``port``: the one whose count of
    lookups for a serial nobody holds goes up."""
    before = [w.metric('pbx_relay_cluster_lookups_total{outcome="nowhere"}') for w in parent.workers]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        s.settimeout(5)
        probe = (f"OPTIONS sip:5555555555.{DOMAIN} SIP/2.0\r\n"
                 f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-w{time.monotonic_ns()};rport\r\n"
                 f"Max-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=w1\r\nTo: <sip:x@{DOMAIN}>\r\n"
                 f"Call-ID: w-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        s.sendto(probe.encode(), ("127.0.0.1", parent.workers[0].udp))
        while not s.recv(65535).startswith(b"SIP/2.0 480"):
            pass
    after = [w.metric('pbx_relay_cluster_lookups_total{outcome="nowhere"}') for w in parent.workers]
    (index,) = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
    return index


@needs_sipp
@pytest.mark.sipp
def test_two_workers_a_phone_on_one_calls_the_pbx_on_the_other(
    two_workers: tuple[Parent, RedisServer], tmp_path: Path,
) -> None:
    parent, redis = two_workers
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    # Both workers are nodes of the cluster, under their own ids.
    wait_for("both heartbeats", lambda: redis_cli(redis, "EXISTS", "pbxrelay:node:edge-w0",
                                                  "pbxrelay:node:edge-w1") == "2")
    w0 = parent.workers[0]
    pbx = sipp(tmp_path, "pbx", sc.pbx_answers_phone(), f"127.0.0.1:{w0.tcp}", transport="t1",
               local_port=free_port(), variables={"serial": SERIAL, "domain": DOMAIN},
               auth=(SERIAL, w0.secrets[SERIAL]))
    wait_for("the PBX on a worker", lambda: any(w.registry() for w in parent.workers))
    holder = next(i for i, w in enumerate(parent.workers) if w.registry())
    assert redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == f"edge-w{holder}"
    other = 1 - holder

    # Phone source ports until one lands on the other worker (the hash is by 4-tuple).
    for _ in range(64):
        port = free_port()
        if worker_of_source(parent, port) == other:
            break
    else:
        raise AssertionError("64 source ports, all on one worker")
    phone = sipp(tmp_path, "phone", sc.phone_calls_pbx(), f"127.0.0.1:{w0.udp}", transport="u1",
                 local_port=port, variables={"serial": SERIAL, "domain": DOMAIN})
    rc_phone, rc_pbx = phone.wait(), pbx.wait()
    assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}"
    # Everything the phone sent went through the other worker and over a link.
    # Each worker has its own slice of the RTP range; the call's media was anchored once,
    # by the worker where the call entered (the phone's), in its slice.
    banners = "".join(parent.out)
    low = int(banners.split("[w0]   RTP      127.0.0.1 ports ")[1].split("-")[0])
    assert f"[w0]   RTP      127.0.0.1 ports {low}-{low + 199}" in banners
    assert f"[w1]   RTP      127.0.0.1 ports {low + 200}-{low + 399}" in banners
    ended = [w.metric("pbx_relay_media_sessions_ended_total") for w in parent.workers]
    assert ended[other] == 1 and ended[holder] == 0
    phone_worker = parent.workers[other]
    assert phone_worker.metric('pbx_relay_cluster_lookups_total{outcome="located"}') >= 4
    assert phone_worker.metric('pbx_relay_requests_in_total{method="INVITE"}') == 1
    assert parent.workers[holder].metric('pbx_relay_requests_in_total{method="INVITE"}') == 1


def test_one_admin_endpoint_answers_for_every_worker(two_workers: tuple[Parent, RedisServer]) -> None:
    """admin.listen is the parent's: /metrics carries each worker's series under its label,
    `pbx add` reaches every worker at once (a PBX registers on whichever worker its
    connection lands, the moment the command returns), /registry lists the PBXs of every
    worker, /readyz and /v1/workers say each worker's state. The workers' own admin ports
    are loopback ones the kernel picked, never admin.listen + i (9091 is pbx-push's)."""
    parent, _ = two_workers
    r = parent.relay
    wait_for("ready through the parent", lambda: readyz(r) == 200)
    views = parent.views()
    assert [v["index"] for v in views] == [0, 1] and all(v["serving"] for v in views)
    ports = {int(v["admin"].rpartition(":")[2]) for v in views}
    assert len(ports) == 2 and r.admin not in ports and r.admin + 1 not in ports
    m = r.metrics()
    assert m["pbx_relay_workers_serving"] == 2
    assert m['pbx_relay_worker_up{worker="0"}'] == 1 and m['pbx_relay_worker_up{worker="1"}'] == 1
    assert m['pbx_relay_pbx_registered{worker="0"}'] == 0 and m['pbx_relay_pbx_registered{worker="1"}'] == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{r.admin}/metrics", timeout=5).read().decode()
    assert text.count("# TYPE pbx_relay_pbx_registered gauge") == 1  # one family, two series

    # PBXs added while the workers run register at once, whichever worker they land on
    # (the kernel spreads the connections; more serials until both workers have one).
    pbxs: list[Pbx] = []
    try:
        for n in range(10):
            serial = f"777700{n}"
            r.add_pbx(serial)  # returns once every worker read the directory
            pbxs.append(Pbx(r, serial))  # REGISTER → 401 → 200 (asserted), no 403
            if len({row["worker"] for row in r.registry()}) == 2:
                break
        rows = r.registry()
        assert sorted(str(row["serial"]) for row in rows) == sorted(p.serial for p in pbxs)
        assert {row["worker"] for row in rows} == {0, 1}
        for i, w in enumerate(parent.workers):  # each worker's own view agrees with the parent's
            assert sorted(str(x["serial"]) for x in w.registry()) == sorted(
                str(row["serial"]) for row in rows if row["worker"] == i)
        m = r.metrics()
        assert sum(m[f'pbx_relay_pbx_registered{{worker="{i}"}}'] for i in (0, 1)) == len(pbxs)
    finally:
        for p in pbxs:
            p.stream.close()


def test_a_worker_killed_is_started_again(two_workers: tuple[Parent, RedisServer]) -> None:
    parent, redis = two_workers
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    before = parent.children()
    assert len(before) == 2
    os.kill(before[1], signal.SIGKILL)
    wait_for("a new worker", lambda: len(parent.children()) == 2 and parent.children() != before, timeout=15)
    wait_for("both workers ready again", lambda: all(ready_(w) for w in parent.workers), timeout=15)
    assert before[0] in parent.children()  # the other one was left alone
    assert redis_cli(redis, "EXISTS", "pbxrelay:node:edge-w0", "pbxrelay:node:edge-w1") == "2"
    log = (parent.workers[0].state_dir / "relay.log").read_text()
    assert re.search(r"relay\.workers event=worker_exited worker=[01] code=-9 restart_in=1\n", log)
    assert "relay.cluster[w1] event=cluster_node node=edge-w1" in log  # each worker's lines say which
    # systemctl reload (the unit's ExecReload) returns once every worker reloaded.
    runtime = parent.workers[0].state_dir / "run"
    out = subprocess.run([sys.executable, "-m", "pbxcore.reloadack", str(parent.proc.pid)],
                         env=dict(os.environ, RUNTIME_DIRECTORY=str(runtime)), capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for i in range(2):
        assert (runtime / f"w{i}" / "reloads").read_text().split()[1:] == ["1", "1"]
    # SIGTERM to the parent: forwarded, the workers drain (nothing in progress) and exit.
    children = parent.children()
    assert stop_workers(parent) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def test_the_systemd_drop_in_runs_the_parent_and_lets_it_stop_the_workers() -> None:
    """systemd/workers.conf: ExecStart replaced by `run --workers N`, SIGTERM to the parent only."""
    text = (ROOT / "systemd/workers.conf").read_text()
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    run = "/opt/pbx-relay/bin/pbx-relay --config /etc/pbx-relay/relay.toml run --workers 2"
    assert lines == ["[Unit]", "Wants=redis-server.service", "After=redis-server.service", "[Service]",
                     "ExecStart=", f"ExecStart={run}", "KillMode=mixed"]
    unit = (ROOT / "systemd/pbx-relay.service").read_text()
    assert "NotifyAccess=main" in unit  # the parent notifies; workers get no NOTIFY_SOCKET
    # redis_url alone makes `run` a parent of one worker per core: the base unit is ready too.
    assert "\nKillMode=mixed\n" in unit
    assert "ExecReload=/opt/pbx-relay/bin/python3 -I -m pbxcore.reloadack $MAINPID" in unit


def test_a_worker_that_hangs_is_killed_and_started_again(tmp_path: Path, redis_server: RedisServer) -> None:
    """SIGSTOP stands for a worker whose event loop is stuck: its watchdog pings to the
    parent stop, and after --worker-watchdog seconds the parent kills it and starts another.
    The worker left alone keeps pinging and is not touched."""
    parent = start_workers(tmp_path, redis_server, 2, ("--worker-watchdog", "2"))
    try:
        wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
        before = parent.children()
        os.kill(before[0], signal.SIGSTOP)
        wait_for("the hung worker replaced", lambda: before[0] not in parent.children()
                 and len(parent.children()) == 2, timeout=15)
        assert before[1] in parent.children()
        wait_for("both workers ready again", lambda: all(ready_(w) for w in parent.workers), timeout=15)
        log = (tmp_path / "relay.log").read_text()
        assert re.search(rf"event=worker_silent worker=[01] pid={before[0]} silent=[23] ", log), log[-2000:]
        assert log.count("event=worker_silent") == 1
    finally:
        assert stop_workers(parent) == 0


def test_a_worker_that_cannot_start_stops_the_parent(tmp_path: Path, redis_server: RedisServer) -> None:
    """Worker 1's cluster link port taken: no restart loop, the parent stops the other
    worker and exits 1, the worker's own line naming the listener and the port."""
    blocker = socket.socket()
    try:
        parent = spawn_workers(tmp_path, redis_server, 2, block_link_of=(1, blocker))
        assert parent.proc.wait(timeout=30) == 1
        log = (tmp_path / "relay.log").read_text()
        assert "pbx-relay: worker 1 exited with 1 before it served (its log is above)" in log
        port = blocker.getsockname()[1]
        assert (f"cannot listen: cluster link (cluster.listen) on 127.0.0.1:{port}: "
                "Address already in use") in log
        assert "event=worker_exited" not in log  # never started again
    finally:
        blocker.close()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the default is one process")
def test_run_without_workers_starts_one_per_core_with_redis(tmp_path: Path, redis_server: RedisServer,
                                                            ) -> None:
    cores = min(os.cpu_count() or 1, 64)
    parent = spawn_workers(tmp_path, redis_server, 0)
    parent.count = cores
    try:
        wait_for("every worker serving", lambda: ready_(parent.relay), timeout=60)
        assert [v["index"] for v in parent.views()] == list(range(cores))
    finally:
        assert stop_workers(parent) == 0


def test_the_admin_port_taken_stops_the_parent_before_any_worker(tmp_path: Path, redis_server: RedisServer,
                                                                  ) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        parent = spawn_workers(tmp_path, redis_server, 2, admin_port=port)
        assert parent.proc.wait(timeout=30) == 1
        log = (tmp_path / "relay.log").read_text()
        assert f"cannot listen: admin on 127.0.0.1:{port}: Address already in use" in log
        assert "event=worker_started" not in log


def test_sigterm_while_the_workers_start_stops_them_all(tmp_path: Path, redis_server: RedisServer) -> None:
    parent = spawn_workers(tmp_path, redis_server, 2)
    try:
        log = tmp_path / "relay.log"
        wait_for("both workers started", lambda: log.read_text().count("event=worker_started") == 2)
        children = parent.children()
        assert len(children) == 2
        parent.proc.send_signal(signal.SIGTERM)  # before they serve: a worker takes ~2 s to start
        assert parent.proc.wait(timeout=20) == 0
        assert "relay.workers event=stopping signal=SIGTERM while=starting" in log.read_text()
        assert all(not Path(f"/proc/{pid}").exists() for pid in children)
        assert parent.proc.stdout is not None
        assert b"workers serving" not in parent.proc.stdout.read()
    finally:
        stop_workers(parent)


def test_systemd_hears_ready_once_from_the_parent_when_every_worker_serves(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    """NOTIFY_SOCKET as systemd sets it for Type=notify: one READY=1, from the parent, after
    both workers serve; the workers, which systemd would refuse (NotifyAccess=main), send none."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        parent = spawn_workers(tmp_path, redis_server, 2, {"NOTIFY_SOCKET": path})
        try:
            got: list[str] = []
            while not any(m.startswith("READY=1") for m in got):
                got.append(sock.recv(4096).decode())
            sock.settimeout(1.5)
            try:
                while True:
                    got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
            ready = [m for m in got if "READY=1" in m.splitlines()]
            assert ready == ["READY=1\nSTATUS=2 of 2 workers serving, 0 restarts"], got
            assert all(ready_(w) for w in parent.workers)
        finally:
            stop_workers(parent)


@needs_systemd_tools
def test_the_systemd_drop_in_loads(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    dropin = root / "etc/systemd/system/pbx-relay.service.d"
    dropin.mkdir()
    shutil.copy(ROOT / "systemd/workers.conf", dropin / "workers.conf")
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", "pbx-relay.service"],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
