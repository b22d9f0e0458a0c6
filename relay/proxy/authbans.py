"""Per-source bans after failed digest responses: growing, bounded, in memory (pure).

A source that sends wrong digest responses is guessing a PBX's secret (issue 10 saw
~7,000 answered per second from one address, and the right secret accepted right
after). Like Kamailio's pike + htable ban recipes and fail2ban's ``bantime.increment``:
after :data:`MAX_FAILURES` failures within :data:`FAILURE_WINDOW` the source is banned
for :data:`FIRST_BAN`, each further ban of the same source twice as long, up to
:data:`MAX_BAN`. While banned, every REGISTER from it is answered 403 without looking at
its credentials: a ban holds even for the right secret, so that guessing stops paying.
One log line per ban names the source for fail2ban (``systemd/fail2ban``) to act on.
"""

from __future__ import annotations

from dataclasses import dataclass

# Failed digest responses from one source IP within FAILURE_WINDOW before it is banned.
# A PBX with a mistyped secret fails once per registration attempt (every 30-60 s
# after an error); 10 a minute is an office full of misconfigured phones behind one
# NAT, or someone guessing. fail2ban's sshd jail: 5 in 10 minutes.
MAX_FAILURES = 10
FAILURE_WINDOW = 60.0
# Seconds of the first ban, and the longest: doubling from a minute to a day.
FIRST_BAN = 60.0
MAX_BAN = 86_400.0
# Sources remembered at most (failing or banned): ~100 bytes each, 6.5 MB. Past it the
# entry seen longest ago is forgotten (a spoofed-source flood cannot grow the table;
# UDP floods are cut by the transport's per-source gate before they get here).
MAX_SOURCES = 65_536
# How long a source's ban count is remembered after its last ban ends.
FORGET_AFTER = 86_400.0


@dataclass(slots=True)
class _Source:
    window_start: float
    failures: int = 0
    bans: int = 0
    banned_until: float = 0.0
    seen: float = 0.0


@dataclass(frozen=True, slots=True)
class Banned:
    """A source just banned: for the log line and the counter."""

    ip: str
    seconds: float
    failures: int


class AuthBans:
    """Failed digest responses per source IP and the bans they earn."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 first_ban: float = FIRST_BAN, max_ban: float = MAX_BAN, max_sources: int = MAX_SOURCES):
        self.max_failures = max_failures
        self.window = window
        self.first_ban = first_ban
        self.max_ban = max_ban
        self.max_sources = max_sources
        self._sources: dict[str, _Source] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def banned(self, ip: str, now: float) -> bool:
        """Whether ``ip`` is banned now."""
        s = self._sources.get(ip)
        return s is not None and s.banned_until > now

    def failed(self, ip: str, now: float) -> Banned | None:
        """One more failure from ``ip``; the ban it earned, if this one did."""
        s = self._sources.get(ip)
        if s is None:
            self._make_room(now)
            s = self._sources[ip] = _Source(window_start=now)
        s.seen = now
        if now - s.window_start > self.window:
            s.window_start, s.failures = now, 0
        s.failures += 1
        if s.failures < self.max_failures or s.banned_until > now:
            return None
        seconds = min(self.max_ban, self.first_ban * 2 ** s.bans)
        s.bans += 1
        s.banned_until = now + seconds
        failures, s.failures = s.failures, 0
        return Banned(ip, seconds, failures)

    def impose(self, ip: str, seconds: float, now: float) -> bool:
        """Ban ``ip`` for ``seconds`` from ``now``, as another node of the cluster did
        (docs/cluster.md, "Shared bans"); a ban already running longer stays. True when
        ``ip`` was not banned here."""
        s = self._sources.get(ip)
        if s is None:
            self._make_room(now)
            s = self._sources[ip] = _Source(window_start=now)
        s.seen = now
        fresh = s.banned_until <= now
        s.banned_until = max(s.banned_until, now + seconds)
        return fresh

    def succeeded(self, ip: str) -> None:
        """A good response: the failures so far were typos, not guessing (bans stay)."""
        s = self._sources.get(ip)
        if s is not None:
            s.failures = 0

    def _make_room(self, now: float) -> None:
        if len(self._sources) < self.max_sources:
            return
        stale = [ip for ip, s in self._sources.items()
                 if s.banned_until <= now and now - s.seen > FORGET_AFTER]
        for ip in stale:
            del self._sources[ip]
        if len(self._sources) >= self.max_sources:
            # Forget the source heard from longest ago (dicts keep insertion order,
            # and an entry is not moved on update: close enough, and O(1)).
            del self._sources[next(iter(self._sources))]
