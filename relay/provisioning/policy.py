"""When a link pings, when it is dead, when the agent tries again (pure: time is an argument)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

# The agent's reconnect delays: the first retry after about RECONNECT_FIRST seconds,
# doubling up to RECONNECT_MAX, each drawn from [half, all] of the step so a relay
# restart does not bring back thousands of PBXs in the same second (the
# "equal jitter" of AWS's backoff study). A link that stayed up LINK_STABLE seconds
# starts again from the first step.
RECONNECT_FIRST = 1.0
RECONNECT_MAX = 60.0
LINK_STABLE = 30.0


class Keepalive(Enum):
    """What a link's keepalive task does next."""

    WAIT = "wait"
    PING = "ping"
    DEAD = "dead"


@dataclass(frozen=True)
class KeepaliveTimes:
    """``interval``: seconds of silence after which a PING goes out (RFC 9113 §6.7);
    ``timeout``: seconds after that PING within which anything must be heard."""

    interval: float
    timeout: float


def keepalive_step(now: float, last_heard: float, ping_sent: float | None,
                   times: KeepaliveTimes) -> tuple[Keepalive, float]:
    """The next action and when to look again.

    Any frame heard counts as life (a busy link needs no PING). A PING unanswered —
    nothing at all heard since it went out — for ``timeout`` means the link is dead:
    a NAT dropped its binding, the peer froze, the cable is out."""
    if ping_sent is not None and last_heard < ping_sent:
        if now >= ping_sent + times.timeout:
            return Keepalive.DEAD, now
        return Keepalive.WAIT, ping_sent + times.timeout
    if now >= last_heard + times.interval:
        return Keepalive.PING, now + times.timeout
    return Keepalive.WAIT, last_heard + times.interval


def reconnect_delay(failures: int, rng: random.Random) -> float:
    """Seconds to wait before attempt number ``failures + 1`` (``failures`` >= 1)."""
    step = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** max(0, failures - 1))
    return rng.uniform(step / 2, step)
