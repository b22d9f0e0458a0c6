"""`pbx-relay run --workers N`: N relay nodes on one machine, one Redis, under one parent (docs/cluster.md).

Each worker is a `pbx-relay run` process and a node of the cluster, with what makes it
one node: its own node id (``<node_id>-w<i>``), cluster link port, slice of the RTP port
range and a loopback admin port (:func:`worker_overrides`, a pure function of the
configuration).
The SIP ports are the same for all: each worker binds them with SO_REUSEPORT, and the
kernel gives each new TCP/TLS connection, and each UDP 4-tuple, to one of them. A PBX on
one worker and a phone on another reach each other over the cluster links, as between
machines. The parent runs no SIP: it starts the workers, restarts one that dies, forwards
SIGHUP and SIGTERM, tells systemd READY once every worker is serving, and serves
``admin.listen`` with answers gathered from the workers (relay/workeradmin.py).

With ``push.mode = "embedded"`` each worker runs the push service too, over one Redis
store (relay/pushlink.py ``embedded_push_config``), its API on the one address of
push.toml's ``api.listen`` (SO_REUSEPORT, like the SIP ports), its admin routes on a
loopback port; the parent makes the push service's key material once before any worker
starts (``prepare_workers_push``) and serves push.toml's ``admin.listen`` for all.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from pbxcore import reloadack
from pbxcore.admin import serve_admin
from pbxcore.errors import EXIT_CONFIG, ConfigError, PbxError
from pbxcore.lifecycle import SIGNALS, supervise
from pbxcore.sdnotify import Notifier
from push.config import PushConfig
from relay.config import RelayConfig
from relay.workeradmin import WorkerAdmin, WorkerView, client

log = logging.getLogger("relay.workers")

# At most this many workers: more processes than cores only adds hops between them, and
# each takes a link port counted up from the configured one.
MAX_WORKERS = 64
# The banner's last line (relay/service.py banner): the worker serves.
READY_LINE = b"user and password are the PBX's extension"
# The banner's admin line names the worker's admin address (relay/service.py banner).
ADMIN_LINE = re.compile(rb"^\s*admin\s+http://(\S+?)/metrics\b")
# Its push line names its embedded push service's admin address (relay/service.py banner).
PUSH_ADMIN_LINE = re.compile(rb"^\s*push\s+API\s+\S+\s+admin\s+http://(\S+?)/metrics\b")
# Where a worker serves its admin routes: loopback, a port the kernel picks; the parent
# serves admin.listen and asks the workers (relay/workeradmin.py).
WORKER_ADMIN = "127.0.0.1:0"
# A worker that dies is started again after RESTART_DELAY, doubled for each death that
# follows within RESTART_RESET seconds of serving, at most RESTART_DELAY_MAX: a worker that
# cannot start (its port taken) does not spin, one that crashed once is back in a second.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
RESTART_RESET = 60.0
# SIGINT, or the end of a drain: seconds the workers get to exit before SIGKILL.
STOP_GRACE = 10.0
# The parent is each worker's systemd watchdog (`--worker-watchdog`): a worker that serves
# pings it (WATCHDOG=1, pbxcore/sdnotify.py) every half of this while its own health check
# passes (its timer task runs, a thread answers); silent this long, it is killed and started
# again. The unit's WatchdogSec=30 for one process, the same here.
WORKER_WATCHDOG = 30.0
# The parent's side channels to systemd: a worker must not answer on them (NotifyAccess=main).
# Each worker counts its reloads in a directory of its own under the parent's
# $RUNTIME_DIRECTORY (pbxcore/reloadack.py), which the parent waits on.
PARENT_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY")
WORKER_FLAG = "--worker"


def default_workers(cfg: RelayConfig, cpus: int | None) -> int:
    """How many workers ``run`` starts without ``--workers``: one per core when a shared
    store is configured (the workers share state there, the embedded push service's
    devices and push log too), else one; one with media in the kernel (``kernel_media``)."""
    if not cfg.cluster.redis_url or kernel_media(cfg):
        return 1
    cores = max(1, min(cpus or 1, MAX_WORKERS))
    if cfg.media.enabled:
        cores = max(1, min(cores, (cfg.media.port_max - cfg.media.port_min + 1) // 6))
    return cores


def check_workers(cfg: RelayConfig, count: int) -> None:
    """Raise ConfigError (exit 2) when ``count`` workers cannot run with ``cfg``."""
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"--workers {count}: between 1 and {MAX_WORKERS}")
    if count == 1:
        return
    if not cfg.cluster.redis_url:
        raise ConfigError(f"--workers {count} needs [cluster] redis_url in {cfg.source}: the workers "
                          "are nodes sharing state in Redis/Valkey (docs/cluster.md; e.g. "
                          "redis_url = \"redis://127.0.0.1:6379\" with Debian's redis-server)")
    if len(f"{cfg.node_id}-w{count - 1}") > 64:
        raise ConfigError(f"cluster.node_id {cfg.node_id!r} is too long for worker ids (<node_id>-w<i>)")
    if kernel_media(cfg):
        raise ConfigError(f"--workers {count}: media.backend = {cfg.media.backend!r} in {cfg.source} runs "
                          "in one process (one nftables table and forward fence per network namespace): "
                          "--workers 1, or media.backend = \"userspace\"")
    if cfg.media.enabled and _slice_size(cfg, count) < 6:
        raise ConfigError(f"media.port_min/port_max: {count} workers need at least {6 * count} ports "
                          "(each its own slice, room for 2 RTP/RTCP pairs and more)")


def kernel_media(cfg: RelayConfig) -> bool:
    """Media may be forwarded by the kernel ("kernel", or "auto", which picks it where
    it can run): its table and fence belong to one process per network namespace, so
    several workers would replace each other's table and drop each other's packets."""
    return cfg.media.enabled and cfg.media.backend in ("kernel", "auto")


def _slice_size(cfg: RelayConfig, count: int) -> int:
    size = (cfg.media.port_max - cfg.media.port_min + 1) // count
    return size - size % 2  # RTP even, RTCP odd: a slice keeps pairs whole


def media_slice(cfg: RelayConfig, index: int, count: int) -> tuple[int, int]:
    """Worker ``index``'s part of the RTP port range: disjoint slices, one per worker."""
    size = _slice_size(cfg, count)
    low = cfg.media.port_min + index * size
    return low, low + size - 1


def _plus(address: str, index: int) -> str:
    """``host:port`` with ``index`` added to the port (0 stays 0: any port)."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + index}" if int(port) else address


def worker_overrides(cfg: RelayConfig, index: int, count: int) -> dict[str, Any]:
    """What worker ``index`` of ``count`` changes in ``cfg`` ({"section.key": value}).

    node id ``<node_id>-w<i>``; cluster.listen and cluster.advertise with ``i`` added to
    their port; admin on loopback, any port (:data:`WORKER_ADMIN`: the parent serves
    admin.listen); the i-th slice of the RTP range; the provisioning port on
    worker 0 only (a PBX's provisioning link and the phones' requests must meet in one
    process). The SIP listeners are the same for every worker (SO_REUSEPORT), and so is
    the embedded push service's API; what else changes in its push.toml is
    relay/pushlink.py ``embedded_push_config``'s."""
    out: dict[str, Any] = {
        "cluster.node_id": f"{cfg.node_id}-w{index}",
        "cluster.listen": _plus(cfg.cluster.listen, index),
        "admin.listen": WORKER_ADMIN,
    }
    if cfg.cluster.advertise:
        out["cluster.advertise"] = _plus(cfg.cluster.advertise, index)
    if cfg.media.enabled:
        out["media.port_min"], out["media.port_max"] = media_slice(cfg, index, count)
    if index > 0:
        out["provisioning.enabled"] = False
    return out


def parse_worker(value: str) -> tuple[int, int]:
    """``--worker i/N`` (what the parent gives each worker) as (i, N)."""
    index, _, count = value.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ConfigError(f"{WORKER_FLAG} {value!r}: i/N") from None
    if not 0 <= i < n <= MAX_WORKERS:
        raise ConfigError(f"{WORKER_FLAG} {value!r}: i/N with 0 <= i < N <= {MAX_WORKERS}")
    return i, n


class _WorkerTag(logging.Filter):
    """Names the worker in each of its log lines: ``relay.cluster[w1] event=...``."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.tag):
            record.name = f"{record.name}{self.tag}"
        return True


def tag_log_lines(index: int) -> None:
    """Worker ``index``'s log lines say so (all workers write to the parent's stderr, one
    journal stream); the tag goes after the logger's name, where the fail2ban filter
    (systemd/fail2ban) allows anything."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(f"[w{index}]"))


def worker_env(environ: Mapping[str, str], index: int, notify: str = "", watchdog: float = 0.0,
               ) -> dict[str, str]:
    """A worker's environment: the parent's, without systemd's channels to the parent;
    its own runtime directory ``<RUNTIME_DIRECTORY>/w<i>`` when the parent has one; and
    ``notify``, the parent's socket for this worker, as its NOTIFY_SOCKET with the watchdog."""
    env = {k: v for k, v in environ.items() if k not in PARENT_ONLY_ENV}
    runtime = reloadack.runtime_file(environ)
    if runtime is not None:
        env["RUNTIME_DIRECTORY"] = str(runtime.parent / f"w{index}")
    if notify:
        env["NOTIFY_SOCKET"] = notify
        env["WATCHDOG_USEC"] = str(round(watchdog * 1e6))
    return env


@dataclass
class Worker:
    """One worker process and what the parent knows of it."""

    index: int
    proc: trio.Process | None = None
    ready: trio.Event = field(default_factory=trio.Event)  # it served once: restarts are retried
    serving: bool = False  # this run of it printed its banner
    starts: int = 0
    pinged: float = 0.0  # when it last said WATCHDOG=1 (or started serving)
    admin: str | None = None  # its admin "host:port", from this run's banner
    push_admin: str | None = None  # its embedded push service's admin "host:port", likewise

    def view(self) -> WorkerView:
        pid = self.proc.pid if self.proc is not None else None
        return WorkerView(self.index, pid, self.serving, self.admin, self.starts, self.push_admin)


class WorkerPool:
    """Starts ``count`` workers (``argv`` + ``--worker i/N``), keeps them running, stops them."""

    def __init__(self, argv: list[str], count: int, drain_timeout: float, notify_dir: Path,
                 watchdog: float = WORKER_WATCHDOG) -> None:
        self.argv = argv
        self.count = count
        self.drain_timeout = drain_timeout
        self.notify_dir = notify_dir  # the workers' notify sockets: a 0700 directory of ours
        self.watchdog = watchdog
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.restarts = 0

    async def keep(self, worker: Worker) -> None:
        """Run ``worker`` until the pool stops; a worker that dies after it served is started
        again. One that dies before it ever served stops the parent (a bad port, a config)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._watch, worker)
            await self._keep(worker)
            nursery.cancel_scope.cancel()

    async def _keep(self, worker: Worker) -> None:
        delay = RESTART_DELAY
        while not self.stopping:
            started = trio.current_time()
            code = await self._run_once(worker)
            if self.stopping:
                return
            if code == EXIT_CONFIG:
                raise ConfigError(f"worker {worker.index}: its configuration was refused (its log is above)")
            if not worker.ready.is_set():
                raise PbxError(f"worker {worker.index} exited with {code} before it served "
                               "(its log is above)")
            delay = RESTART_DELAY if trio.current_time() - started > RESTART_RESET else delay
            log.warning("event=worker_exited worker=%d code=%s restart_in=%g", worker.index, code, delay)
            self.restarts += 1
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    async def _run_once(self, worker: Worker) -> int:
        cmd = [*self.argv, WORKER_FLAG, f"{worker.index}/{self.count}"]
        env = worker_env(os.environ, worker.index, str(self._notify_path(worker)), self.watchdog)
        if "RUNTIME_DIRECTORY" in env:
            os.makedirs(env["RUNTIME_DIRECTORY"], mode=0o700, exist_ok=True)
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, env=env)
        worker.proc, worker.serving, worker.admin, worker.push_admin = proc, False, None, None
        worker.starts += 1
        log.info("event=worker_started worker=%d pid=%d", worker.index, proc.pid)
        try:
            assert proc.stdout is not None
            await self._pump(worker, proc.stdout)
            return await proc.wait()
        finally:
            worker.proc, worker.serving, worker.admin, worker.push_admin = None, False, None, None
            if proc.returncode is None:  # the parent is cancelled: never leave a worker behind
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()

    async def _pump(self, worker: Worker, stdout: trio.abc.ReceiveStream) -> None:
        """Copy the worker's stdout (its banner) to ours, each line marked with the worker."""
        buffer = b""
        async for chunk in stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                sys.stdout.write(f"[w{worker.index}] {line.decode(errors='replace')}\n")
                if admin := ADMIN_LINE.match(line):
                    worker.admin = admin.group(1).decode()
                if push_admin := PUSH_ADMIN_LINE.match(line):
                    worker.push_admin = push_admin.group(1).decode()
                if READY_LINE in line:
                    worker.serving, worker.pinged = True, trio.current_time()
                    worker.ready.set()
            sys.stdout.flush()

    def _notify_path(self, worker: Worker) -> Path:
        return self.notify_dir / f"w{worker.index}.sock"

    async def _watch(self, worker: Worker, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
        """The worker's systemd: its WATCHDOG=1 pings; a serving worker silent for
        ``watchdog`` seconds is hung (a blocked loop, a stuck timer task) and is killed,
        and ``keep`` starts it again."""
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind(str(self._notify_path(worker)))
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hear, worker, sock)
                while True:
                    await trio.sleep(min(1.0, self.watchdog / 4))
                    proc = worker.proc
                    silent = trio.current_time() - worker.pinged
                    if worker.serving and proc is not None and silent > self.watchdog and not self.stopping:
                        log.error("event=worker_silent worker=%d pid=%d silent=%.0f (killed, started again)",
                                  worker.index, proc.pid, silent)
                        worker.serving = False
                        proc.kill()

    async def _hear(self, worker: Worker, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(4096)
            if b"WATCHDOG=1" in data.split(b"\n"):
                worker.pinged = trio.current_time()

    async def all_ready(self) -> None:
        for w in self.workers:
            await w.ready.wait()

    def signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signum)

    async def reload(self) -> None:
        """SIGHUP to every worker: each reads the configuration again (relay/service.py).
        Under systemd (a runtime directory) it returns once every worker confirmed its
        reload, so `systemctl reload` means what it means with one process."""
        async with trio.open_nursery() as nursery:
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    nursery.start_soon(self._reload_one, w.index, w.proc.pid)

    async def _reload_one(self, index: int, pid: int) -> None:
        ledger = reloadack.runtime_file(worker_env(os.environ, index))
        if ledger is None:
            os.kill(pid, signal.SIGHUP)
            return
        try:
            await trio.to_thread.run_sync(reloadack.signal_and_wait, pid, ledger)
        except (reloadack.ReloadNotConfirmed, ProcessLookupError) as e:
            log.warning("event=worker_reload_unconfirmed worker=%d error=%s", index, e)

    async def drain(self) -> None:
        """SIGTERM to every worker: each drains (relay.drain_timeout); wait until all exited."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        with trio.move_on_after(self.drain_timeout + STOP_GRACE):
            await self._all_exited()

    async def stop(self) -> None:
        """SIGINT to the workers left (they stop at once); SIGKILL after STOP_GRACE."""
        self.stopping = True
        self.signal_all(signal.SIGINT)
        with trio.move_on_after(STOP_GRACE):
            await self._all_exited()
        self.signal_all(signal.SIGKILL)

    async def _all_exited(self) -> None:
        while any(w.proc is not None for w in self.workers):
            await trio.sleep(0.05)

    def views(self) -> list[WorkerView]:
        return [w.view() for w in self.workers]

    def status(self) -> str:
        running = sum(w.serving for w in self.workers)
        return f"{running} of {self.count} workers serving, {self.restarts} restarts"


async def run_workers(argv: list[str], count: int, cfg: RelayConfig, notifier: Notifier | None = None,
                      watchdog: float = WORKER_WATCHDOG, push: PushConfig | None = None) -> None:
    """The parent: start the workers, READY once all serve, then supervise until stopped.
    ``push``: the embedded push service's configuration (its admin.listen is the parent's)."""
    notify_dir = Path(tempfile.mkdtemp(prefix="pbx-relay-workers-"))  # 0700
    try:
        await _run_pool(WorkerPool(argv, count, float(cfg.relay.drain_timeout), notify_dir, watchdog),
                        cfg, notifier, push)
    finally:
        shutil.rmtree(notify_dir, ignore_errors=True)


async def _run_pool(pool: WorkerPool, cfg: RelayConfig, notifier: Notifier | None,
                    push: PushConfig | None) -> None:
    count = pool.count
    notify = notifier or Notifier.from_environ()

    async def status() -> str:
        return pool.status()

    async def check() -> str | None:
        return None  # the parent's loop runs; a worker that died is being restarted

    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with client() as http, trio.open_nursery() as nursery:
            # Bound before any worker starts: a taken admin port stops the parent at once.
            routes = WorkerAdmin(pool, http).routes()
            admin = await nursery.start(serve_admin, "admin", cfg.admin_listen, routes)
            push_line = ""
            if push is not None:
                push_routes = WorkerAdmin(pool, http, "push").push_routes()
                push_admin = await nursery.start(serve_admin, "push admin", push.admin_listen, push_routes)
                push_line = f"; push API {push.api_url}/v1 admin http://{push_admin}/metrics"
            for w in pool.workers:
                nursery.start_soon(pool.keep, w)
            if await _stopped_while_starting(pool, signals):
                await pool.stop()
                nursery.cancel_scope.cancel()
                return
            pids = " ".join(str(w.proc.pid) for w in pool.workers if w.proc is not None)
            print(f"pbx-relay: {count} workers serving (pids {pids}); node ids {cfg.node_id}-w0 .. "
                  f"{cfg.node_id}-w{count - 1}; admin http://{admin}/metrics /registry /v1/workers"
                  f"{push_line}", flush=True)
            await supervise(signals, notify, status=status, check=check, reload=pool.reload, drain=pool.drain)
            await pool.stop()
            nursery.cancel_scope.cancel()


async def _stopped_while_starting(pool: WorkerPool, signals: AsyncIterator[int]) -> bool:
    """Wait until every worker serves; True when SIGINT or SIGTERM came first (a SIGHUP
    then changes nothing: the workers are reading the configuration as they start)."""
    stopped = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal stopped
            async for signum in signals:
                if signum != signal.SIGHUP:
                    log.info("event=stopping signal=%s while=starting", signal.Signals(signum).name)
                    stopped = True
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        await pool.all_ready()
        nursery.cancel_scope.cancel()
    return stopped


def worker_argv(config: str | None, state_dir: str | None) -> list[str]:
    """How the parent starts a worker: this Python, this command, the same options."""
    argv = [sys.executable, "-m", "relay.cli", "run"]
    if config:
        argv += ["--config", config]
    if state_dir:
        argv += ["--state-dir", state_dir]
    return argv
