"""The configuration reference, the code's defaults and bad files."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relay import config

ROOT = Path(__file__).resolve().parent.parent


def test_reference_file_matches_code_defaults() -> None:
    with open(ROOT / "config" / "relay.toml", "rb") as f:
        doc = tomllib.load(f)
    code = {s: {k: d for k, (_, d) in keys.items()} for s, keys in config.SCHEMA.items()}
    assert doc == code


def test_reference_file_documents_every_key_with_a_comment() -> None:
    lines = (ROOT / "config" / "relay.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            j = i - 1
            while j >= 0 and lines[j].startswith(("udp", "tcp", "tls", "pbx_expires", "port_m", "url =")):
                j -= 1  # grouped keys share one comment block
            assert lines[j].startswith("#"), f"undocumented key: {line}"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[sip]\nudpp = []\n", "unknown key sip.udpp"),
        ("[relay]\ndomain = 5\n", "relay.domain must be a str"),
        ("[sip]\nudp = [\"nowhere\"]\n", "sip.udp"),
        ("[sip]\ndigest_algorithms = [\"SHA-512\"]\n", "sip.digest_algorithms"),
        ("[sip]\npbx_expires_min = 4000\n", "sip.pbx_expires_*"),
        ("[nonsense]\n", "unknown section [nonsense]"),
        ("[relay\n", "not valid TOML"),
        ("[sip]\nflow_idle_timeout = -1\n", "sip.flow_idle_timeout"),
    ],
)
def test_bad_file_gives_one_error_naming_the_key_and_file(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(body)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)
    out = subprocess.run(
        [sys.executable, "-m", "relay.cli", "--config", str(path), "config", "check"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert out.returncode == 2
    assert needle in out.stderr
    assert out.stderr.count("\n") == 1  # one line, no traceback


def test_config_check_accepts_the_reference(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay.cli", "--config", str(ROOT / "config" / "relay.toml"),
         "config", "check"], capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_environment_overrides_a_key_and_names_the_variable_when_bad() -> None:
    cfg = config.load(None, environ={"PBX_RELAY_PUSH_RING_TIMEOUT": "12", "PBX_RELAY_PUSH_TOKEN": "s3cr3t",
                                     "PBX_RELAY_CONFIG": "/nowhere.toml"})
    assert cfg["push.ring_timeout"] == 12.0
    assert cfg["push.token"] == "s3cr3t"
    with pytest.raises(config.ConfigError, match=r"\$PBX_RELAY_PUSH_RING_TIMEOUT: push.ring_timeout must be"):
        config.load(None, environ={"PBX_RELAY_PUSH_RING_TIMEOUT": "soon"})
    with pytest.raises(config.ConfigError, match=r"\$PBX_RELAY_PUSH_TOKN: no such configuration key"):
        config.load(None, environ={"PBX_RELAY_PUSH_TOKN": "x"})


def test_remote_push_needs_url_and_token(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[push]\nmode = "remote"\n')
    with pytest.raises(config.ConfigError, match="push.url and push.token"):
        config.load(path, environ={})


@pytest.mark.parametrize(("url", "ok"), [
    ("https://push.example.net:8443", True), ("http://127.0.0.1:8443", True), ("http://[::1]:8443", True),
    ("http://push.example.net:8443", False), ("ftp://x", False), ("push.example.net", False),
])
def test_remote_push_url_must_not_carry_tokens_in_clear(url: str, ok: bool) -> None:
    env = {"PBX_RELAY_PUSH_MODE": "remote", "PBX_RELAY_PUSH_URL": url, "PBX_RELAY_PUSH_TOKEN": "t"}
    if ok:
        assert config.load(None, environ=env)["push.url"] == url
    else:
        with pytest.raises(config.ConfigError, match="push.url"):
            config.load(None, environ=env)
