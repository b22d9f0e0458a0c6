"""The pure parts of provisioning: targets and header fields, the handshake's digest,
keepalive and backoff, routing limits, anonymisation, settings; the access log's purge."""

from __future__ import annotations

import dataclasses
import random
import tomllib
from pathlib import Path

import pytest
import trio
import trio.testing

from relay import config
from relay.pbx.digest import DigestAuth, ha1
from relay.provisioning.accesslog import DAY, AccessLog, AccessRecorder, anonymise
from relay.provisioning.forwarding import (
    BadTarget,
    content_length,
    end_to_end,
    forwarded,
    parse_target,
    request_fields,
    response_fields,
    safe_path,
)
from relay.provisioning.handshake import (
    LINK_PATH,
    auth_params,
    authorization,
    choose_challenge,
    digest_username,
    is_link_request,
)
from relay.provisioning.policy import (
    RECONNECT_MAX,
    Keepalive,
    KeepaliveTimes,
    keepalive_step,
    reconnect_delay,
)
from relay.provisioning.routing import LinkTable
from relay.provisioning.settings import ProvisioningSettings

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ targets
@pytest.mark.parametrize(("target", "serial", "path"), [
    (b"/provisioning/0123456789/y000000000044.cfg", "0123456789", "/y000000000044.cfg"),
    (b"/provisioning/ABC-1/dir/x.xml?mac=00:15&t=1", "ABC-1", "/dir/x.xml?mac=00:15&t=1"),
    (b"/provisioning/ABC-1/", "ABC-1", "/"),
    (b"/provisioning/ABC-1/a/..b/c..", "ABC-1", "/a/..b/c.."),  # dots inside a name are fine
])
def test_targets_split_into_serial_and_path(target: bytes, serial: str, path: str) -> None:
    t = parse_target(target)
    assert (t.serial, t.path) == (serial, path)


@pytest.mark.parametrize("target", [
    b"/provisioning/0123456789", b"/provisioning//x", b"/provisioning/bad!serial/x", b"/other/x",
    b"http://relay/provisioning/0123456789/x", b"/provisioning/0123456789/../x",
    b"/provisioning/0123456789/%2E%2e/x", b"/provisioning/0123456789/a%2Fb",
    b"/provisioning/0123456789/a%5Cb",
    b"/provisioning/0123456789/a%00", b"/provisioning/0123456789/a b", "/provisioning/0123456789/é".encode(),
    b"/provisioning/0123456789?x/y",
])
def test_targets_outside_the_tree_are_refused(target: bytes) -> None:
    with pytest.raises(BadTarget):
        parse_target(target)


def test_safe_path_allows_dots_in_the_query() -> None:
    assert safe_path("/x.cfg?next=../../etc")  # the query is the server's to read, not a path
    assert not safe_path("x.cfg")


def test_request_fields_are_an_allow_list() -> None:
    fields = [(b"User-Agent", b"Yealink"), (b"Cookie", b"a=1"), (b"Connection", b"close"),
              (b"X-Model", b"T46"), (b"Forwarded", b"for=6.6.6.6"), (b"Range", b"bytes=0-")]
    assert request_fields(fields) == [(b"user-agent", b"Yealink"), (b"range", b"bytes=0-")]
    assert request_fields(fields, frozenset({"x-model", "cookie"})) == [
        (b"user-agent", b"Yealink"), (b"x-model", b"T46"), (b"range", b"bytes=0-")]


def test_response_fields_are_an_allow_list() -> None:
    fields = [(b"content-type", b"text/plain"), (b"set-cookie", b"s=1"), (b"server", b"Apache"),
              (b"transfer-encoding", b"chunked"), (b"www-authenticate", b'Digest realm="pbx"')]
    assert response_fields(fields) == [(b"content-type", b"text/plain"),
                                       (b"www-authenticate", b'Digest realm="pbx"')]


def test_end_to_end_drops_pseudo_and_hop_by_hop_fields() -> None:
    fields = [(b":path", b"/x"), (b"Host", b"h"), (b"TE", b"trailers"), (b"ETag", b'"1"')]
    assert end_to_end(fields) == [(b"etag", b'"1"')]


@pytest.mark.parametrize(("fields", "length"), [
    ([(b"content-length", b"12")], 12), ([], None), ([(b"content-length", b"1x")], None),
    ([(b"content-length", b"1"), (b"content-length", b"2")], None),
])
def test_content_length(fields: list[tuple[bytes, bytes]], length: int | None) -> None:
    assert content_length(fields) == length


def test_forwarded_names_the_client_per_rfc_7239() -> None:
    assert forwarded("203.0.113.2", "relay.example:4433") == (
        'for=203.0.113.2;proto=https;host="relay.example:4433"')
    assert forwarded("2001:db8::1", "") == 'for="[2001:db8::1]";proto=https'
    assert forwarded("::ffff:203.0.113.2", 'evil"host') == "for=203.0.113.2;proto=https"


# --------------------------------------------------------------- handshake
def test_digest_round_trip_against_the_relays_own_check() -> None:
    auth = DigestAuth(b"k" * 32, "relay.test", ("SHA-256", "MD5"))
    challenges = auth.challenges(100.0, bind="203.0.113.130")
    chosen = choose_challenge(challenges)
    assert chosen is not None and chosen.algorithm == "SHA-256"
    value = authorization(chosen, "0123456789", "secret", "GET", LINK_PATH)
    ha1s = {a: ha1(a, "0123456789", "relay.test", "secret") for a in ("MD5", "SHA-256")}
    assert digest_username(value) == "0123456789"
    assert auth.check(value, "GET", ha1s, 101.0, bind="203.0.113.130")[0] == "ok"
    assert auth.check(value, "GET", ha1s, 101.0, bind="198.51.100.7")[0] == "unknown_nonce"
    wrong = authorization(chosen, "0123456789", "guess", "GET", LINK_PATH)
    assert auth.check(wrong, "GET", ha1s, 101.0, bind="203.0.113.130")[0] == "fail"


def test_challenge_choice_skips_what_it_cannot_answer() -> None:
    assert choose_challenge(
        ['Basic realm="x"', 'Digest realm="r", nonce="n", algorithm=SHA-512, qop="auth"']) is None
    md5 = choose_challenge(['Digest realm="r", nonce="n", qop="auth,auth-int"'])
    assert md5 is not None and md5.algorithm == "MD5"


def test_auth_params_survive_garbage() -> None:
    assert auth_params('realm="a, b", nonce=xyz, qop="auth"') == {
        "realm": "a, b", "nonce": "xyz", "qop": "auth"}
    assert auth_params('realm="a\\"b"') == {"realm": 'a"b'}
    assert auth_params("=== ,,, ") == {}


def test_link_request_needs_the_path_and_the_upgrade_token() -> None:
    up = [(b"upgrade", b"pbx-relay-link/1"), (b"connection", b"Upgrade")]
    assert is_link_request(b"GET", LINK_PATH.encode(), up)
    assert is_link_request(b"GET", LINK_PATH.encode(), [(b"Upgrade", b"h2c, PBX-Relay-Link/1")])
    assert not is_link_request(b"POST", LINK_PATH.encode(), up)
    assert not is_link_request(b"GET", b"/provisioning/x/y", up)
    assert not is_link_request(b"GET", LINK_PATH.encode(), [(b"upgrade", b"websocket")])


# ------------------------------------------------------- keepalive, backoff
TIMES = KeepaliveTimes(interval=20.0, timeout=10.0)


def test_keepalive_pings_after_silence_and_declares_death_after_its_timeout() -> None:
    assert keepalive_step(5.0, 0.0, None, TIMES) == (Keepalive.WAIT, 20.0)
    assert keepalive_step(20.0, 0.0, None, TIMES) == (Keepalive.PING, 30.0)
    assert keepalive_step(25.0, 0.0, 20.0, TIMES) == (Keepalive.WAIT, 30.0)
    assert keepalive_step(30.0, 0.0, 20.0, TIMES)[0] is Keepalive.DEAD
    # an answer (or any frame) after the PING: alive, next PING 20 s after it
    assert keepalive_step(30.0, 21.0, 20.0, TIMES) == (Keepalive.WAIT, 41.0)


def test_reconnect_delay_doubles_with_jitter_up_to_its_cap() -> None:
    rng = random.Random(7)
    for failures, step in ((1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (50, RECONNECT_MAX)):
        delays = [reconnect_delay(failures, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # spread: PBXs do not come back in step


# ------------------------------------------------------------------ routing
class FakeLink:
    def __init__(self, active: int, capacity: int):
        self.active, self.capacity = active, capacity


def test_link_table_limits_links_and_requests_per_serial() -> None:
    table: LinkTable[FakeLink] = LinkTable(max_links=2, max_requests=2)
    a, b, c = FakeLink(3, 100), FakeLink(1, 100), FakeLink(0, 100)
    assert table.add("S", a) and table.add("S", b)
    assert not table.add("S", c)  # one over
    assert table.add("T", c)  # another PBX is not touched
    assert table.pick("S") is b  # the least busy
    b.active = 100
    assert table.pick("S") is a
    a.capacity = 0  # closing
    assert table.pick("S") is None
    assert table.begin("S") and table.begin("S") and not table.begin("S")
    assert table.begin("T")
    table.end("S")
    assert table.begin("S")
    table.remove("S", a)
    table.remove("S", b)
    assert not table.online("S") and table.online("T")


# ------------------------------------------------------------ access log
@pytest.mark.parametrize(("ip", "network"), [
    ("203.0.113.77", "203.0.113.0/24"), ("2001:db8:1234:5678::9", "2001:db8:1234::/48"),
    ("::ffff:198.51.100.200", "198.51.100.0/24"), ("fe80::1%eth0", "fe80::/48"),
])
def test_anonymise_keeps_the_network_only(ip: str, network: str) -> None:
    assert anonymise(ip) == network


async def test_access_log_is_purged_at_12_months(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    base = 1_700_000_000.0
    store = AccessLog(tmp_path / "access.sqlite", threaded=False)
    recorder = AccessRecorder(store, 365, lambda: base + trio.current_time(), 100, 10, 3600.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.run_writer)
        nursery.start_soon(recorder.run_purges)
        recorder.record("0123456789", "203.0.113.77", 200)
        await trio.sleep(DAY)
        recorder.record("0123456789", "2001:db8::1", 404)
        await trio.sleep(364 * DAY)  # first row 365 days old now: not older than 12 months yet
        assert [r.client for r in await store.rows()] == ["203.0.113.0/24", "2001:db8::/48"]
        await trio.sleep(3600 + 1)  # past 12 months, one hourly purge later
        assert [r.client for r in await store.rows()] == ["2001:db8::/48"]
        await trio.sleep(DAY)
        assert await store.rows() == []
        nursery.cancel_scope.cancel()
    assert recorder.purged == 2
    store.close()


async def test_access_log_keeps_at_most_max_rows_oldest_go_first(tmp_path: Path) -> None:
    store = AccessLog(tmp_path / "access.sqlite", max_rows=3)
    recorder = AccessRecorder(store, 365, lambda: 0.0, 100, 10, 3600.0)
    from relay.provisioning.accesslog import Access

    await store.add([Access(float(t), "S", "203.0.113.0/24", 200) for t in range(5)])
    assert await recorder.purge_once() == (0, 2)
    assert [r.at for r in await store.rows()] == [2.0, 3.0, 4.0]
    store.close()


def test_access_log_queue_drops_beyond_its_limit(tmp_path: Path) -> None:
    store = AccessLog(tmp_path / "access.sqlite")
    recorder = AccessRecorder(store, 365, lambda: 0.0, 2, 10, 3600.0)
    for _ in range(3):
        recorder.record("S", "203.0.113.1", 200)
    assert recorder.dropped == 1
    store.close()


# ------------------------------------------------------------------ settings
def test_settings_defaults_match_the_schema_and_the_reference_file() -> None:
    with open(ROOT / "config" / "relay.toml", "rb") as f:
        doc = tomllib.load(f)["provisioning"]
    cfg = config.load(None, environ={})
    settings = ProvisioningSettings.from_config(cfg.__getitem__)
    defaults = ProvisioningSettings(realm=cfg["relay.domain"])
    assert settings == defaults
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(defaults).items()
            if k in doc} == doc
    assert set(doc) == {f.name for f in dataclasses.fields(config.ProvisioningSection)}


@pytest.mark.parametrize(("body", "needle"), [
    ("[provisioning]\nlisten = [\"nowhere\"]\n", "provisioning.listen"),
    ("[provisioning]\naccess_log_days = 400\n", "provisioning.access_log_days"),
    ("[provisioning]\nmax_requests_per_serial = 0\n", "provisioning.max_requests_per_serial"),
    ("[provisioning]\nresponse_timeout = 0\n", "provisioning.response_timeout"),
    ("[provisioning]\nextra_request_headers = [\"Cookie\"]\n", "provisioning.extra_request_headers"),
    ("[provisioning]\nmax_body = 0\n", "provisioning.max_body"),
])
def test_bad_provisioning_keys_are_named(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(body)
    with pytest.raises(config.ConfigError, match=needle):
        config.load(path, environ={})
