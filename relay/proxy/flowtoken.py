"""Signed flow tokens for Path, Record-Route and Via (RFC 5626 §5.2).

A token names a flow the relay has seen (transport, peer address, our socket)
and the PBX serial the dialog or registration belongs to. It is HMAC-signed so
that nobody can forge a token that points the relay at an address of their
choosing: the relay only ever sends to flows it minted a token for or to a
registered PBX — it is never an open relay.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import struct

from relay.proxy.flow import TRANSPORTS, Flow

# 80-bit truncated HMAC-SHA256: forging one takes ~2**80 tries, each a SIP
# message on the wire; RFC 5626 §5.2 asks only that tokens be unguessable.
MAC_SIZE = 10
_HEAD = struct.Struct("!BHH")  # transport index | v6 flag, remote port, local port


class BadToken(Exception):
    """The token was not minted by this relay (or its key changed)."""


class FlowTokens:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("flow token key must be at least 16 bytes")
        self._key = key

    def mint(self, flow: Flow, serial: str = "") -> str:
        rip = ipaddress.ip_address(flow.remote_ip).packed
        lip = ipaddress.ip_address(flow.local_ip).packed
        kind = TRANSPORTS.index(flow.transport) | (0x10 if len(rip) == 16 else 0)
        kind |= 0x20 if len(lip) == 16 else 0
        body = _HEAD.pack(kind, flow.remote_port, flow.local_port) + rip + lip + serial.encode()
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:MAC_SIZE]
        return base64.urlsafe_b64encode(mac + body).rstrip(b"=").decode("ascii")

    def verify(self, token: str) -> tuple[Flow, str]:
        """(flow, serial) of a token we minted, else BadToken."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError) as e:
            raise BadToken("undecodable") from e
        # The decoder skips characters outside the alphabet and ignores the
        # spare bits of the last one: accept only the spelling we minted.
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != token.encode("ascii", "replace"):
            raise BadToken("not canonical")
        if len(raw) < MAC_SIZE + _HEAD.size + 8:
            raise BadToken("short")
        mac, body = raw[:MAC_SIZE], raw[MAC_SIZE:]
        good = hmac.new(self._key, body, hashlib.sha256).digest()[:MAC_SIZE]
        if not hmac.compare_digest(mac, good):
            raise BadToken("bad signature")
        kind, rport, lport = _HEAD.unpack_from(body)
        at = _HEAD.size
        rlen = 16 if kind & 0x10 else 4
        llen = 16 if kind & 0x20 else 4
        rip = ipaddress.ip_address(body[at : at + rlen])
        lip = ipaddress.ip_address(body[at + rlen : at + rlen + llen])
        serial = body[at + rlen + llen :].decode()
        flow = Flow(TRANSPORTS[kind & 0x0F], _text(rip), rport, _text(lip), lport)
        return flow, serial


def _text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as the socket layer writes it, so the flow compares equal to the
    one the transport keeps: a dual-stack socket reports IPv4 peers as
    ``::ffff:192.0.2.1``, which Python before 3.13 prints as ``::ffff:c000:201``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)
