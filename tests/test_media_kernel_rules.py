"""The kernel backend's pure parts: which entries a leg wants, the commands, the counters, the ruleset.

What the kernel does with them is tested against real nftables in
tests/test_media_kernel.py; the ruleset is checked by ``nft -c`` there too.
"""

from __future__ import annotations

import json

import pytest

from relay.config import ConfigError
from relay.media.forwarder import UdpForwarder
from relay.media.kernel import (
    MARK_TAG,
    POLL_MAX,
    POLL_MIN,
    Direction,
    counter_commands,
    direction_commands,
    make_backend,
    next_poll,
    parse_counters,
    poll_interval,
    ruleset,
    wanted,
)
from relay.media.session import PBX, PHONE, Leg

RELAY = "198.51.100.10"


def _stream() -> tuple[Leg, Leg]:
    a, b = Leg(PHONE, 20000), Leg(PBX, 20002)
    a.peer, b.peer = b, a
    a.rtp.reopen(("10.0.0.5", 4000), "203.0.113.2")
    a.rtcp.reopen(("10.0.0.5", 4001), "203.0.113.2")
    b.rtp.reopen(("203.0.113.130", 5000), "203.0.113.130")
    b.rtcp.reopen(("203.0.113.130", 5001), "203.0.113.130")
    return a, b


def test_nothing_goes_to_the_kernel_before_a_side_latched() -> None:
    a, b = _stream()
    assert wanted(a, False, RELAY) is None and wanted(b, False, RELAY) is None


def test_a_latched_side_goes_to_where_the_other_side_is_expected_then_latched() -> None:
    a, b = _stream()
    assert a.rtp.accept(("203.0.113.2", 61000))
    # The PBX has not sent yet: its media goes where its SDP port is, at its SIP IP.
    assert wanted(a, False, RELAY) == Direction(("203.0.113.2", 61000), ("203.0.113.130", 5000), 20002)
    assert wanted(b, False, RELAY) is None
    assert b.rtp.accept(("203.0.113.130", 5010))  # its NAT picked another port
    assert wanted(a, False, RELAY) == Direction(("203.0.113.2", 61000), ("203.0.113.130", 5010), 20002)
    assert wanted(b, False, RELAY) == Direction(("203.0.113.130", 5010), ("203.0.113.2", 61000), 20000)
    # RTCP latches on its own, and leaves from the other leg's RTCP port.
    assert wanted(a, True, RELAY) is None
    assert a.rtcp.accept(("203.0.113.2", 61001))
    assert wanted(a, True, RELAY) == Direction(("203.0.113.2", 61001), ("203.0.113.130", 5001), 20003)


def test_no_entry_for_hold_loops_or_another_family() -> None:
    a, b = _stream()
    assert a.rtp.accept(("203.0.113.2", 61000))
    b.rtp.reopen(None, "203.0.113.130")  # c=0.0.0.0: nowhere to send
    assert wanted(a, False, RELAY) is None
    b.rtp.reopen((RELAY, 20000), RELAY)  # an SDP naming the relay itself
    assert wanted(a, False, RELAY) is None
    b.rtp.reopen(("2001:db8::5", 5000), "2001:db8::5")
    assert wanted(a, False, RELAY) is None
    a.peer = None
    assert wanted(a, False, RELAY) is None


def test_reopened_latch_takes_the_entry_back() -> None:
    a, b = _stream()
    assert a.rtp.accept(("203.0.113.2", 61000)) and b.rtp.accept(("203.0.113.130", 5000))
    assert wanted(a, False, RELAY) is not None
    a.rtp.reopen(("10.0.0.9", 4100), "198.18.0.7")  # the phone moved to another network
    assert wanted(a, False, RELAY) is None
    assert wanted(b, False, RELAY) == Direction(("203.0.113.130", 5000), ("198.18.0.7", 4100), 20000)


def test_commands_name_the_latched_five_tuple_and_the_mark() -> None:
    d = Direction(("203.0.113.2", 61000), ("203.0.113.130", 5010), 20002)
    mark = MARK_TAG | 20000
    add = direction_commands("add", 20000, d)
    assert [c["add"]["element"]["name"] for c in add] == ["latched", "to_addr", "to_port"]
    assert add[0]["add"]["element"]["elem"] == [[{"concat": ["203.0.113.2", 61000, 20000]}, mark]]
    assert add[1]["add"]["element"]["elem"] == [[mark, "203.0.113.130"]]
    assert add[2]["add"]["element"]["elem"] == [[mark, 5010]]
    delete = direction_commands("delete", 20000, d)
    assert [c["delete"]["element"]["elem"] for c in delete] == [
        [{"concat": ["203.0.113.2", 61000, 20000]}], [mark], [mark]]
    assert counter_commands("add", {20000: 20002}) == [
        {"add": {"element": {"family": "inet", "table": "pbx_relay", "name": "from_port",
                             "elem": [[mark, 20002]]}}}]
    assert counter_commands("delete", {}) == []
    json.dumps(add + delete)  # what libnftables gets


def test_counters_from_nft_text_and_json() -> None:
    text = """table inet pbx_relay {
\tmap from_port {
\t\ttype mark : inet_service
\t\telements = { 0x52504e20 counter packets 5 bytes 1000 : 20002,
\t\t\t     0x52504e22 counter packets 7 bytes 1400 : 20000 }
\t}
}"""
    assert parse_counters(text) == {20000: (5, 1000), 20002: (7, 1400)}
    elem = {"elem": {"val": MARK_TAG | 30001, "counter": {"packets": 3, "bytes": 9}}}
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}},
                            {"map": {"name": "from_port", "elem": [[elem, 30003]]}}]}
    assert parse_counters(json.dumps(listing)) == {30001: (3, 9)}
    assert parse_counters("") == {}


def test_counter_reads_cost_at_most_a_share_of_a_core_within_the_bounds() -> None:
    assert poll_interval(60.0) == POLL_MAX and poll_interval(2.0) == 0.5 and poll_interval(0.1) == POLL_MIN
    assert next_poll(0.0003, 5.0) == POLL_MIN  # a few streams: as often as allowed
    assert next_poll(0.02, 5.0) == pytest.approx(2.0)  # 2 % of a core is too much: wait longer
    assert next_poll(0.2, 0.5) == 0.5  # never longer than the no-media timeout allows


def test_ruleset_fences_forwarding_and_untracks_only_the_relay_ports() -> None:
    text = ruleset(RELAY, 10000, 20000)
    assert text.index("add table inet pbx_relay") < text.index("delete table inet pbx_relay")
    assert "type filter hook forward priority filter; policy drop;" in text
    # fragments (only the first has ports) and zero checksums stay with userspace
    assert f"ip daddr {RELAY} udp dport 10000-20000 notrack ip frag-off & 0x3fff == 0 udp checksum != 0" \
        in text
    assert f"ip saddr {RELAY} udp sport 10000-20000 notrack" in text
    v6 = ruleset("2001:db8::10", 10000, 20000)
    assert "notrack exthdr frag missing udp checksum != 0" in v6
    assert "ip6 daddr 2001:db8::10" in v6 and "ipv6_addr . inet_service . inet_service : mark" in v6


def test_backend_choice() -> None:
    backend, kind = make_backend("userspace", "127.0.0.1", lambda n, k: None)
    assert kind == "userspace" and isinstance(backend, UdpForwarder)
    with pytest.raises(ConfigError, match="media.backend"):
        make_backend("fast", "127.0.0.1", lambda n, k: None)
