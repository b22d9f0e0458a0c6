"""The relay's link to the push service: bounded queue, ordered device lanes, wake-ups, health probe (trio).

The proxy core emits push effects (relay.proxy.effects); this module carries them
to the push service — in the same process (``push.mode = "embedded"``) or over its
HTTP API (``"remote"``) — and reports each wake-up's outcome back through
``on_wake_result``. It never sees SIP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import trio

from pbxcore.errors import ConfigError
from pbxcore.wire import DeviceUpdate, WakeOutcome
from push import config as push_config
from push.config import PushConfig
from push.service import PushService
from relay.config import RelayConfig
from relay.proxy.counters import Counters
from relay.proxy.effects import DeviceGone, DeviceSeen, PushEffect, Wake
from relay.pushclient import HttpPush, InProcessPush, PushClient

log = logging.getLogger("relay")

DEVICE_WORKERS = 16  # ordered lanes for device updates to the push service
PUSH_QUEUE = 10_000  # push events waiting for the push service at most; beyond, dropped and counted
PUSH_PROBE_EVERY = 5.0  # seconds between two checks that the push service answers (/readyz)
PUSH_PROBE_TIMEOUT = 3.0
PUSH_PROBE_PATH = "/v1/devices/readiness-probe"

# `run --workers N`: each worker's embedded push service serves its admin routes on
# loopback, a port the kernel picks; the parent serves the configured push admin.listen
# for all of them (relay/workeradmin.py), as it does the relay's admin.listen.
WORKER_PUSH_ADMIN = "127.0.0.1:0"

WakeResult = Callable[[tuple[str, ...], WakeOutcome], None]


def embedded_push_config(cfg: RelayConfig, shared: bool = False) -> PushConfig:
    """The embedded push service's configuration: push.config, else its defaults with the
    state in <state_dir>/push. ``shared``: it runs in each worker of `run --workers N`,
    and then its store is Redis — push.toml's own ``[store] redis_url`` (or
    $PBX_PUSH_STORE_REDIS_URL) when set, else the cluster's ``redis_url`` — and its admin
    endpoint is a loopback one (:data:`WORKER_PUSH_ADMIN`)."""
    path, overrides = cfg.embedded_push_source()
    pcfg = push_config.load(path, overrides)
    if not shared:
        return pcfg
    more: dict[str, Any] = {"admin.listen": WORKER_PUSH_ADMIN}
    if not pcfg.store.redis_url:
        more["store.redis_url"] = cfg.cluster.redis_url
    return push_config.load(path, {**overrides, **more})


async def prepare_workers_push(cfg: RelayConfig) -> PushConfig:
    """The parent of `run --workers N`, before any worker starts: the embedded push
    service's configuration checked as one process checks it (a bad push.toml: one line,
    exit 2), and what its workers must share made once, here: its state directory,
    push.key and api.secret (push.app.create_state) — two workers making their own key
    at the same moment would each seal tokens the other cannot read. Returns the
    configuration as written (the parent serves its admin.listen for the workers)."""
    from push import app as push_app

    pcfg = embedded_push_config(cfg)
    shared = embedded_push_config(cfg, shared=True)  # as each worker will load it (its store and admin set)
    if pcfg.api_listen.port == 0:
        raise ConfigError(f"{pcfg.where('api.listen')}: port 0 cannot be shared by --workers: the "
                          "workers serve the push API on one address; give it a port")
    _retire_sqlite_store(shared)
    push_config.check_files(shared)  # its files (and, as for pbx-push, no SQLite store left)
    push_app.create_state(pcfg)
    for gateway in push_app.build_gateways(pcfg, push_app.load_key(pcfg.state_dir)).values():
        await gateway.aclose()  # built to check the credentials (a bad .p8 key), as a worker builds them
    return pcfg


def _retire_sqlite_store(pcfg: PushConfig) -> None:
    """`run` became workers over Redis (``redis_url`` set, or more cores): the SQLite store
    one process kept in push's state_dir is no longer read, and nothing would purge its
    devices and push log after 7 days (DESIGN §3). The parent removes it before any worker
    starts (no process of ours has it open: the one that did was this relay), with one
    WARNING line; phones register again within their REGISTER interval (docs/cluster.md)."""
    old = pcfg.state_dir / "push.sqlite"
    if not old.exists():
        return
    for path in (old, old.with_name("push.sqlite-wal"), old.with_name("push.sqlite-shm")):
        path.unlink(missing_ok=True)
    log.warning("event=push_sqlite_removed path=%s reason=the push store is Redis under workers; "
                "phones register again", old)


class _QuietProbe(logging.Filter):
    """httpx logs every request at INFO: not the readiness probe's, one every 5 s."""

    def filter(self, record: logging.LogRecord) -> bool:
        return PUSH_PROBE_PATH not in record.getMessage()


class PushLink:
    """Owns the client of the push service and the tasks that feed it.

    ``on_wake_result(key, outcome)`` is called (synchronously, from this link's
    tasks) once per ``Wake`` submitted, whatever happens to it."""

    def __init__(self, cfg: RelayConfig, counters: Counters, on_wake_result: WakeResult,
                 shared: bool = False):
        self.cfg = cfg
        self.shared = shared  # one of `run --workers N` (embedded_push_config)
        self.mode: str = cfg.push.mode
        self.counters = counters
        self.on_wake_result = on_wake_result
        self.client: PushClient | None = None
        self.embedded: PushService | None = None  # the push service running in this process
        self._embedded_cfg: PushConfig | None = None
        self._nursery: trio.Nursery | None = None
        self._in, self._queue = trio.open_memory_channel[PushEffect](PUSH_QUEUE)
        self.problem: str | None = "not checked yet"  # why /readyz says no; None: fine
        self.bound: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ input
    def submit(self, effect: PushEffect) -> None:
        """Queue ``effect`` for the push service; a full queue drops it (counted) and a
        dropped wake-up is reported failed at once: the held call must not wait for nothing."""
        if self.client is None:
            if isinstance(effect, Wake):
                self.on_wake_result(effect.key, WakeOutcome.FAILED)
            return
        try:
            self._in.send_nowait(effect)
        except trio.WouldBlock:
            self.counters.inc("push_events_dropped_total")
            if isinstance(effect, Wake):
                self.on_wake_result(effect.key, WakeOutcome.FAILED)

    # ------------------------------------------------------------------ tasks
    async def start(self, nursery: trio.Nursery) -> None:
        """Connect (or start the embedded push service), then run the queue and the probe."""
        if self.mode == "remote":
            self.client = HttpPush(self.cfg.push.url, self.cfg.push.token,
                                   ca_file=self.cfg.push.ca_file or None)
        elif self.mode == "embedded":
            from push import app as push_app

            pcfg = embedded_push_config(self.cfg, self.shared)
            running = await nursery.start(partial(push_app.serve, pcfg, reuse_port=self.shared))
            self.client = InProcessPush(running.service)
            self.embedded = running.service
            self._embedded_cfg = pcfg
            self._nursery = nursery
            self.bound["push_api"] = [running.addresses["api"]]
            self.bound["push_admin"] = [running.addresses["admin"]]
        if self.client is not None:
            nursery.start_soon(self._run_queue)
        nursery.start_soon(self._probe)

    async def _run_queue(self) -> None:
        """Wake-ups run side by side (each may wait its ring timeout); device updates
        go through DEVICE_WORKERS ordered queues, one per hash of the device, so a
        de-registration and the registration after it reach the push service in the
        order the PBX accepted them."""
        async with trio.open_nursery() as nursery:
            lanes = []
            for _ in range(DEVICE_WORKERS):
                send, recv = trio.open_memory_channel[PushEffect](PUSH_QUEUE // DEVICE_WORKERS)
                lanes.append(send)
                nursery.start_soon(self._device_lane, recv)
            async for effect in self._queue:
                if isinstance(effect, Wake):
                    nursery.start_soon(self._deliver, effect)
                    continue
                lane = hash((effect.target, effect.serial, effect.username)) % DEVICE_WORKERS
                try:
                    lanes[lane].send_nowait(effect)
                except trio.WouldBlock:
                    self.counters.inc("push_events_dropped_total")

    async def _device_lane(self, recv: trio.MemoryReceiveChannel[PushEffect]) -> None:
        async for effect in recv:
            await self._deliver(effect)

    async def _deliver(self, effect: PushEffect) -> None:
        client = self.client
        assert client is not None
        try:
            if isinstance(effect, DeviceSeen):
                f = effect.flow
                await client.device_seen(DeviceUpdate(
                    effect.target, effect.serial, effect.username, f.remote_ip, f.remote_port, f.transport))
            elif isinstance(effect, DeviceGone):
                await client.device_gone(effect.target, effect.serial, effect.username)
            else:
                self.on_wake_result(effect.key, await client.wake(effect.request))
        except Exception as e:
            # The push service down or refusing: count it, never log the effect
            # (it holds the push token), and let a held call end with 480.
            self.counters.inc("push_errors_total")
            log.warning("event=push_error kind=%s error=%s", type(effect).__name__, type(e).__name__)
            if isinstance(effect, Wake):
                self.on_wake_result(effect.key, WakeOutcome.FAILED)

    # -------------------------------------------------------------- embedded
    async def reload(self) -> None:
        """SIGHUP reaches the embedded push service too: gateway credentials, retention
        (its log level is the relay's)."""
        if self.embedded is None or self._embedded_cfg is None or self._nursery is None:
            return
        from push import app as push_app

        try:
            fresh = embedded_push_config(self.cfg, self.shared)
        except (push_config.ConfigError, OSError) as e:
            log.error("event=reload_failed what=push_config error=%s (nothing changed)", e)
            return
        await push_app.reload(self.embedded, self._embedded_cfg, fresh, self._nursery, log_level=False)

    # ------------------------------------------------------------------ probe
    async def _probe(self) -> None:
        """Keep ``problem`` current for /readyz: the embedded service's store answers,
        or the remote API answers and accepts our token."""
        if self.mode == "off":
            self.problem = None
            return
        client = None
        if self.mode == "remote":
            logging.getLogger("httpx").addFilter(_QuietProbe())
            client = httpx.AsyncClient(
                base_url=self.cfg.push.url.rstrip("/"), timeout=PUSH_PROBE_TIMEOUT,
                headers={"authorization": f"Bearer {self.cfg.push.token}"},
                verify=self.cfg.push.ca_file or True,
            )
        try:
            while True:
                problem = await self._check(client)
                if problem != self.problem:
                    if problem is None:
                        log.info("event=push_ready mode=%s", self.mode)
                    else:
                        log.warning("event=push_not_ready mode=%s reason=%r", self.mode, problem)
                self.problem = problem
                await trio.sleep(PUSH_PROBE_EVERY)
        finally:
            if client is not None:
                with trio.CancelScope(shield=True):
                    await client.aclose()

    async def _check(self, client: httpx.AsyncClient | None) -> str | None:
        try:
            with trio.fail_after(PUSH_PROBE_TIMEOUT):
                if client is None:
                    assert self.embedded is not None
                    await self.embedded.store.counts()
                    return None
                # Any answer past authentication will do: a relay token may not read
                # devices (403), which proves the service is up and takes our token.
                r = await client.get(PUSH_PROBE_PATH)
        except trio.TooSlowError:
            return "push service did not answer in time"
        except Exception as e:  # unreachable, TLS refused, store broken: all mean "not ready"
            return f"push service not answering ({type(e).__name__})"
        if r.status_code == 401:
            return "push service refuses push.token (HTTP 401)"
        if r.status_code >= 500:
            return f"push service answers HTTP {r.status_code}"
        return None
