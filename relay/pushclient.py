"""How the relay reaches the push service: in the same process, or over its HTTP API.

DESIGN §4: ``push`` never imports ``relay``; the relay talks to the push service
through this client. ``pbx-relay run`` uses :class:`InProcessPush` (one trio
run for both services); a relay next to a separate ``pbx-push`` uses
:class:`HttpPush` with a token of scope ``relay``.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from push.model import PushTarget
from push.service import DeviceUpdate, PushService, WakeRequest

# HTTP connection pools of HttpPush. A wake holds its connection until the push is
# out, up to the ring timeout (+5 s) while a provider is down; over HTTP/1.1 (plain
# HTTP on loopback) that is one connection per held call, so wakes get a pool sized
# for the calls the relay may hold at once, and device updates (every REGISTER with
# push parameters) a small one of their own that wakes can never exhaust. Over TLS
# both negotiate HTTP/2 and multiplex.
WAKE_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
DEVICE_LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=20)


class PushClient(Protocol):
    """A device is a push target registered by one user (``username``, the AOR's user
    part) at one PBX (``serial``): every verb names all three."""

    async def device_seen(self, update: DeviceUpdate) -> None: ...

    async def device_gone(self, target: PushTarget, serial: str, username: str) -> None: ...

    async def wake(
        self, target: PushTarget, serial: str, username: str, call_id: str, caller: str, callee: str,
        src: str, ring_timeout: float,
    ) -> str:
        """Send the push; return its outcome (push.model.Outcome value)."""
        ...

    async def aclose(self) -> None: ...


class InProcessPush:
    def __init__(self, service: PushService):
        self.service = service

    async def device_seen(self, update: DeviceUpdate) -> None:
        await self.service.register_device(update)

    async def device_gone(self, target: PushTarget, serial: str, username: str) -> None:
        await self.service.unregister_device(self.service.device_id(target, serial, username))

    async def wake(
        self, target: PushTarget, serial: str, username: str, call_id: str, caller: str, callee: str,
        src: str, ring_timeout: float,
    ) -> str:
        result = await self.service.wake(WakeRequest(
            self.service.device_id(target, serial, username), call_id, caller, callee, src, ring_timeout,
            serial=serial))
        return result.outcome.value

    async def aclose(self) -> None:
        pass


class HttpPush:
    """The push service's API (push/api.py) with a bearer token of scope ``relay``.

    Two clients, two connection pools (:data:`WAKE_LIMITS`, :data:`DEVICE_LIMITS`):
    wakes waiting on a slow provider never keep a registration from reaching the
    service. HTTP/2 when TLS negotiates it, HTTP/1.1 otherwise."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None, timeout: float = 5.0):
        def client(limits: httpx.Limits) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=url.rstrip("/"), headers={"authorization": f"Bearer {token}"},
                verify=ca_file or True, timeout=timeout, limits=limits, http1=True, http2=True,
            )

        self._devices = client(DEVICE_LIMITS)
        self._wakes = client(WAKE_LIMITS)

    @staticmethod
    def _device(target: PushTarget, serial: str, username: str) -> dict[str, str]:
        return {"provider": target.provider, "token": target.token, "param": target.param,
                "serial": serial, "username": username}

    async def device_seen(self, update: DeviceUpdate) -> None:
        r = await self._devices.put("/v1/devices", json={
            **self._device(update.target, update.serial, update.username),
            "ip": update.ip, "port": update.port, "transport": update.transport,
        })
        r.raise_for_status()

    async def device_gone(self, target: PushTarget, serial: str, username: str) -> None:
        r = await self._devices.post("/v1/devices/unregister", json=self._device(target, serial, username))
        r.raise_for_status()

    async def wake(
        self, target: PushTarget, serial: str, username: str, call_id: str, caller: str, callee: str,
        src: str, ring_timeout: float,
    ) -> str:
        r = await self._wakes.post("/v1/wake", json={
            **self._device(target, serial, username), "call_id": call_id, "caller": caller,
            "callee": callee, "src": src, "ring_timeout": ring_timeout,
        }, timeout=ring_timeout + 5.0)
        r.raise_for_status()
        return str(r.json()["outcome"])

    async def aclose(self) -> None:
        try:
            await self._wakes.aclose()
        finally:
            await self._devices.aclose()
