"""Provisioning through the relay, in one trio run: the provisioning port, the agent
(`pbx-relay link`'s code) and a real HTTP server (tests/provisioning_origin.py) as the PBX's."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from tests.provisioning_harness import OTHER, SERIAL, Pipe, Relay, files, origin, relay, relay_online


async def test_files_come_through_byte_identical(tmp_path: Path) -> None:
    content = files(tmp_path / "www")
    with origin(tmp_path / "www") as o:
        async with relay_online(tmp_path, o.url + "/files") as r:
            async with r.client() as phone:
                for name, data in content.items():
                    resp = await phone.get(f"/provisioning/{SERIAL}/{name}")
                    assert resp.status_code == 200, (name, resp.status_code)
                    assert resp.content == data, name
                    assert int(resp.headers["content-length"]) == len(data)


async def test_head_conditional_get_and_query_reach_the_pbx(tmp_path: Path) -> None:
    content = files(tmp_path / "www")
    with origin(tmp_path / "www") as o:
        async with relay_online(tmp_path, o.url) as r:
            async with r.client() as phone:
                head = await phone.head(f"/provisioning/{SERIAL}/files/firmware.rom")
                assert head.status_code == 200 and head.content == b""
                assert int(head.headers["content-length"]) == len(content["firmware.rom"])
                first = await phone.get(f"/provisioning/{SERIAL}/files/y000000000044.cfg")
                again = await phone.get(f"/provisioning/{SERIAL}/files/y000000000044.cfg",
                                        headers={"if-modified-since": first.headers["last-modified"]})
                assert again.status_code == 304 and again.content == b""
                echo = await phone.get(f"/provisioning/{SERIAL}/echo?mac=0004f2abcdef&token=t0k")
                assert json.loads(echo.content)["_path"] == "/echo?mac=0004f2abcdef&token=t0k"


async def test_only_allowed_header_fields_reach_the_pbx_and_come_back(tmp_path: Path) -> None:
    with origin(tmp_path) as o:
        async with relay(tmp_path, extra_request_headers=("X-Device-Model",)) as r:
            await r.start_agent(r.agent_settings(SERIAL, o.url))
            await r.wait_online(SERIAL)
            async with r.client() as phone:
                resp = await phone.get(f"/provisioning/{SERIAL}/echo", headers={
                    "User-Agent": "Yealink SIP-T46S 66.86.0.15 00:15:65:aa:bb:cc",
                    "Authorization": "Basic MjAxOnNlY3JldA==", "Range": "bytes=0-",
                    "X-Device-Model": "T46S", "Cookie": "session=1", "X-Forwarded-For": "6.6.6.6",
                    "Connection": "keep-alive, X-Secret", "X-Secret": "hop", "X-Other": "no"})
    got = {k.lower(): v for k, v in json.loads(resp.content).items()}
    assert got["user-agent"].startswith("Yealink SIP-T46S")
    assert got["authorization"] == "Basic MjAxOnNlY3JldA=="
    assert got["range"] == "bytes=0-" and got["x-device-model"] == "T46S"
    for never in ("cookie", "x-forwarded-for", "x-secret", "x-other", "keep-alive"):
        assert never not in got, never
    # the phone's address, as the relay saw it (RFC 7239); the phone cannot forge it
    assert got["forwarded"].startswith("for=127.0.0.1;proto=https")
    assert "6.6.6.6" not in json.dumps(got)
    assert resp.headers["content-type"] == "text/plain"
    assert "server" not in resp.headers  # the PBX's web server stays behind the relay


async def test_unknown_offline_and_outside_targets_get_one_identical_404(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, r.client() as phone:
        answers = [await phone.get(p) for p in (
            "/provisioning/no-such-pbx/y000000000044.cfg",  # unknown serial
            f"/provisioning/{SERIAL}/y000000000044.cfg",  # known, offline (no link)
            "/provisioning/bad!serial/x", "/admin", f"/provisioning/{SERIAL}",
        )]
    assert {a.status_code for a in answers} == {404}
    assert len({(a.content, tuple(sorted(a.headers.items()))) for a in answers}) == 1


@pytest.mark.parametrize("path", ["../admin", "a/../../admin", "%2e%2e/admin", "a%2f..%2fadmin",
                                  "..%5cadmin", "x%00.cfg", "./x"])
async def test_a_path_cannot_climb_out_of_the_provisioning_tree(tmp_path: Path, path: str) -> None:
    with origin(tmp_path) as o:
        async with relay_online(tmp_path, o.url + "/files") as r:
            async with r.client() as phone:
                # raw target: httpx would normalise the dots away before sending
                req = phone.build_request("GET", f"/provisioning/{SERIAL}/x")
                req.url = req.url.copy_with(raw_path=f"/provisioning/{SERIAL}/{path}".encode())
                resp = await phone.send(req)
    assert resp.status_code == 404
    assert r.server.stats["provisioning_requests_total:200"] == 0


async def test_methods_other_than_get_and_head_are_refused(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, r.client() as phone:
        resp = await phone.post(f"/provisioning/{SERIAL}/x", content=b"data")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, HEAD"


async def test_request_head_over_the_limit_gets_431(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, r.client() as phone:
        ok = await phone.get(f"/provisioning/{SERIAL}/x", headers={"user-agent": "u" * 7000})
        big = await phone.get(f"/provisioning/{SERIAL}/x", headers={"user-agent": "u" * 9000})
        # httpx adds host, accept, accept-encoding, connection, user-agent: 95 + 5 = 100
        many = [(f"x-{i}", "1") for i in range(95)]
        at_limit = await phone.get(f"/provisioning/{SERIAL}/x", headers=many)
        over = await phone.get(f"/provisioning/{SERIAL}/x", headers=[*many, ("x-96", "1")])
    assert ok.status_code == 404 and at_limit.status_code == 404  # ordinary answers (PBX offline)
    assert big.status_code == 431 and over.status_code == 431


async def test_a_hostile_pbx_side_loses_its_own_link_only(tmp_path: Path) -> None:
    """A PBX side that answers with a header block over MAX_RESPONSE_HEAD: its link goes
    (its phone gets 502), another PBX's phones are not touched."""
    import h2.config
    import h2.connection
    import h2.events

    from relay.provisioning.agent import open_link

    with origin(tmp_path) as o:
        async with relay_online(tmp_path, o.url) as r:
            stream, initial = await open_link(r.agent_settings(OTHER, o.url))
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()

            async def hostile() -> None:
                data = initial
                while True:
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            fields = [(":status", "200")] + [(f"etag-{i}", "v" * 100) for i in range(300)]
                            conn.send_headers(event.stream_id, fields, end_stream=True)
                    try:
                        await stream.send_all(conn.data_to_send())
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return  # the relay dropped it
                    if not data:
                        return

            r.nursery.start_soon(hostile)
            await r.wait_online(OTHER)
            async with r.client() as phone:
                assert (await phone.get(f"/provisioning/{OTHER}/x")).status_code == 502
                assert (await phone.get(f"/provisioning/{SERIAL}/echo")).status_code == 200
            assert not r.server.table.online(OTHER) and r.server.table.online(SERIAL)
            await stream.aclose()


async def test_slow_pbx_gets_504_and_the_link_carries_on(tmp_path: Path) -> None:
    with origin(tmp_path) as o:
        async with relay_online(tmp_path, o.url, response_timeout=0.5) as r:
            async with r.client() as phone:
                late = await phone.get(f"/provisioning/{SERIAL}/slow/3")
                echo = await phone.get(f"/provisioning/{SERIAL}/echo")
    assert late.status_code == 504
    assert echo.status_code == 200


async def test_body_over_max_body_is_refused_or_cut(tmp_path: Path) -> None:
    with origin(tmp_path) as o:
        async with relay_online(tmp_path, o.url, max_body=1024 * 1024) as r:
            async with r.client() as phone:
                at_limit = await phone.get(f"/provisioning/{SERIAL}/big/1")
                over = await phone.get(f"/provisioning/{SERIAL}/big/2")
    assert at_limit.status_code == 200 and len(at_limit.content) == 1024 * 1024
    assert over.status_code == 502


async def test_a_body_that_stops_is_cut_never_passed_off_as_whole(tmp_path: Path) -> None:
    with origin(tmp_path) as o:
        async with relay_online(tmp_path, o.url, body_idle_timeout=0.5) as r:
            async with r.client() as phone:
                with pytest.raises(httpx.RemoteProtocolError):
                    await phone.get(f"/provisioning/{SERIAL}/cut/1000")
                assert (await phone.get(f"/provisioning/{SERIAL}/echo")).status_code == 200
    assert r.server.stats["provisioning_aborted_total:pbx_idle"] == 1


async def test_requests_per_serial_at_the_limit_accepted_one_over_503_other_pbx_unaffected(
    tmp_path: Path,
) -> None:
    with origin(tmp_path) as o:
        async with relay(tmp_path, max_requests_per_serial=3) as r:
            await r.start_agent(r.agent_settings(SERIAL, o.url))
            await r.start_agent(r.agent_settings(OTHER, o.url))
            await r.wait_online(SERIAL)
            await r.wait_online(OTHER)
            slow: list[int] = []
            async with r.client() as phone, trio.open_nursery() as nursery:
                async def fetch_slow() -> None:
                    slow.append((await phone.get(f"/provisioning/{SERIAL}/slow/2")).status_code)

                for _ in range(3):
                    nursery.start_soon(fetch_slow)
                with trio.fail_after(5):
                    while r.server.table.in_progress[SERIAL] < 3:
                        await trio.sleep(0.01)
                over = await phone.get(f"/provisioning/{SERIAL}/echo")
                other = await phone.get(f"/provisioning/{OTHER}/echo")
            async with r.client() as phone:
                after = await phone.get(f"/provisioning/{SERIAL}/echo")
    assert slow == [200, 200, 200]
    assert over.status_code == 503 and over.headers["retry-after"] == "5"
    assert other.status_code == 200
    assert after.status_code == 200


async def test_links_per_serial_at_the_limit_accepted_one_over_refused(tmp_path: Path) -> None:
    from relay.provisioning.agent import LinkRefused, open_link

    with origin(tmp_path) as o:
        async with relay(tmp_path, max_links_per_serial=2) as r:
            for _ in range(2):
                await r.start_agent(r.agent_settings(SERIAL, o.url))
            await r.wait_online(SERIAL, links=2)
            with pytest.raises(LinkRefused, match="429"):
                await open_link(r.agent_settings(SERIAL, o.url))
            await r.start_agent(r.agent_settings(OTHER, o.url))
            await r.wait_online(OTHER)
            async with r.client() as phone:
                assert (await phone.get(f"/provisioning/{SERIAL}/echo")).status_code == 200
                assert (await phone.get(f"/provisioning/{OTHER}/echo")).status_code == 200
    assert r.server.stats["provisioning_links_refused_total"] == 1


async def test_a_wrong_secret_or_unknown_serial_gets_no_link(tmp_path: Path) -> None:
    from dataclasses import replace

    from relay.provisioning.agent import LinkRefused, open_link

    async with relay(tmp_path) as r:
        good = r.agent_settings(SERIAL, "http://127.0.0.1:9")
        for bad in (replace(good, secret="wrong"), replace(good, serial="no-such-pbx")):
            with pytest.raises(LinkRefused, match="refused the serial and secret"):
                await open_link(bad)
        assert not r.server.table.links
        stream, _ = await open_link(good)  # the right one does
        await stream.aclose()
    assert r.server.stats["provisioning_link_auth_failures_total"] == 2


async def _through_pipe(r: Relay, target: str) -> Pipe:
    pipe = Pipe(int(r.server.bound[0].rpartition(":")[2]))
    await r.nursery.start(pipe.serve)
    await r.start_agent(r.agent_settings(SERIAL, target, port=pipe.port))
    await r.wait_online(SERIAL)
    return pipe


async def _until_online_again(r: Relay, phone: httpx.AsyncClient) -> httpx.Response:
    with trio.fail_after(20):
        while True:
            resp = await phone.get(f"/provisioning/{SERIAL}/echo")
            if resp.status_code == 200:
                return resp
            await trio.sleep(0.1)


async def test_link_dropped_mid_request_gives_502_and_the_agent_reconnects(tmp_path: Path) -> None:
    with origin(tmp_path) as o:
        async with relay(tmp_path) as r:
            pipe = await _through_pipe(r, o.url)
            async with r.client() as phone, trio.open_nursery() as nursery:
                got: list[httpx.Response] = []

                async def pending() -> None:
                    got.append(await phone.get(f"/provisioning/{SERIAL}/slow/3"))

                nursery.start_soon(pending)
                with trio.fail_after(5):
                    while not r.server.table.in_progress[SERIAL]:
                        await trio.sleep(0.01)
                await trio.sleep(0.2)  # the request is at the PBX now
                await pipe.cut()
            assert [x.status_code for x in got] == [502]
            async with r.client() as phone:
                again = await _until_online_again(r, phone)
    assert again.status_code == 200
    assert r.server.stats["provisioning_links_total"] == 2


async def test_a_silent_link_is_found_dead_by_keepalive_and_comes_back(tmp_path: Path) -> None:
    with origin(tmp_path) as o:
        async with relay(tmp_path) as r:
            pipe = await _through_pipe(r, o.url)
            async with r.client() as phone:
                pipe.frozen = True  # nothing passes, nothing closes: a NAT that lost the binding
                lost = await phone.get(f"/provisioning/{SERIAL}/echo")
                assert lost.status_code == 502
                assert not r.server.table.online(SERIAL)  # dropped by the relay's keepalive
                pipe.frozen = False  # the agent found it dead too, and dials a fresh one
                again = await _until_online_again(r, phone)
    assert again.status_code == 200


async def test_access_log_holds_networks_only_and_nothing_of_any_file_is_on_disk(tmp_path: Path) -> None:
    content = files(tmp_path / "www")
    with origin(tmp_path / "www") as o:
        async with relay(tmp_path) as r:
            async with r.client() as phone:
                await phone.get(f"/provisioning/{SERIAL}/y000000000044.cfg")  # known, offline: 404
                await r.start_agent(r.agent_settings(SERIAL, o.url + "/files"))
                await r.wait_online(SERIAL)
                for name in content:
                    assert (await phone.get(f"/provisioning/{SERIAL}/{name}?token=t0k3n")).status_code == 200
                await phone.get("/provisioning/no-such-pbx/y000000000044.cfg")  # unknown: not logged
            with trio.fail_after(5):
                while r.server.recorder.written < 5:
                    await trio.sleep(0.01)
            rows = await r.server.recorder.log.rows()
    assert [(x.serial, x.client, x.status) for x in rows] == (
        [(SERIAL, "127.0.0.0/24", 404)] + [(SERIAL, "127.0.0.0/24", 200)] * 4)
    on_disk = b"".join(p.read_bytes() for p in r.state_dir.rglob("*") if p.is_file())
    assert r.state_dir.joinpath("provisioning-access.sqlite").stat().st_mode & 0o777 == 0o600
    assert b"127.0.0.1" not in on_disk and b"no-such-pbx" not in on_disk
    for secret in (b"t0k3n", b"y000000000044", b"account.1.user_name", content["0004f2abcdef.xml"][:30]):
        assert secret not in on_disk, secret
    firmware = content["firmware.rom"]
    for offset in range(0, len(firmware) - 64, len(firmware) // 50):
        assert firmware[offset:offset + 64] not in on_disk


async def test_connections_per_ip_at_the_limit_accepted_one_over_closed_other_ip_served(
    tmp_path: Path,
) -> None:
    async with relay(tmp_path, max_connections_per_ip=2) as r:
        port = int(r.server.bound[0].rpartition(":")[2])
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        with trio.fail_after(5):
            while r.server.counters()["provisioning_connections_open"] < 2:
                await trio.sleep(0.01)
        with pytest.raises(httpx.HTTPError):
            async with r.client() as phone:
                await phone.get(f"/provisioning/{SERIAL}/x")
        other_ip = httpx.AsyncHTTPTransport(local_address="127.0.0.2",
                                            verify=ssl.create_default_context(cafile=str(r.cert)))
        async with r.client(transport=other_ip) as phone:
            assert (await phone.get(f"/provisioning/{SERIAL}/x")).status_code == 404
        for s in held:
            await s.aclose()
    assert r.server.stats["provisioning_connections_refused_total"] == 1
