"""Media resources a stranger must not be able to take."""

from __future__ import annotations

import time

from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import HOST, SERIAL, Pbx, assert_healthy, request, udp_socket

SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       + b"".join(b"m=audio %d RTP/AVP 0\r\n" % (4000 + 2 * n) for n in range(16)))


def test_ack_with_sdp_outside_any_call_binds_no_port(relay: RelayProc) -> None:
    pbx = Pbx(relay)
    with udp_socket() as s:
        for n in range(50):
            s.sendto(request("ACK", f"sip:100@{SERIAL}.{DOMAIN}", local=s.getsockname(),
                             call_id=f"ack{n}", extra=["Content-Type: application/sdp"], body=SDP),
                     (HOST, relay.udp))
    time.sleep(0.3)
    m = relay.metrics()
    assert m.get("pbx_relay_media_ports_in_use", 0) == 0 and m.get("pbx_relay_media_sessions", 0) == 0
    assert m['pbx_relay_dropped_total{reason="ack_sdp_without_session"}'] == 50
    pbx.assert_nothing_received()
    assert_healthy(relay)
