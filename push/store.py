"""Where the push service keeps its two tables: devices and the push log.

DESIGN §3 rows enforced here:
- device: one row per device — a push target registered by one user at one PBX —
  keyed by its id (an HMAC of provider, pn-param, token, PBX serial and username:
  :meth:`push.model.PushTarget.device_id`); an update *replaces* the address. The
  token is kept encrypted (AES-GCM with the service's key): it never lies on disk
  in clear.
- push log: one row per push; rows older than the retention are deleted by
  :meth:`Store.purge`. Never a message body.

``Store`` is the interface, with two implementations: ``SqliteStore`` here, the
embedded default (sqlite3 in a worker thread, one call at a time), and
:class:`push.redisstore.RedisStore`, shared by several pbx-push processes, where
Redis's own key expiry enforces the retention (``upsert_device`` and ``add_log`` get
the row's expiry; SQLite has none and relies on ``purge``).

What is left in the database files: ``secure_delete`` overwrites deleted rows, and
an address change, a delete, an erasure and a purge checkpoint the WAL and truncate
it, so with no other connection open the old address is gone from the files when
the call returns. Another connection in a read transaction (the sqlite3 shell, a
backup) pins the WAL: the checkpoint then waits at most ``CHECKPOINT_BUSY_MS``,
the call returns, and the old address stays in ``-wal`` (and may be in the main
file, in the page version the reader sees) until a later checkpoint succeeds. A
pending checkpoint is retried by the next write (at most once per
``CHECKPOINT_RETRY`` seconds, so a long backup does not slow every call) and by
every purge; failures are counted (``wal_checkpoint_failures_total``) and a pending
one shows as ``wal_checkpoint_pending 1`` in :meth:`Store.counts`.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pbxcore.errors import PbxError
from push.model import PushTarget

T = TypeVar("T")
log = logging.getLogger("push")

# How long a statement waits for another connection's lock (ms): sqlite3's default.
BUSY_TIMEOUT_MS = 5000
# How long a WAL checkpoint waits for other connections' readers (ms). Short: every
# store call waits behind it (one call at a time), and a failed one is retried later.
CHECKPOINT_BUSY_MS = 100
# Seconds between retries of a pending checkpoint by ordinary writes (purges always retry).
CHECKPOINT_RETRY = 1.0
# PRAGMA user_version. 1: device ids cover the PBX serial and the username.
SCHEMA_VERSION = 1


@dataclass(slots=True)
class Device:
    device_id: str
    provider: str
    param: str
    token: str  # in clear in memory only; encrypted in the store
    serial: str  # the PBX the device's user belongs to
    username: str  # the user part of the registered address-of-record
    ip: str
    port: int
    transport: str
    updated_at: float  # wall clock, Unix seconds

    def public(self) -> dict[str, Any]:
        """What the API, exports and logs may show: everything but the token."""
        d = asdict(self)
        del d["token"]
        return d


@dataclass(slots=True)
class LogRow:
    at: float  # wall clock, Unix seconds
    serial: str
    username: str
    caller: str
    callee: str
    src: str  # "ip:port" the call came from (the PBX)
    dst: str  # "ip:port" of the device's last known address
    provider: str
    device_id: str
    outcome: str
    status: int | None
    reason: str
    attempts: int
    latency_ms: float


LOG_FIELDS = tuple(f.name for f in fields(LogRow))


@dataclass(frozen=True, slots=True)
class PushClaim:
    """What a store knows of a (device, call) push another process claimed."""

    outcome: str | None  # None while that push is in flight
    status: int | None = None


class StoreUnavailable(PbxError):
    """The store did not answer in time (a shared store's server is down or stalled)."""


class Store(Protocol):
    def session(self) -> AbstractAsyncContextManager[None]:
        """Keep the store's connections open for the block; the service runs inside one."""
        ...

    async def upsert_device(self, device: Device, expires_at: float | None = None) -> bool:
        """Insert or replace; True when the address (ip, port, transport) changed, the old
        address gone. ``expires_at``: when the device goes if not registered again
        (wall clock; a store without expiry leaves that to ``purge``)."""
        ...

    async def get_device(self, device_id: str) -> Device | None: ...

    async def delete_device(self, device_id: str) -> bool: ...

    async def devices(self, serial: str | None = None, username: str | None = None) -> list[Device]: ...

    async def add_log(self, row: LogRow, expires_at: float, claim: str | None = None) -> None:
        """Write a push log row kept until ``expires_at``. With ``claim``, the row's outcome
        and status are also what that claimed push came to (:meth:`push_claimed`), in the
        same round trip where the store can."""
        ...

    async def log_rows(self, serial: str, username: str) -> list[LogRow]: ...

    async def purge(self, log_before: float, devices_before: float) -> tuple[int, int]:
        """Delete log rows older than ``log_before`` and devices not updated since
        ``devices_before``; return (log rows, devices) deleted."""
        ...

    async def erase_user(self, serial: str, username: str) -> tuple[int, int]:
        """Delete everything held about a user; return (devices, log rows) deleted."""
        ...

    async def counts(self) -> dict[str, int]:
        """Gauges for /metrics: at least ``devices`` and ``push_log_rows``."""
        ...

    # One push per (device, call) across processes sharing the store (DESIGN §2). ``claim``
    # names the pair; a store used by one process only may claim always (the service
    # also keeps the rule in memory, which is all one process needs).
    async def claim_push(self, claim: str, ttl: float) -> bool:
        """True when this process is the first to push for ``claim`` within ``ttl`` s."""
        ...

    async def device_for_push(self, device_id: str, claim: str, ttl: float) -> tuple[Device | None, bool]:
        """:meth:`get_device` and, when the device exists, :meth:`claim_push` — in one
        round trip where the store can."""
        ...

    async def push_claimed(self, claim: str) -> PushClaim | None:
        """What another process's claim came to; None when nobody holds ``claim``."""
        ...

    async def release_push(self, claim: str) -> None:
        """Give a claim up (its push was cancelled before it ended): the next ask pushes."""
        ...

    async def aclose(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    param TEXT NOT NULL,
    token BLOB NOT NULL,
    serial TEXT NOT NULL,
    username TEXT NOT NULL,
    ip TEXT NOT NULL,
    port INTEGER NOT NULL,
    transport TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_user ON devices (serial, username);
CREATE INDEX IF NOT EXISTS devices_updated ON devices (updated_at);
CREATE TABLE IF NOT EXISTS push_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    serial TEXT NOT NULL,
    username TEXT NOT NULL,
    caller TEXT NOT NULL,
    callee TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    provider TEXT NOT NULL,
    device_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS push_log_at ON push_log (at);
CREATE INDEX IF NOT EXISTS push_log_user ON push_log (serial, username);
"""


class TokenBox:
    """AES-256-GCM for tokens at rest; the device id is the associated data, so a
    ciphertext moved to another row does not decrypt."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key[:32])

    def seal(self, token: str, device_id: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, token.encode(), device_id.encode())

    def open(self, blob: bytes, device_id: str) -> str:
        return self._aead.decrypt(blob[:12], blob[12:], device_id.encode()).decode()


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode.

    ``key`` is the service key: it seals tokens, and re-keys devices of an older
    schema (:meth:`_migrate`). ``threaded=False`` runs each query inline (tests on
    a MockClock, where a worker thread would let the clock jump mid-query)."""

    def __init__(self, path: Path, key: bytes, *, threaded: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._box = TokenBox(key)
        self._threaded = threaded
        self._limiter = trio.CapacityLimiter(1)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        self.checkpoint_retry = CHECKPOINT_RETRY
        self.checkpoint_failures = 0
        self._checkpoint_pending = False
        self._checkpoint_tried = -math.inf  # time.monotonic() of the last attempt
        self._closed = False
        self._migrate(key)

    def _migrate(self, key: bytes) -> None:
        """Schema 0 → 1: device ids were an HMAC of the push target alone (one row for
        a phone with accounts on two PBXs); now they also cover serial and username.
        Each row gets its new id and its token is sealed again under it (the id is
        the seal's associated data), so phones asleep during the upgrade can still be
        woken. A row whose token does not open is left as it is (stale, purged)."""
        db = self._db
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        rekeyed = 0
        with db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT device_id, provider, param, token, serial, username FROM devices").fetchall()
            for old_id, provider, param, blob, serial, username in rows:
                try:
                    token = self._box.open(blob, old_id)
                except (InvalidTag, ValueError):
                    continue
                new_id = PushTarget(provider, token, param).device_id(key, serial, username)
                if new_id != old_id:
                    db.execute("UPDATE devices SET device_id = ?, token = ? WHERE device_id = ?",
                               (new_id, self._box.seal(token, new_id), old_id))
                    rekeyed += 1
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if rekeyed:
            log.info("event=store_migrated schema=%d devices_rekeyed=%d", SCHEMA_VERSION, rekeyed)
            self._checkpoint()

    # ------------------------------------------------------------- the WAL
    def _checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate it; True when done.

        Waits at most CHECKPOINT_BUSY_MS for other connections' readers (the
        connection's usual busy timeout is restored after). When a reader still
        pins the WAL, SQLite answers busy: the checkpoint is left pending, counted,
        and retried by later writes and purges."""
        db = self._db
        self._checkpoint_tried = time.monotonic()
        db.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_MS}")
        try:
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.OperationalError:  # "database is locked" and the like: the same
            busy = 1
        finally:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if busy:
            self.checkpoint_failures += 1
            if not self._checkpoint_pending:
                log.warning("event=wal_checkpoint_busy detail=another connection is reading; retried later")
            self._checkpoint_pending = True
            return False
        if self._checkpoint_pending:
            log.info("event=wal_checkpoint_done detail=pending checkpoint completed")
        self._checkpoint_pending = False
        return True

    def _after_write(self, wipe: bool) -> None:
        """After a write: checkpoint when it removed data (``wipe``), or retry a
        pending checkpoint — not more often than ``checkpoint_retry`` while one is
        pending, so a long-lived reader costs each call nothing most of the time."""
        if not (wipe or self._checkpoint_pending):
            return
        if self._checkpoint_pending and time.monotonic() - self._checkpoint_tried < self.checkpoint_retry:
            return
        self._checkpoint()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Nothing to open: the file is open from the constructor to :meth:`aclose`."""
        yield

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._threaded:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # ------------------------------------------------------------- devices
    def _upsert(self, d: Device) -> bool:
        db = self._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            old = db.execute(
                "SELECT ip, port, transport FROM devices WHERE device_id = ?", (d.device_id,)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?,?,?,?,?)",
                (d.device_id, d.provider, d.param, self._box.seal(d.token, d.device_id), d.serial,
                 d.username, d.ip, d.port, d.transport, d.updated_at),
            )
        moved = old is not None and tuple(old) != (d.ip, d.port, d.transport)
        # The old address sits in WAL frames until a checkpoint rewrites the
        # page; truncating the WAL leaves only the new address on disk.
        self._after_write(moved)
        return moved

    async def upsert_device(self, device: Device, expires_at: float | None = None) -> bool:
        # SQLite has no TTL: purge() deletes by ``updated_at``.
        return await self._run(self._upsert, device)

    def _row_device(self, row: tuple[Any, ...]) -> Device:
        (device_id, provider, param, token, serial, username, ip, port, transport, updated_at) = row
        return Device(device_id, provider, param, self._box.open(token, device_id), serial,
                      username, ip, port, transport, updated_at)

    def _get(self, device_id: str) -> Device | None:
        row = self._db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return self._row_device(row) if row else None

    async def get_device(self, device_id: str) -> Device | None:
        return await self._run(self._get, device_id)

    def _delete(self, device_id: str) -> bool:
        cur = self._db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
        self._after_write(cur.rowcount > 0)
        return cur.rowcount > 0

    async def delete_device(self, device_id: str) -> bool:
        return await self._run(self._delete, device_id)

    def _devices(self, serial: str | None, username: str | None) -> list[Device]:
        sql, args = "SELECT * FROM devices", []
        where = []
        if serial is not None:
            where.append("serial = ?")
            args.append(serial)
        if username is not None:
            where.append("username = ?")
            args.append(username)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self._row_device(r) for r in self._db.execute(sql + " ORDER BY device_id", args)]

    async def devices(self, serial: str | None = None, username: str | None = None) -> list[Device]:
        return await self._run(self._devices, serial, username)

    # ------------------------------------------------------------- push log
    def _add_log(self, row: LogRow) -> None:
        self._db.execute(
            f"INSERT INTO push_log ({', '.join(LOG_FIELDS)}) VALUES ({', '.join('?' * len(LOG_FIELDS))})",
            tuple(getattr(row, f) for f in LOG_FIELDS),
        )
        self._after_write(False)

    async def add_log(self, row: LogRow, expires_at: float, claim: str | None = None) -> None:
        # SQLite has no TTL: purge() deletes by ``at``; expires_at is for stores that do.
        await self._run(self._add_log, row)

    def _log_rows(self, serial: str, username: str) -> list[LogRow]:
        cur = self._db.execute(
            f"SELECT {', '.join(LOG_FIELDS)} FROM push_log WHERE serial = ? AND username = ? ORDER BY at, id",
            (serial, username),
        )
        return [LogRow(*r) for r in cur]

    async def log_rows(self, serial: str, username: str) -> list[LogRow]:
        return await self._run(self._log_rows, serial, username)

    # ------------------------------------------------------------- retention
    def _purge(self, log_before: float, devices_before: float) -> tuple[int, int]:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            logs = self._db.execute("DELETE FROM push_log WHERE at < ?", (log_before,)).rowcount
            devs = self._db.execute("DELETE FROM devices WHERE updated_at < ?", (devices_before,)).rowcount
        if logs or devs or self._checkpoint_pending:  # a purge always retries a pending one
            self._checkpoint()
        return logs, devs

    async def purge(self, log_before: float, devices_before: float) -> tuple[int, int]:
        return await self._run(self._purge, log_before, devices_before)

    def _erase(self, serial: str, username: str) -> tuple[int, int]:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            devs = self._db.execute(
                "DELETE FROM devices WHERE serial = ? AND username = ?", (serial, username)).rowcount
            logs = self._db.execute(
                "DELETE FROM push_log WHERE serial = ? AND username = ?", (serial, username)).rowcount
        self._checkpoint()  # an erasure (rare, asked for) always tries at once
        return devs, logs

    async def erase_user(self, serial: str, username: str) -> tuple[int, int]:
        return await self._run(self._erase, serial, username)

    def _counts(self) -> dict[str, int]:
        return {
            "devices": self._db.execute("SELECT count(*) FROM devices").fetchone()[0],
            "push_log_rows": self._db.execute("SELECT count(*) FROM push_log").fetchone()[0],
            "wal_checkpoint_failures_total": self.checkpoint_failures,
            "wal_checkpoint_pending": int(self._checkpoint_pending),
        }

    async def counts(self) -> dict[str, int]:
        return await self._run(self._counts)

    # One process per SQLite file: the service's in-memory rule is the whole rule.
    async def claim_push(self, claim: str, ttl: float) -> bool:
        return True

    async def push_claimed(self, claim: str) -> PushClaim | None:
        return None

    async def device_for_push(self, device_id: str, claim: str, ttl: float) -> tuple[Device | None, bool]:
        return await self.get_device(device_id), True

    async def release_push(self, claim: str) -> None:
        return None

    async def aclose(self) -> None:
        await self._run(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._checkpoint()
        self._db.close()
