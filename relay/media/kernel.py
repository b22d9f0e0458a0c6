"""Kernel media forwarding: latched RTP/RTCP streams handed to nftables, never to Python.

The judgement stays in userspace: the relay's sockets stay bound, the userspace
forwarder receives each side's first packets and latches them (symmetric RTP,
relay/media/session.py). Once a direction has a latched source and a
destination, it becomes map entries of the relay's own table (``inet
pbx_relay``) and from then on its packets are rewritten and forwarded by the
kernel:

- prerouting (priority raw): a packet to a relay port is ``notrack``ed; if its
  (source address, source port, relay port) is a latched direction, it gets the
  mark ``MARK_TAG | relay port`` and its destination address and port are
  rewritten from the maps (stateless DNAT: no conntrack entry exists that could
  outlive the table);
- forward (policy drop: a relay that forwards must not become a router): a
  packet with the relay's mark leaves from the relay's address and the peer
  leg's port (stateless SNAT, map ``from_port``, whose per-element counter is the
  direction's packet and byte count); everything else is dropped;
- output (priority raw): what the relay's sockets send is ``notrack``ed too.

Anything else sent to a relay port - a stranger, a latched source's old address,
a packet with no UDP checksum (the rewrite cannot keep a zero checksum), an IP
fragment (only the first carries the ports; the socket gets the datagram whole) -
misses the map and reaches the socket, where the userspace latch drops and counts
it. docs/media.md ("Kernel forwarding") has the measurements and the choices.

In front of the table a tc eBPF program forwards the same directions
before the IP stack (relay/media/ebpf.py, ``[media] kernel_fast_path``): every
change below goes to both, and the counts are the sum of both.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from relay.config import ConfigError
from relay.media.ebpf import EbpfUnavailable, FastPath, ethernet_interfaces
from relay.media.forwarder import STREAMS_USERSPACE, UdpForwarder
from relay.media.nft import Nft, NftError
from relay.media.session import Addr, Leg, MediaBackend

log = logging.getLogger("relay")

TABLE = "pbx_relay"
# The packet mark of a packet the kernel relays: "RP" in the high 16 bits, the
# relay port it arrived on in the low 16. It ties prerouting (DNAT) to forward
# (SNAT) without conntrack; a host that uses marks for policy routing must keep
# 0x5250xxxx free.
MARK_TAG = 0x5250_0000
MARK_MASK = 0xFFFF_0000
# Element counters are read as often as costs at most POLL_SHARE of one core (the
# dump of all counters takes ≈ 6 ms per 1,000 streams with libnftables 1.0.6
# here), but at least every POLL_MAX seconds and a quarter of the no-media
# timeout (which judges silence from them), and not more often than POLL_MIN.
POLL_SHARE = 0.01
POLL_MIN = 0.25
POLL_MAX = 5.0
# The kernel counts IP packet lengths; legs count UDP payload like the userspace
# forwarder: IP header without options + UDP header.
HEADER_OCTETS = {socket.AF_INET: 20 + 8, socket.AF_INET6: 40 + 8}
FORWARDING_SYSCTL = {
    socket.AF_INET: Path("/proc/sys/net/ipv4/ip_forward"),
    socket.AF_INET6: Path("/proc/sys/net/ipv6/conf/all/forwarding"),
}
STREAMS_KERNEL = "media_streams_forwarded:kernel"
BACKENDS = ("userspace", "kernel", "auto")


class KernelUnavailable(Exception):
    """The kernel backend cannot run here (no libnftables, no CAP_NET_ADMIN, IP
    forwarding off); the text says which."""


def poll_interval(no_media_timeout: float) -> float:
    """The longest wait between two reads of the kernel's counters: the no-media
    timeout judges silence from them, so a quarter of it (within POLL_MIN..POLL_MAX)."""
    return min(POLL_MAX, max(POLL_MIN, no_media_timeout / 4))


def next_poll(took: float, longest: float) -> float:
    """Seconds until the next read, given how long the last one ``took``."""
    return min(longest, max(POLL_MIN, took / POLL_SHARE))


def ruleset(address: str, port_min: int, port_max: int) -> str:
    """The relay's whole table, replacing whatever an earlier (crashed) relay left:
    ``add``+``delete`` first, so the batch works whether the table exists or not."""
    v6 = ":" in address
    ip, addr_type = ("ip6", "ipv6_addr") if v6 else ("ip", "ipv4_addr")
    whole = "exthdr frag missing" if v6 else "ip frag-off & 0x3fff == 0"  # not a fragment
    ports = f"{port_min}-{port_max}"
    return f"""
add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  map latched {{ type {addr_type} . inet_service . inet_service : mark; }}
  map to_addr {{ type mark : {addr_type}; }}
  map to_port {{ type mark : inet_service; }}
  map from_port {{ type mark : inet_service; counter; }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    {ip} daddr {address} udp dport {ports} notrack {whole} udp checksum != 0 meta mark set {ip} saddr . udp sport . udp dport map @latched {ip} daddr set meta mark map @to_addr udp dport set meta mark map @to_port
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    meta mark & {MARK_MASK:#x} == {MARK_TAG:#x} {ip} saddr set {address} udp sport set meta mark map @from_port accept
  }}
  chain output {{
    type filter hook output priority raw; policy accept;
    {ip} saddr {address} udp sport {ports} notrack
  }}
}}
"""  # noqa: E501 - one nft rule per line reads better than a wrapped one


@dataclass(frozen=True)
class Direction:
    """What the kernel does with the packets that reach one relay port: those from
    ``src`` (the latched source, no other) go to ``dst`` from ``out_port``."""

    src: Addr
    dst: Addr
    out_port: int


def wanted(leg: Leg, rtcp: bool, relay_ip: str) -> Direction | None:
    """The kernel entry the relay port ``leg.port`` (+1 for RTCP) should have: only
    once its side has latched and the other side has somewhere to receive. Nothing
    for an address of another family or the relay's own (a loop)."""
    src = (leg.rtcp if rtcp else leg.rtp).latched
    peer = leg.peer
    if src is None or peer is None:
        return None
    dst = (peer.rtcp if rtcp else peer.rtp).destination()
    if dst is None:
        return None
    v6 = ":" in relay_ip
    for ip in (src[0], dst[0]):
        if ip == relay_ip or (":" in ip) != v6:
            return None
    return Direction(src, dst, peer.port + 1 if rtcp else peer.port)


def _element(op: str, name: str, elems: list[Any]) -> dict[str, Any]:
    return {op: {"element": {"family": "inet", "table": TABLE, "name": name, "elem": elems}}}


def direction_commands(op: str, port: int, d: Direction) -> list[dict[str, Any]]:
    """JSON commands (libnftables-json(5)) that add or delete one direction's entries."""
    mark = MARK_TAG | port
    key = {"concat": [d.src[0], d.src[1], port]}
    if op == "add":
        return [_element("add", "latched", [[key, mark]]), _element("add", "to_addr", [[mark, d.dst[0]]]),
                _element("add", "to_port", [[mark, d.dst[1]]])]
    return [_element("delete", "latched", [key]), _element("delete", "to_addr", [mark]),
            _element("delete", "to_port", [mark])]


def counter_commands(op: str, ports: dict[int, int]) -> list[dict[str, Any]]:
    """Add (relay port → out port) or delete the ``from_port`` elements, each with its counter."""
    if not ports:
        return []
    if op == "add":
        return [_element("add", "from_port", [[MARK_TAG | p, out] for p, out in ports.items()])]
    return [_element("delete", "from_port", [MARK_TAG | p for p in ports])]


_COUNTER_TEXT = re.compile(r"(0x[0-9a-fA-F]+|\d+) counter packets (\d+) bytes (\d+)")


def parse_counters(output: str) -> dict[int, tuple[int, int]]:
    """relay port → (packets, bytes) from what ``list map``/``get element`` of
    ``from_port`` printed: JSON, or nft's text (1.0.6 prints ``get`` as text even in
    JSON mode)."""
    out: dict[int, tuple[int, int]] = {}
    for mark, packets, octets in _COUNTER_TEXT.findall(output):
        out[int(mark, 0) & 0xFFFF] = (int(packets), int(octets))
    if out or not output.lstrip().startswith("{"):
        return out
    for entry in json.loads(output).get("nftables", []):
        for key, _value in (entry.get("map") or {}).get("elem", []):
            elem = key.get("elem", {}) if isinstance(key, dict) else {}
            counter = elem.get("counter")
            if counter is not None:
                out[int(elem["val"]) & 0xFFFF] = (int(counter["packets"]), int(counter["bytes"]))
    return out


def forwarding_enabled(family: socket.AddressFamily) -> bool:
    """IP forwarding is on for the media address's family (the kernel path routes
    the rewritten packets; with forwarding off they would vanish)."""
    try:
        return FORWARDING_SYSCTL[family].read_text().strip() == "1"
    except OSError:
        return False


@dataclass(eq=False)
class PortState:
    """One relay port with a ``from_port`` element (and so a counter) in the kernel."""

    out_port: int
    epoch: int
    direction: Direction | None = None
    packets: int = 0  # the counter when last read
    octets: int = 0


class ForwardingBackend(MediaBackend, Protocol):
    """A MediaBackend that runs tasks in the service's nursery."""

    def attach(self, nursery: trio.Nursery) -> None: ...


class KernelForwarder:
    """MediaBackend: the userspace forwarder for first packets and strangers, the
    kernel for every latched direction (the eBPF fast lane where it can run,
    and the nftables maps, which hold every direction, for what the lane leaves)."""

    def __init__(self, address: str, count: Callable[[str, int], None],
                 port_range: tuple[int, int], poll: float = POLL_MAX, fast_path: bool = True):
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.count = count
        self.poll = poll
        self.user = UdpForwarder(address, count, on_latch=self._latched)
        if not forwarding_enabled(self.family):
            raise KernelUnavailable(f"IP forwarding is off ({FORWARDING_SYSCTL[self.family]} is not 1)")
        try:
            self._nft = Nft()
            self._poll_nft = Nft()
            self._ruleset = ruleset(address, *port_range)
            self._nft.run(self._ruleset)
        except NftError as e:
            raise KernelUnavailable(f"cannot load table inet {TABLE}: {e}") from None
        self._legs: dict[int, tuple[Leg, bool]] = {}  # relay port → (leg, is RTCP port)
        self._kernel: dict[int, PortState] = {}
        self._epochs = itertools.count()
        self._dirty: set[int] = set()
        self._wake = trio.Event()
        self._stopped = False
        log.info("event=media_backend backend=kernel table=inet_%s address=%s ports=%d-%d",
                 TABLE, address, *port_range)
        self._fast: FastPath | None = None
        if fast_path:
            self._fast = self._open_fast_path(port_range)
        else:
            log.info("event=media_fast_path state=off reason=%r", "media.kernel_fast_path = false")

    def _open_fast_path(self, port_range: tuple[int, int]) -> FastPath | None:
        """The tc eBPF lane in front of the table (relay/media/ebpf.py), on every
        Ethernet interface. Without it the table forwards alone."""
        devices = ethernet_interfaces()
        if not devices:
            log.info("event=media_fast_path state=off reason=%r", "no Ethernet interface to attach to")
            return None
        try:
            fast = FastPath(port_range, [i for i, _ in devices])
        except EbpfUnavailable as e:
            log.warning("event=media_fast_path state=off reason=%r (the nftables table forwards alone)",
                        str(e))
            return None
        log.info("event=media_fast_path state=on hook=tcx_ingress devices=%s",
                 ",".join(name for _, name in devices))
        return fast

    # ------------------------------------------------------------ MediaBackend
    def attach(self, nursery: trio.Nursery) -> None:
        self.user.attach(nursery)
        nursery.start_soon(self._run)

    def bind(self, port: int) -> bool:
        """Bind the pair in userspace: first packets and strangers land there."""
        return self.user.bind(port)

    def open(self, leg: Leg) -> None:
        """Forward in userspace until both latches of a direction are taken."""
        self.user.open(leg)
        self._legs[leg.port] = (leg, False)
        self._legs[leg.port + 1] = (leg, True)

    def close(self, leg: Leg) -> None:
        """Take the leg's directions out of the kernel, then close its sockets."""
        ports = (leg.port, leg.port + 1)
        for p in ports:
            self._legs.pop(p, None)
        self._retire(leg, [p for p in ports if p in self._kernel])
        self.user.close(leg)

    def relatch(self, leg: Leg) -> None:
        """At once, not batched: the old latched source must not be forwarded a
        moment longer (the phone's old network may be someone else's now)."""
        self.user.relatch(leg)
        self._sync(self._stream_ports(leg))

    # ---------------------------------------------------------------- changes
    def _latched(self, leg: Leg) -> None:
        self._dirty.update(self._stream_ports(leg))
        self._wake.set()

    @staticmethod
    def _stream_ports(leg: Leg) -> list[int]:
        legs = [leg] if leg.peer is None else [leg, leg.peer]
        return [p for x in legs for p in (x.port, x.port + 1)]

    def _wanted(self, port: int) -> Direction | None:
        entry = self._legs.get(port)
        return None if entry is None else wanted(entry[0], entry[1], self.address)

    def _sync(self, ports: Iterable[int]) -> None:
        """One transaction that brings the kernel's entries of ``ports`` in line with
        their legs' latches."""
        if self._stopped:
            return
        changes: dict[int, Direction | None] = {}
        commands: list[dict[str, Any]] = []
        new_counters: dict[int, int] = {}
        for port in sorted(set(ports)):
            state, want = self._kernel.get(port), self._wanted(port)
            have = state.direction if state is not None else None
            if want == have:
                continue
            if have is not None:
                commands += direction_commands("delete", port, have)
            if want is not None:
                if state is None:
                    new_counters[port] = want.out_port
                commands += direction_commands("add", port, want)
            changes[port] = want
        if not changes:
            return
        for port in changes:  # the fast lane first: an old source stops there at once
            self._fast_set(port, None)
        if self._run_commands(counter_commands("add", new_counters) + commands):
            for port, out in new_counters.items():
                self._kernel[port] = PortState(out, next(self._epochs))
                self._fast_reset(port)
            for port, want in changes.items():
                self._set_direction(port, want)
                self._fast_set(port, want)

    def _fast_reset(self, port: int) -> None:
        self._fast_change("reset", lambda fast: fast.reset(port))

    def _fast_set(self, port: int, want: Direction | None) -> None:
        if want is None:
            self._fast_change("stop", lambda fast: fast.stop_forwarding(port))
        else:
            self._fast_change("forward", lambda fast: fast.forward(port, want.src, self.address,
                                                                    want.out_port, want.dst))

    def _fast_change(self, what: str, change: Callable[[FastPath], None]) -> None:
        """One change to the fast lane; a refusal (its map full, say) only leaves the
        direction to the table, which has it too."""
        if self._fast is None:
            return
        try:
            change(self._fast)
        except OSError as e:
            self.count("media_kernel_errors_total", 1)
            log.warning("event=media_kernel_error op=fast_path_%s error=%s", what, e.strerror)

    def _set_direction(self, port: int, want: Direction | None) -> None:
        state = self._kernel[port]
        before, state.direction = state.direction, want
        if port % 2 or (before is None) == (want is None):
            return  # RTCP ports (odd, RFC 3550 §11) are not counted as streams
        step = 1 if want is not None else -1
        self.count(STREAMS_KERNEL, step)
        self.count(STREAMS_USERSPACE, -step)

    def _retire(self, leg: Leg, ports: list[int]) -> None:
        """A closing leg: stop forwarding, read the final counts, free the counters."""
        if not ports or self._stopped:
            return
        self._sync(ports)  # its legs are gone: every direction is removed
        try:
            final = self._with_fast_path(parse_counters(self._nft.run(
                f"get element inet {TABLE} from_port {{ {', '.join(hex(MARK_TAG | p) for p in ports)} }}")))
        except NftError as e:
            self._failed("read", e)
            final = {}
        for p in ports:
            state = self._kernel.get(p)
            if state is not None and p in final:
                self._account(leg, state, *final[p], now=trio.current_time())
        self._run_commands(counter_commands("delete", {p: 0 for p in ports if p in self._kernel}))
        for p in ports:
            self._kernel.pop(p, None)

    def _run_commands(self, commands: list[dict[str, Any]]) -> bool:
        if not commands:
            return True
        try:
            self._nft.run_json(commands)
            return True
        except NftError as e:
            self._failed("update", e)
            self._rebuild()
            return False

    def _failed(self, what: str, e: NftError) -> None:
        self.count("media_kernel_errors_total", 1)
        log.warning("event=media_kernel_error op=%s error=%s", what, str(e).splitlines()[0][:200])

    def _rebuild(self) -> None:
        """After a failed transaction the table is not what we think: start it over
        empty (the streams go back to userspace) and hand them over again."""
        if self._stopped:
            return
        for port, state in list(self._kernel.items()):
            if state.direction is not None:
                self._set_direction(port, None)
        self._kernel.clear()
        self._fast_change("stop", lambda fast: fast.stop_all())
        try:
            self._nft.run(self._ruleset)
        except NftError as e:
            self._failed("rebuild", e)
            self.stop()  # give up: userspace forwards everything from now on
            return
        self._dirty.update(self._legs)
        self._wake.set()

    # ---------------------------------------------------------------- counters
    def _account(self, leg: Leg, state: PortState, packets: int, octets: int, now: float) -> None:
        dp = packets - state.packets
        if dp <= 0:
            return
        leg.packets += dp
        leg.octets += octets - state.octets - dp * HEADER_OCTETS[self.family]
        leg.last_seen = max(leg.last_seen, now)
        state.packets, state.octets = packets, octets

    def _apply_counts(self, counts: dict[int, tuple[int, int]], epochs: dict[int, int], now: float) -> None:
        """Counts read in a worker thread: only for ports whose counter is still the
        one that was read (not closed, not reopened since)."""
        for port, (packets, octets) in counts.items():
            state, entry = self._kernel.get(port), self._legs.get(port)
            if state is None or entry is None or epochs.get(port) != state.epoch:
                continue
            self._account(entry[0], state, packets, octets, now)

    def _with_fast_path(self, counts: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """The table's counts plus what the fast lane forwarded for the same ports
        (a packet goes one way or the other, never both)."""
        fast = self._fast
        if fast is None:
            return counts
        total = {}
        try:
            for port, (packets, octets) in counts.items():
                more_packets, more_octets = fast.count(port)
                total[port] = (packets + more_packets, octets + more_octets)
        except OSError as e:  # closed by stop() while a read was in a worker thread
            raise NftError(f"fast path counters: {e.strerror}") from None
        return total

    async def _poll_counters(self) -> None:
        listing = f"list map inet {TABLE} from_port"
        delay = POLL_MIN
        while True:
            await trio.sleep(delay)
            if not self._kernel:
                continue
            epochs = {p: s.epoch for p, s in self._kernel.items()}
            started = trio.current_time()
            try:
                counts = await trio.to_thread.run_sync(
                    lambda: self._with_fast_path(parse_counters(self._poll_nft.run(listing))))
            except NftError as e:
                self._failed("read", e)
                continue
            self._apply_counts(counts, epochs, trio.current_time())
            delay = next_poll(trio.current_time() - started, self.poll)

    # --------------------------------------------------------------- lifetime
    async def _handovers(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            ports, self._dirty = self._dirty, set()
            self._sync(ports)

    async def _run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._handovers)
                nursery.start_soon(self._poll_counters)
        finally:
            self.stop()

    def stop(self) -> None:
        """Remove the table (nothing forwards any more) and forget it; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._nft.run(f"delete table inet {TABLE}")
        except NftError as e:
            self._failed("stop", e)
        if self._fast is not None:
            self._fast.close()
        self._nft.close()
        self._poll_nft.close()


def make_backend(kind: str, address: str, count: Callable[[str, int], None], *,
                 port_range: tuple[int, int] = (10_000, 20_000),
                 no_media_timeout: float = 60.0, fast_path: bool = True) -> tuple[ForwardingBackend, str]:
    """The media backend ``[media] backend`` asks for, and which one it is:
    "userspace"; "kernel" (ConfigError when it cannot run here); "auto" (kernel
    when it can run, else userspace with one warning line)."""
    if kind not in BACKENDS:
        raise ConfigError(f"media.backend must be one of {', '.join(BACKENDS)}")
    if kind == "userspace":
        return UdpForwarder(address, count), "userspace"
    try:
        poll = poll_interval(no_media_timeout)
        return KernelForwarder(address, count, port_range, poll, fast_path), "kernel"
    except KernelUnavailable as e:
        if kind == "kernel":
            raise ConfigError(f'media.backend = "kernel": {e}') from None
        log.warning("event=media_backend backend=userspace reason=%r (media.backend = auto: "
                    "the kernel backend needs CAP_NET_ADMIN, nftables and IP forwarding)", str(e))
        return UdpForwarder(address, count), "userspace"
