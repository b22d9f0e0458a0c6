"""The relay service: one trio task tree around the sans-I/O proxy."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pbxcore.journal import set_level
from pbxcore.lifecycle import SIGNALS, supervise
from pbxcore.sdnotify import Notifier
from push.config import PushConfig
from push.service import DeviceUpdate, PushService
from relay.admin import DIRECTORY_RELOAD, as_json, directory_reload_route, serve_admin
from relay.cli import operator_command
from relay.config import ConfigError, RelayConfig, parse_listen
from relay.media.forwarder import UdpForwarder
from relay.media.ports import PortAllocator
from relay.media.session import MediaController
from relay.pbx.digest import DigestAuth
from relay.pbx.directory import PbxDirectory
from relay.proxy.core import Proxy, ProxyConfig, Send
from relay.proxy.flow import Flow
from relay.proxy.wake import DeviceGone, DeviceSeen, PushEvent, WakeDevice
from relay.pushclient import DELIVERED, HttpPush, InProcessPush, PushClient
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr
from relay.sip.message import Request, SipMessage, make_response
from relay.transport.flows import StreamTimeouts, Transports
from relay.transport.tlscert import ensure_self_signed, server_context

log = logging.getLogger("relay")

DIRECTORY_POLL = 2.0  # seconds between checks for PBXs added or removed by the CLI
DEVICE_WORKERS = 16  # ordered lanes for device updates to the push service
PUSH_QUEUE = 10_000  # push events waiting for the push service at most; beyond, dropped and counted
DRAIN_POLL = 0.2  # seconds between two looks at what is left to finish while draining
# The timer task wakes at least once a second (the proxy's sweep): silent this long, it
# is stuck or the event loop is, and the watchdog ping is withheld.
TIMERS_STALE = 5.0
PUSH_PROBE_EVERY = 5.0  # seconds between two checks that the push service answers (/readyz)
PUSH_PROBE_TIMEOUT = 3.0
PUSH_PROBE_PATH = "/v1/devices/readiness-probe"
# What SIGHUP applies; any other key that changed needs a restart (the reload says which).
RELOADABLE = frozenset({"relay.log_level", "relay.drain_timeout", "sip.tls_cert", "sip.tls_key"})


class _QuietProbe(logging.Filter):
    """httpx logs every request at INFO: not the readiness probe's, one every 5 s."""

    def filter(self, record: logging.LogRecord) -> bool:
        return PUSH_PROBE_PATH not in record.getMessage()


def load_key(state_dir: Path) -> bytes:
    """The relay's secret (flow tokens, nonces, branches), kept across restarts so
    that dialogs and Path entries minted before a restart stay valid."""
    path = state_dir / "relay.key"
    if path.exists():
        return path.read_bytes()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class RelayService:
    def __init__(self, cfg: RelayConfig):
        self.cfg = cfg
        state = cfg.state_dir
        self.key = load_key(state)
        self.directory = PbxDirectory(state / "pbx.sqlite")
        self._ha1: dict[str, dict[str, str]] = {}
        self._stamp = -1.0
        ports = {}
        for t in ("udp", "tcp", "tls"):
            ls = cfg.listeners(t)
            if ls:
                ports[t] = ls[0].port
        names = {listen.host for t in ("udp", "tcp", "tls") for listen in cfg.listeners(t)}
        self.proxy_cfg = ProxyConfig(
            domain=cfg["relay.domain"], advertise=cfg.advertise, ports=ports,
            local_names=frozenset(names),
            pbx_expires_default=cfg["sip.pbx_expires_default"],
            pbx_expires_min=cfg["sip.pbx_expires_min"],
            pbx_expires_max=cfg["sip.pbx_expires_max"],
            push=cfg["push.mode"] != "off",
            ring_timeout=cfg["push.ring_timeout"],
            udp_asleep_after=cfg["push.udp_asleep_after"],
        )
        self.transports = Transports(
            self._on_message, self._on_error, self._on_closed, self._count,
            StreamTimeouts(cfg["sip.flow_idle_timeout"], cfg["sip.partial_message_timeout"]),
        )
        auth = DigestAuth(self.key, cfg["relay.domain"], tuple(cfg["sip.digest_algorithms"]))
        self.forwarder: UdpForwarder | None = None
        media: MediaController | None = None
        if cfg["media.enabled"]:
            self.forwarder = UdpForwarder(cfg.media_address, self._count)
            media = MediaController(
                self.forwarder, cfg.media_address,
                PortAllocator(cfg["media.port_min"], cfg["media.port_max"]),
                cfg["media.no_media_timeout"],
            )
        self.media = media
        self.proxy = Proxy(self.proxy_cfg, self.key, self._ha1.get, auth, self.transports.alive, media,
                           flow_heard=self.transports.heard)
        self._wake = trio.Event()
        self._armed = float("inf")
        self.bound: dict[str, list[str]] = {}
        self.push: PushClient | None = None
        self._push_in, self._push_queue = trio.open_memory_channel[PushEvent](PUSH_QUEUE)
        self._push_service: PushService | None = None  # the embedded one, its config
        self._push_cfg: PushConfig | None = None
        self._nursery: trio.Nursery | None = None
        self.push_problem: str | None = "not checked yet"  # why /readyz says no, None: fine
        # Lifecycle (pbxcore.lifecycle): SIGHUP swaps the TLS context new connections get;
        # SIGTERM drains (no new connections or calls, the current ones finish).
        self.tls_context: ssl.SSLContext | None = None
        self.tls_fingerprint = ""
        self.listening = False
        self.draining = False
        self.drain_until = math.inf
        self.timers_ran_at = 0.0
        self._directory_lock = trio.Lock()

    # --------------------------------------------------------- proxy plumbing
    def _count(self, name: str, n: int = 1) -> None:
        self.proxy.stats.inc(name, n)

    def _dispatch(self, out: list[Send]) -> None:
        if out:
            self.transports.send(out)
        if self.proxy.push_out:
            self._queue_push_events()
        if self.proxy.next_timer() < self._armed:
            self._wake.set()

    def _on_message(self, msg: SipMessage, flow: Flow) -> None:
        if self.draining and self._new_call(msg):
            self._refuse_new_call(msg, flow)
            return
        try:
            out = self.proxy.on_message(msg, flow, trio.current_time())
        except SipParseError as e:
            out = self.proxy.on_parse_error(e, flow)
        except Exception:
            # A bug must cost one message, never the relay (and never its content
            # in the log: only the call id and the flow).
            self.proxy.stats.inc("internal_errors_total")
            log.exception("event=internal_error call_id=%s flow=%s", msg.call_id, flow)
            return
        self._dispatch(out)

    def _on_error(self, err: SipParseError, flow: Flow) -> None:
        log.info("event=bad_message flow=%s status=%d reason=%r", flow, err.status, err.reason)
        try:
            out = self.proxy.on_parse_error(err, flow)
        except Exception:
            self.proxy.stats.inc("internal_errors_total")
            log.exception("event=internal_error flow=%s", flow)
            return
        self._dispatch(out)

    def _on_closed(self, flow: Flow) -> None:
        self.proxy.on_flow_closed(flow)

    # ------------------------------------------------------------ push service
    def _queue_push_events(self) -> None:
        events, self.proxy.push_out = self.proxy.push_out, []
        for ev in events:
            try:
                self._push_in.send_nowait(ev)
            except trio.WouldBlock:
                self.proxy.stats.inc("push_events_dropped_total")
                if isinstance(ev, WakeDevice):  # the held call must not wait for nothing
                    self._dispatch(self.proxy.on_wake_result(ev.key, False, trio.current_time()))

    async def _push_events(self) -> None:
        """Wake-ups run side by side (each may wait its ring timeout); device updates
        go through DEVICE_WORKERS ordered queues, one per hash of the device, so a
        de-registration and the registration after it reach the push service in the
        order the PBX accepted them."""
        async with trio.open_nursery() as nursery:
            lanes = []
            for _ in range(DEVICE_WORKERS):
                send, recv = trio.open_memory_channel[PushEvent](PUSH_QUEUE // DEVICE_WORKERS)
                lanes.append(send)
                nursery.start_soon(self._device_lane, recv)
            async for ev in self._push_queue:
                if isinstance(ev, WakeDevice):
                    nursery.start_soon(self._push_event, ev)
                    continue
                try:
                    lanes[hash((ev.target, ev.serial, ev.username)) % DEVICE_WORKERS].send_nowait(ev)
                except trio.WouldBlock:
                    self.proxy.stats.inc("push_events_dropped_total")

    async def _device_lane(self, recv: trio.MemoryReceiveChannel[PushEvent]) -> None:
        async for ev in recv:
            await self._push_event(ev)

    async def _push_event(self, ev: PushEvent) -> None:
        assert self.push is not None
        try:
            if isinstance(ev, DeviceSeen):
                f = ev.flow
                await self.push.device_seen(DeviceUpdate(
                    ev.target, ev.serial, ev.username, f.remote_ip, f.remote_port, f.transport))
            elif isinstance(ev, DeviceGone):
                await self.push.device_gone(ev.target, ev.serial, ev.username)
            else:
                outcome = await self.push.wake(
                    ev.target, ev.serial, ev.user, ev.call_id, ev.caller, ev.callee, ev.src, ev.ring_timeout)
                self.proxy.stats.inc(f"push_wakes_total:{outcome}")
                self._dispatch(self.proxy.on_wake_result(ev.key, outcome in DELIVERED, trio.current_time()))
        except Exception as e:
            # The push service down or refusing: count it, never log the event
            # (it holds the push token), and let a held call end with 480.
            self.proxy.stats.inc("push_errors_total")
            log.warning("event=push_error kind=%s error=%s", type(ev).__name__, type(e).__name__)
            if isinstance(ev, WakeDevice):
                self._dispatch(self.proxy.on_wake_result(ev.key, False, trio.current_time()))

    async def _start_push(self, nursery: trio.Nursery) -> None:
        mode = self.cfg["push.mode"]
        if mode == "remote":
            self.push = HttpPush(self.cfg["push.url"], self.cfg["push.token"],
                                 ca_file=self.cfg["push.ca_file"] or None)
        elif mode == "embedded":
            from push import app as push_app
            from push import config as push_config

            pcfg = push_config.load(*self._push_config_source())
            running = await nursery.start(push_app.serve, pcfg)
            self.push = InProcessPush(running.service)
            self._push_service = running.service
            self._push_cfg = pcfg
            self._nursery = nursery
            self.bound["push_api"] = [running.addresses["api"]]
            self.bound["push_admin"] = [running.addresses["admin"]]
        if self.push is not None:
            nursery.start_soon(self._push_events)
        nursery.start_soon(self._probe_push)

    def _push_config_source(self) -> tuple[str | None, dict[str, Any]]:
        """push.toml of the embedded push service, and what the relay sets in it."""
        path = self.cfg["push.config"] or None
        return path, ({} if path else {"push.state_dir": str(self.cfg.state_dir / "push")})

    async def _reload_embedded_push(self) -> None:
        """SIGHUP reaches the embedded push service too: gateway credentials, retention
        (its log level is the relay's)."""
        if self._push_service is None or self._push_cfg is None or self._nursery is None:
            return
        from push import app as push_app
        from push import config as push_config

        try:
            fresh = push_config.load(*self._push_config_source())
        except (push_config.ConfigError, OSError) as e:
            log.error("event=reload_failed what=push_config error=%s (nothing changed)", e)
            return
        await push_app.reload(self._push_service, self._push_cfg, fresh, self._nursery, log_level=False)

    async def _probe_push(self) -> None:
        """Keep ``push_problem`` current for /readyz: the embedded service's store answers,
        or the remote API answers and accepts our token."""
        mode = self.cfg["push.mode"]
        if mode == "off":
            self.push_problem = None
            return
        client = None
        if mode == "remote":
            logging.getLogger("httpx").addFilter(_QuietProbe())
            client = httpx.AsyncClient(
                base_url=self.cfg["push.url"].rstrip("/"), timeout=PUSH_PROBE_TIMEOUT,
                headers={"authorization": f"Bearer {self.cfg['push.token']}"},
                verify=self.cfg["push.ca_file"] or True,
            )
        try:
            while True:
                problem = await self._push_check(client)
                if problem != self.push_problem:
                    if problem is None:
                        log.info("event=push_ready mode=%s", mode)
                    else:
                        log.warning("event=push_not_ready mode=%s reason=%r", mode, problem)
                self.push_problem = problem
                await trio.sleep(PUSH_PROBE_EVERY)
        finally:
            if client is not None:
                with trio.CancelScope(shield=True):
                    await client.aclose()

    async def _push_check(self, client: httpx.AsyncClient | None) -> str | None:
        try:
            with trio.fail_after(PUSH_PROBE_TIMEOUT):
                if client is None:
                    assert self._push_service is not None
                    await self._push_service.store.counts()
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

    # ------------------------------------------------------------------ tasks
    async def _timers(self) -> None:
        while True:
            self.timers_ran_at = trio.current_time()
            self._armed = self.proxy.next_timer()
            with trio.move_on_at(self._armed):
                await self._wake.wait()
            self._wake = trio.Event()
            self._armed = float("inf")
            try:
                out = self.proxy.on_timer(trio.current_time())
            except Exception:
                self.proxy.stats.inc("internal_errors_total")
                log.exception("event=internal_error where=timers")
                continue
            self.transports.send(out)

    async def _directory_refresh(self) -> None:
        while True:
            await self.reload_directory()
            await trio.sleep(DIRECTORY_POLL)

    async def reload_directory(self, force: bool = False) -> tuple[int, int]:
        """Re-read the PBX directory when it changed (``force``: anyway, SIGHUP); returns
        (PBXs added, PBXs removed)."""
        async with self._directory_lock:
            stamp = await trio.to_thread.run_sync(self.directory.stamp)
            if stamp == self._stamp and not force:
                return 0, 0
            fresh = await trio.to_thread.run_sync(self.directory.load, self.cfg["relay.domain"])
            added = len(fresh.keys() - self._ha1.keys())
            removed = len(self._ha1.keys() - fresh.keys())
            self._ha1.clear()
            self._ha1.update(fresh)
            for serial in [r.serial for r in self.proxy.registry.snapshot()]:
                if serial not in fresh:
                    self.proxy.registry.unbind(serial)  # removed PBX: forget it now
            self._stamp = stamp
            if added or removed or not force:
                log.info("event=directory_loaded pbx_count=%d added=%d removed=%d",
                         len(fresh), added, removed)
            return added, removed

    def registry_view(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [
            {"serial": r.serial, "transport": r.flow.transport, "ip": r.flow.remote_ip,
             "port": r.flow.remote_port, "expires_in": round(r.expires_at - now)}
            for r in self.proxy.registry.snapshot() if r.expires_at > now
        ]

    def metrics_text(self) -> tuple[str, str]:
        lines = []
        counters = dict(self.proxy.stats.c)
        counters["pbx_registered"] = len(self.proxy.registry)
        counters["flows_open"] = len(self.transports.conns)
        counters["invite_transactions"] = len(self.proxy.txns)
        counters["draining"] = int(self.draining)
        if self.media is not None:
            legs = [leg for s in self.media.sessions.values() for leg in s.legs()]
            counters["media_sessions"] = len(self.media.sessions)
            counters["media_ports_in_use"] = self.media.ports.in_use * 2
            counters["media_sessions_ended_total"] = self.media.ended_total
            # packets/bytes of live legs; ended legs are added when they close
            counters["media_packets_total"] = self.media.packets_total + sum(x.packets for x in legs)
            counters["media_bytes_total"] = self.media.octets_total + sum(x.octets for x in legs)
        for key in sorted(counters):
            name, _, label = key.partition(":")
            lbl = f'{{kind="{label}"}}' if label else ""
            lines.append(f"pbx_relay_{name}{lbl} {counters[key]}")
        return "text/plain; version=0.0.4", "\n".join(lines) + "\n"

    def _tls_files(self, cfg: RelayConfig) -> tuple[Path, Path]:
        if cfg["sip.tls_cert"]:
            return Path(cfg["sip.tls_cert"]), Path(cfg["sip.tls_key"])
        ips = [self.cfg.advertise] + [x.host for x in self.cfg.listeners("tls")]
        return ensure_self_signed(self.cfg.state_dir / "tls", self.cfg["relay.domain"], ips)

    def _load_tls(self, cfg: RelayConfig) -> tuple[ssl.SSLContext, str]:
        """A new server context from the files ``cfg`` names, and the certificate's
        SHA-256 fingerprint (as `openssl x509 -fingerprint -sha256` shows it)."""
        cert, key = self._tls_files(cfg)
        ctx = server_context(cert, key)
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        return ctx, leaf.fingerprint(hashes.SHA256()).hex()

    async def serve(
        self, task_status: trio.TaskStatus[dict[str, list[str]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.cfg
        if cfg.listeners("tls"):
            try:
                self.tls_context, self.tls_fingerprint = self._load_tls(cfg)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"{cfg.source}: sip.tls_cert/tls_key: cannot load "
                                  f"{cfg['sip.tls_cert'] or '<state_dir>/tls'}: {e}") from None
        self.timers_ran_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            if self.forwarder is not None:
                self.forwarder.attach(nursery)
            for listen in cfg.listeners("udp"):
                port = await nursery.start(self.transports.serve_udp, listen.host, listen.port)
                self.bound.setdefault("udp", []).append(f"{listen.host}:{port}")
            for t, c in (("tcp", None), ("tls", self._current_tls)):
                for listen in cfg.listeners(t):
                    port = await nursery.start(self.transports.serve_stream, t, listen.host, listen.port, c)
                    self.bound.setdefault(t, []).append(f"{listen.host}:{port}")
            admin = parse_listen(cfg["admin.listen"], "admin.listen", cfg.source)
            port = await nursery.start(serve_admin, admin.host, admin.port, {
                "/metrics": self.metrics_text,
                "/registry": lambda: as_json(self.registry_view()),
                "/healthz": lambda: ("text/plain", "ok\n"),
                "/readyz": self.readyz,
                f"POST {DIRECTORY_RELOAD}": directory_reload_route(lambda: self.reload_directory(force=True), cfg.state_dir, lambda: len(self._ha1)),  # noqa: E501 - contract helper's one-line touch
            })
            self.bound["admin"] = [f"{admin.host}:{port}"]
            await self._load_directory_once()
            await self._start_push(nursery)
            nursery.start_soon(self._timers)
            nursery.start_soon(self._directory_refresh)
            self.listening = True
            task_status.started(self.bound)

    def _current_tls(self) -> ssl.SSLContext:
        assert self.tls_context is not None
        return self.tls_context

    # -------------------------------------------------------------- lifecycle
    def readyz(self) -> tuple[str, str, int]:
        """200 once every listener is up and the push service (if any) answers; 503
        while starting, draining or when the push service does not answer."""
        if not self.listening:
            return "text/plain", "starting\n", 503
        if self.draining:
            return "text/plain", "draining\n", 503
        if self.push_problem is not None:
            return "text/plain", f"push: {self.push_problem}\n", 503
        return "text/plain", "ready\n", 200

    def in_progress(self) -> tuple[int, int]:
        """(calls whose media the relay anchors, INVITEs not answered yet): what a drain waits for."""
        calls = len(self.media.sessions) if self.media is not None else 0
        # Answered transactions linger (to absorb retransmissions); they hold nothing up.
        invites = self.proxy.txns.pending()
        return calls, invites

    def status_line(self) -> str:
        """The STATUS systemd shows (`systemctl status pbx-relay`)."""
        calls, invites = self.in_progress()
        line = (f"{len(self.proxy.registry)} PBXs registered, {len(self.transports.conns)} TCP/TLS flows, "
                f"{calls} calls, {invites} INVITEs pending")
        if self.draining:
            left = max(0, math.ceil(self.drain_until - trio.current_time()))
            return f"Draining ({left} s left at most): {line}"
        return f"Serving: {line}"

    async def check(self) -> str | None:
        """The watchdog's health check: the timer task (retransmissions, timeouts, media
        expiry) runs, and a worker thread (SQLite) can be had."""
        silent = trio.current_time() - self.timers_ran_at
        if silent > TIMERS_STALE:
            return f"timer task silent for {silent:.0f} s"
        await trio.to_thread.run_sync(lambda: None)
        return None

    async def reload(self, cfg: RelayConfig) -> None:
        """SIGHUP with the configuration read again: log level, TLS certificate and key
        (new connections get them; a bad pair keeps the old one), the PBX directory now.
        Other changed keys are named as needing a restart. Never raises."""
        level_changed = set_level(cfg["relay.log_level"])
        for k in ("log_level", "drain_timeout"):
            self.cfg.values["relay"][k] = cfg[f"relay.{k}"]
        tls = "off"
        if self.cfg.listeners("tls"):
            try:
                ctx, fingerprint = await trio.to_thread.run_sync(self._load_tls, cfg)
            except (OSError, ssl.SSLError, ValueError) as e:
                cert = cfg["sip.tls_cert"] or "<state_dir>/tls/cert.pem"
                log.error("event=reload_failed what=tls cert=%s error=%r (the old certificate stays)",
                          cert, e)
                tls = "kept_old"
            else:
                tls = "same" if fingerprint == self.tls_fingerprint else "new"
                self.tls_context, self.tls_fingerprint = ctx, fingerprint
                for k in ("tls_cert", "tls_key"):
                    self.cfg.values["sip"][k] = cfg[f"sip.{k}"]
        try:
            added, removed = await self.reload_directory(force=True)
            directory = f"pbx_count={len(self._ha1)} pbx_added={added} pbx_removed={removed}"
        except Exception as e:  # a locked or broken database must not stop the relay
            log.error("event=reload_failed what=directory error=%r", e)
            directory = "pbx_directory=kept_old"
        await self._reload_embedded_push()
        restart = [k for k in _changed_keys(self.cfg, cfg) if k not in RELOADABLE]
        log.info("event=reloaded log_level=%s%s tls=%s tls_sha256=%s %s restart_needed=%s",
                 cfg["relay.log_level"], "(changed)" if level_changed else "", tls,
                 self.tls_fingerprint[:16] or "-", directory, ",".join(restart) or "-")

    def _new_call(self, msg: SipMessage) -> bool:
        """An INVITE that would start a call: no To tag (not a re-INVITE) and no
        transaction yet (not a retransmission of one already forwarded)."""
        if not isinstance(msg, Request) or msg.method != "INVITE":
            return False
        try:
            if NameAddr.parse(msg.get("to") or "").tag:
                return False
        except SipParseError:
            return False  # the proxy answers or drops it as usual
        return not self.proxy.has_transaction(msg)

    def _refuse_new_call(self, msg: SipMessage, flow: Flow) -> None:
        """503 + Retry-After (RFC 3261 §21.5.4): a PBX or phone with another relay
        to go to goes there; the rest may try again once this one is back."""
        self.proxy.stats.inc("responses_sent_total:503")
        self.proxy.stats.inc("calls_refused_total:draining")
        retry = max(1, math.ceil(self.drain_until - trio.current_time()))
        # The same To tag for a retransmission (RFC 3261 §8.2.7), as the proxy's own refusals.
        tag = hmac.new(self.key, f"drain|{msg.call_id}|{msg.get('via')}".encode(), hashlib.sha256).hexdigest()
        resp = make_response(msg, 503, "Service Unavailable", to_tag=tag[:12],
                             extra=[("Retry-After", str(retry))])
        self.transports.send([Send(flow, resp.serialise())])

    async def drain(self) -> None:
        """SIGTERM: refuse new connections and new calls, wait for the calls and INVITEs in
        progress to end, at most relay.drain_timeout seconds. UDP, registrations and
        everything inside the current calls keep working meanwhile."""
        limit = float(self.cfg["relay.drain_timeout"])
        self.draining = True
        self.drain_until = trio.current_time() + limit
        self.transports.stop_accepting()
        calls, invites = self.in_progress()
        log.info("event=draining calls=%d invites=%d limit=%g", calls, invites, limit)
        started = trio.current_time()
        with trio.move_on_at(self.drain_until):
            while any(self.in_progress()):
                await trio.sleep(DRAIN_POLL)
            log.info("event=drained after=%.1f", trio.current_time() - started)
            return
        calls, invites = self.in_progress()
        log.warning("event=drain_timeout calls=%d invites=%d limit=%g", calls, invites, limit)

    async def _load_directory_once(self) -> None:
        self._stamp = await trio.to_thread.run_sync(self.directory.stamp)
        self._ha1.update(await trio.to_thread.run_sync(self.directory.load, self.cfg["relay.domain"]))


def banner(cfg: RelayConfig, bound: dict[str, list[str]]) -> str:
    domain = cfg["relay.domain"]
    adv = cfg.advertise
    lines = ["pbx-relay is running", ""]
    for t in ("udp", "tcp", "tls"):
        for b in bound.get(t, []):
            lines.append(f"  SIP {t.upper():3}  {b}")
    if cfg["media.enabled"]:
        lines.append(f"  RTP      {cfg.media_address} ports {cfg['media.port_min']}-{cfg['media.port_max']}")
    lines.append(f"  admin    http://{bound['admin'][0]}/metrics  /registry  /healthz  /readyz")
    if "push_api" in bound:
        lines.append(f"  push     API http://{bound['push_api'][0]}/v1  admin http://{bound['push_admin'][0]}/metrics")
    elif cfg["push.mode"] == "remote":
        lines.append(f"  push     {cfg['push.url']}")
    lines.append(f"  state    {cfg.state_dir.resolve()}")
    tls = bound.get("tls", [""])[0].rpartition(":")[2]
    tcp = bound.get("tcp", [""])[0].rpartition(":")[2]
    udp = bound.get("udp", [""])[0].rpartition(":")[2]
    lines += [
        "",
        "Point a PBX at it:",
        f"  {operator_command()} pbx add <serial>        (prints the PBX's secret, once)",
        f"  PBX registers sip:<serial>@{domain}, user <serial>, that secret,",
        f"  over TLS to {adv}:{tls} (or TCP {adv}:{tcp}).",
        "Point a softphone at it:",
        f"  SIP domain <serial>.{domain}, outbound proxy sip:{adv}:{udp} (UDP/TCP)",
        f"  or sip:{adv}:{tls};transport=tls; user and password are the PBX's extension.",
    ]
    return "\n".join(lines)


def _changed_keys(old: RelayConfig, new: RelayConfig) -> list[str]:
    return [f"{s}.{k}" for s, keys in new.values.items() for k, v in keys.items()
            if old.values.get(s, {}).get(k) != v]


async def run(
    cfg: RelayConfig, reload_config: Callable[[], RelayConfig] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Serve until stopped: SIGHUP reloads (``reload_config`` reads the configuration
    again), SIGTERM drains first (up to relay.drain_timeout), SIGINT and a second
    signal stop at once (pbxcore.lifecycle). Tells systemd through ``notifier``."""
    service = RelayService(cfg)
    notify = notifier or Notifier.from_environ()

    async def reload() -> None:
        try:
            fresh = reload_config() if reload_config is not None else cfg
        except (ConfigError, OSError) as e:
            log.error("event=reload_failed what=config error=%s (nothing changed)", e)
            return
        await service.reload(fresh)

    async def status() -> str:
        return service.status_line()

    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(service.serve)
            print(banner(cfg, bound), flush=True, file=sys.stdout)
            await supervise(signals, notify, status=status, check=service.check, reload=reload,
                            drain=service.drain)
            nursery.cancel_scope.cancel()
