"""The relay service: one trio task tree around the sans-I/O proxy (I/O, tasks, drain and reload only)."""

from __future__ import annotations

import hashlib
import hmac
import importlib.machinery
import ipaddress
import logging
import math
import os
import secrets
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pbxcore.errors import StateError
from pbxcore.journal import set_level
from pbxcore.lifecycle import SIGNALS, supervise
from pbxcore.sdnotify import Notifier
from relay.admin import DIRECTORY_RELOAD, as_json, directory_reload_route, serve_admin
from relay.cli import operator_command
from relay.cluster.links import LinkTls
from relay.cluster.node import ClusterNode, NodeSettings
from relay.config import ConfigError, RelayConfig
from relay.dispatch import Dispatcher
from relay.media.kernel import ForwardingBackend, make_backend
from relay.media.ports import PortPool
from relay.media.session import MediaSessions
from relay.metrics import Gauges, Labelled, RelayCollector, relay_metrics
from relay.pbx.digest import DigestAuth
from relay.pbx.shared import MirroredDirectory, node_directory
from relay.provisioning import ProvisioningServer, ProvisioningSettings, serve_provisioning
from relay.proxy import core as proxy_core
from relay.proxy.core import Proxy, ProxyConfig
from relay.proxy.effects import Send
from relay.proxy.invites import PendingLimits
from relay.pushlink import PushLink
from relay.transport.flows import Transports
from relay.transport.limits import StreamTimeouts, TransportLimits
from relay.transport.tlscert import ensure_self_signed, server_context

log = logging.getLogger("relay")

TRUST_REFRESH = 0.5  # seconds: how stale the transport's view of customers may be
DIRECTORY_POLL = 2.0  # seconds between checks for PBXs added or removed by the CLI
DRAIN_POLL = 0.2  # seconds between two looks at what is left to finish while draining
# The timer task wakes at least once a second (the proxy's sweep): silent this long, it
# is stuck or the event loop is, and the watchdog ping is withheld.
TIMERS_STALE = 5.0
# What SIGHUP applies; any other key that changed needs a restart (the reload says which).
RELOADABLE = frozenset({"relay.log_level", "relay.drain_timeout", "sip.tls_cert", "sip.tls_key"})


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


def node_key(cfg: RelayConfig) -> bytes:
    """The key of flow tokens, digest nonces and branches. One node: relay.key in the
    state directory. A cluster: derived from [cluster] secret, so that every node — every
    worker, every machine — verifies what any other minted (a Record-Route or Path
    token, the nonce of a 401 whose retry lands on another node); docs/cluster.md."""
    if cfg.cluster.redis_url:
        return hmac.new(cfg.cluster.secret.encode(), b"pbx-relay node key", hashlib.sha256).digest()
    return load_key(cfg.state_dir)


def proxy_config(cfg: RelayConfig) -> ProxyConfig:
    """What the core needs of relay.toml."""
    ports = {t: ls[0].port for t in ("udp", "tcp", "tls") if (ls := cfg.listeners(t))}
    if cfg.cluster.redis_url:
        ports["cluster"] = cfg.cluster_listen.port
    names = {listen.host for t in ("udp", "tcp", "tls") for listen in cfg.listeners(t)}
    return ProxyConfig(
        domain=cfg.relay.domain, advertise=cfg.advertise, ports=ports, local_names=frozenset(names),
        pbx_expires_default=cfg.sip.pbx_expires_default, pbx_expires_min=cfg.sip.pbx_expires_min,
        pbx_expires_max=cfg.sip.pbx_expires_max, push=cfg.push.mode != "off",
        ring_timeout=cfg.push.ring_timeout, udp_asleep_after=cfg.push.udp_asleep_after,
        # As the kernel writes a peer ("::1", not "0::1"): the transport's set is the same.
        exempt_sources=frozenset(str(ipaddress.ip_address(a)) for a in cfg.transport.exempt),
        pending=PendingLimits(cfg.limits.pending_invites_per_source, cfg.limits.pending_invites_per_pbx),
        auth_failures_before_ban=cfg.limits.auth_failures_before_ban,
        auth_first_ban=cfg.limits.auth_first_ban,
        cluster=bool(cfg.cluster.redis_url), cluster_key=cfg.cluster.secret.encode(),
        node_id=cfg.node_id if cfg.cluster.redis_url else "",
    )


TRANSPORT_GAUGES = {
    "flows_open": "TCP/TLS connections open",
    "flows_queued_bytes": "Bytes queued to TCP/TLS peers beyond their socket buffers",
    "tls_handshakes_in_progress": "TLS handshakes not finished yet",
    "udp_sources_tracked": "UDP sources with a rate budget in memory",
    "udp_sources_banned": "UDP sources banned in the kernel for flooding",
}


PROVISIONING_LABELS = {"provisioning_requests_total": "outcome", "provisioning_aborted_total": "reason"}


class RelayService:
    """Owns the sockets, the tasks and the lifecycle; every SIP decision is the proxy's."""

    def __init__(self, cfg: RelayConfig, reuse_port: bool = False):
        self.cfg = cfg
        self.key = node_key(cfg)
        self.directory = node_directory(cfg.state_dir, cfg.cluster.redis_url)
        auth = DigestAuth(self.key, cfg.relay.domain, tuple(cfg.sip.digest_algorithms))
        self.forwarder: ForwardingBackend | None = None
        self.media_backend = "off"
        self.media: MediaSessions | None = None
        # Addresses of registered PBXs and their phones: the transport keeps headroom
        # for them (relay/transport/admission.py); refreshed by _timers.
        self.trusted_sources: frozenset[str] = frozenset()
        self._trusted_at = -math.inf
        if cfg.media.enabled:
            self.forwarder, self.media_backend = make_backend(
                cfg.media.backend, cfg.media_address, self._count,
                port_range=(cfg.media.port_min, cfg.media.port_max),
                no_media_timeout=cfg.media.no_media_timeout, fast_path=cfg.media.kernel_fast_path)
            self.media = MediaSessions(
                cfg.media_address, PortPool(cfg.media.port_min, cfg.media.port_max),
                cfg.media.no_media_timeout, cfg.limits.media_calls_per_source, cfg.limits.media_calls_per_pbx)
        self.proxy = Proxy(proxy_config(cfg), self.key, auth, self.media)
        self.dispatch = Dispatcher(self.proxy, self._send, self.forwarder)
        self.transports = Transports(
            self.dispatch,
            StreamTimeouts(cfg.sip.flow_idle_timeout, cfg.sip.partial_message_timeout),
            TransportLimits.from_section(vars(cfg.transport)),
            trusted=self._is_trusted,
        )
        self.transports.reuse_port = reuse_port  # one of `--workers N` (relay/workers.py)
        self.push = PushLink(cfg, self.proxy.counters, self.dispatch.on_wake_result, shared=reuse_port)
        self.cluster = cluster_node(cfg, self.transports, self.dispatch, self.proxy)
        self.bound: dict[str, list[str]] = {}
        self._directory_stamp = -1.0
        self._directory_size = 0
        self._directory_lock = trio.Lock()
        # Lifecycle (pbxcore.lifecycle): SIGHUP swaps the TLS context new connections get;
        # SIGTERM drains (no new connections or calls, the current ones finish).
        self.tls_context: ssl.SSLContext | None = None
        self.tls_fingerprint = ""
        self.listening = False
        self.draining = False
        self.drain_until = math.inf
        self.timers_ran_at = 0.0
        self.provisioning: ProvisioningServer | None = None

    def _send(self, out: list[Send]) -> None:
        self.transports.send_many((s.flow, s.data) for s in out)

    def _count(self, name: str, n: int = 1) -> None:
        """The forwarder's counters (``name`` or ``name:label``)."""
        self.dispatch.count(name, n)

    def _is_trusted(self, ip: str) -> bool:
        if ip in self.trusted_sources:
            return True
        # A PBX that registered a moment ago is trusted at once; a stranger's flood
        # costs at most one recomputation per TRUST_REFRESH.
        now = trio.current_time()
        if now - self._trusted_at < TRUST_REFRESH:
            return False
        self._trusted_at = now
        self.trusted_sources = self.proxy.customer_ips()
        return ip in self.trusted_sources

    # ------------------------------------------------------------------ tasks
    async def serve(
        self, task_status: trio.TaskStatus[dict[str, list[str]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.cfg
        if cfg.listeners("tls") or cfg.provisioning.enabled:
            try:
                self.tls_context, self.tls_fingerprint = self._load_tls(cfg)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"{cfg.source}: sip.tls_cert/tls_key: cannot load "
                                  f"{cfg.sip.tls_cert or '<state_dir>/tls'}: {e}") from None
        self.timers_ran_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            if self.forwarder is not None:
                self.forwarder.attach(nursery)
            self.dispatch.run(self.proxy.start(trio.current_time(), time.time()))
            await self._listen(nursery)
            if self.cluster is not None:
                self.bound["cluster"] = [await nursery.start(self.cluster.serve)]
                self.dispatch.cluster = self.cluster.submit
            await self._load_directory()
            await self.push.start(nursery)
            self.dispatch.push = self.push.submit
            self.bound.update(self.push.bound)
            nursery.start_soon(self._timers)
            nursery.start_soon(self._directory_refresh)
            self.listening = True
            task_status.started(self.bound)

    async def _listen(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        for listen in cfg.listeners("udp"):
            port = await nursery.start(self.transports.serve_udp, listen.host, listen.port)
            self.bound.setdefault("udp", []).append(f"{listen.host}:{port}")
        for t, c in (("tcp", None), ("tls", self._current_tls)):
            for listen in cfg.listeners(t):
                port = await nursery.start(self.transports.serve_stream, t, listen.host, listen.port, c)
                self.bound.setdefault(t, []).append(f"{listen.host}:{port}")
        admin = cfg.admin_listen
        port = await nursery.start(serve_admin, admin.host, admin.port, {
            "/metrics": relay_metrics(RelayCollector(self.proxy.counters, self.metric_gauges,
                                                     self.metric_components)),
            "/registry": lambda: as_json(self.registry_view()),
            "/healthz": lambda: ("text/plain", "ok\n"),
            "/readyz": self.readyz,
            f"POST {DIRECTORY_RELOAD}": directory_reload_route(
                lambda: self.reload_directory(force=True), cfg.state_dir, lambda: self._directory_size),
        })
        self.bound["admin"] = [f"{admin.host}:{port}"]
        if cfg.provisioning.enabled:
            self.provisioning = await nursery.start(
                serve_provisioning, ProvisioningSettings.from_config(cfg.__getitem__),
                self.proxy.registrar.directory_entry, self._current_tls, cfg.state_dir)
            self.bound["provisioning"] = self.provisioning.bound

    async def _timers(self) -> None:
        dispatch = self.dispatch
        while True:
            self.timers_ran_at = trio.current_time()
            # A fresh event before reading the next deadline (no checkpoint between):
            # an earlier timer armed from now on wakes us; one set by the last
            # on_timer's own effects must not (it made this loop spin at 100 % CPU).
            dispatch.timer_moved = trio.Event()
            dispatch.armed = self.proxy.next_timer()
            with trio.move_on_at(dispatch.armed):
                await dispatch.timer_moved.wait()
            dispatch.on_timer()

    # -------------------------------------------------------------- directory
    async def _directory_refresh(self) -> None:
        failing = False  # one line when reading starts failing, one when it works again
        while True:
            try:
                await self.reload_directory()
            except Exception as e:  # out of descriptors, a locked database, Redis away
                if not failing:
                    log.warning("event=directory_reload_failed error=%r (the loaded directory stays)", e)
                failing = True
            else:
                if failing:
                    log.info("event=directory_reload_back")
                failing = False
            await trio.sleep(DIRECTORY_POLL)

    async def _load_directory(self) -> None:
        directory, realm = self.directory, self.cfg.relay.domain
        try:
            if isinstance(directory, MirroredDirectory):
                # The PBXs of this node's own pbx.sqlite the cluster lacks (relay/pbx/shared.py).
                adopted = await trio.to_thread.run_sync(directory.adopt_local)
                if adopted:
                    log.info("event=directory_adopted count=%d into=%s", adopted, directory.where)
            stamp = await trio.to_thread.run_sync(directory.stamp)
            fresh = await trio.to_thread.run_sync(directory.load, realm)
        except StateError as e:
            if not isinstance(directory, MirroredDirectory):
                raise
            # Redis away at start: this node's copy until it answers (the poll reads it).
            log.warning("event=directory_unreachable error=%s (this node's copy is used; "
                        "read again every %g s)", e, DIRECTORY_POLL)
            stamp, fresh = -1.0, await trio.to_thread.run_sync(directory.local.load, realm)
        self._directory_stamp = stamp
        self._directory_size = len(fresh)
        self.proxy.on_directory(fresh)

    async def reload_directory(self, force: bool = False) -> tuple[int, int]:
        """Re-read the PBX directory when it changed (``force``: anyway, SIGHUP); returns
        (PBXs added, PBXs removed)."""
        async with self._directory_lock:
            stamp = await trio.to_thread.run_sync(self.directory.stamp)
            if stamp == self._directory_stamp and not force:
                return 0, 0
            fresh = await trio.to_thread.run_sync(self.directory.load, self.cfg.relay.domain)
            old = self.proxy.registrar.directory
            added = len(fresh.keys() - old.keys())
            removed = len(old.keys() - fresh.keys())
            self.proxy.on_directory(fresh)
            self._directory_stamp = stamp
            self._directory_size = len(fresh)
            if added or removed or not force:
                log.info("event=directory_loaded pbx_count=%d added=%d removed=%d",
                         len(fresh), added, removed)
            return added, removed

    # ------------------------------------------------------------------ views
    def registry_view(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [
            {"serial": r.serial, "transport": r.flow.transport, "ip": r.flow.remote_ip,
             "port": r.flow.remote_port, "expires_in": round(r.expires_at - now)}
            for r in self.proxy.registrations() if r.expires_at > now
        ]

    def metric_gauges(self) -> Gauges:
        """The shell's gauges for /metrics: sizes read now."""
        gauges: dict[str, tuple[str, float]] = {
            "pbx_registered": ("PBXs registered now", len(self.proxy.registrar.registry)),
            "invite_transactions": ("INVITE transactions kept (live and lingering)", len(self.proxy.txns)),
            "draining": ("1 while the relay drains before stopping", int(self.draining)),
        }
        for name, value in self.transports.gauges().items():
            gauges[name] = (TRANSPORT_GAUGES[name], value)
        if self.cluster is not None:
            gauges.update(self.cluster.gauges())
        if self.media is not None:
            gauges["media_sessions"] = ("Calls whose media the relay anchors", len(self.media.sessions))
            gauges["media_ports_in_use"] = ("UDP ports held by calls", self.media.ports.in_use * 2)
            gauges["media_ports_bound"] = ("UDP ports bound, held by calls or idle for reuse",
                                           self.media.ports.held * 2)
            packets, octets = self.media.relayed()
            gauges["media_packets_total"] = ("RTP/RTCP packets relayed", packets)
            gauges["media_bytes_total"] = ("RTP/RTCP bytes relayed", octets)
            gauges["media_sessions_ended_total"] = ("Media sessions ended, for any reason",
                                                    self.media.ended_total)
        return gauges

    def metric_components(self) -> list[Labelled]:
        """Components that keep labelled counts of their own (provisioning)."""
        if self.provisioning is None:
            return []
        return [(self.provisioning.counters(), PROVISIONING_LABELS, "Provisioning through the relay")]

    def readyz(self) -> tuple[str, str, int]:
        """200 once every listener is up and the push service (if any) answers; 503
        while starting, draining or when the push service does not answer."""
        if not self.listening:
            return "text/plain", "starting\n", 503
        if self.draining:
            return "text/plain", "draining\n", 503
        if self.push.problem is not None:
            return "text/plain", f"push: {self.push.problem}\n", 503
        if self.cluster is not None and self.cluster.problem is not None:
            return "text/plain", f"cluster: {self.cluster.problem}\n", 503
        return "text/plain", "ready\n", 200

    def in_progress(self) -> tuple[int, int]:
        """(calls whose media the relay anchors, INVITEs not answered yet): what a drain waits for."""
        calls = len(self.media.sessions) if self.media is not None else 0
        # Answered transactions linger (to absorb retransmissions); they hold nothing up.
        return calls, self.proxy.pending_invites

    def status_line(self) -> str:
        """The STATUS systemd shows (`systemctl status pbx-relay`)."""
        calls, invites = self.in_progress()
        line = (f"{len(self.proxy.registrar.registry)} PBXs registered, {len(self.transports.conns)} "
                f"TCP/TLS flows, {calls} calls, {invites} INVITEs pending")
        if self.forwarder is not None:
            streams = self.proxy.counters.get
            kernel = streams("media_streams_forwarded", "kernel")
            user = streams("media_streams_forwarded", "userspace")
            line += f", media ({self.media_backend}): {kernel} streams in the kernel, {user} in userspace"
        if self.draining:
            left = max(0, math.ceil(self.drain_until - trio.current_time()))
            return f"Draining ({left} s left at most): {line}"
        return f"Serving: {line}"

    # -------------------------------------------------------------- lifecycle
    def _load_tls(self, cfg: RelayConfig) -> tuple[ssl.SSLContext, str]:
        """A new server context from the files ``cfg`` names, and the certificate's
        SHA-256 fingerprint (as `openssl x509 -fingerprint -sha256` shows it)."""
        cert, key = tls_files(cfg, self.cfg)
        ctx = server_context(cert, key)
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        return ctx, leaf.fingerprint(hashes.SHA256()).hex()

    def _current_tls(self) -> ssl.SSLContext:
        assert self.tls_context is not None
        return self.tls_context

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
        level_changed = set_level(cfg.relay.log_level)
        self.cfg.relay.log_level, self.cfg.relay.drain_timeout = cfg.relay.log_level, cfg.relay.drain_timeout
        tls = await self._reload_tls(cfg)
        try:
            added, removed = await self.reload_directory(force=True)
            directory = f"pbx_count={self._directory_size} pbx_added={added} pbx_removed={removed}"
        except Exception as e:  # a locked or broken database must not stop the relay
            log.error("event=reload_failed what=directory error=%r", e)
            directory = "pbx_directory=kept_old"
        await self.push.reload()
        restart = [k for k in _changed_keys(self.cfg, cfg) if k not in RELOADABLE]
        log.info("event=reloaded log_level=%s%s tls=%s tls_sha256=%s %s restart_needed=%s",
                 cfg.relay.log_level, "(changed)" if level_changed else "", tls,
                 self.tls_fingerprint[:16] or "-", directory, ",".join(restart) or "-")

    async def _reload_tls(self, cfg: RelayConfig) -> str:
        if self.tls_context is None:  # neither SIP over TLS nor provisioning
            return "off"
        try:
            ctx, fingerprint = await trio.to_thread.run_sync(self._load_tls, cfg)
        except (OSError, ssl.SSLError, ValueError) as e:
            cert = cfg.sip.tls_cert or "<state_dir>/tls/cert.pem"
            log.error("event=reload_failed what=tls cert=%s error=%r (the old certificate stays)", cert, e)
            return "kept_old"
        same = fingerprint == self.tls_fingerprint
        self.tls_context, self.tls_fingerprint = ctx, fingerprint
        self.cfg.sip.tls_cert, self.cfg.sip.tls_key = cfg.sip.tls_cert, cfg.sip.tls_key
        return "same" if same else "new"

    async def drain(self) -> None:
        """SIGTERM: refuse new connections and new calls, wait for the calls and INVITEs in
        progress to end, at most relay.drain_timeout seconds. UDP, registrations and
        everything inside the current calls keep working meanwhile."""
        limit = float(self.cfg.relay.drain_timeout)
        self.draining = True
        self.drain_until = trio.current_time() + limit
        self.proxy.drain(self.drain_until)
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


def tls_files(cfg: RelayConfig, running: RelayConfig | None = None) -> tuple[Path, Path]:
    """(certificate, key) of SIP over TLS and provisioning: sip.tls_cert/tls_key of ``cfg``,
    else a self-signed pair made once in <state_dir>/tls for the names of ``running``
    (the configuration the service started with; default ``cfg``)."""
    if cfg.sip.tls_cert:
        return Path(cfg.sip.tls_cert), Path(cfg.sip.tls_key)
    base = running or cfg
    ips = [base.advertise] + [x.host for x in base.listeners("tls")]
    ips += [v.rpartition(":")[0].strip("[]") for v in base.provisioning.listen]
    return ensure_self_signed(base.state_dir / "tls", base.relay.domain, ips)


def link_tls(cfg: RelayConfig) -> LinkTls:
    """TLS of the links between nodes: the certificate and key SIP over TLS uses
    (sip.tls_cert/tls_key, else the self-signed pair in state_dir)."""
    cert, key = tls_files(cfg)
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    return LinkTls.of(server_context(cert, key), leaf.public_bytes(serialization.Encoding.DER))


def cluster_node(
    cfg: RelayConfig, transports: Transports, dispatch: Dispatcher, proxy: Proxy,
) -> ClusterNode | None:
    """This relay as a node of a cluster, when [cluster] redis_url is set (docs/cluster.md)."""
    c = cfg.cluster
    if not c.redis_url:
        return None
    listen = cfg.cluster_listen
    settings = NodeSettings(
        node_id=cfg.node_id, redis_url=c.redis_url, listen_host=listen.host, listen_port=listen.port,
        advertise=c.advertise, secret=c.secret.encode(), timeout=c.timeout, heartbeat=c.heartbeat,
        max_links=c.max_links, max_pending_lookups=c.max_pending_lookups,
        lookup_cache_size=c.lookup_cache_size, lookup_cache_ttl=c.lookup_cache_ttl,
        link_tls=link_tls(cfg) if c.link_tls else None)
    return ClusterNode(settings, transports, dispatch.on_located, proxy.claim_token, proxy.registrations,
                       dispatch.count,
                       impose_ban=lambda ip, seconds: proxy.on_shared_ban(ip, seconds, trio.current_time()))


def core_build() -> str:
    """"compiled" when the protocol core (relay/sip, relay/proxy) runs as the C extensions
    of the compiled build (setup.py, docs/operations.md), else "python"."""
    where = proxy_core.__file__ or ""
    return "compiled" if where.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) else "python"


def banner(cfg: RelayConfig, bound: dict[str, list[str]]) -> str:
    domain = cfg.relay.domain
    adv = cfg.advertise
    lines = ["pbx-relay is running", ""]
    for t in ("udp", "tcp", "tls"):
        for b in bound.get(t, []):
            lines.append(f"  SIP {t.upper():3}  {b}")
    if cfg.media.enabled:
        lines.append(f"  RTP      {cfg.media_address} ports {cfg.media.port_min}-{cfg.media.port_max}")
    lines.append(f"  admin    http://{bound['admin'][0]}/metrics  /registry  /healthz  /readyz")
    for b in bound.get("provisioning", []):
        lines.append(f"  HTTPS    https://{b}/provisioning/<serial>/<path>  (PBX: pbx-relay link)")
    if "push_api" in bound:
        lines.append(f"  push     API http://{bound['push_api'][0]}/v1  admin http://{bound['push_admin'][0]}/metrics")
    elif cfg.push.mode == "remote":
        lines.append(f"  push     {cfg.push.url}")
    for b in bound.get("cluster", []):
        lines.append(f"  cluster  node {cfg.node_id}, links on {b}, "
                     f"shared state {_no_password(cfg.cluster.redis_url)}")
    lines.append(f"  state    {cfg.state_dir.resolve()}")
    if core_build() == "compiled":
        lines.append("  core     compiled with mypyc (setup.py)")
    else:
        lines.append("  core     Python (PBX_RELAY_COMPILE=1 pip install . compiles it: docs/operations.md)")
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


def _no_password(url: str) -> str:
    """A redis URL fit for a banner: the password, if any, left out."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]


def _changed_keys(old: RelayConfig, new: RelayConfig) -> list[str]:
    """``section.key`` of every value that differs between ``old`` and ``new``."""
    return [f"{s}.{k}" for s in new.sections() for k, v in vars(new.section(s)).items()
            if vars(old.section(s)).get(k) != v]


async def run(
    cfg: RelayConfig, reload_config: Callable[[], RelayConfig] | None = None,
    notifier: Notifier | None = None, reuse_port: bool = False,
) -> None:
    """Serve until stopped: SIGHUP reloads (``reload_config`` reads the configuration
    again), SIGTERM drains first (up to relay.drain_timeout), SIGINT and a second
    signal stop at once (pbxcore.lifecycle). Tells systemd through ``notifier``."""
    service = RelayService(cfg, reuse_port)
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
