"""`pbx-relay run --workers N` with the embedded push service (relay/workers.py, relay/pushlink.py).

The real thing: a redis-server started by the test, one `pbx-relay run --workers 2` parent
with push.mode = "embedded" (the default) and APNs pointed at the local HTTP/2 fake
(tests/pushfakes.py). Both workers' push services serve the API on the one address of
push.toml's api.listen (SO_REUSEPORT): the kernel gives each new connection to one of
them, and the test keeps one connection open on each (which one answered, each worker's
counters say, read through the parent's push admin endpoint).
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from push.api import mint_token
from push.app import load_key
from tests.conftest import needs_sipp
from tests.pushfakes import FakeApns, running
from tests.realpeers import DOMAIN, ROOT, RelayProc, free_port, sipp, write_config
from tests.redisfixture import RedisServer, redis_server
from tests.test_cluster_nodes import SERIAL as PBX_SERIAL
from tests.test_cluster_nodes import readyz, redis_cli, wait_for
from tests.test_push_sipp import (
    RING_TIMEOUT,
    TOKEN,
    pbx_calls_sleeping_phone,
    phone_goes_to_sleep,
    woken_phone_answers,
)
from tests.test_workers import Parent, ready_, start_workers, stop_workers

__all__ = ["redis_server"]  # the fixture, by name

PUSH_TOKEN = "c0ffee" * 10 + "abcd"
SERIAL, USER = "0123456789", "alice"


@pytest.fixture
def apns() -> Iterator[FakeApns]:
    with running(FakeApns()) as fake:
        yield fake


def push_toml(tmp: Path, apns: FakeApns | None = None, extra: str = "") -> tuple[Path, int, int]:
    """push.toml of the embedded push service: its API and admin ports, APNs at the fake."""
    api, admin = free_port(), free_port()
    path = tmp / "push.toml"
    text = (f'[push]\nstate_dir = "{tmp / "push"}"\n{extra}\n'
            f'[api]\nlisten = "127.0.0.1:{api}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n')
    if apns is not None:
        p8 = apns.write_p8(tmp / "AuthKey.p8")
        text += (f'[apns]\nkey_file = "{p8}"\nkey_id = "{apns.key_id}"\nteam_id = "{apns.team_id}"\n'
                 f'base_url = "{apns.base_url}"\nca_file = "{apns.ca_file}"\n')
    path.write_text(text)
    return path, api, admin


def push_metrics(admin: int) -> dict[str, float]:
    """The parent's push admin endpoint: every worker's pbx_push_* series, labelled."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
    return out


def updates(admin: int) -> list[float]:
    m = push_metrics(admin)
    return [m.get(f'pbx_push_device_updates_total{{worker="{i}"}}', 0.0) for i in (0, 1)]


def call(conn: http.client.HTTPConnection, method: str, path: str, token: str,
         body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One request on ``conn`` (kept open: the same worker answers every request on it)."""
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, data, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null")


def device(username: str, apns: FakeApns) -> dict[str, Any]:
    return {"provider": "apns", "token": PUSH_TOKEN, "param": f"{apns.team_id}.com.example.app.voip",
            "serial": SERIAL, "username": username, "ip": "198.51.100.7", "port": 5060, "transport": "tls"}


def one_connection_per_worker(api: int, admin: int, relay: str, apns: FakeApns,
                              ) -> dict[int, http.client.HTTPConnection]:
    """A kept-open connection to the API on each worker: connections until both workers
    have one, each told apart by the worker whose device counter a probe registration
    (a device of its own) moved."""
    conns: dict[int, http.client.HTTPConnection] = {}
    for n in range(64):
        conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
        before = updates(admin)
        status, _ = call(conn, "PUT", "/v1/devices", relay, device(f"probe{n}", apns))
        assert status == 200
        after = updates(admin)
        (index,) = [i for i in (0, 1) if after[i] > before[i]]
        if index in conns:
            conn.close()
        else:
            conns[index] = conn
        if len(conns) == 2:
            return conns
    raise AssertionError("64 connections, all on one worker")


@pytest.fixture
def two_with_push(tmp_path: Path, redis_server: RedisServer, apns: FakeApns,
                  ) -> Iterator[tuple[Parent, int, int]]:
    conf, api, admin = push_toml(tmp_path, apns)
    parent = start_workers(tmp_path, redis_server, 2, push=f'config = "{conf}"')  # mode: the default
    try:
        yield parent, api, admin
    finally:
        assert stop_workers(parent) == 0


def test_two_workers_serve_one_push_api_over_one_store(
    two_with_push: tuple[Parent, int, int], redis_server: RedisServer, apns: FakeApns, tmp_path: Path,
) -> None:
    parent, api, admin = two_with_push
    wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
    assert readyz(parent.relay) == 200  # the relay's /readyz: each worker's push service answers
    out = "".join(parent.out)
    # One API address, the same in both workers' banners; the parent serves push admin.listen.
    assert f"push API http://127.0.0.1:{api}/v1 admin http://127.0.0.1:{admin}/metrics" in out
    for i in (0, 1):
        assert f"[w{i}]   push     API http://127.0.0.1:{api}/v1  admin http://127.0.0.1:" in out
    views = parent.views()
    ports = {int(v["push_admin"].rpartition(":")[2]) for v in views}
    assert len(ports) == 2 and admin not in ports  # each worker's own: loopback, the kernel's pick
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as r:
        assert r.read().strip() == b"ready"
    m = push_metrics(admin)
    assert m['pbx_push_worker_up{worker="0"}'] == 1 and m['pbx_push_worker_up{worker="1"}'] == 1

    # The key material, made once by the parent: one push.key and one api.secret for both,
    # and the store is Redis (the cluster's redis_url), not a SQLite file per worker.
    state = tmp_path / "push"
    assert sorted(p.name for p in state.iterdir()) == ["api.secret", "push.key"]
    assert (state / "push.key").stat().st_mode & 0o777 == 0o600
    secret = (state / "api.secret").read_bytes().strip()
    relay, operator = mint_token(secret, "relay", "relay"), mint_token(secret, "operator", "op")

    conns = one_connection_per_worker(api, admin, relay, apns)
    try:
        # Registered through worker 0...
        status, body = call(conns[0], "PUT", "/v1/devices", relay, device(USER, apns))
        assert status == 200, body
        device_id = body["device_id"]
        # ...known to worker 1, under the same id (derived with push.key: the same key)...
        status, body = call(conns[1], "GET", f"/v1/devices/{device_id}", operator)
        assert status == 200 and body["username"] == USER, body
        # ...which wakes it: it opens the token worker 0 sealed (the same key again).
        status, body = call(conns[1], "POST", "/v1/wake", relay, {"device_id": device_id, "call_id": "c1"})
        assert (status, body["outcome"]) == (200, "sent"), body
        (pushed,) = apns.wait_for(1)
        assert pushed.token == PUSH_TOKEN
        # The same call asked again through worker 0: the Redis store's claim, nothing sent.
        status, body = call(conns[0], "POST", "/v1/wake", relay, {"device_id": device_id, "call_id": "c1"})
        assert (status, body["outcome"], body.get("reason")) == (200, "sent", "duplicate"), body
        assert len(apns.requests) == 1
        # One push log row for the call, whichever worker is asked.
        for conn in conns.values():
            status, rows = call(conn, "GET", f"/v1/users/{SERIAL}/{USER}/log", operator)
            assert status == 200 and [(r["device_id"], r["outcome"]) for r in rows] == [(device_id, "sent")]
    finally:
        for conn in conns.values():
            conn.close()
    m = push_metrics(admin)
    assert m['pbx_push_pushes_total{outcome="sent",provider="apns",worker="1"}'] == 1
    assert m['pbx_push_pushes_total{outcome="duplicate",provider="apns",worker="0"}'] == 1
    assert m.get('pbx_push_pushes_total{outcome="sent",provider="apns",worker="0"}', 0) == 0
    # Devices and the push log are in Redis; no push token in clear there.
    assert redis_cli(redis_server, "EXISTS", f"pbxpush:dev:{device_id}") == "1"
    assert not (state / "push.sqlite").exists()
    for key in redis_cli(redis_server, "KEYS", "pbxpush:dev:*").split():
        assert PUSH_TOKEN not in redis_cli(redis_server, "GET", key)


def start_two_workers(tmp_path: Path, redis_server: RedisServer, push_conf: Path,
                      ) -> subprocess.CompletedProcess[str]:
    """`run --workers 2` with the embedded push service configured by ``push_conf``, for a
    start that is refused (what it printed, how it exited)."""
    r = RelayProc(tmp_path, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    cluster = (f'[cluster]\nredis_url = "redis://127.0.0.1:{redis_server.port}"\n'
               f'secret = "{"s" * 40}"\nlisten = "127.0.0.1:{free_port()}"\n')
    write_config(r, cluster, push=f'config = "{push_conf}"')
    return subprocess.run([sys.executable, "-m", "relay.cli", "--config", str(r.config_path), "run",
                           "--workers", "2"], capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_a_bad_push_toml_under_workers_is_one_line_and_exit_2(tmp_path: Path, redis_server: RedisServer,
                                                              ) -> None:
    conf, _, _ = push_toml(tmp_path, extra="log_retention_days = 30")
    out = start_two_workers(tmp_path, redis_server, conf)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"pbx-relay: {conf}: push.log_retention_days must be > 0 and <= 7 (got 30): push metadata is "
        "kept 7 days at most; the retention can only be shortened"]
    assert not (tmp_path / "push" / "push.key").exists()  # refused before anything was made


def test_a_push_api_on_port_0_cannot_be_shared_by_workers(tmp_path: Path, redis_server: RedisServer) -> None:
    conf = tmp_path / "push.toml"
    conf.write_text(f'[push]\nstate_dir = "{tmp_path / "push"}"\n[api]\nlisten = "127.0.0.1:0"\n')
    out = start_two_workers(tmp_path, redis_server, conf)
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [
        f"pbx-relay: {conf}: api.listen: port 0 cannot be shared by --workers: the workers serve the "
        "push API on one address; give it a port"])


def test_a_sqlite_push_store_left_behind_is_removed_when_run_becomes_workers(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """One process kept devices and the push log in push.sqlite; with Redis and workers they
    live in Redis, and nothing would purge the old file's rows after 7 days (DESIGN §3): the
    parent removes it (and its WAL) before any worker starts, saying so in one line. (A
    `pbx-push` told to use Redis with such a file refuses instead: tests/test_push_config.py.)"""
    state = tmp_path / "push"
    state.mkdir()
    for name in ("push.sqlite", "push.sqlite-wal"):
        (state / name).write_bytes(b"rows")
    conf = tmp_path / "push.toml"
    # A credentials file that is not there: the start stops (exit 2) after the removal.
    conf.write_text(f'[push]\nstate_dir = "{state}"\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
                    f'[fcm]\nservice_account = "{tmp_path / "missing.json"}"\n')
    out = start_two_workers(tmp_path, redis_server, conf)
    assert out.returncode == 2 and "fcm.service_account" in out.stderr
    assert not (state / "push.sqlite").exists() and not (state / "push.sqlite-wal").exists()
    assert f"event=push_sqlite_removed path={state / 'push.sqlite'}" in out.stderr


def tcp_worker_of_source(parent: Parent, port: int) -> int:
    """Which worker the kernel gives a TCP connection from 127.0.0.1:``port`` to the SIP
    port: the one whose count of lookups for a serial nobody holds goes up. The probe's
    connection ends with a reset (SO_LINGER 0), leaving no TIME_WAIT: SIPp can take the
    same source port next, and lands on the same worker (the same 4-tuple)."""
    before = [w.metric('pbx_relay_cluster_lookups_total{outcome="nowhere"}') for w in parent.workers]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.bind(("127.0.0.1", port))
        s.settimeout(5)
        s.connect(("127.0.0.1", parent.workers[0].tcp))
        probe = (f"OPTIONS sip:5555555555.{DOMAIN} SIP/2.0\r\n"
                 f"Via: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bK-t{time.monotonic_ns()};rport\r\n"
                 f"Max-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=t1\r\nTo: <sip:x@{DOMAIN}>\r\n"
                 f"Call-ID: t-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        s.sendall(probe.encode())
        got = b""
        while b"SIP/2.0 480" not in got:
            got += s.recv(65535)
    after = [w.metric('pbx_relay_cluster_lookups_total{outcome="nowhere"}') for w in parent.workers]
    (index,) = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
    return index


@needs_sipp
@pytest.mark.sipp
def test_a_call_held_on_a_worker_is_woken_through_that_workers_push_service(
    tmp_path: Path, redis_server: RedisServer, apns: FakeApns,
) -> None:
    """SIPp as the PBX (TCP, on whichever worker the kernel picks) and as the phone: it
    registers with push parameters through the PBX's worker and sleeps (its connection
    closes). The PBX calls: that worker holds the INVITE and pushes through its own push
    service (one push, one push log row, in Redis); the woken phone's new connection lands
    on either worker, and answers."""
    conf, _, admin = push_toml(tmp_path, apns)
    parent = start_workers(tmp_path, redis_server, 2,
                           push=f'config = "{conf}"\nring_timeout = {RING_TIMEOUT}')
    try:
        wait_for("both workers ready", lambda: all(ready_(w) for w in parent.workers))
        w0 = parent.workers[0]

        def run(name: str, xml: str, port: int, auth: bool = False):  # type: ignore[no-untyped-def]
            return sipp(tmp_path, name, xml, f"127.0.0.1:{w0.tcp}", transport="t1", local_port=port,
                        variables={"serial": PBX_SERIAL, "domain": DOMAIN},
                        auth=(PBX_SERIAL, w0.secrets[PBX_SERIAL]) if auth else None, timeout_s=30)

        pbx = run("pbx", pbx_calls_sleeping_phone(), free_port(), auth=True)
        wait_for("the PBX on a worker", lambda: any(w.registry() for w in parent.workers))
        holder = next(i for i, w in enumerate(parent.workers) if w.registry())
        for _ in range(64):  # a phone source port the kernel gives to the PBX's worker
            port = free_port()
            if tcp_worker_of_source(parent, port) == holder:
                break
        else:
            raise AssertionError("64 source ports, none on the PBX's worker")
        sleeper = run("phone1", phone_goes_to_sleep(apns), port)
        assert sleeper.wait() == 0, sleeper.errors()
        (push,) = apns.wait_for(1, timeout=10)
        assert push.status == 200 and push.token == TOKEN
        woken = run("phone2", woken_phone_answers(apns), free_port())
        codes = [woken.wait(40), pbx.wait(40)]
        assert codes == [0, 0], f"{woken.errors()}\n{pbx.errors()}"
        # The worker that held the call pushed, through its own push service; once.
        held = [w.metric('pbx_relay_push_holds_total{outcome="started"}') for w in parent.workers]
        assert held[holder] == 1 and held[1 - holder] == 0
        m = push_metrics(admin)
        sent = [m.get(f'pbx_push_pushes_total{{outcome="sent",provider="apns",worker="{i}"}}', 0)
                for i in (0, 1)]
        assert sent[holder] == 1 and sent[1 - holder] == 0
        assert len(apns.requests) == 1
        # One push log row (metadata only), in the shared store; the token nowhere in clear.
        assert len(redis_cli(redis_server, "KEYS", "pbxpush:log:*").split()) == 1
        for key in redis_cli(redis_server, "KEYS", "pbxpush:*").split():
            if redis_cli(redis_server, "TYPE", key) == "string":
                assert TOKEN not in redis_cli(redis_server, "GET", key)
    finally:
        assert stop_workers(parent) == 0


def _load_key(state: str) -> bytes:
    return load_key(Path(state))


def test_workers_starting_at_once_read_one_key(tmp_path: Path) -> None:
    """push.key appears whole or not at all: processes that make it at the same moment
    all end up with the winner's 32 bytes, never an empty or half-written file (the
    parent of --workers makes it before any worker starts; pbx-push processes started
    together by hand are covered too)."""
    for attempt in range(5):
        state = tmp_path / f"s{attempt}"
        with multiprocessing.get_context("fork").Pool(8) as pool:
            keys = pool.map(_load_key, [str(state)] * 16)
        assert len(set(keys)) == 1 and len(keys[0]) == 32
        assert (state / "push.key").read_bytes() == keys[0]
        assert [p.name for p in state.iterdir()] == ["push.key"]  # no temporary file left


def test_a_state_directory_without_hard_links_still_gets_one_key(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system where link(2) fails (vfat, some FUSE mounts: EPERM) push.key is
    made with O_EXCL instead: one key, mode 0600, read again by the next start."""
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    key = load_key(tmp_path)
    path = tmp_path / "push.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(tmp_path) == key and [p.name for p in tmp_path.iterdir()] == ["push.key"]
