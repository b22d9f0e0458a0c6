"""Bans for guessing PBX secrets: after MAX_FAILURES wrong digests, refused (the right secret too)."""

from __future__ import annotations

import logging

import pytest

from relay.proxy.authbans import FIRST_BAN, MAX_FAILURES, AuthBans
from relay.proxy.flow import Flow
from tests.proxyharness import (
    ADVERTISE,
    SERIAL,
    authorization,
    challenges,
    feed,
    make_proxy,
    one,
    pbx_register,
    register_pbx,
)

GUESSER = Flow("tcp", "203.0.113.66", 40000, ADVERTISE, 5060)
NEIGHBOUR = Flow("tcp", "203.0.113.67", 40001, ADVERTISE, 5060)


def guess(proxy, flow: Flow, now: float, secret: str = "wrong") -> int:  # type: ignore[no-untyped-def]
    first = one(feed(proxy, pbx_register(flow=flow), flow, now))
    if first.status != 401:
        return first.status
    auth = authorization(challenges(first.msg)[0], secret=secret)
    return one(feed(proxy, pbx_register(flow=flow, auth=auth, cseq=2), flow, now)).status


def test_a_guessing_source_is_banned_and_the_right_secret_waits(caplog: pytest.LogCaptureFixture) -> None:
    proxy, _ = make_proxy()
    caplog.set_level(logging.WARNING, "relay.pbx")
    assert [guess(proxy, GUESSER, 1.0) for _ in range(MAX_FAILURES)] == [403] * MAX_FAILURES
    assert proxy.counters.get("pbx_auth_bans_total") == 1
    lines = [r.getMessage() for r in caplog.records if "event=auth_banned" in r.getMessage()]
    assert lines == [f"event=auth_banned source={GUESSER.remote_ip} serial={SERIAL} "
                     f"failures={MAX_FAILURES} seconds={FIRST_BAN:g} transport=tcp"]
    # Banned: even the right secret is refused, without a challenge to work on.
    assert guess(proxy, GUESSER, 2.0, secret="secret") == 403
    assert proxy.counters.get("pbx_auth_refused_total", "banned") >= 1
    # Another source with the right secret is not touched.
    register_pbx(proxy, NEIGHBOUR, now=2.0)
    # The ban runs out: the right secret works again.
    register_pbx(proxy, GUESSER, now=1.0 + FIRST_BAN + 0.1)


def test_a_typo_now_and_then_is_never_banned() -> None:
    proxy, _ = make_proxy()
    for minute in range(3 * MAX_FAILURES):  # one wrong try a minute, for half an hour
        assert guess(proxy, GUESSER, 1.0 + 61.0 * minute) == 403
    assert proxy.counters.get("pbx_auth_bans_total") == 0
    register_pbx(proxy, GUESSER, now=2000.0)


def test_each_ban_of_the_same_source_lasts_twice_as_long() -> None:
    bans = AuthBans(max_failures=2, first_ban=10.0, max_ban=35.0)
    now, lengths = 0.0, []
    for _ in range(4):
        bans.failed("a", now)
        banned = bans.failed("a", now)
        assert banned is not None
        lengths.append(banned.seconds)
        assert bans.banned("a", now + banned.seconds - 0.01) and not bans.banned("a", now + banned.seconds)
        now += banned.seconds
    assert lengths == [10.0, 20.0, 35.0, 35.0]


def test_the_table_of_sources_is_bounded() -> None:
    bans = AuthBans(max_failures=1, max_sources=100)
    for i in range(1000):  # a thousand sources, each banned at once
        bans.failed(f"198.51.100.{i % 256}.{i}", 0.0)
    assert len(bans) == 100
    assert bans.banned("198.51.100.231.999", 1.0)  # the latest are kept
