"""The PBX directory: serial → digest hashes of its secret, in SQLite.

Only H(serial:realm:secret) per algorithm is stored (as Kamailio's ha1
columns): the secret itself is shown once by ``pbx add`` and never written.
The file is 0600 in a state directory created 0700 (pbxcore.statedir).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pbxcore import sqlitewait
from pbxcore.errors import PbxError, StateError
from pbxcore.statedir import private_dir, private_file
from relay.pbx.digest import ha1, new_secret

# Serials are the PBX vendor's: digits and letters, maybe '-' or '_'. They
# become a DNS label (<serial>.<domain>) so stay within RFC 1035 label rules
# (at most 63 characters, letters or digits at both ends).
SERIAL_MAX = 63
SERIAL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
SERIAL_RULE = (f"1-{SERIAL_MAX} characters: letters, digits, '-' and '_', "
               "starting and ending with a letter or digit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pbx (
    serial TEXT PRIMARY KEY,
    realm TEXT NOT NULL,
    ha1_md5 TEXT NOT NULL,
    ha1_sha256 TEXT NOT NULL,
    created REAL NOT NULL
)
"""


Rows = list[tuple[str, str, str, str, float]]  # serial, realm, HA1 MD5, HA1 SHA-256, created
T = TypeVar("T")


class DirectoryError(PbxError):
    """A request the directory refuses (bad serial, a PBX that exists or does not)."""


def valid_serial(serial: str) -> bool:
    """The serial follows :data:`SERIAL_RULE`."""
    return bool(SERIAL_RE.match(serial))


def serial_problem(serial: str) -> str | None:
    """Why ``serial`` is refused, in one line that never echoes a long input; None if fine."""
    if valid_serial(serial):
        return None
    short = len(serial) <= SERIAL_MAX and serial.isprintable()
    shown = repr(serial) if short else f"({len(serial)} characters)"
    return f"invalid serial {shown}: a serial is {SERIAL_RULE}"


def command_line_secret() -> str:
    """A new secret that never starts with '-' (a command line would read it as an option)."""
    secret = new_secret()
    while secret.startswith("-"):
        secret = new_secret()
    return secret


def new_row(serial: str, realm: str) -> tuple[tuple[str, str, str, str, float], str]:
    """A new PBX's row (serial, realm, HA1 MD5, HA1 SHA-256, created) and its secret,
    which only the operator sees; DirectoryError for a serial :data:`SERIAL_RULE` refuses."""
    problem = serial_problem(serial)
    if problem is not None:
        raise DirectoryError(problem)
    secret = command_line_secret()
    row = (serial, realm, ha1("MD5", serial, realm, secret), ha1("SHA-256", serial, realm, secret),
           time.time())
    return row, secret


class PbxDirectory:
    """Blocking SQLite access; the relay calls it through trio.to_thread. A database
    that cannot be opened or written is a :class:`StateError` naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self._run(_SCHEMA)

    def _state_error(self, e: Exception) -> StateError:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return StateError(f"cannot use the PBX directory {self.path}: {reason} "
                          f"(the state directory must be writable by this user)")

    def _retrying(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in its own connection and transaction, again while another process
        holds the file (pbxcore.sqlitewait: every statement here opens its own
        connection, so workers starting together meet that); else a StateError."""
        try:
            return sqlitewait.when_free(lambda: self._once(work), sqlitewait.BUSY_WAIT)
        except sqlite3.OperationalError as e:
            raise self._state_error(e) from None

    def _once(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            private_file(private_dir(self.path.parent) / self.path.name)
            db = sqlite3.connect(self.path, timeout=sqlitewait.BUSY_WAIT)
        except OSError as e:
            raise self._state_error(e) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                return work(db)
        except (sqlite3.IntegrityError, sqlite3.OperationalError):
            raise
        except sqlite3.Error as e:
            raise self._state_error(e) from None
        finally:
            db.close()

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> tuple[list[tuple[Any, ...]], int]:
        """(rows, rowcount) of one statement in its own transaction."""
        def statement(db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
            cur = db.execute(sql, args)
            return cur.fetchall(), cur.rowcount
        return self._retrying(statement)

    def add(self, serial: str, realm: str) -> str:
        """Create the PBX and return its new secret (shown once, never stored)."""
        row, secret = new_row(serial, realm)
        try:
            self._run("INSERT INTO pbx VALUES (?, ?, ?, ?, ?)", row)
        except sqlite3.IntegrityError:
            raise DirectoryError(f"PBX {serial} already exists") from None
        return secret

    def remove(self, serial: str) -> bool:
        """Delete the PBX; False when there was none."""
        return self._run("DELETE FROM pbx WHERE serial = ?", (serial,))[1] > 0

    def list(self) -> list[tuple[str, str, float]]:
        """(serial, realm, created) of every PBX, by serial."""
        return self._run("SELECT serial, realm, created FROM pbx ORDER BY serial")[0]

    def rows(self) -> Rows:
        """Every PBX as (serial, realm, HA1 MD5, HA1 SHA-256, created), by serial."""
        return self._run("SELECT serial, realm, ha1_md5, ha1_sha256, created FROM pbx ORDER BY serial")[0]

    def replace(self, rows: Rows) -> None:
        """Make the directory exactly ``rows`` (one transaction): a cluster node's local
        copy of the shared directory (relay/pbx/shared.py)."""
        def swap(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pbx")
            db.executemany("INSERT INTO pbx VALUES (?, ?, ?, ?, ?)", rows)
        self._retrying(swap)

    def load(self, realm: str) -> dict[str, dict[str, str]]:
        """serial → {algorithm: HA1} for PBXs created under ``realm``."""
        rows, _ = self._run("SELECT serial, ha1_md5, ha1_sha256 FROM pbx WHERE realm = ?", (realm,))
        return {s: {"MD5": m, "SHA-256": s2} for s, m, s2 in rows}

    def stamp(self) -> float:
        """Changes whenever the directory does (for cheap reload checks)."""
        try:
            wal = self.path.with_name(self.path.name + "-wal")
            return self.path.stat().st_mtime + (wal.stat().st_mtime if wal.exists() else 0)
        except FileNotFoundError:
            return 0.0
