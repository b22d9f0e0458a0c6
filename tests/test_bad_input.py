"""Bad input against a real `pbx-relay run` process, over raw sockets.

Issue 2, "Done means", bad input; DESIGN §7: wrong credentials, unknown serial,
expired and removed registrations, offline PBX, malformed (RFC 4475) and
oversized messages, a TCP peer that stalls half-way, a flood of garbage. Each
gets its documented answer or a silent drop and a counter; the relay never
crashes (every test ends by asking it for ``OPTIONS sip:relay.test``) and a
PBX registered before the abuse is still registered after it.
"""

from __future__ import annotations

import csv
import os
import random
import select
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import (  # noqa: F401
    HOST,
    OTHER,
    QUIET,
    SERIAL,
    Msg,
    Pbx,
    Stream,
    assert_healthy,
    authorization,
    challenge,
    digest_params,
    drain,
    invite,
    options_barrier,
    parse,
    pbx_register,
    rand,
    request,
    udp_call,
    udp_socket,
)

TORTURE = Path(__file__).parent / "data" / "torture"


# ================================================================== digest
def fresh_challenge(s: Stream, serial: str, algorithm: str) -> str:
    call_id = rand()
    first = pbx_register(s, serial, cseq=1, call_id=call_id)
    return challenge(first, algorithm)


def register_with(s: Stream, serial: str, auth: str) -> Msg:
    return pbx_register(s, serial, cseq=2, call_id=rand(), auth=auth)


def test_wrong_digest_is_refused_and_counted(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory(serials=(SERIAL, OTHER))
    s = Stream(relay)
    uri = f"sip:{SERIAL}@{DOMAIN}"
    first = pbx_register(s, SERIAL, cseq=1, call_id=rand())
    assert first.status == 401
    offered = {digest_params(v.removeprefix("Digest ")).get("algorithm")
               for v in first.get_all("www-authenticate")}
    assert offered == {"MD5", "SHA-256"}
    failures = relay.metric("pbx_relay_pbx_auth_failures_total")

    # MD5 with the wrong password: refused, nothing bound, counted.
    bad = authorization(challenge(first, "MD5"), SERIAL, "not-the-secret", uri)
    wrong = register_with(s, SERIAL, bad)
    assert wrong.status in (401, 403), wrong.raw
    if wrong.status == 401:  # challenged again (RFC 3261 §22.4 lets a UAS do either)
        assert wrong.get_all("www-authenticate")
    assert relay.metric("pbx_relay_pbx_auth_failures_total") == failures + 1
    assert relay.registry() == []

    # An unknown serial with a well-formed digest gets the very same answer:
    # the relay must not tell which serials exist.
    unknown = "5555555555"
    guess = authorization(fresh_challenge(s, unknown, "MD5"), unknown, "guessed", f"sip:{unknown}@{DOMAIN}")
    assert register_with(s, unknown, guess).status == wrong.status, "serials can be enumerated"
    assert relay.metric("pbx_relay_pbx_auth_failures_total") == failures + 2

    # Another PBX's own valid credentials do not register this serial.
    hijack = authorization(fresh_challenge(s, SERIAL, "MD5"), OTHER, relay.secrets[OTHER], uri)
    assert register_with(s, SERIAL, hijack).status in (401, 403)
    assert relay.metric("pbx_relay_pbx_auth_failures_total") == failures + 3
    assert relay.registry() == []

    # The right secret with SHA-256 (RFC 8760) on the same connection: bound to this socket.
    good = authorization(fresh_challenge(s, SERIAL, "SHA-256"), SERIAL, relay.secrets[SERIAL], uri)
    ok = register_with(s, SERIAL, good)
    assert ok.status == 200, ok.raw
    assert "expires=600" in (ok.get("contact") or "").replace(" ", "")
    [reg] = relay.registry()
    ip, port = s.local
    assert (reg["serial"], reg["transport"], reg["ip"], reg["port"]) == (SERIAL, "tcp", ip, port)
    assert relay.metric("pbx_relay_pbx_auth_failures_total") == failures + 3
    assert_healthy(relay)
    s.close()


# ========================================================== unknown serial
def test_unknown_serial_offline_pbx_and_foreign_domain(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory(serials=(SERIAL, OTHER))
    pbx = Pbx(relay, SERIAL)

    # REGISTER for a serial the directory does not know, with a well-formed digest → 403.
    s = Stream(relay)
    unknown = "5555555555"
    # the first answer is the same 401 as for a known serial
    auth = authorization(fresh_challenge(s, unknown, "MD5"), unknown, "guessed", f"sip:{unknown}@{DOMAIN}")
    resp = register_with(s, unknown, auth)
    assert resp.status == 403, resp.raw
    s.close()

    # INVITEs from a phone
    assert invite(relay, f"sip:100@unknownserial.{DOMAIN}").status == 480  # as if offline
    assert invite(relay, f"sip:100@{OTHER}.{DOMAIN}").status == 480  # known, not registered
    assert invite(relay, "sip:x@example.com").status == 403  # never an open relay
    assert invite(relay, "sip:x@127.0.0.2:5060").status == 403
    assert relay.metric('pbx_relay_forbidden_total{reason="foreign_domain"}') >= 2
    assert relay.metric("pbx_relay_requests_forwarded_total") == 0
    pbx.assert_nothing_received()
    pbx.assert_bound()
    assert_healthy(relay)


# ====================================================== expiry, removal
def test_expired_registration_is_forgotten(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory("pbx_expires_min = 1\npbx_expires_default = 2")
    pbx = Pbx(relay, expires=2)  # the TCP connection stays open: only time removes it
    pbx.assert_bound()
    assert (pbx.binding() or {})["expires_in"] in (1, 2)
    time.sleep(3.5)
    assert relay.registry() == []
    assert relay.metric('pbx_relay_pbx_unregistered_total{reason="expired"}') == 1
    assert relay.metric("pbx_relay_pbx_registered") == 0
    assert invite(relay, f"sip:100@{SERIAL}.{DOMAIN}").status == 480
    pbx.assert_nothing_received()
    assert_healthy(relay)


def test_deregistration_removes_the_binding(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    pbx.assert_bound()
    resp = pbx.register(expires=0)
    assert resp.status == 200, resp.raw
    assert relay.registry() == []
    assert invite(relay, f"sip:100@{SERIAL}.{DOMAIN}").status == 480
    # again, with Contact: * (RFC 3261 §10.2.2), after registering once more
    assert pbx.register(expires=600).status == 200
    pbx.assert_bound()
    resp = pbx.register(expires=0, contact="*")
    assert resp.status == 200, resp.raw
    assert relay.registry() == []
    assert relay.metric('pbx_relay_pbx_unregistered_total{reason="request"}') == 2
    assert_healthy(relay)


# ============================================================ RFC 4475 corpus
def _index() -> list[dict[str, str]]:
    with (TORTURE / "index.tsv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _call_id(m: Msg) -> str | None:
    return m.get("call-id") or m.get("i")


def test_torture_corpus_over_udp(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    rows = _index()
    assert len(rows) >= 49
    answers: dict[str, list[Msg]] = {}
    with udp_socket() as s:
        for row in rows:
            data = (TORTURE / row["file"]).read_bytes()
            s.sendto(data, (HOST, relay.udp))
            answers[row["file"]] = [parse(d) for d in options_barrier(relay, s)]
    problems = []
    for row in rows:
        got = answers[row["file"]]
        name = row["file"]
        if len(got) > 1:
            problems.append(f"{name}: {len(got)} answers to one datagram")
        for m in got:
            if m.status is None:
                problems.append(f"{name}: the relay sent a request back: {m.start!r}")
        if row["kind"] == "response":
            if got:
                problems.append(f"{name}: a response was answered with {got[0].start!r}")
            continue
        sent = parse((TORTURE / name).read_bytes())
        for m in got:
            if _call_id(m) != _call_id(sent):
                problems.append(f"{name}: answer with Call-ID {_call_id(m)!r}, not {_call_id(sent)!r}")
        # No torture request is addressed to a registered PBX: nothing here may
        # be forwarded (checked below) and nothing may be accepted with a 2xx.
        for m in got:
            if m.status is not None and not 400 <= m.status <= 599:
                problems.append(f"{name}: answered {m.status} (class {row['class']})")
            # A well-formed request must not be called malformed; RFC 4475 §3.2.1
            # lets badbranch.dat be refused statelessly with 400.
            if row["class"] == "valid" and m.status == 400 and name != "badbranch.dat":
                problems.append(f"{name}: valid per RFC 4475 §{row['section']} ({row['proxy_must']}), "
                                f"answered {m.start!r}")
    summary = {k: [m.status for m in v] for k, v in answers.items()}
    # Where RFC 4475 names the one right answer and the relay can give it.
    for name, status in [("badvers.dat", 505), ("unkscm.dat", 416), ("zeromf.dat", 483),
                         ("bext01.dat", 420), ("scalar02.dat", 400), ("mismatch01.dat", 400)]:
        if summary[name] != [status]:
            problems.append(f"{name}: expected {status}, got {summary[name]}")
    assert relay.metric("pbx_relay_requests_forwarded_total") == 0
    pbx.assert_nothing_received()
    pbx.assert_bound()
    assert_healthy(relay)
    assert not problems, "\n".join(problems)


# =============================================================== oversized
def _send_ignoring_close(s: Stream, data: bytes) -> None:
    try:
        s.send(data)
    except OSError:
        pass  # the relay may close before it has read everything: that is the point


def test_endless_tcp_header_section_closes_the_connection(relay: RelayProc) -> None:
    """70 kB of header fields and never an empty line: nothing to frame, so close."""
    pbx = Pbx(relay)
    s = Stream(relay)
    head = b"OPTIONS sip:relay.test SIP/2.0\r\n" + b"".join(
        b"X-Pad-%05d: %s\r\n" % (i, b"p" * 60) for i in range(70_000 // 75))
    _send_ignoring_close(s, head)
    assert s.closed_within(3), "the relay kept buffering an endless header section"
    s.close()
    assert relay.metric("pbx_relay_framing_lost_total") == 1
    pbx.assert_bound()
    pbx.assert_nothing_received()
    assert_healthy(relay)


def test_oversized_tcp_message_gets_513_and_the_connection_closed(relay: RelayProc) -> None:
    """A 70 000-octet request whose header section is whole and says so in its
    Content-Length: framing is lost past the 65 535 limit, but the relay has
    everything RFC 3261 §8.2.6 needs to answer 513 (§21.5.14) before it closes."""
    pbx = Pbx(relay)
    s = Stream(relay)
    head = request("OPTIONS", f"sip:{DOMAIN}", transport="TCP", local=s.local,
                   extra=["Content-Type: text/plain"], body=b"x" * 70_000)
    body_len = 70_000 - (len(head) - 70_000)  # both Content-Length values have 5 digits
    data = request("OPTIONS", f"sip:{DOMAIN}", transport="TCP", local=s.local,
                   extra=["Content-Type: text/plain"], body=b"x" * body_len)
    assert len(data) == 70_000, len(data)
    _send_ignoring_close(s, data)
    assert s.closed_within(3), "the relay kept a connection that sent a 70 kB message"
    got = s.buf
    s.close()
    assert relay.metric("pbx_relay_framing_lost_total") == 1
    pbx.assert_bound()
    pbx.assert_nothing_received()
    assert_healthy(relay)
    answer = parse(got) if got else None
    assert answer is not None and answer.status == 513, f"no 513 before the close, got {got[:200]!r}"


@pytest.mark.parametrize("name", ["ncl.dat", "mcl01.dat"])
def test_tcp_framing_lost_gets_400_and_the_connection_closed(relay: RelayProc, name: str) -> None:
    """RFC 4475 §3.1.2.3 / §3.3.9 over TCP: a negative or a repeated Content-Length
    leaves no way to find the next message, so the connection must go; the request
    itself is readable and "respond with an error" (400) still applies."""
    s = Stream(relay)
    s.send((TORTURE / name).read_bytes())
    assert s.closed_within(3), f"{name}: connection kept after its framing was lost"
    got = s.buf
    s.close()
    assert relay.metric("pbx_relay_framing_lost_total") == 1
    assert_healthy(relay)
    answer = parse(got) if got else None
    assert answer is not None and answer.status == 400, f"{name}: no 400 before the close, got {got[:200]!r}"


def test_oversized_udp_datagram(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    before = relay.metrics()
    with udp_socket() as s:
        local = s.getsockname()
        # A valid start and header fields, 65 000 octets in all: over the 32 KiB
        # the relay allows a header section (relay/sip/limits.py).
        pad = [f"X-Pad-{i:05d}: {'p' * 60}" for i in range(64_000 // 75)]
        data = request("OPTIONS", f"sip:{DOMAIN}", local=local, extra=pad)
        pad[-1] += "p" * (65_000 - len(data))
        data = request("OPTIONS", f"sip:{DOMAIN}", local=local, extra=pad)
        assert len(data) == 65_000
        s.sendto(data, (HOST, relay.udp))
        got = [parse(d) for d in options_barrier(relay, s)]
    assert [m.status for m in got] in ([], [513]), [m.start for m in got]
    after = relay.metrics()
    key = 'pbx_relay_parse_errors_total{status="513"}'
    assert after.get(key, 0) == before.get(key, 0) + 1
    pbx.assert_bound()
    assert_healthy(relay)


# ====================================================== stalled TCP peers
def test_half_a_message_then_silence_is_closed(relay_factory) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory("partial_message_timeout = 1")
    pbx = Pbx(relay)
    head_only = Stream(relay)  # a header section that never ends
    short_body = Stream(relay)  # Content-Length: 200, 10 octets of body
    trickle = Stream(relay)  # one octet every 100 ms: still half a message after 1 s
    full = request("OPTIONS", f"sip:{DOMAIN}", transport="TCP", local=head_only.local)
    head_only.send(full[: len(full) // 2])
    short_body.send(request("MESSAGE", f"sip:100@{SERIAL}.{DOMAIN}", transport="TCP",
                            local=short_body.local, body=b"x" * 200)[:-190])
    slow = request("OPTIONS", f"sip:{DOMAIN}", transport="TCP", local=trickle.local)
    start = time.monotonic()
    i = 0
    while not trickle.eof and time.monotonic() - start < 4:
        try:
            trickle.send(slow[i : i + 1])
        except OSError:
            break
        i += 1
        trickle.closed_within(0.1)
    elapsed = time.monotonic() - start
    assert trickle.closed_within(0.5), "a peer trickling one octet at a time is never closed"
    assert 0.8 <= elapsed <= 3.0, elapsed
    assert head_only.closed_within(2.0) and short_body.closed_within(2.0)
    for st in (head_only, short_body, trickle):
        assert st.buf == b"", st.buf  # nothing answered: the messages never ended
        st.close()
    assert relay.metric('pbx_relay_flows_closed_total{reason="partial_message"}') == 3
    assert relay.metric("pbx_relay_requests_forwarded_total") == 0
    pbx.assert_nothing_received()
    pbx.assert_bound()  # its connection was idle meanwhile, not half-way: still open
    assert_healthy(relay)


# ==================================================================== flood
def test_flood_of_garbage_datagrams(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    before = relay.metrics()
    rng = random.Random(4475)
    sent = 0
    answered: list[bytes] = []
    with udp_socket() as s:
        for _ in range(10):
            for _i in range(2_000):
                d = rng.randbytes(rng.randint(8, 1400))
                if d[0] < 2:
                    d = b"\xff" + d[1:]  # never a STUN header (that has its own test)
                s.sendto(d, (HOST, relay.udp))
                sent += 1
            # as fast as we can send, then one OPTIONS: the relay is still responsive
            # and has answered none of the burst
            answered += options_barrier(relay, s, tries=20)
    assert sent == 20_000
    assert answered == [], f"{len(answered)} garbage datagrams answered, first {answered[0][:200]!r}"
    after = relay.metrics()

    def grew(prefix: str) -> float:
        return sum(v for k, v in after.items() if k.startswith(prefix)) - sum(
            v for k, v in before.items() if k.startswith(prefix))

    parse_errors = grew("pbx_relay_parse_errors_total")
    dropped = grew('pbx_relay_dropped_total{reason="unparseable"}')
    # The kernel may drop part of a flood before the relay reads it; what the
    # relay read, it counted.
    assert parse_errors >= 500 and dropped >= 500, (parse_errors, dropped)
    assert parse_errors == dropped, (parse_errors, dropped)
    pbx.assert_nothing_received()
    pbx.assert_bound()
    assert_healthy(relay)


# ============================================================== keepalives
def test_crlf_keepalive_over_tcp(relay: RelayProc) -> None:
    s = Stream(relay)
    s.send(b"\r\n\r\n")
    assert select.select([s.sock], [], [], 2)[0], "no pong to CRLFCRLF"
    time.sleep(QUIET)
    pong = s.sock.recv(100)
    assert pong == b"\r\n", pong  # exactly one CRLF (RFC 5626 §4.4.1)
    # the connection is still a SIP flow afterwards
    s.send(request("OPTIONS", f"sip:{DOMAIN}", transport="TCP", local=s.local))
    resp = s.recv()
    assert resp is not None and resp.status == 200
    s.close()
    assert relay.metric('pbx_relay_keepalives_total{transport="tcp"}') == 1
    assert_healthy(relay)


def _stun_request(txid: bytes, attrs: bytes = b"") -> bytes:
    return struct.pack("!HHI", 0x0001, len(attrs), 0x2112A442) + txid + attrs


def _with_software_and_fingerprint(txid: bytes) -> bytes:
    software = b"pbx-relay-test"
    attr = struct.pack("!HH", 0x8022, len(software)) + software + b"\x00" * (-len(software) % 4)
    # FINGERPRINT (RFC 5389 §15.5): CRC-32 of the message up to it, length counting it, XOR 0x5354554e
    head = _stun_request(txid, attr + b"\x00" * 8)[:20] + attr
    crc = (zlib.crc32(head) ^ 0x5354554E) & 0xFFFFFFFF
    return head + struct.pack("!HHI", 0x8028, 4, crc)


def _xor_mapped(resp: bytes, txid: bytes) -> tuple[str, int]:
    typ, length, cookie = struct.unpack_from("!HHI", resp)
    assert typ == 0x0101, hex(typ)  # Binding success response
    assert cookie == 0x2112A442 and resp[8:20] == txid
    assert length == len(resp) - 20 and length % 4 == 0
    pos = 20
    while pos < len(resp):
        atype, alen = struct.unpack_from("!HH", resp, pos)
        value = resp[pos + 4 : pos + 4 + alen]
        pos += 4 + alen + (-alen % 4)
        if atype == 0x0020:
            family, xport = struct.unpack_from("!xBH", value)
            assert family == 1  # IPv4
            port = xport ^ 0x2112
            ip = bytes(a ^ b for a, b in zip(value[4:8], struct.pack("!I", 0x2112A442), strict=True))
            return socket.inet_ntoa(ip), port
    raise AssertionError(f"no XOR-MAPPED-ADDRESS in {resp.hex()}")


def test_stun_binding_on_the_sip_udp_port(relay: RelayProc) -> None:
    with udp_socket() as s:
        for req_of in (_stun_request, _with_software_and_fingerprint):
            txid = os.urandom(12)
            s.sendto(req_of(txid), (HOST, relay.udp))
            [resp] = drain(s)
            assert _xor_mapped(resp, txid) == s.getsockname()
        # a STUN message that is not a binding request is not answered
        s.sendto(struct.pack("!HHI", 0x0011, 0, 0x2112A442) + os.urandom(12), (HOST, relay.udp))
        assert drain(s, 0.2) == []
    assert relay.metric("pbx_relay_stun_requests_total") == 3
    assert_healthy(relay)
