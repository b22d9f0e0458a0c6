"""A node dies (`kill -9`): its PBX re-registers on another node and calls reach it again.

redis-server and three `pbx-relay run` nodes on 127.0.0.1 (free ports), SIPp as the PBX
and the phones. The PBX knows two relay addresses, as a real PBX does (DNS SRV or several
A records): when its connection to node A breaks it registers on node B. Node B's claim
replaces A's stale one at once; before that, A's claim outlives A only until A's heartbeat
expires, and a lookup that finds it then answers 480, as for an offline PBX (docs/cluster.md).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests import redisfixture
from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import RelayProc, free_port, start_relay, stop_relay, write_config
from tests.redisfixture import RedisServer
from tests.test_cluster_nodes import (
    SERIAL,
    cluster_lines,
    options_to,
    pbx_on,
    phone_on,
    readyz,
    redis_cli,
    wait_for,
)

pytestmark = [needs_sipp, pytest.mark.sipp]
redis_server = redisfixture.redis_server  # the fixture, by name


def start_node(tmp: Path, redis: RedisServer, node_id: str, directory_of: RelayProc | None) -> RelayProc:
    """A node without media (signalling is what moves); ``directory_of``: a node whose
    PBX's secret it knows (the directory is the cluster's, in Redis: relay/pbx/shared.py),
    None: the PBX is added (`pbx add` writes it to the shared directory)."""
    state = tmp / node_id
    state.mkdir()
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    lines = cluster_lines(redis, node_id)
    media = "enabled = false"
    write_config(r, lines, media)
    if directory_of is None:
        r.add_pbx(SERIAL)
    else:
        r.secrets = dict(directory_of.secrets)
    return start_relay(r, lines, media)


def test_node_a_killed_its_pbx_registers_on_node_b_and_calls_reach_it(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    redis = redis_server
    a = start_node(tmp_path, redis, "node-a", None)
    b = start_node(tmp_path, redis, "node-b", a)
    c = start_node(tmp_path, redis, "node-c", a)
    nodes = (a, b, c)
    try:
        wait_for("the nodes ready", lambda: all(readyz(n) == 200 for n in nodes))
        # The PBX on A, staying registered.
        first = pbx_on(a, tmp_path, a, sc.scenario("PBX stays", sc.PBX_PHONE_HOME, sc.pause(60_000)),
                       name="pbx_on_a")
        a.wait_registered(SERIAL)
        wait_for("A's claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a")

        # kill -9 node A, by its PID: no release, no goodbye; its claim stays in Redis.
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        assert redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-a"
        # Its heartbeat expires within three heartbeats (1.5 s here); from then on its
        # stale claim counts as nowhere: the 480 of an offline PBX, not a 503.
        wait_for("A's heartbeat gone", lambda: redis_cli(redis, "EXISTS", "pbxrelay:node:node-a") == "0")
        assert options_to(c, SERIAL) == "SIP/2.0 480 Temporarily Unavailable"
        assert c.metric('pbx_relay_cluster_lookups_total{outcome="nowhere"}') == 1
        first.wait()  # its connection broke: the PBX's first registration is gone

        # The PBX reconnects to its other configured address, node B, and registers there:
        # B's claim replaces A's stale one at once.
        pbx = pbx_on(b, tmp_path, a, sc.pbx_answers_phone(), name="pbx_on_b")
        b.wait_registered(SERIAL)
        wait_for("B's claim", lambda: redis_cli(redis, "HGET", f"pbxrelay:pbx:{SERIAL}", "node") == "node-b")
        ttl = int(redis_cli(redis, "TTL", f"pbxrelay:pbx:{SERIAL}"))
        assert 590 <= ttl <= 600  # B's registration's expiry, not what was left of A's

        # A phone on node C (a third path: lookup → B → the PBX) registers and calls.
        phone = phone_on(c, tmp_path, sc.phone_calls_pbx())
        rc_phone, rc_pbx = phone.wait(), pbx.wait()
        assert (rc_phone, rc_pbx) == (0, 0), f"{phone.errors()}\n{pbx.errors()}\n{c.log()[-3000:]}"
        assert c.metric('pbx_relay_cluster_lookups_total{outcome="located"}') >= 4  # REGISTER INVITE ACK BYE
        assert c.metric('pbx_relay_cluster_lookups_total{outcome="failed"}') == 0

        # And a phone on B itself, once the PBX is registered there again.
        pbx2 = pbx_on(b, tmp_path, a, sc.pbx_answers_phone(), name="pbx_on_b_again")
        b.wait_registered(SERIAL)
        phone2 = phone_on(b, tmp_path, sc.phone_calls_pbx(), name="phone_on_b")
        rc_phone, rc_pbx = phone2.wait(), pbx2.wait()
        assert (rc_phone, rc_pbx) == (0, 0), f"{phone2.errors()}\n{pbx2.errors()}\n{b.log()[-3000:]}"
        assert b.alive() and c.alive()
    finally:
        for n in nodes:
            stop_relay(n)
