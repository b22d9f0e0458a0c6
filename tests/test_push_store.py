"""The Store contract, run on both stores (SQLite, Redis on a real redis-server), and
what only Redis does: every key expires, Redis drops push log rows 7 days after they
were written at the latest, and a server that does not answer is a typed error.
"""

from __future__ import annotations

import time

import pytest
import trio

from push.model import PushTarget
from push.redisstore import MAX_LOG_TTL, RedisStore
from push.store import Device, LogRow, Store, StoreUnavailable
from tests.pushstores import KEY_PREFIX, Backend, backend, redis_contents, redis_ttls, store

__all__ = ["backend", "store"]  # fixtures

KEY = b"K" * 32
T0 = time.time()
DAY = 86400.0
TOKEN = "0f" * 32
FCM_TOKEN = "bob-registration-token:APA91bXyZ"


def device(serial: str = "0123456789", user: str = "201", ip: str = "192.0.2.77", port: int = 50002,
           token: str = TOKEN, at: float = T0) -> Device:
    target = PushTarget("apns", token, "TEAM123456.com.example.app.voip")
    return Device(target.device_id(KEY, serial, user), "apns", target.param, token, serial, user, ip, port,
                  "tls", at)


def row(at: float, serial: str = "0123456789", user: str = "201", outcome: str = "sent") -> LogRow:
    return LogRow(at, serial, user, "100", user, "203.0.113.7:5060", "192.0.2.1:50002", "apns", "dev",
                  outcome, 200, "", 1, 12.5)


async def test_an_upsert_replaces_the_address_and_says_when_it_moved(store: Store, backend: Backend) -> None:
    d = device(ip="198.51.100.23", port=40001)
    assert await store.upsert_device(d, T0 + 30 * DAY) is False  # new
    assert await store.upsert_device(d, T0 + 30 * DAY) is False  # same address
    assert b"198.51.100.23" in await backend.held()
    moved = device(ip="192.0.2.77", port=50002)
    assert moved.device_id == d.device_id
    assert await store.upsert_device(moved, T0 + 30 * DAY) is True
    got = await store.get_device(d.device_id)
    assert got is not None and (got.ip, got.port, got.token) == ("192.0.2.77", 50002, TOKEN)
    assert [x.ip for x in await store.devices()] == ["192.0.2.77"]
    held = await backend.held()
    assert b"198.51.100.23" not in held  # the old address is gone, not kept beside the new one
    assert TOKEN.encode() not in held  # sealed


async def test_devices_by_pbx_and_user(store: Store) -> None:
    mine, same_user_other_pbx = device(), device(serial="9999999999", token="ab" * 32)
    other_user = device(user="202", token="cd" * 32)
    for d in (mine, same_user_other_pbx, other_user):
        await store.upsert_device(d, T0 + 30 * DAY)
    ids = sorted(d.device_id for d in (mine, same_user_other_pbx, other_user))
    assert [d.device_id for d in await store.devices()] == ids
    assert [d.device_id for d in await store.devices("0123456789", "201")] == [mine.device_id]
    assert sorted(d.device_id for d in await store.devices("0123456789")) == sorted(
        [mine.device_id, other_user.device_id])
    assert sorted(d.device_id for d in await store.devices(username="201")) == sorted(
        [mine.device_id, same_user_other_pbx.device_id])
    assert await store.get_device("no-such-device") is None
    assert (await store.counts())["devices"] == 3


async def test_delete_device(store: Store, backend: Backend) -> None:
    d = device()
    await store.upsert_device(d, T0 + 30 * DAY)
    assert await store.delete_device(d.device_id) is True
    assert await store.delete_device(d.device_id) is False
    assert await store.get_device(d.device_id) is None
    assert await store.devices() == [] and await store.devices("0123456789") == []
    assert (await store.counts())["devices"] == 0
    assert b"192.0.2.77" not in await backend.held()


async def test_log_rows_of_a_user_in_the_order_written(store: Store) -> None:
    await store.add_log(row(T0 + 2, outcome="second"), T0 + 2 + 7 * DAY)
    await store.add_log(row(T0 + 1, outcome="first"), T0 + 1 + 7 * DAY)
    await store.add_log(row(T0 + 2, outcome="third"), T0 + 2 + 7 * DAY)  # same instant: after "second"
    await store.add_log(row(T0 + 3, user="202"), T0 + 3 + 7 * DAY)
    await store.add_log(row(T0 + 4, user="", outcome="unknown_device"), T0 + 4 + 7 * DAY)
    assert [r.outcome for r in await store.log_rows("0123456789", "201")] == ["first", "second", "third"]
    (r,) = await store.log_rows("0123456789", "202")
    assert r == row(T0 + 3, user="202")  # every field back as written
    assert [r.outcome for r in await store.log_rows("0123456789", "")] == ["unknown_device"]
    assert (await store.counts())["push_log_rows"] == 5


async def test_purge_deletes_old_rows_and_stale_devices_only(store: Store) -> None:
    await store.add_log(row(T0 - 8 * DAY), T0 - DAY)
    await store.add_log(row(T0 - 6 * DAY), T0 + DAY)
    stale, fresh = device(at=T0 - 31 * DAY), device(user="202", token="cd" * 32, at=T0 - 29 * DAY)
    await store.upsert_device(stale, T0 + DAY)  # (Redis keeps it a day: the purge is what deletes it)
    await store.upsert_device(fresh, T0 + DAY)
    assert await store.purge(T0 - 7 * DAY, T0 - 30 * DAY) == (1, 1)
    assert len(await store.log_rows("0123456789", "201")) == 1
    assert [d.device_id for d in await store.devices()] == [fresh.device_id]
    assert await store.devices("0123456789", "201") == []
    assert await store.purge(T0 - 7 * DAY, T0 - 30 * DAY) == (0, 0)
    counts = await store.counts()
    assert (counts["devices"], counts["push_log_rows"]) == (1, 1)


async def test_erase_user_covers_exactly_one_user(store: Store, backend: Backend) -> None:
    alice, bob = device(ip="192.0.2.77"), device(user="202", token="cd" * 32, ip="192.0.2.88")
    alice_elsewhere = device(serial="9999999999", token="ab" * 32, ip="192.0.2.99")
    for d in (alice, bob, alice_elsewhere):
        await store.upsert_device(d, T0 + 30 * DAY)
    for r in (row(T0), row(T0 + 1), row(T0, user="202"), row(T0, serial="9999999999")):
        await store.add_log(r, T0 + 7 * DAY)
    assert await store.erase_user("0123456789", "201") == (1, 2)
    assert await store.devices("0123456789", "201") == []
    assert await store.log_rows("0123456789", "201") == []
    assert sorted(d.ip for d in await store.devices()) == ["192.0.2.88", "192.0.2.99"]
    assert len(await store.log_rows("0123456789", "202")) == 1
    assert len(await store.log_rows("9999999999", "201")) == 1
    assert b"192.0.2.77" not in await backend.held()
    assert await store.erase_user("0123456789", "201") == (0, 0)


async def test_a_second_store_on_the_same_data_sees_everything(store: Store, backend: Backend) -> None:
    """Two workers (Redis) or a restart (SQLite): the data is the store's, not the process's."""
    d = device(token=FCM_TOKEN)
    await store.upsert_device(d, T0 + 30 * DAY)
    await store.add_log(row(T0), T0 + 7 * DAY)
    other = backend.open(KEY)
    async with other.session():
        got = await other.get_device(d.device_id)
        assert got is not None and got.token == FCM_TOKEN
        assert len(await other.log_rows("0123456789", "201")) == 1
    await other.aclose()


# ------------------------------------------------------------------ Redis only


@pytest.fixture
def redis_backend(backend: Backend) -> Backend:
    assert backend.kind == "redis"
    return backend


redis_only = pytest.mark.parametrize("backend", ["redis"], indirect=True)


@redis_only
async def test_no_token_in_clear_anywhere_in_redis(store: Store, redis_backend: Backend) -> None:
    await store.upsert_device(device(token=TOKEN), T0 + 30 * DAY)
    await store.upsert_device(device(user="202", token=FCM_TOKEN), T0 + 30 * DAY)
    await store.add_log(row(T0), T0 + 7 * DAY)
    contents = await redis_contents(redis_backend.url)
    assert contents and all(k.startswith(KEY_PREFIX) for k in contents)
    everything = repr(contents)
    for token in (TOKEN, FCM_TOKEN, "APA91b"):
        assert token not in everything
    assert TOKEN.upper() not in everything
    assert (await store.get_device(device(user="202", token=FCM_TOKEN).device_id)) is not None


@redis_only
async def test_every_key_expires_and_log_rows_within_7_days(store: Store, redis_backend: Backend) -> None:
    await store.upsert_device(device(), T0 + 30 * DAY)
    await store.add_log(row(T0), T0 + 7 * DAY)
    await store.add_log(row(T0, user="202"), T0 + 30 * DAY)  # asked for more than 7 days: capped
    await store.add_log(row(T0, user="203"), T0 + 2 * DAY)  # a shortened retention is honoured
    ttls = await redis_ttls(redis_backend.url)
    assert ttls and all(t > 0 for t in ttls.values()), ttls  # no key without an expiry
    rows = {k: t for k, t in ttls.items() if k.startswith(KEY_PREFIX + "log:")}
    assert len(rows) == 3 and all(t <= MAX_LOG_TTL * 1000 for t in rows.values())
    assert min(rows.values()) <= 2 * DAY * 1000 < min(t for t in rows.values() if t > 2 * DAY * 1000)
    logs_index = ttls[KEY_PREFIX + "logs"]
    assert 7 * DAY * 1000 - 60_000 < logs_index <= 7 * DAY * 1000  # the index lives as long as its rows
    (dev,) = (t for k, t in ttls.items() if k.startswith(KEY_PREFIX + "dev:"))
    assert 30 * DAY * 1000 - 60_000 < dev <= 30 * DAY * 1000


@redis_only
async def test_rows_and_devices_vanish_when_redis_expires_them(store: Store, redis_backend: Backend) -> None:
    """No purge runs: Redis's expiry alone removes the rows, and reads drop what points at them."""
    now = time.time()
    await store.add_log(row(now), now + 0.3)
    await store.add_log(row(now + 5, user="202"), now + 65)
    await store.upsert_device(device(at=now), now + 0.3)
    assert len(await store.log_rows("0123456789", "201")) == 1
    await trio.sleep(0.6)
    assert await store.log_rows("0123456789", "201") == []
    assert await store.get_device(device().device_id) is None
    assert await store.devices("0123456789", "201") == []
    assert await store.devices() == []
    contents = await redis_contents(redis_backend.url)
    assert not any(k.startswith((KEY_PREFIX + "dev:", KEY_PREFIX + "udev:", KEY_PREFIX + "sdev:"))
                   and v for k, v in contents.items()), contents
    assert KEY_PREFIX + "ulog:10:0123456789:201" not in contents  # expired with its last row
    assert len([k for k in contents if k.startswith(KEY_PREFIX + "log:")]) == 1  # user 202's
    assert (await store.counts())["devices"] == 0
    # The global log index still names the expired row until it passes the retention.
    assert await store.purge(now + 1, now - 30 * DAY) == (1, 0)
    assert (await store.counts())["push_log_rows"] == 1


@redis_only
async def test_redis_down_is_a_typed_error_and_back_up_works(redis_backend: Backend) -> None:
    assert redis_backend.redis is not None
    store = RedisStore.from_url(redis_backend.url, KEY, timeout=0.5)
    async with store.session():
        await store.upsert_device(device(), T0 + 30 * DAY)
        redis_backend.redis.stop()
        t0 = trio.current_time()
        with pytest.raises(StoreUnavailable):
            await store.get_device(device().device_id)
        with pytest.raises(StoreUnavailable):
            await store.counts()
        assert trio.current_time() - t0 < 2.0
        redis_backend.redis.start()  # same port, empty (no persistence)
        assert await store.get_device(device().device_id) is None
        await store.upsert_device(device(), T0 + 30 * DAY)
        assert (await store.counts())["devices"] == 1
