"""The PBX directory of a cluster, in Redis/Valkey: every node, on every machine, knows every PBX.

With ``[cluster] redis_url`` set, ``pbx add``/``remove``/``list`` and every node read and
write one hash, ``pbxrelay:directory`` (serial → realm, the two digest hashes, created),
with a counter (``pbxrelay:directory:meta`` field ``version``) that moves on each change: a node reads the
counter every ``DIRECTORY_POLL`` and the hash when it moved, and ``pbx add`` also asks the
local relay (all its workers) to read it at once. Only digest hashes are stored, as in
SQLite (relay/pbx/directory.py); the secret is shown once and never written.

These two keys have no expiry, unlike everything else the cluster writes: they are the
customer list, not a cache. Redis must keep them (its RDB or AOF persistence, Debian's
default saves snapshots); a node starting adds the PBXs of its local pbx.sqlite that the
shared directory lacks (``adopt``), so enabling the cluster loses no PBX and a Redis that
lost its data is filled again as nodes restart.

The interface is :class:`relay.pbx.directory.PbxDirectory`'s, blocking: the operator
commands call it directly, the relay through ``trio.to_thread`` — each call runs its own
short trio loop with one coredis client (one connection, a few commands).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import coredis
import coredis.exceptions
import trio

from pbxcore.cli import find_leaf
from pbxcore.errors import StateError
from pbxcore.redisconn import client_at, redis_address
from relay.pbx.directory import DirectoryError, PbxDirectory, new_row

T = TypeVar("T")
log = logging.getLogger("relay")
Redis = coredis.Redis[str]

HASH = "pbxrelay:directory"
# The change counter, a field of its own hash (read with HGET: a node's poll is told
# apart from the cluster's GETs of node addresses in INFO commandstats).
META = "pbxrelay:directory:meta"
# Seconds one call may take (connecting included): an operator command or a reload
# of a healthy local Redis takes milliseconds.
TIMEOUT = 5.0

# Add only a PBX not there yet, and move the version with it (atomic).
_ADD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'version', 1)
  return 1
end
return 0
"""

_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'version', 1)
  return 1
end
return 0
"""

Row = tuple[str, str, str, str, float]  # serial, realm, HA1 MD5, HA1 SHA-256, created
Rows = list[Row]  # (named here: in the class, ``list`` is the method)


class SharedDirectory:
    """The PBX directory in Redis at ``host:port`` (``password``: Redis AUTH)."""

    def __init__(self, host: str, port: int, password: str | None = None) -> None:
        self.host, self.port, self.password = host, port, password
        self.where = f"redis://{host}:{port}"

    def _call(self, work: Callable[[Redis], Awaitable[T]]) -> T:
        async def run() -> T:
            client = client_at(self.host, self.port, self.password, timeout=TIMEOUT)
            async with client:
                with trio.fail_after(TIMEOUT):
                    return await work(client)

        try:
            return trio.run(run)
        except BaseException as e:  # noqa: B036 - re-raised unless it is the store's failure
            # (coredis's task group wraps what the connection raised)
            failure = find_leaf(e, (trio.TooSlowError, coredis.exceptions.RedisError, OSError))
            if failure is None:
                raise
            raise StateError(f"cannot use the shared PBX directory at {self.where}: "
                             f"{type(failure).__name__} {failure}".strip()) from None

    # ------------------------------------------------------------ PbxDirectory's
    def add(self, serial: str, realm: str) -> str:
        """Create the PBX and return its new secret (shown once, never stored)."""
        row, secret = new_row(serial, realm)
        if not self._call(lambda r: r.eval(_ADD, keys=[HASH, META], args=[serial, _encode(row)])):
            raise DirectoryError(f"PBX {serial} already exists")
        return secret

    def remove(self, serial: str) -> bool:
        """Delete the PBX; False when there was none."""
        return bool(self._call(lambda r: r.eval(_REMOVE, keys=[HASH, META], args=[serial])))

    def list(self) -> list[tuple[str, str, float]]:
        """(serial, realm, created) of every PBX, by serial."""
        return [(s, realm, created) for s, realm, _, _, created in self.rows()]

    def load(self, realm: str) -> dict[str, dict[str, str]]:
        """serial → {algorithm: HA1} for PBXs created under ``realm``."""
        return {s: {"MD5": md5, "SHA-256": sha} for s, r, md5, sha, _ in self.rows() if r == realm}

    def stamp(self) -> float:
        """Changes whenever the directory does (the version counter)."""
        return float(self._call(lambda r: r.hget(META, "version")) or 0)

    # ------------------------------------------------------------------ more
    def rows(self) -> Rows:
        """Every PBX, by serial; an entry that does not decode is left out."""
        entries: dict[str, str] = self._call(lambda r: r.hgetall(HASH))
        rows = [row for serial, value in entries.items() if (row := _decode(serial, value)) is not None]
        return sorted(rows)

    def adopt(self, rows: Iterable[Row]) -> int:
        """Add the PBXs of ``rows`` (a node's local pbx.sqlite) that the shared directory
        lacks, keeping their digest hashes; how many were added."""
        rows = list(rows)

        async def work(r: Redis) -> int:
            added = 0
            for row in rows:
                done = await r.eval(_ADD, keys=[HASH, META], args=[row[0], _encode(row)])
                added += int(done)  # type: ignore[arg-type]
            return added

        return self._call(work) if rows else 0


def _encode(row: Row) -> str:
    return json.dumps(row[1:])


def _decode(serial: str, value: str) -> Row | None:
    try:
        realm, md5, sha, created = json.loads(value)
        return serial, str(realm), str(md5), str(sha), float(created)
    except (ValueError, TypeError):
        return None


class MirroredDirectory:
    """What a cluster node reads: the shared directory, copied into this node's own
    pbx.sqlite at every load. A Redis that lost its data (restarted without persistence)
    has no version counter: the node then puts its copy back (``adopt``) before reading,
    so the cluster's directory survives while any node does."""

    def __init__(self, shared: SharedDirectory, local: PbxDirectory) -> None:
        self.shared = shared
        self.local = local
        self.where = shared.where

    def adopt_local(self) -> int:
        """Put this node's PBXs (its copy, or a relay's own directory before it joined a
        cluster) into the shared directory where missing; how many."""
        try:
            rows = self.local.rows()
        except StateError as e:  # the copy is a convenience: never a reason not to serve
            log.warning("event=directory_copy_unreadable error=%s", e)
            return 0
        return self.shared.adopt(rows)

    def stamp(self) -> float:
        stamp = self.shared.stamp()
        if stamp == 0 and self.adopt_local():
            log.warning("event=directory_restored into=%s (the shared directory was empty: "
                        "this node's copy put back)", self.where)
            stamp = self.shared.stamp()
        return stamp

    def load(self, realm: str) -> dict[str, dict[str, str]]:
        rows = self.shared.rows()
        try:
            self.local.replace(rows)
        except StateError as e:
            # The workers of one machine share the state directory, so the same copy: one
            # of them writing it while another does ("database is locked") is harmless.
            log.info("event=directory_copy_skipped error=%s", e)
        return {s: {"MD5": md5, "SHA-256": sha} for s, r, md5, sha, _ in rows if r == realm}


def open_directory(state_dir: Path, redis_url: str) -> PbxDirectory | SharedDirectory:
    """The directory a relay or an operator command uses: the cluster's with a
    ``redis_url`` (``redis://[:password@]host:port``, checked by the configuration),
    else this state directory's pbx.sqlite."""
    if not redis_url:
        return PbxDirectory(state_dir / "pbx.sqlite")
    return SharedDirectory(*redis_address(redis_url))


def node_directory(state_dir: Path, redis_url: str) -> PbxDirectory | MirroredDirectory:
    """The directory a relay reads: its pbx.sqlite alone, or with ``redis_url`` the
    cluster's, mirrored into it."""
    local = PbxDirectory(state_dir / "pbx.sqlite")
    if not redis_url:
        return local
    shared = open_directory(state_dir, redis_url)
    assert isinstance(shared, SharedDirectory)
    return MirroredDirectory(shared, local)

