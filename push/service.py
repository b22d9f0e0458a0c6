"""The push service's core: device registry, wake-ups, push log, retention.

Everything that talks to the outside (HTTP API, the relay's in-process client)
calls this class; it calls the store and the gateways. Two clocks: ``clock``
(wall time, what rows record and the TTL compares) and trio's (deadlines,
sleeps), so a test drives a 7-day TTL with a fake wall clock in milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from pbxcore.errors import PbxError
from pbxcore.metrics import MetricSet, Plain
from pbxcore.wire import DeviceUpdate
from push.gateways.base import Gateway, deliver
from push.model import PROVIDERS, Outcome, PushMessage, PushResult, PushTarget
from push.store import Device, LogRow, Store, StoreUnavailable

__all__ = ["DeviceUpdate", "Metrics", "PushError", "PushService", "PushSettings", "WakeRequest"]

log = logging.getLogger("push")

DAY = 86400.0
# Seconds between two looks at another process's push for the same (device, call): a
# duplicate ask is rare (the relay asks once per call per device), and its answer is
# only needed before the ring timeout.
CLAIM_POLL = 0.05
# Seconds a cancelled wake-up may spend giving its claim back (shielded from the cancel).
CLAIM_RELEASE_TIMEOUT = 1.0
# Latency buckets (seconds) of the wake histogram, Prometheus-style upper bounds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PushError(PbxError):
    """Bad input from a caller (API or relay): becomes a 4xx with this message."""


@dataclass(slots=True)
class PushSettings:
    log_retention: float = 7 * DAY  # seconds; DESIGN §3: at most 7 days
    device_stale_after: float = 30 * DAY
    purge_interval: float = 600.0  # seconds between purges while running
    dedupe_window: float = 120.0  # one push per (call, device) within this window


@dataclass(frozen=True, slots=True)
class WakeRequest:
    """A wake-up with its device resolved to an id (from a pbxcore.wire.WakeRequest)."""

    device_id: str
    call_id: str
    caller: str
    callee: str
    src: str  # "ip:port" the call came from
    ring_timeout: float  # seconds: the push's TTL and the retries' deadline
    serial: str = ""  # the PBX asking; when set, a device of another PBX is not woken


@dataclass(slots=True)
class _Pushed:
    """One (device, call) wake-up: while ``result`` is None it is in flight and
    ``done`` is set when it ends (with a result, or cancelled: then it is forgotten)."""

    at: float  # trio time the wake started
    done: trio.Event = field(default_factory=trio.Event)
    result: PushResult | None = None


class Metrics:
    """The push service's metrics (``pbx_push_*``), each declared once with its help text."""

    def __init__(self) -> None:
        m = self.set = MetricSet("pbx_push")
        self.device_updates = m.counter("device_updates_total",
                                        "Device registrations accepted (new or moved).")
        self.devices_deleted = m.counter(
            "devices_deleted_total", "Devices deleted, by why: request, unregistered (the provider said "
            "the token is dead), operator, pbx.", ["reason"])
        self.pushes = m.counter(
            "pushes_total", "Wake-ups asked for, by provider and outcome (duplicate: a second ask for "
            "the same call and device, nothing sent).", ["provider", "outcome"])
        self.erasures = m.counter("erasures_total", "Users erased (GDPR Art. 17).")
        self.purged = m.counter("purged_total", "Rows deleted by the retention purge, by table.", ["table"])
        self.purge_errors = m.counter("purge_errors_total", "Purges that failed (retried next interval).")
        self.log_failures = m.counter(
            "push_log_failures_total", "Push log rows not written: the store did not answer (the push "
            "itself went as its outcome says).")
        self.latency = m.histogram(
            "latency_seconds", "Seconds from a wake-up request to the provider's final answer.",
            LATENCY_BUCKETS, ["provider"])
        self._store: Mapping[str, int] = {}
        m.export(STORE_METRICS, lambda: self._store)

    def observe(self, provider: str, seconds: float) -> None:
        """One push's latency."""
        self.latency.labels(provider).observe(seconds)

    def render(self, store_counts: Mapping[str, int]) -> str:
        """Prometheus text, with the store's counts (:meth:`Store.counts`) as of now."""
        self._store = store_counts
        return self.set.render().decode()


# What Store.counts() reports, exported at scrape time.
STORE_METRICS = (
    Plain("devices", "Devices registered now.", "gauge"),
    Plain("push_log_rows", "Push log rows kept now (7 days at most).", "gauge"),
    Plain("wal_checkpoint_failures_total", "WAL checkpoints that failed (retried after the next purge)."),
    Plain("wal_checkpoint_pending", "1 while a WAL checkpoint waits to be retried.", "gauge"),
)


class PushService:
    def __init__(
        self,
        store: Store,
        gateways: Mapping[str, Gateway],
        key: bytes,
        settings: PushSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.gateways = dict(gateways)
        self.key = key
        self.settings = settings or PushSettings()
        self.clock = clock
        self.metrics = Metrics()
        self._recent: dict[tuple[str, str], _Pushed] = {}  # (device, call id) → its wake-up

    # ------------------------------------------------------------- devices
    def device_id(self, target: PushTarget, serial: str, username: str) -> str:
        """The id of ``target`` registered by ``username`` at PBX ``serial``."""
        return target.device_id(self.key, serial, username)

    async def register_device(self, update: DeviceUpdate) -> Device:
        t = update.target
        if t.provider not in PROVIDERS:
            raise PushError(f"pn-provider {t.provider!r} is not supported (apns, fcm)")
        if not t.token or not t.param or len(t.token) > 4096 or len(t.param) > 255:
            raise PushError("pn-prid and pn-param are required (token at most 4096, param 255 bytes)")
        if update.transport not in ("udp", "tcp", "tls"):
            raise PushError(f"transport {update.transport!r} is not udp, tcp or tls")
        if not 0 < update.port < 65536:
            raise PushError("port out of range")
        device = Device(
            device_id=self.device_id(t, update.serial, update.username), provider=t.provider,
            param=t.param, token=t.token,
            serial=update.serial, username=update.username, ip=update.ip, port=update.port,
            transport=update.transport, updated_at=self.clock(),
        )
        moved = await self.store.upsert_device(device, device.updated_at + self.settings.device_stale_after)
        self.metrics.device_updates.inc()
        log.info("event=device_registered device=%s provider=%s serial=%s moved=%s",
                 device.device_id, t.provider, update.serial, moved)
        return device

    async def unregister_device(self, device_id: str, why: str = "request") -> bool:
        gone = await self.store.delete_device(device_id)
        if gone:
            self.metrics.devices_deleted.labels(why).inc()
            log.info("event=device_deleted device=%s reason=%s", device_id, why)
        return gone

    # ------------------------------------------------------------------ wake
    async def wake(self, req: WakeRequest) -> PushResult:
        """Send one push for a call and log it. Never raises for the gateway's sake:
        whatever happens becomes the result and the push log row.

        One push per (device, call) within ``dedupe_window`` (DESIGN §2), whoever
        asks: a second ask sends nothing and answers what the first push came to
        (reason ``duplicate``), waiting for it while it is in flight — at most until
        the second ask's own ring timeout. A first ask that was cancelled before its
        push ended leaves nothing behind: the next ask pushes. In one process the rule
        is kept in memory; across processes sharing a store, by the store's claims
        (:meth:`push.store.Store.claim_push`)."""
        started = trio.current_time()
        deadline = started + req.ring_timeout
        claim = f"{req.device_id} {req.call_id}"  # the id is hex: the first space ends it
        device, claimed = await self.store.device_for_push(req.device_id, claim, self.settings.dedupe_window)
        if device is not None and req.serial and device.serial != req.serial:
            # Another PBX's device: not woken, and not told apart from a missing one.
            log.warning("event=wake_refused device=%s reason=serial_mismatch serial=%s",
                        req.device_id, req.serial)
            device = None
        if device is None:
            if claimed:
                await self._release_claim(claim)
            result = PushResult(Outcome.UNKNOWN_DEVICE, reason="no such device")
            await self._log(req, None, result)
            return result
        key = (req.device_id, req.call_id)
        duplicate = await self._duplicate_in_memory(key, device.provider, started, deadline)
        if duplicate is not None:
            if claimed:  # (only if the first push's claim expired before its entry here)
                await self._release_claim(claim)
            return duplicate
        pushed = self._recent[key] = _Pushed(started)
        try:
            if not claimed:
                elsewhere = await self._claim_or_wait(claim, device.provider, started, deadline)
                if elsewhere is not None:
                    pushed.result = elsewhere
                    return elsewhere
                claimed = True
            result = pushed.result = await self._push(device, req, deadline, started)
            pushed.done.set()
            await self._log(req, device, result, claim)  # the claim's outcome goes with the row
            if result.outcome is Outcome.UNREGISTERED:
                # Apple 410 / Google UNREGISTERED: the token is dead, so is the device row.
                await self.unregister_device(device.device_id, "unregistered")
            return result
        finally:
            if pushed.result is None:
                if self._recent.get(key) is pushed:
                    del self._recent[key]  # cancelled (or broken) before the push ended: no key left
                if claimed:
                    await self._release_claim(claim)
            pushed.done.set()

    async def _duplicate_in_memory(self, key: tuple[str, str], provider: str, started: float,
                                   deadline: float) -> PushResult | None:
        """What an earlier ask in this process for the same (device, call) came to, waited
        for while in flight (until ``deadline``); None when there is none (this ask pushes)."""
        self._forget_old(started)
        while (first := self._recent.get(key)) is not None:
            if first.result is None:
                with trio.move_on_at(deadline):
                    await first.done.wait()
                if not first.done.is_set():
                    self.metrics.pushes.labels(provider, "duplicate").inc()
                    return PushResult(Outcome.FAILED, reason="duplicate: first push still in flight",
                                      latency_ms=(trio.current_time() - started) * 1000.0)
                if first.result is None:
                    continue  # the first ask was cancelled: look again (and push if nobody does)
            # One push per call per device: a second ask is not a second push.
            self.metrics.pushes.labels(provider, "duplicate").inc()
            return PushResult(first.result.outcome, status=first.result.status, reason="duplicate",
                              latency_ms=(trio.current_time() - started) * 1000.0)
        return None

    async def _push(self, device: Device, req: WakeRequest, deadline: float, started: float) -> PushResult:
        gateway = self.gateways.get(device.provider)
        if gateway is None:
            return PushResult(Outcome.REJECTED, reason=f"no {device.provider} gateway")
        msg = PushMessage(
            target=PushTarget(device.provider, device.token, device.param), call_id=req.call_id,
            caller=req.caller, callee=req.callee, ttl=max(1, int(req.ring_timeout)),
            sent_at=self.clock(), device_id=device.device_id,
        )
        return await deliver(gateway, msg, deadline, started=started)

    async def _claim_or_wait(self, claim: str, provider: str, started: float, deadline: float,
                             ) -> PushResult | None:
        """The same rule across processes sharing the store: None when this process is
        to push; else what another process's push for the same (device, call) came to,
        waited for while in flight (polled every ``CLAIM_POLL`` s, until ``deadline``)."""
        while not await self.store.claim_push(claim, self.settings.dedupe_window):
            first = await self.store.push_claimed(claim)
            if first is None:
                continue  # released (its ask was cancelled) or expired just now: claim again
            if first.outcome is None and trio.current_time() < deadline:
                await trio.sleep_until(min(deadline, trio.current_time() + CLAIM_POLL))
                continue
            self.metrics.pushes.labels(provider, "duplicate").inc()
            latency_ms = (trio.current_time() - started) * 1000.0
            if first.outcome is None:
                return PushResult(Outcome.FAILED, reason="duplicate: first push still in flight",
                                  latency_ms=latency_ms)
            return PushResult(Outcome(first.outcome), status=first.status, reason="duplicate",
                              latency_ms=latency_ms)
        return None

    async def _release_claim(self, claim: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLAIM_RELEASE_TIMEOUT):
            try:
                await self.store.release_push(claim)
            except StoreUnavailable as e:  # it expires with the dedupe window anyway
                log.warning("event=push_claim_failed what=release error=%s", e)

    def _forget_old(self, now: float) -> None:
        """Drop finished entries older than the window, from the oldest end (the dict
        keeps insertion order): O(entries dropped), not O(entries) per wake-up. An
        entry still in flight stops the walk; it is looked at again next time."""
        horizon = now - self.settings.dedupe_window
        recent = self._recent
        while recent:
            key, first = next(iter(recent.items()))
            if first.at >= horizon or first.result is None:
                break
            del recent[key]

    async def _log(self, req: WakeRequest, device: Device | None, result: PushResult,
                   claim: str | None = None) -> None:
        provider = device.provider if device else ""
        now = self.clock()
        row = LogRow(
            at=now, serial=device.serial if device else req.serial,
            username=device.username if device else "",
            caller=req.caller, callee=req.callee, src=req.src,
            dst=_hostport(device.ip, device.port) if device else "",
            provider=provider, device_id=req.device_id, outcome=str(result.outcome),
            status=result.status, reason=result.reason[:200], attempts=result.attempts,
            latency_ms=round(result.latency_ms, 3),
        )
        try:
            await self.store.add_log(row, now + self.settings.log_retention, claim)
        except StoreUnavailable as e:
            # The push went (or not) whatever the log says: answer the caller with it.
            # (Another worker waiting on the claim then answers "in flight" at its deadline.)
            self.metrics.log_failures.inc()
            log.warning("event=push_log_failed call_id=%s device=%s error=%s", req.call_id, req.device_id, e)
        self.metrics.pushes.labels(provider or "none", str(result.outcome)).inc()
        if device is not None and result.attempts:
            self.metrics.observe(provider, result.latency_ms / 1000)
        log.info("event=push call_id=%s device=%s provider=%s outcome=%s status=%s attempts=%d "
                 "latency_ms=%.1f", req.call_id, req.device_id, provider or "-", result.outcome,
                 result.status, result.attempts, result.latency_ms)

    # ------------------------------------------------------------- operators
    async def user_log(self, serial: str, username: str) -> list[dict[str, Any]]:
        return [asdict(r) for r in await self.store.log_rows(serial, username)]

    async def export_user(self, serial: str, username: str) -> dict[str, Any]:
        """GDPR Art. 15/20: everything held about one user, tokens excepted (they
        are the provider's identifiers of the app, shown as the device id)."""
        devices = await self.store.devices(serial, username)
        return {
            "serial": serial,
            "username": username,
            "exported_at": self.clock(),
            "devices": [d.public() for d in devices],
            "push_log": await self.user_log(serial, username),
        }

    async def erase_user(self, serial: str, username: str) -> dict[str, int]:
        devices, rows = await self.store.erase_user(serial, username)
        self.metrics.erasures.inc()
        log.info("event=user_erased serial=%s devices=%d log_rows=%d", serial, devices, rows)
        return {"devices": devices, "push_log_rows": rows}

    # ------------------------------------------------------------- retention
    async def purge_once(self) -> tuple[int, int]:
        now = self.clock()
        logs, devices = await self.store.purge(
            now - self.settings.log_retention, now - self.settings.device_stale_after)
        self.metrics.purged.labels("push_log").inc(logs)
        self.metrics.purged.labels("devices").inc(devices)
        if logs or devices:
            log.info("event=purge push_log_rows=%d devices=%d", logs, devices)
        return logs, devices

    async def run_purges(self) -> None:
        """Purge on start, then every ``purge_interval`` while the service runs."""
        while True:
            try:
                await self.purge_once()
            except Exception:
                self.metrics.purge_errors.inc()
                log.exception("event=purge_failed")
            await trio.sleep(self.settings.purge_interval)

    async def metrics_text(self) -> str:
        gauges = await self.store.counts()
        return self.metrics.render(gauges)

    async def aclose(self) -> None:
        for g in self.gateways.values():
            await g.aclose()
        await self.store.aclose()


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
