"""Where the push service keeps its two tables: devices and the push log.

DESIGN §3 rows enforced here:
- device: one row per device, keyed by its id (an HMAC of provider, pn-param and
  token); an update *replaces* the address. The token is kept encrypted
  (AES-GCM with the service's key): it never lies on disk in clear.
- push log: one row per push; rows older than the retention are deleted by
  :meth:`Store.purge`. Never a message body.

``Store`` is the interface (SQLite now; Redis/Valkey with native TTLs fits it:
``add_log`` gets the row's expiry, ``purge`` may do nothing). ``SqliteStore`` runs
sqlite3 in a worker thread, one call at a time. ``secure_delete`` overwrites
deleted rows, and an address change checkpoints and truncates the WAL, so the
old address is not left in the database files either.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

T = TypeVar("T")


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


class Store(Protocol):
    async def upsert_device(self, device: Device) -> bool:
        """Insert or replace; True when the address (ip, port, transport) changed."""
        ...

    async def get_device(self, device_id: str) -> Device | None: ...

    async def delete_device(self, device_id: str) -> bool: ...

    async def devices(self, serial: str | None = None, username: str | None = None) -> list[Device]: ...

    async def add_log(self, row: LogRow, expires_at: float) -> None: ...

    async def log_rows(self, serial: str, username: str) -> list[LogRow]: ...

    async def purge(self, log_before: float, devices_before: float) -> tuple[int, int]:
        """Delete log rows older than ``log_before`` and devices not updated since
        ``devices_before``; return (log rows, devices) deleted."""
        ...

    async def erase_user(self, serial: str, username: str) -> tuple[int, int]:
        """Delete everything held about a user; return (devices, log rows) deleted."""
        ...

    async def counts(self) -> dict[str, int]: ...

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

    ``threaded=False`` runs each query inline (tests on a MockClock, where a
    worker thread would let the clock jump mid-query)."""

    def __init__(self, path: Path, key: bytes, *, threaded: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._box = TokenBox(key)
        self._threaded = threaded
        self._limiter = trio.CapacityLimiter(1)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)

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
        if moved:
            # The old address sits in WAL frames until a checkpoint rewrites the
            # page; truncating the WAL leaves only the new address on disk.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return moved

    async def upsert_device(self, device: Device) -> bool:
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
        if cur.rowcount:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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

    async def add_log(self, row: LogRow, expires_at: float) -> None:
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
        if logs or devs:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return devs, logs

    async def erase_user(self, serial: str, username: str) -> tuple[int, int]:
        return await self._run(self._erase, serial, username)

    def _counts(self) -> dict[str, int]:
        return {
            "devices": self._db.execute("SELECT count(*) FROM devices").fetchone()[0],
            "push_log_rows": self._db.execute("SELECT count(*) FROM push_log").fetchone()[0],
        }

    async def counts(self) -> dict[str, int]:
        return await self._run(self._counts)

    async def aclose(self) -> None:
        await self._run(self._close)

    def _close(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
