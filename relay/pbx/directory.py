"""The PBX directory: serial → digest hashes of its secret, in SQLite.

Only H(serial:realm:secret) per algorithm is stored (as Kamailio's ha1
columns): the secret itself is shown once by ``pbx add`` and never written.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from relay.pbx.digest import ha1, new_secret

# Serials are the PBX vendor's: digits and letters, maybe '-' or '_'. They
# become a DNS label (<serial>.<domain>) so stay within RFC 1035 label rules.
SERIAL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pbx (
    serial TEXT PRIMARY KEY,
    realm TEXT NOT NULL,
    ha1_md5 TEXT NOT NULL,
    ha1_sha256 TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class DirectoryError(Exception):
    pass


def valid_serial(serial: str) -> bool:
    return bool(SERIAL_RE.match(serial))


class PbxDirectory:
    """Blocking SQLite access; the relay calls it through trio.to_thread."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add(self, serial: str, realm: str) -> str:
        """Create the PBX and return its new secret (shown once, never stored)."""
        if not valid_serial(serial):
            raise DirectoryError(f"invalid serial {serial!r}: letters, digits, '-', '_'")
        secret = new_secret()
        try:
            with self._db() as db:
                db.execute(
                    "INSERT INTO pbx VALUES (?, ?, ?, ?, ?)",
                    (serial, realm, ha1("MD5", serial, realm, secret),
                     ha1("SHA-256", serial, realm, secret), time.time()),
                )
        except sqlite3.IntegrityError as e:
            raise DirectoryError(f"PBX {serial} already exists") from e
        return secret

    def remove(self, serial: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM pbx WHERE serial = ?", (serial,)).rowcount > 0

    def list(self) -> list[tuple[str, str, float]]:
        with self._db() as db:
            return list(db.execute("SELECT serial, realm, created FROM pbx ORDER BY serial"))

    def load(self, realm: str) -> dict[str, dict[str, str]]:
        """serial → {algorithm: HA1} for PBXs created under ``realm``."""
        with self._db() as db:
            rows = db.execute("SELECT serial, ha1_md5, ha1_sha256 FROM pbx WHERE realm = ?", (realm,))
            return {s: {"MD5": m, "SHA-256": s2} for s, m, s2 in rows}

    def stamp(self) -> float:
        """Changes whenever the directory does (for cheap reload checks)."""
        try:
            wal = self.path.with_name(self.path.name + "-wal")
            return self.path.stat().st_mtime + (wal.stat().st_mtime if wal.exists() else 0)
        except FileNotFoundError:
            return 0.0


