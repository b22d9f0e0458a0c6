"""The pbx-relay command as an operator uses it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_pbx_add_list_remove_secret_shown_once_stored_hashed(tmp_path: Path) -> None:
    out = cli("--state-dir", str(tmp_path), "pbx", "add", "0123456789")
    assert out.returncode == 0, out.stderr
    secret = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("secret"))
    assert len(secret) >= 20
    db = (tmp_path / "pbx.sqlite").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("pbx.sqlite-*"))
    assert secret.encode() not in db
    assert b"0123456789" in db
    listed = cli("--state-dir", str(tmp_path), "pbx", "list")
    assert "0123456789" in listed.stdout and secret not in listed.stdout
    again = cli("--state-dir", str(tmp_path), "pbx", "add", "0123456789")
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = cli("--state-dir", str(tmp_path), "pbx", "add", "../etc")
    assert bad.returncode == 1 and "invalid serial" in bad.stderr
    assert cli("--state-dir", str(tmp_path), "pbx", "remove", "0123456789").returncode == 0
    assert "0123456789" not in cli("--state-dir", str(tmp_path), "pbx", "list").stdout
    assert cli("--state-dir", str(tmp_path), "pbx", "remove", "0123456789").returncode == 1


def test_run_on_embedded_defaults_says_where_it_listens(tmp_path: Path) -> None:
    """The README's `pbx-relay run --state-dir DIR`: empty state dir, defaults, the banner.
    (How fast it starts is measured in bench/, not asserted here.)"""
    if not all(_port_free(p) for p in (5060, 5061, 9090, 8443, 9091, 4433)):
        pytest.skip("default ports 5060/5061/9090/8443/9091/4433 are busy on this machine")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PBX_RELAY_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "run", "--state-dir", "state"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Point a softphone" in line:
                break
        text = "".join(lines)
        assert "SIP UDP  127.0.0.1:5060" in text and "SIP TLS  127.0.0.1:5061" in text
        assert "pbx-relay pbx add" in text
        assert "HTTPS    https://127.0.0.1:4433/provisioning/<serial>/<path>" in text
        # relay and push service in one process (DESIGN §5)
        assert "push     API http://127.0.0.1:8443/v1  admin http://127.0.0.1:9091/metrics" in text
        # It made its state: key, directory, self-signed certificate.
        assert (tmp_path / "state" / "relay.key").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state" / "tls" / "cert.pem").exists()
        assert (tmp_path / "state" / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state" / "push" / "push.key").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state" / "push" / "push.sqlite").exists()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(
                b"OPTIONS sip:relay.localhost SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\n"
                b"From: <sip:a@b>;tag=1\r\nTo: <sip:relay.localhost>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n"
                b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n", ("127.0.0.1", 5060))
            data = s.recv(4096)
        assert data.startswith(b"SIP/2.0 200 OK\r\n")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err

