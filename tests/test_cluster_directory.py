"""The cluster's PBX directory in Redis (relay/pbx/shared.py, docs/cluster.md "One PBX
directory"): `pbx add` on any machine, every node knows the PBX; only digest hashes stored.

Two `pbx-relay run` nodes with their own state directories on a real redis-server.
Node A started with the PBX in its local pbx.sqlite (a relay that becomes a cluster),
node B with none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.pbx.directory import PbxDirectory
from tests.realpeers import DOMAIN, RelayProc, free_port, start_relay, stop_relay, write_config
from tests.redisfixture import RedisServer
from tests.sipclient import Pbx, Stream, authorization, challenge, pbx_register, rand
from tests.test_cluster_nodes import SERIAL, cluster_lines, redis_cli, redis_server, wait_for

__all__ = ["redis_server"]  # the fixture, by name
NEW = "7777001"


def start(tmp: Path, redis: RedisServer, node_id: str, local: tuple[str, ...] = ()) -> RelayProc:
    """A node (no media); ``local``: PBXs in its own pbx.sqlite before it starts, as a
    relay that ran alone had them."""
    state = tmp / node_id
    state.mkdir()
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    for serial in local:
        r.secrets[serial] = PbxDirectory(state / "pbx.sqlite").add(serial, DOMAIN)
    lines = cluster_lines(redis, node_id)
    write_config(r, lines, "enabled = false")
    return start_relay(r, lines, "enabled = false")


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[RelayProc, RelayProc, RedisServer]]:
    a = start(tmp_path, redis_server, "node-a", (SERIAL,))
    b = start(tmp_path, redis_server, "node-b")
    try:
        yield a, b, redis_server
    finally:
        stop_relay(a)
        stop_relay(b)


def registers(node: RelayProc, serial: str, secret: str) -> int:
    """REGISTER, 401, REGISTER with credentials: the final status."""
    stream = Stream(node)
    try:
        call_id = rand()
        first = pbx_register(stream, serial, cseq=1, call_id=call_id)
        if first.status != 401:
            return first.status or 0
        auth = authorization(challenge(first, "MD5"), serial, secret, f"sip:{serial}@{DOMAIN}")
        return pbx_register(stream, serial, cseq=2, call_id=call_id, auth=auth, expires=0).status or 0
    finally:
        stream.sock.close()


def test_one_directory_for_every_node(nodes: tuple[RelayProc, RelayProc, RedisServer]) -> None:
    a, b, redis = nodes
    # A adopted the PBX of its own pbx.sqlite: digest hashes only, never the secret.
    stored = json.loads(redis_cli(redis, "HGET", "pbxrelay:directory", SERIAL))
    assert stored[0] == "relay.test" and len(stored[1]) == 32 and len(stored[2]) == 64
    assert a.secrets[SERIAL] not in redis_cli(redis, "HGET", "pbxrelay:directory", SERIAL)
    assert "event=directory_adopted count=1" in a.log()
    # So B, whose own directory is empty, registers it with the secret A's `pbx add` gave.
    b.secrets[SERIAL] = a.secrets[SERIAL]
    Pbx(b, SERIAL).stream.sock.close()  # REGISTER → 401 → 200, asserted

    # `pbx add` through B's configuration: B knows it when the command returns, A within
    # its directory poll (2 s); `pbx list` on A shows both.
    secret = b.add_pbx(NEW)
    assert registers(b, NEW, secret) == 200
    # (Waiting by trying would be ten wrong answers from one address: a ban.)
    wait_for("A read it", lambda: "event=directory_loaded pbx_count=2 added=1" in a.log(), timeout=6)
    assert registers(a, NEW, secret) == 200
    listed = a.cli("pbx", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == sorted([NEW, SERIAL])
    assert secret not in redis_cli(redis, "HGETALL", "pbxrelay:directory")

    # `pbx remove` through A: both refuse it (403, as for any unknown serial).
    removed = a.cli("pbx", "remove", NEW)
    assert removed.returncode == 0, removed.stderr
    gone = "event=directory_loaded pbx_count=1 added=0 removed=1"
    wait_for("B read it", lambda: gone in b.log(), timeout=6)
    assert registers(b, NEW, secret) == 403 and registers(a, NEW, secret) == 403

    # Redis restarts empty (no persistence): a node puts its copy back, the PBX stays known.
    redis.stop()
    redis.start()
    wait_for("the directory back", lambda: redis_cli(redis, "HEXISTS", "pbxrelay:directory", SERIAL) == "1",
             timeout=8)
    assert "event=directory_restored" in a.log() + b.log()
    assert redis_cli(redis, "HEXISTS", "pbxrelay:directory", NEW) == "0"  # removed stays removed
    Pbx(a, SERIAL).stream.sock.close()


def test_no_redis_one_line_naming_the_shared_directory(
    nodes: tuple[RelayProc, RelayProc, RedisServer],
) -> None:
    a, _, redis = nodes
    redis.stop()
    # A node that starts meanwhile serves its own copy of the directory, and says so.
    c = start(a.state_dir.parent, redis, "node-c")
    try:
        assert "event=directory_unreachable" in c.log() and c.alive()
    finally:
        stop_relay(c)
    out = a.cli("pbx", "add", NEW)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"cannot use the shared PBX directory at redis://127.0.0.1:{redis.port}" in lines[0]
