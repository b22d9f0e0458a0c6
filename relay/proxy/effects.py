"""What the sans-I/O proxy asks the shell to do: the one output channel of the core.

Every entry point of :class:`relay.proxy.core.Proxy` returns a list of these, in the
order they must be carried out (a ``BindPorts`` before the ``Send`` whose SDP names
the ports, the 100 Trying before the forwarded INVITE). The shell executes them and
reports what came of the asynchronous ones through the proxy's ``on_*`` methods
(aioquic's shape: events in, effects out; nothing calls back into I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

from pbxcore.wire import PushTarget, WakeRequest
from relay.media.effects import BindPorts, CloseLeg, MediaEffect, OpenLeg, RelatchLeg
from relay.proxy.flow import Flow


@dataclass(frozen=True, slots=True)
class Send:
    """Put ``data`` (one whole SIP message) on ``flow``."""

    flow: Flow
    data: bytes


@dataclass(frozen=True, slots=True)
class Wake:
    """Ask the push service to wake a phone for a held INVITE; report its outcome with
    ``Proxy.on_wake_result(key, outcome, now)``."""

    key: tuple[str, ...]  # the held INVITE's transaction key
    request: WakeRequest


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    """The PBX accepted a registration with push parameters from ``flow``: the push
    service learns the device's current address (the old one is replaced)."""

    target: PushTarget
    serial: str
    username: str
    flow: Flow


@dataclass(frozen=True, slots=True)
class DeviceGone:
    """The phone de-registered that binding (or switched push off, or got a new token):
    the push service forgets the device."""

    target: PushTarget
    serial: str
    username: str


PushEffect = Wake | DeviceSeen | DeviceGone


Effect = Send | PushEffect | MediaEffect

__all__ = [
    "BindPorts", "CloseLeg", "DeviceGone", "DeviceSeen", "Effect", "MediaEffect", "OpenLeg",
    "PushEffect", "RelatchLeg", "Send", "Wake",
]
