"""Links between nodes (relay/cluster/links.py): the handshake, what it refuses, the link limit.

Two ClusterLinks over real TCP sockets on 127.0.0.1 (ephemeral ports), each with its
own Transports; the events the transports report are recorded.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from relay.cluster import links as links_module
from relay.cluster.links import PROTOCOL, ClusterLinks, LinkFailed, LinkTls
from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.message import SipMessage
from relay.transport.events import EventHandlers
from relay.transport.flows import Transports
from relay.transport.tlscert import ensure_self_signed, server_context

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


async def start(nursery: trio.Nursery, node_id: str, secret: bytes = SECRET, max_links: int = 8,
                tls: LinkTls | None = None) -> Node:
    messages: list[tuple[SipMessage, Flow]] = []
    counts: dict[str, int] = {}

    def count(name: str, n: int = 1) -> None:
        counts[name] = counts.get(name, 0) + n

    def on_error(err: SipParseError, flow: Flow) -> None:
        raise AssertionError(err)

    transports = Transports(EventHandlers(lambda m, f: messages.append((m, f)), on_error, count))
    links = ClusterLinks(transports, node_id, secret, max_links, 1.0, count, tls)
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


# ------------------------------------------------------------------ TLS
def tls_of(directory: Path) -> LinkTls:
    """A node's link TLS from a self-signed pair, as the relay makes one in its state_dir."""
    cert, key = ensure_self_signed(directory, "relay.test", ["127.0.0.1"])
    return LinkTls.of(server_context(cert, key), ssl.PEM_cert_to_DER_cert(cert.read_text()))


async def forwarder(nursery: trio.Nursery, target: int, seen: list[bytes],
                    terminate: LinkTls | None = None) -> int:
    """A man in the middle on 127.0.0.1: copies bytes to ``target`` and back, keeping what
    crossed in ``seen``; with ``terminate`` it ends TLS itself with its own certificate and
    opens TLS to the target, so it reads the plaintext."""

    async def pipe(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                seen.append(bytes(data))
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(dst)

    async def handle(near: trio.SocketStream) -> None:
        far: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", target)
        client: trio.abc.Stream = near
        if terminate is not None:
            client = trio.SSLStream(near, terminate.server, server_side=True)
            far = trio.SSLStream(far, terminate.client, server_hostname=None)  # type: ignore[arg-type]
        async with trio.open_nursery() as n:
            n.start_soon(pipe, client, far)
            n.start_soon(pipe, far, client)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def test_links_over_tls_carry_sip_and_nothing_in_clear(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start(nursery, "node-a", tls=tls_of(tmp_path / "a"))
    b = await start(nursery, "node-b", tls=tls_of(tmp_path / "b"))  # its own certificate
    seen: list[bytes] = []
    port = await forwarder(nursery, a.port, seen)  # a wire tap between the two
    flow = await b.links.flow_to("node-a", f"127.0.0.1:{port}")
    assert b.transports.send(flow, OPTIONS)
    await wait_until(lambda: a.messages)
    msg, at_a = a.messages[0]
    assert msg.call_id == "c1"
    assert a.transports.send(at_a, OPTIONS)
    await wait_until(lambda: b.messages)
    wire = b"".join(seen)
    assert wire[:1] == b"\x16"  # a TLS handshake record first
    for clear in (PROTOCOL, b"node-a", b"OPTIONS", b"Call-ID"):
        assert clear not in wire


async def test_a_man_in_the_middle_who_ends_tls_gets_no_link(nursery: trio.Nursery, tmp_path: Path) -> None:
    """No CA: the MACs cover the listener's certificate, and the opener saw another one."""
    a = await start(nursery, "node-a", tls=tls_of(tmp_path / "a"))
    b = await start(nursery, "node-b", tls=tls_of(tmp_path / "b"))
    seen: list[bytes] = []
    port = await forwarder(nursery, a.port, seen, terminate=tls_of(tmp_path / "mitm"))
    with pytest.raises(LinkFailed):
        await b.links.flow_to("node-a", f"127.0.0.1:{port}")
    assert b"".join(seen).startswith(PROTOCOL + b" HELLO node-a ")  # it did read the handshake...
    await wait_until(lambda: a.counts.get("cluster_links_refused_total:handshake"))  # ...for nothing
    assert not a.transports.conns and not b.transports.conns


async def test_tls_and_plain_nodes_do_not_link(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start(nursery, "node-a", tls=tls_of(tmp_path / "a"))
    plain = await start(nursery, "node-p")
    with pytest.raises(LinkFailed):
        await plain.links.flow_to("node-a", a.address)
    tls = await start(nursery, "node-t", tls=tls_of(tmp_path / "t"))
    with pytest.raises(LinkFailed):
        await tls.links.flow_to("node-p", plain.address)
    await wait_until(lambda: (a.links.open, plain.links.open, tls.links.open) == (0, 0, 0))
    assert not a.messages and not plain.messages and not tls.messages
