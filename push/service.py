"""The push service's core: device registry, wake-ups, push log, retention.

Everything that talks to the outside (HTTP API, the relay's in-process client)
calls this class; it calls the store and the gateways. Two clocks: ``clock``
(wall time, what rows record and the TTL compares) and trio's (deadlines,
sleeps), so a test drives a 7-day TTL with a fake wall clock in milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from push.gateways.base import Gateway, deliver
from push.model import PROVIDERS, Outcome, PushMessage, PushResult, PushTarget
from push.store import Device, LogRow, Store

log = logging.getLogger("push")

DAY = 86400.0
# Latency buckets (seconds) of the wake histogram, Prometheus-style upper bounds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PushError(Exception):
    """Bad input from a caller (API or relay): becomes a 4xx with this message."""


@dataclass(slots=True)
class PushSettings:
    log_retention: float = 7 * DAY  # seconds; DESIGN §3: at most 7 days
    device_stale_after: float = 30 * DAY
    purge_interval: float = 600.0  # seconds between purges while running
    dedupe_window: float = 120.0  # one push per (call, device) within this window


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """A device's registration as the relay saw it (RFC 8599 Contact parameters)."""

    target: PushTarget
    serial: str
    username: str
    ip: str
    port: int
    transport: str


@dataclass(frozen=True, slots=True)
class WakeRequest:
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
    """Counters and one histogram; rendered in Prometheus text by :meth:`render`."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.latency: dict[str, list[int]] = {}  # provider → bucket counts (+Inf last)
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, provider: str, seconds: float) -> None:
        buckets = self.latency.setdefault(provider, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        buckets[-1] += 1
        self.latency_sum[provider] += seconds

    def render(self, gauges: Mapping[str, int]) -> str:
        lines = []
        for key in sorted(self.c):
            name, _, labels = key.partition(":")
            lines.append(f"pbx_push_{name}{{{labels}}} {self.c[key]}" if labels
                         else f"pbx_push_{name} {self.c[key]}")
        for name, value in sorted(gauges.items()):
            lines.append(f"pbx_push_{name} {value}")
        lines.append("# TYPE pbx_push_latency_seconds histogram")
        for provider, buckets in sorted(self.latency.items()):
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), buckets, strict=True):
                lines.append(f'pbx_push_latency_seconds_bucket{{provider="{provider}",le="{bound}"}} {n}')
            total = self.latency_sum[provider]
            lines.append(f'pbx_push_latency_seconds_sum{{provider="{provider}"}} {total:.6f}')
            lines.append(f'pbx_push_latency_seconds_count{{provider="{provider}"}} {buckets[-1]}')
        return "\n".join(lines) + "\n"


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
        moved = await self.store.upsert_device(device)
        self.metrics.c["device_updates_total"] += 1
        log.info("event=device_registered device=%s provider=%s serial=%s moved=%s",
                 device.device_id, t.provider, update.serial, moved)
        return device

    async def unregister_device(self, device_id: str, why: str = "request") -> bool:
        gone = await self.store.delete_device(device_id)
        if gone:
            self.metrics.c[f'devices_deleted_total:reason="{why}"'] += 1
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
        push ended leaves nothing behind: the next ask pushes."""
        started = trio.current_time()
        deadline = started + req.ring_timeout
        device = await self.store.get_device(req.device_id)
        if device is not None and req.serial and device.serial != req.serial:
            # Another PBX's device: not woken, and not told apart from a missing one.
            log.warning("event=wake_refused device=%s reason=serial_mismatch serial=%s",
                        req.device_id, req.serial)
            device = None
        if device is None:
            result = PushResult(Outcome.UNKNOWN_DEVICE, reason="no such device")
            await self._log(req, None, result)
            return result
        key = (req.device_id, req.call_id)
        self._forget_old(started)
        while (first := self._recent.get(key)) is not None:
            if first.result is None:
                with trio.move_on_at(deadline):
                    await first.done.wait()
                if not first.done.is_set():
                    self.metrics.c[f'pushes_total:provider="{device.provider}",outcome="duplicate"'] += 1
                    return PushResult(Outcome.FAILED, reason="duplicate: first push still in flight",
                                      latency_ms=(trio.current_time() - started) * 1000.0)
                if first.result is None:
                    continue  # the first ask was cancelled: look again (and push if nobody does)
            # One push per call per device: a second ask is not a second push.
            self.metrics.c[f'pushes_total:provider="{device.provider}",outcome="duplicate"'] += 1
            return PushResult(first.result.outcome, status=first.result.status, reason="duplicate",
                              latency_ms=(trio.current_time() - started) * 1000.0)
        pushed = self._recent[key] = _Pushed(started)
        try:
            gateway = self.gateways.get(device.provider)
            if gateway is None:
                result = PushResult(Outcome.REJECTED, reason=f"no {device.provider} gateway")
            else:
                msg = PushMessage(
                    target=PushTarget(device.provider, device.token, device.param), call_id=req.call_id,
                    caller=req.caller, callee=req.callee, ttl=max(1, int(req.ring_timeout)),
                    sent_at=self.clock(), device_id=device.device_id,
                )
                result = await deliver(gateway, msg, deadline, started=started)
            pushed.result = result
            pushed.done.set()
            if result.outcome is Outcome.UNREGISTERED:
                # Apple 410 / Google UNREGISTERED: the token is dead, so is the device row.
                await self.unregister_device(device.device_id, "unregistered")
            await self._log(req, device, result)
            return result
        finally:
            if pushed.result is None and self._recent.get(key) is pushed:
                del self._recent[key]  # cancelled (or broken) before the push ended: no key left
            pushed.done.set()

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

    async def _log(self, req: WakeRequest, device: Device | None, result: PushResult) -> None:
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
        await self.store.add_log(row, now + self.settings.log_retention)
        self.metrics.c[f'pushes_total:provider="{provider or "none"}",outcome="{result.outcome}"'] += 1
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
        self.metrics.c["erasures_total"] += 1
        log.info("event=user_erased serial=%s devices=%d log_rows=%d", serial, devices, rows)
        return {"devices": devices, "push_log_rows": rows}

    # ------------------------------------------------------------- retention
    async def purge_once(self) -> tuple[int, int]:
        now = self.clock()
        logs, devices = await self.store.purge(
            now - self.settings.log_retention, now - self.settings.device_stale_after)
        self.metrics.c['purged_total:table="push_log"'] += logs
        self.metrics.c['purged_total:table="devices"'] += devices
        if logs or devices:
            log.info("event=purge push_log_rows=%d devices=%d", logs, devices)
        return logs, devices

    async def run_purges(self) -> None:
        """Purge on start, then every ``purge_interval`` while the service runs."""
        while True:
            try:
                await self.purge_once()
            except Exception:
                self.metrics.c["purge_errors_total"] += 1
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
