"""Phones as devices: REGISTERs in flight, current flows, and where a phone that changed network went.

A device is an AOR user at a PBX with an instance id (RFC 5626 ``+sip.instance``,
with ``reg-id``) or a push token (RFC 8599). Only a registration the PBX accepted
moves a device; in-dialog requests for a phone that registered again from another
flow follow it there (RFC 5626 §4.2 in spirit) while the old flow is out of use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pbxcore.wire import PushTarget
from relay.proxy.counters import Counters
from relay.proxy.effects import DeviceGone, DeviceSeen, PushEffect
from relay.proxy.flow import Flow
from relay.proxy.liveness import Liveness
from relay.proxy.wake import Binding, granted_expires
from relay.sip.message import Response

log = logging.getLogger("relay.pbx")

# A REGISTER's answer is expected within Timer F (64*T1); after that the relay
# forgets which device it was for.
PENDING_REGISTER_TTL = 32.0
# REGISTERs awaiting the PBX's answer at most (each holds its device bindings).
MAX_PENDING_REGISTERS = 20_000
# Devices (instance id or push token) → flow the relay remembers at most, and how
# often expired ones are dropped (seconds).
MAX_DEVICES = 200_000
DEVICE_SWEEP = 60.0
# A phone that moved several times is followed this many hops, never in a loop.
MAX_MOVES_FOLLOWED = 4

DeviceKey = tuple[str, str, str | PushTarget]  # serial, AOR user, instance or push target


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """Where a device last registered from."""

    flow: Flow
    target: PushTarget | None
    until: float


@dataclass(frozen=True, slots=True)
class Moved:
    """A device left ``old`` (the key) for ``flow`` at ``since``."""

    flow: Flow
    serial: str
    since: float
    until: float


@dataclass(slots=True)
class PendingRegister:
    """A phone's REGISTER naming its device, forwarded, awaiting the PBX's answer."""

    serial: str
    username: str
    flow: Flow
    bindings: list[Binding]
    until: float
    path: str = ""  # the Path entry this node added (a cluster's woken message names it)


@dataclass(frozen=True, slots=True)
class Registered:
    """A push device the PBX just accepted: held calls for ``target`` may go to ``contact_uri``."""

    target: PushTarget
    contact_uri: str


class PhoneDevices:
    """The devices component; ``push`` says whether devices are reported to a push service."""

    def __init__(self, counters: Counters, liveness: Liveness, push: bool):
        self.counters = counters
        self.liveness = liveness
        self.push = push
        self._pending: dict[str, PendingRegister] = {}  # our REGISTER branch → device
        self._flows: dict[DeviceKey, KnownDevice] = {}
        self._moved: dict[Flow, Moved] = {}
        self._sweep_at = 0.0

    def note_register(
        self, branch: str, serial: str, username: str, source: Flow, bindings: list[Binding], now: float,
        path: str = "",
    ) -> None:
        """Remember a phone's REGISTER until the PBX answers it: only an accepted
        registration moves a device, updates the push service or releases a call."""
        if not bindings and not self._moved:
            return
        if len(self._pending) >= MAX_PENDING_REGISTERS:
            self.counters.inc("dropped_total", "pending_registers_full")
            return
        until = now + PENDING_REGISTER_TTL
        self._pending[branch] = PendingRegister(serial, username, source, bindings, until, path)

    def answered(self, branch: str) -> PendingRegister | None:
        """The REGISTER sent with ``branch`` got its final answer: what it was for, if anything."""
        return self._pending.pop(branch, None) if self._pending else None

    def registered(
        self, pending: PendingRegister, resp: Response, now: float,
    ) -> tuple[list[PushEffect], list[Registered]]:
        """The PBX said 2xx: note each device's flow; the push service's news, and
        the push devices whose held calls may now be released."""
        effects: list[PushEffect] = []
        released: list[Registered] = []
        # Whoever registers from a flow now owns it: a move recorded away from this
        # address (NAT port reuse by someone else) no longer applies.
        self._moved.pop(pending.flow, None)
        granted = granted_expires(resp)
        for b in pending.bindings:
            key = (pending.serial, pending.username, b.device)
            expires = granted.get(b.contact_uri, b.expires)
            if b.expires == 0 or expires == 0:
                gone = self._flows.pop(key, None)
                target = b.target or (gone.target if gone is not None else None)
                if target is not None and self.push:
                    effects.append(DeviceGone(target, pending.serial, pending.username))
                continue
            effects += self._note(key, b.target, pending.flow, pending.serial, now, now + expires)
            if b.target is None or not self.push:
                continue
            effects.append(DeviceSeen(b.target, pending.serial, pending.username, pending.flow))
            released.append(Registered(b.target, b.contact_uri))
        return effects, released

    def _note(
        self, key: DeviceKey, target: PushTarget | None, flow: Flow, serial: str, now: float, until: float,
    ) -> list[PushEffect]:
        prev = self._flows.get(key)
        if prev is None and len(self._flows) >= MAX_DEVICES:
            self.counters.inc("dropped_total", "devices_full")
            return []
        self._flows[key] = KnownDevice(flow, target, until)
        if prev is None:
            return []
        out: list[PushEffect] = []
        if prev.target is not None and prev.target != target and self.push:
            # Same phone (instance id), new push token: the old one is dead (DESIGN §3).
            out.append(DeviceGone(prev.target, key[0], key[1]))
        if prev.flow != flow and len(self._moved) < MAX_DEVICES:
            self._moved[prev.flow] = Moved(flow, serial, now, until)
            self.counters.inc("phone_moves_total")
            log.info("event=phone_moved serial=%s from=%s to=%s", serial, prev.flow, flow)
        return out

    def follow(self, flow: Flow, serial: str, now: float) -> Flow:
        """The flow a phone last registered from, if it registered again elsewhere —
        only while the old flow is out of use: a closed connection, or a UDP address
        that has not been heard from since the phone left it."""
        if not self._moved:
            return flow
        for _ in range(MAX_MOVES_FOLLOWED):
            nxt = self._moved.get(flow)
            if nxt is None or nxt.until < now or nxt.serial != serial:
                break
            if flow.reliable:
                if self.liveness.alive(flow):
                    break
            else:
                heard = self.liveness.heard_at(flow)
                if heard is not None and heard > nxt.since:
                    break
            flow = nxt.flow
        return flow

    def source_ips(self) -> set[str]:
        """Addresses of the devices the PBXs accepted (the transport's customers)."""
        return {d.flow.remote_ip for d in self._flows.values()}

    def sweep(self, now: float) -> None:
        """Drop REGISTERs never answered, and devices and moves past their expiry."""
        if self._pending:
            self._pending = {b: p for b, p in self._pending.items() if p.until > now}
        if now < self._sweep_at:
            return
        self._flows = {k: v for k, v in self._flows.items() if v.until >= now}
        self._moved = {k: v for k, v in self._moved.items() if v.until >= now}
        self._sweep_at = now + DEVICE_SWEEP
