"""A UDP 401 stays within REFLECTION_FACTOR x the REGISTER it answers (issue 10: 167 bytes drew 435)."""

from __future__ import annotations

from relay.proxy.flow import Flow
from relay.proxy.registrar import REFLECTION_FACTOR
from tests.proxyharness import ADVERTISE, DOMAIN, SERIAL, feed, make_proxy, one, request

UDP = Flow("udp", "192.0.2.50", 5060, ADVERTISE, 5060)
TCP = Flow("tcp", "192.0.2.50", 40000, ADVERTISE, 5060)


def bare_register(flow: Flow) -> bytes:
    """The smallest REGISTER a scanner sends: no Contact, no Expires, no User-Agent."""
    aor = f"sip:{SERIAL}@{DOMAIN}"
    return request("REGISTER", aor, flow=flow, via_host="a", from_uri=aor, to_uri=aor, from_tag="t",
                   call_id="c", max_forwards=None)


def full_register(flow: Flow) -> bytes:
    aor = f"sip:{SERIAL}@{DOMAIN}"
    return request("REGISTER", aor, flow=flow, via_host="10.1.1.1", from_uri=aor, to_uri=aor,
                   from_tag="pbxtag", call_id="pbx-reg-0123456789abcdef",
                   headers=[f"Contact: <sip:{SERIAL}@10.1.1.1:5060;transport=udp>;+sip.instance="
                            '"<urn:uuid:00000000-0000-1000-8000-000000000001>"', "Expires: 3600",
                            "User-Agent: ExamplePBX/12.4.1", "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS"])


def challenges(data: bytes) -> int:
    return data.count(b"\r\nWWW-Authenticate: ")


def test_a_bare_udp_register_gets_one_challenge_within_the_factor() -> None:
    proxy, _ = make_proxy()
    data = bare_register(UDP)
    answer = one(feed(proxy, data, UDP))
    assert answer.status == 401
    assert challenges(answer.data) == 1  # the first algorithm offered (SHA-256 in this proxy's order)
    assert b'algorithm=SHA-256' in answer.data
    assert len(answer.data) <= REFLECTION_FACTOR * len(data)


def test_the_same_register_over_tcp_gets_every_challenge() -> None:
    proxy, _ = make_proxy()
    answer = one(feed(proxy, bare_register(TCP), TCP))
    assert challenges(answer.data) == 2  # a connection proves its source: no reflection to fear


def test_an_ordinary_udp_register_gets_every_challenge() -> None:
    proxy, _ = make_proxy()
    data = full_register(UDP)
    answer = one(feed(proxy, data, UDP))
    assert challenges(answer.data) == 2
    assert len(answer.data) <= REFLECTION_FACTOR * len(data)
