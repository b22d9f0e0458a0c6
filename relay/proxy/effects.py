"""What the sans-I/O proxy asks the shell to do: the one output channel of the core.

Every entry point of :class:`relay.proxy.core.Proxy` returns a list of these, in the
order they must be carried out (a ``BindPorts`` before the ``Send`` whose SDP names
the ports, the 100 Trying before the forwarded INVITE). The shell executes them and
reports what came of the asynchronous ones through the proxy's ``on_*`` methods
(aioquic's shape: events in, effects out; nothing calls back into I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pbxcore.wire import PushTarget, WakeRequest
from relay.media.effects import BindPorts, CloseLeg, MediaEffect, OpenLeg, RelatchLeg
from relay.proxy.flow import Flow

if TYPE_CHECKING:  # forwarding imports replies, which imports this module
    from relay.proxy.forwarding import Hop


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


@dataclass(frozen=True, slots=True)
class ClaimPbx:
    """Cluster (docs/cluster.md): PBX ``serial`` registered here on ``flow`` for ``ttl``
    seconds; the shared state learns that this node holds it (the latest claim wins)."""

    serial: str
    flow: Flow
    ttl: float


@dataclass(frozen=True, slots=True)
class ReleasePbx:
    """Cluster: PBX ``serial`` is no longer registered here (flow closed, expired,
    de-registered); the shared state forgets it, unless another node claimed it since."""

    serial: str


# What came of a LocatePbx (the ``outcome`` of Proxy.on_located).
LOCATED = "located"  # another node holds the PBX: the request goes to it
NOWHERE = "nowhere"  # no node holds it: 480, as for an offline PBX
LOCATE_FAILED = "failed"  # the shared state or the node did not answer in time: 503
LOCATE_BUSY = "busy"  # too many lookups in flight (cluster.max_pending_lookups): 503


@dataclass(frozen=True, slots=True)
class LocatePbx:
    """Cluster: a request for PBX ``serial``, which is not registered here. The shell
    asks which node holds it (its holder cache, else the shared state), opens (or
    reuses) the link to that node and reports with ``Proxy.on_located(locate,
    link_flow, outcome, now)``. ``hop`` is the request on its way, opaque to the shell.

    ``fresh``: the node the cache named answered that it no longer holds the PBX: the
    shell forgets its entry and asks the shared state. ``retry``: the key of the INVITE
    transaction that got that answer (``hop`` is then None): on LOCATED the core sends
    the same INVITE again on the new link; the caller never sees the stale node's 480.
    ``node``: the request follows a Path or Record-Route token another node minted, for
    a phone whose flow is on that node: the shell opens (or reuses) the link to ``node``
    without asking which node holds ``serial``; NOWHERE (no such live node) → 430."""

    serial: str
    hop: Hop | None
    fresh: bool = False
    retry: tuple[str, ...] = ()
    node: str = ""  # a token minted by this node names the phone's flow: go there, no lookup


@dataclass(frozen=True, slots=True)
class ShareBan:
    """Cluster: this node banned ``ip`` for ``seconds`` for wrong digest responses; every
    node learns it and bans it too (``Proxy.on_shared_ban``)."""

    ip: str
    seconds: float


@dataclass(frozen=True, slots=True)
class AwaitDevice:
    """Cluster: an INVITE is held here for device ``device`` (relay/proxy/crosswake.py)
    for ``seconds``; the shared state says so, for a node the phone registers through."""

    device: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Woken:
    """Cluster: device ``device`` registered again through this node; if another node
    awaits it, ``message`` goes to that node over their link (relay/proxy/crosswake.py)."""

    device: str
    message: bytes


@dataclass(frozen=True, slots=True)
class ForgetPbx:
    """Cluster: the node this one forwarded a request to for PBX ``serial`` answered
    that it does not hold it (any more): the shell drops what its holder cache says
    of ``serial``, so the next request asks the shared state."""

    serial: str


ClusterEffect = ClaimPbx | ReleasePbx | LocatePbx | ForgetPbx | ShareBan | AwaitDevice | Woken


Effect = Send | PushEffect | MediaEffect | ClusterEffect

__all__ = [
    "LOCATED", "LOCATE_BUSY", "LOCATE_FAILED", "NOWHERE",
    "AwaitDevice", "BindPorts", "ClaimPbx", "CloseLeg", "ClusterEffect", "DeviceGone", "DeviceSeen", "Effect",
    "ForgetPbx", "LocatePbx", "MediaEffect", "OpenLeg", "PushEffect", "RelatchLeg", "ReleasePbx", "Send",
    "ShareBan", "Wake", "Woken",
]
