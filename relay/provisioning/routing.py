"""Which link carries a phone's request, and the per-PBX limits (pure: no I/O).

A PBX may hold several links (a reconnecting agent's new link while the relay has
not noticed the old one die; two agents for redundancy): up to
``provisioning.max_links_per_serial``. A request goes to the link with the fewest
streams in progress that has room; a PBX's requests in progress are capped by
``provisioning.max_requests_per_serial`` so one PBX's phones cannot take the relay
from every other PBX's.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, Protocol, TypeVar


class Carrier(Protocol):
    """What routing needs to know of a link."""

    @property
    def active(self) -> int:
        """Streams in progress."""

    @property
    def capacity(self) -> int:
        """Streams it may carry at once (0 while it closes)."""


L = TypeVar("L", bound=Carrier)


class LinkTable(Generic[L]):
    """serial → its live links; serial → its requests in progress."""

    def __init__(self, max_links: int, max_requests: int):
        self.max_links = max_links
        self.max_requests = max_requests
        self.links: dict[str, list[L]] = {}
        self.in_progress: Counter[str] = Counter()

    def add(self, serial: str, link: L) -> bool:
        """Register a new link; False when the PBX already has ``max_links``."""
        links = self.links.setdefault(serial, [])
        if len(links) >= self.max_links:
            if not links:
                del self.links[serial]
            return False
        links.append(link)
        return True

    def remove(self, serial: str, link: L) -> None:
        """Forget a link that ended."""
        links = self.links.get(serial, [])
        if link in links:
            links.remove(link)
        if not links:
            self.links.pop(serial, None)

    def online(self, serial: str) -> bool:
        """The PBX has at least one link."""
        return bool(self.links.get(serial))

    def pick(self, serial: str) -> L | None:
        """The least busy link with room, None if every link is full (or none)."""
        best: L | None = None
        for link in self.links.get(serial, []):
            if link.active < link.capacity and (best is None or link.active < best.active):
                best = link
        return best

    def begin(self, serial: str) -> bool:
        """Count a request in; False (and nothing counted) at ``max_requests``."""
        if self.in_progress[serial] >= self.max_requests:
            return False
        self.in_progress[serial] += 1
        return True

    def end(self, serial: str) -> None:
        """Count a request out."""
        self.in_progress[serial] -= 1
        if self.in_progress[serial] <= 0:
            del self.in_progress[serial]

    def counts(self) -> tuple[int, int]:
        """(PBXs online, links open)."""
        return len(self.links), sum(len(v) for v in self.links.values())
