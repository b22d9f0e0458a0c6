"""Waiting out another process's hold on a SQLite file.

SQLite's busy timeout covers ordinary locks, but in WAL mode a connection that opens
while the last one closes (and checkpoints), or while the WAL index is being rebuilt,
gets SQLITE_BUSY at once without the busy handler (https://sqlite.org/wal.html,
"Sometimes Queries Return SQLITE_BUSY In WAL Mode"). Workers sharing one state
directory (``--workers N``) and ``pbx add`` beside them meet that when they open files
together; :func:`when_free` retries such a failure until a deadline.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

BUSY_WAIT = 5.0  # seconds a statement waits for another process, as sqlite3's default timeout
_PAUSE = 0.01


def is_busy(e: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds the file."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:  # raised by the sqlite3 module itself, not by SQLite
        return False
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def when_free(work: Callable[[], T], wait: float = BUSY_WAIT) -> T:
    """``work()``, called again while it fails because the file is busy, for at most
    ``wait`` seconds; the last failure (or any other) is raised."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return work()
        except sqlite3.OperationalError as e:
            if not is_busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(_PAUSE)
