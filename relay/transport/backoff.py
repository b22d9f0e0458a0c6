"""When an accept loop out of descriptors or memory tries again, and what it logs (sans-I/O)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from relay.transport import limits

# accept() failures that mean "no resources now": the connection waits in the
# backlog, retrying at once would spin (accept(2), ERRORS).
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() failures that concern one connection only (it was reset or refused by a
# firewall hook before we took it): skip it and take the next (trio ignores the same).
ONE_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


@dataclass(frozen=True, slots=True)
class Episode:
    """A run of failed accepts, from the first failure to the next success."""

    started: float
    failures: int
    errno: int


class AcceptBackoff:
    """Exponential backoff across one episode of failed accepts: ``failed`` gives
    the delay before the next try (doubling from ``first`` to ``cap``) and whether
    the episode just began (the shell logs one warning then); ``succeeded`` ends
    the episode and returns it (the shell logs one line: how long, how many)."""

    def __init__(self, first: float = limits.ACCEPT_BACKOFF_FIRST, cap: float = limits.ACCEPT_BACKOFF_CAP):
        self.first = first
        self.cap = cap
        self._started: float | None = None
        self._failures = 0
        self._errno = 0
        self._delay = 0.0

    @property
    def in_episode(self) -> bool:
        """True between a failure and the next success."""
        return self._started is not None

    def failed(self, err: int, now: float) -> tuple[float, bool]:
        """(seconds to wait, True if this failure starts an episode)."""
        began = self._started is None
        if began:
            self._started = now
            self._delay = self.first
        else:
            self._delay = min(self._delay * 2, self.cap)
        self._failures += 1
        self._errno = err
        return self._delay, began

    def succeeded(self) -> Episode | None:
        """The episode this success ends, or None if there was none."""
        if self._started is None:
            return None
        ep = Episode(self._started, self._failures, self._errno)
        self._started, self._failures, self._delay = None, 0, 0.0
        return ep
