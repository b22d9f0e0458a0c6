"""The transport's pure admission rules: token buckets, connection slots, accept backoff, notices."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from relay import config
from relay.service import proxy_config
from relay.transport import limits, sockfilter
from relay.transport.admission import PER_SOURCE, RATE, TOTAL, Bans, ConnectionSlots, Notices, SourceBuckets
from relay.transport.backoff import EXHAUSTED, AcceptBackoff
from relay.transport.limits import TransportLimits
from relay.transport.sockfilter import drop_program

STRANGER, OTHER, PBX = "203.0.113.5", "203.0.113.6", "198.51.100.1"


def trusted_pbx(ip: str) -> bool:
    return ip == PBX


# ------------------------------------------------------------------ buckets
def test_bucket_admits_its_burst_then_exactly_its_rate() -> None:
    b = SourceBuckets(10.0, trusted_pbx, burst_seconds=2.0)
    assert sum(b.admit(STRANGER, 0.0) for _ in range(25)) == 20  # the burst: 2 s of 10/s
    assert not b.admit(STRANGER, 0.05)  # half a token
    assert b.admit(STRANGER, 0.1)  # one token refilled
    assert not b.admit(STRANGER, 0.1)
    assert sum(b.admit(STRANGER, 1.1 + i * 1e-6) for i in range(50)) == 10  # one second later: 10


def test_one_flooding_source_does_not_touch_another() -> None:
    b = SourceBuckets(10.0, trusted_pbx)
    for i in range(10_000):
        b.admit(STRANGER, i * 1e-5)
    assert b.admit(OTHER, 0.1)
    assert sum(b.admit(OTHER, 0.1) for _ in range(100)) == 19  # its own full burst


def test_trusted_source_gets_the_trusted_factor() -> None:
    b = SourceBuckets(10.0, trusted_pbx)
    n = sum(b.admit(PBX, 0.0) for _ in range(1000))
    assert n == 20 * limits.TRUSTED_FACTOR


def test_trust_is_looked_at_again_at_each_sweep() -> None:
    trusted: set[str] = set()
    b = SourceBuckets(10.0, trusted.__contains__, sweep_every=5.0)
    assert sum(b.admit(STRANGER, 0.0) for _ in range(100)) == 20
    trusted.add(STRANGER)  # it registered
    b.sweep(1.0)
    assert sum(b.admit(STRANGER, 1.0) for _ in range(1000)) == 10  # refilled 10 tokens at 10/s...
    assert sum(b.admit(STRANGER, 2.0) for _ in range(1000)) == 100  # ...and now refills at 100/s


def test_table_is_bounded_and_forgets_refilled_buckets_first() -> None:
    b = SourceBuckets(1.0, trusted_pbx, max_sources=100, sweep_every=1.0)
    for i in range(100):
        b.admit(f"10.0.0.{i}", 0.0)
    assert len(b) == 100
    b.admit("10.0.1.1", 10.0)  # every bucket refilled by now: the sweep empties the table
    assert len(b) == 1 and b.evicted == 0


def test_full_table_of_active_sources_evicts_the_oldest() -> None:
    b = SourceBuckets(1.0, trusted_pbx, max_sources=100, sweep_every=1000.0)
    for i in range(150):
        b.admit(f"10.0.{i // 250}.{i % 250}", 0.0)
    assert len(b) == 100 and b.evicted == 50


# -------------------------------------------------------------------- slots
def small(**kw: object) -> TransportLimits:
    base: dict[str, object] = {"max_connections": 10, "connections_reserved": 3,
                               "max_connections_per_source": 4, "connection_rate_per_source": 1000.0,
                               "max_tls_handshakes": 2}
    base.update(kw)
    return TransportLimits(**base)  # type: ignore[arg-type]


def test_per_source_cap_at_the_limit_accepted_one_over_refused() -> None:
    s = ConnectionSlots(small())
    assert [s.open(STRANGER, False, 0.0) for _ in range(5)] == [None] * 4 + [PER_SOURCE]
    assert s.open(OTHER, False, 0.0) is None  # another source is not affected
    s.close(STRANGER)
    assert s.open(STRANGER, False, 0.0) is None  # a slot given back is free again


def test_reserved_slots_are_for_trusted_sources_only() -> None:
    s = ConnectionSlots(small())
    for i in range(7):  # 10 - 3 reserved
        assert s.open(f"10.0.0.{i}", False, 0.0) is None
    assert s.open("10.0.0.99", False, 0.0) == TOTAL
    assert [s.open(PBX, True, 0.0) for _ in range(4)] == [None, None, None, TOTAL]
    assert s.open_total == 10


def test_connection_rate_per_source() -> None:
    s = ConnectionSlots(small(connection_rate_per_source=2.0, max_connections_per_source=100,
                              max_connections=1000))
    got = [s.open(STRANGER, False, 0.0) for _ in range(5)]
    assert got == [None] * 4 + [RATE]  # burst: 2 s of 2/s
    assert s.open(STRANGER, False, 0.5) is None
    assert s.open(PBX, True, 0.5) is None  # trusted: no rate


def test_tls_handshakes_cap_spares_trusted_sources() -> None:
    s = ConnectionSlots(small())
    assert [s.start_handshake(False) for _ in range(3)] == [True, True, False]
    assert s.start_handshake(True)
    s.end_handshake()
    s.end_handshake()
    assert s.start_handshake(False)


# ------------------------------------------------------------------ backoff
def test_accept_backoff_doubles_to_its_cap_and_reports_one_episode() -> None:
    b = AcceptBackoff(first=0.01, cap=0.1)
    delays = [b.failed(errno.EMFILE, float(i)) for i in range(6)]
    assert [d for d, _ in delays] == [0.01, 0.02, 0.04, 0.08, 0.1, 0.1]
    assert [began for _, began in delays] == [True, False, False, False, False, False]
    ep = b.succeeded()
    assert ep is not None and (ep.started, ep.failures, ep.errno) == (0.0, 6, errno.EMFILE)
    assert b.succeeded() is None  # a success outside an episode reports nothing
    assert b.failed(errno.ENFILE, 9.0) == (0.01, True)  # a new episode starts from the first delay
    assert errno.EMFILE in EXHAUSTED and errno.ENOBUFS in EXHAUSTED


# ------------------------------------------------------------------ notices
def test_notice_once_per_interval_per_source_with_the_count_held_back() -> None:
    n = Notices(every=10.0, max_keys=2)
    assert n.due("a", 0.0) == 1
    assert [n.due("a", t) for t in (1.0, 2.0, 3.0)] == [0, 0, 0]
    assert n.due("b", 3.0) == 1  # another source is named at once
    assert n.due("a", 10.0) == 4  # this one and the three held back
    assert n.due("c", 11.0) == 1  # a full table is cleared, never grows
    assert n.due("a", 12.0) == 1


# ------------------------------------------------------------------- config
def test_config_keys_build_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[transport]\nmax_connections = 100\nconnections_reserved = 10\n'
                    'exempt = ["0:0::1", "192.0.2.1"]\n')
    lim = TransportLimits.from_section(vars(config.load(path).transport))
    assert lim.max_connections == 100
    assert lim.exempt == frozenset({"::1", "192.0.2.1"})  # as the kernel writes a peer
    # The core's exempt set (pending-INVITE and media shares) is written the same way.
    assert proxy_config(config.load(path)).exempt_sources == lim.exempt
    assert TransportLimits.from_section(vars(config.load(None).transport)) == TransportLimits()


@pytest.mark.parametrize(("body", "needle"), [
    ("max_connections = 0", "transport.max_connections must be >= 1"),
    ("connections_reserved = 20000", "transport.connections_reserved"),
    ("udp_rate_per_source = 0.0", "transport.udp_rate_per_source must be > 0"),
    ('exempt = ["localhost"]', "transport.exempt: 'localhost' is not an IP address"),
])
def test_bad_transport_keys_are_named(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[transport]\n{body}\n")
    with pytest.raises(config.ConfigError, match=needle):
        config.load(path)


# --------------------------------------------------------------------- bans
def test_flooders_are_sources_far_over_their_budget_and_never_trusted() -> None:
    b = SourceBuckets(10.0, trusted_pbx)
    for i in range(300):  # 20 admitted, 280 refused in one second: 28x the budget
        b.admit(STRANGER, i / 300)
        b.admit(PBX, i / 300)
    for i in range(40):  # 20 admitted, 20 refused: over budget, not a flood
        b.admit(OTHER, i / 40)
    assert b.flooders(1.0, 10.0) == [STRANGER]
    assert b.flooders(1.0, 10.0) == []  # counting starts again


def test_bans_last_their_time_and_are_bounded() -> None:
    bans = Bans(30.0, max_bans=2)
    assert bans.update([STRANGER, OTHER, PBX], 0.0) == ([STRANGER, OTHER], [])
    assert bans.update([STRANGER], 10.0) == ([], [])  # still banned: not again
    assert bans.update([], 30.0) == ([], [STRANGER, OTHER])
    assert Bans(0.0).update([STRANGER], 0.0) == ([], [])  # 0 s: never ban


def test_socket_filter_drops_the_banned_source_only() -> None:
    prog = drop_program(["127.0.0.2", "127.0.0.3"])
    assert len(prog) == 5 and prog[-1] == (0x06, 0, 0, 0)  # load, 2 compares, keep, drop
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay_sock:
        relay_sock.bind(("127.0.0.1", 0))
        relay_sock.settimeout(0.5)
        sockfilter.apply(relay_sock, ["127.0.0.2"])
        senders = {}
        for src in ("127.0.0.2", "127.0.0.4"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 0))
            s.sendto(src.encode(), relay_sock.getsockname())
            senders[src] = s
        assert relay_sock.recv(100) == b"127.0.0.4"
        with pytest.raises(TimeoutError):
            relay_sock.recv(100)
        sockfilter.apply(relay_sock, [])  # lifted
        senders["127.0.0.2"].sendto(b"back", relay_sock.getsockname())
        assert relay_sock.recv(100) == b"back"
        for s in senders.values():
            s.close()
