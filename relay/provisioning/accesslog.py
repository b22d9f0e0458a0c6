"""The provisioning access log: time, serial, anonymised client network, status — 12 months at most.

DESIGN §3 row "provisioning access": kept 12 months, never the full IP, never the
file. What a row holds, and what it leaves out on purpose:

- ``at``: wall-clock time of the answer (seconds since the epoch);
- ``serial``: the PBX asked for (only serials in the directory: a scanner's guesses
  are counted in metrics, not written down);
- ``client``: the client's network, never its address: IPv4 /24, IPv6 /48 (the
  prefix a site is usually given), as CIDR text;
- ``status``: the HTTP status the phone got.

No path and no query string: provisioning paths name devices (MAC addresses), and
query strings carry tokens or passwords on some PBXs. No user agent, no byte count.

SQLite file 0600 under the relay's state directory (its WAL and shared-memory files
take the same mode), ``secure_delete`` so purged rows are overwritten.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from pbxcore import sqlitewait
from relay.provisioning.limits import MAX_ACCESS_LOG_ROWS

T = TypeVar("T")

IPV4_PREFIX = 24
IPV6_PREFIX = 48
# 12 months (DESIGN §3), in seconds; provisioning.access_log_days may only shorten it.
RETENTION_DAYS_MAX = 365
DAY = 86_400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    serial TEXT NOT NULL,
    client TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS access_at ON access (at);
"""


def anonymise(ip: str) -> str:
    """The client's network as CIDR text: IPv4 /24, IPv6 /48; an IPv4-mapped IPv6
    address (a dual-stack listener) counts as the IPv4 address it maps."""
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = IPV4_PREFIX if addr.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@dataclass(frozen=True)
class Access:
    """One row: when, which PBX, which network, what status."""

    at: float
    serial: str
    client: str  # anonymised: see :func:`anonymise`
    status: int


class AccessLog:
    """The access log in SQLite; every call runs in a worker thread, one at a time.

    ``threaded=False`` runs queries inline (tests on a MockClock, where a worker
    thread would let the clock jump mid-query)."""

    def __init__(self, path: Path, *, threaded: bool = True, max_rows: int = MAX_ACCESS_LOG_ROWS):
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: no moment where another user could
        # read it; SQLite gives -wal and -shm the database file's mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.path = path
        self.max_rows = max_rows
        self._threaded = threaded
        self._limiter = trio.CapacityLimiter(1)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=sqlitewait.BUSY_WAIT)
        # Workers open the one file together at start (pbxcore.sqlitewait).
        try:
            sqlitewait.when_free(self._prepare)
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._threaded:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _add(self, rows: Sequence[Access]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO access (at, serial, client, status) VALUES (?, ?, ?, ?)",
                [(r.at, r.serial, r.client, r.status) for r in rows])

    async def add(self, rows: Sequence[Access]) -> None:
        """Write ``rows`` in one transaction."""
        if rows:
            await self._run(self._add, rows)

    def _purge(self, now: float, retention: float) -> tuple[int, int]:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            expired = self._db.execute("DELETE FROM access WHERE at < ?", (now - retention,)).rowcount
            count = self._db.execute("SELECT count(*) FROM access").fetchone()[0]
            trimmed = 0
            if count > self.max_rows:
                trimmed = self._db.execute(
                    "DELETE FROM access WHERE id IN (SELECT id FROM access ORDER BY at, id LIMIT ?)",
                    (count - self.max_rows,)).rowcount
        if expired or trimmed:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return expired, trimmed

    async def purge(self, now: float, retention: float) -> tuple[int, int]:
        """Delete rows older than ``now - retention`` (wall-clock seconds), then the
        oldest beyond ``max_rows``. Returns (expired, trimmed)."""
        return await self._run(self._purge, now, retention)

    def _rows(self, serial: str | None) -> list[Access]:
        q = "SELECT at, serial, client, status FROM access"
        args: tuple[str, ...] = ()
        if serial is not None:
            q, args = q + " WHERE serial = ?", (serial,)
        return [Access(*r) for r in self._db.execute(q + " ORDER BY at, id", args)]

    async def rows(self, serial: str | None = None) -> list[Access]:
        """Every row (of one serial), oldest first: for the operator and the tests."""
        return await self._run(self._rows, serial)

    def close(self) -> None:
        """Close the database (blocking; the service's last call)."""
        self._db.close()


class AccessRecorder:
    """The trio side of the log: requests record rows without waiting for the disk;
    one task writes them in batches, another purges.

    Two clocks: ``clock`` is wall time (what rows record and the retention compares),
    trio's drives the sleeps, so a test proves the 12 months with a MockClock."""

    def __init__(self, log: AccessLog, retention_days: int, clock: Callable[[], float],
                 queue: int, batch: int, purge_every: float):
        self.log = log
        self.retention = min(retention_days, RETENTION_DAYS_MAX) * DAY
        self.clock = clock
        self.batch = batch
        self.purge_every = purge_every
        self._send, self._recv = trio.open_memory_channel[Access](queue)
        self.dropped = 0
        self.written = 0
        self.purged = 0
        self.trimmed = 0
        self.errors = 0

    def record(self, serial: str, client_ip: str, status: int) -> None:
        """Queue one row; beyond the queue's limit the row is dropped and counted."""
        try:
            self._send.send_nowait(Access(self.clock(), serial, anonymise(client_ip), status))
        except trio.WouldBlock:
            self.dropped += 1

    async def run_writer(self) -> None:
        """Write queued rows, up to ``batch`` per transaction, until cancelled."""
        async for first in self._recv:
            rows = [first]
            while len(rows) < self.batch:
                try:
                    rows.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.log.add(rows)
                self.written += len(rows)
            except sqlite3.Error:
                self.errors += len(rows)

    async def purge_once(self) -> tuple[int, int]:
        """One purge at the wall clock's ``now``."""
        expired, trimmed = await self.log.purge(self.clock(), self.retention)
        self.purged += expired
        self.trimmed += trimmed
        return expired, trimmed

    async def run_purges(self) -> None:
        """Purge at start, then every ``purge_every`` seconds, until cancelled."""
        while True:
            try:
                await self.purge_once()
            except sqlite3.Error:
                self.errors += 1
            await trio.sleep(self.purge_every)

    def counters(self) -> dict[str, int]:
        """For /metrics."""
        return {"provisioning_access_log_written_total": self.written,
                "provisioning_access_log_dropped_total": self.dropped,
                "provisioning_access_log_purged_total": self.purged,
                "provisioning_access_log_trimmed_total": self.trimmed,
                "provisioning_access_log_errors_total": self.errors}
