"""Wake-ups across nodes, the pure parts (relay/proxy/crosswake.py): the message between
nodes, who may send it, and loop detection in a cluster (the end-to-end test with three
real nodes is tests/test_cluster_push.py)."""

from __future__ import annotations

from pbxcore.wire import PushTarget
from relay.proxy.crosswake import MAX_ENTRY, WokenElsewhere, device_id, is_woken, parse_woken, woken_message
from relay.proxy.flow import Flow
from relay.proxy.forwarding import loop_hash, looped
from relay.proxy.identity import OUR_BRANCH
from relay.sip import parse_message
from relay.sip.message import Request
from tests.proxyharness import feed, make_proxy

TARGET = PushTarget("apns", "5f1e0c8a" * 8, "TEAM.com.example.app.voip")
WOKEN = WokenElsewhere("d" * 32, "0123456789", "201", "sip:201@192.0.2.7:5060;transport=tcp;pn-provider=apns",
                       "<sip:tok@198.51.100.12:5070;transport=tcp;lr>")


def as_request(data: bytes) -> Request:
    msg = parse_message(data, datagram=False)
    assert isinstance(msg, Request)
    return msg


def test_the_message_between_nodes_carries_what_the_release_needs_and_no_token() -> None:
    data = woken_message(WOKEN, "198.51.100.12", OUR_BRANCH + "abc")
    assert TARGET.token.encode() not in data
    req = as_request(data)
    assert is_woken(req) and parse_woken(req) == WOKEN


def test_a_message_missing_a_part_or_oversized_is_refused() -> None:
    good = woken_message(WOKEN, "198.51.100.12", OUR_BRANCH + "abc").decode()
    no_device = good.replace("X-Pbxrelay-Device: " + "d" * 32 + "\r\n", "")
    assert parse_woken(as_request(no_device.encode())) is None
    huge = WokenElsewhere(WOKEN.device, WOKEN.serial, WOKEN.user, WOKEN.contact,
                          "<sip:" + "x" * MAX_ENTRY + "@198.51.100.12;lr>")
    assert parse_woken(as_request(woken_message(huge, "198.51.100.12", OUR_BRANCH + "abc"))) is None


def test_the_device_id_hides_the_token_and_depends_on_the_cluster_secret() -> None:
    one = device_id(b"k" * 32, TARGET, "0123456789", "201")
    other = device_id(b"j" * 32, TARGET, "0123456789", "201")
    assert len(one) == 32 and one != other and TARGET.token not in one
    assert device_id(b"k" * 32, TARGET, "0123456789", "202") != one  # another user: another device


def test_only_a_node_link_may_release_a_held_call() -> None:
    """The same message from a phone or any stranger is routed like any NOTIFY for a
    foreign domain: refused, nothing released."""
    proxy, _ = make_proxy(push=True, cluster=True, cluster_key=b"k" * 32)
    stranger = Flow("tcp", "203.0.113.9", 40000, "10.0.0.1", 5060)
    answers = feed(proxy, woken_message(WOKEN, "203.0.113.9", OUR_BRANCH + "x"), stranger)
    assert [o.status for o in answers] == [403]
    assert proxy.counters.get("push_holds_total", "released_elsewhere") == 0


def test_a_request_crossing_three_nodes_unchanged_is_not_a_loop_but_a_spiral_through_one_is() -> None:
    raw = ("BYE sip:201@192.0.2.7 SIP/2.0\r\nVia: SIP/2.0/TCP 198.51.100.11;branch={b}\r\n"
           "Via: SIP/2.0/TCP 198.51.100.10;branch={a}\r\nVia: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bKpbx\r\n"
           "From: <sip:100@x>;tag=f\r\nTo: <sip:201@x>;tag=t\r\nCall-ID: c\r\nCSeq: 3 BYE\r\n"
           "Max-Forwards: 68\r\nContent-Length: 0\r\n\r\n")
    template = as_request(raw.format(a="x", b="y").encode())
    at_a, at_b, at_c = (loop_hash(template, n) for n in ("edge-a", "edge-b", "edge-c"))
    req = as_request(raw.format(a=f"{OUR_BRANCH}m.{at_a}", b=f"{OUR_BRANCH}n.{at_b}").encode())
    assert not looped(req, at_c)  # A's and B's Vias are theirs, not C's
    assert looped(req, at_a)  # back at A: a loop
    assert loop_hash(template) == loop_hash(template, "")  # one node alone: as before
