"""relay.toml: the reference file against the code's defaults, typed sections, bad files and variables."""

from __future__ import annotations

import ast
import inspect
import math
import os
import re
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
    assert doc == config.RelayConfig().as_dict()
    # Read through the loader: the same values, state_dir made absolute next to the file.
    loaded = config.load(ROOT / "config" / "relay.toml", environ={})
    assert loaded.state_dir == ROOT / "config" / "state"
    assert loaded.sip == config.SipSection() and loaded.push == config.PushLinkSection()


@pytest.mark.parametrize("section", list(config.RelayConfig.sections().values()), ids=lambda c: c.__name__)
def test_every_key_has_a_docstring(section: type) -> None:
    """aioquic's QuicConfiguration style: a string right under each field says what it is."""
    body = ast.parse(inspect.getsource(section)).body[0]
    assert isinstance(body, ast.ClassDef)
    for i, node in enumerate(body.body):
        if isinstance(node, ast.AnnAssign):
            nxt = body.body[i + 1] if i + 1 < len(body.body) else None
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                f"{section.__name__}.{ast.unparse(node.target)} has no docstring")


def test_typed_sections_and_reading_by_dotted_key() -> None:
    cfg = config.load(None, {"sip.flow_idle_timeout": 120}, environ={})
    assert cfg.sip.flow_idle_timeout == 120.0 and isinstance(cfg.sip.flow_idle_timeout, float)
    assert cfg.sip.udp == ["127.0.0.1:5060"] and cfg.media.port_min == 10000
    assert cfg["sip.flow_idle_timeout"] == 120.0  # the same value, read by its dotted key
    cfg.relay.drain_timeout = 5.0
    assert cfg["relay.drain_timeout"] == 5.0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_for_every_float(tmp_path: Path, value: str) -> None:
    """`flow_idle_timeout = nan` passed every `<= 0` check and `config check` said ok."""
    floats = [(s, k) for s, keys in config.RelayConfig().as_dict().items() for k, v in keys.items()
              if isinstance(v, float)]
    assert ("sip", "flow_idle_timeout") in floats
    for section, key in floats:
        path = tmp_path / "relay.toml"
        path.write_text(f"[{section}]\n{key} = {value}\n")
        with pytest.raises(config.ConfigError, match=rf"{section}\.{key} must be a finite number"):
            config.load(path, environ={})
        var = f"PBX_RELAY_{section.upper()}_{key.upper()}"
        with pytest.raises(config.ConfigError, match=rf"\${var}: {section}\.{key} must be a finite number"):
            config.load(None, environ={var: value})
    assert not math.isnan(config.load(None, environ={}).sip.flow_idle_timeout)


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
        ("[relay]\ndomain = 5\n", "relay.domain must be a string"),
        ("[sip]\nudp = [5060]\n", "sip.udp must be a list of strings"),
        ("[media]\nport_min = 1.5\n", "media.port_min must be an integer"),
        ("[media]\nenabled = \"yes\"\n", "media.enabled must be true or false"),
        ("[sip]\nflow_idle_timeout = nan\n", "sip.flow_idle_timeout must be a finite number"),
        ("[relay]\nstate_dir = 7\n", "relay.state_dir must be a string"),
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
    assert cfg.push.ring_timeout == 12.0
    assert cfg.push.token == "s3cr3t"
    assert cfg.where("push.token") == "<defaults>: push.token (from $PBX_RELAY_PUSH_TOKEN)"
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
        assert config.load(None, environ=env).push.url == url
    else:
        with pytest.raises(config.ConfigError, match="push.url"):
            config.load(None, environ=env)


# ------------------------------------------------------------------ issue 14: files an operator gets wrong


def _check(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_")}
    return subprocess.run([sys.executable, "-m", "relay.cli", *args, "config", "check"], capture_output=True,
                          text=True, cwd=cwd, timeout=30, env=dict(env, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: p.write_bytes(b"[relay]\ndomain = \"caf\xe9.example\"\n"), "not UTF-8 text (byte 21)"),
    (lambda p: p.mkdir(), "is a directory; --config takes a TOML file"),
    (lambda p: None, "no such file"),
])
def test_a_file_that_cannot_be_read_is_one_line_exit_2(tmp_path: Path, make: object, needle: str) -> None:
    path = tmp_path / "relay.toml"
    make(path)  # type: ignore[operator]
    with pytest.raises(config.ConfigError, match=re.escape(needle)):
        config.load(path, environ={})
    out = _check(tmp_path.parent, "--config", str(path))
    assert out.returncode == 2, out
    assert out.stderr.startswith(f"pbx-relay: {path}: {needle}") and out.stderr.count("\n") == 1


def test_relative_paths_are_read_against_the_config_file_not_the_working_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "relay.toml").write_text('[relay]\nstate_dir = "var/state"\n[sip]\ntls_cert = "tls/c.pem"\n'
                                    'tls_key = "/abs/k.pem"\n')
    cfg = config.load(etc / "relay.toml", environ={})
    assert cfg.state_dir == etc / "var" / "state"
    assert (cfg.sip.tls_cert, cfg.sip.tls_key) == (str(etc / "tls" / "c.pem"), "/abs/k.pem")
    # A file that does not set it: the default ./state, next to the file as well.
    (etc / "other.toml").write_text("")
    assert config.load(etc / "other.toml", environ={}).state_dir == etc / "state"
    # No file: the checkout's ./state, whatever the working directory.
    assert config.load(None, environ={}).state_dir == ROOT / "state"
    # A flag or a variable is the operator's own path: relative to the working directory.
    assert config.load(None, {"relay.state_dir": "s"}, environ={}).state_dir == Path.cwd() / "s"
    assert config.load(None, environ={"PBX_RELAY_RELAY_STATE_DIR": "e"}).state_dir == Path.cwd() / "e"


SECRET32 = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('redis_url = "http://127.0.0.1:6379"\n', "cluster.redis_url is not redis://host:port"),
        ('redis_url = "redis://127.0.0.1"\n', "cluster.redis_url needs a port"),
        ('redis_url = "redis://127.0.0.1:6379/3"\n', "cluster.redis_url may name no database but 0"),
        ('redis_url = "redis://127.0.0.1:6379"\n', "cluster.secret must be at least 32 characters"),
        ('redis_url = "redis://127.0.0.1:6379"\nsecret = "short"\n', "cluster.secret"),
        ('node_id = "a b"\n', "cluster.node_id"),
        ('listen = "nowhere"\n', "cluster.listen"),
        ('advertise = "host"\n', "cluster.advertise"),
        ("timeout = 2.0\n", "cluster.timeout must be between"),
        ("heartbeat = 0\n", "cluster.heartbeat must be between"),
        ("max_links = 0\n", "cluster.max_links must be >= 1"),
        ("max_pending_lookups = 0\n", "cluster.max_pending_lookups must be >= 1"),
        ("lookup_cache_size = -1\n", "cluster.lookup_cache_size must be between 0 and 500000"),
        ("lookup_cache_ttl = 61\n", "cluster.lookup_cache_ttl must be between 0 and 60"),
        (f'redis_url = "redis://127.0.0.1:6379"\nsecret = "{SECRET32}"\nlisten = "0.0.0.0:5070"\n',
         "cluster.advertise is needed"),
    ],
)
def test_a_bad_cluster_key_is_one_error_naming_it(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[cluster]\n" + body)
    with pytest.raises(config.ConfigError) as e:
        config.load(path, environ={})
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_the_cluster_is_off_by_default_and_its_secret_comes_from_the_environment() -> None:
    cfg = config.load(None, environ={})
    assert cfg.cluster.redis_url == ""
    assert cfg.node_id  # the host name
    on = config.load(None, {"cluster.redis_url": "redis://127.0.0.1:6379", "cluster.node_id": "n1",
                            "cluster.advertise": "edge1.internal:5070"},
                     environ={"PBX_RELAY_CLUSTER_SECRET": SECRET32})
    assert (on.cluster.secret, on.node_id, on.cluster_listen.port) == (SECRET32, "n1", 5070)
