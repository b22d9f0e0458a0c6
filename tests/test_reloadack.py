"""ExecReload waits for the reload it asked for (pbxcore/reloadack.py), against a real supervised process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbxcore.reloadack import ReloadCount, ReloadLedger, ReloadNotConfirmed, read, signal_and_wait

ROOT = Path(__file__).resolve().parent.parent

# A service under pbxcore.lifecycle.supervise whose reload takes a while (like a relay
# reading a certificate and its PBX directory) and appends one line per reload it applied.
SERVICE = textwrap.dedent("""
    import sys, trio
    from pbxcore.lifecycle import SIGNALS, supervise
    from pbxcore.sdnotify import Notifier

    applied = sys.argv[1]

    async def main():
        async def reload():
            await trio.sleep(0.4)
            with open(applied, "a") as f:
                f.write("reloaded\\n")

        async def status():
            return "Serving"

        async def check():
            return None

        with trio.open_signal_receiver(*SIGNALS) as signals:
            print("up", flush=True)
            await supervise(signals, Notifier(None), status=status, check=check, reload=reload)

    trio.run(main)
""")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    run = tmp_path / "run"
    run.mkdir()
    applied = tmp_path / "applied"
    env = dict(os.environ, RUNTIME_DIRECTORY=str(run), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SERVICE, str(applied)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    path = run / "reloads"
    deadline = time.monotonic() + 10
    while read(path) is None:  # supervise publishes "<pid> 0 0" before READY=1
        assert time.monotonic() < deadline, "no reload count published"
        time.sleep(0.02)
    yield proc, path, applied
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_returns_once_the_reload_it_asked_for_was_applied(
    service: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    proc, path, applied = service
    assert read(path) == ReloadCount(proc.pid, 0, 0)
    count = signal_and_wait(proc.pid, path)
    assert lines(applied) == 1  # applied before it returned, 0.4 s after the signal
    assert count == ReloadCount(proc.pid, 1, 1)
    signal_and_wait(proc.pid, path)
    assert lines(applied) == 2


def test_a_reload_under_way_is_not_taken_for_ours(
    service: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    """A reload that started before the operator's change cannot have seen it: wait for
    the next one, which the service runs for the SIGHUP that arrived meanwhile."""
    proc, path, applied = service
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while (c := read(path)) is None or c.started != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert lines(applied) == 0  # reload 1 is under way
    count = signal_and_wait(proc.pid, path)
    assert (count.started, count.finished) == (2, 2)
    assert lines(applied) == 2


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that knows nothing of reloads (SIGHUP's default action ends it)."""
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_the_service_exiting_is_a_failed_reload_not_a_hang(
    tmp_path: Path, sleeper: subprocess.Popen[bytes],
) -> None:
    path = tmp_path / "reloads"
    path.write_text(f"{sleeper.pid} 0 0\n")
    with pytest.raises(ReloadNotConfirmed, match="exited before it confirmed"):
        # poll(): our own child stays a zombie until reaped (systemd reaps the real one).
        signal_and_wait(sleeper.pid, path, alive=lambda pid: sleeper.poll() is None)


def test_a_silent_service_times_out_and_an_older_process_count_is_ignored(
    tmp_path: Path, sleeper: subprocess.Popen[bytes],
) -> None:
    path = tmp_path / "reloads"
    # Written by the process before a restart: "3 3" finished says nothing about this one.
    path.write_text(f"{sleeper.pid + 1} 3 3\n")
    with pytest.raises(ReloadNotConfirmed, match="within 0.3 s"):
        signal_and_wait(sleeper.pid, path, timeout=0.3, send=lambda pid, sig: None)


def test_ledger_counts_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "reloads"
    ledger = ReloadLedger(path, pid=42)
    ledger.publish()
    assert path.read_text() == "42 0 0\n"
    ledger.started()
    assert read(path) == ReloadCount(42, 1, 0)
    ledger.finished()
    assert read(path) == ReloadCount(42, 1, 1)
    assert not (tmp_path / "reloads.tmp").exists()

    gone = ReloadLedger(tmp_path / "missing" / "reloads", pid=42)
    gone.started()
    gone.finished()  # warned once, no exception: a reload must not fail for this
    assert [r.message for r in caplog.records].count(
        f"event=reload_ack_unwritable path={gone.path} error=No such file or directory") == 1
    assert ReloadLedger.from_environ({}).path is None  # a terminal, not systemd: writes nothing
    assert ReloadLedger.from_environ({"RUNTIME_DIRECTORY": "/run/a:/run/b"}).path == Path("/run/a/reloads")


def test_execreload_command_line(tmp_path: Path) -> None:
    """``python3 -I -m pbxcore.reloadack $MAINPID``: exit codes and one line on stderr."""
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
        return subprocess.run([sys.executable, "-I", "-m", "pbxcore.reloadack", *args], capture_output=True,
                              text=True, timeout=30, env=dict(base, **(env or {})), cwd=ROOT)

    assert run().returncode == 2
    assert run("abc").returncode == 2
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = run(str(dead.pid), env={"RUNTIME_DIRECTORY": str(tmp_path)})
    assert (out.returncode, out.stderr) == (1, f"reload: no process {dead.pid}\n")
