"""The shell's loops: an idle relay sleeps, and a busy TCP peer is never taken for a stalled one."""

from __future__ import annotations

import os
import socket
import time

from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import HOST, request

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def test_an_idle_relay_does_not_spin(relay: RelayProc) -> None:
    """The timer task waits for its next deadline (it once woke itself for ever: 97 % of a core)."""
    assert relay.proc is not None
    time.sleep(1.0)
    before = cpu_seconds(relay.proc.pid)
    time.sleep(3.0)
    used = cpu_seconds(relay.proc.pid) - before
    assert used < 0.5, f"an idle relay used {used:.2f} s of CPU in 3 s"


def test_a_busy_peer_whose_reads_end_mid_message_is_not_cut(relay_factory) -> None:  # type: ignore[no-untyped-def]
    """partial_message_timeout judges a peer that completes nothing, not every read that
    ends inside a message (a busy PBX trunk's do, all the time)."""
    relay: RelayProc = relay_factory("partial_message_timeout = 1.0\n")
    with socket.create_connection((HOST, relay.tcp), timeout=5) as s:
        local = s.getsockname()
        sent = 0
        carry = b""
        deadline = time.monotonic() + 4.0  # four partial timeouts
        while time.monotonic() < deadline:
            msg = request("OPTIONS", f"sip:{DOMAIN}", transport="TCP", local=local)
            data = carry + msg
            cut = len(data) - len(msg) // 2  # every write ends half-way into a message
            s.sendall(data[:cut])
            carry = data[cut:]
            sent += 1
            time.sleep(0.05)
        s.sendall(carry)
        got = b""
        while got.count(b"SIP/2.0 200 ") < sent:
            chunk = s.recv(65536)
            assert chunk, f"the relay closed the connection after {got.count(b'SIP/2.0 200 ')} of {sent}"
            got += chunk
    assert relay.metric('pbx_relay_flows_closed_total{reason="partial_message"}') == 0
