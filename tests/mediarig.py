"""Media sessions driven as the shell drives them: every effect carried out on a backend at once."""

from __future__ import annotations

from collections.abc import Iterable

from relay.media.backend import carry_out
from relay.media.effects import MediaEffect
from relay.media.ports import PortPool
from relay.media.session import MediaBackend, MediaSession, MediaSessions


class MediaRig:
    """``MediaSessions`` with the effects of each call carried out on ``backend``
    (relay.media.backend.carry_out, the shell's own code), reporting bound ports back."""

    def __init__(self, backend: MediaBackend, address: str, ports: PortPool, no_media_timeout: float = 60.0):
        self.media = MediaSessions(address, ports, no_media_timeout)
        self.backend = backend
        self.run(self.media.start())

    @property
    def sessions(self) -> dict[str, MediaSession]:
        return self.media.sessions

    @property
    def ports(self) -> PortPool:
        return self.media.ports

    def run(self, effects: Iterable[MediaEffect]) -> None:
        for e in effects:
            bound = carry_out(self.backend, e)
            if bound is not None:
                self.run(self.media.on_ports_bound(*bound))

    def on_sdp(self, call_id: str, side: str, body: bytes, signal_ip: str, now: float,
               peer_ip: str = "", offer: bool = False) -> bytes:
        out, effects = self.media.on_sdp(call_id, side, body, signal_ip, now, peer_ip, offer)
        self.run(effects)
        return out

    def established(self, call_id: str) -> None:
        self.run(self.media.established(call_id))

    def failed(self, call_id: str) -> None:
        self.run(self.media.failed(call_id))

    def end(self, call_id: str) -> bool:
        had = call_id in self.media.sessions
        self.run(self.media.end(call_id))
        return had

    def expire(self, now: float) -> list[str]:
        gone, effects = self.media.expire(now)
        self.run(effects)
        return gone
