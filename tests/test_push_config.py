"""push.toml: the reference file, the code's defaults, bad files and environment overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from push import config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "config" / "push.toml"


def test_reference_file_matches_code_defaults() -> None:
    with open(REFERENCE, "rb") as f:
        doc = tomllib.load(f)
    code = config.PushConfig().as_dict()
    assert doc == code
    cfg = config.load(REFERENCE, environ={})
    beside = str(REFERENCE.parent / "state" / "push")  # relative paths: next to the file
    assert cfg.as_dict() == {**code, "push": {**code["push"], "state_dir": beside}}


def test_reference_file_documents_every_key_with_a_comment() -> None:
    lines = REFERENCE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            j = i - 1
            while j >= 0 and lines[j].startswith(("tls_cert =", "cert_file =")):
                j -= 1  # grouped keys share one comment block
            assert lines[j].startswith("#"), f"undocumented key: {line}"


def test_defaults_without_a_file() -> None:
    cfg = config.load(None, environ={})
    assert cfg.push.log_retention_days == 7.0
    assert str(cfg.api_listen) == "127.0.0.1:8443" and str(cfg.admin_listen) == "127.0.0.1:9091"
    assert (cfg.apns_mode, cfg.fcm_mode, cfg.api_tls) == ("log", "log", False)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[api]\nlisen = \"127.0.0.1:1\"\n", "unknown key api.lisen"),
        ("[nonsense]\n", "unknown section [nonsense]"),
        ("[push\n", "not valid TOML"),
        ("[push]\nlog_retention_days = 8\n", "push.log_retention_days must be > 0 and <= 7"),
        ("[push]\nlog_retention_days = 0\n", "push.log_retention_days"),
        ("[push]\ndevice_stale_days = -1.0\n", "push.device_stale_days must be > 0"),
        ("[push]\npurge_interval = \"often\"\n", "push.purge_interval must be a number"),
        ("[push]\nlog_level = \"loud\"\n", "push.log_level"),
        ("[api]\nlisten = \"localhost:8443\"\n", "api.listen"),
        ("[store]\nredis_url = \"127.0.0.1:6379\"\n", "store.redis_url is not redis://host:port"),
        ("[store]\nredis_url = \"redis://127.0.0.1\"\n", "store.redis_url needs a port"),
        ("[store]\nredis_url = \"redis://127.0.0.1:6379/2\"\n", "store.redis_url may name no database but 0"),
        ("[admin]\nlisten = \"127.0.0.1:99999\"\n", "admin.listen"),
        ("[api]\njwt_secret = \"short\"\n", "api.jwt_secret must be at least 32 bytes"),
        ("[api]\ntls_cert = \"/x.pem\"\n", "api.tls_cert and api.tls_key go together"),
        ("[api]\ntoken_ttl_max = 0\n", "api.token_ttl_max"),
        ("[api]\ntoken_ttl_max = 1.5\n", "api.token_ttl_max must be an integer"),
        ("[apns]\nkey_file = \"/k.p8\"\n", "apns.key_file, apns.key_id and apns.team_id go together"),
        ("[apns]\ncert_key_file = \"/k.pem\"\n", "apns.cert_key_file needs apns.cert_file"),
        ("[apns]\nkey_file = \"/k\"\nkey_id = \"K\"\nteam_id = \"T\"\ncert_file = \"/c\"\n", "not both"),
        ("[fcm]\nbase_url = \"fcm.googleapis.com\"\n", "fcm.base_url"),
    ],
)
def test_bad_file_gives_one_error_naming_the_key_and_file(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "push.toml"
    path.write_text(body)
    with pytest.raises(config.ConfigError) as e:
        config.load(path, environ={})
    assert needle in str(e.value)
    assert str(e.value).startswith(f"{path}: ")


def test_environment_overrides_the_file_converted_to_the_keys_type(tmp_path: Path) -> None:
    path = tmp_path / "push.toml"
    path.write_text("[push]\nlog_retention_days = 5.0\n[api]\ntoken_ttl_max = 60\n")
    secret = "s" * 40
    cfg = config.load(path, environ={
        "PBX_PUSH_API_JWT_SECRET": secret, "PBX_PUSH_PUSH_LOG_RETENTION_DAYS": "2.5",
        "PBX_PUSH_API_TOKEN_TTL_MAX": "600", "PBX_PUSH_APNS_KEY_FILE": "/k.p8",
        "PBX_PUSH_APNS_KEY_ID": "ABC123DEFG", "PBX_PUSH_APNS_TEAM_ID": "DEF123GHIJ",
        "PBX_PUSH_CONFIG": str(path), "HOME": "/root",
    })
    assert cfg.api.jwt_secret == secret
    assert cfg.push.log_retention_days == 2.5
    assert cfg.api.token_ttl_max == 600
    assert cfg.apns_mode == "token"
    # Command-line overrides win over both.
    cfg = config.load(path, {"push.state_dir": "/srv/push"}, environ={"PBX_PUSH_PUSH_STATE_DIR": "/tmp/x"})
    assert cfg.push.state_dir == "/srv/push"


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("PBX_PUSH_API_TOKEN_TTL_MAX", "a day",
         "$PBX_PUSH_API_TOKEN_TTL_MAX: api.token_ttl_max must be an integer"),
        ("PBX_PUSH_PUSH_PURGE_INTERVAL", "nan",
         "$PBX_PUSH_PUSH_PURGE_INTERVAL: push.purge_interval must be a finite"),
        ("PBX_PUSH_API_JWT_SECRE", "x" * 40, "$PBX_PUSH_API_JWT_SECRE: no such configuration key"),
        ("PBX_PUSH_PUSH_LOG_RETENTION_DAYS", "8", "(from $PBX_PUSH_PUSH_LOG_RETENTION_DAYS)"),
        ("PBX_PUSH_API_JWT_SECRET", "short", "(from $PBX_PUSH_API_JWT_SECRET)"),
    ],
)
def test_a_bad_environment_value_names_the_variable(var: str, value: str, needle: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(None, environ={var: value})
    assert needle in str(e.value)
    assert value not in str(e.value) or var != "PBX_PUSH_API_JWT_SECRET"  # a secret is never echoed


def test_check_files_names_a_missing_file(tmp_path: Path) -> None:
    cfg = config.load(None, environ={"PBX_PUSH_FCM_SERVICE_ACCOUNT": str(tmp_path / "sa.json")})
    with pytest.raises(config.ConfigError) as e:
        config.check_files(cfg)
    assert "fcm.service_account (from $PBX_PUSH_FCM_SERVICE_ACCOUNT)" in str(e.value)
    assert "no such file" in str(e.value)


def test_a_redis_store_refuses_to_leave_a_sqlite_store_behind(tmp_path: Path) -> None:
    """pbx-push told to keep its store in Redis while its state_dir holds the SQLite store
    of an earlier run: nothing would purge those rows after 7 days (DESIGN §3), so the
    configuration is refused, naming the file (``config check`` says the same)."""
    (tmp_path / "push.sqlite").write_bytes(b"rows")
    env = {"PBX_PUSH_PUSH_STATE_DIR": str(tmp_path), "PBX_PUSH_STORE_REDIS_URL": "redis://127.0.0.1:6379"}
    cfg = config.load(None, environ=env)
    with pytest.raises(config.ConfigError) as e:
        config.check_files(cfg)
    assert f"{tmp_path / 'push.sqlite'} holds a SQLite store that nothing purges" in str(e.value)
    (tmp_path / "push.sqlite").unlink()
    config.check_files(cfg)  # without it: fine
