"""Shared state of relay nodes: one interface, an in-memory and a Redis/Valkey implementation (issue 13)."""

from relay.cluster.memory import MemoryState
from relay.cluster.redis import RedisState
from relay.cluster.state import PbxClaim, SharedState, SharedStateUnavailable

__all__ = ["MemoryState", "PbxClaim", "RedisState", "SharedState", "SharedStateUnavailable"]
