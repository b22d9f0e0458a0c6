"""STUN binding requests on the SIP UDP port (RFC 5389, used as keepalive by RFC 5626 §4.4.2)."""

from __future__ import annotations

import ipaddress
import struct

MAGIC = 0x2112A442
_HDR = struct.Struct("!HHI12s")
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
XOR_MAPPED_ADDRESS = 0x0020


def is_stun(data: bytes) -> bool:
    """RFC 5389 §6: first two bits zero, magic cookie at offset 4 (RFC 7983 demux)."""
    return len(data) >= 20 and data[0] < 2 and data[4:8] == b"\x21\x12\xa4\x42"


def binding_response(request: bytes, ip: str, port: int) -> bytes | None:
    """The success response to a binding request, or None for anything else."""
    msg_type, length, magic, txid = _HDR.unpack_from(request)
    if msg_type != BINDING_REQUEST or magic != MAGIC or length != len(request) - 20:
        return None
    addr = ipaddress.ip_address(ip)
    xport = port ^ (MAGIC >> 16)
    if addr.version == 4:
        xaddr = bytes(a ^ b for a, b in zip(addr.packed, struct.pack("!I", MAGIC), strict=True))
        value = struct.pack("!BBH", 0, 1, xport) + xaddr
    else:
        key = struct.pack("!I", MAGIC) + txid
        xaddr = bytes(a ^ b for a, b in zip(addr.packed, key, strict=True))
        value = struct.pack("!BBH", 0, 2, xport) + xaddr
    attr = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    return _HDR.pack(BINDING_SUCCESS, len(attr), MAGIC, txid) + attr
