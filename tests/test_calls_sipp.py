"""SIPp plays the PBX and the softphone; calls go through a real relay process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests import sipp_scenarios as sc
from tests.conftest import needs_sipp
from tests.realpeers import DOMAIN, RelayProc, TlsPipe, free_port, sipp

pytestmark = [needs_sipp, pytest.mark.sipp]
SERIAL = "0123456789"


def _pbx(relay: RelayProc, tmp: Path, xml: str, name: str = "pbx"):  # type: ignore[no-untyped-def]
    return sipp(tmp, name, xml, f"127.0.0.1:{relay.tcp}", transport="t1",
                local_port=free_port(), variables={"serial": SERIAL, "domain": DOMAIN},
                auth=(SERIAL, relay.secrets[SERIAL]))


def _phone(relay: RelayProc, tmp: Path, xml: str, name: str = "phone"):  # type: ignore[no-untyped-def]
    return sipp(tmp, name, xml, f"127.0.0.1:{relay.udp}", transport="u1",
                local_port=free_port(), variables={"serial": SERIAL, "domain": DOMAIN})


def _run_pair(relay: RelayProc, tmp: Path, pbx_xml: str, phone_xml: str) -> None:
    pbx = _pbx(relay, tmp, pbx_xml)
    reg = relay.wait_registered(SERIAL)
    assert reg["transport"] == "tcp"
    phone = _phone(relay, tmp, phone_xml)
    rc_phone = phone.wait()
    rc_pbx = pbx.wait()
    assert (rc_phone, rc_pbx) == (0, 0), f"phone={rc_phone} pbx={rc_pbx}\n{phone.errors()}\n{pbx.errors()}"
    assert relay.alive()


def test_phone_calls_pbx_bye_from_phone(relay: RelayProc, tmp_path: Path) -> None:
    _run_pair(relay, tmp_path, sc.pbx_answers_phone(), sc.phone_calls_pbx())
    m = relay.metrics()
    assert m['pbx_relay_requests_forwarded_total'] >= 4  # REGISTER, INVITE, ACK, BYE


def test_pbx_calls_phone_bye_from_pbx(relay: RelayProc, tmp_path: Path) -> None:
    _run_pair(relay, tmp_path, sc.pbx_calls_phone(), sc.phone_answers_pbx())


def test_reinvite_inside_the_dialog(relay: RelayProc, tmp_path: Path) -> None:
    _run_pair(relay, tmp_path, sc.pbx_answers_phone(reinvite=True), sc.phone_calls_pbx(reinvite=True))
    # The re-INVITE was forwarded like the first one, and every transaction ended.
    assert relay.metric("pbx_relay_requests_in_total{method=\"INVITE\"}") == 2


def test_cancel_before_answer(relay: RelayProc, tmp_path: Path) -> None:
    _run_pair(relay, tmp_path, sc.pbx_rings_then_cancelled(), sc.phone_calls_then_cancels())
    assert relay.metric("pbx_relay_cancels_forwarded_total") == 1


def test_pbx_over_tls_both_directions(relay: RelayProc, tmp_path: Path) -> None:
    """SIPp has no TLS: a local pipe carries its TCP into a real TLS connection."""
    for n, (pbx_xml, phone_xml) in enumerate([
        (sc.pbx_answers_phone(), sc.phone_calls_pbx()),
        (sc.pbx_calls_phone(), sc.phone_answers_pbx()),
    ]):
        pipe = TlsPipe(("127.0.0.1", relay.tls))
        pbx = sipp(tmp_path, f"pbx{n}", pbx_xml, f"127.0.0.1:{pipe.port}", transport="t1",
                   local_port=free_port(), variables={"serial": SERIAL, "domain": DOMAIN},
                   auth=(SERIAL, relay.secrets[SERIAL]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            regs = [r for r in relay.registry() if r["serial"] == SERIAL and r["transport"] == "tls"]
            if regs:
                break
            time.sleep(0.05)
        assert regs, "PBX did not register over TLS"
        assert pipe.tls_version in ("TLSv1.2", "TLSv1.3")
        phone = _phone(relay, tmp_path, phone_xml, name=f"phone{n}")
        assert phone.wait() == 0, phone.errors()
        assert pbx.wait() == 0, pbx.errors()
        pipe.close()
