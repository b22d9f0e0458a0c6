"""The SharedState interface relay nodes use, its value types, error and key limits."""

from dataclasses import dataclass
from typing import Protocol

# Every key this component writes starts with this, so a Redis/Valkey shared with
# other software (or other deployments under another prefix) never collides.
KEY_PREFIX = "pbxrelay:"

# The longest identifier (serial, node id, IP text, rate key) accepted as part of a
# key. A PBX serial is at most SERIAL_MAX characters (relay/pbx/directory.py), IPv6 text 45,
# a node id is ours; 128 leaves room and bounds every key's size, so a peer cannot
# make a node store arbitrarily large keys. Over the limit: ValueError.
MAX_KEY_PART = 128

# The longest flow token stored with a claim: the relay's tokens are short base64
# (relay/proxy/flowtoken.py); 512 bounds a stored value whatever a caller passes.
MAX_FLOW_TOKEN = 512


# Bans shared between nodes, kept at most (Redis: the stream's approximate MAXLEN). As
# many as one node's table of failing sources (relay/proxy/authbans.py MAX_SOURCES): a
# node starting or coming back reads at most this many, and an attack from more
# sources than that is cut by each node's own bans and the transports' per-source gates.
MAX_SHARED_BANS = 65_536


@dataclass(frozen=True, slots=True)
class SharedBan:
    """A ban one node imposed (wrong digest responses), as every node learns it."""

    ip: str
    seconds: float  # left, as of the read
    node_id: str  # who banned


class SharedStateUnavailable(Exception):
    """The shared store did not answer within its timeout (down, unreachable, or too slow).

    A node that gets this keeps serving its own flows and reports not ready (issue 13).
    """


@dataclass(frozen=True, slots=True)
class PbxClaim:
    """Which node holds a PBX's flow, and the flow token that names it there."""

    node_id: str
    flow_token: str


def check_part(name: str, value: str) -> str:
    """Return ``value`` if it may be used in a key: non-empty, at most MAX_KEY_PART characters."""
    if not value or len(value) > MAX_KEY_PART:
        raise ValueError(f"{name} must be 1..{MAX_KEY_PART} characters, got {len(value)}")
    return value


def check_seconds(name: str, seconds: float) -> float:
    """Return ``seconds`` if it is a usable expiry (positive): every key expires."""
    if not seconds > 0:
        raise ValueError(f"{name} must be positive, got {seconds}")
    return seconds


def check_token(flow_token: str) -> str:
    """Return ``flow_token`` if it is non-empty and at most MAX_FLOW_TOKEN characters."""
    if not flow_token or len(flow_token) > MAX_FLOW_TOKEN:
        raise ValueError(f"flow_token must be 1..{MAX_FLOW_TOKEN} characters")
    return flow_token


class SharedState(Protocol):
    """State shared by relay nodes; every entry expires (docs/cluster.md).

    Implementations: MemoryState (one node, embedded default) and RedisState (several
    nodes on a Redis/Valkey). Each call may raise SharedStateUnavailable; none blocks
    longer than the implementation's timeout.
    """

    async def claim_pbx(self, serial: str, node_id: str, flow_token: str, ttl: float) -> None:
        """Record that ``node_id`` holds the flow of PBX ``serial`` for ``ttl`` seconds.

        The latest claim wins: a PBX that re-registers on another node moves there.
        """
        ...

    async def pbx_node(self, serial: str) -> PbxClaim | None:
        """The node holding PBX ``serial``'s flow, or None if no live claim."""
        ...

    async def release_pbx(self, serial: str, node_id: str) -> bool:
        """Drop the claim if ``node_id`` still holds it; True if it did, else nothing happens."""
        ...

    async def share_ban(self, ip: str, seconds: float, node_id: str) -> None:
        """Tell every node that ``node_id`` banned ``ip`` for ``seconds`` from now."""
        ...

    async def bans_after(self, cursor: str, count: int) -> tuple[list[SharedBan], str]:
        """At most ``count`` bans shared after ``cursor`` ("" : the oldest kept), still in
        force, oldest first; and the cursor to pass next time."""
        ...

    async def await_device(self, device: str, node_id: str, ttl: float) -> None:
        """``node_id`` holds a call for ``device`` (an HMAC, relay/proxy/crosswake.py) for
        the next ``ttl`` seconds (the latest node to say so wins)."""
        ...

    async def awaiting_node(self, device: str) -> str | None:
        """The node holding a call for ``device``, or None."""
        ...

    async def incr_rate(self, key: str, window: float) -> int:
        """Count one event under ``key`` in a fixed window of ``window`` seconds; the count so far.

        The window starts with its first event and the counter expires with it.
        """
        ...

    async def node_heartbeat(self, node_id: str, ttl: float, address: str = "") -> None:
        """Say ``node_id`` is alive for the next ``ttl`` seconds; with ``address``, also
        that other nodes reach it there ("host:port" of its cluster listener) until then."""
        ...

    async def node_address(self, node_id: str) -> str | None:
        """Where ``node_id`` said it is reached, or None if its heartbeat expired."""
        ...

    async def live_nodes(self) -> frozenset[str]:
        """The nodes whose last heartbeat has not expired."""
        ...
