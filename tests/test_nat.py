"""End to end behind NAT: PBX and softphone each behind an nftables masquerade.

Topology (tests/netns/up.sh, namespaces private to this run)::

    phone 10.77.1.2 ── [nat1] 203.0.113.2   ──┐
                                              [pub]  relay 198.51.100.10
    pbx   10.77.2.2 ── [nat2] 203.0.113.130 ──┘

The relay runs in the public namespace, the SIPp PBX phones home over TCP from
behind NAT2, the SIPp softphone talks UDP from behind NAT1. Calls must complete
both ways and the relay must only ever know the PBX by its NATed address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import sipp_scenarios as sc
from tests.realpeers import DOMAIN, SIPP, RelayProc, SippRun, sipp, start_relay, stop_relay, write_config

NETNS_DIR = Path(__file__).resolve().parent / "netns"
SERIAL = "0123456789"
RELAY_IP = "198.51.100.10"
PHONE_IP, PHONE_NAT = "10.77.1.2", "203.0.113.2"
PBX_IP, PBX_NAT = "10.77.2.2", "203.0.113.130"
PRIVATE = "10.77."
SIPP_TIMEOUT = 15  # seconds per SIPp scenario (its own -timeout), plus a margin in wait()


def _why_skip() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "NAT test needs root (network namespaces, nftables)"
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        return f"NAT test needs {' and '.join(missing)} (iproute2, nftables)"
    if SIPP is None:
        return "sipp not installed (./dev.sh test installs it)"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.netns, pytest.mark.sipp, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@dataclass
class Topology:
    prefix: str
    phone: str
    nat1: str
    pub: str
    nat2: str
    pbx: str


def _in_ns(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    # Unique per run (pid), overridable; the scripts refuse anything but [A-Za-z0-9_.-].
    prefix = os.environ.get("PRT_NS_PREFIX", f"prt{os.getpid()}-")
    env = dict(os.environ, PRT_NS_PREFIX=prefix, NAT_MODE=os.environ.get("PRT_NAT_MODE", "masq"))
    t = Topology(prefix, *(f"{prefix}{r}" for r in ("phone", "nat1", "pub", "nat2", "pbx")))
    try:
        up = subprocess.run([str(NETNS_DIR / "up.sh")], env=env, capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield t
    finally:
        subprocess.run([str(NETNS_DIR / "down.sh")], env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def nat_relay(topo: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    state = tmp_path_factory.mktemp("nat-relay")
    # A fresh namespace: every port is free, so the default port plan is used.
    r = RelayProc(state, RELAY_IP, 5060, 5060, 5061, 9090, netns=topo.pub)
    write_config(r)
    r.add_pbx(SERIAL)
    try:
        start_relay(r)
        yield r
    finally:
        stop_relay(r)  # by the Popen's PID (ip netns exec execs the relay itself)


@pytest.fixture
def launched() -> Iterator[list[SippRun]]:
    """Every SIPp this test started; those still running at the end are killed by PID."""
    runs: list[SippRun] = []
    yield runs
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=5)


def _pbx(relay: RelayProc, topo: Topology, tmp: Path, xml: str, port: int) -> SippRun:
    return sipp(tmp, "pbx", xml, f"{RELAY_IP}:{relay.tcp}", transport="t1", local_ip=PBX_IP,
                local_port=port, variables={"serial": SERIAL, "domain": DOMAIN},
                auth=(SERIAL, relay.secrets[SERIAL]), netns=topo.pbx, timeout_s=SIPP_TIMEOUT)


def _phone(relay: RelayProc, topo: Topology, tmp: Path, xml: str, port: int) -> SippRun:
    return sipp(tmp, "phone", xml, f"{RELAY_IP}:{relay.udp}", transport="u1", local_ip=PHONE_IP,
                local_port=port, variables={"serial": SERIAL, "domain": DOMAIN},
                netns=topo.phone, timeout_s=SIPP_TIMEOUT)


def _call(relay: RelayProc, topo: Topology, tmp: Path, launched: list[SippRun],
          pbx_xml: str, phone_xml: str, pbx_port: int, phone_port: int) -> tuple[SippRun, SippRun]:
    pbx = _pbx(relay, topo, tmp, pbx_xml, pbx_port)
    launched.append(pbx)
    reg = relay.wait_registered(SERIAL)
    # The registry knows the PBX by its NATed address only.
    assert reg["transport"] == "tcp"
    assert reg["ip"] == PBX_NAT, reg
    assert PRIVATE not in json.dumps(relay.registry())
    phone = _phone(relay, topo, tmp, phone_xml, phone_port)
    launched.append(phone)
    rc_phone = phone.wait(timeout=SIPP_TIMEOUT + 5)
    rc_pbx = pbx.wait(timeout=SIPP_TIMEOUT + 5)
    assert (rc_phone, rc_pbx) == (0, 0), (
        f"phone={rc_phone} pbx={rc_pbx}\n{phone.errors()}\n{pbx.errors()}\n"
        f"--- relay log\n{relay.log()[-4000:]}")
    assert relay.alive(), relay.log()
    return pbx, phone


# Counters that would move if the relay sent (or tried to send) anywhere but an
# existing flow: a UDP sendto() towards a private or host address fails with
# "network unreachable" here (no route out of the public namespace) and is counted.
BAD_COUNTERS = ("send_errors_total", "dropped_total", "forbidden_total", "flow_failed_total",
                "internal_errors_total", "invite_timeouts_total", "parse_errors_total")


def _assert_no_private_pbx_binding(relay: RelayProc) -> None:
    for r in relay.registry():
        assert PRIVATE not in str(r), r
    log = relay.log()
    assert PRIVATE not in log, [line for line in log.splitlines() if PRIVATE in line]
    bad = {k: v for k, v in relay.metrics().items()
           if v and k.removeprefix("pbx_relay_").startswith(BAD_COUNTERS)}
    assert not bad, f"{bad}\n--- relay log\n{log[-4000:]}"


def test_topology_has_no_way_out(topo: Topology) -> None:
    """The namespaces are linked only to each other: nothing can reach the host network."""
    assert _in_ns(topo.pub, "ip", "route", "show", "default").stdout.strip() == ""
    # The host's own network (192.0.2.0/24 here) and the private networks behind the
    # NATs are unreachable from the relay's namespace.
    for dst in ("192.0.2.1", "8.8.8.8", PHONE_IP, PBX_IP):
        out = _in_ns(topo.pub, "ip", "route", "get", dst)
        assert out.returncode != 0 and "unreachable" in out.stderr, (dst, out.stdout, out.stderr)
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    for ifname in ("prph0", "prn1in", "prn1out", "prpub1", "prpbx0", "prn2in", "prn2out", "prpub2"):
        assert f" {ifname}@" not in host_links and f" {ifname}:" not in host_links


def test_phone_calls_pbx_through_nat(nat_relay: RelayProc, topo: Topology, tmp_path: Path,
                                     launched: list[SippRun]) -> None:
    pbx, _ = _call(nat_relay, topo, tmp_path, launched, sc.pbx_answers_phone(), sc.phone_calls_pbx(),
                   pbx_port=5070, phone_port=5080)
    # RFC 3581: the phone's REGISTER reached the PBX with the phone's NATed source recorded.
    assert f"received={PHONE_NAT}" in pbx.messages()
    _assert_no_private_pbx_binding(nat_relay)


def test_pbx_calls_phone_through_nat(nat_relay: RelayProc, topo: Topology, tmp_path: Path,
                                     launched: list[SippRun]) -> None:
    # New source ports: the previous run's TCP connection may still be in TIME_WAIT.
    _call(nat_relay, topo, tmp_path, launched, sc.pbx_calls_phone(), sc.phone_answers_pbx(),
          pbx_port=5071, phone_port=5081)
    _assert_no_private_pbx_binding(nat_relay)
    assert nat_relay.metric("pbx_relay_requests_forwarded_total") >= 8
