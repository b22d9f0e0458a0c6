"""State directories and files only their service's user can read: directories 0700, files 0600.

The relay's pbx.sqlite holds digest hashes of PBX secrets and relay.key signs flow
tokens; the push service's files hold push tokens (sealed) and its key. Nobody but
the service's user (and root) has a reason to read them.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """``path`` as a directory, created 0700 when missing (its missing parents too: they
    are the operator's choice of place, made with the usual umask). An existing
    directory keeps its mode: systemd's StateDirectoryMode= or the operator set it."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by another process starting at the same time
    return path


def private_file(path: Path) -> Path:
    """``path`` created empty with mode 0600 unless it exists (SQLite then gives its
    -wal and -shm files the same mode as the database file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path
