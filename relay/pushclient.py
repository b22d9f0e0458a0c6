"""How the relay reaches the push service: in the same process, or over its HTTP API.

DESIGN §4: ``push`` never imports ``relay``; the relay talks to the push service
through this client. ``pbx-relay run`` uses :class:`InProcessPush` (one trio
run for both services); a relay next to a separate ``pbx-push`` uses
:class:`HttpPush` with a token of scope ``relay``.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from push.model import Outcome, PushTarget
from push.service import DeviceUpdate, PushService, WakeRequest

# Outcomes after which the phone may ring: the relay answers 180 and waits.
DELIVERED = frozenset({Outcome.SENT.value, Outcome.DRY_RUN.value})


class PushClient(Protocol):
    async def device_seen(self, update: DeviceUpdate) -> None: ...

    async def device_gone(self, target: PushTarget) -> None: ...

    async def wake(
        self, target: PushTarget, call_id: str, caller: str, callee: str, src: str, ring_timeout: float,
    ) -> str:
        """Send the push; return its outcome (push.model.Outcome value)."""
        ...

    async def aclose(self) -> None: ...


class InProcessPush:
    def __init__(self, service: PushService):
        self.service = service

    async def device_seen(self, update: DeviceUpdate) -> None:
        await self.service.register_device(update)

    async def device_gone(self, target: PushTarget) -> None:
        await self.service.unregister_device(self.service.device_id(target))

    async def wake(
        self, target: PushTarget, call_id: str, caller: str, callee: str, src: str, ring_timeout: float,
    ) -> str:
        result = await self.service.wake(WakeRequest(
            self.service.device_id(target), call_id, caller, callee, src, ring_timeout))
        return result.outcome.value

    async def aclose(self) -> None:
        pass


class HttpPush:
    """The push service's API (push/api.py) with a bearer token of scope ``relay``."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None, timeout: float = 5.0):
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers={"authorization": f"Bearer {token}"},
            verify=ca_file or True, timeout=timeout,
        )

    @staticmethod
    def _target(target: PushTarget) -> dict[str, str]:
        return {"provider": target.provider, "token": target.token, "param": target.param}

    async def device_seen(self, update: DeviceUpdate) -> None:
        r = await self._client.put("/v1/devices", json={
            **self._target(update.target), "serial": update.serial, "username": update.username,
            "ip": update.ip, "port": update.port, "transport": update.transport,
        })
        r.raise_for_status()

    async def device_gone(self, target: PushTarget) -> None:
        r = await self._client.post("/v1/devices/unregister", json=self._target(target))
        r.raise_for_status()

    async def wake(
        self, target: PushTarget, call_id: str, caller: str, callee: str, src: str, ring_timeout: float,
    ) -> str:
        r = await self._client.post("/v1/wake", json={
            **self._target(target), "call_id": call_id, "caller": caller, "callee": callee,
            "src": src, "ring_timeout": ring_timeout,
        }, timeout=ring_timeout + 5.0)
        r.raise_for_status()
        return str(r.json()["outcome"])

    async def aclose(self) -> None:
        await self._client.aclose()
