"""RFC 8599 wake-ups end to end: SIPp as PBX and as phone, a real relay process
with its embedded push service, and a local HTTP/2 TLS fake of APNs that checks
what Apple checks (tests/pushfakes.py).

The phone registers over TCP with push parameters and goes to sleep (its SIPp
exits, the connection closes). The PBX calls it: the relay holds the INVITE,
pushes, and forwards the call once the phone registers again from a new
connection — or answers 480 when the push cannot go out. Assertions are on what
reached the fake, on what each SIPp received, and on the rows in push.sqlite.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pbxcore.metrics import parse as parse_metrics
from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.pushfakes import FakeApns
from tests.realpeers import DOMAIN, RelayProc, SippRun, free_port, sipp

pytestmark = [needs_sipp, pytest.mark.sipp]
SERIAL = "0123456789"
TOKEN = "5f1e0c8a" * 8  # an APNs device token: 32 bytes, hex
TOPIC = "com.example.app.voip"
RING_TIMEOUT = 6.0


@pytest.fixture
def apns() -> Iterator[FakeApns]:
    fake = FakeApns(topics={TOPIC})
    fake.start_in_thread()
    yield fake
    fake.close()


def _push_relay(relay_factory: Any, apns: FakeApns, tmp_path: Path, log_level: str = "info") -> RelayProc:
    """A relay with its embedded push service, APNs pointed at the fake."""
    push_dir = tmp_path / "push"
    push_dir.mkdir()
    p8 = apns.write_p8(push_dir / "AuthKey.p8")
    push_toml = push_dir / "push.toml"
    admin_port = free_port()
    push_toml.write_text(f"""
[push]
state_dir = "{push_dir}"
log_level = "{log_level}"
[api]
listen = "127.0.0.1:{free_port()}"
[admin]
listen = "127.0.0.1:{admin_port}"
[apns]
key_file = "{p8}"
key_id = "{apns.key_id}"
team_id = "{apns.team_id}"
base_url = "{apns.base_url}"
ca_file = "{apns.ca_file}"
""")
    push = f'mode = "embedded"\nconfig = "{push_toml}"\nring_timeout = {RING_TIMEOUT}'
    r: RelayProc = relay_factory(push=push, log_level=log_level)
    r.push_dir = push_dir  # type: ignore[attr-defined]
    r.push_admin = admin_port  # type: ignore[attr-defined]
    return r


def _push_metrics(relay: RelayProc) -> str:
    url = f"http://127.0.0.1:{relay.push_admin}/metrics"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


@pytest.fixture
def relay(relay_factory: Any, apns: FakeApns, tmp_path: Path) -> RelayProc:
    return _push_relay(relay_factory, apns, tmp_path)


def pn(apns: FakeApns) -> str:
    return f"pn-provider=apns;pn-prid={TOKEN};pn-param={apns.team_id}.{TOPIC}"


# ------------------------------------------------------------------ scenarios
def phone_register(apns: FakeApns, cseq: int) -> str:
    return "\n".join([sc.send(f"""
REGISTER sip:[$serial].[$domain] SIP/2.0
Via: SIP/2.0/TCP [local_ip]:[local_port];branch=[branch];rport
From: <sip:201@[$serial].[$domain]>;tag=ph[pid]
To: <sip:201@[$serial].[$domain]>
Call-ID: [call_id]
CSeq: {cseq} REGISTER
Contact: <sip:201@[local_ip]:[local_port];transport=tcp;{pn(apns)}>
Supported: path
Max-Forwards: 70
Expires: 300
Content-Length: 0
"""), sc.recv("200")])


def phone_goes_to_sleep(apns: FakeApns) -> str:
    return sc.scenario("phone registers, then sleeps", phone_register(apns, 1))


def pbx_accept_register(capture: bool) -> str:
    """The PBX as registrar; ``capture`` keeps the whole Contact URI, push
    parameters included (RFC 8599: they are the Request-URI of calls to it)."""
    extra = """
      <ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" assign_to="path"/>
      <ereg regexp="sip:[^&gt;]*" search_in="hdr" header="Contact:" assign_to="contact"/>"""
    return "\n".join([sc.recv("REGISTER", extra=extra if capture else ""), sc.send("""
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=reg[pid]
[last_Call-ID:]
[last_CSeq:]
[last_Contact:];expires=300
[last_Path:]
Content-Length: 0
""")])


def _lines(*blocks: str) -> str:
    return "\n".join(blocks)


def _pbx_invite() -> str:
    return sc._uac_invite(sc.PBX_VIA, sc.PBX_URI, sc.PHONE_URI, "[$contact]", 2, "Route: [$path]")


def pbx_calls_sleeping_phone() -> str:
    return sc.scenario("PBX calls a sleeping phone", sc.PBX_PHONE_HOME, pbx_accept_register(True), _lines(
        sc.pause(800),  # the phone's SIPp has exited: its connection is gone
        _pbx_invite(),
        sc.recv("100", optional=True),
        sc.recv("180", optional=True),  # the relay's, once the push is out
        pbx_accept_register(False),  # the woken phone registers again
        sc.recv("180", optional=True),  # the phone's
        sc.recv("200", rrs=True),
        sc._in_dialog("ACK", sc.PBX_VIA, sc.PBX_URI, 2),
        sc.pause(200),
        sc._in_dialog("BYE", sc.PBX_VIA, sc.PBX_URI, 3),
        sc.recv("200"),
    ))


def woken_phone_answers(apns: FakeApns) -> str:
    return sc.scenario("woken phone answers", phone_register(apns, 2), sc.uas_answers("201"))


def _ack_non2xx() -> str:
    return sc.send(f"""
ACK [$contact] SIP/2.0
[last_Via:]
Route: [$path]
From: <{sc.PBX_URI}>;tag=inv[pid]
[last_To:]
Call-ID: [call_id]
CSeq: 2 ACK
Max-Forwards: 70
Content-Length: 0
""")


def pbx_calls_and_cancels() -> str:
    return sc.scenario("PBX cancels during the wake-up", sc.PBX_PHONE_HOME, pbx_accept_register(True), _lines(
        sc.pause(800),
        _pbx_invite(),
        sc.recv("100", optional=True),
        sc.recv("180"),  # the relay's: the push is out
        sc.send(f"""
CANCEL [$contact] SIP/2.0
[last_Via:]
Route: [$path]
From: <{sc.PBX_URI}>;tag=inv[pid]
To: <{sc.PHONE_URI}>
Call-ID: [call_id]
CSeq: 2 CANCEL
Max-Forwards: 70
Content-Length: 0
"""),
        sc.recv("200"),
        pbx_accept_register(False),
        sc.recv("180", optional=True),  # the phone's, before it sees the CANCEL
        sc.recv("487"),
        _ack_non2xx(),
        sc.pause(300),
    ))


def woken_phone_sees_cancel(apns: FakeApns) -> str:
    """iOS reported the call to CallKit on the push: it must also see its end."""
    return sc.scenario("woken phone sees the CANCEL", phone_register(apns, 2), "\n".join([
        sc.recv("INVITE", extra="""
      <ereg regexp=".*" search_in="hdr" header="Via:" occurrence="1" assign_to="via1"/>
      <ereg regexp=".*" search_in="hdr" header="Via:" occurrence="2" assign_to="via2"/>"""),
        sc._answer("180", "Ringing", "201"),
        sc.recv("CANCEL"),
        sc._ok_plain(),
        sc.send("""
SIP/2.0 487 Request Terminated
Via: [$via1]
Via: [$via2]
[last_From:]
[last_To:];tag=ans[pid]
[last_Call-ID:]
CSeq: 2 INVITE
Content-Length: 0
"""),
        sc.recv("ACK"),
    ]))


def pbx_call_refused(code: str) -> str:
    return sc.scenario(f"PBX call gets {code}", sc.PBX_PHONE_HOME, pbx_accept_register(True), _lines(
        sc.pause(800),
        _pbx_invite(),
        sc.recv("100", optional=True),
        sc.recv("180", optional=True),
        sc.recv(code),
        _ack_non2xx(),
        sc.pause(200),
    ))


# ------------------------------------------------------------------ helpers
def _sipp(relay: RelayProc, tmp: Path, name: str, xml: str, *, pbx: bool = False) -> SippRun:
    return sipp(tmp, name, xml, f"127.0.0.1:{relay.tcp}", transport="t1", local_port=free_port(),
                variables={"serial": SERIAL, "domain": DOMAIN},
                auth=(SERIAL, relay.secrets[SERIAL]) if pbx else None, timeout_s=30)


def _db_rows(relay: RelayProc, sql: str) -> list[tuple[Any, ...]]:
    path = relay.push_dir / "push.sqlite"  # type: ignore[attr-defined]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def _wait_rows(relay: RelayProc, sql: str, n: int = 1, timeout: float = 10.0) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _db_rows(relay, sql)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _sleeping_phone(relay: RelayProc, apns: FakeApns, tmp: Path, pbx_xml: str) -> SippRun:
    """PBX phones home; the phone registers over TCP with push parameters and exits."""
    pbx = _sipp(relay, tmp, "pbx", pbx_xml, pbx=True)
    relay.wait_registered(SERIAL)
    phone = _sipp(relay, tmp, "phone1", phone_goes_to_sleep(apns))
    assert phone.wait() == 0, phone.errors()
    rows = _wait_rows(relay, "SELECT port, transport FROM devices")
    assert len(rows) == 1 and rows[0][1] == "tcp", rows
    return pbx


def _finish(*runs: SippRun) -> None:
    codes = [r.wait(40) for r in runs]
    assert codes == [0] * len(runs), "\n".join(r.errors() for r in runs)


# -------------------------------------------------------------------- tests
def test_sleeping_phone_is_pushed_wakes_registers_and_answers(
    relay: RelayProc, apns: FakeApns, tmp_path: Path,
) -> None:
    pbx = _sleeping_phone(relay, apns, tmp_path, pbx_calls_sleeping_phone())
    (push,) = apns.wait_for(1, timeout=10)
    asked = time.time()
    # What Apple requires of a VoIP push (the fake rejects anything else).
    assert (push.status, push.http_version) == (200, "2")
    assert push.path == f"/3/device/{TOKEN}"
    assert (push.push_type, push.topic, push.priority) == ("voip", TOPIC, 10)
    assert push.jwt_header["kid"] == apns.key_id and push.jwt_claims["iss"] == apns.team_id
    assert push.expiration is not None and 0 < push.expiration - asked <= RING_TIMEOUT + 1
    assert push.collapse_id and len(push.collapse_id.encode()) <= 64
    body = push.body
    assert isinstance(body, dict) and "aps" in body
    assert "v=0" not in push.raw_body.decode() and "INVITE" not in push.raw_body.decode()

    phone = _sipp(relay, tmp_path, "phone2", woken_phone_answers(apns))
    _finish(phone, pbx)
    # Only the new address is kept, and the push is in the log.
    devices = _db_rows(relay, "SELECT ip, port, transport, username, serial FROM devices")
    assert len(devices) == 1 and devices[0][3:] == ("201", SERIAL)
    log = _wait_rows(relay, "SELECT username, caller, callee, provider, outcome, attempts FROM push_log")
    assert log == [("201", "100", "201", "apns", "sent", 1)]
    assert relay.metric('pbx_relay_push_holds_total{outcome="released"}') == 1
    assert relay.metric('pbx_relay_push_wakes_total{outcome="sent"}') == 1
    assert len(apns.requests) == 1  # one push per call per device
    # the push service's own metrics show it: by provider and outcome, with its latency
    m = parse_metrics(_push_metrics(relay))
    assert m['pbx_push_pushes_total{outcome="sent",provider="apns"}'] == 1
    assert m['pbx_push_latency_seconds_count{provider="apns"}'] == 1
    assert m["pbx_push_devices"] == 1 and m["pbx_push_push_log_rows"] == 1


def test_cancel_during_the_hold_reaches_the_phone_after_the_wake(
    relay: RelayProc, apns: FakeApns, tmp_path: Path,
) -> None:
    pbx = _sleeping_phone(relay, apns, tmp_path, pbx_calls_and_cancels())
    apns.wait_for(1, timeout=10)
    time.sleep(0.8)  # the PBX gets the relay's 180 and CANCELs before the phone is back
    phone = _sipp(relay, tmp_path, "phone2", woken_phone_sees_cancel(apns))
    _finish(phone, pbx)
    assert relay.metric("pbx_relay_cancels_forwarded_total") == 1


def test_429_and_503_are_retried_within_the_ring_time(
    relay: RelayProc, apns: FakeApns, tmp_path: Path,
) -> None:
    apns.script(TOKEN, (429, "TooManyRequests", {"retry-after": "1"}), (503, "ServiceUnavailable"))
    pbx = _sleeping_phone(relay, apns, tmp_path, pbx_calls_sleeping_phone())
    first, second, third = apns.wait_for(3, timeout=RING_TIMEOUT)
    assert [r.status for r in (first, second, third)] == [429, 503, 200]
    assert second.received_mono - first.received_mono >= 1.0  # Retry-After honoured
    phone = _sipp(relay, tmp_path, "phone2", woken_phone_answers(apns))
    _finish(phone, pbx)
    log = _wait_rows(relay, "SELECT outcome, status, attempts FROM push_log")
    assert log == [("sent", 200, 3)]


def test_410_unregistered_deletes_the_device_and_the_call_gets_480(
    relay: RelayProc, apns: FakeApns, tmp_path: Path,
) -> None:
    apns.script(TOKEN, (410, "Unregistered"))
    pbx = _sleeping_phone(relay, apns, tmp_path, pbx_call_refused("480"))
    _finish(pbx)
    assert _wait_rows(relay, "SELECT outcome, status FROM push_log") == [("unregistered", 410)]
    assert _db_rows(relay, "SELECT count(*) FROM devices") == [(0,)]
    assert len(apns.requests) == 1


def test_gateway_down_is_480_after_retries_and_a_log_row_says_so(
    relay: RelayProc, apns: FakeApns, tmp_path: Path,
) -> None:
    apns.stop()  # connection refused from now on
    t0 = time.monotonic()
    pbx = _sleeping_phone(relay, apns, tmp_path, pbx_call_refused("480"))
    _finish(pbx)
    assert time.monotonic() - t0 < RING_TIMEOUT + 10
    (row,) = _wait_rows(relay, "SELECT outcome, status, attempts, reason FROM push_log")
    assert row[0] == "failed" and row[1] is None and row[2] >= 2, row
    assert _db_rows(relay, "SELECT count(*) FROM devices") == [(1,)]  # a network failure is not a verdict


def test_logs_of_a_full_call_with_sdp_and_a_push_hold_no_content(
    relay_factory: Any, apns: FakeApns, tmp_path: Path,
) -> None:
    """Issue 5: the lines logged during a whole call (SDP both ways, a push, debug
    level) carry the call id and never a body, an SDP line or the push token."""
    relay = _push_relay(relay_factory, apns, tmp_path, log_level="debug")
    pbx = _sleeping_phone(relay, apns, tmp_path, pbx_calls_sleeping_phone())
    apns.wait_for(1, timeout=10)
    phone = _sipp(relay, tmp_path, "phone2", woken_phone_answers(apns))
    _finish(phone, pbx)
    from tests.realpeers import stop_relay

    stop_relay(relay)
    text = relay.log()
    call_lines = [line for line in text.splitlines() if " relay.calls " in line or "event=push " in line]
    events = {e.split()[0] for line in call_lines for e in line.split("event=")[1:]}
    expected = {"invite", "push_hold", "push", "push_result", "push_release", "invite_final", "bye"}
    assert expected <= events, text[-3000:]
    assert all("call_id=pbxrelay-1-call" in line for line in call_lines), call_lines
    for needle in ("v=0", "m=audio", "c=IN IP4", "application/sdp", "Content-Length", TOKEN, "eyJ",
                   "a=rtpmap"):
        assert needle not in text, needle
