"""relay/proxy/keyedmac.py: the relay's cached-pad HMAC and base64 give the stdlib's bytes."""

from __future__ import annotations

import base64
import hmac

from hypothesis import given
from hypothesis import strategies as st

from relay.proxy.keyedmac import Sha256Mac, urlsafe_b64


@given(key=st.binary(min_size=0, max_size=200), msgs=st.lists(st.binary(max_size=300), max_size=5))
def test_same_bytes_as_hmac_for_any_key_and_message(key: bytes, msgs: list[bytes]) -> None:
    mac = Sha256Mac(key)  # keys longer than SHA-256's 64-byte block are hashed first (RFC 2104 §2)
    for msg in msgs:  # one key, many messages: the kept pads are never changed by a use
        assert mac.digest(msg) == hmac.digest(key, msg, "sha256")


def test_rfc4231_test_case_2() -> None:
    """RFC 4231 §4.3 (HMAC-SHA-256, key "Jefe"): the published value, not the stdlib's."""
    got = Sha256Mac(b"Jefe").digest(b"what do ya want for nothing?").hex()
    assert got == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


@given(st.binary(max_size=64))
def test_urlsafe_b64_is_the_stdlib_spelling(data: bytes) -> None:
    assert urlsafe_b64(data) == base64.urlsafe_b64encode(data).decode()
