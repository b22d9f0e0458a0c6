"""libnftables through ctypes: one call, one netlink transaction, JSON out.

libnftables(3) is the library `nft` itself is a thin front end of: it parses the
nft language or its JSON form and sends all commands of one buffer as one
netlink batch, which the kernel applies atomically (all or nothing). Debian's
``python3-nftables`` is a ctypes wrapper around exactly these calls, but it is
installed for Debian's own Python only (``/usr/lib/python3/dist-packages``), not
for a virtualenv; these few lines bind the same stable C API (soname
``libnftables.so.1``, Debian package ``libnftables1``, which ``nftables`` pulls
in) without a Python dependency. docs/media.md ("Kernel forwarding") has the
comparison with pyroute2.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from typing import Any

SONAME = "libnftables.so.1"
# libnftables.h: output flags
OUTPUT_HANDLE = 1 << 3
OUTPUT_JSON = 1 << 4


class NftError(Exception):
    """libnftables refused a command (its error text says which and why); nothing
    of the batch was applied."""


class NftUnavailable(NftError):
    """libnftables cannot be loaded (package libnftables1 / nftables missing)."""


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(SONAME)
    except OSError:
        found = ctypes.util.find_library("nftables")
        if found is None:
            raise NftUnavailable(f"{SONAME} not found (Debian: apt-get install nftables)") from None
        lib = ctypes.CDLL(found)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class Nft:
    """One libnftables context (its own netlink socket). Not thread-safe: one
    context per thread that uses it."""

    def __init__(self) -> None:
        self._lib = _load()
        ctx = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise NftUnavailable("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_output_set_flags(ctx, OUTPUT_JSON)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def run(self, commands: str) -> str:
        """Run ``commands`` (nft language, or JSON ``{"nftables": [...]}``) as one
        transaction; returns what it printed (JSON). Raises NftError."""
        if self._ctx is None:
            raise NftError("context closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(err.decode(errors="replace").strip() or f"libnftables returned {rc}")
        return str(out.decode(errors="replace"))

    def run_json(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The JSON API (libnftables-json(5)): ``commands`` are the entries of the
        ``nftables`` array; returns the entries of the answer (empty for changes)."""
        if not commands:
            return []
        out = self.run(json.dumps({"nftables": commands}))
        if not out.strip():
            return []
        return list(json.loads(out).get("nftables", []))

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
