"""pbxcore: the admin endpoint's limits, the wire codec, metrics export, the CLI handler."""

from __future__ import annotations

import pytest
import trio

from pbxcore import admin, wire
from pbxcore.admin import AdminAnswer, AdminRequest, serve_admin
from pbxcore.cli import run_command
from pbxcore.config import Listen
from pbxcore.errors import ConfigError, ListenError
from pbxcore.metrics import MetricSet, Plain, parse
from pbxcore.redisconn import redis_address, redis_url_problem, redis_url_shown


async def _start(nursery: trio.Nursery) -> int:
    async def echo(req: AdminRequest) -> AdminAnswer:
        return AdminAnswer.json({"method": req.method, "n": len(req.body), "q": req.query})

    async def broken(req: AdminRequest) -> AdminAnswer:
        raise RuntimeError("bug")

    routes = {("GET", "/echo"): echo, ("POST", "/echo"): echo, ("GET", "/broken"): broken}
    bound: str = await nursery.start(serve_admin, "admin", Listen("127.0.0.1", 0), routes)
    return int(bound.rpartition(":")[2])


async def _ask(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


def _post(n: int) -> bytes:
    return b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n + b"x" * n


async def test_routes_methods_and_errors(nursery: trio.Nursery) -> None:
    port = await _start(nursery)
    ok = await _ask(port, b"GET /echo?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b'"q": {\n  "a": "1"\n }' in ok
    assert (await _ask(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
    assert (await _ask(port, b"DELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
    assert (await _ask(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
    assert (await _ask(port, b"\x16\x03\x01 not http\r\n\r\n")).startswith(b"HTTP/1.1 400 ")


async def test_body_and_head_limits(nursery: trio.Nursery) -> None:
    port = await _start(nursery)
    at = await _ask(port, _post(admin.MAX_BODY))
    assert at.startswith(b"HTTP/1.1 200 ") and f'"n": {admin.MAX_BODY}'.encode() in at
    assert (await _ask(port, _post(admin.MAX_BODY + 1))).startswith(b"HTTP/1.1 413 ")
    fits = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (admin.MAX_HEAD - 100) + b"\r\n\r\n"
    assert (await _ask(port, fits)).startswith(b"HTTP/1.1 200 ")
    long_head = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * admin.MAX_HEAD + b"\r\n\r\n"
    assert (await _ask(port, long_head)).startswith(b"HTTP/1.1 431 ")


async def test_a_trickling_peer_is_cut_off_and_others_are_served(nursery: trio.Nursery) -> None:
    port = await _start(nursery)
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    await slow.send_all(b"GET /echo HTTP/1.1\r\n")  # and nothing more
    assert (await _ask(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    with trio.fail_after(admin.REQUEST_TIMEOUT + 5):
        assert await slow.receive_some(100) == b""  # closed after REQUEST_TIMEOUT, answered nothing
    await slow.aclose()


async def test_connections_beyond_the_limit_get_503(nursery: trio.Nursery) -> None:
    port = await _start(nursery)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(admin.MAX_CONNECTIONS)]
    await trio.sleep(0.2)  # every one of them accepted and holding its slot
    assert (await _ask(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 503 ")
    await idle.pop().aclose()
    await trio.sleep(0.2)
    assert (await _ask(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    for s in idle:
        await s.aclose()


async def test_a_port_in_use_is_a_listen_error_naming_it(nursery: trio.Nursery) -> None:
    port = await _start(nursery)
    with pytest.raises(ListenError) as e:
        await serve_admin("push admin", Listen("127.0.0.1", port), {})
    assert str(e.value) == f"cannot listen: push admin on 127.0.0.1:{port}: Address already in use"


def test_wire_round_trip_and_bad_input() -> None:
    target = wire.PushTarget("apns", "ab" * 32, "T.com.example.voip")
    req = wire.WakeRequest("c1", "100", "201", "[2001:db8::1]:5060", 12.0, "0123456789", "201", target)
    back = wire.wake_request_from_json(wire.wake_request_json(req))
    assert back == req and back.resolve(b"k" * 32) == target.device_id(b"k" * 32, "0123456789", "201")
    update = wire.DeviceUpdate(target, "0123456789", "201", "192.0.2.1", 5060, "tls")
    assert wire.device_update_from_json(wire.device_update_json(update)) == update
    result = wire.WakeResult("d", wire.WakeOutcome.DRY_RUN, None, "", 1, 0.5)
    assert wire.wake_result_from_json(wire.wake_result_json(result)) == result
    assert wire.WakeOutcome.DRY_RUN.may_ring and not wire.WakeOutcome.FAILED.may_ring
    with pytest.raises(wire.WireError, match="unknown wake outcome"):
        wire.wake_result_from_json({"outcome": "maybe"})
    with pytest.raises(wire.WireError, match="token is longer than 4096"):
        wire.device_update_from_json({**wire.device_update_json(update), "token": "a" * 4097})
    with pytest.raises(wire.WireError, match="ring_timeout"):
        wire.wake_request_from_json({**wire.wake_request_json(req), "ring_timeout": float("nan")})


def test_plain_counters_are_exported_with_help_type_and_labels() -> None:
    counts = {"requests_in_total": {("INVITE",): 2, ("BYE",): 1}, "flows_open": 3, "stray": 1}
    metrics = MetricSet("pbx_test")
    export = metrics.export([Plain("requests_in_total", "Requests received, by method.", labels=("method",)),
                             Plain("flows_open", "Open flows.", "gauge")], lambda: counts)
    text = metrics.render().decode()
    assert "# HELP pbx_test_requests_in_total Requests received, by method." in text
    assert "# TYPE pbx_test_requests_in_total counter" in text and "# TYPE pbx_test_flows_open gauge" in text
    values = parse(text)
    assert values['pbx_test_requests_in_total{method="INVITE"}'] == 2 and values["pbx_test_flows_open"] == 3
    assert export.undeclared() == ["stray"] and "stray" not in text


def test_the_cli_handler_finds_the_error_inside_exception_groups(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        raise ExceptionGroup("tree", [ExceptionGroup("inner", [ConfigError("f.toml: push.x must be")])])

    assert run_command("pbx-test", body) == 2
    assert capsys.readouterr().err == "pbx-test: f.toml: push.x must be\n"
    with pytest.raises(RuntimeError):
        run_command("pbx-test", lambda: (_ for _ in ()).throw(RuntimeError("a bug keeps its traceback")))


def test_redis_urls_are_checked_and_shown_without_their_password() -> None:
    assert redis_url_problem("redis://127.0.0.1:6379") is None
    assert redis_url_problem("redis://:pw@[::1]:6379/0") is None
    assert redis_url_problem("rediss://h:6379") == (
        "is not redis://host:port (rediss:// and unix sockets are not supported yet)")
    assert redis_url_problem("redis://h") == "needs a port (redis://host:6379)"
    assert redis_url_problem("redis://h:99999") == "has a bad port"
    assert redis_address("redis://:p%40ss@10.0.0.5:6379") == ("10.0.0.5", 6379, "p@ss")
    assert redis_url_shown("redis://:s3cret@10.0.0.5:6379") == "redis://:***@10.0.0.5:6379"
    assert redis_url_shown("redis://[::1]:6379") == "redis://[::1]:6379"
