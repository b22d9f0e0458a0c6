"""Two `pbx-push run` processes sharing one Redis (a redis-server of the test): a device
registered through one is woken through the other, over HTTP/2 TLS to an APNs fake
(tests/pushfakes.py), and both say not ready while Redis does not answer.

Each worker has its own state directory holding a copy of the same push.key (as an
operator copies it to each machine) and the same API secret from the environment.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from push.api import mint_token
from tests.pushfakes import FakeApns, running
from tests.pushstores import redis_contents
from tests.redisfixture import RedisServer, redis_server

__all__ = ["redis_server"]  # fixture

ROOT = Path(__file__).resolve().parent.parent
SECRET = secrets.token_hex(24)
PUSH_TOKEN = "c0ffee" * 10 + "abcd"
SERIAL, USER = "0123456789", "alice"


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    api: str
    admin: str

    def ready(self) -> int:
        return httpx.get(f"{self.admin}/readyz", timeout=5).status_code

    def stop(self) -> str:
        """SIGTERM; what it wrote on stderr (asserted clean by the caller)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=15)
        return err


def _config(tmp: Path, name: str, apns: FakeApns, p8: Path, key: bytes) -> Path:
    state = tmp / name
    state.mkdir(mode=0o700)
    (state / "push.key").write_bytes(key)  # the same key in every worker
    (state / "push.key").chmod(0o600)
    conf = tmp / f"{name}.toml"
    conf.write_text(
        f'[push]\nstate_dir = "{state}"\n'
        '[api]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f'[apns]\nkey_file = "{p8}"\nkey_id = "{apns.key_id}"\nteam_id = "{apns.team_id}"\n'
        f'base_url = "{apns.base_url}"\nca_file = "{apns.ca_file}"\n')
    return conf


def _start(conf: Path, redis_url: str) -> Worker:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_PUSH_")}
    env.update(PYTHONPATH=str(ROOT), PBX_PUSH_API_JWT_SECRET=SECRET, PBX_PUSH_STORE_REDIS_URL=redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "push.cli", "-c", str(conf), "run"], cwd=conf.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 20
    for line in proc.stdout:
        parts = line.split()
        if parts and parts[0] in ("API", "admin", "store"):
            seen[parts[0]] = parts[1]
        if "store" in seen or time.monotonic() > deadline:
            break
    assert seen.keys() == {"API", "admin", "store"}, (seen, proc.poll())
    assert seen["store"] == redis_url  # no password in it to hide here
    return Worker(proc, seen["API"], seen["admin"])


def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def workers(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[FakeApns, Worker, Worker]]:
    url = f"redis://127.0.0.1:{redis_server.port}"
    key = secrets.token_bytes(32)
    with running(FakeApns()) as apns:
        p8 = apns.write_p8(tmp_path)
        a = _start(_config(tmp_path, "a", apns, p8, key), url)
        try:
            b = _start(_config(tmp_path, "b", apns, p8, key), url)
        except BaseException:
            a.stop()
            raise
        errors = []
        try:
            yield apns, a, b
        finally:
            for w in (a, b):
                err = w.stop()
                errors.append((w.proc.returncode, "Traceback" in err, PUSH_TOKEN in err))
        assert errors == [(0, False, False)] * 2


def test_a_device_registered_through_one_worker_is_woken_through_the_other(
    workers: tuple[FakeApns, Worker, Worker], redis_server: RedisServer,
) -> None:
    apns, a, b = workers
    auth = {"Authorization": f"Bearer {mint_token(SECRET, 'relay', 'relay')}"}
    topic = f"{apns.team_id}.com.example.app.voip"
    r = httpx.put(f"{a.api}/v1/devices", headers=auth, json={
        "provider": "apns", "token": PUSH_TOKEN, "param": topic, "serial": SERIAL, "username": USER,
        "ip": "198.51.100.7", "port": 5060, "transport": "tls"})
    assert r.status_code == 200, r.text
    device_id = r.json()["device_id"]

    r = httpx.post(f"{b.api}/v1/wake", headers=auth, json={"device_id": device_id, "call_id": "c1"})
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "sent"
    (pushed,) = apns.wait_for(1)
    assert (pushed.token, pushed.topic) == (PUSH_TOKEN, "com.example.app.voip")

    # The push log row written by b is what a shows.
    op = {"Authorization": f"Bearer {mint_token(SECRET, 'operator', 'op')}"}
    rows = httpx.get(f"{a.api}/v1/users/{SERIAL}/{USER}/log", headers=op).json()
    assert [(row["outcome"], row["device_id"]) for row in rows] == [("sent", device_id)]
    held = repr(_contents(redis_server))
    assert device_id in held and PUSH_TOKEN not in held

    # Redis gone: both workers say not ready, and the API says 503, not 500.
    assert (a.ready(), b.ready()) == (200, 200)
    redis_server.stop()
    assert (a.ready(), b.ready()) == (503, 503)
    r = httpx.post(f"{b.api}/v1/wake", headers=auth, json={"device_id": device_id, "call_id": "c2"})
    assert (r.status_code, r.json()) == (503, {"error": "store not answering"})
    redis_server.start()
    _eventually(lambda: (a.ready(), b.ready()) == (200, 200), "ready again once Redis is back")


def _contents(server: RedisServer) -> dict[str, object]:
    import trio

    return trio.run(redis_contents, f"redis://127.0.0.1:{server.port}")
