"""SIPp scenarios for the PBX and the softphone, built from small blocks.

SIPp maps an incoming request to a call by Call-ID. The PBX (a UAC that
registers) and the phone must therefore see each other's requests in *their*
call 1: both run with ``-cid_str CALL_ID_FORMAT`` so that call 1 of each has
the same Call-ID, and every scenario is one SIPp call. ``[$serial]`` and
``[$domain]`` come from ``-set``; the digest user/secret from ``-au``/``-ap``.
"""

from __future__ import annotations

CALL_ID_FORMAT = "pbxrelay-%u-call"

SDP = """v=0
o=user 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""


def scenario(name: str, *blocks: str) -> str:
    body = "\n".join(blocks)
    return (
        f'<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="{name}">\n'
        f'  <Global variables="serial,domain" />\n{body}\n</scenario>\n'
    )


def send(msg: str, retrans: bool = False) -> str:
    """Content-Length is the last header of every template: the lines above it
    that an empty placeholder left blank are dropped, the body follows it."""
    lines = msg.strip().split("\n")
    cl = next(i for i, line in enumerate(lines) if line.startswith("Content-Length"))
    head = [line for line in lines[: cl + 1] if line.strip()]
    body = "\n".join(lines[cl + 1 :]).strip("\n")
    text = "\n".join(head) + "\n\n" + (body + "\n" if body else "")
    r = ' retrans="500"' if retrans else ""
    return f"  <send{r}>\n    <![CDATA[\n{text}\n    ]]>\n  </send>"


def recv(what: str, *, optional: bool = False, rrs: bool = False, extra: str = "", auth: bool = False) -> str:
    kind = "response" if what.isdigit() else "request"
    attrs = f'{kind}="{what}"'
    if optional:
        attrs += ' optional="true"'
    if rrs:
        attrs += ' rrs="true"'
    if auth:
        attrs += ' auth="true"'
    if extra:
        return f"  <recv {attrs}>\n    <action>\n{extra}\n    </action>\n  </recv>"
    return f"  <recv {attrs}/>"


def pause(ms: int) -> str:
    return f'  <pause milliseconds="{ms}"/>'


def _pbx_register(cseq: int, auth: bool) -> str:
    return send(f"""
REGISTER sip:[$serial]@[$domain] SIP/2.0
Via: SIP/2.0/TCP [local_ip]:[local_port];branch=[branch]
From: <sip:[$serial]@[$domain]>;tag=pbx[pid]
To: <sip:[$serial]@[$domain]>
Call-ID: [call_id]
CSeq: {cseq} REGISTER
Contact: <sip:[$serial]@[local_ip]:[local_port];transport=tcp>
{"[authentication]" if auth else ""}
Max-Forwards: 70
Expires: 600
Content-Length: 0
""")


PBX_PHONE_HOME = "\n".join([
    _pbx_register(1, False), recv("401", auth=True), _pbx_register(2, True), recv("200"),
])

# The PBX as registrar for its extensions: answers the phone's REGISTER (which
# the relay forwarded with a Path) and remembers Path and Contact.
def pbx_accept_phone_register(remember: bool = False) -> str:
    """``remember``: keep the phone's Path and Contact in $path / $contact
    (SIPp refuses a variable that is set but never used)."""
    capture = """
      <ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="Path:" assign_to="path"/>
      <ereg regexp="sip:[^&gt;;]*" search_in="hdr" header="Contact:" assign_to="contact"/>"""
    return "\n".join([recv("REGISTER", extra=capture if remember else ""), send("""
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


def phone_register(transport: str = "UDP") -> str:
    return "\n".join([send(f"""
REGISTER sip:[$serial].[$domain] SIP/2.0
Via: SIP/2.0/{transport} [local_ip]:[local_port];branch=[branch];rport
From: <sip:201@[$serial].[$domain]>;tag=ph[pid]
To: <sip:201@[$serial].[$domain]>
Call-ID: [call_id]
CSeq: 1 REGISTER
Contact: <sip:201@[local_ip]:[local_port]>
Supported: path
Max-Forwards: 70
Expires: 300
Content-Length: 0
""", retrans=True), recv("200")])


def _uac_invite(via: str, from_uri: str, to_uri: str, ruri: str, cseq: int, route: str = "") -> str:
    return send(f"""
INVITE {ruri} SIP/2.0
Via: {via}
{route}
From: <{from_uri}>;tag=inv[pid]
To: <{to_uri}>
Call-ID: [call_id]
CSeq: {cseq} INVITE
Contact: <sip:{from_uri.split(':', 1)[1].split('@')[0]}@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

{SDP}""", retrans=True)


def _in_dialog(method: str, via: str, from_uri: str, cseq: int, body: bool = False) -> str:
    sdp = f"Content-Type: application/sdp\nContent-Length: [len]\n\n{SDP}" if body else "Content-Length: 0\n"
    return send(f"""
{method} [next_url] SIP/2.0
Via: {via}
[routes]
From: <{from_uri}>;tag=inv[pid]
[last_To:]
Call-ID: [call_id]
CSeq: {cseq} {method}
Contact: <sip:{from_uri.split(':', 1)[1].split('@')[0]}@[local_ip]:[local_port]>
Max-Forwards: 70
{sdp}""", retrans=method != "ACK")


def _answer(code: str, reason: str, user: str, body: bool = False, rr: bool = True) -> str:
    sdp = f"Content-Type: application/sdp\nContent-Length: [len]\n\n{SDP}" if body else "Content-Length: 0\n"
    return send(f"""
SIP/2.0 {code} {reason}
[last_Via:]
{"[last_Record-Route:]" if rr else ""}
[last_From:]
[last_To:];tag=ans[pid]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:{user}@[local_ip]:[local_port];transport=[transport]>
{sdp}""")


def _ok_plain() -> str:
    return send("""
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0
""")


PHONE_VIA = "SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport"
PBX_VIA = "SIP/2.0/TCP [local_ip]:[local_port];branch=[branch]"
PHONE_URI = "sip:201@[$serial].[$domain]"
PBX_URI = "sip:100@[$serial].[$domain]"


def uas_answers(user: str, *, reinvite: bool = False) -> str:
    """Receive an INVITE, ring, answer; the caller ends the dialog with BYE."""
    steps = [
        recv("INVITE", rrs=True),
        _answer("180", "Ringing", user),
        _answer("200", "OK", user, body=True),
        recv("ACK"),
    ]
    if reinvite:
        steps += [recv("INVITE"), _answer("200", "OK", user, body=True, rr=False), recv("ACK")]
    steps += [recv("BYE"), _ok_plain()]
    return "\n".join(steps)


def uac_calls(*, via: str, from_uri: str, to_uri: str, ruri: str, route: str = "",
              reinvite: bool = False) -> str:
    steps = [
        _uac_invite(via, from_uri, to_uri, ruri, 2, route),
        recv("100", optional=True),
        recv("180", optional=True),
        recv("200", rrs=True),
        _in_dialog("ACK", via, from_uri, 2),
    ]
    if reinvite:
        steps += [pause(100), _in_dialog("INVITE", via, from_uri, 3, body=True),
                  recv("100", optional=True), recv("200"), _in_dialog("ACK", via, from_uri, 3)]
    steps += [pause(200), _in_dialog("BYE", via, from_uri, 4), recv("200")]
    return "\n".join(steps)


def phone_calls_pbx(**kw: bool) -> str:
    return scenario("phone calls PBX", phone_register(), uac_calls(
        via=PHONE_VIA, from_uri=PHONE_URI, to_uri=PBX_URI, ruri=PBX_URI, **kw))


def pbx_answers_phone(**kw: bool) -> str:
    return scenario("PBX answers", PBX_PHONE_HOME, pbx_accept_phone_register(), uas_answers("100", **kw))


def pbx_calls_phone(**kw: bool) -> str:
    return scenario("PBX calls phone", PBX_PHONE_HOME, pbx_accept_phone_register(True), uac_calls(
        via=PBX_VIA, from_uri=PBX_URI, to_uri=PHONE_URI, ruri="[$contact]", route="Route: [$path]", **kw))


def phone_answers_pbx(**kw: bool) -> str:
    return scenario("phone answers", phone_register(), uas_answers("201", **kw))


def pbx_rings_then_cancelled() -> str:
    """Ring; on CANCEL answer 200 and end the INVITE with 487 (RFC 3261 §9.2)."""
    return scenario("PBX cancelled", PBX_PHONE_HOME, pbx_accept_phone_register(), "\n".join([
        # SIPp's [last_Via:] would give the CANCEL's single Via: keep both of the INVITE's.
        recv("INVITE", extra="""
      <ereg regexp=".*" search_in="hdr" header="Via:" occurrence="1" assign_to="via1"/>
      <ereg regexp=".*" search_in="hdr" header="Via:" occurrence="2" assign_to="via2"/>"""),
        _answer("180", "Ringing", "100"),
        recv("CANCEL"),
        _ok_plain(),
        send("""
SIP/2.0 487 Request Terminated
Via: [$via1]
Via: [$via2]
[last_From:]
[last_To:];tag=ans[pid]
[last_Call-ID:]
CSeq: 2 INVITE
Content-Length: 0
"""),
        recv("ACK"),
    ]))


def phone_calls_then_cancels() -> str:
    return scenario("phone cancels", phone_register(), "\n".join([
        _uac_invite(PHONE_VIA, PHONE_URI, PBX_URI, PBX_URI, 2),
        recv("100", optional=True),
        recv("180"),
        send(f"""
CANCEL {PBX_URI} SIP/2.0
[last_Via:]
From: <{PHONE_URI}>;tag=inv[pid]
To: <{PBX_URI}>
Call-ID: [call_id]
CSeq: 2 CANCEL
Max-Forwards: 70
Content-Length: 0
""", retrans=True),
        recv("200"),
        recv("487"),
        send(f"""
ACK {PBX_URI} SIP/2.0
[last_Via:]
From: <{PHONE_URI}>;tag=inv[pid]
[last_To:]
Call-ID: [call_id]
CSeq: 2 ACK
Max-Forwards: 70
Content-Length: 0
"""),
        pause(300),
    ]))
