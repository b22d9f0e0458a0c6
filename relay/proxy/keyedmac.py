"""HMAC-SHA256 under one key, the key's two padded blocks hashed once.

The relay signs with one long-lived key several times per call (a branch and a ``ci``
mark per forwarded request, the ``ci`` check of every response, flow tokens it has not
seen). ``hmac.new(key, msg, sha256)`` and even the one-shot ``hmac.digest`` hash the
key's inner and outer pads again each time; RFC 2104 §4 ("Implementation Note") notes
that both intermediate states can be computed once per key. :class:`Sha256Mac` keeps
them and copies them per message: the same bytes as ``hmac.digest(key, msg, "sha256")``
(tests/test_keyedmac.py checks that for any key and message), 0.8 instead of 2 µs a
message in a loop, and several times that saved in the running relay (bench/RESULTS.md,
issue 13, "the shell's share").
"""

from __future__ import annotations

import binascii
import hashlib

BLOCK = 64  # SHA-256's block size, RFC 2104's B
_IPAD = bytes(x ^ 0x36 for x in range(256))  # bytes.translate tables: key XOR ipad / opad
_OPAD = bytes(x ^ 0x5C for x in range(256))
_URLSAFE = bytes.maketrans(b"+/", b"-_")


class Sha256Mac:
    """HMAC-SHA256 with a fixed key (RFC 2104)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > BLOCK:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(BLOCK, b"\0")
        self._inner = hashlib.sha256(padded.translate(_IPAD))
        self._outer = hashlib.sha256(padded.translate(_OPAD))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def urlsafe_b64(data: bytes) -> str:
    """``base64.urlsafe_b64encode(data).decode()`` without its Python-level wrappers."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).decode("ascii")
