"""PBX phone-home through the proxy core: digest challenge, registration, expiry, removal."""

from __future__ import annotations

import hashlib

import pytest

from relay.pbx.digest import NONCE_LIFETIME, DigestAuth, ha1
from relay.proxy.core import Proxy
from relay.proxy.flow import Flow
from relay.sip.headers import NameAddr
from tests.proxyharness import (
    DOMAIN,
    KEY,
    OTHER_SERIAL,
    PBX_DOMAIN,
    PBX_TCP,
    PBX_TCP2,
    PBX_TCP_B,
    PBX_UDP,
    PHONE_UDP,
    SECRET,
    SERIAL,
    Out,
    authorization,
    challenge_params,
    challenges,
    feed,
    make_proxy,
    one,
    pbx_register,
    register_pbx,
    request,
)


@pytest.fixture
def proxy() -> Proxy:
    return make_proxy()[0]


def challenge_for(
    proxy: Proxy, algorithm: str, now: float = 0.0, serial: str = SERIAL, flow: Flow = PBX_TCP,
) -> str:
    first = one(feed(proxy, pbx_register(serial, flow=flow), flow, now))
    assert first.status == 401
    return next(c for c in challenges(first.msg) if f"algorithm={algorithm}" in c)


def invite_from_phone(proxy: Proxy, now: float = 1.0) -> list[Out]:
    data = request("INVITE", f"sip:201@{PBX_DOMAIN}", flow=PHONE_UDP, via_host="192.168.1.20")
    return feed(proxy, data, PHONE_UDP, now)


# ------------------------------------------------------------------ challenge


def test_register_without_credentials_is_challenged_sha256_first(proxy: Proxy) -> None:
    resp = one(feed(proxy, pbx_register(), PBX_TCP))
    assert resp.flow == PBX_TCP
    assert resp.status == 401
    values = challenges(resp.msg)
    assert len(values) == 2
    params = [challenge_params(v) for v in values]
    assert [p["algorithm"] for p in params] == ["SHA-256", "MD5"]
    for p in params:
        assert p["realm"] == DOMAIN
        assert p["qop"] == "auth"
        assert "stale" not in p
        assert p["nonce"]
    assert 'qop="auth"' in values[0]
    # the 401 is a proper response to the REGISTER (RFC 3261 §8.2.6)
    assert resp.msg.cseq == (1, "REGISTER")
    assert NameAddr.parse(resp.msg.get("to") or "").tag
    assert len(proxy.registrar.registry) == 0


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_correct_digest_registers_the_source_flow(proxy: Proxy, algorithm: str) -> None:
    auth = authorization(challenge_for(proxy, algorithm))
    assert f"algorithm={algorithm}" in auth
    ok = one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, 1.0))
    assert ok.flow == PBX_TCP
    assert ok.status == 200
    contact = NameAddr.parse(ok.msg.get("contact") or "")
    assert contact.uri == f"sip:{SERIAL}@10.1.1.1:5060;transport=tcp"
    assert contact.params["expires"] == "3600"
    reg = proxy.registrar.registry.lookup(SERIAL, 2.0)
    assert reg is not None
    assert reg.flow == PBX_TCP
    assert reg.expires_at == pytest.approx(3601.0)
    assert proxy.counters.get("pbx_registrations_total") == 1
    assert proxy.counters.get("pbx_auth_failures_total") == 0


def test_digest_without_qop_rfc2069_is_accepted() -> None:
    auth = DigestAuth(KEY, DOMAIN, ("SHA-256", "MD5"))
    nonce = auth.nonce(0.0)
    h1 = ha1("MD5", SERIAL, DOMAIN, SECRET)
    h2 = hashlib.md5(b"REGISTER:sip:relay.test").hexdigest()
    response = hashlib.md5(f"{h1}:{nonce}:{h2}".encode()).hexdigest()
    value = (
        f'Digest username="{SERIAL}", realm="{DOMAIN}", nonce="{nonce}", '
        f'uri="sip:relay.test", response="{response}"'
    )
    ha1s = {"MD5": h1}
    assert auth.check(value, "REGISTER", ha1s, 1.0) == ("ok", SERIAL)
    assert auth.check(value, "INVITE", ha1s, 1.0)[0] == "fail"  # method is in HA2


def assert_forbidden(resp: Out, proxy: Proxy, failures: int = 1) -> None:
    """403, no challenge to retry with, counted as an authentication failure."""
    assert (resp.flow, resp.status) == (PBX_TCP, 403)
    assert resp.resp.reason == "Forbidden"
    assert challenges(resp.msg) == []
    assert proxy.counters.get("pbx_auth_failures_total") == failures
    assert len(proxy.registrar.registry) == 0


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_wrong_password_is_forbidden_and_counted(proxy: Proxy, algorithm: str) -> None:
    auth = authorization(challenge_for(proxy, algorithm), secret="not-the-secret")
    resp = one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, 1.0))
    assert_forbidden(resp, proxy)


def test_credentials_of_another_pbx_are_forbidden(proxy: Proxy) -> None:
    # OTHER_SERIAL's valid credentials used for SERIAL's address of record
    auth = authorization(challenge_for(proxy, "MD5"), username=OTHER_SERIAL, secret="other")
    resp = one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, 1.0))
    assert_forbidden(resp, proxy)


def test_wrong_secret_and_unknown_serial_get_the_same_answer(proxy: Proxy) -> None:
    # No serial enumeration: a known serial with a wrong secret and an unknown
    # serial are told the same thing.
    wrong = authorization(challenge_for(proxy, "MD5"), secret="guess")
    a = one(feed(proxy, pbx_register(auth=wrong, cseq=2), PBX_TCP, 1.0))
    unknown = authorization(challenge_for(proxy, "MD5", serial="5555555555"), username="5555555555",
                            secret="guess")
    b = one(feed(proxy, pbx_register("5555555555", auth=unknown, cseq=2), PBX_TCP, 1.0))
    assert (a.status, a.resp.reason) == (b.status, b.resp.reason) == (403, "Forbidden")
    strip = {"to", "via", "from", "call-id", "cseq"}
    assert [h.name for h in a.msg.headers if h.name not in strip] == [
        h.name for h in b.msg.headers if h.name not in strip
    ]
    assert proxy.counters.get("pbx_auth_failures_total") == 2


def test_nonce_from_another_key_is_challenged_afresh_not_counted(proxy: Proxy) -> None:
    foreign = DigestAuth(b"x" * 32, DOMAIN, ("MD5",)).challenges(0.0)[0]
    resp = one(feed(proxy, pbx_register(auth=authorization(foreign), cseq=2), PBX_TCP, 1.0))
    assert resp.status == 401
    assert all("stale" not in challenge_params(c) for c in challenges(resp.msg))
    assert proxy.counters.get("pbx_auth_failures_total") == 0
    assert len(proxy.registrar.registry) == 0
    # the fresh challenge works
    fresh = next(c for c in challenges(resp.msg) if "algorithm=MD5" in c)
    ok = one(feed(proxy, pbx_register(auth=authorization(fresh), cseq=3), PBX_TCP, 2.0))
    assert ok.status == 200


def test_nonce_is_bound_to_the_client_it_was_issued_to() -> None:
    auth = DigestAuth(KEY, DOMAIN, ("MD5",))
    nonce = auth.nonce(10.0, "tcp:203.0.113.7")
    assert auth.nonce_age(nonce, 12.0, "tcp:203.0.113.7") == pytest.approx(2.0)
    assert auth.nonce_age(nonce, 12.0, "tcp:203.0.113.8") is None
    assert auth.nonce_age(nonce, 12.0, "udp:203.0.113.7") is None
    assert auth.nonce_age(nonce, 12.0) is None


@pytest.mark.parametrize("other", [PBX_TCP2, PBX_UDP], ids=["other-ip", "other-transport"])
def test_register_replayed_from_another_client_is_challenged(proxy: Proxy, other: Flow) -> None:
    # A REGISTER captured on the way (Authorization and all) is worth nothing
    # from another address: its nonce was issued to PBX_TCP.
    auth = authorization(challenge_for(proxy, "MD5"))
    assert one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, 1.0)).status == 200
    resp = one(feed(proxy, pbx_register(flow=other, auth=auth, cseq=2), other, 2.0))
    assert (resp.flow, resp.status) == (other, 401)
    params = [challenge_params(c) for c in challenges(resp.msg)]
    assert params and all("stale" not in p for p in params)
    assert challenge_params(auth)["nonce"] not in [p["nonce"] for p in params]
    # not counted (it is a fresh challenge, not a wrong secret), binding unchanged
    assert proxy.counters.get("pbx_auth_failures_total") == 0
    assert proxy.counters.get("pbx_registrations_total") == 1
    reg = proxy.registrar.registry.lookup(SERIAL, 2.0)
    assert reg is not None and reg.flow == PBX_TCP
    assert [o.flow for o in invite_from_phone(proxy, 3.0)] == [PHONE_UDP, PBX_TCP]


def test_register_from_the_same_ip_on_a_new_port_works(proxy: Proxy) -> None:
    # NAT rebinding: the PBX's public port changed, its address did not.
    auth = authorization(challenge_for(proxy, "MD5"))
    assert one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, 1.0)).status == 200
    again = one(feed(proxy, pbx_register(auth=auth, cseq=3), PBX_TCP_B, 2.0))
    assert (again.flow, again.status) == (PBX_TCP_B, 200)
    reg = proxy.registrar.registry.lookup(SERIAL, 2.0)
    assert reg is not None and reg.flow == PBX_TCP_B
    assert [o.flow for o in invite_from_phone(proxy, 3.0)] == [PHONE_UDP, PBX_TCP_B]


def test_nonce_issued_to_another_client_then_the_fresh_one_works(proxy: Proxy) -> None:
    challenge = challenge_for(proxy, "SHA-256", flow=PBX_TCP)
    resp = one(feed(proxy, pbx_register(flow=PBX_TCP2, auth=authorization(challenge), cseq=2), PBX_TCP2, 1.0))
    assert resp.status == 401
    fresh = next(c for c in challenges(resp.msg) if "algorithm=SHA-256" in c)
    ok = one(feed(proxy, pbx_register(flow=PBX_TCP2, auth=authorization(fresh), cseq=3), PBX_TCP2, 1.5))
    assert ok.status == 200
    reg = proxy.registrar.registry.lookup(SERIAL, 2.0)
    assert reg is not None and reg.flow == PBX_TCP2


def test_unknown_serial_with_digest_is_forbidden(proxy: Proxy) -> None:
    # Without credentials an unknown serial is challenged like any other …
    challenge = challenge_for(proxy, "MD5", serial="5555555555")
    # … and its answer, whatever the secret, is 403.
    auth = authorization(challenge, username="5555555555", secret="guess")
    resp = one(feed(proxy, pbx_register("5555555555", auth=auth, cseq=2), PBX_TCP, 1.0))
    assert resp.status == 403
    assert proxy.counters.get("pbx_auth_failures_total") == 1
    assert len(proxy.registrar.registry) == 0


def test_old_nonce_with_good_response_is_stale(proxy: Proxy) -> None:
    auth = authorization(challenge_for(proxy, "SHA-256", now=0.0))
    late = NONCE_LIFETIME + 1
    resp = one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, late))
    assert resp.status == 401
    params = [challenge_params(c) for c in challenges(resp.msg)]
    assert [p["stale"] for p in params] == ["true", "true"]
    assert len(proxy.registrar.registry) == 0
    assert proxy.counters.get("pbx_auth_failures_total") == 0  # not a failure: the secret was right
    # the fresh nonce works at once
    fresh = next(c for c in challenges(resp.msg) if "algorithm=SHA-256" in c)
    ok = one(feed(proxy, pbx_register(auth=authorization(fresh), cseq=3), PBX_TCP, late + 1))
    assert ok.status == 200


def test_old_nonce_with_wrong_response_is_forbidden_not_stale(proxy: Proxy) -> None:
    auth = authorization(challenge_for(proxy, "MD5", now=0.0), secret="wrong")
    resp = one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, NONCE_LIFETIME + 1))
    assert_forbidden(resp, proxy)


# --------------------------------------------------------------- binding life


def test_expires_zero_removes_the_binding(proxy: Proxy) -> None:
    register_pbx(proxy)
    auth = authorization(challenge_for(proxy, "MD5", now=5.0))
    resp = one(feed(proxy, pbx_register(expires=0, auth=auth, cseq=3), PBX_TCP, 5.0))
    assert resp.status == 200
    assert proxy.registrar.registry.lookup(SERIAL, 5.0) is None
    assert invite_from_phone(proxy, 6.0)[-1].status == 480


def test_contact_param_expires_zero_removes_the_binding(proxy: Proxy) -> None:
    register_pbx(proxy)
    auth = authorization(challenge_for(proxy, "MD5", now=5.0))
    data = pbx_register(expires=None, contact=f"<sip:{SERIAL}@10.1.1.1>;expires=0", auth=auth, cseq=3)
    assert one(feed(proxy, data, PBX_TCP, 5.0)).status == 200
    assert len(proxy.registrar.registry) == 0


def test_contact_star_with_expires_zero_removes_the_binding(proxy: Proxy) -> None:
    register_pbx(proxy)
    auth = authorization(challenge_for(proxy, "MD5", now=5.0))
    data = pbx_register(expires=0, contact="*", auth=auth, cseq=3)
    resp = one(feed(proxy, data, PBX_TCP, 5.0))
    assert resp.status == 200
    assert resp.msg.get("contact") is None
    assert len(proxy.registrar.registry) == 0


def test_contact_star_needs_expires_zero(proxy: Proxy) -> None:
    register_pbx(proxy)
    auth = authorization(challenge_for(proxy, "MD5", now=5.0))
    data = pbx_register(expires=60, contact="*", auth=auth, cseq=3)
    assert one(feed(proxy, data, PBX_TCP, 5.0)).status == 400
    assert len(proxy.registrar.registry) == 1


def test_unauthenticated_removal_is_challenged(proxy: Proxy) -> None:
    register_pbx(proxy)
    resp = one(feed(proxy, pbx_register(expires=0, contact="*", cseq=3), PBX_TCP2, 5.0))
    assert resp.status == 401
    assert proxy.registrar.registry.lookup(SERIAL, 5.0) is not None


@pytest.mark.parametrize("where", ["header", "param"])
def test_expiry_below_minimum_is_interval_too_brief(proxy: Proxy, where: str) -> None:
    auth = authorization(challenge_for(proxy, "MD5"))
    if where == "header":
        data = pbx_register(expires=30, auth=auth, cseq=2)
    else:
        data = pbx_register(expires=None, contact=f"<sip:{SERIAL}@10.1.1.1>;expires=30", auth=auth, cseq=2)
    resp = one(feed(proxy, data, PBX_TCP, 1.0))
    assert resp.status == 423
    assert resp.msg.get("min-expires") == "60"
    assert len(proxy.registrar.registry) == 0


INSTANCE = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-00aabbccddee>"'
PBX_URI = f"sip:{SERIAL}@10.1.1.1:5060;transport=tcp"


@pytest.mark.parametrize("contact,expires_hdr,granted", [
    # expires as a Contact parameter: replaced, the other parameters kept
    (f"<{PBX_URI}>;{INSTANCE};reg-id=1;expires=600", None, 600),
    (f"<{PBX_URI}>;expires=600;{INSTANCE};reg-id=1", 3600, 600),
    (f"<{PBX_URI}>;{INSTANCE};reg-id=1;expires=86400", None, 3600),
    # expires from the header
    (f"<{PBX_URI}>;{INSTANCE};reg-id=1", 900, 900),
    (f'"Office PBX" <{PBX_URI}>;{INSTANCE};reg-id=1', None, 3600),
])
def test_200_echoes_the_contact_with_its_parameters_and_the_granted_expiry(
    proxy: Proxy, contact: str, expires_hdr: int | None, granted: int,
) -> None:
    auth = authorization(challenge_for(proxy, "MD5"))
    data = pbx_register(expires=expires_hdr, contact=contact, auth=auth, cseq=2)
    resp = one(feed(proxy, data, PBX_TCP, 1.0))
    assert resp.status == 200
    # RFC 3261 §10.3 step 8; RFC 5626 §6: +sip.instance and reg-id come back
    assert resp.msg.get_all("contact") == [f"<{PBX_URI}>;{INSTANCE};reg-id=1;expires={granted}"]
    reg = proxy.registrar.registry.lookup(SERIAL, 1.0)
    assert reg is not None and reg.expires_at == pytest.approx(1.0 + granted)


def test_200_echoes_a_bare_contact_with_expires(proxy: Proxy) -> None:
    auth = authorization(challenge_for(proxy, "MD5"))
    resp = one(feed(proxy, pbx_register(auth=auth, cseq=2), PBX_TCP, 1.0))
    assert resp.msg.get_all("contact") == [f"<{PBX_URI}>;expires=3600"]


def test_expiry_above_maximum_is_capped(proxy: Proxy) -> None:
    auth = authorization(challenge_for(proxy, "MD5"))
    resp = one(feed(proxy, pbx_register(expires=86400, auth=auth, cseq=2), PBX_TCP, 1.0))
    assert resp.status == 200
    assert NameAddr.parse(resp.msg.get("contact") or "").params["expires"] == "3600"
    reg = proxy.registrar.registry.lookup(SERIAL, 1.0)
    assert reg is not None and reg.expires_at == pytest.approx(3601.0)


def test_register_without_contact_is_a_query(proxy: Proxy) -> None:
    register_pbx(proxy)
    auth = authorization(challenge_for(proxy, "MD5", now=100.0))
    resp = one(feed(proxy, pbx_register(expires=None, contact="", auth=auth, cseq=3), PBX_TCP, 100.0))
    assert resp.status == 200
    contact = NameAddr.parse(resp.msg.get("contact") or "")
    assert contact.uri == f"sip:{SERIAL}@{PBX_TCP.remote_ip}:{PBX_TCP.remote_port}"
    assert contact.params["expires"] == "3500"


def test_new_flow_replaces_old_one(proxy: Proxy) -> None:
    register_pbx(proxy, PBX_TCP, now=0.0)
    register_pbx(proxy, PBX_TCP2, now=10.0)
    reg = proxy.registrar.registry.lookup(SERIAL, 11.0)
    assert reg is not None and reg.flow == PBX_TCP2
    assert len(proxy.registrar.registry) == 1
    assert proxy.registrar.registry.serial_of(PBX_TCP) is None
    out = invite_from_phone(proxy, 11.0)
    assert [o.flow for o in out] == [PHONE_UDP, PBX_TCP2]
    # the old connection closing later does not take the new binding with it
    proxy.on_flow_closed(PBX_TCP)
    assert proxy.registrar.registry.lookup(SERIAL, 12.0) is not None


def test_registration_expires(proxy: Proxy) -> None:
    register_pbx(proxy, now=0.0, expires=120)
    assert proxy.on_timer(60.0) == []
    assert len(proxy.registrar.registry) == 1
    proxy.on_timer(121.0)
    assert len(proxy.registrar.registry) == 0
    assert proxy.counters.get("pbx_unregistered_total", "expired") == 1
    assert invite_from_phone(proxy, 122.0)[-1].status == 480


def test_expired_registration_is_not_used_even_before_the_sweep(proxy: Proxy) -> None:
    register_pbx(proxy, now=0.0, expires=120)
    out = invite_from_phone(proxy, 120.5)  # no on_timer in between
    assert [(o.flow, o.status) for o in out] == [(PHONE_UDP, 480)]


def test_refresh_extends_the_binding(proxy: Proxy) -> None:
    register_pbx(proxy, now=0.0, expires=120)
    register_pbx(proxy, now=100.0, expires=120)
    proxy.on_timer(150.0)
    assert proxy.registrar.registry.lookup(SERIAL, 150.0) is not None


def test_flow_closed_removes_the_binding(proxy: Proxy) -> None:
    register_pbx(proxy)
    proxy.on_flow_closed(PHONE_UDP)  # someone else's flow: nothing happens
    assert len(proxy.registrar.registry) == 1
    proxy.on_flow_closed(PBX_TCP)
    assert len(proxy.registrar.registry) == 0
    assert proxy.counters.get("pbx_unregistered_total", "flow_closed") == 1
    assert invite_from_phone(proxy)[-1].status == 480
