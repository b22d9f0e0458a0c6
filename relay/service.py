"""The relay service: one trio task tree around the sans-I/O proxy."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from push.service import DeviceUpdate
from relay.admin import as_json, serve_admin
from relay.config import RelayConfig, parse_listen
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
from relay.sip.message import SipMessage
from relay.transport.flows import StreamTimeouts, Transports
from relay.transport.tlscert import ensure_self_signed, server_context

log = logging.getLogger("relay")

DIRECTORY_POLL = 2.0  # seconds between checks for PBXs added or removed by the CLI
PUSH_QUEUE = 10_000  # push events waiting for the push service at most; beyond, dropped and counted


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
        self.proxy = Proxy(self.proxy_cfg, self.key, self._ha1.get, auth, self.transports.alive, media)
        self._wake = trio.Event()
        self._armed = float("inf")
        self.bound: dict[str, list[str]] = {}
        self.push: PushClient | None = None
        self._push_in, self._push_queue = trio.open_memory_channel[PushEvent](PUSH_QUEUE)

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
        async with trio.open_nursery() as nursery:
            async for ev in self._push_queue:
                nursery.start_soon(self._push_event, ev)

    async def _push_event(self, ev: PushEvent) -> None:
        assert self.push is not None
        try:
            if isinstance(ev, DeviceSeen):
                f = ev.flow
                await self.push.device_seen(DeviceUpdate(
                    ev.target, ev.serial, ev.username, f.remote_ip, f.remote_port, f.transport))
            elif isinstance(ev, DeviceGone):
                await self.push.device_gone(ev.target)
            else:
                outcome = await self.push.wake(
                    ev.target, ev.call_id, ev.caller, ev.callee, ev.src, ev.ring_timeout)
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

            path = self.cfg["push.config"] or None
            overrides = {} if path else {"push.state_dir": str(self.cfg.state_dir / "push")}
            pcfg = push_config.load(path, overrides)
            running = await nursery.start(push_app.serve, pcfg)
            self.push = InProcessPush(running.service)
            self.bound["push_api"] = [running.addresses["api"]]
            self.bound["push_admin"] = [running.addresses["admin"]]
        if self.push is not None:
            nursery.start_soon(self._push_events)

    # ------------------------------------------------------------------ tasks
    async def _timers(self) -> None:
        while True:
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
            stamp = await trio.to_thread.run_sync(self.directory.stamp)
            if stamp != self._stamp:
                fresh = await trio.to_thread.run_sync(self.directory.load, self.cfg["relay.domain"])
                self._ha1.clear()
                self._ha1.update(fresh)
                for serial in [r.serial for r in self.proxy.registry.snapshot()]:
                    if serial not in fresh:
                        self.proxy.registry.unbind(serial)  # removed PBX: forget it now
                self._stamp = stamp
                log.info("event=directory_loaded pbx_count=%d", len(fresh))
            await trio.sleep(DIRECTORY_POLL)

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

    async def serve(
        self, task_status: trio.TaskStatus[dict[str, list[str]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.cfg
        ctx = None
        if cfg.listeners("tls"):
            if cfg["sip.tls_cert"]:
                cert, key = Path(cfg["sip.tls_cert"]), Path(cfg["sip.tls_key"])
            else:
                ips = [cfg.advertise] + [x.host for x in cfg.listeners("tls")]
                cert, key = ensure_self_signed(cfg.state_dir / "tls", cfg["relay.domain"], ips)
            ctx = server_context(cert, key)
        async with trio.open_nursery() as nursery:
            if self.forwarder is not None:
                self.forwarder.attach(nursery)
            for listen in cfg.listeners("udp"):
                port = await nursery.start(self.transports.serve_udp, listen.host, listen.port)
                self.bound.setdefault("udp", []).append(f"{listen.host}:{port}")
            for t, c in (("tcp", None), ("tls", ctx)):
                for listen in cfg.listeners(t):
                    port = await nursery.start(self.transports.serve_stream, t, listen.host, listen.port, c)
                    self.bound.setdefault(t, []).append(f"{listen.host}:{port}")
            admin = parse_listen(cfg["admin.listen"], "admin.listen", cfg.source)
            port = await nursery.start(serve_admin, admin.host, admin.port, {
                "/metrics": self.metrics_text,
                "/registry": lambda: as_json(self.registry_view()),
                "/healthz": lambda: ("text/plain", "ok\n"),
            })
            self.bound["admin"] = [f"{admin.host}:{port}"]
            await self._load_directory_once()
            await self._start_push(nursery)
            nursery.start_soon(self._timers)
            nursery.start_soon(self._directory_refresh)
            task_status.started(self.bound)

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
    lines.append(f"  admin    http://{bound['admin'][0]}/metrics  /registry  /healthz")
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
        "  pbx-relay pbx add <serial>        (prints the PBX's secret, once)",
        f"  PBX registers sip:<serial>@{domain}, user <serial>, that secret,",
        f"  over TLS to {adv}:{tls} (or TCP {adv}:{tcp}).",
        "Point a softphone at it:",
        f"  SIP domain <serial>.{domain}, outbound proxy sip:{adv}:{udp} (UDP/TCP)",
        f"  or sip:{adv}:{tls};transport=tls; user and password are the PBX's extension.",
    ]
    return "\n".join(lines)


async def run(cfg: RelayConfig) -> None:
    """Serve until SIGINT or SIGTERM, then cancel the whole task tree."""
    service = RelayService(cfg)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(service.serve)
            print(banner(cfg, bound), flush=True, file=sys.stdout)
            async for signum in signals:
                log.info("event=stopping signal=%s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
