"""A PBX that stops reading for a while keeps its connection and gets every message."""

from __future__ import annotations

import select
import socket
import time

from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import HOST, SERIAL, Pbx, assert_healthy, request, udp_socket

# ~1.4 MB: what a PBX receives in 2 s at ~250 calls/s; the old 512-message queue dropped it
MESSAGES = 1500


def test_pbx_pausing_two_seconds_under_load_is_not_disconnected(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    pbx.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # make the pause bite
    body = b"x" * 400
    with udp_socket() as phone:
        local = phone.getsockname()
        t0 = time.monotonic()
        for n in range(MESSAGES):  # stateless MESSAGEs: each one is forwarded to the PBX
            phone.sendto(request("MESSAGE", f"sip:100@{SERIAL}.{DOMAIN}", local=local, call_id=f"m{n}",
                                 extra=["Content-Type: text/plain"], body=body), (HOST, relay.udp))
            if n % 200 == 199:
                time.sleep(0.01)  # stay within the relay's UDP receive buffer
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))  # the PBX has not read for 2 s
    got = 0
    deadline = time.monotonic() + 20
    while got < MESSAGES and time.monotonic() < deadline:
        m = pbx.stream.recv(timeout=2)
        if m is None:
            break
        if m.start.startswith("MESSAGE "):
            got += 1
    assert got == MESSAGES, f"the PBX got {got} of {MESSAGES}: {relay.metrics()}"
    pbx.assert_bound()
    assert relay.metric('pbx_relay_pbx_unregistered_total{reason="flow_closed"}') == 0
    assert not select.select([pbx.stream.sock], [], [], 0)[0] or pbx.stream.recv(0.1) is None
    assert_healthy(relay)
