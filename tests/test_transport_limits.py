"""Each transport limit on a real relay: at the limit accepted, one over refused, others untouched.

Every 127.0.0.0/8 address is on lo, so 127.0.0.2, .3, ... are distinct sources here.
The relay runs with ``exempt = []``: by default loopback is exempt from per-source limits.
"""

from __future__ import annotations

import socket
import ssl
import time

from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import (
    HOST,
    SERIAL,
    Stream,
    authorization,
    challenge,
    drain,
    options_barrier,
    pbx_register,
)

ATTACKER, ATTACKER2, PBX_IP, CLIENT = "127.0.0.2", "127.0.0.3", "127.0.0.10", "127.0.0.30"


def transport(**keys: object) -> str:
    """A [transport] table for relay_factory's ``extra`` (which lands after [sip])."""
    lines = ["[transport]", "exempt = []"]
    lines += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=3, source_address=(source, 0))


def answers_ping(sock: socket.socket) -> bool:
    """RFC 5626 CRLFCRLF ping → CRLF pong: the relay holds this connection."""
    try:
        sock.sendall(b"\r\n\r\n")
        return sock.recv(16) == b"\r\n"
    except OSError:
        return False


def closed_by_relay(sock: socket.socket) -> bool:
    """The relay closed (reset) this connection without a byte."""
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def refused(port: int, source: str) -> bool:
    """A new connection from ``source`` is closed by the relay without a byte. The reset
    may come before connect(2) returns (the relay accepts and aborts at once; on loopback
    the RST can be processed before the connecting thread wakes): that counts too."""
    try:
        sock = connect(port, source)
    except ConnectionResetError:
        return True
    with sock:
        return closed_by_relay(sock)


def register_pbx_from(relay: RelayProc, source: str) -> Stream:
    """A PBX phoned home over TCP from ``source``."""
    stream = Stream.__new__(Stream)
    stream.sock, stream.buf, stream.eof = connect(relay.tcp, source), b"", False
    first = pbx_register(stream, SERIAL, cseq=1, call_id="pbx-" + source)
    auth = authorization(challenge(first, "MD5"), SERIAL, relay.secrets[SERIAL], f"sip:{SERIAL}@{DOMAIN}")
    ok = pbx_register(stream, SERIAL, cseq=2, call_id="pbx-" + source, auth=auth)
    assert ok.status == 200, ok.raw
    return stream


def udp_from(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    return s


def test_connections_per_source(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory(transport(max_connections_per_source=5))
    held = [connect(relay.tcp, ATTACKER) for _ in range(5)]
    assert all(answers_ping(s) for s in held)  # at the limit: accepted
    assert refused(relay.tcp, ATTACKER)  # one over: closed at once
    assert relay.metric('pbx_relay_connections_refused_total{reason="per_source"}') == 1
    assert f"event=connection_refused transport=tcp source={ATTACKER} reason=per_source" in relay.log()
    other = connect(relay.tcp, ATTACKER2)
    assert answers_ping(other)  # another source is not affected
    assert all(answers_ping(s) for s in held)  # nor are the connections already open
    held.pop().close()
    deadline = time.monotonic() + 5
    while relay.metric("pbx_relay_flows_open") > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    again = connect(relay.tcp, ATTACKER)
    assert answers_ping(again)  # a slot given back is free again
    for s in [*held, other, again]:
        s.close()


def test_loopback_is_exempt_by_default(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory("[transport]\nmax_connections_per_source = 2\n")
    held = [connect(relay.tcp, "127.0.0.1") for _ in range(4)]
    assert all(answers_ping(s) for s in held)
    over = connect(relay.tcp, ATTACKER)
    held2 = connect(relay.tcp, ATTACKER)
    assert answers_ping(over) and answers_ping(held2) and refused(relay.tcp, ATTACKER)
    for s in [*held, over, held2]:
        s.close()


def test_reserved_connections_are_kept_for_a_registered_pbx(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory(transport(max_connections=8, connections_reserved=3,
                                               max_connections_per_source=100))
    pbx = register_pbx_from(relay, PBX_IP)  # slot 1 of the 5 anyone may take
    strangers = [connect(relay.tcp, (ATTACKER, ATTACKER2)[i % 2]) for i in range(4)]
    assert all(answers_ping(s) for s in strangers)
    assert refused(relay.tcp, ATTACKER2)  # strangers have had all they may have
    assert relay.metric('pbx_relay_connections_refused_total{reason="total"}') == 1
    # The PBX's address is trusted once its registration is seen (the service's timer,
    # within a second): the 3 reserved slots are its own.
    mine: list[socket.socket] = []
    deadline = time.monotonic() + 5
    while len(mine) < 3 and time.monotonic() < deadline:
        try:
            s = connect(relay.tcp, PBX_IP)
        except ConnectionResetError:  # not trusted yet: refused like a stranger
            time.sleep(0.1)
            continue
        if answers_ping(s):
            mine.append(s)
        else:
            s.close()
            time.sleep(0.1)
    assert len(mine) == 3
    assert refused(relay.tcp, PBX_IP)  # the total is the total, trusted or not
    assert refused(relay.tcp, ATTACKER)
    assert answers_ping(pbx.sock) and all(answers_ping(s) for s in strangers)
    with udp_from(CLIENT) as c:
        options_barrier(relay, c)
    for s in [*strangers, *mine, pbx.sock]:
        s.close()


def _tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls_handshakes_in_progress(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory(transport(max_tls_handshakes=2))
    silent = [connect(relay.tls, ATTACKER) for _ in range(2)]  # never send a ClientHello
    deadline = time.monotonic() + 5
    while relay.metric("pbx_relay_tls_handshakes_in_progress") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused(relay.tls, ATTACKER2)
    assert relay.metric('pbx_relay_connections_refused_total{reason="tls_handshakes"}') == 1
    with _tls_client().wrap_socket(silent[0]) as tls:  # an accepted one can still finish
        assert answers_ping(tls)
        assert relay.metric("pbx_relay_tls_handshakes_in_progress") == 1
        with _tls_client().wrap_socket(connect(relay.tls, ATTACKER2)) as fresh:
            assert answers_ping(fresh)  # a slot is free again
    silent[1].close()


def send_options(sock: socket.socket, port: int, count: int) -> None:
    """``count`` OPTIONS to the relay's UDP ``port``, back to back."""
    local = sock.getsockname()
    for n in range(count):
        sock.sendto(b"OPTIONS sip:%s SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=z9hG4bKu%d;rport\r\n"
                    b"Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:%s>\r\nCall-ID: u%d\r\n"
                    b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
                    % (DOMAIN.encode(), local[0].encode(), local[1], n, DOMAIN.encode(), n), (HOST, port))


def test_udp_datagrams_per_source(relay_factory) -> None:  # type: ignore[no-untyped-def]
    # 1 datagram/s, a burst of 2: the third of three sent back to back is dropped unread.
    relay: RelayProc = relay_factory(transport(udp_rate_per_source=1.0))
    with udp_from(ATTACKER) as a, udp_from(CLIENT) as c:
        send_options(a, relay.udp, 3)
        got = drain(a, 0.5)
        assert len(got) == 2 and all(g.startswith(b"SIP/2.0 200") for g in got), got
        assert relay.metric('pbx_relay_udp_dropped_total{reason="rate"}') == 1
        assert f"event=udp_rate_limited source={ATTACKER}" in relay.log()
        assert options_barrier(relay, c) == []  # another source is served


def test_an_exempt_address_sends_udp_without_a_per_source_budget(relay_factory) -> None:  # type: ignore[no-untyped-def]
    """transport.exempt means held to the totals only: with 1 datagram/s per source,
    40 OPTIONS back to back from an exempt address are all answered, while a stranger
    sending the same is cut to its burst of 2."""
    relay: RelayProc = relay_factory(f'[transport]\nudp_rate_per_source = 1.0\nexempt = ["{CLIENT}"]\n')
    answered = {}
    for source in (CLIENT, ATTACKER):
        with udp_from(source) as s:
            send_options(s, relay.udp, 40)
            answered[source] = [g for g in drain(s, 0.5) if g.startswith(b"SIP/2.0 200")]
    assert (len(answered[CLIENT]), len(answered[ATTACKER])) == (40, 2)
    assert relay.metric('pbx_relay_udp_dropped_total{reason="rate"}') == 38
    assert f"source={CLIENT}" not in relay.log()


def test_udp_flooder_is_banned_in_the_kernel_then_let_back(relay_factory) -> None:  # type: ignore[no-untyped-def]
    from tests.transport_attacks import result, spawn

    relay: RelayProc = relay_factory(transport(udp_ban_seconds=2.0))
    flood = spawn("udp-flood", "--target", f"{HOST}:{relay.udp}", "--source", ATTACKER,
                  "--duration", "3", "--rate", "20000")
    deadline = time.monotonic() + 10
    while "event=udp_source_banned source=127.0.0.2" not in relay.log():
        assert time.monotonic() < deadline, relay.log()[-2000:]
        time.sleep(0.1)
    assert relay.metric("pbx_relay_udp_sources_banned") == 1
    seen = relay.metric('pbx_relay_udp_dropped_total{reason="rate"}')
    with udp_from(CLIENT) as c:
        assert options_barrier(relay, c) == []  # everyone else is served
    sent = int(result(flood)["sent"])  # type: ignore[call-overload]
    # Banned, the flood no longer reaches the relay at all: what it read after the ban
    # is at most what was already queued in its socket buffer.
    assert relay.metric('pbx_relay_udp_dropped_total{reason="rate"}') - seen < 10_000 < sent
    deadline = time.monotonic() + 10
    while "event=udp_ban_lifted source=127.0.0.2" not in relay.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert relay.metric("pbx_relay_udp_sources_banned") == 0
    with udp_from(ATTACKER) as a:
        assert options_barrier(relay, a) == []  # the ban ran out: served again
