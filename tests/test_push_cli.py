"""The pbx-push command as an operator uses it: config check, tokens, and the privacy
verbs against a running service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from tests.realpeers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_PUSH_")}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "push.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30, env=env or _env())


def test_config_check_accepts_the_reference_and_names_the_key_of_a_bad_file(tmp_path: Path) -> None:
    out = cli("--config", str(ROOT / "config" / "push.toml"), "config", "check")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{ROOT / 'config' / 'push.toml'}: ok\n"

    bad = tmp_path / "push.toml"
    bad.write_text("[push]\nlog_retention_days = 8.0\n")
    out = cli("-c", str(bad), "config", "check")
    assert out.returncode == 2
    assert out.stderr.startswith(f"pbx-push: {bad}: push.log_retention_days must be > 0 and <= 7")
    assert out.stderr.count("\n") == 1  # one line, no traceback

    out = cli("config", "check", env=_env(PBX_PUSH_CONFIG=str(bad)))  # the file from the environment
    assert out.returncode == 2 and "push.log_retention_days" in out.stderr

    out = cli("config", "check", env=_env(PBX_PUSH_API_TOKEN_TTL_MAX="soon"))
    assert out.returncode == 2
    assert "$PBX_PUSH_API_TOKEN_TTL_MAX: api.token_ttl_max must be an integer" in out.stderr


def test_token_is_signed_with_the_state_secret_and_bounded(tmp_path: Path) -> None:
    out = cli("--state-dir", str(tmp_path), "token", "--scope", "pbx", "--serial", "0123456789",
              "--ttl", "600")
    assert out.returncode == 0, out.stderr
    secret_file = tmp_path / "api.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    claims = jwt.decode(out.stdout.strip(), secret_file.read_bytes().strip(), algorithms=["HS256"])
    assert (claims["scope"], claims["serial"], claims["sub"]) == ("pbx", "0123456789", "pbx:0123456789")
    assert claims["exp"] - claims["iat"] == 600

    # A configured secret (here from the environment) signs instead.
    env_secret = "e" * 48
    out = cli("--state-dir", str(tmp_path), "token", "--scope", "relay",
              env=_env(PBX_PUSH_API_JWT_SECRET=env_secret))
    assert jwt.decode(out.stdout.strip(), env_secret, algorithms=["HS256"])["scope"] == "relay"

    out = cli("--state-dir", str(tmp_path), "token", "--scope", "operator", "--ttl", "86401")
    assert out.returncode == 1 and "api.token_ttl_max" in out.stderr
    out = cli("--state-dir", str(tmp_path), "token", "--scope", "pbx")
    assert out.returncode == 1 and "needs --serial" in out.stderr


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str], str]]:
    """``pbx-push run`` on free loopback ports: (its config, the process, the API's URL)."""
    api_port, admin_port = free_port(), free_port()
    conf = tmp_path / "push.toml"
    conf.write_text(f'[push]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[api]\nlisten = "127.0.0.1:{api_port}"\n[admin]\nlisten = "127.0.0.1:{admin_port}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "push.cli", "-c", str(conf), "run"], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    banner = []
    deadline = time.monotonic() + 15
    for line in proc.stdout:
        banner.append(line)
        if line.startswith("  state") or time.monotonic() > deadline:
            break
    try:
        text = "".join(banner)
        assert f"API     http://127.0.0.1:{api_port}" in text, text
        assert f"admin   http://127.0.0.1:{admin_port}" in text
        assert "APNs    dry-run" in text and "FCM     dry-run" in text
        yield conf, proc, f"http://127.0.0.1:{api_port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_operator_verbs_work_against_the_running_service(
    running: tuple[Path, subprocess.Popen[str], str],
) -> None:
    conf, proc, api = running
    relay_token = cli("-c", str(conf), "token", "--scope", "relay").stdout.strip()
    push_token = "ab" * 32
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {relay_token}"}) as c:
        r = c.put("/v1/devices", json={"provider": "apns", "token": push_token, "param": "T.com.ex.voip",
                                       "serial": "0123456789", "username": "alice", "ip": "198.51.100.7",
                                       "port": 5060, "transport": "tcp"})
        assert r.status_code == 200, r.text
        device_id = r.json()["device_id"]
        r = c.post("/v1/wake", json={"device_id": device_id, "call_id": "c1"})
        assert r.json()["outcome"] == "dry_run"

    out = cli("-c", str(conf), "devices")
    assert out.returncode == 0, out.stderr
    assert f"{device_id}\tapns\t0123456789\talice\ttcp:198.51.100.7:5060\t" in out.stdout
    assert push_token not in out.stdout
    out = cli("-c", str(conf), "device", device_id)
    assert json.loads(out.stdout)["username"] == "alice"
    out = cli("-c", str(conf), "log", "0123456789", "alice")
    assert [row["outcome"] for row in json.loads(out.stdout)] == ["dry_run"]

    out = cli("-c", str(conf), "export", "0123456789", "alice")
    assert out.returncode == 0, out.stderr
    export = json.loads(out.stdout)
    assert [d["device_id"] for d in export["devices"]] == [device_id]
    assert len(export["push_log"]) == 1
    assert push_token not in out.stdout

    out = cli("-c", str(conf), "erase", "0123456789", "alice")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "erased 0123456789/alice: 1 device(s), 1 push log row(s)\n"
    assert json.loads(cli("-c", str(conf), "devices", "--json").stdout) == []
    out = cli("-c", str(conf), "device", device_id)
    assert out.returncode == 1 and "HTTP 404: no such device" in out.stderr

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert push_token not in err and relay_token not in err

    out = cli("-c", str(conf), "devices")
    assert out.returncode == 1
    assert out.stderr.startswith("pbx-push: cannot reach the push service at http://127.0.0.1:")


def test_run_names_the_address_it_cannot_listen_on(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = tmp_path / "push.toml"
        conf.write_text(f'[push]\nstate_dir = "{tmp_path}"\n[api]\nlisten = "127.0.0.1:{port}"\n'
                        '[admin]\nlisten = "127.0.0.1:0"\n')
        out = cli("-c", str(conf), "run")
    assert out.returncode == 1
    assert out.stderr == f"pbx-push: cannot listen: push API on 127.0.0.1:{port}: Address already in use\n"
    assert "Traceback" not in out.stderr
