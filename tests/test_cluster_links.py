"""Links between nodes (relay/cluster/links.py): the handshake, what it refuses, the link limit.

Two ClusterLinks over real TCP sockets on 127.0.0.1 (ephemeral ports), each with its
own Transports; the events the transports report are recorded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio

from relay.cluster import links as links_module
from relay.cluster.links import PROTOCOL, ClusterLinks, LinkFailed
from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.message import SipMessage
from relay.transport.events import EventHandlers
from relay.transport.flows import Transports

SECRET = b"s" * 40
OPTIONS = (b"OPTIONS sip:x@relay.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bK1\r\n"
           b"From: <sip:a@relay.test>;tag=1\r\nTo: <sip:x@relay.test>\r\nCall-ID: c1\r\n"
           b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")


@dataclass
class Node:
    links: ClusterLinks
    transports: Transports
    port: int = 0
    messages: list[tuple[SipMessage, Flow]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start(nursery: trio.Nursery, node_id: str, secret: bytes = SECRET, max_links: int = 8) -> Node:
    messages: list[tuple[SipMessage, Flow]] = []
    counts: dict[str, int] = {}

    def count(name: str, n: int = 1) -> None:
        counts[name] = counts.get(name, 0) + n

    def on_error(err: SipParseError, flow: Flow) -> None:
        raise AssertionError(err)

    transports = Transports(EventHandlers(lambda m, f: messages.append((m, f)), on_error, count))
    links = ClusterLinks(transports, node_id, secret, max_links, 1.0, count)
    node = Node(links, transports, messages=messages, counts=counts)
    node.port = await nursery.start(links.serve, "127.0.0.1", 0)
    return node


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def wait_until(check: object) -> None:
    with trio.fail_after(5):
        while not check():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_an_authenticated_link_carries_sip_both_ways_and_is_reused(nursery: trio.Nursery) -> None:
    a, b = await start(nursery, "node-a"), await start(nursery, "node-b")
    flow = await b.links.flow_to("node-a", a.address)
    assert flow.transport == "cluster" and flow.remote_port == a.port
    assert await b.links.flow_to("node-a", a.address) == flow  # the same link
    assert b.transports.send(flow, OPTIONS)
    await wait_until(lambda: a.messages)
    msg, at_a = a.messages[0]
    assert (msg.call_id, at_a.transport, at_a.remote_port) == ("c1", "cluster", flow.local_port)
    assert a.transports.send(at_a, OPTIONS)  # and back, on the same connection
    await wait_until(lambda: b.messages)
    assert b.messages[0][1] == flow
    assert (a.links.open, b.links.open) == (1, 1)


async def test_a_wrong_secret_is_refused_both_ways(nursery: trio.Nursery) -> None:
    a = await start(nursery, "node-a")
    b = await start(nursery, "node-b", secret=b"x" * 40)
    with pytest.raises(LinkFailed):
        await b.links.flow_to("node-a", a.address)
    await wait_until(lambda: a.counts.get("cluster_links_refused_total:handshake"))
    assert not a.transports.conns and not b.transports.conns
    assert (a.links.open, b.links.open) == (0, 0)


async def test_a_listener_that_is_not_the_node_named_is_refused(nursery: trio.Nursery) -> None:
    """A stale address in the shared state now belongs to another node: no link."""
    a, b = await start(nursery, "node-a"), await start(nursery, "node-b")
    with pytest.raises(LinkFailed, match="not the node"):
        await b.links.flow_to("node-c", a.address)
    assert b.counts["cluster_links_refused_total:handshake"] == 1


async def test_garbage_and_silence_are_closed_unread(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(links_module, "HANDSHAKE_TIMEOUT", 0.3)
    a = await start(nursery, "node-a")
    garbage = await trio.open_tcp_stream("127.0.0.1", a.port)
    silent = await trio.open_tcp_stream("127.0.0.1", a.port)
    hello = await garbage.receive_some(1000)
    assert hello.startswith(PROTOCOL + b" HELLO node-a ")
    await garbage.send_all(OPTIONS)  # SIP before the handshake
    with trio.fail_after(5):
        assert await _drain(garbage) == b""
        assert (await _drain(silent)).startswith(PROTOCOL)  # the HELLO, then closed
    assert a.counts["cluster_links_refused_total:handshake"] == 2
    assert not a.messages and a.links.open == 0


async def _drain(stream: trio.SocketStream) -> bytes:
    out = b""
    while data := await stream.receive_some(1000):
        out += data
    return out


async def test_links_over_the_limit_are_refused(nursery: trio.Nursery) -> None:
    a = await start(nursery, "node-a", max_links=1)
    b, c = await start(nursery, "node-b"), await start(nursery, "node-c")
    await b.links.flow_to("node-a", a.address)
    with pytest.raises(LinkFailed):
        await c.links.flow_to("node-a", a.address)
    assert a.counts["cluster_links_refused_total:limit"] == 1
    assert a.links.open == 1


async def test_one_source_cannot_hold_every_link_slot_with_silent_handshakes(nursery: trio.Nursery) -> None:
    """A stranger on 127.0.0.2 opens max_links connections and says nothing: it gets
    MAX_HANDSHAKES_PER_SOURCE slots, the rest are refused, and a real node still links."""
    a = await start(nursery, "node-a", max_links=6)
    b = await start(nursery, "node-b")
    strangers = [await trio.open_tcp_stream("127.0.0.1", a.port, local_address="127.0.0.2")
                 for _ in range(6)]
    per_source = links_module.MAX_HANDSHAKES_PER_SOURCE
    await wait_until(lambda: a.counts.get("cluster_links_refused_total:per_source") == 6 - per_source)
    assert a.links.open == per_source
    flow = await b.links.flow_to("node-a", a.address)  # while the stranger's handshakes hang
    assert b.transports.send(flow, OPTIONS)
    await wait_until(lambda: a.messages)
    assert a.links.open == per_source + 1
    for s in strangers:
        await s.aclose()
