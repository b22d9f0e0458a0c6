"""The kernel path's fast lane: a tc (tcx) eBPF program in front of the nftables table.

nftables forwards a latched stream through the whole IP path: raw prerouting,
routing, ``ip_forward``, the forward hook, neighbour output - 1.6 to 4.5 µs per
packet on the guests measured, flat with load (bench/RESULTS.md). This program
runs at the device's tc ingress, before all of that: a packet whose (source
address, relay address, source port, relay port) is a latched direction in the
``streams`` hash map of its IP version is rewritten in place (the same four
fields nftables rewrites, TTL / hop limit - 1, checksums updated
incrementally), counted in a per-CPU array slot of its relay port and
redirected to the egress of the device the kernel's FIB names for its new
destination (``bpf_fib_lookup``; ``bpf_redirect_neigh`` while the neighbour is
not resolved).

It is an accelerator, never the authority: anything it does not take - a frame
not to this host's MAC, a VLAN tag, IPv4 options, IPv6 extension headers,
fragments, no UDP checksum, TTL ≤ 1, a GRO'd or padded frame, a destination the
FIB cannot forward to - goes on (``TCX_NEXT``) into the IP stack, where the
nftables table (which holds every direction too) or the userspace latch deals
with it exactly as without this program. So a stranger's packet, or a latched
source's old address, reaches the socket and is dropped there as before: only
latched 5-tuples match here either.

Nothing is compiled: the program (about 300 instructions, both IP versions) is
assembled here and loaded with bpf(2) through ctypes; the kernel's verifier
checks every access. The tcx link (Linux ≥ 6.6) lives as long as its file
descriptor: when the relay exits, however it exits, the program is detached and
the maps are freed - nothing stale can forward. References: bpf(2),
include/uapi/linux/bpf.h (instruction encoding, ``struct __sk_buff``, ``struct
bpf_fib_lookup``, helper numbers), Documentation/bpf/standardization/instruction-set.rst.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYS_BPF = {"x86_64": 321, "aarch64": 280}
LICENSE = b"Dual MIT/GPL"  # bpf_fib_lookup is GPL-only; the kernel accepts this spelling

# bpf(2) commands and types (include/uapi/linux/bpf.h)
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM = 0, 1, 2, 3
PROG_LOAD, PROG_TEST_RUN, LINK_CREATE = 5, 10, 28
MAP_TYPE_HASH, MAP_TYPE_PERCPU_ARRAY = 1, 6
PROG_TYPE_SCHED_CLS = 3
ATTACH_TCX_INGRESS = 46
# helpers
MAP_LOOKUP, L3_CSUM_REPLACE, L4_CSUM_REPLACE, REDIRECT, FIB_LOOKUP, REDIRECT_NEIGH = 1, 10, 11, 23, 69, 152
F_PSEUDO_HDR = 1 << 4
FIB_SUCCESS, FIB_NO_NEIGH = 0, 7
TCX_NEXT = -1  # "not mine": the next program, or the stack
# struct __sk_buff offsets
SKB_LEN, SKB_PKT_TYPE, SKB_VLAN_PRESENT, SKB_IFINDEX, SKB_DATA, SKB_DATA_END = 0, 4, 20, 40, 76, 80
PACKET_HOST = 0

# A direction's key is (saddr, daddr, sport, dport) as on the wire; its value the same
# four fields as they leave, then the checksum deltas (u32, native order, ``Family.deltas``).
COUNTER_SIZE = 16  # per CPU: packets, bytes (u64, native order), one slot per relay port


class EbpfUnavailable(Exception):
    """The fast lane cannot run here (no bpf(2), not permitted, kernel too old for
    tcx); the kernel path goes on through nftables alone. The text says why."""


# ------------------------------------------------------------------ assembler
# Opcode parts (instruction-set.rst): class | size | mode, class | op | source.
LDX, ST, STX, ALU, JMP, ALU64 = 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
SIZE = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
MEM, K, X = 0x60, 0x00, 0x08
ADD, SUB, MOV, END, TO_BE = 0x00, 0x10, 0xB0, 0xD0, 0x08
JA, JEQ, JGT, JNE, JLE, CALL, EXIT = 0x00, 0x10, 0x20, 0x50, 0xB0, 0x80, 0x90
R0, R1, R2, R3, R4, R5, R6, R7, R8, FP = 0, 1, 2, 3, 4, 5, 6, 7, 8, 10


class Asm:
    """Instructions with symbolic jump targets, resolved by ``code()``."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int, int, int, int, str | None]] = []
        self.labels: dict[str, int] = {}

    def _emit(self, op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
              target: str | None = None) -> None:
        self.insns.append((op, dst, src, off, imm, target))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def mov(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | MOV | K, dst, imm=imm)

    def movr(self, dst: int, src: int) -> None:
        self._emit(ALU64 | MOV | X, dst, src)

    def add(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | ADD | K, dst, imm=imm)

    def addr(self, dst: int, src: int) -> None:
        self._emit(ALU64 | ADD | X, dst, src)

    def sub(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | SUB | K, dst, imm=imm)

    def and_(self, dst: int, imm: int) -> None:
        self._emit(ALU64 | 0x50 | K, dst, imm=imm)

    def be16(self, dst: int) -> None:
        """Swap a 16-bit network-order value to host order (and back)."""
        if sys.byteorder == "little":
            self._emit(ALU | END | TO_BE, dst, imm=16)

    def load(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(LDX | SIZE[size] | MEM, dst, src, off)

    def store(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(STX | SIZE[size] | MEM, dst, src, off)

    def store_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(ST | SIZE[size] | MEM, dst, off=off, imm=imm)

    def map_fd(self, dst: int, fd: int) -> None:
        self._emit(0x18, dst, 1, imm=fd)  # BPF_LD | BPF_DW | BPF_IMM, src = BPF_PSEUDO_MAP_FD
        self._emit(0)

    def jump(self, op: int, dst: int, imm: int, target: str, *, reg: bool = False) -> None:
        self._emit(JMP | op | (X if reg else K), dst, imm if reg else 0, imm=0 if reg else imm, target=target)

    def goto(self, target: str) -> None:
        self._emit(JMP | JA, target=target)

    def call(self, helper: int) -> None:
        self._emit(JMP | CALL, imm=helper)

    def exit(self) -> None:
        self._emit(JMP | EXIT)

    def code(self) -> bytes:
        out = bytearray()
        for i, (op, dst, src, off, imm, target) in enumerate(self.insns):
            if target is not None:
                off = self.labels[target] - (i + 1)
            out += struct.pack("<BBhi", op, (src << 4) | dst, off, imm)
        return bytes(out)


@dataclass(frozen=True)
class Family:
    """Where an IP version keeps what the program reads and writes (offsets in its
    header; no IPv4 options, no IPv6 extension headers)."""

    tag: str  # label suffix
    af: int
    ethertype: bytes
    header: int  # IP header length
    addr: int  # address length
    addrs_at: int  # saddr, then daddr, then (in the UDP header right after) the ports
    hops_at: int  # TTL / hop limit
    proto_at: int  # protocol / next header
    length_at: int  # total length / payload length
    length_adds: int  # what the length field leaves out of the IP packet
    deltas: tuple[tuple[int, int], ...]  # (checksum helper, flags) per u32 delta in the value

    @property
    def key_size(self) -> int:
        return 2 * self.addr + 4

    @property
    def value_size(self) -> int:
        return self.key_size + 4 * len(self.deltas)

    @property
    def key_at(self) -> int:
        """The key on the stack: it ends at fp-4, so the relay port is at fp-6 for both."""
        return -4 - self.key_size

    @property
    def fib_at(self) -> int:
        return self.key_at - 64  # struct bpf_fib_lookup

    @property
    def udp_csum(self) -> int:
        return 14 + self.header + 6


V4 = Family("4", socket.AF_INET, b"\x08\x00", 20, 4, 12, 8, 9, 2, 0,
            ((L3_CSUM_REPLACE, 0), (L4_CSUM_REPLACE, F_PSEUDO_HDR), (L4_CSUM_REPLACE, 0)))
V6 = Family("6", socket.AF_INET6, b"\x86\xdd", 40, 16, 8, 7, 6, 4, 40,
            ((L4_CSUM_REPLACE, F_PSEUDO_HDR), (L4_CSUM_REPLACE, 0)))


def program(streams: dict[int, int], counters_fd: int, port_base: int) -> bytes:
    """The tc ingress program (``streams``: address family → its hash map's fd).
    Registers kept across calls: r6 the context, r7 the direction's map value, r8
    the FIB's verdict. Stack: the key ending at fp-4, struct bpf_fib_lookup below
    it, the counter index below that."""
    a = Asm()
    a.movr(R6, R1)
    a.load(4, R4, R6, SKB_PKT_TYPE)
    a.jump(JNE, R4, PACKET_HOST, "next")  # not to our MAC (promiscuous, broadcast): not ours to forward
    a.load(4, R4, R6, SKB_VLAN_PRESENT)
    a.jump(JNE, R4, 0, "next")
    a.load(4, R2, R6, SKB_DATA)
    a.load(4, R3, R6, SKB_DATA_END)
    a.movr(R4, R2)
    a.add(R4, 14)
    a.jump(JGT, R4, R3, "next", reg=True)
    a.load(2, R4, R2, 12)
    for f in (V4, V6):
        a.jump(JEQ, R4, int.from_bytes(f.ethertype, sys.byteorder), "ip" + f.tag)
    a.goto("next")
    for f in (V4, V6):
        a.label("ip" + f.tag)
        _checks(a, f)
        _lookup(a, f, streams[f.af])
        _route(a, f)
        _rewrite(a, f)
        _count(a, f, counters_fd, port_base)
        _redirect(a, f)
    a.label("next")
    a.mov(R0, TCX_NEXT)
    a.exit()
    return a.code()


def _checks(a: Asm, f: Family) -> None:
    """On to "next" unless the frame is one plain UDP datagram the rewrite keeps
    right (r2 = data, r3 = data_end, r6 = ctx)."""
    a.movr(R4, R2)
    a.add(R4, 14 + f.header + 8)
    a.jump(JGT, R4, R3, "next", reg=True)  # Ethernet + IP + UDP headers in the linear data
    if f is V4:
        a.load(1, R4, R2, 14)
        a.jump(JNE, R4, 0x45, "next")  # version 4, no options
        a.load(2, R4, R2, 14 + 6)
        a.and_(R4, int.from_bytes(b"\x3f\xff", sys.byteorder))
        a.jump(JNE, R4, 0, "next")  # a fragment (MF or an offset): the socket gets it whole
    else:
        a.load(1, R4, R2, 14)
        a.and_(R4, 0xF0)
        a.jump(JNE, R4, 0x60, "next")  # version 6
    a.load(1, R4, R2, 14 + f.proto_at)
    a.jump(JNE, R4, socket.IPPROTO_UDP, "next")  # (IPv6: no extension header, so no fragment either)
    a.load(2, R4, R2, f.udp_csum)
    a.jump(JEQ, R4, 0, "next")  # no UDP checksum: the rewrite cannot keep it zero
    a.load(1, R4, R2, 14 + f.hops_at)
    a.jump(JLE, R4, 1, "next")  # TTL / hop limit: the stack sends the ICMP time exceeded
    a.load(2, R5, R2, 14 + f.length_at)
    a.be16(R5)
    a.add(R5, 14 + f.length_adds)
    a.load(4, R4, R6, SKB_LEN)
    a.jump(JNE, R4, R5, "next", reg=True)  # one datagram, unpadded (not GRO'd, not an Ethernet minimum)


def _lookup(a: Asm, f: Family, streams_fd: int) -> None:
    """r7 = streams[saddr, daddr, sport, dport] (contiguous in the packet), or on to "next"."""
    for off in range(0, f.key_size, 4):
        a.load(4, R4, R2, 14 + f.addrs_at + off)
        a.store(4, FP, f.key_at + off, R4)
    a.map_fd(R1, streams_fd)
    a.movr(R2, FP)
    a.add(R2, f.key_at)
    a.call(MAP_LOOKUP)
    a.jump(JEQ, R0, 0, "next")
    a.movr(R7, R0)


def _route(a: Asm, f: Family) -> None:
    """Ask the FIB where the rewritten packet goes, before rewriting it: a packet
    it cannot forward (no route, the MTU, forwarding off) goes on untouched."""
    p = f.fib_at
    for off in range(0, 64, 8):
        a.store_imm(8, FP, p + off, 0)
    a.store_imm(1, FP, p, f.af)
    a.store_imm(1, FP, p + 1, socket.IPPROTO_UDP)
    for off in (0, 2):  # sport, dport (the stack wants aligned halves)
        a.load(2, R4, R7, 2 * f.addr + off)
        a.store(2, FP, p + 2 + off, R4)
    a.load(4, R4, R6, SKB_LEN)
    a.sub(R4, 14)
    a.store(2, FP, p + 6, R4)  # tot_len (host order): checked against the MTU
    a.load(4, R4, R6, SKB_IFINDEX)
    a.store(4, FP, p + 8, R4)  # the input interface (its forwarding switch counts)
    for off in range(0, f.addr, 4):
        a.load(4, R4, R7, off)
        a.store(4, FP, p + 16 + off, R4)  # ipv4_src / ipv6_src
        a.load(4, R4, R7, f.addr + off)
        a.store(4, FP, p + 32 + off, R4)  # ipv4_dst / ipv6_dst
    a.movr(R1, R6)
    a.movr(R2, FP)
    a.add(R2, p)
    a.mov(R3, 64)
    a.mov(R4, 0)
    a.call(FIB_LOOKUP)
    a.movr(R8, R0)
    a.jump(JEQ, R8, FIB_SUCCESS, "rewrite" + f.tag)
    a.jump(JNE, R8, FIB_NO_NEIGH, "next")
    a.label("rewrite" + f.tag)


def _rewrite(a: Asm, f: Family) -> None:
    """TTL / hop limit - 1, the four fields from the map value, then the checksums
    by the deltas computed when the direction was installed (``entry``)."""
    a.load(4, R2, R6, SKB_DATA)
    a.load(4, R3, R6, SKB_DATA_END)
    a.movr(R4, R2)
    a.add(R4, 14 + f.header + 8)
    a.jump(JGT, R4, R3, "next", reg=True)
    a.load(1, R4, R2, 14 + f.hops_at)
    a.sub(R4, 1)
    a.store(1, R2, 14 + f.hops_at, R4)
    for off in range(0, f.key_size, 4):
        a.load(4, R4, R7, off)
        a.store(4, R2, 14 + f.addrs_at + off, R4)
    for i, (helper, flags) in enumerate(f.deltas):
        a.movr(R1, R6)
        a.mov(R2, 14 + 10 if helper == L3_CSUM_REPLACE else f.udp_csum)
        a.mov(R3, 0)
        a.load(4, R4, R7, f.key_size + 4 * i)
        a.mov(R5, flags)
        a.call(helper)


def _redirect(a: Asm, f: Family) -> None:
    """Out of the interface the FIB named: with its MAC addresses, or through the
    neighbour subsystem when the next hop is not resolved yet."""
    p = f.fib_at
    a.jump(JEQ, R8, FIB_NO_NEIGH, "neigh" + f.tag)
    a.load(4, R2, R6, SKB_DATA)
    a.load(4, R3, R6, SKB_DATA_END)
    a.movr(R4, R2)
    a.add(R4, 14)
    a.jump(JGT, R4, R3, "drop" + f.tag, reg=True)
    for size, src, dst in ((2, 58, 0), (2, 60, 2), (2, 62, 4), (4, 52, 6), (2, 56, 10)):  # dmac, smac
        a.load(size, R4, FP, p + src)
        a.store(size, R2, dst, R4)
    a.load(4, R1, FP, p + 8)
    a.mov(R2, 0)
    a.call(REDIRECT)
    a.exit()
    a.label("neigh" + f.tag)
    a.load(4, R1, FP, p + 8)
    a.mov(R2, 0)
    a.mov(R3, 0)
    a.mov(R4, 0)
    a.call(REDIRECT_NEIGH)
    a.exit()
    a.label("drop" + f.tag)  # unreachable in practice: the linear header was there a moment ago
    a.mov(R0, 2)
    a.exit()


def _count(a: Asm, f: Family, counters_fd: int, port_base: int) -> None:
    """counters[relay port - port_base] (this CPU's) += 1 packet, IP length bytes
    (a port outside the array is not counted: its lookup finds nothing)."""
    index = f.fib_at - 4
    a.load(2, R4, FP, -6)  # the relay port, at the key's end
    a.be16(R4)
    a.sub(R4, port_base)
    a.store(4, FP, index, R4)
    a.map_fd(R1, counters_fd)
    a.movr(R2, FP)
    a.add(R2, index)
    a.call(MAP_LOOKUP)
    a.jump(JEQ, R0, 0, "counted" + f.tag)
    a.load(8, R4, R0, 0)
    a.add(R4, 1)
    a.store(8, R0, 0, R4)
    a.load(4, R5, R6, SKB_LEN)
    a.sub(R5, 14)
    a.load(8, R4, R0, 8)
    a.addr(R4, R5)
    a.store(8, R0, 8, R4)
    a.label("counted" + f.tag)


# --------------------------------------------------------------- checksums
def _fold(x: int) -> int:
    while x > 0xFFFF:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def csum_delta(old: bytes, new: bytes) -> int:
    """The ones'-complement difference (RFC 1624) between two equally long byte
    strings, in the host's order as the kernel's csum helpers take it."""
    n = len(old) // 2
    fmt = f"={n}H"
    return _fold(sum(0xFFFF - w for w in struct.unpack(fmt, old)) + sum(struct.unpack(fmt, new)))


TTL_DELTA = csum_delta(b"\x02\x00", b"\x01\x00")  # TTL - 1 in the IP header's (TTL, protocol) word


def entry(src: tuple[str, int], relay: tuple[str, int], out: tuple[str, int],
          dst: tuple[str, int]) -> tuple[Family, bytes, bytes]:
    """The family, ``streams`` key and value of one direction: packets from ``src``
    to ``relay`` leave from ``out`` to ``dst`` (addresses of the relay's family)."""
    f = V6 if ":" in relay[0] else V4

    def fields(a: tuple[str, int], b: tuple[str, int]) -> bytes:
        return socket.inet_pton(f.af, a[0]) + socket.inet_pton(f.af, b[0]) + struct.pack("!HH", a[1], b[1])

    key, new = fields(src, relay), fields(out, dst)
    n = 2 * f.addr
    addrs, ports = csum_delta(key[:n], new[:n]), csum_delta(key[n:], new[n:])
    if f is V4:  # the IPv4 header's own checksum: the addresses and TTL - 1
        return f, key, new + struct.pack("=III", _fold(addrs + TTL_DELTA), addrs, ports)
    return f, key, new + struct.pack("=II", addrs, ports)


# ------------------------------------------------------------------ bpf(2)
class _Bpf:
    def __init__(self) -> None:
        nr = SYS_BPF.get(platform.machine())
        if nr is None or not sys.platform.startswith("linux"):
            raise EbpfUnavailable(f"no bpf(2) number known for {platform.machine()}")
        self.nr = nr
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def __call__(self, cmd: int, attr: bytes | ctypes.Array[ctypes.c_char]) -> int:
        buf = attr if isinstance(attr, ctypes.Array) else ctypes.create_string_buffer(attr, 128)
        ret = self.libc.syscall(self.nr, cmd, buf, 128)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(ret)


def _ptr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


class FastPath:
    """The program, its two maps and its tcx links on some devices; ``close`` (or
    the process's end) detaches and frees everything."""

    def __init__(self, ports: tuple[int, int], devices: Iterable[int]):
        """``ports``: the relay's port range ([media] port_min, port_max): at most one
        direction and one counter slot per port. Both ends count (with an odd port_max
        the last pair's RTCP port is port_max itself), and one more for good measure."""
        self.base, self.slots = ports[0], ports[1] - ports[0] + 2
        slots = self.slots
        self._fds: list[int] = []
        self._keys: dict[int, tuple[int, bytes]] = {}  # relay port → (its map, its direction's key)
        try:
            self._bpf = _Bpf()
            self.ncpu = _possible_cpus()
            self.streams = {f.af: self._map(MAP_TYPE_HASH, f.key_size, f.value_size, slots,
                                            b"pbx_streams" + f.tag.encode()) for f in (V4, V6)}
            self.counters = self._map(MAP_TYPE_PERCPU_ARRAY, 4, COUNTER_SIZE, slots, b"pbx_counters")
            self.prog = self._load(program(self.streams, self.counters, self.base))
            for ifindex in devices:
                self._attach(ifindex)
        except EbpfUnavailable:
            self.close()
            raise
        except OSError as e:  # /sys not readable, say: the table forwards alone
            self.close()
            raise EbpfUnavailable(f"cannot set up: {e}") from None

    def _map(self, kind: int, key: int, value: int, entries: int, name: bytes) -> int:
        attr = struct.pack("=IIIIIII16s", kind, key, value, entries, 0, 0, 0, name[:15])
        try:
            fd = self._bpf(MAP_CREATE, attr)
        except OSError as e:
            raise EbpfUnavailable(f"cannot create BPF maps: {e.strerror}") from None
        self._fds.append(fd)
        return fd

    def _load(self, code: bytes) -> int:
        insns = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(LICENSE)
        log = ctypes.create_string_buffer(1 << 16)
        attr = struct.pack("=IIQQIIQII16sII", PROG_TYPE_SCHED_CLS, len(code) // 8, _ptr(insns), _ptr(lic),
                           1, len(log), _ptr(log), 0, 0, b"pbx_relay_media", 0, ATTACH_TCX_INGRESS)
        try:
            fd = self._bpf(PROG_LOAD, attr)
        except OSError as e:
            tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
            why = " | ".join(tail)
            raise EbpfUnavailable(f"the kernel refused the program: {e.strerror} {why}") from None
        self._fds.append(fd)
        return fd

    def _attach(self, ifindex: int) -> None:
        try:
            fd = self._bpf(LINK_CREATE, struct.pack("=IIII", self.prog, ifindex, ATTACH_TCX_INGRESS, 0))
        except OSError as e:
            why = "tcx needs Linux 6.6 or later" if e.errno == errno.EINVAL else e.strerror
            raise EbpfUnavailable(f"cannot attach to interface {ifindex}: {why}") from None
        self._fds.append(fd)

    # ------------------------------------------------------------- per port
    def forward(self, port: int, src: tuple[str, int], relay: str, out_port: int,
                dst: tuple[str, int]) -> None:
        """From now on, packets from ``src`` to ``relay``:``port`` leave from
        ``out_port`` to ``dst`` here (whatever the port forwarded before, no more)."""
        self.stop_forwarding(port)
        f, key, value = entry(src, (relay, port), (relay, out_port), dst)
        self._put(self.streams[f.af], key, value)
        self._keys[port] = (self.streams[f.af], key)

    def stop_forwarding(self, port: int) -> None:
        had = self._keys.pop(port, None)
        if had is not None:
            self._remove(*had)

    def stop_all(self) -> None:
        for port in list(self._keys):
            self.stop_forwarding(port)

    # ------------------------------------------------------------------ maps
    def _put(self, map_fd: int, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
        self._bpf(MAP_UPDATE_ELEM, struct.pack("=IIQQQ", map_fd, 0, _ptr(k), _ptr(v), 0))

    def _remove(self, map_fd: int, key: bytes) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        try:
            self._bpf(MAP_DELETE_ELEM, struct.pack("=IIQ", map_fd, 0, _ptr(k)))
        except FileNotFoundError:
            pass

    def reset(self, port: int) -> None:
        """Zero the relay port's counters (a new stream starts counting there)."""
        if not 0 <= port - self.base < self.slots:
            return  # not the relay's: never forwarded here (its lookup finds no slot)
        k = ctypes.create_string_buffer(struct.pack("=I", port - self.base), 4)
        v = ctypes.create_string_buffer(COUNTER_SIZE * self.ncpu)
        self._bpf(MAP_UPDATE_ELEM, struct.pack("=IIQQQ", self.counters, 0, _ptr(k), _ptr(v), 0))

    def count(self, port: int) -> tuple[int, int]:
        """(packets, IP bytes) forwarded here for the relay port since its ``reset``."""
        if not 0 <= port - self.base < self.slots:
            return 0, 0
        k = ctypes.create_string_buffer(struct.pack("=I", port - self.base), 4)
        v = ctypes.create_string_buffer(COUNTER_SIZE * self.ncpu)
        self._bpf(MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", self.counters, 0, _ptr(k), _ptr(v), 0))
        per_cpu = struct.unpack(f"={2 * self.ncpu}Q", v.raw)
        return sum(per_cpu[0::2]), sum(per_cpu[1::2])

    def test_run(self, packet: bytes, ifindex: int = 0) -> tuple[int, bytes]:
        """Run the program on one frame without a network (BPF_PROG_TEST_RUN): its
        verdict and the frame as it left it."""
        data_in = ctypes.create_string_buffer(packet, len(packet))
        data_out = ctypes.create_string_buffer(len(packet) + 256)
        ctx = ctypes.create_string_buffer(192)
        struct.pack_into("=I", ctx, SKB_IFINDEX, ifindex)
        attr = ctypes.create_string_buffer(struct.pack(
            "=IIIIQQIIIIQQ", self.prog, 0, len(packet), len(data_out), _ptr(data_in), _ptr(data_out), 1, 0,
            len(ctx) if ifindex else 0, 0, _ptr(ctx) if ifindex else 0, 0), 128)
        self._bpf(PROG_TEST_RUN, attr)
        _, retval, _, size_out = struct.unpack_from("=IIII", attr)
        return struct.unpack("=i", struct.pack("=I", retval))[0], data_out.raw[:size_out]

    def close(self) -> None:
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds = []


SIOCGIFHWADDR = 0x8927
ARPHRD_ETHER = 1


def ethernet_interfaces() -> list[tuple[int, str]]:
    """(index, name) of this namespace's Ethernet interfaces: the program reads an
    Ethernet header, so it is attached to nothing else (not loopback, not an L3
    tunnel such as WireGuard, whose frames start at the IP header)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for index, name in socket.if_nameindex():
            try:
                req = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
            except OSError:
                continue  # gone since the listing
            if struct.unpack_from("=H", req, 16)[0] == ARPHRD_ETHER:
                out.append((index, name))
    return out


def _possible_cpus() -> int:
    """The per-CPU maps' width: every CPU the kernel could bring up (ranges like 0-3,8)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n
