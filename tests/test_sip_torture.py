"""RFC 4475 torture messages through parse_message and StreamFramer.

tests/data/torture/index.tsv says, per file, what the RFC's text judges it; the
tables below say what *this parser* does with each and why.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from relay.sip import (
    FramingLost,
    Invalid,
    Ping,
    Request,
    Response,
    SipMessage,
    SipParseError,
    SipUri,
    StreamFramer,
    parse_message,
)
from relay.sip.framer import StreamEvent

TORTURE = Path(__file__).parent / "data" / "torture"


def _index() -> dict[str, dict[str, str]]:
    with (TORTURE / "index.tsv").open(newline="", encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


INDEX = _index()
VALID = sorted(name for name, row in INDEX.items() if row["class"] == "valid")
INVALID = sorted(name for name, row in INDEX.items() if row["class"] == "invalid")

# Invalid per RFC 4475, but the RFC lets an element accept them, and the parser
# does; who deals with what is left:
LIBERAL = {
    # §3.1.2.11: "respond 400, or ignore the escaped headers". The parser keeps
    # the Request-URI as written; the proxy answers 400 (it never forwards URI headers).
    "escruri.dat",
    # §3.1.2.12: an element "SHOULD NOT" reject for a bad Date unless it uses the
    # Date; a proxy does not.
    "baddate.dat",
    # §3.1.2.14: "must not break; respond 400 (or ignore the spaces)": the spaces
    # inside <...> are stripped.
    "badaspec.dat",
}

# Invalid responses: the status does not matter (a broken response is dropped,
# never answered), only that it is refused.
DROPPED_RESPONSES = {"scalarlg.dat", "bigcode.dat"}


def data(name: str) -> bytes:
    return (TORTURE / name).read_bytes()


def test_index_lists_exactly_the_49_files() -> None:
    on_disk = {p.name for p in TORTURE.glob("*.dat")}
    assert set(INDEX) == on_disk
    assert len(on_disk) == 49
    assert {row["class"] for row in INDEX.values()} == {"valid", "invalid"}
    assert {row["kind"] for row in INDEX.values()} == {"request", "response"}


def test_sha256sums_match() -> None:
    """The octets are the test: nobody may re-save these files."""
    sums: dict[str, str] = {}
    for line in (TORTURE / "SHA256SUMS").read_text(encoding="ascii").splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    assert set(sums) == set(INDEX)
    for name, digest in sums.items():
        assert hashlib.sha256(data(name)).hexdigest() == digest, name


def test_corpus_keeps_its_control_octets() -> None:
    # a quick tell for an editor having "fixed" line ends or stripped NULs
    assert b"\x00" in data("mpart01.dat")
    assert all(b"\r\n" in data(n) for n in INDEX)
    lone_lf = [n for n in INDEX if data(n).replace(b"\r\n", b"").count(b"\n") and n != "mpart01.dat"]
    assert lone_lf == []


# -- parse_message (one UDP datagram per file) ------------------------------------


@pytest.mark.parametrize("name", VALID)
def test_valid_message_parses(name: str) -> None:
    raw = data(name)
    m = parse_message(raw, datagram=True)
    expected_type = Request if INDEX[name]["kind"] == "request" else Response
    assert isinstance(m, expected_type)
    out = m.serialise()
    if name == "dblreq.dat":
        assert raw.startswith(out) and len(out) < len(raw)
    else:
        # every header, fold and odd octet goes out again as it came in
        assert out == raw


@pytest.mark.parametrize("name", INVALID)
def test_invalid_message_is_refused_or_liberally_accepted(name: str) -> None:
    raw = data(name)
    codes = INDEX[name]["rfc_codes"]
    if name in LIBERAL:
        m = parse_message(raw, datagram=True)
        assert m.serialise() == raw
        return
    with pytest.raises(SipParseError) as info:
        parse_message(raw, datagram=True)
    e = info.value
    if name in DROPPED_RESPONSES:
        assert codes == "none"
        assert e.message is None  # nothing to answer
        return
    allowed = {int(c) for c in codes.split("/")}
    assert e.status in allowed, (name, e.reason)
    assert e.status in (400, 505)
    # a request error carries enough to answer it with e.status
    assert isinstance(e.message, Request), (name, e.reason)


def test_the_liberal_set_is_the_rfc_s_liberal_set() -> None:
    for name in LIBERAL:
        assert INDEX[name]["class"] == "invalid"
        assert "or " in INDEX[name]["proxy_must"] or "should not" in INDEX[name]["proxy_must"]


@pytest.mark.parametrize("name", sorted(INDEX))
def test_never_any_other_exception(name: str) -> None:
    raw = data(name)
    for datagram in (True, False):
        try:
            parse_message(raw, datagram=datagram)
        except SipParseError:
            pass


# -- what was parsed, file by file ------------------------------------------------


def test_wsinv_whitespace_everywhere() -> None:
    m = parse_message(data("wsinv.dat"))
    assert isinstance(m, Request)
    assert m.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert m.to().tag == "1918181833n"
    assert m.from_().tag == "98asjd8"
    assert m.from_().display == '"J Rosenberg \\\\\\""'
    assert m.cseq == (9, "INVITE")
    assert m.get("max-forwards") == "0068"
    assert [v.branch for v in m.vias()] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert [v.transport for v in m.vias()] == ["UDP", "TCP", "UDP"]
    assert m.vias()[1].host == "spindle.example.com"
    assert m.get("newfangledheader") == "newfangled value continued newfangled value"
    assert m.get("unknownheaderwithunusualvalue") == ";;,,;;,;"
    assert m.get("subject") == ""
    contact = m.get_all("contact")
    assert len(contact) == 1
    assert contact[0].startswith('"Quoted string \\"\\"" <sip:jdrosen@example.com>')
    assert len(m.body) == 150


def test_intmeth_unusual_method_and_uri() -> None:
    m = parse_message(data("intmeth.dat"))
    assert isinstance(m, Request)
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert m.cseq[0] == 139122385
    assert m.uri.startswith("sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1")


def test_escnull_keeps_both_contacts_whole() -> None:
    m = parse_message(data("escnull.dat"))
    assert m.get_all("contact") == ["<sip:%00@host5.example.com>",
                                    "<sip:%00%00@host5.example.com>"]
    assert m.to().uri == "sip:null-%00-null@example.com"


def test_dblreq_trailing_octets_are_not_forwarded() -> None:
    m = parse_message(data("dblreq.dat"))
    assert isinstance(m, Request)
    assert m.method == "REGISTER"
    assert m.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"  # "I:" compact, upper case
    assert m.body == b""
    assert b"INVITE" not in m.serialise()


def test_semiuri_user_part_holds_the_semicolon() -> None:
    m = parse_message(data("semiuri.dat"))
    assert isinstance(m, Request)
    uri = SipUri.parse(m.uri)
    assert (uri.user, uri.host) == ("user;par=u%40example.net", "example.com")
    assert m.get_all("accept") == [
        "application/sdp", "application/pkcs7-mime", "multipart/mixed", "multipart/signed",
        "message/sip", "message/sipfrag",
    ]


def test_lwsdisp_display_name_without_space() -> None:
    m = parse_message(data("lwsdisp.dat"))
    assert m.from_().display == "caller"
    assert m.from_().uri == "sip:caller@example.com"


def test_longreq_long_values_and_many_vias() -> None:
    raw = data("longreq.dat")
    m = parse_message(raw)
    vias = m.vias()
    assert len(vias) == 34
    assert vias[0].host == "sip33.example.com"
    assert vias[-2].host == "sip1.example.com"
    assert vias[-1].host == "host.example.com"
    assert (vias[-1].branch or "").startswith("verylonglong")
    assert vias[-1].params["received"] == "192.0.2.5"
    assert m.call_id.startswith("longreq.one") and m.call_id.endswith("longcallid")
    assert m.from_().tag is not None and len(m.from_().tag or "") > 100


def test_mpart01_binary_body_framed_by_content_length() -> None:
    m = parse_message(data("mpart01.dat"))
    assert len(m.body) == 553
    assert b"\x00" in m.body
    assert m.body.endswith(b"--7a9cbec02ceef655--\r\n")


def test_unreason_utf8_reason_phrase() -> None:
    m = parse_message(data("unreason.dat"))
    assert isinstance(m, Response)
    assert m.status == 200
    assert m.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"


def test_noreason_empty_reason_phrase() -> None:
    m = parse_message(data("noreason.dat"))
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (100, "")


def test_transports_unknown_transport_kept() -> None:
    m = parse_message(data("transports.dat"))
    assert [v.transport for v in m.vias()] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def test_esc01_escapes_kept_as_written() -> None:
    m = parse_message(data("esc01.dat"))
    assert isinstance(m, Request)
    assert m.uri == "sip:sips%3Auser%40example.com@example.net"
    # Contact value sits on a continuation line
    assert m.get_all("contact") == [
        "<sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>"]


@pytest.mark.parametrize("name", ["unkscm.dat", "novelsc.dat"])
def test_unknown_scheme_parses_and_is_416_for_the_proxy(name: str) -> None:
    m = parse_message(data(name))
    assert isinstance(m, Request)
    with pytest.raises(SipParseError) as info:
        SipUri.parse(m.uri)
    assert info.value.status == 416


def test_escruri_keeps_the_escaped_headers_for_the_proxy_to_refuse() -> None:
    m = parse_message(data("escruri.dat"))
    assert isinstance(m, Request)
    assert SipUri.parse(m.uri).headers == "Route=%3Csip:example.com%3E"
    # nothing was turned into a header
    assert m.get_all("route") == []


def test_badaspec_spaces_inside_brackets_ignored() -> None:
    m = parse_message(data("badaspec.dat"))
    assert m.to().uri == "sip:t.watson@example.org"
    assert m.to().display == '"Watson, Thomas"'


def test_baddate_date_kept_untouched() -> None:
    m = parse_message(data("baddate.dat"))
    assert m.get("date") == "Fri, 01 Jan 2010 16:00:00 EST"


def test_cparam_contact_vs_uri_parameter() -> None:
    from relay.sip.headers import NameAddr

    c1 = NameAddr.parse(parse_message(data("cparam01.dat")).get_all("contact")[0])
    assert c1.uri == "sip:+19725552222@gw1.example.net"
    assert c1.params == {"unknownparam": None}
    c2 = NameAddr.parse(parse_message(data("cparam02.dat")).get_all("contact")[0])
    assert c2.uri == "sip:+19725552222@gw1.example.net;unknownparam"
    assert c2.params == {}


def test_regescrt_escaped_route_stays_in_the_contact_uri() -> None:
    m = parse_message(data("regescrt.dat"))
    assert m.get_all("contact") == ["<sip:user@example.com?Route=%3Csip:sip.example.com%3E>"]
    assert m.get_all("route") == []


def test_inv2543_without_content_length_on_udp() -> None:
    raw = data("inv2543.dat")
    m = parse_message(raw, datagram=True)
    assert not m.has("content-length") and not m.has("max-forwards")
    assert m.body == raw[raw.index(b"\r\n\r\n") + 4 :]
    assert m.top_via().branch is None
    assert m.from_().tag is None


def test_zeromf_and_bcast_parse_for_the_proxy_to_judge() -> None:
    assert parse_message(data("zeromf.dat")).get("max-forwards") == "0"
    bcast = parse_message(data("bcast.dat"))
    assert [v.host for v in bcast.vias()] == ["192.0.2.198", "255.255.255.255"]


@pytest.mark.parametrize(("name", "status"), [
    ("badvers.dat", 505), ("scalar02.dat", 400), ("clerr.dat", 400), ("ncl.dat", 400),
    ("mcl01.dat", 400), ("multi01.dat", 400), ("insuf.dat", 400), ("mismatch01.dat", 400),
    ("mismatch02.dat", 400), ("ltgtruri.dat", 400), ("lwsruri.dat", 400),
    ("lwsstart.dat", 400), ("trws.dat", 400), ("quotbal.dat", 400), ("regbadct.dat", 400),
    ("baddn.dat", 400), ("badinv01.dat", 400),
])
def test_invalid_request_status(name: str, status: int) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(data(name))
    assert info.value.status == status


# -- StreamFramer (one TCP connection per file) -------------------------------------


def _frame(chunks: list[bytes]) -> tuple[list[StreamEvent], FramingLost | None, int]:
    framer = StreamFramer()
    events: list[StreamEvent] = []
    try:
        for chunk in chunks:
            events.extend(framer.feed(chunk))
        events.extend(framer.feed(b""))
    except FramingLost as e:
        return events, e, framer.buffered
    return events, None, framer.buffered


def _wire(events: list[StreamEvent]) -> list[object]:
    out: list[object] = []
    for e in events:
        if isinstance(e, SipMessage):
            out.append(e.serialise())
        elif isinstance(e, Ping):
            out.append("ping")
        else:
            assert isinstance(e, Invalid)
            assert isinstance(e.error, SipParseError)
            out.append(("invalid", e.error.status))
    return out


# What a TCP peer sending each file alone gets: a message, an Invalid event
# (framing intact, the message is answered), nothing yet (waiting for more
# octets) or FramingLost (the connection is closed).
STREAM_OUTCOME = {
    "clerr.dat": "waits",  # Content-Length 9999: wait for the body, time out
    "baddn.dat": "waits",  # no empty line yet
    "ncl.dat": "lost",
    "mcl01.dat": "lost",
    "inv2543.dat": "lost",  # no Content-Length is fatal on a stream (§18.3 / §20.14)
    "dblreq.dat": "lost",  # two messages, then "C\r\n\r\n" garbage past the INVITE's body
}


@pytest.mark.parametrize("name", sorted(INDEX))
def test_framer_whole_and_byte_by_byte_agree(name: str) -> None:
    raw = data(name)
    whole = _frame([raw])
    bytewise = _frame([raw[i : i + 1] for i in range(len(raw))])
    assert _wire(whole[0]) == _wire(bytewise[0])
    assert (whole[1] is None) == (bytewise[1] is None)
    events, lost, buffered = whole
    outcome = STREAM_OUTCOME.get(name)
    if outcome == "waits":
        assert (events, lost, buffered) == ([], None, len(raw))
    elif outcome == "lost":
        assert lost is not None
    else:
        assert lost is None
        assert len(events) == 1
        assert buffered == 0
        valid = INDEX[name]["class"] == "valid" or name in LIBERAL
        if valid:
            assert isinstance(events[0], SipMessage)
            assert events[0].serialise() == raw
        else:
            assert isinstance(events[0], Invalid)


def test_framer_dblreq_is_two_messages_on_a_stream() -> None:
    events, lost, _ = _frame([data("dblreq.dat")])
    assert [type(e) for e in events] == [Request, Request]
    assert [e.method for e in events if isinstance(e, Request)] == ["REGISTER", "INVITE"]
    assert lost is not None


def test_framer_survives_the_whole_corpus_on_one_connection() -> None:
    """Valid files back to back on one stream all come out (framing never breaks)."""
    names = [n for n in sorted(INDEX) if n not in STREAM_OUTCOME]
    stream = b"".join(data(n) for n in names)
    events, lost, buffered = _frame([stream[i : i + 97] for i in range(0, len(stream), 97)])
    assert lost is None and buffered == 0
    assert len(events) == len(names)
    for name, event in zip(names, events, strict=True):
        if isinstance(event, SipMessage):
            assert event.serialise() == data(name)
        else:
            assert INDEX[name]["class"] == "invalid"
