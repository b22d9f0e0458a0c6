"""Who may send and connect: per-source token buckets and connection slots (sans-I/O, ``now`` passed in)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from relay.transport import limits

# Why a connection was refused: the label of connections_refused_total and of the notice.
PER_SOURCE = "per_source"
TOTAL = "total"
RATE = "rate"
HANDSHAKES = "tls_handshakes"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    rate: float
    burst: float
    dropped: int = 0  # refused since the last ``flooders`` call


class SourceBuckets:
    """A token bucket per source IP: ``admit(ip, now)`` says whether one more unit
    (a datagram, a connection) from ``ip`` fits its budget, and takes it.

    A source asks ``trusted`` once when first seen and again at each sweep; a
    trusted one gets ``limits.TRUSTED_FACTOR`` times the rate and burst. A source in
    ``exempt`` (transport.exempt) is admitted without a bucket: held to the totals
    only, as the operator asked. The table
    is bounded (``max_sources``): a bucket that has refilled is forgotten (it
    holds nothing a fresh one would not), at most once per ``sweep_every``; when
    the table is full of active sources, the oldest entry makes room.
    """

    def __init__(
        self, rate: float, trusted: Callable[[str], bool], *,
        burst_seconds: float = limits.BURST_SECONDS, trusted_factor: float = limits.TRUSTED_FACTOR,
        max_sources: int = limits.MAX_SOURCES_TRACKED, sweep_every: float = limits.SOURCE_SWEEP_EVERY,
        exempt: frozenset[str] = frozenset(),
    ):
        self.rate = rate
        self.exempt = exempt
        self.burst = max(1.0, rate * burst_seconds)
        self.trusted = trusted
        self.factor = trusted_factor
        self.max_sources = max_sources
        self.sweep_every = sweep_every
        self._table: dict[str, _Bucket] = {}
        self._sweep_at = 0.0
        self.evicted = 0  # active entries pushed out by a full table (a spoofed flood)

    def __len__(self) -> int:
        return len(self._table)

    def admit(self, ip: str, now: float) -> bool:
        """One unit from ``ip`` at ``now``: True if within budget (and taken)."""
        b = self._table.get(ip)
        if b is None:
            if ip in self.exempt:
                return True
            return self._first(ip, now)
        tokens = b.tokens + (now - b.stamp) * b.rate
        if tokens > b.burst:
            tokens = b.burst
        b.stamp = now
        if tokens >= 1.0:
            b.tokens = tokens - 1.0
            return True
        b.tokens = tokens
        b.dropped += 1
        return False

    def _first(self, ip: str, now: float) -> bool:
        if now >= self._sweep_at:
            self.sweep(now)
        if len(self._table) >= self.max_sources:
            del self._table[next(iter(self._table))]  # oldest first: dicts keep insertion order
            self.evicted += 1
        rate, burst = self._budget(ip)
        self._table[ip] = _Bucket(burst - 1.0, now, rate, burst)
        return True

    def _budget(self, ip: str) -> tuple[float, float]:
        if self.trusted(ip):
            return self.rate * self.factor, self.burst * self.factor
        return self.rate, self.burst

    def sweep(self, now: float) -> None:
        """Forget refilled buckets; look again at which sources are trusted."""
        keep: dict[str, _Bucket] = {}
        for ip, b in self._table.items():
            tokens = b.tokens + (now - b.stamp) * b.rate
            if tokens >= b.burst:
                continue
            rate, burst = self._budget(ip)
            if rate != b.rate:  # settle at the old rate up to now, the new one from now on
                b.tokens, b.stamp = min(tokens, burst), now
                b.rate, b.burst = rate, burst
            keep[ip] = b
        self._table = keep
        self._sweep_at = now + self.sweep_every


    def flooders(self, elapsed: float, factor: float) -> list[str]:
        """Untrusted sources refused more than ``factor`` times their whole budget
        over the last ``elapsed`` seconds (counting starts again at each call)."""
        out = []
        for ip, b in self._table.items():
            if b.dropped and b.dropped > factor * b.rate * elapsed and not self.trusted(ip):
                out.append(ip)
            b.dropped = 0
        return out


class Bans:
    """Sources banned until a time: ``update`` adds the new flooders (at most
    ``max_bans`` at once) and lifts the bans that ran out."""

    def __init__(self, seconds: float, max_bans: int = limits.MAX_UDP_BANS):
        self.seconds = seconds
        self.max_bans = max_bans
        self.until: dict[str, float] = {}

    def update(self, flooders: list[str], now: float) -> tuple[list[str], list[str]]:
        """(banned now, lifted now)."""
        lifted = [ip for ip, t in self.until.items() if t <= now]
        for ip in lifted:
            del self.until[ip]
        banned = []
        for ip in flooders:
            if self.seconds <= 0 or len(self.until) >= self.max_bans:
                break
            if ip not in self.until:
                self.until[ip] = now + self.seconds
                banned.append(ip)
        return banned, lifted


class ConnectionSlots:
    """TCP/TLS connections open, per source IP and in total, and TLS handshakes in
    progress; decides whether a new one may open.

    Untrusted sources may fill ``total - reserved`` slots, ``per_source`` each, at
    ``rate`` new connections per second each, and ``max_handshakes`` TLS
    handshakes at once between them. Trusted sources are bound by ``total`` alone:
    the reserved slots are theirs.
    """

    def __init__(self, lim: limits.TransportLimits):
        self.total = lim.max_connections
        self.reserved = min(lim.connections_reserved, lim.max_connections)
        self.per_source = lim.max_connections_per_source
        self.max_handshakes = lim.max_tls_handshakes
        self.rate = SourceBuckets(lim.connection_rate_per_source, _never)  # asked for strangers only
        self.open_by_source: dict[str, int] = {}
        self.open_total = 0
        self.handshakes = 0

    def open(self, ip: str, trusted: bool, now: float) -> str | None:
        """Take a slot for a new connection from ``ip``: None when admitted (call
        ``close(ip)`` when it ends), else why not (PER_SOURCE, TOTAL, RATE)."""
        if self.open_total >= self.total:
            return TOTAL
        if not trusted:
            if self.open_total >= self.total - self.reserved:
                return TOTAL
            if self.open_by_source.get(ip, 0) >= self.per_source:
                return PER_SOURCE
            if not self.rate.admit(ip, now):
                return RATE
        self.open_total += 1
        self.open_by_source[ip] = self.open_by_source.get(ip, 0) + 1
        return None

    def close(self, ip: str) -> None:
        """Give back the slot ``open`` gave."""
        self.open_total -= 1
        left = self.open_by_source.get(ip, 0) - 1
        if left > 0:
            self.open_by_source[ip] = left
        else:
            self.open_by_source.pop(ip, None)

    def start_handshake(self, trusted: bool) -> bool:
        """May one more TLS handshake begin? (call ``end_handshake`` when it ends)."""
        if not trusted and self.handshakes >= self.max_handshakes:
            return False
        self.handshakes += 1
        return True

    def end_handshake(self) -> None:
        """A handshake that ``start_handshake`` allowed is over."""
        self.handshakes -= 1


def _never(ip: str) -> bool:
    return False


class Notices:
    """One log line per key (a source IP) per ``every`` seconds: ``due(key, now)``
    returns how many events the line stands for (this one and those held back
    since the last line), or 0 when this one is held back."""

    def __init__(self, every: float = limits.NOTICE_EVERY, max_keys: int = limits.MAX_NOTICE_SOURCES):
        self.every = every
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str, now: float) -> int:
        """0: stay quiet; n > 0: log now, for n events."""
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return 0
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return 1 + self._held.pop(key, 0)
