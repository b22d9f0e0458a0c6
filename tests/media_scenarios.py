"""SIPp scenarios that carry media: the phone plays a G.711 file with ``rtp_stream``.

Built from the blocks of ``tests/sipp_scenarios.py``; the SDP names SIPp's own
rtp_stream port (``[rtpstream_audio_port]``), so the RTP that SIPp sends comes
from the address its SDP announced and the relay can latch it. ``[$file]`` (the
raw A-law or µ-law file), its payload type and how long to stay in the call are
written into the XML: SIPp 3.6.1 takes no variables in ``rtp_stream``.
"""

from __future__ import annotations

import math
from pathlib import Path

from tests import sipp_scenarios as sc

RTPSTREAM_SDP = """v=0
o=user 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [rtpstream_audio_port] RTP/AVP {pt}
a=rtpmap:{pt} {codec}/8000
a=ptime:20
"""


def phone_plays_file(file: Path, pt: int, ms: int) -> str:
    """INVITE with SDP, 200, ACK, play ``file`` once (payload type ``pt``: 0 PCMU,
    8 PCMA), stay ``ms`` milliseconds in the call, BYE."""
    sdp = RTPSTREAM_SDP.format(pt=pt, codec={0: "PCMU", 8: "PCMA"}[pt])
    via, uri = sc.PHONE_VIA, sc.PHONE_URI
    invite = sc.send(f"""
INVITE {sc.PBX_URI} SIP/2.0
Via: {via}
From: <{uri}>;tag=inv[pid]
To: <{sc.PBX_URI}>
Call-ID: [call_id]
CSeq: 2 INVITE
Contact: <sip:201@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

{sdp}""", retrans=True)
    play = f"""  <nop>
    <action>
      <exec rtp_stream="{file},1,{pt}"/>
    </action>
  </nop>"""
    body = "\n".join([
        invite,
        sc.recv("100", optional=True),
        sc.recv("180", optional=True),
        sc.recv("200", rrs=True),
        sc._in_dialog("ACK", via, uri, 2),
        play,
        f'  <pause milliseconds="{ms}"/>',
        sc._in_dialog("BYE", via, uri, 4),
        sc.recv("200"),
    ])
    return sc.scenario("phone plays a file", body)


def pbx_answers_and_plays_file(file: Path, pt: int) -> str:
    """The PBX phones home (REGISTER with digest), answers the next INVITE with SDP
    naming its rtp_stream port, plays ``file`` once after the ACK, answers the BYE."""
    sdp = RTPSTREAM_SDP.format(pt=pt, codec={0: "PCMU", 8: "PCMA"}[pt])
    answer = sc.send(f"""
SIP/2.0 200 OK
[last_Via:]
[last_Record-Route:]
[last_From:]
[last_To:];tag=ans[pid]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:100@[local_ip]:[local_port];transport=[transport]>
Content-Type: application/sdp
Content-Length: [len]

{sdp}""")
    play = f"""  <nop>
    <action>
      <exec rtp_stream="{file},1,{pt}"/>
    </action>
  </nop>"""
    return sc.scenario("PBX plays a file", "\n".join([
        sc.PBX_PHONE_HOME,
        sc.recv("INVITE", rrs=True),
        sc._answer("180", "Ringing", "100"),
        answer,
        sc.recv("ACK"),
        play,
        sc.recv("BYE"),
        sc._ok_plain(),
    ]))


# ------------------------------------------------------------------ G.711
def _linear_to_alaw(sample: int) -> int:
    """ITU-T G.711 A-law of a 16-bit linear sample (no audioop: gone in Python 3.13)."""
    sign = 0x80 if sample >= 0 else 0x00
    if sample < 0:
        sample = -sample - 1
    sample = min(sample, 32767) >> 3  # 13-bit magnitude
    if sample < 32:
        code = sample >> 1
    else:
        seg = sample.bit_length() - 5  # 1..7
        code = (seg << 4) | ((sample >> seg) & 0x0F)
    return (code | sign) ^ 0x55


def write_alaw_tone(path: Path, packets: int, hz: float = 440.0) -> bytes:
    """``packets`` × 20 ms of a sine tone as raw A-law (8 kHz, 160 octets a packet)."""
    n = packets * 160
    pcm = [int(12000 * math.sin(2 * math.pi * hz * i / 8000)) for i in range(n)]
    data = bytes(_linear_to_alaw(s) for s in pcm)
    path.write_bytes(data)
    return data

