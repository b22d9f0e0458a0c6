"""The push service's shared store: devices and the push log in Redis/Valkey, every key expiring.

Several pbx-push processes (workers of one machine, or machines) on one Redis/Valkey
share it; SQLite (:class:`push.store.SqliteStore`) stays the embedded default. It
behaves as SqliteStore does (tests/test_push_store.py runs one suite on both), and
Redis itself enforces DESIGN §3 even when no purge runs:

- ``pbxpush:dev:<device id>`` — one device, a JSON string; the push token sealed with
  :class:`push.store.TokenBox` (never in clear). An upsert *replaces* the value (the
  old address is gone from the data set) and gives it the device retention
  (``device_stale_days``) as its expiry, so a device that stops registering expires.
- ``pbxpush:log:<row id>`` — one push log row, a JSON string, expiring at the row's
  retention (``log_retention_days``, never more than :data:`MAX_LOG_TTL`, 7 days)
  counted from when it was written, on Redis's clock.
- ``pbxpush:push:<device id> <Call-ID>`` — the claim of the one push of a call to a
  device (DESIGN §2: one push per call per device, across workers), then its outcome;
  expiring after the dedupe window.
- indexes, sorted sets scored by the service's wall clock (``updated_at``, ``at``):
  ``pbxpush:devices`` and ``pbxpush:logs`` (all), ``pbxpush:udev:<user>`` and
  ``pbxpush:ulog:<user>`` (one user: serial and username), ``pbxpush:sdev:<serial>``
  (one PBX). Each expires with the longest expiry of what was written into it. A
  member whose row Redis already expired is dropped by the read that meets it and by
  :meth:`RedisStore.purge` once it is older than the retention; until then
  :meth:`RedisStore.counts` still counts it.

Multi-key changes are Lua scripts (atomic) naming every key they touch, as Redis
Cluster would need; only one server (or a primary with replicas) is supported now.
Every call gives up after ``timeout`` seconds and raises :class:`StoreUnavailable`.

Bounds: none per user, as in SqliteStore. A device exists only through an
authenticated API call (relay, PBX or operator token), one per push target, PBX
and user, and lives ``device_stale_days`` without a registration; a log row exists
per wake-up and lives ``log_retention_days``. Reads are chunked
(:data:`READ_CHUNK` keys per round trip) and purges are batched (:data:`PURGE_BATCH`
members per script), so no single call holds Redis for long.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, TypeVar

import coredis

from pbxcore.redisconn import RedisConn, RedisUnavailable, new_client
from push.store import LOG_FIELDS, Device, LogRow, PushClaim, StoreUnavailable, TokenBox

__all__ = ["DEFAULT_TIMEOUT", "KEY_PREFIX", "MAX_LOG_TTL", "RedisStore", "StoreUnavailable"]

T = TypeVar("T")
# (value, one index, another index) of each member of a batch: what a purge deletes.
KeysOf = Callable[[list[str]], Awaitable[list[tuple[str, str, str]]]]

KEY_PREFIX = "pbxpush:"
# DESIGN §3: push metadata is deleted after 7 days at the latest, whatever the caller asks.
MAX_LOG_TTL = 7 * 86400.0
# Expiry of a device written without one (seconds): push.device_stale_days' default.
DEFAULT_DEVICE_TTL = 30 * 86400.0
# Seconds one call to Redis/Valkey may take. A wake-up reads a device before it pushes,
# and the relay's ring timeout is tens of seconds; a healthy local Redis answers in well
# under 1 ms, so 1 s only ever trips on a server that is gone or stalled. /readyz waits 2 s.
DEFAULT_TIMEOUT = 1.0
# Keys per MGET or index members per ZRANGE: a few hundred KiB at most per round trip.
READ_CHUNK = 500
# Index members looked at per purge script: each script runs atomically, so a batch
# is short (~1 ms) and other clients' calls go between two batches.
PURGE_BATCH = 500

_EXTEND = """
local function extend(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: device, all devices, the user's devices, the PBX's devices.
# ARGV: value, updated_at, expiry (ms), device id. Returns the old value (or nil).
_UPSERT = _EXTEND + """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
for i = 2, 4 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[4])
  extend(KEYS[i], ARGV[3])
end
return old
"""

# KEYS: device, push claim. ARGV: the claim's expiry (ms). Returns {device value or nil,
# 1 when the device exists and the claim is now this caller's, else 0}.
_DEVICE_FOR_PUSH = """
local d = redis.call('GET', KEYS[1])
if not d then return {false, 0} end
local ok = redis.call('SET', KEYS[2], '', 'NX', 'PX', ARGV[1])
if ok then return {d, 1} end
return {d, 0}
"""

# KEYS: device, all devices, the user's devices, the PBX's devices. ARGV: device id.
_DELETE = """
local n = redis.call('DEL', KEYS[1])
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return n
"""

# KEYS: row, all rows, the user's rows[, a push claim]. ARGV: value, at, expiry (ms),
# row id[, the claimed push's outcome]: the claim, if still there, gets it.
_ADD_LOG = _EXTEND + """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[4])
  extend(KEYS[i], ARGV[3])
end
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[5], 'XX', 'KEEPTTL') end
return 1
"""

# Retention. KEYS[1]: the index of all (devices or rows); then per member i three keys:
# its value and the two other indexes that hold it. ARGV[1]: the bound; ARGV[1+i]: member i.
# A member is deleted only if its score is still below the bound: a device registered
# again since the batch was read has a new score and stays.
_PURGE = """
local bound, n = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  local m, k = ARGV[i], 3 * (i - 2) + 2
  local s = redis.call('ZSCORE', KEYS[1], m)
  if s and tonumber(s) < bound then
    redis.call('DEL', KEYS[k])
    redis.call('ZREM', KEYS[k + 1], m)
    redis.call('ZREM', KEYS[k + 2], m)
    redis.call('ZREM', KEYS[1], m)
    n = n + 1
  end
end
return n
"""

# Members whose value Redis expired. KEYS[1], KEYS[2]: the indexes to drop them from;
# KEYS[2+i]: the value of member ARGV[i] (checked again: it may have been written since).
_DROP_STALE = """
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[2 + i]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return 1
"""

# Erasure. KEYS: all devices, all rows, the user's devices, the user's rows, the PBX's
# devices, then the n devices' values, then the rows' values. ARGV[1]: n; then the
# device ids, then the row ids. Returns {devices deleted, rows deleted}.
_ERASE = """
local nd = tonumber(ARGV[1])
local devs, rows = 0, 0
for i = 1, #ARGV - 1 do
  local m, k = ARGV[1 + i], KEYS[5 + i]
  if i <= nd then
    devs = devs + redis.call('DEL', k)
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZREM', KEYS[5], m)
  else
    rows = rows + redis.call('DEL', k)
    redis.call('ZREM', KEYS[2], m)
  end
end
redis.call('DEL', KEYS[3], KEYS[4])
return {devs, rows}
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _user(serial: str, username: str) -> str:
    # Length-prefixed: ("a:b", "c") and ("a", "b:c") are two users, two keys.
    return f"{len(serial)}:{serial}:{username}"


class _Keys:
    """Key names, in one place."""

    devices = KEY_PREFIX + "devices"
    logs = KEY_PREFIX + "logs"

    @staticmethod
    def dev(device_id: str) -> str:
        return KEY_PREFIX + "dev:" + device_id

    @staticmethod
    def row(row_id: str) -> str:
        return KEY_PREFIX + "log:" + row_id

    @staticmethod
    def udev(serial: str, username: str) -> str:
        return KEY_PREFIX + "udev:" + _user(serial, username)

    @staticmethod
    def ulog(serial: str, username: str) -> str:
        return KEY_PREFIX + "ulog:" + _user(serial, username)

    @staticmethod
    def sdev(serial: str) -> str:
        return KEY_PREFIX + "sdev:" + serial

    @staticmethod
    def claim(claim: str) -> str:
        return KEY_PREFIX + "push:" + claim


def _new_row_id() -> str:
    """Unique, and ordered as written (wall-clock ns first): rows of one instant keep
    their order in a user's index, where equal scores sort by member."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


class RedisStore:
    """The shared store (see the module's docstring). Build it with
    :meth:`from_url`; it talks to Redis while :meth:`session` is entered."""

    def __init__(self, client: coredis.Redis[str], key: bytes, *, timeout: float = DEFAULT_TIMEOUT,
                 device_ttl: float = DEFAULT_DEVICE_TTL) -> None:
        self._conn = RedisConn(client, timeout)
        self._box = TokenBox(key)
        self.device_ttl = device_ttl
        r = client
        self._upsert = r.register_script(_UPSERT)
        self._delete = r.register_script(_DELETE)
        self._device_for_push = r.register_script(_DEVICE_FOR_PUSH)
        self._add_log = r.register_script(_ADD_LOG)
        self._purge = r.register_script(_PURGE)
        self._drop_stale = r.register_script(_DROP_STALE)
        self._erase = r.register_script(_ERASE)

    @classmethod
    def from_url(cls, url: str, key: bytes, *, timeout: float = DEFAULT_TIMEOUT,
                 device_ttl: float = DEFAULT_DEVICE_TTL) -> RedisStore:
        """A store on ``redis://[:password@]host:port`` (connects on first use)."""
        return cls(new_client(url, timeout), key, timeout=timeout, device_ttl=device_ttl)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Keep the client's connection pool open for the block (its tasks live in the
        task that enters it); Redis being down does not fail this, the calls do."""
        async with self._conn.raw:
            yield

    async def _call(self, request: Awaitable[T]) -> T:
        try:
            return await self._conn.call(request)
        except RedisUnavailable as e:
            raise StoreUnavailable(f"push store {e}") from None

    async def _mget(self, keys: Sequence[str]) -> list[str | None]:
        values: list[str | None] = []
        for i in range(0, len(keys), READ_CHUNK):
            values.extend(await self._call(self._conn.raw.mget(keys[i:i + READ_CHUNK])))
        return values

    async def _members(self, index: str) -> list[str]:
        """Every member of an index, in order, :data:`READ_CHUNK` per round trip."""
        members: list[str] = []
        while True:
            first = len(members)
            chunk = await self._call(self._conn.raw.zrange(index, first, first + READ_CHUNK - 1))
            members.extend(chunk)
            if len(chunk) < READ_CHUNK:
                return members

    async def _drop(self, indexes: tuple[str, str], members: list[str], value_key: Callable[[str], str],
                    ) -> None:
        """Drop members whose value is gone from two indexes (the one read and the global one)."""
        for i in range(0, len(members), READ_CHUNK):
            chunk = members[i:i + READ_CHUNK]
            await self._call(self._drop_stale(keys=[*indexes, *map(value_key, chunk)], args=chunk))

    # ------------------------------------------------------------- devices
    def _encode_device(self, d: Device) -> str:
        v = asdict(d)
        v["token"] = base64.b64encode(self._box.seal(d.token, d.device_id)).decode()
        return json.dumps(v, separators=(",", ":"))

    def _decode_device(self, text: str) -> Device:
        v = json.loads(text)
        v["token"] = self._box.open(base64.b64decode(v["token"]), v["device_id"])
        return Device(**v)

    async def upsert_device(self, device: Device, expires_at: float | None = None) -> bool:
        """Insert or replace; True when the address (ip, port, transport) changed.
        The device expires at ``expires_at`` (wall clock; its distance from
        ``updated_at`` is what counts, on Redis's clock), else ``device_ttl`` from now."""
        d = device
        ttl = self.device_ttl if expires_at is None else expires_at - d.updated_at
        keys = [_Keys.dev(d.device_id), _Keys.devices, _Keys.udev(d.serial, d.username), _Keys.sdev(d.serial)]
        args: list[str | int] = [self._encode_device(d), repr(d.updated_at), _ms(ttl), d.device_id]
        old: Any = await self._call(self._upsert(keys=keys, args=args))
        if old is None:
            return False
        was = json.loads(str(old))
        return (was["ip"], was["port"], was["transport"]) != (d.ip, d.port, d.transport)

    async def get_device(self, device_id: str) -> Device | None:
        text = await self._call(self._conn.raw.get(_Keys.dev(device_id)))
        return None if text is None else self._decode_device(text)

    async def delete_device(self, device_id: str) -> bool:
        device = await self.get_device(device_id)
        if device is None:
            await self._call(self._conn.raw.zrem(_Keys.devices, [device_id]))
            return False
        keys = [_Keys.dev(device_id), _Keys.devices, _Keys.udev(device.serial, device.username),
                _Keys.sdev(device.serial)]
        return bool(await self._call(self._delete(keys=keys, args=[device_id])))

    async def devices(self, serial: str | None = None, username: str | None = None) -> list[Device]:
        if serial is not None and username is not None:
            index = _Keys.udev(serial, username)
        elif serial is not None:
            index = _Keys.sdev(serial)
        else:
            index = _Keys.devices
        ids = await self._members(index)
        values = await self._mget([_Keys.dev(i) for i in ids])
        stale = [i for i, v in zip(ids, values, strict=True) if v is None]
        if stale:
            await self._drop((index, _Keys.devices), stale, _Keys.dev)
        found = [self._decode_device(v) for v in values if v is not None]
        return sorted((d for d in found if (serial is None or d.serial == serial)
                       and (username is None or d.username == username)), key=lambda d: d.device_id)

    # ------------------------------------------------------------- push log
    async def add_log(self, row: LogRow, expires_at: float, claim: str | None = None) -> None:
        """Write a row expiring ``expires_at - row.at`` seconds from now (at most 7 days);
        with ``claim``, in the same script, that claim's outcome (see :meth:`claim_push`)."""
        ttl = min(expires_at - row.at, MAX_LOG_TTL)
        row_id = _new_row_id()
        keys = [_Keys.row(row_id), _Keys.logs, _Keys.ulog(row.serial, row.username)]
        value = json.dumps(asdict(row), separators=(",", ":"))
        args: list[str | int] = [value, repr(row.at), _ms(ttl), row_id]
        if claim is not None:
            keys.append(_Keys.claim(claim))
            args.append(json.dumps({"outcome": row.outcome, "status": row.status}))
        await self._call(self._add_log(keys=keys, args=args))

    async def log_rows(self, serial: str, username: str) -> list[LogRow]:
        index = _Keys.ulog(serial, username)
        ids = await self._members(index)
        values = await self._mget([_Keys.row(i) for i in ids])
        stale = [i for i, v in zip(ids, values, strict=True) if v is None]
        if stale:
            await self._drop((index, _Keys.logs), stale, _Keys.row)
        rows = [json.loads(v) for v in values if v is not None]
        return [LogRow(**{f: r[f] for f in LOG_FIELDS}) for r in rows]

    # ------------------------------------------------------------- retention
    async def purge(self, log_before: float, devices_before: float) -> tuple[int, int]:
        """Delete log rows written before ``log_before`` and devices not updated since
        ``devices_before``, including index members whose row Redis already expired
        (counted: a row gone by retention, by Redis or by this purge)."""
        logs = await self._purge_index(_Keys.logs, log_before, self._log_keys)
        devices = await self._purge_index(_Keys.devices, devices_before, self._device_keys)
        return logs, devices

    async def _purge_index(self, index: str, before: float, keys_of: KeysOf) -> int:
        total = 0
        while True:
            members = list(await self._call(self._conn.raw.zrange(
                index, "-inf", f"({before!r}", sortby=coredis.PureToken.BYSCORE, offset=0,
                count=PURGE_BATCH)))
            if not members:
                return total
            keys: list[str] = [index]
            for keys3 in await keys_of(members):
                keys.extend(keys3)
            total += int(await self._call(self._purge(keys=keys, args=[repr(before), *members])))
            if len(members) < PURGE_BATCH:
                return total

    async def _log_keys(self, ids: list[str]) -> list[tuple[str, str, str]]:
        """(value, the user's index, the user's index again) of each row; the global
        index twice for a row Redis already expired (its user is unknown now)."""
        out = []
        for i, v in zip(ids, await self._mget([_Keys.row(i) for i in ids]), strict=True):
            if v is None:
                out.append((_Keys.row(i), _Keys.logs, _Keys.logs))
            else:
                r = json.loads(v)
                user = _Keys.ulog(r["serial"], r["username"])
                out.append((_Keys.row(i), user, user))
        return out

    async def _device_keys(self, ids: list[str]) -> list[tuple[str, str, str]]:
        out = []
        for i, v in zip(ids, await self._mget([_Keys.dev(i) for i in ids]), strict=True):
            if v is None:
                out.append((_Keys.dev(i), _Keys.devices, _Keys.devices))
            else:
                d = json.loads(v)
                out.append((_Keys.dev(i), _Keys.udev(d["serial"], d["username"]), _Keys.sdev(d["serial"])))
        return out

    async def erase_user(self, serial: str, username: str) -> tuple[int, int]:
        devs = await self._members(_Keys.udev(serial, username))
        rows = await self._members(_Keys.ulog(serial, username))
        keys = [_Keys.devices, _Keys.logs, _Keys.udev(serial, username), _Keys.ulog(serial, username),
                _Keys.sdev(serial), *map(_Keys.dev, devs), *map(_Keys.row, rows)]
        gone: Any = await self._call(self._erase(keys=keys, args=[len(devs), *devs, *rows]))
        n_devs, n_rows = gone
        return int(n_devs), int(n_rows)

    async def counts(self) -> dict[str, int]:
        """Members of the two global indexes (rows Redis expired count until dropped)."""
        return {
            "devices": await self._call(self._conn.raw.zcard(_Keys.devices)),
            "push_log_rows": await self._call(self._conn.raw.zcard(_Keys.logs)),
        }

    # ------------------------------------------------------------- one push per call
    # ``pbxpush:push:<claim>``: "" while the claiming process pushes, then {"outcome",
    # "status"} (written with the push log row, :meth:`add_log`); it expires after the
    # dedupe window whatever happens to its process.
    async def claim_push(self, claim: str, ttl: float) -> bool:
        done = await self._call(self._conn.raw.set(_Keys.claim(claim), "", px=_ms(ttl),
                                                         condition=coredis.PureToken.NX))
        return bool(done)

    async def device_for_push(self, device_id: str, claim: str, ttl: float) -> tuple[Device | None, bool]:
        got: Any = await self._call(self._device_for_push(
            keys=[_Keys.dev(device_id), _Keys.claim(claim)], args=[_ms(ttl)]))
        value, claimed = got
        return (None if value is None else self._decode_device(value)), bool(claimed)

    async def push_claimed(self, claim: str) -> PushClaim | None:
        value = await self._call(self._conn.raw.get(_Keys.claim(claim)))
        if value is None:
            return None
        if not value:
            return PushClaim(None)
        v = json.loads(value)
        return PushClaim(str(v["outcome"]), v["status"])

    async def release_push(self, claim: str) -> None:
        await self._call(self._conn.raw.delete([_Keys.claim(claim)]))

    async def aclose(self) -> None:
        """Nothing to do: the connection pool closes when :meth:`session` ends."""
