"""Links between relay nodes: SIP over TCP, authenticated with the cluster's shared secret (trio shell).

A link is one TCP connection between two nodes; either may have opened it, both send
requests and responses on it. Before any SIP, the two ends prove to each other that
they know ``cluster.secret`` (docs/cluster.md, "Links between nodes")::

    listener → opener   PBXRELAY-CLUSTER/1 HELLO <listener-node> <nonce-L>
    opener → listener   PBXRELAY-CLUSTER/1 AUTH <opener-node> <nonce-O> <mac-O>
    listener → opener   PBXRELAY-CLUSTER/1 OK <mac-L>

``mac-O`` = HMAC-SHA256(secret, "open|nonce-L|nonce-O|opener|listener") and ``mac-L``
the same over "listen|…": each side's MAC covers a nonce the other just drew, so a
recorded handshake cannot be replayed, and the opener checks that the listener is
the node the shared state named. Anything else, or nothing within
HANDSHAKE_TIMEOUT, closes the connection unread. Then the link is a flow of
transport ``cluster`` in :class:`relay.transport.flows.Transports`: the same framing,
limits and events as a PBX's TCP connection.

With ``cluster.link_tls`` the exchange above, and all SIP after it, runs inside TLS
(:class:`LinkTls`): the listener presents the relay's certificate (sip.tls_cert, or
the self-signed one), and both MACs also cover the SHA-256 fingerprint of that
certificate as each side sees it (``|<fingerprint>`` appended). No CA is needed: a
man in the middle who terminates TLS shows the opener another certificate, so the
opener's MAC does not verify at the listener, and he cannot make a MAC himself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio

from pbxcore.errors import ListenError
from relay.proxy.flow import CLUSTER, Flow
from relay.transport.flows import Transports, accept_forever

log = logging.getLogger("relay.cluster")

PROTOCOL = b"PBXRELAY-CLUSTER/1"
# Seconds the whole handshake may take, either side. Two round trips on a LAN take
# well under a millisecond; a peer that says nothing holds a link slot this long.
HANDSHAKE_TIMEOUT = 2.0
# The longest handshake line: protocol, verb, a node id (64), two hex nonces or MACs (64 each).
MAX_LINE = 256
NONCE_BYTES = 16
# Handshakes in progress from one source address, at most: a stranger that reaches the
# cluster port and says nothing holds a slot of max_links for HANDSHAKE_TIMEOUT, so
# without this one address could hold them all and keep the real nodes out. Nodes
# open one link each per peer; a few more cover reconnects.
MAX_HANDSHAKES_PER_SOURCE = 4
# Seconds between the CRLFCRLF keepalives the opener sends on an idle link (RFC 5626
# §4.4.1 pings, answered with CRLF): well below sip.flow_idle_timeout (300 s by
# default), which closes a silent flow at both ends.
KEEPALIVE_EVERY = 30.0


class LinkFailed(Exception):
    """The link to another node could not be opened or authenticated in time."""


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "|".join(parts).encode(), "sha256").hexdigest()


def _bound(mark: str) -> tuple[str, ...]:
    """What a MAC covers beyond the handshake's words: over TLS, the listener's
    certificate fingerprint; over plain TCP nothing (the MACs of docs/cluster.md)."""
    return (mark,) if mark else ()


@dataclass(frozen=True)
class LinkTls:
    """TLS on the links (``cluster.link_tls``): the listener's context (the relay's
    certificate), the opener's (no CA: the handshake's MACs bind the certificate), and
    the SHA-256 fingerprint of this node's certificate."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    fingerprint: str

    @staticmethod
    def of(server: ssl.SSLContext, certificate_der: bytes) -> LinkTls:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        # Not a CA check: who is at the other end is proven by the MACs over its
        # certificate's fingerprint (module docstring).
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        return LinkTls(server, client, fingerprint(certificate_der))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


Link = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class Prefixed(trio.abc.Stream):
    """A stream that gives back the bytes read past the handshake before reading more."""

    def __init__(self, stream: Link, head: bytes) -> None:
        self.stream = stream
        self.head = head

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.head:
            data, self.head = self.head, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _line(stream: Link, buf: bytearray) -> list[str]:
    """One handshake line's words; what came after it stays in ``buf``."""
    while b"\r\n" not in buf:
        if len(buf) > MAX_LINE:
            raise LinkFailed("handshake line too long")
        data = await stream.receive_some(MAX_LINE)
        if not data:
            raise LinkFailed("closed during the handshake")
        buf += data
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    words = line.decode("ascii", "replace").split(" ")
    if len(line) > MAX_LINE or words[0] != PROTOCOL.decode():
        raise LinkFailed("not a cluster handshake")
    return words[1:]


def _flow_of(stream: Link) -> Flow:
    tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    peer = tcp.socket.getpeername()
    local = tcp.socket.getsockname()
    return Flow(CLUSTER, peer[0], peer[1], local[0], local[1])


class ClusterLinks:
    """The node's links: a listener for other nodes', the ones it opens, at most
    ``max_links`` at once in all (handshakes included), one per peer node in use."""

    def __init__(self, transports: Transports, node_id: str, secret: bytes, max_links: int,
                 timeout: float, count: Callable[[str], None], tls: LinkTls | None = None) -> None:
        self.transports = transports
        self.tls = tls
        self.node_id = node_id
        self._secret = secret
        self.max_links = max_links
        self.timeout = timeout  # seconds to connect to a node (the handshake has its own)
        self._count = count
        self.open = 0  # links and handshakes now
        self._handshakes: dict[str, int] = {}  # source address -> handshakes in progress
        self._by_node: dict[str, Flow] = {}
        self._opening: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self._by_node)

    async def serve(self, host: str, port: int,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept other nodes' links until cancelled; ``task_status`` gets the bound port."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as e:  # named, not taken for a SIP port (relay/cli.py)
            raise ListenError.from_oserror("cluster link (cluster.listen)", f"{host}:{port}", e) from None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(listeners[0].socket.getsockname()[1])
                for listener in listeners:
                    # Out of descriptors, it waits and says so (relay/transport/backoff.py).
                    nursery.start_soon(accept_forever, listener.socket, self._admit, "cluster", self._count)
        finally:
            for listener in listeners:
                listener.socket.close()

    def _admit(self, sock: trio.socket.SocketType, ip: str) -> None:
        if self.open >= self.max_links:
            self._count("cluster_links_refused_total:limit")
            sock.close()
            return
        if self._handshakes.get(ip, 0) >= MAX_HANDSHAKES_PER_SOURCE:
            self._count("cluster_links_refused_total:per_source")
            sock.close()
            return
        self.open += 1
        self._handshakes[ip] = self._handshakes.get(ip, 0) + 1
        assert self._nursery is not None
        self._nursery.start_soon(self._accepted, trio.SocketStream(sock), ip)

    async def _accepted(self, tcp: trio.SocketStream, ip: str) -> None:
        stream: Link = tcp
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                mark = ""
                if self.tls is not None:
                    stream = trio.SSLStream(tcp, self.tls.server, server_side=True)
                    await stream.do_handshake()
                    mark = self.tls.fingerprint
                peer, rest = await self._listener_side(stream, mark)
            flow = _flow_of(stream)
        except (LinkFailed, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
            self._count("cluster_links_refused_total:handshake")
            log.warning("event=cluster_link_refused reason=%s", e or type(e).__name__)
            self.open -= 1
            await trio.aclose_forcefully(stream)
            return
        finally:
            if self._handshakes[ip] <= 1:
                del self._handshakes[ip]
            else:
                self._handshakes[ip] -= 1
        await self._run(Prefixed(stream, rest), flow, peer)

    async def _listener_side(self, stream: Link, mark: str) -> tuple[str, bytes]:
        """The listener's half; ``mark``: its certificate's fingerprint over TLS, else ""."""
        nonce = secrets.token_hex(NONCE_BYTES)
        await stream.send_all(b"%s HELLO %s %s\r\n" % (PROTOCOL, self.node_id.encode(), nonce.encode()))
        buf = bytearray()
        words = await _line(stream, buf)
        if len(words) != 4 or words[0] != "AUTH":
            raise LinkFailed("no AUTH")
        _, peer, peer_nonce, mac = words
        good = _mac(self._secret, "open", nonce, peer_nonce, peer, self.node_id, *_bound(mark))
        if not hmac.compare_digest(mac, good) or peer == self.node_id:
            raise LinkFailed("bad credentials")
        ours = _mac(self._secret, "listen", nonce, peer_nonce, self.node_id, peer, *_bound(mark))
        await stream.send_all(b"%s OK %s\r\n" % (PROTOCOL, ours.encode()))
        return peer, bytes(buf)

    def open_to(self, node_id: str) -> Flow | None:
        """The flow of the link to ``node_id`` open now, if any."""
        flow = self._by_node.get(node_id)
        return flow if flow is not None and flow in self.transports.conns else None

    async def flow_to(self, node_id: str, address: str) -> Flow:
        """The flow of a link to ``node_id`` (reached at ``address``, "host:port"):
        the open one, else a new one. Raises LinkFailed."""
        while True:
            flow = self._by_node.get(node_id)
            if flow is not None and flow in self.transports.conns:
                return flow
            opening = self._opening.get(node_id)
            if opening is None:
                break
            with trio.move_on_after(self.timeout + HANDSHAKE_TIMEOUT):
                await opening.wait()
            if not opening.is_set():
                raise LinkFailed("still opening")
        if self.open >= self.max_links or self._nursery is None:
            self._count("cluster_links_refused_total:limit")
            raise LinkFailed("max_links reached")
        self.open += 1
        self._opening[node_id] = done = trio.Event()
        try:
            try:
                stream, flow, rest = await self._open(node_id, address)
            except BaseException:
                self.open -= 1
                raise
            # From here _run gives the slot back, whatever happens.
            await self._nursery.start(self._run, Prefixed(stream, rest), flow, node_id)
            self._nursery.start_soon(self._keepalive, flow)
            return flow
        finally:
            del self._opening[node_id]
            done.set()

    async def _open(self, node_id: str, address: str) -> tuple[Link, Flow, bytes]:
        host, _, port = address.rpartition(":")
        try:
            with trio.fail_after(self.timeout):
                tcp = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except (OSError, ValueError, trio.TooSlowError) as e:
            self._count("cluster_links_refused_total:connect")
            raise LinkFailed(f"cannot connect to {node_id} at {address}: {type(e).__name__}") from e
        stream: Link = tcp
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                mark = ""
                if self.tls is not None:
                    stream = trio.SSLStream(tcp, self.tls.client, server_hostname=None)
                    await stream.do_handshake()
                    mark = fingerprint(stream.getpeercert(binary_form=True) or b"")
                rest = await self._opener_side(stream, node_id, mark)
            return stream, _flow_of(stream), rest
        except (LinkFailed, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
            self._count("cluster_links_refused_total:handshake")
            await trio.aclose_forcefully(stream)
            raise LinkFailed(f"handshake with {node_id} at {address} failed: {e or type(e).__name__}") from e

    async def _opener_side(self, stream: Link, node_id: str, mark: str) -> bytes:
        """The opener's half; ``mark``: the fingerprint of the certificate the listener
        showed over TLS, else ""."""
        buf = bytearray()
        words = await _line(stream, buf)
        if len(words) != 3 or words[0] != "HELLO" or words[1] != node_id:
            raise LinkFailed("not the node the shared state named")
        nonce = secrets.token_hex(NONCE_BYTES)
        mac = _mac(self._secret, "open", words[2], nonce, self.node_id, node_id, *_bound(mark))
        await stream.send_all(b"%s AUTH %s %s %s\r\n" % (
            PROTOCOL, self.node_id.encode(), nonce.encode(), mac.encode()))
        answer = await _line(stream, buf)
        good = _mac(self._secret, "listen", words[2], nonce, node_id, self.node_id, *_bound(mark))
        if len(answer) != 2 or answer[0] != "OK" or not hmac.compare_digest(answer[1], good):
            raise LinkFailed("the listener did not prove the secret")
        return bytes(buf)

    async def _run(self, stream: trio.abc.Stream, flow: Flow, peer: str,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry SIP on an authenticated link until it closes."""
        log.info("event=cluster_link_open peer=%s flow=%s", peer, flow)
        self._by_node[peer] = flow  # in use once Transports has it (flow_to checks)
        try:
            await self.transports.serve_established(stream, flow, task_status=task_status)
        except Exception:  # one link's bug must never reach the listener's nursery
            self._count("internal_errors_total")
            log.exception("event=internal_error where=cluster_link peer=%s", peer)
            await trio.aclose_forcefully(stream)
        finally:
            self.open -= 1
            if self._by_node.get(peer) == flow:
                del self._by_node[peer]
            log.info("event=cluster_link_closed peer=%s flow=%s", peer, flow)

    async def _keepalive(self, flow: Flow) -> None:
        """CRLFCRLF pings on a link this node opened, while it is open."""
        while True:
            await trio.sleep(KEEPALIVE_EVERY)
            if not self.transports.send(flow, b"\r\n\r\n"):
                return
