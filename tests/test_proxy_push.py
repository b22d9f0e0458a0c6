"""RFC 8599 in the sans-I/O proxy core: push parameters in a phone's REGISTER
reach the push service only once the PBX accepted it; an INVITE for a phone
whose TCP flow is gone is held, the phone woken, and the INVITE forwarded on
the flow the phone registers from next (DESIGN §2, "waking a sleeping phone").
Every assertion is on the bytes the core returns or the events it hands out.
"""

from __future__ import annotations

from pbxcore.wire import PushTarget, WakeOutcome
from relay.proxy.effects import DeviceGone, DeviceSeen, Wake
from relay.proxy.flow import Flow
from relay.proxy.wake import push_target, register_bindings
from relay.sip import Request, parse_message
from tests.proxyharness import (
    ADVERTISE,
    PBX_DOMAIN,
    PBX_TCP,
    PHONE_TCP,
    SERIAL,
    Out,
    feed,
    make_proxy,
    one,
    outs,
    register_pbx,
    request,
    response_to,
)

TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
PN = f"pn-provider=apns;pn-prid={TOKEN};pn-param=ABCD123456.com.example.app.voip"
TARGET = PushTarget("apns", TOKEN, "ABCD123456.com.example.app.voip")
PHONE_NEW = Flow("tls", "192.0.2.55", 50999, ADVERTISE, 5061)  # the woken phone's new connection
OUTBOUND = f"Route: <sip:{ADVERTISE};lr>"


class World:
    def __init__(self, **cfg: object):
        self.proxy, self.dead = make_proxy(push=True, ring_timeout=30.0, **cfg)
        register_pbx(self.proxy, PBX_TCP, now=0.0)

    def feed(self, data: bytes, flow: Flow, now: float = 1.0) -> list[Out]:
        return feed(self.proxy, data, flow, now)

    def events(self) -> list[object]:
        return list(self.proxy.take_effects())


def phone_register(flow: Flow, *, expires: int = 600, contact_host: str = "192.168.1.20", cseq: int = 1,
                   branch: str | None = None) -> bytes:
    aor = f"sip:201@{PBX_DOMAIN}"
    return request(
        "REGISTER", f"sip:{PBX_DOMAIN}", flow=flow, via_host=contact_host, via_port=5062,
        from_uri=aor, to_uri=aor, call_id="phone-reg", cseq=cseq, branch=branch,
        headers=[OUTBOUND, f"Contact: <sip:201@{contact_host}:5062;transport={flow.transport};{PN}>",
                 f"Expires: {expires}"],
    )


def register(world: World, flow: Flow, now: float = 1.0, **kw: object) -> tuple[str, list[Out]]:
    """Phone REGISTER through us, 200 from the PBX; returns (Path, what followed the 200)."""
    fwd = one(world.feed(phone_register(flow, **kw), flow, now))  # type: ignore[arg-type]
    path = fwd.req.get_all("path")[0]
    out = world.feed(response_to(fwd.data, 200, "OK", headers=[f"Path: {path}"]), PBX_TCP, now)
    assert (out[0].flow, out[0].status) == (flow, 200)
    return path, out[1:]


def pbx_invite(path: str, *, branch: str = "z9hG4bKpbx1", call_id: str = "call-in") -> bytes:
    return request(
        "INVITE", f"sip:201@192.168.1.20:5062;transport=tcp;{PN}", flow=PBX_TCP, via_host="10.1.1.1",
        branch=branch, from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbxtag", to_uri=f"sip:201@{PBX_DOMAIN}",
        call_id=call_id, headers=[f"Route: {path}", "Contact: <sip:100@10.1.1.1;transport=tcp>"],
    )


def held_call(world: World) -> tuple[str, Wake]:
    """The phone registered over TCP, its connection died, the PBX calls it."""
    path, _ = register(world, PHONE_TCP)
    world.events()
    world.dead.add(PHONE_TCP)
    trying = one(world.feed(pbx_invite(path), PBX_TCP, 2.0))
    assert (trying.flow, trying.status) == (PBX_TCP, 100)
    (wake,) = world.events()
    assert isinstance(wake, Wake)
    return path, wake


# ------------------------------------------------------------ registrations
def test_push_parameters_are_read_from_the_contact() -> None:
    msg = parse_message(phone_register(PHONE_TCP))
    assert isinstance(msg, Request)
    (b,) = register_bindings(msg)
    assert (b.target, b.expires) == (TARGET, 600)
    assert b.contact_uri.startswith("sip:201@192.168.1.20:5062;transport=tcp;pn-provider=apns")
    assert push_target({"pn-provider": "webpush", "pn-prid": "x", "pn-param": "y"}) is None
    assert push_target({"pn-provider": "fcm", "pn-prid": "a%3Ab", "pn-param": "proj"}) == PushTarget(
        "fcm", "a:b", "proj")


def test_device_is_reported_only_after_the_pbx_accepts_the_registration() -> None:
    w = World()
    fwd = one(w.feed(phone_register(PHONE_TCP), PHONE_TCP))
    challenge = one(w.feed(response_to(fwd.data, 401, "Unauthorized"), PBX_TCP))
    assert challenge.status == 401
    assert w.events() == []  # a REGISTER anyone could send changes nothing
    register(w, PHONE_TCP, cseq=2)
    assert w.events() == [DeviceSeen(TARGET, SERIAL, "201", PHONE_TCP)]


def test_deregistration_deletes_the_device() -> None:
    w = World()
    register(w, PHONE_TCP)
    w.events()
    register(w, PHONE_TCP, expires=0, cseq=2)
    assert w.events() == [DeviceGone(TARGET, SERIAL, "201")]


def test_register_without_push_parameters_makes_no_event() -> None:
    w = World()
    aor = f"sip:201@{PBX_DOMAIN}"
    data = request("REGISTER", f"sip:{PBX_DOMAIN}", flow=PHONE_TCP, from_uri=aor, to_uri=aor,
                   headers=[OUTBOUND, "Contact: <sip:201@192.168.1.20:5062;transport=tcp>"])
    fwd = one(w.feed(data, PHONE_TCP))
    one(w.feed(response_to(fwd.data, 200, "OK"), PBX_TCP))
    assert w.events() == []


# ---------------------------------------------------------------- the hold
def test_invite_for_a_sleeping_phone_is_held_woken_and_forwarded_on_its_new_flow() -> None:
    w = World()
    _, wake = held_call(w)
    r = wake.request
    assert (r.target, r.serial, r.username, r.call_id, r.caller, r.callee) == (
        TARGET, SERIAL, "201", "call-in@test", "100", "201")
    assert r.src == PBX_TCP.remote and r.ring_timeout == 30.0

    ringing = one(outs(w.proxy.on_wake_result(wake.key, WakeOutcome.SENT, 2.5)))
    assert (ringing.flow, ringing.status) == (PBX_TCP, 180)
    assert "tag=" in (ringing.msg.get("to") or "")
    # a retransmitted INVITE gets the 180 again and wakes nobody twice
    again = one(w.feed(pbx_invite("<sip:x@invalid;lr>"), PBX_TCP, 3.0))
    assert again.data == ringing.data
    assert w.events() == []

    # the phone wakes up and registers from a new TLS connection
    _, released = register(w, PHONE_NEW, now=4.0, contact_host="192.168.7.7")
    assert w.events() == [DeviceSeen(TARGET, SERIAL, "201", PHONE_NEW)]
    invite = one(released)
    assert invite.flow == PHONE_NEW
    assert invite.req.method == "INVITE"
    assert invite.req.uri.startswith("sip:201@192.168.7.7:5062;transport=tls;pn-provider=apns")
    rr = invite.req.get_all("record-route")
    assert rr and w.proxy.tokens.read(rr[0].split("sip:")[1].split("@")[0], 4.0).flow == PHONE_NEW

    # from here on, an ordinary call
    answer = one(w.feed(response_to(invite.data, 180, "Ringing", to_tag="phone"), PHONE_NEW, 4.1))
    assert (answer.flow, answer.status) == (PBX_TCP, 180)
    ok = one(w.feed(response_to(invite.data, 200, "OK", to_tag="phone"), PHONE_NEW, 5.0))
    assert (ok.flow, ok.status) == (PBX_TCP, 200)
    assert w.proxy.counters.get("push_holds_total", "released") == 1


def test_cancel_during_the_hold_reaches_the_phone_after_it_wakes() -> None:
    w = World()
    path, wake = held_call(w)
    one(outs(w.proxy.on_wake_result(wake.key, WakeOutcome.SENT, 2.5)))
    cancel = request("CANCEL", f"sip:201@192.168.1.20:5062;transport=tcp;{PN}", flow=PBX_TCP,
                     via_host="10.1.1.1", branch="z9hG4bKpbx1", from_uri=f"sip:100@{PBX_DOMAIN}",
                     from_tag="pbxtag", to_uri=f"sip:201@{PBX_DOMAIN}", call_id="call-in")
    ok = one(w.feed(cancel, PBX_TCP, 3.0))
    assert (ok.flow, ok.status, ok.resp.cseq[1]) == (PBX_TCP, 200, "CANCEL")

    _, released = register(w, PHONE_NEW, now=4.0)
    invite = one(released)
    assert invite.req.method == "INVITE"  # iOS must see the call, then its end
    sent = outs(w.proxy.on_message(
        parse_message(response_to(invite.data, 100, "Trying")), PHONE_NEW, 4.1))
    (phone_cancel,) = sent
    assert (phone_cancel.flow, phone_cancel.req.method) == (PHONE_NEW, "CANCEL")
    assert phone_cancel.req.top_via().branch == invite.req.top_via().branch
    terminated = one(w.feed(response_to(invite.data, 487, "Request Terminated", to_tag="p"), PHONE_NEW, 4.2))
    assert (terminated.flow, terminated.status) == (PBX_TCP, 487)
    # The PBX's ACK names the old flow in its Route; it goes where the INVITE went.
    ack = request("ACK", f"sip:201@192.168.1.20:5062;transport=tcp;{PN}", flow=PBX_TCP, via_host="10.1.1.1",
                  branch="z9hG4bKpbx1", from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbxtag",
                  to_uri=f"sip:201@{PBX_DOMAIN}", to_tag="p", call_id="call-in", headers=[f"Route: {path}"])
    phone_ack = one(w.feed(ack, PBX_TCP, 4.3))
    assert (phone_ack.flow, phone_ack.req.method) == (PHONE_NEW, "ACK")
    assert phone_ack.req.top_via().branch == invite.req.top_via().branch


def test_no_registration_within_the_ring_timeout_is_480_and_later_nothing_is_sent() -> None:
    w = World()
    path, wake = held_call(w)
    assert w.proxy.next_timer() <= 32.0
    assert [o for o in outs(w.proxy.on_timer(31.9)) if o.flow == PBX_TCP] == []
    final = [o for o in outs(w.proxy.on_timer(32.1)) if o.flow == PBX_TCP]
    assert [o.status for o in final] == [480]
    assert w.proxy.counters.get("push_holds_total", "timeout") == 1
    ack = request("ACK", f"sip:201@192.168.1.20:5062;transport=tcp;{PN}", flow=PBX_TCP, via_host="10.1.1.1",
                  branch="z9hG4bKpbx1", from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbxtag",
                  to_uri=f"sip:201@{PBX_DOMAIN}", to_tag="x", call_id="call-in",
                  headers=[f"Route: {path}"])
    assert w.feed(ack, PBX_TCP, 33.0) == []  # the ACK of our own 480 stops here
    _, released = register(w, PHONE_NEW, now=40.0)
    assert released == []
    assert outs(w.proxy.on_wake_result(wake.key, WakeOutcome.SENT, 41.0)) == []


def test_cancelled_hold_that_times_out_is_487() -> None:
    w = World()
    held_call(w)
    cancel = request("CANCEL", f"sip:201@192.168.1.20:5062;transport=tcp;{PN}", flow=PBX_TCP,
                     via_host="10.1.1.1", branch="z9hG4bKpbx1", from_uri=f"sip:100@{PBX_DOMAIN}",
                     from_tag="pbxtag", to_uri=f"sip:201@{PBX_DOMAIN}", call_id="call-in")
    one(w.feed(cancel, PBX_TCP, 3.0))
    final = [o for o in outs(w.proxy.on_timer(32.1)) if o.flow == PBX_TCP]
    assert [o.status for o in final] == [487]


def test_push_that_could_not_be_sent_ends_the_hold_with_480_at_once() -> None:
    w = World()
    _, wake = held_call(w)
    final = one(outs(w.proxy.on_wake_result(wake.key, WakeOutcome.FAILED, 3.0)))
    assert (final.flow, final.status) == (PBX_TCP, 480)
    assert w.proxy.counters.get("push_holds_total", "push_failed") == 1
    _, released = register(w, PHONE_NEW, now=4.0)
    assert released == []


def test_without_push_parameters_a_dead_flow_is_still_430() -> None:
    w = World()
    path, _ = register(w, PHONE_TCP)
    w.dead.add(PHONE_TCP)
    data = request("INVITE", "sip:201@192.168.1.20:5062;transport=tcp", flow=PBX_TCP, via_host="10.1.1.1",
                   from_uri=f"sip:100@{PBX_DOMAIN}", to_uri=f"sip:201@{PBX_DOMAIN}",
                   headers=[f"Route: {path}"])
    assert one(w.feed(data, PBX_TCP, 2.0)).status == 430


def test_push_off_keeps_430_even_with_push_parameters() -> None:
    proxy, dead = make_proxy()
    register_pbx(proxy, PBX_TCP, now=0.0)
    w = World.__new__(World)
    w.proxy, w.dead = proxy, dead
    path, _ = register(w, PHONE_TCP)
    dead.add(PHONE_TCP)
    assert one(w.feed(pbx_invite(path), PBX_TCP, 2.0)).status == 430
    assert proxy.take_effects() == []


# ------------------------------------------------------------------- UDP
PHONE_UDP_PN = Flow("udp", "192.0.2.30", 40030, ADVERTISE, 5060)


class Heard:
    """``heard[flow] = t``: the transport reports something (a keepalive) from ``flow`` at ``t``."""

    def __init__(self, world: World) -> None:
        self.proxy = world.proxy

    def __setitem__(self, flow: Flow, when: float) -> None:
        self.proxy.on_keepalive(flow, when)


def udp_world() -> tuple[World, Heard]:
    w = World()
    return w, Heard(w)


def test_udp_phone_heard_recently_is_called_directly() -> None:
    w, heard = udp_world()
    path, _ = register(w, PHONE_UDP_PN, now=1.0)
    w.events()
    heard[PHONE_UDP_PN] = 25.0  # a keepalive 15 s before the call
    trying, invite = w.feed(pbx_invite(path), PBX_TCP, 40.0)
    assert (trying.status, invite.flow) == (100, PHONE_UDP_PN)
    assert w.events() == []


def test_silent_udp_phone_is_held_and_pushed() -> None:
    w, heard = udp_world()
    path, _ = register(w, PHONE_UDP_PN, now=1.0)
    w.events()
    heard[PHONE_UDP_PN] = 1.0  # nothing since its REGISTER, 40+ s ago
    trying = one(w.feed(pbx_invite(path), PBX_TCP, 41.5))
    assert (trying.flow, trying.status) == (PBX_TCP, 100)
    (wake,) = w.events()
    assert isinstance(wake, Wake) and wake.request.target == TARGET
    # it wakes and registers from the same UDP address: the call goes there
    heard[PHONE_UDP_PN] = 43.0
    _, released = register(w, PHONE_UDP_PN, now=43.0)
    assert [(o.flow, o.req.method) for o in released] == [(PHONE_UDP_PN, "INVITE")]


def test_silent_udp_phone_without_push_parameters_is_still_tried() -> None:
    w, heard = udp_world()
    aor = f"sip:201@{PBX_DOMAIN}"
    reg = request("REGISTER", f"sip:{PBX_DOMAIN}", flow=PHONE_UDP_PN, from_uri=aor, to_uri=aor,
                  headers=[OUTBOUND, "Contact: <sip:201@192.168.1.20:5062>"])
    fwd = one(w.feed(reg, PHONE_UDP_PN))
    path = fwd.req.get_all("path")[0]
    one(w.feed(response_to(fwd.data, 200, "OK"), PBX_TCP))
    data = request("INVITE", "sip:201@192.168.1.20:5062", flow=PBX_TCP, via_host="10.1.1.1",
                   from_uri=f"sip:100@{PBX_DOMAIN}", to_uri=f"sip:201@{PBX_DOMAIN}",
                   headers=[f"Route: {path}"])
    assert [o.flow for o in w.feed(data, PBX_TCP, 100.0)] == [PBX_TCP, PHONE_UDP_PN]


# ------------------------------------------------------- a phone that moves
INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6>"'


def instance_register(flow: Flow, *, user: str = "201", cseq: int = 1, expires: int = 600) -> bytes:
    aor = f"sip:{user}@{PBX_DOMAIN}"
    contact = (f"Contact: <sip:{user}@192.168.1.20:5062;transport={flow.transport}>"
               f";+sip.instance={INSTANCE};reg-id=1")
    return request("REGISTER", f"sip:{PBX_DOMAIN}", flow=flow, from_uri=aor, to_uri=aor,
                   call_id=f"reg-{flow.remote_port}", cseq=cseq,
                   headers=[OUTBOUND, contact, f"Expires: {expires}"])


def accept(world: World, data: bytes, flow: Flow, now: float) -> str:
    fwd = one(world.feed(data, flow, now))
    path = fwd.req.get_all("path")[0]
    ok = one(world.feed(response_to(fwd.data, 200, "OK"), PBX_TCP, now))
    assert (ok.flow, ok.status) == (flow, 200)
    return path


def answered_call(world: World, path: str, phone: Flow) -> list[str]:
    """The PBX calls the phone along its Path; the phone answers. The PBX's route set."""
    data = request("INVITE", "sip:201@192.168.1.20:5062;transport=tcp", flow=PBX_TCP, via_host="10.1.1.1",
                   from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbxtag", to_uri=f"sip:201@{PBX_DOMAIN}",
                   call_id="call-moved", headers=[f"Route: {path}"])
    _, fwd = world.feed(data, PBX_TCP, 2.0)
    assert fwd.flow == phone
    ok = one(world.feed(response_to(fwd.data, 200, "OK", to_tag="ph"), phone, 2.1))
    return ok.msg.get_all("record-route")


def pbx_bye(routes: list[str], now: float, w: World) -> list[Out]:
    data = request("BYE", "sip:201@192.168.1.20:5062", flow=PBX_TCP, via_host="10.1.1.1",
                   from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbxtag", to_uri=f"sip:201@{PBX_DOMAIN}",
                   to_tag="ph", call_id="call-moved", cseq=3, headers=[f"Route: {', '.join(routes)}"])
    return w.feed(data, PBX_TCP, now)


def test_in_dialog_request_follows_a_phone_that_registered_from_a_new_network() -> None:
    w = World()
    path = accept(w, instance_register(PHONE_TCP), PHONE_TCP, 1.0)
    routes = answered_call(w, path, PHONE_TCP)
    # Wi-Fi gone: the TCP connection dies; the phone registers over LTE (TLS)
    w.dead.add(PHONE_TCP)
    accept(w, instance_register(PHONE_NEW, cseq=2), PHONE_NEW, 3.0)
    bye = one(pbx_bye(routes, 4.0, w))
    assert (bye.flow, bye.req.method) == (PHONE_NEW, "BYE")
    assert w.proxy.counters.get("phone_moves_total") == 1


def test_another_users_registration_with_the_same_instance_moves_nothing() -> None:
    w = World()
    path = accept(w, instance_register(PHONE_TCP), PHONE_TCP, 1.0)
    routes = answered_call(w, path, PHONE_TCP)
    w.dead.add(PHONE_TCP)
    accept(w, instance_register(PHONE_NEW, user="202"), PHONE_NEW, 3.0)
    assert one(pbx_bye(routes, 4.0, w)).status == 430


def test_the_move_is_forgotten_when_the_registration_expires() -> None:
    w = World()
    path = accept(w, instance_register(PHONE_TCP, expires=60), PHONE_TCP, 1.0)
    routes = answered_call(w, path, PHONE_TCP)
    w.dead.add(PHONE_TCP)
    accept(w, instance_register(PHONE_NEW, cseq=2, expires=60), PHONE_NEW, 3.0)
    w.proxy.on_timer(100.0)
    assert one(pbx_bye(routes, 100.0, w)).status == 430


def test_a_held_call_is_not_released_to_another_user_presenting_the_same_token() -> None:
    w = World()
    _, wake = held_call(w)
    aor = f"sip:202@{PBX_DOMAIN}"
    other = request("REGISTER", f"sip:{PBX_DOMAIN}", flow=PHONE_NEW, from_uri=aor, to_uri=aor,
                    headers=[OUTBOUND, f"Contact: <sip:202@192.168.9.9:5062;transport=tls;{PN}>"])
    fwd = one(w.feed(other, PHONE_NEW, 3.0))
    after = w.feed(response_to(fwd.data, 200, "OK"), PBX_TCP, 3.0)
    assert [o.status for o in after] == [200]  # the REGISTER's answer, and no INVITE
    assert w.proxy.counters.get("push_holds_total", "release_refused") == 1
    _, released = register(w, PHONE_NEW, now=4.0)  # the right user: released
    assert [o.req.method for o in released] == ["INVITE"]


# ------------------------------------------------- review: abuse and races
def test_a_pbx_cannot_wake_a_device_other_than_the_one_registered_along_the_path() -> None:
    w = World()
    path, _ = register(w, PHONE_TCP)
    w.events()
    w.dead.add(PHONE_TCP)
    other = "f" * 64
    data = request(
        "INVITE", f"sip:201@192.168.1.20:5062;transport=tcp;pn-provider=apns;pn-prid={other};"
        "pn-param=ABCD123456.com.example.app.voip", flow=PBX_TCP, via_host="10.1.1.1",
        from_uri=f"sip:100@{PBX_DOMAIN}", to_uri=f"sip:201@{PBX_DOMAIN}", headers=[f"Route: {path}"])
    assert one(w.feed(data, PBX_TCP, 2.0)).status == 430
    assert w.events() == []


def test_provisional_answer_to_a_register_does_not_lose_the_device() -> None:
    w = World()
    held_call(w)
    fwd = one(w.feed(phone_register(PHONE_NEW, contact_host="192.168.7.7"), PHONE_NEW, 4.0))
    assert [o.status for o in w.feed(response_to(fwd.data, 100, "Trying"), PBX_TCP, 4.0)] == [100]
    path = fwd.req.get_all("path")[0]
    out = w.feed(response_to(fwd.data, 200, "OK", headers=[f"Path: {path}"]), PBX_TCP, 4.1)
    assert [(o.flow, o.msg.method if isinstance(o.msg, Request) else o.status) for o in out] == [
        (PHONE_NEW, 200), (PHONE_NEW, "INVITE")]


def test_pbx_connection_lost_during_the_hold_rings_nobody() -> None:
    w = World()
    held_call(w)
    w.proxy.on_flow_closed(PBX_TCP)
    assert w.proxy.counters.get("push_holds_total", "caller_gone") == 1
    register_pbx(w.proxy, PBX_TCP, now=3.0)  # the PBX is back, on a new connection
    _, released = register(w, PHONE_NEW, now=4.0)
    assert released == []


def test_a_new_push_token_for_the_same_instance_deletes_the_old_device() -> None:
    w = World()
    aor = f"sip:201@{PBX_DOMAIN}"

    def reg(token: str, cseq: int) -> bytes:
        return request("REGISTER", f"sip:{PBX_DOMAIN}", flow=PHONE_TCP, from_uri=aor, to_uri=aor,
                       call_id="r", cseq=cseq, headers=[
                           OUTBOUND, f"Contact: <sip:201@192.168.1.20:5062;transport=tcp;pn-provider=apns;"
                           f"pn-prid={token};pn-param=T.com.example.app.voip>;+sip.instance={INSTANCE}"])

    for cseq, token in ((1, "aa" * 32), (2, "bb" * 32)):
        fwd = one(w.feed(reg(token, cseq), PHONE_TCP, float(cseq)))
        one(w.feed(response_to(fwd.data, 200, "OK"), PBX_TCP, float(cseq)))
    old = PushTarget("apns", "aa" * 32, "T.com.example.app.voip")
    new = PushTarget("apns", "bb" * 32, "T.com.example.app.voip")
    assert w.events() == [DeviceSeen(old, SERIAL, "201", PHONE_TCP), DeviceGone(old, SERIAL, "201"),
                          DeviceSeen(new, SERIAL, "201", PHONE_TCP)]


def test_a_move_is_not_followed_once_someone_else_uses_the_old_udp_address() -> None:
    w, heard = udp_world()
    old = Flow("udp", "192.0.2.40", 40040, ADVERTISE, 5060)
    path = accept(w, instance_register(old), old, 1.0)
    heard[old] = 1.0
    data = request("INVITE", "sip:201@192.168.1.20:5062", flow=PBX_TCP, via_host="10.1.1.1",
                   from_uri=f"sip:100@{PBX_DOMAIN}", from_tag="pbxtag", to_uri=f"sip:201@{PBX_DOMAIN}",
                   call_id="call-moved", headers=[f"Route: {path}"])
    _, fwd = w.feed(data, PBX_TCP, 2.0)
    ok = one(w.feed(response_to(fwd.data, 200, "OK", to_tag="ph"), old, 2.1))
    routes = ok.msg.get_all("record-route")
    accept(w, instance_register(PHONE_NEW, cseq=2), PHONE_NEW, 3.0)
    assert one(pbx_bye(routes, 3.5, w)).flow == PHONE_NEW  # followed while the old address is quiet
    heard[old] = 4.0  # a CGNAT hands the address to someone else, who sends from it
    assert one(pbx_bye(routes, 5.0, w)).flow == old


def test_the_registrars_granted_expiry_bounds_a_move() -> None:
    w = World()
    path = accept(w, instance_register(PHONE_TCP), PHONE_TCP, 1.0)
    routes = answered_call(w, path, PHONE_TCP)
    w.dead.add(PHONE_TCP)
    fwd = one(w.feed(instance_register(PHONE_NEW, cseq=2), PHONE_NEW, 3.0))  # asks for 600 s
    contact = fwd.req.get("contact")
    one(w.feed(response_to(fwd.data, 200, "OK", headers=[f"Contact: {contact};expires=60"]), PBX_TCP, 3.0))
    assert one(pbx_bye(routes, 50.0, w)).flow == PHONE_NEW
    w.proxy.on_timer(70.0)
    assert one(pbx_bye(routes, 70.0, w)).status == 430


def test_a_push_whose_answer_was_lost_still_rings_and_waits() -> None:
    """sent_unconfirmed (the push left, its answer did not come back) may have woken the
    phone: the caller hears ringing and the INVITE waits, as for a confirmed push."""
    w = World()
    _, wake = held_call(w)
    ringing = one(outs(w.proxy.on_wake_result(wake.key, WakeOutcome.SENT_UNCONFIRMED, 2.5)))
    assert (ringing.flow, ringing.status) == (PBX_TCP, 180)
    _, released = register(w, PHONE_NEW, now=4.0)
    assert [(o.flow, o.req.method) for o in released] == [(PHONE_NEW, "INVITE")]
