"""Signed flow tokens for Path, Record-Route and Via (RFC 5626 §5.2).

A token names a flow the relay has seen (transport, peer address, our socket),
what it was minted for (a payload the proxy writes: the PBX serial, and the dialog
or device it belongs to) and when it stops being good. It is HMAC-signed so that
nobody can forge a token that points the relay at an address of their choosing:
the relay only ever sends to flows it minted a token for or to a registered PBX —
it is never an open relay — and a token copied from one dialog or registration is
good for nothing else, and for a bounded time.
"""

from __future__ import annotations

import base64
import hmac
import socket
import struct

from relay.proxy.flow import TRANSPORTS, Flow
from relay.proxy.keyedmac import Sha256Mac, urlsafe_b64

# 80-bit truncated HMAC-SHA256: forging one takes ~2**80 tries, each a SIP
# message on the wire; RFC 5626 §5.2 asks only that tokens be unguessable.
MAC_SIZE = 10
_HEAD = struct.Struct("!BHHI")  # transport index | v6 flags, remote port, local port, expiry
# Expiry times are rounded up to this many seconds: a token stays the same for an hour,
# so the messages of a call (each carries the same tokens) hit the caches below.
GRAIN = 3600


class BadToken(Exception):
    """The token was not minted by this relay (or its key changed)."""


class ExpiredToken(BadToken):
    """A token the relay minted, past its expiry."""


# Tokens minted and verified recently, so that the messages of a call (each one
# carries the same tokens) cost a dict lookup, not an HMAC. Only good tokens are
# remembered; the caches are emptied when full, so they cannot grow without bound.
CACHE_SIZE = 4096


class FlowTokens:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("flow token key must be at least 16 bytes")
        self._mac = Sha256Mac(key)
        # Keyed by the flow's fields, not the Flow: a tuple of str and int only, which the
        # cyclic collector stops tracking (one entry a call, for its dialog's tokens; issue 9).
        self._minted: dict[tuple[str, str, int, str, int, str, int], str] = {}
        self._verified: dict[str, tuple[Flow, str, int]] = {}

    def mint(self, flow: Flow, payload: str, until: float) -> str:
        """A token naming ``flow`` and ``payload``, good until ``until`` (wall-clock
        seconds, rounded up to GRAIN)."""
        expires = min(int(-(-until // GRAIN) * GRAIN), 0xFFFFFFFF)
        cached = (flow.transport, flow.remote_ip, flow.remote_port, flow.local_ip, flow.local_port,
                  payload, expires)
        token = self._minted.get(cached)
        if token is not None:
            return token
        rip = _pack(flow.remote_ip)
        lip = _pack(flow.local_ip)
        kind = TRANSPORTS.index(flow.transport) | (0x10 if len(rip) == 16 else 0)
        kind |= 0x20 if len(lip) == 16 else 0
        body = _HEAD.pack(kind, flow.remote_port, flow.local_port, expires) + rip + lip + payload.encode()
        mac = self._mac.digest(body)[:MAC_SIZE]
        token = urlsafe_b64(mac + body).rstrip("=")
        if len(self._minted) >= CACHE_SIZE:
            self._minted.clear()
        self._minted[cached] = token
        return token

    def verify(self, token: str, now: float) -> tuple[Flow, str]:
        """(flow, payload) of a token we minted that is still good at ``now`` (wall
        clock); else BadToken (ExpiredToken for one that was good once)."""
        known = self._verified.get(token)
        if known is None:
            known = self._verify(token)
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = known
        flow, payload, expires = known
        if now > expires:
            raise ExpiredToken("expired")
        return flow, payload

    def _verify(self, token: str) -> tuple[Flow, str, int]:
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
        good = self._mac.digest(body)[:MAC_SIZE]
        if not hmac.compare_digest(mac, good):
            raise BadToken("bad signature")
        kind, rport, lport, expires = _HEAD.unpack_from(body)
        at = _HEAD.size
        rlen = 16 if kind & 0x10 else 4
        llen = 16 if kind & 0x20 else 4
        rip = body[at : at + rlen]
        lip = body[at + rlen : at + rlen + llen]
        try:
            serial = body[at + rlen + llen :].decode()
            transport = TRANSPORTS[kind & 0x0F]
        except (UnicodeDecodeError, IndexError) as e:
            raise BadToken("bad payload") from e
        return Flow(transport, _text(rip), rport, _text(lip), lport), serial, expires


def _pack(ip: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        try:
            return socket.inet_pton(socket.AF_INET6, ip)
        except OSError:
            raise ValueError(f"not an IP address: {ip!r}") from None


def _text(packed: bytes) -> str:
    """The address as the socket layer writes it (inet_ntop), so the flow compares
    equal to the one the transport keeps: a dual-stack socket reports IPv4 peers
    as ``::ffff:192.0.2.1``, which Python's ipaddress before 3.13 prints as
    ``::ffff:c000:201``."""
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
