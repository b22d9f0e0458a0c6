"""Hypothesis: RFC 8599 parameters are read from whatever a phone or a PBX sends
without ever raising, and what is read survives a round trip through a Contact."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from pbxcore.wire import PushTarget
from relay.proxy.wake import MAX_BINDINGS, push_target, register_bindings, uri_push_target, user_of
from relay.sip import Request
from relay.sip.message import Header

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=80)
token_chars = st.text(st.sampled_from("0123456789abcdefABCDEF:-_.~"), min_size=1, max_size=200)


@given(text)
def test_uri_push_target_never_raises(uri: str) -> None:
    t = uri_push_target(uri)
    assert t is None or t.provider in ("apns", "fcm")


user_chars = st.text(st.sampled_from("0123456789abcdefxyz+*#.-_!~"), min_size=1, max_size=30)


@given(text, user_chars)
def test_user_of_reads_the_user_and_never_raises_on_anything_else(junk: str, user: str) -> None:
    user_of(junk)  # arbitrary text: any answer, but no exception
    display = junk.replace('"', "").replace("\\", "")
    assert user_of(f'"{display}" <sip:{quote(user)}@192.0.2.1;transport=tcp>;tag=a1') == user
    assert user_of(f"<sip:192.0.2.1>;tag={quote(user)}") == ""


binding = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(["apns", "fcm"]), user_chars),
    st.tuples(st.just("instance"), st.just(""), user_chars),
    # anything else a Contact may hold (a quote left open would not have parsed at all)
    st.tuples(st.just("junk"), st.just(""), text.filter(lambda v: '"' not in v)),
)


@given(st.lists(binding, max_size=6), st.one_of(st.none(), st.integers(0, 10**6).map(str), text))
def test_register_bindings_find_every_device_contact_and_skip_the_rest(
    contacts: list[tuple[str, str, str]], expires: str | None,
) -> None:
    headers, wanted = [], []
    for i, (kind, provider, value) in enumerate(contacts):
        if kind == "push":
            uri = f"sip:u{i}@192.0.2.1;pn-provider={provider};pn-prid={quote(value)};pn-param=p{i}"
            headers.append(Header("Contact", f"<{uri}>;expires={i}"))
            wanted.append((PushTarget(provider, value, f"p{i}"), None, uri, i))
        elif kind == "instance":
            uri = f"sip:u{i}@192.0.2.1"
            instance = f"<urn:uuid:{quote(value)}>"
            headers.append(Header("Contact", f'<{uri}>;+sip.instance="{instance}";expires={i}'))
            wanted.append((None, instance, uri, i))
        elif "pn-" not in value and "instance" not in value:
            headers.append(Header("Contact", value))  # no push parameters, no instance: not a device
    if expires is not None:
        headers.append(Header("Expires", expires))
    req = Request("REGISTER", "sip:x.relay.test", headers)
    found = [(b.target, b.instance, b.contact_uri, b.expires) for b in register_bindings(req)]
    assert found == wanted[:MAX_BINDINGS]


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
