"""The push service's HTTP API against a real server on 127.0.0.1: auth, scopes, the
device registry, wake-ups, per-user export and erasure, bad input, admin endpoints."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from pbxcore.admin import AdminRequest
from pbxcore.metrics import parse as parse_metrics
from pbxcore.wire import DeviceUpdate, WakeRequest
from push.api import MAX_BODY, admin_routes, mint_token
from push.app import Running, build_service, serve
from push.config import load
from push.gateways.base import Gateway
from push.gateways.log import LogGateway
from push.model import Attempt, PushMessage, PushTarget
from relay.pushclient import HttpPush, InProcessPush, PushClient


@dataclass
class Api:
    running: Running
    state_dir: Path
    base: str
    admin: str
    secret: bytes
    said: list[str] = field(default_factory=list)  # tokens and JWTs that must never reach a log

    def token(self, scope: str = "operator", serial: str | None = None, **kw: Any) -> str:
        t = mint_token(self.secret, scope, f"test-{scope}", serial, **kw)
        self.said.append(t)
        return t

    def client(self, scope: str | None = "operator", serial: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token(scope, serial)}"} if scope else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=10)

    def push_token(self) -> str:
        t = secrets.token_hex(32)  # an APNs device token is 64 hex digits
        self.said.append(t)
        return t

    def db_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.state_dir.glob("push.sqlite*")))


async def start_api(tmp_path: Path, nursery: trio.Nursery, gateways: dict[str, Gateway]) -> Api:
    cfg = load(None, {"push.state_dir": str(tmp_path), "api.listen": "127.0.0.1:0",
                      "admin.listen": "127.0.0.1:0"}, environ={})
    running: Running = await nursery.start(serve, cfg, build_service(cfg, gateways=gateways))
    return Api(running, tmp_path, f"http://{running.addresses['api']}",
               f"http://{running.addresses['admin']}", running.secret)


@pytest.fixture
async def api(tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Api]:
    caplog.set_level(logging.DEBUG)
    a = await start_api(tmp_path, nursery, {"apns": LogGateway("apns"), "fcm": LogGateway("fcm")})
    yield a
    # Whatever a test did, no push token and no JWT may appear in any log line.
    assert "event=push_listening" in caplog.text  # the capture did see the service's logs
    for s in a.said:
        assert s not in caplog.text


def target_of(body: dict[str, Any]) -> dict[str, Any]:
    """What names a device: its push target, PBX serial and username."""
    return {k: body[k] for k in ("provider", "token", "param", "serial", "username")}


def device_body(token: str, serial: str = "0123456789", username: str = "alice", ip: str = "198.51.100.23",
                port: int = 5060, provider: str = "apns", transport: str = "tls") -> dict[str, Any]:
    param = "ABCDE12345.com.example.phone.voip" if provider == "apns" else "example-project"
    return {"provider": provider, "token": token, "param": param, "serial": serial, "username": username,
            "ip": ip, "port": port, "transport": transport}


async def register(c: httpx.AsyncClient, body: dict[str, Any]) -> str:
    r = await c.put("/v1/devices", json=body)
    assert r.status_code == 200, r.text
    device_id: str = r.json()["device_id"]
    return device_id


async def wake(c: httpx.AsyncClient, device_id: str, call_id: str = "call-1") -> dict[str, Any]:
    r = await c.post("/v1/wake", json={"device_id": device_id, "call_id": call_id, "caller": "+4930123",
                                       "callee": "201", "src": "192.0.2.10:5061", "ring_timeout": 30})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def assert_no_secret_in_logs(caplog: pytest.LogCaptureFixture, api: Api) -> None:
    assert api.said
    for s in api.said:
        assert s not in caplog.text


# ------------------------------------------------------------------ auth


async def test_requests_without_a_valid_token_get_401_and_wrong_scope_403(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.base, timeout=10) as c:
        r = await c.get("/v1/devices")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "missing bearer token" in r.json()["error"]

        other = mint_token(b"x" * 32, "operator", "mallory")
        api.said.append(other)
        r = await c.get("/v1/devices", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 401 and r.json()["error"] == "invalid token: bad signature"
        assert 'error="invalid_token"' in r.headers["www-authenticate"]

        expired = api.token("operator", now=time.time() - 7200, ttl=60)
        r = await c.get("/v1/devices", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and r.json()["error"] == "token expired"

        no_exp = jwt.encode({"scope": "operator", "sub": "x"}, api.secret, algorithm="HS256")
        api.said.append(no_exp)
        r = await c.get("/v1/devices", headers={"Authorization": f"Bearer {no_exp}"})
        assert r.status_code == 401 and "missing claim exp" in r.json()["error"]

        bad_scope = jwt.encode({"scope": "root", "sub": "x", "exp": time.time() + 60}, api.secret,
                               algorithm="HS256")
        api.said.append(bad_scope)
        r = await c.get("/v1/devices", headers={"Authorization": f"Bearer {bad_scope}"})
        assert r.status_code == 401 and "scope" in r.json()["error"]

        unsigned = jwt.encode({"scope": "operator", "sub": "x", "exp": time.time() + 60}, "",
                              algorithm="none")
        api.said.append(unsigned)
        r = await c.get("/v1/devices", headers={"Authorization": f"Bearer {unsigned}"})
        assert r.status_code == 401

        for header in ("Bearer not-a-jwt", "Basic dXNlcjpwYXNz", "Bearer"):
            r = await c.get("/v1/devices", headers={"Authorization": header})
            assert r.status_code == 401, header
            assert "error" in r.json()

    async with api.client("relay") as relay:
        r = await relay.get("/v1/devices")
        assert r.status_code == 403
        assert "relay token may not" in r.json()["error"]
        r = await relay.get("/v1/users/0123456789/alice/export")
        assert r.status_code == 403
        r = await relay.delete("/v1/users/0123456789/alice")
        assert r.status_code == 403
        # ...but it may register and wake.
        device_id = await register(relay, device_body(api.push_token()))
        assert (await wake(relay, device_id))["outcome"] == "dry_run"


async def test_a_pbx_token_reaches_only_its_own_serial(api: Api) -> None:
    async with api.client("operator") as op, api.client("pbx", "1111111111") as pbx:
        theirs = device_body(api.push_token(), serial="2222222222", username="bob")
        their_id = await register(op, theirs)

        r = await pbx.put("/v1/devices", json=device_body(api.push_token(), serial="2222222222"))
        assert r.status_code == 403
        mine_id = await register(pbx, device_body(api.push_token(), serial="1111111111", username="ann"))

        r = await pbx.get("/v1/devices")
        assert r.status_code == 200
        assert [d["device_id"] for d in r.json()] == [mine_id]
        assert (await pbx.get("/v1/devices", params={"serial": "2222222222"})).status_code == 403
        assert (await pbx.get(f"/v1/devices/{their_id}")).status_code == 403
        assert (await pbx.get(f"/v1/devices/{mine_id}")).json()["username"] == "ann"
        assert (await pbx.delete(f"/v1/devices/{their_id}")).status_code == 403
        r = await pbx.post("/v1/wake", json={"device_id": their_id, "call_id": "x"})
        assert r.status_code == 403
        r = await pbx.post("/v1/wake", json={"device_id": mine_id, "serial": "2222222222", "call_id": "x"})
        assert r.status_code == 403
        r = await pbx.post("/v1/wake", json={**target_of(theirs), "call_id": "x"})
        assert r.status_code == 403
        r = await pbx.post("/v1/devices/unregister", json=target_of(theirs))
        assert r.status_code == 403

        # Their push token registered under this PBX's serial is this PBX's own device:
        # it neither takes over nor reveals theirs.
        copy = {**theirs, "serial": "1111111111", "ip": "203.0.113.9"}
        copy_id = await register(pbx, copy)
        assert copy_id not in (their_id, mine_id)
        assert (await pbx.get(f"/v1/devices/{their_id}")).status_code == 403
        r = await pbx.post("/v1/wake", json={**target_of(copy), "call_id": "y"})
        assert r.json()["device_id"] == copy_id and r.json()["outcome"] == "dry_run"
        assert (await pbx.post("/v1/devices/unregister", json=target_of(copy))).json() == {"deleted": True}
        for verb, path in (("GET", "/log"), ("GET", "/export"), ("DELETE", "")):
            r = await pbx.request(verb, f"/v1/users/2222222222/bob{path}")
            assert r.status_code == 403, (verb, path)
        assert (await pbx.get("/v1/users/1111111111/ann/export")).status_code == 200
        assert (await wake(pbx, mine_id))["outcome"] == "dry_run"

        # Nothing of the other serial was touched.
        r = await op.get(f"/v1/devices/{their_id}")
        kept = r.json()
        assert (kept["serial"], kept["username"], kept["ip"]) == ("2222222222", "bob", theirs["ip"])
        assert (await op.get("/v1/users/2222222222/bob/log")).json() == []


# ------------------------------------------------------------------ the registry


async def test_an_address_change_replaces_the_row_and_leaves_no_trace_on_disk(api: Api) -> None:
    token = api.push_token()
    async with api.client("relay") as relay, api.client("operator") as op:
        first = await register(relay, device_body(token, ip="198.51.100.23", port=5060))
        second = await register(relay, device_body(token, ip="203.0.113.77", port=6000, transport="udp"))
        assert first == second
        devices = (await op.get("/v1/devices")).json()
        assert len(devices) == 1
        d = devices[0]
        assert (d["ip"], d["port"], d["transport"]) == ("203.0.113.77", 6000, "udp")
        assert "token" not in d
        assert (await op.get(f"/v1/devices/{first}")).json() == d

        disk = api.db_bytes()
        assert b"203.0.113.77" in disk  # we are reading the right files
        assert b"198.51.100.23" not in disk  # DESIGN §3: older addresses are not kept
        assert token.encode() not in disk  # tokens are encrypted at rest
        assert bytes.fromhex(token) not in disk


async def test_unregister_and_delete_remove_the_device(api: Api) -> None:
    async with api.client("relay") as relay, api.client("operator") as op:
        body = device_body(api.push_token())
        device_id = await register(relay, body)
        target = target_of(body)
        for missing in ("serial", "username"):
            partial = {k: v for k, v in target.items() if k != missing}
            r = await relay.post("/v1/devices/unregister", json=partial)
            assert r.status_code == 400 and r.json()["error"] == f"{missing} is required"
        r = await relay.post("/v1/devices/unregister", json={**target, "username": "bob"})
        assert r.json() == {"deleted": False}  # another user's registration of the same phone
        r = await relay.post("/v1/devices/unregister", json=target)
        assert r.json() == {"deleted": True}
        assert (await op.get(f"/v1/devices/{device_id}")).status_code == 404
        r = await relay.post("/v1/devices/unregister", json=target)
        assert r.json() == {"deleted": False}

        device_id = await register(relay, body)
        assert (await op.delete(f"/v1/devices/{device_id}")).json() == {"deleted": True}
        r = await op.delete(f"/v1/devices/{device_id}")
        assert r.status_code == 404 and r.json() == {"error": "no such device"}
        assert (await op.get("/v1/devices")).json() == []


# ------------------------------------------------------------------ wake, log, metrics


async def test_wake_is_a_dry_run_logged_in_the_push_log_and_counted(api: Api) -> None:
    async with api.client("relay") as relay, api.client("operator") as op:
        body = device_body(api.push_token(), provider="fcm", username="carol")
        device_id = await register(relay, body)
        result = await wake(relay, device_id)
        assert result["outcome"] == "dry_run"
        assert result["attempts"] == 1 and result["device_id"] == device_id
        # By target instead of id: the same device.
        r = await relay.post("/v1/wake", json={**target_of(body), "call_id": "call-2"})
        assert r.json()["outcome"] == "dry_run" and r.json()["device_id"] == device_id
        # The same target for another user (or PBX) is another device: none registered.
        r = await relay.post("/v1/wake", json={**target_of(body), "username": "dave", "call_id": "call-2"})
        assert r.json()["outcome"] == "unknown_device" and r.json()["device_id"] != device_id
        # Unknown device: answered, logged, nothing sent.
        r = await relay.post("/v1/wake", json={"device_id": "f" * 32, "call_id": "call-3"})
        assert r.status_code == 200 and r.json()["outcome"] == "unknown_device"

        rows = (await op.get("/v1/users/0123456789/carol/log")).json()
        assert [r["outcome"] for r in rows] == ["dry_run", "dry_run"]
        row = rows[0]
        assert row["caller"] == "+4930123" and row["callee"] == "201"
        assert row["src"] == "192.0.2.10:5061" and row["dst"] == "198.51.100.23:5060"
        assert row["device_id"] == device_id and row["provider"] == "fcm"
        assert body["token"] not in str(rows)

    async with httpx.AsyncClient(base_url=api.admin, timeout=10) as admin:
        m = await admin.get("/metrics")
        assert m.status_code == 200
        assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "# HELP pbx_push_pushes_total " in m.text and "# TYPE pbx_push_pushes_total counter" in m.text
        values = parse_metrics(m.text)
        assert values['pbx_push_pushes_total{outcome="dry_run",provider="fcm"}'] == 2
        assert values["pbx_push_devices"] == 1
        assert (await admin.get("/healthz")).text == "ok\n"
        assert (await admin.get("/readyz")).status_code == 200


async def test_readyz_is_503_when_the_store_does_not_answer() -> None:
    class DeadStore:
        async def counts(self) -> dict[str, int]:
            raise OSError("disk gone")

    class Service:
        store = DeadStore()

    routes = admin_routes(Service())  # type: ignore[arg-type]
    assert (await routes[("GET", "/readyz")](AdminRequest("GET", "/readyz"))).status == 503
    assert (await routes[("GET", "/healthz")](AdminRequest("GET", "/healthz"))).status == 200


# ------------------------------------------------------------------ privacy verbs


async def _two_serials(api: Api, relay: httpx.AsyncClient) -> dict[str, str]:
    """alice on two PBXs and bob next to one of them, each with a device and a push."""
    ids = {}
    for key, serial, user in (("a1", "1111111111", "alice"), ("a2", "2222222222", "alice"),
                              ("b1", "1111111111", "bob")):
        ids[key] = await register(relay, device_body(api.push_token(), serial=serial, username=user))
        assert (await wake(relay, ids[key], call_id=f"call-{key}"))["outcome"] == "dry_run"
    return ids


async def test_export_holds_exactly_that_users_devices_and_push_log(api: Api) -> None:
    async with api.client("relay") as relay, api.client("operator") as op:
        ids = await _two_serials(api, relay)
        r = await op.get("/v1/users/1111111111/alice/export")
        assert r.status_code == 200
        export = r.json()
        assert (export["serial"], export["username"]) == ("1111111111", "alice")
        assert [d["device_id"] for d in export["devices"]] == [ids["a1"]]
        assert [row["device_id"] for row in export["push_log"]] == [ids["a1"]]
        assert all(row["serial"] == "1111111111" and row["username"] == "alice" for row in export["push_log"])
        assert ids["a2"] not in r.text and ids["b1"] not in r.text
        assert "token" not in export["devices"][0]
        # A PBX exports its own users the same way.
        async with api.client("pbx", "2222222222") as pbx:
            mine = (await pbx.get("/v1/users/2222222222/alice/export")).json()
        assert [d["device_id"] for d in mine["devices"]] == [ids["a2"]]


async def test_erase_removes_exactly_that_users_data(api: Api) -> None:
    async with api.client("relay") as relay, api.client("operator") as op:
        ids = await _two_serials(api, relay)
        r = await op.delete("/v1/users/1111111111/alice")
        assert r.json() == {"devices": 1, "push_log_rows": 1}
        gone = (await op.get("/v1/users/1111111111/alice/export")).json()
        assert gone["devices"] == [] and gone["push_log"] == []
        assert (await op.get(f"/v1/devices/{ids['a1']}")).status_code == 404
        for serial, user, key in (("2222222222", "alice", "a2"), ("1111111111", "bob", "b1")):
            kept = (await op.get(f"/v1/users/{serial}/{user}/export")).json()
            assert [d["device_id"] for d in kept["devices"]] == [ids[key]]
            assert len(kept["push_log"]) == 1
        assert (await op.delete("/v1/users/1111111111/alice")).json() == {"devices": 0, "push_log_rows": 0}


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"ip": "not-an-ip"}, "ip 'not-an-ip' is not an IP address"),
        ({"ip": "198.51.100.300"}, "is not an IP address"),
        ({"provider": "mpns"}, "provider 'mpns' is not supported"),
        ({"token": None}, "token is required"),
        ({"token": ""}, "token must not be empty"),
        ({"serial": 123}, "serial must be a string"),
        ({"port": "5060"}, "port must be an integer"),
        ({"port": 0}, "port must be 1..65535"),
        ({"port": True}, "port must be an integer"),
        ({"transport": "sctp"}, "transport 'sctp' is not udp, tcp or tls"),  # the service's PushError
        ({"username": "a\nb"}, "username contains control characters"),
        ({"token": "x" * 5000}, "token is longer than 4096"),
    ],
)
async def test_bad_device_fields_get_400_naming_the_field(
    api: Api, change: dict[str, Any], needle: str
) -> None:
    body = {**device_body(api.push_token()), **change}
    body = {k: v for k, v in body.items() if v is not None}
    async with api.client("relay") as relay:
        r = await relay.put("/v1/devices", json=body)
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]


async def test_malformed_requests_get_clear_json_errors_and_nothing_breaks(api: Api) -> None:
    async with api.client("operator") as c:
        json_ct = {"Content-Type": "application/json"}
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            ("PUT", "/v1/devices", {"content": b"{not json", "headers": json_ct}, 400, "not valid JSON"),
            ("PUT", "/v1/devices", {"content": b"[1, 2]", "headers": json_ct}, 400, "JSON object"),
            ("PUT", "/v1/devices", {"content": b"\xff\xfe\x00", "headers": json_ct}, 400, "not valid JSON"),
            ("PUT", "/v1/devices", {"content": b"[" * 10000, "headers": json_ct}, 400, "not valid JSON"),
            ("PUT", "/v1/devices", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
             "application/json"),
            ("PUT", "/v1/devices", {"content": b"x" * (MAX_BODY + 1), "headers": json_ct}, 413, "larger"),
            ("POST", "/v1/wake", {"json": {"device_id": "ab", "call_id": "c", "ring_timeout": 0}}, 400,
             "ring_timeout"),
            ("POST", "/v1/wake", {"content": b'{"device_id":"ab","call_id":"c","ring_timeout":NaN}',
                                  "headers": json_ct}, 400, "not valid JSON"),
            ("POST", "/v1/wake", {"json": {"device_id": "ab", "call_id": "c", "src": "nowhere"}}, 400, "src"),
            ("POST", "/v1/wake", {"json": {"device_id": "ab"}}, 400, "call_id is required"),
            ("POST", "/v1/wake", {"json": {"call_id": "c"}}, 400, "provider is required"),
            ("POST", "/v1/wake", {"json": {"provider": "apns", "token": "t", "param": "p", "call_id": "c"}},
             400, "serial is required"),
            ("POST", "/v1/wake", {"json": {"provider": "apns", "token": "t", "param": "p", "serial": "1",
                                           "call_id": "c"}}, 400, "username is required"),
            ("POST", "/v1/devices/unregister", {"json": {"provider": "apns", "token": "t", "param": "p"}},
             400, "serial is required"),
            # Digits that are not ASCII: str.isdigit() says yes, int() says no (was a 500).
            ("POST", "/v1/wake", {"json": {"device_id": "ab", "call_id": "c", "src": "1.2.3.4:\u00b2"}}, 400,
             "is not ip:port"),
            ("POST", "/v1/wake", {"json": {"device_id": "ab", "call_id": "c", "src": "1.2.3.4:\u0661\u0662"}},
             400, "is not ip:port"),
            ("GET", "/v1/devices/" + "ab" * 40, {}, 400, "device_id"),
            ("GET", "/v1/devices/abc", {}, 404, "no such device"),
            ("GET", "/v2/nothing", {}, 404, "no such resource"),
            ("PATCH", "/v1/devices", {}, 405, "not allowed"),
            ("DELETE", "/v1/wake", {}, 405, "not allowed"),
        ]
        for method, path, kw, status, needle in cases:
            r = await c.request(method, path, **kw)
            assert r.status_code == status, (method, path, r.text)
            assert needle in r.json()["error"], (method, path, r.text)
        # Streamed (chunked) bodies are bounded too.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b" " * 4096
        r = await c.put("/v1/devices", content=chunks(), headers=json_ct)
        assert r.status_code == 413
    async with httpx.AsyncClient(base_url=api.admin, timeout=10) as admin:
        assert (await admin.get("/readyz")).status_code == 200


# ------------------------------------------------------------------ the relay's clients


async def test_one_token_at_two_pbxs_is_two_devices(api: Api) -> None:
    async with api.client("relay") as relay, api.client("operator") as op:
        token = api.push_token()
        at_one = device_body(token, serial="1111111111", username="alice", ip="198.51.100.1")
        at_two = device_body(token, serial="2222222222", username="alice", ip="198.51.100.2")
        one, two = await register(relay, at_one), await register(relay, at_two)
        assert one != two
        await register(relay, at_one)  # REGISTERs at one PBX leave the other's row as it is
        rows = {(d["serial"], d["ip"]) for d in (await op.get("/v1/devices")).json()}
        assert rows == {("1111111111", "198.51.100.1"), ("2222222222", "198.51.100.2")}
        r = await relay.post("/v1/devices/unregister", json=target_of(at_one))
        assert r.json() == {"deleted": True}
        assert [d["device_id"] for d in (await op.get("/v1/devices")).json()] == [two]
        assert (await wake(relay, two))["outcome"] == "dry_run"


class SlowGateway:
    """APNs in trouble: each push takes a second, and is held after that until the test
    lets go (``release``), so that the test decides how many are in flight at once."""

    provider = "apns"

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.release = trio.Event()

    async def send_once(self, msg: PushMessage) -> Attempt:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await trio.sleep(1.0)
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return Attempt("ok", 200)

    def credentials_expired(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


PARAM = "ABCDE12345.com.example.phone.voip"


@pytest.mark.parametrize("kind", ["http", "in-process"])
async def test_the_relay_s_clients_register_wake_and_unregister(api: Api, kind: str) -> None:
    push: PushClient = (HttpPush(api.base, api.token("relay")) if kind == "http"
                        else InProcessPush(api.running.service))
    target = PushTarget("apns", api.push_token(), PARAM)
    for serial, ip in (("1111111111", "198.51.100.1"), ("2222222222", "198.51.100.2")):
        await push.device_seen(DeviceUpdate(target, serial, "alice", ip, 5060, "tls"))

    async def wake_at(serial: str, call_id: str) -> str:
        req = WakeRequest(call_id, "100", "alice", "192.0.2.10:5061", 10.0, serial, "alice", target)
        return await push.wake(req)

    assert await wake_at("1111111111", "call-1") == "dry_run"
    assert await wake_at("1111111111", "call-1") == "dry_run"  # the same call: the first's outcome
    await push.device_gone(target, "1111111111", "alice")
    assert await wake_at("1111111111", "call-2") == "unknown_device"
    assert await wake_at("2222222222", "call-2") == "dry_run"  # the other account's device is still there
    async with api.client("operator") as op:
        devices = (await op.get("/v1/devices")).json()
        assert [(d["serial"], d["ip"]) for d in devices] == [("2222222222", "198.51.100.2")]
        assert len((await op.get("/v1/users/1111111111/alice/log")).json()) == 1
    await push.aclose()


async def test_slow_wakes_do_not_hold_up_device_updates(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
) -> None:
    """150 wakes stuck on the provider (each holds an HTTP/1.1 connection on plain
    HTTP) are all in flight at once, and a registration goes through meanwhile."""
    slow = SlowGateway()
    api = await start_api(tmp_path, nursery, {"apns": slow, "fcm": LogGateway("fcm")})
    push = HttpPush(api.base, api.token("relay"))
    target = PushTarget("apns", api.push_token(), PARAM)
    await push.device_seen(DeviceUpdate(target, "1111111111", "alice", "198.51.100.1", 5060, "tls"))
    outcomes: list[str] = []
    took: list[float] = []

    async def one_wake(i: int) -> None:
        req = WakeRequest(f"call-{i}", "100", "alice", "", 60.0, "1111111111", "alice", target)
        outcomes.append(await push.wake(req))

    async with trio.open_nursery() as wakes:
        for batch in range(15):
            if batch == 10:  # 100 wakes held at the provider: a phone registers
                t0 = trio.current_time()
                other = DeviceUpdate(PushTarget("apns", api.push_token(), PARAM), "1111111111", "bob",
                                     "198.51.100.2", 5060, "tls")
                with trio.move_on_after(2):
                    await push.device_seen(other)
                    took.append(trio.current_time() - t0)
            for i in range(10 * batch, 10 * batch + 10):
                wakes.start_soon(one_wake, i)
            # In tens, each let in before the next: the server runs in this very trio
            # run, and a burst beyond its listen backlog (100) would wait for the
            # kernel's SYN retry (1 s) instead of a connection of the client's.
            with trio.move_on_after(2):
                while slow.in_flight < 10 * batch + 10:
                    await trio.sleep(0.005)
        held = slow.in_flight
        slow.release.set()
    assert took and took[0] < 0.5, "a device update waited for a wake's connection"
    assert held == 150  # no wake waited for another's connection
    assert outcomes == ["sent"] * 150
    await push.aclose()
