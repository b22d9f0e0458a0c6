"""The push service's core over a real SQLite file: the DESIGN §3 rows for the
push registry and the push log, proven on the rows and on the file's bytes.
The tests taking ``backend`` run on Redis too (a redis-server of the test), proven
on every key and value it holds (tests/pushstores.py).

Wall time is a function of trio's MockClock, so seven days pass in milliseconds
and the purge loop runs exactly as in production (SQLite only: Redis answers over a
socket, and an autojumping clock would jump past its replies' deadlines).
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from pbxcore.metrics import parse as parse_metrics
from push.gateways.base import Gateway
from push.gateways.log import LogGateway
from push.model import Attempt, Outcome, PushMessage, PushTarget
from push.service import DAY, DeviceUpdate, PushService, PushSettings, WakeRequest
from push.store import SqliteStore, Store, TokenBox
from tests.pushstores import Backend, backend, store

__all__ = ["backend", "store"]  # fixtures

KEY = b"K" * 32
T0 = 1_790_000_000.0  # a wall-clock origin (2026-09)
TOKEN = "0f" * 32
ALICE = PushTarget("apns", TOKEN, "TEAM123456.com.example.app.voip")
BOB = PushTarget("fcm", "bob-registration-token:APA91b", "example-project")


SERIAL, OTHER = "0123456789", "9999999999"


class ScriptedGateway:
    """An APNs stand-in answering every push with one Attempt, after ``gate`` opens."""

    provider = "apns"

    def __init__(self, kind: str = "ok", status: int | None = 200, reason: str = "",
                 gate: trio.Event | None = None):
        self.answer = Attempt(kind, status, reason)
        self.gate = gate
        self.sent: list[PushMessage] = []

    async def send_once(self, msg: PushMessage) -> Attempt:
        self.sent.append(msg)
        if self.gate is not None:
            await self.gate.wait()
        return self.answer

    def credentials_expired(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def service(tmp_path: Path, apns: Gateway | None = None, store: Store | None = None,
            **settings: float) -> tuple[PushService, LogGateway]:
    gw = LogGateway("apns", device_key=KEY)
    store = store or SqliteStore(tmp_path / "push.sqlite", KEY, threaded=False)
    svc = PushService(store, {"apns": apns or gw, "fcm": LogGateway("fcm", device_key=KEY)}, KEY,
                      PushSettings(**settings), clock=lambda: T0 + trio.current_time())
    return svc, gw


def update(
    target: PushTarget, ip: str, port: int, serial: str = "0123456789", user: str = "201",
) -> DeviceUpdate:
    return DeviceUpdate(target, serial, user, ip, port, "tls")


def wake(
    svc: PushService, target: PushTarget, call_id: str = "call-1", serial: str = SERIAL, user: str = "201",
    ring_timeout: float = 30.0,
) -> WakeRequest:
    return WakeRequest(svc.device_id(target, serial, user), call_id, "100", "201", "203.0.113.7:41000",
                       ring_timeout, serial=serial)


def file_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.glob("push.sqlite*"))


async def test_an_address_change_replaces_the_old_address_in_the_file(
    tmp_path: Path, backend: Backend, store: Store,
) -> None:
    svc, _ = service(tmp_path, store=store)
    await svc.register_device(update(ALICE, "198.51.100.23", 40001))
    assert b"198.51.100.23" in await backend.held()
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    (dev,) = await svc.store.devices()
    assert (dev.ip, dev.port, dev.token) == ("192.0.2.77", 50002, TOKEN)
    raw = await backend.held()
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
    assert parse_metrics(await svc.metrics_text())['pbx_push_purged_total{table="push_log"}'] == 1
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


async def test_one_push_per_call_per_device(tmp_path: Path, backend: Backend, store: Store) -> None:
    svc, gw = service(tmp_path, store=store)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    await svc.wake(wake(svc, ALICE, "call-1"))
    again = await svc.wake(wake(svc, ALICE, "call-1"))
    await svc.wake(wake(svc, ALICE, "call-2"))
    assert again.reason == "duplicate"
    assert [m.call_id for m in gw.sent] == ["call-1", "call-2"]
    assert len(await svc.user_log("0123456789", "201")) == 2
    await svc.aclose()


async def test_unknown_device_is_not_pushed_and_is_logged(
    tmp_path: Path, backend: Backend, store: Store,
) -> None:
    svc, gw = service(tmp_path, store=store)
    result = await svc.wake(wake(svc, ALICE))
    assert result.outcome is Outcome.UNKNOWN_DEVICE
    assert list(gw.sent) == []
    assert (await svc.store.counts())["push_log_rows"] == 1
    await svc.aclose()


async def test_export_and_erase_cover_exactly_one_user(
    tmp_path: Path, backend: Backend, store: Store,
) -> None:
    svc, _ = service(tmp_path, store=store)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002, user="201"))
    await svc.register_device(update(BOB, "192.0.2.88", 50003, user="202"))
    await svc.register_device(update(
        PushTarget("apns", "ab" * 32, "TEAM123456.com.example.app.voip"), "192.0.2.99", 50004,
        serial="9999999999", user="201"))  # same username on another PBX: another user
    await svc.wake(wake(svc, ALICE))
    await svc.wake(wake(svc, BOB, user="202"))

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
    assert b"192.0.2.77" not in await backend.held()
    await svc.aclose()


async def test_unregister_deletes_the_device_row(tmp_path: Path, backend: Backend, store: Store) -> None:
    svc, _ = service(tmp_path, store=store)
    dev = await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    assert await svc.unregister_device(dev.device_id)
    assert await svc.store.devices() == []
    assert not await svc.unregister_device(dev.device_id)
    assert b"192.0.2.77" not in await backend.held()
    await svc.aclose()


# ------------------------------------------------------------------ devices: one per (target, PBX, user)


async def test_one_phone_on_two_pbxs_is_two_devices(tmp_path: Path, backend: Backend, store: Store) -> None:
    svc, gw = service(tmp_path, store=store)
    mine = await svc.register_device(update(ALICE, "192.0.2.77", 50002, serial=SERIAL, user="201"))
    theirs = await svc.register_device(update(ALICE, "192.0.2.88", 50003, serial=OTHER, user="301"))
    assert mine.device_id != theirs.device_id
    # Each REGISTER updates its own row: nothing flips between the two accounts.
    await svc.register_device(update(ALICE, "192.0.2.77", 50002, serial=SERIAL, user="201"))
    rows = {(d.serial, d.username, d.ip) for d in await svc.store.devices()}
    assert rows == {(SERIAL, "201", "192.0.2.77"), (OTHER, "301", "192.0.2.88")}
    # Same PBX, another user with the same app on the same phone: a third device.
    assert (await svc.register_device(update(ALICE, "192.0.2.77", 50002, user="202"))).device_id not in (
        mine.device_id, theirs.device_id)
    # A de-registration at one PBX leaves the other account's device alone.
    assert await svc.unregister_device(svc.device_id(ALICE, SERIAL, "201"))
    assert (await svc.store.get_device(theirs.device_id)) is not None
    assert (await svc.wake(wake(svc, ALICE, serial=OTHER, user="301"))).outcome is Outcome.DRY_RUN
    assert (await svc.wake(wake(svc, ALICE, serial=SERIAL, user="201"))).outcome is Outcome.UNKNOWN_DEVICE
    assert [m.device_id for m in gw.sent] == [theirs.device_id]
    await svc.aclose()


def test_device_ids_do_not_collide_across_field_boundaries() -> None:
    assert ALICE.device_id(KEY, "a|b", "c") != ALICE.device_id(KEY, "a", "b|c")
    assert ALICE.device_id(KEY, SERIAL, "201") != ALICE.device_id(KEY, SERIAL, "202")
    # keyed: without the service's key nobody can tell which token an id stands for
    assert ALICE.device_id(KEY, SERIAL, "201") != ALICE.device_id(b"another key" * 3, SERIAL, "201")
    assert ALICE.token not in ALICE.device_id(KEY, SERIAL, "201")


async def test_a_wake_for_another_pbx_s_device_is_refused(
    tmp_path: Path, backend: Backend, store: Store,
) -> None:
    svc, gw = service(tmp_path, store=store)
    dev = await svc.register_device(update(ALICE, "192.0.2.77", 50002, serial=OTHER))
    req = WakeRequest(dev.device_id, "call-1", "100", "201", "203.0.113.7:41000", 30.0, serial=SERIAL)
    result = await svc.wake(req)
    assert result.outcome is Outcome.UNKNOWN_DEVICE
    assert list(gw.sent) == []
    (row,) = await svc.user_log(SERIAL, "")  # logged for the asking PBX, nothing of the other's user
    assert (row["outcome"], row["dst"]) == ("unknown_device", "")
    await svc.aclose()


async def test_devices_of_the_old_schema_are_rekeyed_on_open(tmp_path: Path) -> None:
    """Before schema 1 a device id was HMAC(provider|param|token): a phone asleep during
    the upgrade must still be found (and its token open) under its new id."""
    path = tmp_path / "push.sqlite"
    SqliteStore(path, KEY, threaded=False)._db.close()
    old_id = hmac.new(KEY, f"apns|{ALICE.param}|{TOKEN}".encode(), hashlib.sha256).hexdigest()[:32]
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (old_id, "apns", ALICE.param, TokenBox(KEY).seal(TOKEN, old_id), SERIAL, "201",
                    "192.0.2.77", 50002, "tls", T0))
        db.execute("PRAGMA user_version = 0")
    db.close()
    svc, gw = service(tmp_path)
    (dev,) = await svc.store.devices()
    assert dev.device_id == svc.device_id(ALICE, SERIAL, "201") != old_id
    assert dev.token == TOKEN
    assert (await svc.wake(wake(svc, ALICE))).outcome is Outcome.DRY_RUN
    await svc.aclose()
    svc, _ = service(tmp_path)  # opened again: nothing more to do
    assert [d.device_id for d in await svc.store.devices()] == [dev.device_id]
    await svc.aclose()


# ------------------------------------------------------------------ one push per call


async def test_a_duplicate_answers_what_the_first_push_came_to(
    tmp_path: Path, backend: Backend, store: Store,
) -> None:
    refusing = ScriptedGateway("rejected", 400, "BadTopic")
    svc, _ = service(tmp_path, apns=refusing, store=store)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    first = await svc.wake(wake(svc, ALICE))
    again = await svc.wake(wake(svc, ALICE))
    assert first.outcome is Outcome.REJECTED
    assert (again.outcome, again.status, again.reason) == (Outcome.REJECTED, 400, "duplicate")
    assert again.attempts == 0  # nothing sent for the second ask
    assert len(refusing.sent) == 1
    await svc.aclose()


async def test_a_duplicate_waits_for_the_push_in_flight(tmp_path: Path) -> None:
    gate = trio.Event()
    gw = ScriptedGateway("ok", 200, gate=gate)
    svc, _ = service(tmp_path, apns=gw)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    results: list[Outcome] = []

    async def ask() -> None:
        results.append((await svc.wake(wake(svc, ALICE))).outcome)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert results == [] and len(gw.sent) == 1  # the second waits, it does not answer "sent"
        gate.set()
    assert results == [Outcome.SENT, Outcome.SENT]
    assert len(gw.sent) == 1
    await svc.aclose()


async def test_a_duplicate_waits_no_longer_than_its_own_ring_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    gw = ScriptedGateway("ok", 200, gate=trio.Event())  # never answers: the first runs to its deadline
    svc, _ = service(tmp_path, apns=gw)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.wake, wake(svc, ALICE, ring_timeout=30.0))
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        second = await svc.wake(wake(svc, ALICE, ring_timeout=5.0))
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert second.outcome is Outcome.FAILED and second.reason.startswith("duplicate")
    assert len(gw.sent) == 1
    await svc.aclose()


async def test_a_cancelled_wake_leaves_no_key_behind(tmp_path: Path, backend: Backend, store: Store) -> None:
    gate = trio.Event()
    gw = ScriptedGateway("ok", 200, gate=gate)
    svc, _ = service(tmp_path, apns=gw, store=store)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    with trio.move_on_after(0.05):
        await svc.wake(wake(svc, ALICE))
    assert len(gw.sent) == 1
    gate.set()
    again = await svc.wake(wake(svc, ALICE))
    assert (again.outcome, again.reason, again.attempts) == (Outcome.SENT, "", 1)
    assert len(gw.sent) == 2  # really pushed this time
    await svc.aclose()


async def test_a_duplicate_waiting_on_a_cancelled_wake_pushes_itself(tmp_path: Path) -> None:
    gate = trio.Event()
    gw = ScriptedGateway("ok", 200, gate=gate)
    svc, _ = service(tmp_path, apns=gw)
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))
    results: list[tuple[Outcome, str]] = []

    async def second() -> None:
        r = await svc.wake(wake(svc, ALICE))
        results.append((r.outcome, r.reason))

    first_scope = trio.CancelScope()

    async def first() -> None:
        with first_scope:
            await svc.wake(wake(svc, ALICE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert len(gw.sent) == 1
        first_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert len(gw.sent) == 2  # the waiting ask took over
        gate.set()
    assert results == [(Outcome.SENT, "")]
    await svc.aclose()


# ------------------------------------------------------------------ the WAL and other readers


def _reader(tmp_path: Path) -> sqlite3.Connection:
    """Another connection in a read transaction (the sqlite3 shell, a backup)."""
    db = sqlite3.connect(tmp_path / "push.sqlite", isolation_level=None)
    db.execute("BEGIN")
    assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == 1
    return db


@pytest.mark.parametrize("later", ["purge", "write"])
async def test_a_reader_does_not_stall_the_store_and_the_old_address_goes_later(
    tmp_path: Path, later: str,
) -> None:
    svc, _ = service(tmp_path)
    assert isinstance(svc.store, SqliteStore)
    await svc.register_device(update(ALICE, "198.51.100.23", 40001))
    reader = _reader(tmp_path)
    t0 = time.monotonic()
    await svc.register_device(update(ALICE, "192.0.2.77", 50002))  # moved: checkpoint, reader in the way
    assert time.monotonic() - t0 < 1.0  # not sqlite's 5 s busy timeout
    counts = await svc.store.counts()
    assert counts["wal_checkpoint_pending"] == 1 and counts["wal_checkpoint_failures_total"] >= 1
    assert b"198.51.100.23" in file_bytes(tmp_path)  # pinned by the reader (what the docstring says)
    t0 = time.monotonic()
    await svc.register_device(update(BOB, "192.0.2.88", 50003))  # within CHECKPOINT_RETRY: no new wait
    assert time.monotonic() - t0 < 0.09  # under CHECKPOINT_BUSY_MS: no checkpoint tried
    reader.close()

    if later == "purge":
        await svc.purge_once()  # nothing to purge, but the pending checkpoint is retried
    else:
        svc.store.checkpoint_retry = 0.0
        await svc.wake(wake(svc, BOB, user="201"))  # any write retries it (here: the push log row)
    assert b"198.51.100.23" not in file_bytes(tmp_path)
    assert b"192.0.2.77" in file_bytes(tmp_path)
    assert (await svc.store.counts())["wal_checkpoint_pending"] == 0
    assert parse_metrics(await svc.metrics_text())["pbx_push_wal_checkpoint_failures_total"] == 1
    await svc.aclose()


# ------------------------------------------------------------------ one push per call, two workers


async def _two_workers(backend: Backend, first: ScriptedGateway, second: ScriptedGateway,
                       ) -> tuple[PushService, PushService]:
    """Two services (two workers' stores) on the same Redis; the device registered through one."""
    a, b = backend.open(KEY), backend.open(KEY)
    svc_a = PushService(a, {"apns": first}, KEY, clock=time.time)
    svc_b = PushService(b, {"apns": second}, KEY, clock=time.time)
    return svc_a, svc_b


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_second_worker_does_not_push_a_call_the_first_pushed(backend: Backend) -> None:
    first, second = ScriptedGateway("rejected", 400, "BadTopic"), ScriptedGateway()
    svc_a, svc_b = await _two_workers(backend, first, second)
    async with svc_a.store.session(), svc_b.store.session():
        await svc_a.register_device(update(ALICE, "192.0.2.77", 50002))
        assert (await svc_a.wake(wake(svc_a, ALICE))).outcome is Outcome.REJECTED
        again = await svc_b.wake(wake(svc_b, ALICE))
        assert (again.outcome, again.status, again.reason, again.attempts) == (
            Outcome.REJECTED, 400, "duplicate", 0)
        assert (await svc_b.wake(wake(svc_b, ALICE, "call-2"))).outcome is Outcome.SENT  # another call
        assert (len(first.sent), len(second.sent)) == (1, 1)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_second_worker_waits_for_the_first_worker_s_push_in_flight(backend: Backend) -> None:
    gate = trio.Event()
    first, second = ScriptedGateway("ok", 200, gate=gate), ScriptedGateway()
    svc_a, svc_b = await _two_workers(backend, first, second)
    results: list[tuple[str, Outcome, str]] = []

    async def ask(name: str, svc: PushService) -> None:
        r = await svc.wake(wake(svc, ALICE))
        results.append((name, r.outcome, r.reason))

    async with svc_a.store.session(), svc_b.store.session():
        await svc_a.register_device(update(ALICE, "192.0.2.77", 50002))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "a", svc_a)
            while not first.sent:
                await trio.sleep(0.01)
            nursery.start_soon(ask, "b", svc_b)
            await trio.sleep(0.3)
            assert results == []  # b waits for a's push, it does not answer by itself
            gate.set()
        assert sorted(results) == [("a", Outcome.SENT, ""), ("b", Outcome.SENT, "duplicate")]
        assert (len(first.sent), len(second.sent)) == (1, 0)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_wake_cancelled_on_one_worker_lets_the_other_push(backend: Backend) -> None:
    first, second = ScriptedGateway("ok", 200, gate=trio.Event()), ScriptedGateway()
    svc_a, svc_b = await _two_workers(backend, first, second)
    async with svc_a.store.session(), svc_b.store.session():
        await svc_a.register_device(update(ALICE, "192.0.2.77", 50002))
        with trio.move_on_after(0.2):
            await svc_a.wake(wake(svc_a, ALICE))  # its caller went away before an answer
        assert len(first.sent) == 1
        again = await svc_b.wake(wake(svc_b, ALICE))
        assert (again.outcome, again.reason, again.attempts) == (Outcome.SENT, "", 1)
        assert len(second.sent) == 1
