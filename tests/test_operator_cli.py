"""pbx-relay's operator verbs (relay/operator.py) against a real running relay with its
embedded push service: a PBX phoned home and phones registered with RFC 8599 push
parameters through the relay, then inspection, export (GDPR Art. 15/20) and erasure
(Art. 17) from the command line, proven on the output and on push.sqlite's bytes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from relay import config as relay_config
from relay.operator import TOKEN_ENV, OperatorError, push_api
from tests.realpeers import DOMAIN, RelayProc, free_port, stop_relay
from tests.sipclient import HOST, OTHER, SERIAL, Msg, Pbx, Stream, rand, request

ROOT = Path(__file__).resolve().parent.parent
PARAM = "TEAM123456.com.example.app.voip"
ALICE = ("201", "127.0.0.66", "a1" * 32)  # user, the phone's source address, its APNs token
BOB = ("202", "127.0.0.77", "b2" * 32)

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBX_RELAY_", "PBX_PUSH_"))}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def cli(
    config: Path | None, *args: str, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    conf = ["--config", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "relay.cli", *conf, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30, env=env or _env())


SEEN: list[str] = []  # every successful output, to look for push tokens in


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    SEEN.append(out.stdout)
    return out.stdout


def fails(out: subprocess.CompletedProcess[str], text: str) -> str:
    """Exit 1, one line on stderr naming the problem, no traceback."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert out.stderr.startswith("pbx-relay: ") and out.stderr.count("\n") == 1, out.stderr
    assert text in out.stderr, out.stderr
    return out.stderr


# ------------------------------------------------------------------ the relay and its peers


@pytest.fixture
def relay(relay_factory: Any, tmp_path: Path) -> RelayProc:
    push_dir = tmp_path / "push"
    push_dir.mkdir()
    api_port = free_port()
    (push_dir / "push.toml").write_text(
        f'[push]\nstate_dir = "{push_dir}"\n[api]\nlisten = "127.0.0.1:{api_port}"\n'
        f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n')
    r: RelayProc = relay_factory(serials=(SERIAL, OTHER),
                                 push=f'mode = "embedded"\nconfig = "{push_dir / "push.toml"}"')
    r.push_dir = push_dir  # type: ignore[attr-defined]
    r.push_api = f"http://127.0.0.1:{api_port}"  # type: ignore[attr-defined]
    return r


class Phone(Stream):
    """A phone on TCP from its own loopback address (so its IP can be looked for in files)."""

    def __init__(self, relay: RelayProc, source_ip: str):
        self.sock = socket.create_connection((HOST, relay.tcp), timeout=5, source_address=(source_ip, 0))
        self.buf = b""
        self.eof = False


def _ok_register(req: Msg) -> bytes:
    """The PBX as registrar: 200 with the binding and the relay's Path echoed."""
    lines = [
        "SIP/2.0 200 OK", *(f"Via: {v}" for v in req.get_all("via")), f"From: {req.get('from')}",
        f"To: {req.get('to')};tag=pbx{rand(4)}", f"Call-ID: {req.get('call-id')}", f"CSeq: {req.get('cseq')}",
        f"Contact: {req.get('contact')};expires=300", *(f"Path: {p}" for p in req.get_all("path")),
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def register_phone(relay: RelayProc, pbx: Pbx, user: str, source_ip: str, token: str) -> Phone:
    phone = Phone(relay, source_ip)
    ip, port = phone.local
    aor = f"<sip:{user}@{SERIAL}.{DOMAIN}>"
    contact = f"<sip:{user}@{ip}:{port};transport=tcp;pn-provider=apns;pn-prid={token};pn-param={PARAM}>"
    phone.send(request("REGISTER", f"sip:{SERIAL}.{DOMAIN}", transport="TCP", local=(ip, port), to=aor,
                       from_=aor, extra=[f"Contact: {contact}", "Supported: path", "Expires: 300"]))
    forwarded = pbx.stream.recv()
    assert forwarded is not None and forwarded.start.startswith("REGISTER "), "REGISTER not forwarded"
    pbx.stream.send(_ok_register(forwarded))
    answer = phone.recv()
    assert answer is not None and answer.status == 200, answer
    return phone


def _device_rows(relay: RelayProc) -> list[tuple[Any, ...]]:
    path = relay.push_dir / "push.sqlite"  # type: ignore[attr-defined]
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT username, ip FROM devices ORDER BY username").fetchall()


def _wait_devices(relay: RelayProc, n: int, timeout: float = 10.0) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while len(rows := _device_rows(relay)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def _file_bytes(relay: RelayProc) -> bytes:
    return b"".join(p.read_bytes() for p in relay.push_dir.glob("push.sqlite*"))  # type: ignore[attr-defined]


def _operator_token(relay: RelayProc, scope: str = "operator") -> str:
    from push.api import mint_token

    secret = (relay.push_dir / "api.secret").read_bytes().strip()  # type: ignore[attr-defined]
    return mint_token(secret, scope, "test", ttl=300)


def _wake(relay: RelayProc, device_id: str, callee: str) -> None:
    """A push for the device through the API (the log gateway: dry run), so the user has a log row."""
    r = httpx.post(f"{relay.push_api}/v1/wake",  # type: ignore[attr-defined]
                   headers={"Authorization": f"Bearer {_operator_token(relay)}"},
                   json={"device_id": device_id, "call_id": rand(), "caller": "100", "callee": callee,
                         "src": "127.0.0.1:5060"})
    assert r.status_code == 200 and r.json()["outcome"] == "dry_run", r.text


def _remote_config(relay: RelayProc, token: str) -> Path:
    """The same relay's config, pointing at its push API as a remote push service."""
    assert relay.config_path is not None
    head = relay.config_path.read_text().split("\n[push]\n")[0]
    path = relay.state_dir / "remote.toml"
    url = relay.push_api  # type: ignore[attr-defined]
    path.write_text(f'{head}\n[push]\nmode = "remote"\nurl = "{url}"\ntoken = "{token}"\n')
    return path


# ------------------------------------------------------------------ tests


def test_inspect_export_and_erase_through_the_running_relay(relay: RelayProc) -> None:
    conf = relay.config_path
    SEEN.clear()
    pbx = Pbx(relay)
    pbx_port = pbx.stream.local[1]

    # pbxs: the directory, and which PBX is online from where.
    lines = ok(cli(conf, "pbxs")).splitlines()
    assert lines[0].split() == ["serial", "state", "address", "expires_in", "created"]
    assert lines[1].split()[:3] == [SERIAL, "online", f"tcp:127.0.0.1:{pbx_port}"]
    assert lines[2].split()[:3] == [OTHER, "offline", "-"]
    assert lines[-1] == "2 in the directory, 1 online"
    online, offline = json.loads(ok(cli(conf, "pbxs", "--json")))
    assert (online["serial"], online["online"], online["transport"], online["ip"], online["port"]) == (
        SERIAL, True, "tcp", "127.0.0.1", pbx_port)
    assert online["realm"] == DOMAIN and 0 < online["expires_in"] <= 600
    assert (offline["serial"], offline["online"], offline["ip"]) == (OTHER, False, None)
    assert SERIAL in ok(cli(conf, "pbx", "list"))  # the offline directory listing is still there

    # Two users' phones register with push parameters through the relay; the PBX says 200.
    phones = [register_phone(relay, pbx, user, ip, token) for user, ip, token in (ALICE, BOB)]
    assert [row[:2] for row in _wait_devices(relay, 2)] == [(ALICE[0], ALICE[1]), (BOB[0], BOB[1])]
    secrets = (ALICE[2], BOB[2])

    table = ok(cli(conf, "devices"))
    assert table.splitlines()[0].split() == ["device_id", "provider", "serial", "username", "address",
                                             "updated_at"]
    devices = json.loads(ok(cli(conf, "devices", "--serial", SERIAL, "--json")))
    by_user = {d["username"]: d for d in devices}
    alice, bob = by_user[ALICE[0]], by_user[BOB[0]]
    assert (alice["ip"], alice["port"], alice["transport"], alice["param"]) == (
        ALICE[1], phones[0].local[1], "tcp", PARAM)
    for d in (alice, bob):
        assert f"{d['device_id']}  apns      {SERIAL}  {d['username']}" in table
    assert f"tcp:{ALICE[1]}:{phones[0].local[1]}" in table
    assert json.loads(ok(cli(conf, "devices", "--username", BOB[0], "--json"))) == [bob]
    shown = ok(cli(conf, "device", alice["device_id"]))
    assert f"username    {ALICE[0]}" in shown and f"param       {PARAM}" in shown
    assert json.loads(ok(cli(conf, "device", alice["device_id"], "--json"))) == alice

    _wake(relay, alice["device_id"], ALICE[0])
    _wake(relay, bob["device_id"], BOB[0])
    log = ok(cli(conf, "log", SERIAL, ALICE[0]))
    assert "dry_run" in log and f"{ALICE[1]}:{phones[0].local[1]}" in log and BOB[1] not in log
    (row,) = json.loads(ok(cli(conf, "log", SERIAL, ALICE[0], "--json")))
    assert (row["username"], row["caller"], row["outcome"]) == (ALICE[0], "100", "dry_run")

    show = ok(cli(conf, "pbx", "show", SERIAL))
    assert f"state       online from tcp:127.0.0.1:{pbx_port}" in show and "devices     2" in show
    info = json.loads(ok(cli(conf, "pbx", "show", SERIAL, "--json")))
    assert info["online"] and info["registration"]["port"] == pbx_port
    assert sorted(d["username"] for d in info["devices"]) == [ALICE[0], BOB[0]]
    fails(cli(conf, "pbx", "show", "5555555555"), "no PBX 5555555555 in the directory")

    # Art. 15/20: exactly Alice's data, and no push token.
    export = json.loads(out := ok(cli(conf, "export", SERIAL, ALICE[0])))
    assert (export["serial"], export["username"]) == (SERIAL, ALICE[0])
    assert export["devices"] == [alice]
    assert [(r["username"], r["device_id"]) for r in export["push_log"]] == [(ALICE[0], alice["device_id"])]
    assert BOB[1] not in out and bob["device_id"] not in out

    # Art. 17: erased, counted; Bob untouched; Alice's address gone from the file.
    assert ALICE[1].encode() in _file_bytes(relay)
    erased = ok(cli(conf, "erase", SERIAL, ALICE[0]))
    assert erased == f"erased {SERIAL}/{ALICE[0]}: 1 device(s), 1 push log row(s)\n"
    again = json.loads(ok(cli(conf, "export", SERIAL, ALICE[0])))
    assert (again["devices"], again["push_log"]) == ([], [])
    nothing = json.loads(ok(cli(conf, "erase", SERIAL, ALICE[0], "--json")))
    assert nothing == {"devices": 0, "push_log_rows": 0}
    assert json.loads(ok(cli(conf, "devices", "--json"))) == [bob]
    raw = _file_bytes(relay)
    assert ALICE[1].encode() not in raw  # not in the tables, the free pages or the WAL
    assert BOB[1].encode() in raw

    assert len(SEEN) > 15 and not any(s in text for s in secrets for text in SEEN)  # tokens never shown

    # The relay stopped: every verb fails with one line, exit 1.
    for phone in phones:
        phone.close()
    stop_relay(relay)
    fails(cli(conf, "pbxs"), "cannot reach the relay's admin endpoint at http://127.0.0.1:")
    fails(cli(conf, "pbx", "show", SERIAL), "is `pbx-relay run` up?")
    for args in (("devices",), ("device", bob["device_id"]), ("log", SERIAL, BOB[0]),
                 ("export", SERIAL, BOB[0]), ("erase", SERIAL, BOB[0])):
        fails(cli(conf, *args), "cannot reach the push service at http://127.0.0.1:")


def test_remote_push_needs_an_operator_token(relay: RelayProc) -> None:
    relay_token = _operator_token(relay, "relay")
    conf = _remote_config(relay, relay_token)
    fails(cli(conf, "devices"), f"give an operator token with --token or ${TOKEN_ENV}")
    err = fails(cli(conf, "devices", "--token", relay_token), "HTTP 403: a relay token may not do this")
    assert relay_token not in err
    fails(cli(conf, "export", SERIAL, "201", "--token", "not-a-jwt"), "HTTP 401: invalid token")
    assert json.loads(ok(cli(conf, "devices", "--json", "--token", _operator_token(relay)))) == []
    export = json.loads(ok(cli(conf, "export", SERIAL, "201", "--token", _operator_token(relay))))
    assert export["devices"] == [] and export["push_log"] == []


def test_remote_operator_token_from_the_environment(relay: RelayProc) -> None:
    assert TOKEN_ENV in relay_config.RelayConfig.ENV_NOT_KEYS  # else the loader calls it an unknown key
    conf = _remote_config(relay, _operator_token(relay, "relay"))
    out = cli(conf, "devices", "--json", env=_env(**{TOKEN_ENV: _operator_token(relay)}))
    assert json.loads(ok(out)) == []


def test_push_off_and_no_relay(tmp_path: Path) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text(f'[relay]\nstate_dir = "{tmp_path}"\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                    '[push]\nmode = "off"\n')
    for args in (("devices",), ("export", SERIAL, "201"), ("erase", SERIAL, "201")):
        fails(cli(conf, *args), 'push is off (push.mode = "off"')
    fails(cli(conf, "pbxs"), "(is `pbx-relay run` up?)")
    assert not (tmp_path / "pbx.sqlite").exists()  # inspecting creates nothing


def test_embedded_push_is_found_where_run_puts_it_and_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in [v for v in os.environ if v.startswith(("PBX_RELAY_", "PBX_PUSH_"))]:
        monkeypatch.delenv(var)
    cfg = relay_config.load(None, {"relay.state_dir": str(tmp_path)})
    with pytest.raises(OperatorError, match="the push service has not run yet"):
        push_api(cfg)
    assert list(tmp_path.iterdir()) == []  # no api.secret made by the operator's user

    from push import config as push_config
    from push.app import load_api_secret

    secret = load_api_secret(push_config.load(None, {"push.state_dir": str(tmp_path / "push")}))
    api = push_api(cfg)
    assert (api.url, api.remote) == ("http://127.0.0.1:8443", False)  # push defaults, state under the relay's
    claims = jwt.decode(api.token, secret, algorithms=["HS256"])
    assert claims["scope"] == "operator" and claims["exp"] - claims["iat"] <= 60
    assert push_api(cfg, "given").token == "given"
