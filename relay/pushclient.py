"""How the relay reaches the push service: in the same process, or over its HTTP API.

DESIGN §4: ``push`` never imports ``relay``; the relay talks to the push service
through this client. ``pbx-relay run`` uses :class:`InProcessPush` (one trio
run for both services); a relay next to a separate ``pbx-push`` uses
:class:`HttpPush` with a token of scope ``relay``.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from pbxcore.wire import (
    DeviceUpdate,
    PushTarget,
    WakeOutcome,
    WakeRequest,
    device_update_json,
    target_json,
    wake_request_json,
    wake_result_from_json,
)
from push.service import PushService
from push.service import WakeRequest as ResolvedWake

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

    async def wake(self, req: WakeRequest) -> WakeOutcome:
        """Send the push; return what it came to."""
        ...

    async def aclose(self) -> None: ...


class InProcessPush:
    """The push service in this process (``pbx-relay run``): calls, no HTTP."""

    def __init__(self, service: PushService):
        self.service = service

    async def device_seen(self, update: DeviceUpdate) -> None:
        await self.service.register_device(update)

    async def device_gone(self, target: PushTarget, serial: str, username: str) -> None:
        await self.service.unregister_device(self.service.device_id(target, serial, username))

    async def wake(self, req: WakeRequest) -> WakeOutcome:
        """Wake through the service's own call (it resolves the device by its key)."""
        result = await self.service.wake(ResolvedWake(
            req.resolve(self.service.key), req.call_id, req.caller, req.callee, req.src, req.ring_timeout,
            serial=req.serial))
        return result.outcome

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

    async def device_seen(self, update: DeviceUpdate) -> None:
        r = await self._devices.put("/v1/devices", json=device_update_json(update))
        r.raise_for_status()

    async def device_gone(self, target: PushTarget, serial: str, username: str) -> None:
        r = await self._devices.post("/v1/devices/unregister", json=target_json(target, serial, username))
        r.raise_for_status()

    async def wake(self, req: WakeRequest) -> WakeOutcome:
        """POST /v1/wake; the answer's outcome."""
        r = await self._wakes.post("/v1/wake", json=wake_request_json(req), timeout=req.ring_timeout + 5.0)
        r.raise_for_status()
        return wake_result_from_json(r.json()).outcome

    async def aclose(self) -> None:
        try:
            await self._wakes.aclose()
        finally:
            await self._devices.aclose()
