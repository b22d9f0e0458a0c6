"""Hypothesis: RFC 8599 parameters are read from whatever a phone or a PBX sends
without ever raising, and what is read survives a round trip through a Contact."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from push.model import PushTarget
from relay.proxy.wake import push_target, register_bindings, uri_push_target, user_of
from relay.sip import Request
from relay.sip.message import Header

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=80)
token_chars = st.text(st.sampled_from("0123456789abcdefABCDEF:-_.~"), min_size=1, max_size=200)


@given(text)
def test_uri_push_target_never_raises(uri: str) -> None:
    t = uri_push_target(uri)
    assert t is None or t.provider in ("apns", "fcm")


@given(text, text)
def test_user_of_never_raises(a: str, b: str) -> None:
    assert isinstance(user_of(a + b), str)


@given(st.lists(text, max_size=4), st.one_of(st.none(), text))
def test_register_bindings_never_raise(contacts: list[str], expires: str | None) -> None:
    headers = [Header("Contact", c) for c in contacts]
    if expires is not None:
        headers.append(Header("Expires", expires))
    req = Request("REGISTER", "sip:x.relay.test", headers)
    for b in register_bindings(req):
        assert b.expires >= 0 and b.target.provider in ("apns", "fcm")


@given(st.sampled_from(["apns", "fcm", "APNS"]), token_chars, token_chars, st.integers(0, 10**6))
def test_push_parameters_round_trip_through_a_contact(
    provider: str, prid: str, param: str, expires: int,
) -> None:
    uri = (f"sip:201@192.0.2.1:5062;transport=tcp;pn-provider={provider};pn-prid={quote(prid, safe='')}"
           f";pn-param={quote(param, safe='')}")
    req = Request("REGISTER", "sip:x.relay.test", [Header("Contact", f"<{uri}>;expires={expires}")])
    (b,) = register_bindings(req)
    assert b.target == PushTarget(provider.lower(), prid, param)
    assert b.expires == expires and b.contact_uri == uri
    assert push_target({"pn-provider": provider, "pn-prid": quote(prid), "pn-param": param}) is not None
