"""Wake-ups across nodes (relay/proxy/crosswake.py, docs/cluster.md "Wake-ups across nodes").

Three `pbx-relay run` nodes on a real redis-server, each with its embedded push service
and APNs pointed at the local HTTP/2 fake (tests/pushfakes.py). SIPp plays the PBX,
phoned home to node A, and the phone: it registers over TCP with push parameters through
node B and goes to sleep (its connection closes). The PBX calls it: A → link → B, which
holds the INVITE and pushes. The woken phone's new connection lands on node C: its
REGISTER goes C → A → PBX, C tells B over their link, and B sends the held INVITE to C,
which puts it on the phone's new connection: the phone answers, the call goes through.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_sipp
from tests.pushfakes import FakeApns
from tests.realpeers import DOMAIN, RelayProc, free_port, sipp, start_relay, stop_relay, write_config
from tests.redisfixture import RedisServer
from tests.test_cluster_nodes import SERIAL, cluster_lines, redis_cli, redis_server, wait_for
from tests.test_push_sipp import (
    RING_TIMEOUT,
    TOKEN,
    TOPIC,
    apns,
    pbx_calls_sleeping_phone,
    phone_goes_to_sleep,
    woken_phone_answers,
)

__all__ = ["apns", "redis_server"]  # the fixtures, by name
pytestmark = [needs_sipp, pytest.mark.sipp]
FIRST_PORT = {"node-a": 32000, "node-b": 32400, "node-c": 32800}


def pbx_calls_sleeping_phone_through_two_nodes() -> str:
    """The PBX's INVITE routed along both Path entries of the phone's REGISTER (A's, B's)."""
    capture = '<ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" assign_to="path"/>'
    both = ('<ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" occurrence="1" assign_to="path"/>'
            '<ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" occurrence="2" '
            'assign_to="path2"/>')
    xml = pbx_calls_sleeping_phone()
    assert capture in xml and "Route: [$path]" in xml
    return xml.replace(capture, both).replace("Route: [$path]", "Route: [$path], [$path2]")


def push_node(tmp: Path, redis: RedisServer, apns: FakeApns, node_id: str) -> RelayProc:
    """A node with its embedded push service, APNs at the fake."""
    state = tmp / node_id
    push_dir = state / "push"
    push_dir.mkdir(parents=True)
    p8 = apns.write_p8(push_dir / "AuthKey.p8")
    push_toml = push_dir / "push.toml"
    push_toml.write_text(f"""
[push]
state_dir = "{push_dir}"
[api]
listen = "127.0.0.1:{free_port()}"
[admin]
listen = "127.0.0.1:{free_port()}"
[apns]
key_file = "{p8}"
key_id = "{apns.key_id}"
team_id = "{apns.team_id}"
base_url = "{apns.base_url}"
ca_file = "{apns.ca_file}"
""")
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    lines = cluster_lines(redis, node_id)
    first = FIRST_PORT[node_id]
    media = f"port_min = {first}\nport_max = {first + 400}"
    push = f'mode = "embedded"\nconfig = "{push_toml}"\nring_timeout = {RING_TIMEOUT}'
    write_config(r, lines, media, push)
    return start_relay(r, lines, media, push)


@pytest.fixture
def three(tmp_path: Path, redis_server: RedisServer, apns: FakeApns) -> Iterator[list[RelayProc]]:
    nodes: list[RelayProc] = []
    try:
        for node_id in FIRST_PORT:
            nodes.append(push_node(tmp_path, redis_server, apns, node_id))
        nodes[0].add_pbx(SERIAL)
        yield nodes
    finally:
        for n in nodes:
            stop_relay(n)


def test_a_phone_woken_for_a_call_held_on_one_node_answers_through_another(
    three: list[RelayProc], apns: FakeApns, redis_server: RedisServer, tmp_path: Path,
) -> None:
    a, b, c = three
    wait_for("three heartbeats", lambda: redis_cli(redis_server, "ZCARD", "pbxrelay:nodes") == "3")

    def run(node: RelayProc, name: str, xml: str, auth: bool = False):  # type: ignore[no-untyped-def]
        return sipp(tmp_path, name, xml, f"127.0.0.1:{node.tcp}", transport="t1", local_port=free_port(),
                    variables={"serial": SERIAL, "domain": DOMAIN},
                    auth=(SERIAL, a.secrets[SERIAL]) if auth else None, timeout_s=30)

    pbx = run(a, "pbx", pbx_calls_sleeping_phone_through_two_nodes(), auth=True)
    a.wait_registered(SERIAL)
    sleeper = run(b, "phone1", phone_goes_to_sleep(apns))
    assert sleeper.wait() == 0, sleeper.errors()
    # The PBX calls: B holds the INVITE (the phone's flow is gone) and pushes.
    (push,) = apns.wait_for(1, timeout=10)
    assert push.status == 200 and push.topic == TOPIC
    assert b.metric('pbx_relay_push_holds_total{outcome="started"}') == 1
    assert b.metric('pbx_relay_cluster_wakes_total{outcome="awaited"}') == 1
    # No push token in the shared state: the waiting key names an HMAC of the device.
    keys = redis_cli(redis_server, "KEYS", "pbxrelay:waiting:*").split()
    assert len(keys) == 1 and redis_cli(redis_server, "GET", keys[0]) == "node-b"
    read = {"string": ("GET",), "hash": ("HGETALL",), "zset": ("ZRANGE", "0", "-1"),
            "stream": ("XRANGE", "-", "+")}
    for key in redis_cli(redis_server, "KEYS", "*").split():
        kind = redis_cli(redis_server, "TYPE", key)
        assert TOKEN not in key and TOKEN not in redis_cli(redis_server, read[kind][0], key, *read[kind][1:])

    # The woken phone connects to node C: C tells B, B sends the call over to C.
    woken = run(c, "phone2", woken_phone_answers(apns))
    codes = [woken.wait(40), pbx.wait(40)]
    assert codes == [0, 0], f"{woken.errors()}\n{pbx.errors()}"
    assert c.metric('pbx_relay_cluster_wakes_total{outcome="told"}') == 1
    assert b.metric('pbx_relay_push_holds_total{outcome="released_elsewhere"}') == 1
    assert b.metric('pbx_relay_push_holds_total{outcome="released"}') == 0
    assert len(apns.requests) == 1  # one push for the call
