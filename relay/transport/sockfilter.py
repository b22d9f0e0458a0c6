"""Drop chosen IPv4 sources in the kernel: a classic BPF socket filter on a UDP socket (Linux)."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Sequence

# <linux/filter.h>, <asm-generic/socket.h>: not exported by Python's socket module.
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SKF_NET_OFF = -0x100000  # offsets from the network (IP) header, whatever the socket sees
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_KEEP_ALL = 0xFFFFFFFF
_IPV4_SOURCE = 12  # offset of the source address in the IPv4 header (RFC 791)
# A jump reaches at most 255 instructions ahead (jt is 8 bits).
MAX_SOURCES = 254

Instruction = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


def drop_program(sources: Sequence[str]) -> list[Instruction]:
    """A filter that drops datagrams from ``sources`` (IPv4) and keeps everything else."""
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} sources")
    n = len(sources)
    prog: list[Instruction] = [(_LD_W_ABS, 0, 0, (SKF_NET_OFF + _IPV4_SOURCE) & 0xFFFFFFFF)]
    for i, ip in enumerate(sources, start=1):
        # match: jump to the final "drop" (instruction n + 2); no match: next compare
        prog.append((_JEQ_K, n + 1 - i, 0, int(ipaddress.IPv4Address(ip))))
    prog.append((_RET_K, 0, 0, _KEEP_ALL))
    prog.append((_RET_K, 0, 0, 0))
    return prog


def apply(sock: socket.socket, sources: Sequence[str]) -> None:
    """Make ``sock`` (AF_INET, UDP) drop what ``sources`` send; none: no filter."""
    if not sources:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError:  # ENOENT: there was none
            pass
        return
    prog = drop_program(sources)
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }; the kernel
    # copies the program during the call, so the buffer may go afterwards.
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
