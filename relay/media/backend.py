"""Carrying out the media component's effects on a media backend (the shell's side of relay.media.effects)."""

from __future__ import annotations

import logging

from relay.media.effects import BindPorts, CloseLeg, MediaEffect, OpenLeg, RelatchLeg
from relay.media.session import MediaBackend

log = logging.getLogger("relay.media")

Bound = tuple[tuple[int, ...], tuple[int, ...]]  # (pairs bound, pairs that could not be)


def carry_out(backend: MediaBackend, effect: MediaEffect) -> Bound | None:
    """Do what ``effect`` says; for a ``BindPorts``, return what came of it (to be
    reported with ``on_ports_bound``), else None."""
    if isinstance(effect, BindPorts):
        bound = tuple(p for p in effect.ports if backend.bind(p))
        failed = tuple(p for p in effect.ports if p not in bound)
        if failed:
            # An operator matter (the port range overlaps another program), not a fault:
            # the relay goes on with the other pairs.
            log.warning("event=media_port_busy ports=%s (held by another program: never used again)",
                      ",".join(map(str, failed)))
        return bound, failed
    if isinstance(effect, OpenLeg):
        backend.open(effect.leg)
    elif isinstance(effect, RelatchLeg):
        backend.relatch(effect.leg)
    elif isinstance(effect, CloseLeg):
        backend.close(effect.leg)
    return None
