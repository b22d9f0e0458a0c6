"""The push service's core over a real SQLite file: the DESIGN §3 rows for the
push registry and the push log, proven on the rows and on the file's bytes.

Wall time is a function of trio's MockClock, so seven days pass in milliseconds
and the purge loop runs exactly as in production.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from push.gateways.log import LogGateway
from push.model import Outcome, PushTarget
from push.service import DAY, DeviceUpdate, PushService, PushSettings, WakeRequest
from push.store import SqliteStore

KEY = b"K" * 32
T0 = 1_790_000_000.0  # a wall-clock origin (2026-09)
TOKEN = "0f" * 32
ALICE = PushTarget("apns", TOKEN, "TEAM123456.com.example.app.voip")
BOB = PushTarget("fcm", "bob-registration-token:APA91b", "example-project")


def service(tmp_path: Path, **settings: float) -> tuple[PushService, LogGateway]:
    gw = LogGateway("apns", device_key=KEY)
    store = SqliteStore(tmp_path / "push.sqlite", KEY, threaded=False)
    svc = PushService(store, {"apns": gw, "fcm": LogGateway("fcm", device_key=KEY)}, KEY,
                      PushSettings(**settings), clock=lambda: T0 + trio.current_time())
    return svc, gw


def update(
    target: PushTarget, ip: str, port: int, serial: str = "0123456789", user: str = "201",
) -> DeviceUpdate:
    return DeviceUpdate(target, serial, user, ip, port, "tls")


def wake(svc: PushService, target: PushTarget, call_id: str = "call-1") -> WakeRequest:
    return WakeRequest(svc.device_id(target), call_id, "100", "201", "203.0.113.7:41000", 30.0)


def file_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.glob("push.sqlite*"))


async def test_an_address_change_replaces_the_old_address_in_the_file(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    await svc.register_device(update(ALICE, "198.51.100.23", 40001))
    assert b"198.51.100.23" in file_bytes(tmp_path)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    (dev,) = await svc.store.devices()
    assert (dev.ip, dev.port, dev.token) == ("192.0.2.77", 50002, TOKEN)
    raw = file_bytes(tmp_path)
    assert b"198.51.100.23" not in raw  # not in the table, the free pages or the WAL
    assert b"192.0.2.77" in raw
    assert TOKEN.encode() not in raw  # the token is sealed at rest
    await svc.aclose()


async def test_push_log_row_is_there_on_day_6_and_gone_at_7_days_and_1_s(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    svc, _ = service(tmp_path, purge_interval=3600.0)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    result = await svc.wake(wake(svc, ALICE))
    assert result.outcome is Outcome.DRY_RUN
    written = T0 + trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.run_purges)
        await trio.sleep_until(6 * DAY)
        assert len(await svc.user_log("0123456789", "201")) == 1
        # A device refreshed daily is not stale; the log row ages regardless.
        await svc.register_device(update(ALICE, "192.0.2.77", 50002))
        await trio.sleep_until(written - T0 + 7 * DAY - 1)
        await svc.purge_once()
        assert len(await svc.user_log("0123456789", "201")) == 1
        await trio.sleep_until(written - T0 + 7 * DAY + 1)
        assert await svc.purge_once() == (1, 0)
        assert await svc.user_log("0123456789", "201") == []
        nursery.cancel_scope.cancel()
    assert b"dry_run" not in file_bytes(tmp_path)  # secure_delete: the row's bytes are gone too
    assert 'pbx_push_purged_total{table="push_log"} 1' in await svc.metrics_text()
    await svc.aclose()


async def test_purge_loop_deletes_expired_rows_by_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    svc, _ = service(tmp_path, purge_interval=600.0, log_retention=7 * DAY, device_stale_after=30 * DAY)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    await svc.wake(wake(svc, ALICE))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.run_purges)
        await trio.sleep(7 * DAY + 601)
        assert await svc.user_log("0123456789", "201") == []
        assert len(await svc.store.devices()) == 1
        await trio.sleep(23 * DAY)  # 30 days without a registration: stale
        assert await svc.store.devices() == []
        nursery.cancel_scope.cancel()
    await svc.aclose()


async def test_one_push_per_call_per_device(tmp_path: Path) -> None:
    svc, gw = service(tmp_path)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    await svc.wake(wake(svc, ALICE, "call-1"))
    again = await svc.wake(wake(svc, ALICE, "call-1"))
    await svc.wake(wake(svc, ALICE, "call-2"))
    assert again.reason == "duplicate"
    assert [m.call_id for m in gw.sent] == ["call-1", "call-2"]
    assert len(await svc.user_log("0123456789", "201")) == 2
    await svc.aclose()


async def test_unknown_device_is_not_pushed_and_is_logged(tmp_path: Path) -> None:
    svc, gw = service(tmp_path)
    result = await svc.wake(wake(svc, ALICE))
    assert result.outcome is Outcome.UNKNOWN_DEVICE
    assert list(gw.sent) == []
    assert (await svc.store.counts())["push_log_rows"] == 1
    await svc.aclose()


async def test_export_and_erase_cover_exactly_one_user(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002, user="201"))
    await svc.register_device(update(BOB, "192.0.2.88", 50003, user="202"))
    await svc.register_device(update(
        PushTarget("apns", "ab" * 32, "TEAM123456.com.example.app.voip"), "192.0.2.99", 50004,
        serial="9999999999", user="201"))  # same username on another PBX: another user
    for t in (ALICE, BOB):
        await svc.wake(wake(svc, t))

    export = await svc.export_user("0123456789", "201")
    assert [d["ip"] for d in export["devices"]] == ["192.0.2.77"]
    assert "token" not in export["devices"][0]
    assert [r["username"] for r in export["push_log"]] == ["201"]

    assert await svc.erase_user("0123456789", "201") == {"devices": 1, "push_log_rows": 1}
    gone = await svc.export_user("0123456789", "201")
    assert (gone["devices"], gone["push_log"]) == ([], [])
    left = await svc.store.devices()
    assert sorted((d.serial, d.username) for d in left) == [("0123456789", "202"), ("9999999999", "201")]
    assert len(await svc.user_log("0123456789", "202")) == 1
    assert b"192.0.2.77" not in file_bytes(tmp_path)
    await svc.aclose()


async def test_unregister_deletes_the_device_row(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    dev = await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    assert await svc.unregister_device(dev.device_id)
    assert await svc.store.devices() == []
    assert not await svc.unregister_device(dev.device_id)
    assert b"192.0.2.77" not in file_bytes(tmp_path)
    await svc.aclose()
