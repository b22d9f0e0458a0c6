"""DESIGN §3, the relay's rows: what it keeps, and what it never keeps.

- "PBX serial, current external IP and port — relay registry — while registered —
  never older addresses": a re-registration from a new address replaces the old one,
  nothing is written to disk, and the binding goes when the PBX does.
- "technical logs — never SIP bodies, SDP, credentials": a call with an SDP body and a
  digest-authenticated PBX, logged at debug level, leaves none of them in the log.
- "call content — memory only": the state directory holds nothing of a call.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import DOMAIN, RelayProc, free_port, sipp
from tests.sipclient import SERIAL, Pbx


def _state_bytes(relay: RelayProc) -> bytes:
    return b"".join(p.read_bytes() for p in relay.state_dir.rglob("*")
                    if p.is_file() and p.name != "relay.log")


def test_registry_keeps_only_the_current_address(relay: RelayProc) -> None:
    first = Pbx(relay)
    first.assert_bound()
    old_port = first.stream.local[1]
    second = Pbx(relay)  # the same PBX from a new address (new NAT port)
    second.assert_bound()
    regs = relay.registry()
    assert [(r["serial"], r["port"]) for r in regs] == [(SERIAL, second.stream.local[1])]
    assert str(old_port) not in relay.http("/registry")
    # nothing of either address on disk: the registry lives in memory only
    state = _state_bytes(relay)
    assert str(old_port).encode() not in state
    assert str(second.stream.local[1]).encode() not in state
    # closing the old connection changes nothing; closing the current one forgets the PBX
    first.stream.close()
    second.stream.close()
    deadline = time.monotonic() + 5
    while relay.registry() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.registry() == []


@needs_sipp
def test_logs_and_state_hold_no_body_sdp_or_credential(relay_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    relay: RelayProc = relay_factory(log_level="debug")
    secret = relay.secrets[SERIAL]
    pbx = sipp(tmp_path, "pbx", sc.pbx_answers_phone(), f"127.0.0.1:{relay.tcp}", transport="t1",
               local_port=free_port(), variables={"serial": SERIAL, "domain": DOMAIN},
               auth=(SERIAL, secret))
    relay.wait_registered(SERIAL)
    phone = sipp(tmp_path, "phone", sc.phone_calls_pbx(), f"127.0.0.1:{relay.udp}",
                 local_port=free_port(), variables={"serial": SERIAL, "domain": DOMAIN})
    assert phone.wait() == 0, phone.errors()
    assert pbx.wait() == 0, pbx.errors()
    # The call really carried SDP and a digest through the relay...
    assert "m=audio" in pbx.messages() and "Authorization: Digest" in pbx.messages()
    log = relay.log()
    assert "event=flow_open" in log  # debug logging was on
    metrics = relay.http("/metrics")
    for where, text in (("log", log), ("metrics", metrics)):
        for needle in ("v=0", "m=audio", "a=rtpmap", "c=IN IP4", "o=user", secret,
                       "Digest username", "response=", "nonce="):
            assert needle not in text, f"{needle!r} in the relay's {where}"
    state = _state_bytes(relay)
    for needle in (b"m=audio", b"a=rtpmap", secret.encode(), b"INVITE", b"pbxrelay-1-call"):
        assert needle not in state, f"{needle!r} on disk"
