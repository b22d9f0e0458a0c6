"""Flow tokens (RFC 5626 §5.2): what the relay mints it can read back; nothing else passes."""

from __future__ import annotations

import base64
import re

import pytest

from relay.proxy.flow import TRANSPORTS, Flow
from relay.proxy.flowtoken import GRAIN, MAC_SIZE, BadToken, ExpiredToken, FlowTokens

KEY = b"0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000.0  # wall-clock seconds
UNTIL = NOW + 86400
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

ADDRESSES = [
    ("192.0.2.20", "198.51.100.10"),
    ("2001:db8::20", "2001:db8::10"),
    ("2001:db8::20", "198.51.100.10"),  # mixed families: each side flagged on its own
    ("192.0.2.20", "2001:db8::10"),
    ("::ffff:192.0.2.20", "::"),
]


def flows() -> list[Flow]:
    return [
        Flow(transport, remote, rport, local, lport)
        for transport in TRANSPORTS
        for remote, local in ADDRESSES
        for rport, lport in ((40001, 5060), (1, 65535))
    ]


@pytest.fixture
def tokens() -> FlowTokens:
    return FlowTokens(KEY)


@pytest.mark.parametrize("flow", flows(), ids=str)
@pytest.mark.parametrize("serial", ["", "0123456789", "pbx-A_1"])
def test_round_trip(tokens: FlowTokens, flow: Flow, serial: str) -> None:
    token = tokens.mint(flow, serial, UNTIL)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token  # fits a SIP URI user part unescaped
    got, got_serial = tokens.verify(token, NOW)
    assert got == flow
    assert got_serial == serial


def test_minting_is_deterministic_and_distinct(tokens: FlowTokens) -> None:
    all_flows = flows()
    minted = [tokens.mint(f, "", UNTIL) for f in all_flows]
    assert minted == [tokens.mint(f, "", UNTIL) for f in all_flows]
    assert len(set(minted)) == len(all_flows)
    f = all_flows[0]
    assert tokens.mint(f, "a", UNTIL) != tokens.mint(f, "b", UNTIL)


def test_ipv6_is_written_in_canonical_form(tokens: FlowTokens) -> None:
    flow = Flow("tls", "2001:DB8:0:0::1", 5061, "2001:db8::10", 5061)
    got, _ = tokens.verify(tokens.mint(flow, "", UNTIL), NOW)
    assert got.remote_ip == "2001:db8::1"


@pytest.mark.parametrize("flow", [flows()[0], flows()[3]], ids=str)
@pytest.mark.parametrize("serial", ["", "0123456789", "12345"])
def test_any_changed_character_is_rejected(tokens: FlowTokens, flow: Flow, serial: str) -> None:
    token = tokens.mint(flow, serial, UNTIL)
    for i, ch in enumerate(token):
        for other in ALPHABET:
            if other == ch:
                continue
            with pytest.raises(BadToken):
                tokens.verify(token[:i] + other + token[i + 1 :], NOW)


@pytest.mark.parametrize("flow", flows()[:4], ids=str)
def test_any_flipped_bit_is_rejected(tokens: FlowTokens, flow: Flow) -> None:
    raw = bytearray(base64.urlsafe_b64decode(tokens.mint(flow, "0123456789", UNTIL) + "=="))
    for i in range(len(raw)):
        for bit in range(8):
            raw[i] ^= 1 << bit
            bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
            raw[i] ^= 1 << bit
            with pytest.raises(BadToken):
                tokens.verify(bad, NOW)


def test_another_key_is_rejected(tokens: FlowTokens) -> None:
    other = FlowTokens(b"another key, 32 bytes long......")
    for flow in flows():
        with pytest.raises(BadToken):
            other.verify(tokens.mint(flow, "0123456789", UNTIL), NOW)
        with pytest.raises(BadToken):
            tokens.verify(other.mint(flow, "", UNTIL), NOW)


def test_a_forged_body_with_a_copied_mac_is_rejected(tokens: FlowTokens) -> None:
    # take a real token's MAC and point its body at another address
    real = base64.urlsafe_b64decode(tokens.mint(flows()[0], "", UNTIL) + "==")
    target = Flow("udp", "203.0.113.1", 9, "198.51.100.10", 5060)
    victim = base64.urlsafe_b64decode(tokens.mint(target, "", UNTIL) + "==")
    forged = real[:MAC_SIZE] + victim[MAC_SIZE:]
    with pytest.raises(BadToken):
        tokens.verify(base64.urlsafe_b64encode(forged).rstrip(b"=").decode(), NOW)


def test_other_spellings_of_a_good_token_are_rejected(tokens: FlowTokens) -> None:
    token = tokens.mint(flows()[0], "", UNTIL)
    for variant in (token + "=", token + "==", token + ".", token[:5] + "!" + token[5:], " " + token,
                    token + "\n"):
        with pytest.raises(BadToken):
            tokens.verify(variant, NOW)


@pytest.mark.parametrize("junk", ["", "A", "AAAA", "!!!!", "é" * 40, "A" * 30, "A" * 400, "%41%42", "AB=CD"])
def test_junk_is_rejected(tokens: FlowTokens, junk: str) -> None:
    with pytest.raises(BadToken):
        tokens.verify(junk, NOW)


def test_truncated_tokens_are_rejected(tokens: FlowTokens) -> None:
    token = tokens.mint(flows()[1], "0123456789", UNTIL)
    for n in range(len(token)):
        with pytest.raises(BadToken):
            tokens.verify(token[:n], NOW)


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError):
        FlowTokens(b"short")


def test_a_token_is_good_until_its_expiry_rounded_up_to_the_hour(tokens: FlowTokens) -> None:
    flow = flows()[0]
    token = tokens.mint(flow, "c.0123456789", NOW + 60)
    expires = -(-(NOW + 60) // GRAIN) * GRAIN
    assert tokens.verify(token, expires) == (flow, "c.0123456789")
    with pytest.raises(ExpiredToken):
        tokens.verify(token, expires + 1)
    # the same payload minted later in the same hour is the same token (cached, cheap)
    assert tokens.mint(flow, "c.0123456789", NOW + 61) == token


def test_the_expiry_is_signed(tokens: FlowTokens) -> None:
    raw = bytearray(base64.urlsafe_b64decode(tokens.mint(flows()[0], "x", NOW) + "=="))
    raw[MAC_SIZE + 5] ^= 0x40  # a later expiry, same MAC
    with pytest.raises(BadToken):
        tokens.verify(base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode(), NOW)
