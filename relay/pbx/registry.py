"""The live registry: serial → the PBX's current flow, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from relay.proxy.flow import Flow


@dataclass(slots=True)
class PbxRegistration:
    serial: str
    flow: Flow  # transport + current external IP and port + our socket
    expires_at: float


class PbxRegistry:
    """In memory only: a restart forgets every binding and PBXs register again.

    A new registration replaces the old one — no earlier address is kept
    (DESIGN §3: "PBX serial, current external IP and port … never older addresses").
    """

    def __init__(self) -> None:
        self._by_serial: dict[str, PbxRegistration] = {}
        self._by_flow: dict[Flow, str] = {}

    def __len__(self) -> int:
        return len(self._by_serial)

    def bind(self, serial: str, flow: Flow, expires_at: float) -> PbxRegistration:
        old = self._by_serial.get(serial)
        if old is not None and old.flow != flow:
            self._by_flow.pop(old.flow, None)
        prev_serial = self._by_flow.get(flow)
        if prev_serial is not None and prev_serial != serial:
            self._by_serial.pop(prev_serial, None)
        reg = PbxRegistration(serial, flow, expires_at)
        self._by_serial[serial] = reg
        self._by_flow[flow] = serial
        return reg

    def unbind(self, serial: str) -> None:
        reg = self._by_serial.pop(serial, None)
        if reg is not None:
            self._by_flow.pop(reg.flow, None)

    def lookup(self, serial: str, now: float) -> PbxRegistration | None:
        reg = self._by_serial.get(serial)
        if reg is not None and reg.expires_at <= now:
            self.unbind(serial)
            return None
        return reg

    def serial_of(self, flow: Flow) -> str | None:
        return self._by_flow.get(flow)

    def flow_closed(self, flow: Flow) -> str | None:
        serial = self._by_flow.get(flow)
        if serial is not None:
            self.unbind(serial)
        return serial

    def expire(self, now: float) -> list[str]:
        gone = [s for s, r in self._by_serial.items() if r.expires_at <= now]
        for s in gone:
            self.unbind(s)
        return gone

    def snapshot(self) -> list[PbxRegistration]:
        return list(self._by_serial.values())
