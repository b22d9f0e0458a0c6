"""Issue 14: a new operator's first hour, as they would do it — the CLI as a subprocess from
another working directory, SIPp on its default settings, every failure one line with the
documented exit code (2 configuration, 1 anything else) and no traceback."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.pbx import directory as directory_mod
from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import free_port, sipp

ROOT = Path(__file__).resolve().parent.parent
SERIAL = "7777777777"
DOMAIN = "relay.test"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBX_RELAY_", "PBX_PUSH_"))}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def relay_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, env=env or _env())


def one_line(out: subprocess.CompletedProcess[str], code: int) -> str:
    """The documented failure: exit ``code``, one line on stderr, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("pbx-relay: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr


class Relay:
    """`pbx-relay run --config FILE` (options after the verb) started from ``cwd``."""

    def __init__(self, config: Path, cwd: Path):
        self.config = config
        self.proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "run", "--config", str(config)],
                                     cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.banner = ""
        for line in self.proc.stdout:
            self.banner += line
            if "Point a softphone" in line:
                break
        else:
            raise AssertionError(f"relay exited: {self.proc.communicate(timeout=10)[1]}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=15)
        return err


def _config(tmp_path: Path, extra: str = "") -> tuple[Path, dict[str, int]]:
    """A relay.toml on free loopback ports, default digest settings, push off."""
    ports = {"udp": free_port(), "tls": free_port(), "admin": free_port()}
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir(exist_ok=True)
    path = conf_dir / "relay.toml"
    path.write_text(f"""[relay]
domain = "{DOMAIN}"
state_dir = "state"
[sip]
udp = ["127.0.0.1:{ports['udp']}"]
tcp = ["127.0.0.1:{ports['udp']}"]
tls = ["127.0.0.1:{ports['tls']}"]
[media]
enabled = false
[admin]
listen = "127.0.0.1:{ports['admin']}"
[push]
mode = "off"
{extra}""")
    return path, ports


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Relay, dict[str, int]]]:
    path, ports = _config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relay = Relay(path, elsewhere)
    try:
        yield relay, ports
    finally:
        if relay.proc.poll() is None:
            relay.stop()


# ------------------------------------------------------------------ 1, 2, 3, 4: add a PBX, register at once


@needs_sipp
def test_a_pbx_added_while_the_relay_runs_registers_at_once_with_sipp_defaults(
    running: tuple[Relay, dict[str, int]], tmp_path: Path,
) -> None:
    relay, ports = running
    # State relative to the config file, whatever directory the relay was started from.
    assert (tmp_path / "etc" / "state" / "relay.key").exists()
    elsewhere = tmp_path / "another"
    elsewhere.mkdir()
    out = relay_cli("pbx", "add", SERIAL, "--config", str(relay.config), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # the running relay answered: same state directory, reloaded
    secret = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("secret"))
    assert not secret.startswith("-")
    assert not (elsewhere / "state").exists()  # nothing made in the working directory
    # At once — no waiting for the 2 s poll — SIPp on its defaults (MD5, the first challenge).
    run = sipp(tmp_path, "pbx", sc.scenario("PBX registers", sc.PBX_PHONE_HOME), f"127.0.0.1:{ports['udp']}",
               transport="t1", variables={"serial": SERIAL, "domain": DOMAIN}, auth=(SERIAL, secret))
    assert run.wait() == 0, run.errors()
    assert " 403 " not in run.messages() and "SIP/2.0 200 OK" in run.messages()


def test_pbx_add_from_another_directory_warns_when_the_running_relay_keeps_its_state_elsewhere(
    running: tuple[Relay, dict[str, int]], tmp_path: Path,
) -> None:
    relay, _ = running
    out = relay_cli("--config", str(relay.config), "pbx", "add", SERIAL, "--state-dir", "other",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warning: the relay at 127.0.0.1:" in out.stderr
    assert f"keeps its state in {tmp_path / 'etc' / 'state'}, not {tmp_path / 'other'}" in out.stderr


def test_state_follows_the_config_file_not_the_working_directory(tmp_path: Path) -> None:
    path, _ = _config(tmp_path)
    for cwd in (tmp_path, Path("/")):
        if cwd == tmp_path:
            assert relay_cli("pbx", "add", SERIAL, "-c", str(path), cwd=cwd).returncode == 0
        listed = relay_cli("--config", str(path), "pbx", "list", cwd=cwd)
        assert listed.stdout == f"{SERIAL}\t{DOMAIN}\n", listed.stderr
    assert (tmp_path / "etc" / "state" / "pbx.sqlite").exists()


def test_options_go_before_or_after_the_verb(tmp_path: Path) -> None:
    path, _ = _config(tmp_path)
    for args in (("--config", str(path), "config", "check"), ("config", "check", "--config", str(path)),
                 ("config", "--config", str(path), "check")):
        out = relay_cli(*args, cwd=tmp_path)
        assert (out.returncode, out.stdout) == (0, f"{path}: ok\n"), (args, out.stderr)
    out = relay_cli("pbx", "list", "--state-dir", "s", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "s" / "pbx.sqlite").exists()


# ------------------------------------------------------------------ 5: the banner's commands


def test_the_banner_prints_commands_that_work_from_the_checkout(tmp_path: Path) -> None:
    path, _ = _config(tmp_path)
    relay = Relay(path, ROOT)
    try:
        assert "  pbx-relay pbx add <serial>" in relay.banner  # installed: the command on PATH
    finally:
        relay.stop()
    # Through dev.sh the banner says ./dev.sh, and ./dev.sh passes the verb to pbx-relay.
    dev = subprocess.run(["./dev.sh", "pbx", "add", SERIAL, "--config", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env=_env())
    assert dev.returncode == 0, dev.stderr
    assert dev.stdout.startswith(f"serial   {SERIAL}\n")
    again = subprocess.run(["./dev.sh", "pbx", "list", "--config", str(path)], capture_output=True, text=True,
                           cwd=ROOT, timeout=600, env=_env())
    assert again.stdout == f"{SERIAL}\t{DOMAIN}\n" and again.stderr == ""  # no reinstall: nothing said
    from relay.cli import operator_command

    os.environ["PBX_RELAY_COMMAND"] = "./dev.sh"
    try:
        assert operator_command() == "./dev.sh"
    finally:
        del os.environ["PBX_RELAY_COMMAND"]


# ------------------------------------------------------------------ 6: one line, not a traceback


def test_a_read_only_state_directory_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere: a read-only bind is not available here, use a file in the way.
        state = tmp_path / "state"
        state.write_text("not a directory")
    else:
        state = tmp_path / "state"
        state.mkdir(mode=0o500)
    for verb in (("pbx", "add", SERIAL), ("pbx", "list")):
        err = one_line(relay_cli(*verb, "--state-dir", str(state), cwd=tmp_path), 1)
        assert "state" in err


def test_a_bad_push_toml_under_run_is_one_line_exit_2(tmp_path: Path) -> None:
    push = tmp_path / "push.toml"
    push.write_text("[push]\nlog_retention_days = 30\n")
    path, _ = _config(tmp_path)
    path.write_text(path.read_text().replace('mode = "off"', f'mode = "embedded"\nconfig = "{push}"'))
    err = one_line(relay_cli("run", "--config", str(path), cwd=tmp_path), 2)
    assert err.startswith(f"pbx-relay: {push}: push.log_retention_days must be > 0 and <= 7")


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: p.write_bytes(b"[relay]\ndomain = \"\xff\"\n"), "not UTF-8 text"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_unreadable_configs_are_one_line_exit_2_for_every_verb(
    tmp_path: Path, make: object, needle: str,
) -> None:
    path = tmp_path / "relay.toml"
    make(path)  # type: ignore[operator]
    for verb in (("pbx", "add", SERIAL), ("pbx", "list"), ("run",), ("config", "check")):
        err = one_line(relay_cli(*verb, "--config", str(path), cwd=tmp_path), 2)
        assert f"{path}: {needle}" in err


# ------------------------------------------------------------------ 7: which listener


@pytest.mark.parametrize("which", ["admin", "sip"])
def test_cannot_listen_names_the_listener_and_the_address(tmp_path: Path, which: str) -> None:
    path, ports = _config(tmp_path)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if which == "sip" else socket.SOCK_STREAM)
    with taken:
        taken.bind(("127.0.0.1", ports["udp" if which == "sip" else "admin"]))
        if which == "admin":
            taken.listen()
        err = one_line(relay_cli("run", "--config", str(path), cwd=tmp_path), 1)
    if which == "admin":
        address = f"127.0.0.1:{ports['admin']}"
        assert err == f"pbx-relay: cannot listen: admin on {address}: Address already in use\n"
    else:
        assert err.startswith("pbx-relay: cannot listen: SIP on ") and "Address already in use" in err


# ------------------------------------------------------------------ 8: the serial rule


@pytest.mark.parametrize("serial", ["-5", "x" * 64, "a" * 500, "ab_", "a.b"])
def test_a_bad_serial_gets_the_rule_and_never_a_long_echo(tmp_path: Path, serial: str) -> None:
    err = one_line(relay_cli("pbx", "add", serial, "--state-dir", str(tmp_path), cwd=tmp_path), 1)
    assert "1-63 characters: letters, digits, '-' and '_', starting and ending with a letter or digit" in err
    assert len(err) < 200
    if len(serial) > 63:
        assert f"({len(serial)} characters)" in err


def test_the_longest_serial_is_accepted(tmp_path: Path) -> None:
    assert relay_cli("pbx", "add", "a" * 63, "--state-dir", str(tmp_path), cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------ 9: files and secrets


def test_state_is_0700_and_its_files_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert relay_cli("pbx", "add", SERIAL, "--state-dir", str(state), cwd=tmp_path).returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for p in state.glob("pbx.sqlite*"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_secrets_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    made = iter(["-starts-with-a-dash", "-again", "fine-secret"])
    monkeypatch.setattr(directory_mod, "new_secret", lambda: next(made))
    assert directory_mod.command_line_secret() == "fine-secret"


# ------------------------------------------------------------------ 10: help and version


def test_help_describes_every_verb_and_argument(tmp_path: Path) -> None:
    top = relay_cli("--help", cwd=tmp_path).stdout
    for verb in ("run", "pbx", "config", "pbxs", "devices", "device", "log", "export", "erase"):
        assert re.search(rf"^    {verb}\s+\S", top, re.M), (verb, top)
    assert "exit codes: 0 done, 1 failed, 2 configuration or usage error" in top
    run = relay_cli("run", "--help", cwd=tmp_path).stdout
    assert "--config FILE" in run and "--state-dir DIR" in run and "SIGHUP reloads" in run
    pbx = relay_cli("pbx", "--help", cwd=tmp_path).stdout
    assert "add SERIAL (prints its secret once)" in pbx and "1-63 characters" in pbx
    for verb in ("log", "export", "erase"):
        text = relay_cli(verb, "--help", cwd=tmp_path).stdout
        assert "the user's PBX (its serial)" in text and "the user (extension) on that PBX" in text
    version = relay_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and re.fullmatch(r"pbx-relay \S+\n", version.stdout)
    push = subprocess.run([sys.executable, "-m", "push.cli", "log", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=30).stdout
    assert "the user's PBX (its serial)" in push and "--config FILE" in push


def test_dev_sh_says_what_it_installs_and_skips_pip_when_nothing_changed(tmp_path: Path) -> None:
    venv = ROOT / ".venv"
    stamp = venv / ".installed"
    if not (venv / "bin" / "python").exists():
        pytest.skip("needs the checkout's .venv (./dev.sh test makes it)")
    stamp.unlink(missing_ok=True)
    first = subprocess.run(["./dev.sh", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env=_env())
    assert first.returncode == 0, first.stderr
    assert "dev.sh: installing the Python packages" in first.stderr
    assert "dev.sh: Python packages installed" in first.stderr
    t0 = time.monotonic()
    second = subprocess.run(["./dev.sh", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=_env())
    print(f"./dev.sh --version with nothing to install: {time.monotonic() - t0:.2f} s")
    assert second.returncode == 0 and second.stderr == ""
    assert second.stdout.startswith("pbx-relay ")


def test_the_quick_start_scenarios_are_the_tested_ones() -> None:
    """README's "First call in five minutes" runs docs/quickstart/*.xml: the same scenarios
    tests/test_calls_sipp.py proves (a PBX that registers and answers, a phone that calls)."""
    assert (ROOT / "docs" / "quickstart" / "pbx.xml").read_text() == sc.pbx_answers_phone()
    assert (ROOT / "docs" / "quickstart" / "phone.xml").read_text() == sc.phone_calls_pbx()
    readme = (ROOT / "README.md").read_text()
    assert "./dev.sh pbx add 0123456789" in readme and "docs/quickstart/pbx.xml" in readme
