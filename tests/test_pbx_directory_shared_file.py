"""One pbx.sqlite used by several processes at once (``--workers N`` share one state
directory; ``pbx add`` runs beside them): no process may see "database is locked".

Stop 17's CI failed here: two workers opened a fresh directory together and one exited
with ``database is locked`` (in WAL mode SQLite answers SQLITE_BUSY without waiting when
a connection opens while another closes; pbxcore/sqlitewait.py).
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from pbxcore import sqlitewait
from pbxcore.errors import StateError
from relay.pbx.directory import PbxDirectory
from relay.provisioning.accesslog import AccessLog

PROCESSES = 4
ROUNDS = 20
FRESH_FILES = 30  # with the old single try, 2-41 of 3,200 opens failed per 800 here


def _open_and_read(path: str, rounds: int) -> list[str]:
    failures = []
    for _ in range(rounds):
        try:
            PbxDirectory(Path(path)).list()
        except StateError as e:
            failures.append(str(e))
    return failures


def test_processes_opening_one_fresh_directory_together_never_see_it_locked(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    with ctx.Pool(PROCESSES) as pool:
        for i in range(FRESH_FILES):
            path = str(tmp_path / f"d{i}" / "pbx.sqlite")
            for part in pool.starmap(_open_and_read, [(path, ROUNDS)] * PROCESSES):
                failures.extend(part)
    assert failures == []


def test_a_directory_held_longer_than_the_wait_is_one_state_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pbx.sqlite"
    directory = PbxDirectory(path)
    monkeypatch.setattr(sqlitewait, "BUSY_WAIT", 0.3)
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StateError, match=r"cannot use the PBX directory .*locked"):
            directory.add("7001", "example.org")
    finally:
        holder.rollback()
        holder.close()
    assert directory.add("7001", "example.org")  # free again: the write goes in
    assert [s for s, _, _ in directory.list()] == ["7001"]


def _open_access_log(path: str, rounds: int) -> list[str]:
    failures = []
    for _ in range(rounds):
        try:
            AccessLog(Path(path), threaded=False)
        except sqlite3.OperationalError as e:
            failures.append(str(e))
    return failures


def test_workers_opening_the_provisioning_access_log_together_wait_for_each_other(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    with ctx.Pool(PROCESSES) as pool:
        for i in range(FRESH_FILES):
            path = str(tmp_path / f"a{i}" / "access.sqlite")
            for part in pool.starmap(_open_access_log, [(path, ROUNDS)] * PROCESSES):
                failures.extend(part)
    assert failures == []
