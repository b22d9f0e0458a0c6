"""Provisioning tests' peers: the origin web server (a real process), the relay's
provisioning port and the agent in this trio run, a TCP pipe that can cut or freeze a link."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import trio

from relay.pbx.digest import ha1
from relay.provisioning import ProvisioningServer, ProvisioningSettings, serve_provisioning
from relay.provisioning.agent import AgentSettings, run_agent
from relay.provisioning.policy import KeepaliveTimes
from relay.transport.tlscert import ensure_self_signed, server_context
from tests.realpeers import free_port

HERE = Path(__file__).resolve().parent
REALM = "relay.test"
SERIAL, OTHER = "0123456789", "9876543210"


@dataclass
class Origin:
    """The PBX's provisioning server (tests/provisioning_origin.py), a real HTTP server."""

    directory: Path
    url: str
    proc: subprocess.Popen[bytes]


@contextmanager
def origin(directory: Path, host: str = "127.0.0.1", netns: str | None = None) -> Iterator[Origin]:
    """Start the origin on a free port serving ``directory``; stop it (by PID) after."""
    port = free_port() if netns is None else 8080
    cmd = [sys.executable, str(HERE / "provisioning_origin.py"), str(directory), host, str(port)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert b"origin listening" in line, line
        yield Origin(directory, f"http://{host}:{port}", proc)
    finally:
        proc.kill()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def directory_of(secrets: dict[str, str]) -> dict[str, dict[str, str]]:
    """What the relay's PBX directory holds for these serials and secrets."""
    return {s: {a: ha1(a, s, REALM, secret) for a in ("MD5", "SHA-256")} for s, secret in secrets.items()}


@dataclass
class Relay:
    """The provisioning port in this trio run, its certificate, its PBXs."""

    server: ProvisioningServer
    cert: Path
    state_dir: Path
    secrets: dict[str, str]
    url: str
    nursery: trio.Nursery
    agents: list[trio.CancelScope] = field(default_factory=list)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        """A phone: HTTPS to the relay, trusting its self-signed certificate."""
        return httpx.AsyncClient(base_url=self.url, verify=ssl.create_default_context(cafile=str(self.cert)),
                                 trust_env=False, timeout=30, **kw)

    def agent_settings(self, serial: str, target: str, port: int | None = None, **kw: Any) -> AgentSettings:
        """An agent for ``serial`` reaching the relay (or a pipe on ``port``)."""
        relay_port = port or int(self.server.bound[0].rpartition(":")[2])
        return AgentSettings(relay_host="127.0.0.1", relay_port=relay_port, serial=serial,
                             secret=self.secrets[serial], target=target, ca_file=str(self.cert),
                             keepalive=KeepaliveTimes(0.5, 1.0), **kw)

    async def start_agent(self, settings: AgentSettings) -> trio.CancelScope:
        """Run an agent until the test ends (or its scope is cancelled)."""
        scope = trio.CancelScope()

        async def agent() -> None:
            with scope:
                await run_agent(settings)

        self.nursery.start_soon(agent)
        self.agents.append(scope)
        return scope

    async def wait_online(self, serial: str, links: int = 1) -> None:
        """Until ``serial`` has ``links`` links."""
        with trio.fail_after(15):
            while len(self.server.table.links.get(serial, [])) < links:
                await trio.sleep(0.02)


@asynccontextmanager
async def relay(tmp_path: Path, secrets: dict[str, str] | None = None,
                **overrides: Any) -> AsyncIterator[Relay]:
    """The provisioning port on 127.0.0.1 with ``overrides`` of its settings."""
    secrets = secrets or {SERIAL: "s3cret-one", OTHER: "s3cret-two"}
    cert, key = ensure_self_signed(tmp_path / "tls", "relay.test", ["127.0.0.1"])
    settings = replace(ProvisioningSettings(listen=("127.0.0.1:0",), realm=REALM,
                                            link_keepalive=0.5, link_keepalive_timeout=1.0), **overrides)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    table = directory_of(secrets)
    async with trio.open_nursery() as nursery:
        tls = server_context(cert, key)
        server = await nursery.start(serve_provisioning, settings, table.get, tls, state)
        r = Relay(server, cert, state, secrets, f"https://{server.bound[0]}", nursery)
        yield r
        nursery.cancel_scope.cancel()


class Pipe:
    """A TCP pipe between an agent and the relay that a test can cut or freeze: what a
    NAT or a broken cable does to the link."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.frozen = False
        self.streams: list[trio.SocketStream] = []

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free port; pipe every connection to the relay."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._pipe, listeners)

    async def _pipe(self, down: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        self.streams += [down, up]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._copy, down, up, nursery.cancel_scope)
            nursery.start_soon(self._copy, up, down, nursery.cancel_scope)

    async def _copy(self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                while self.frozen:
                    await trio.sleep(0.05)  # packets dropped: nothing gets through, nothing closes
                if not data:
                    break
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def cut(self) -> None:
        """Close every piped connection at once (both ends see the link go)."""
        for s in self.streams:
            await trio.aclose_forcefully(s)
        self.streams.clear()


def files(directory: Path) -> dict[str, bytes]:
    """Provisioning files of several kinds and sizes, written under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {
        "y000000000044.cfg": b"#!version:1.0.0.1\naccount.1.enable = 1\naccount.1.user_name = 201\n",
        "0004f2abcdef.xml": b"<?xml version='1.0'?><PHONE_CONFIG reg.1.address='201'/>",
        "firmware.rom": os.urandom(3 * 1024 * 1024 + 17),
        "empty.cfg": b"",
    }
    for name, data in out.items():
        (directory / name).write_bytes(data)
    return out


@asynccontextmanager
async def relay_online(tmp_path: Path, target: str, **overrides: Any) -> AsyncIterator[Relay]:
    """:func:`relay`, with SERIAL's agent linked and forwarding to ``target``."""
    async with relay(tmp_path, **overrides) as r:
        await r.start_agent(r.agent_settings(SERIAL, target))
        await r.wait_online(SERIAL)
        yield r
