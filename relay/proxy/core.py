"""The edge proxy's core: events in, effects out (sans-I/O; RFC 3261 §16 is the frame).

:class:`Proxy` coordinates components that each own their state — the PBX
registrar, INVITE transactions, held INVITEs (RFC 8599), phone devices, media
sessions, the flows' liveness — and returns one list of typed effects
(relay.proxy.effects) per event. It never touches a socket, a clock or a
thread: ``now`` is an argument, and the shell reports back what it did with
``on_wake_result`` and ``on_ports_bound``. RFC 3327 (Path), RFC 3581 (rport),
RFC 5626 (flows) and RFC 8599 (push) fill the frame in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections.abc import Mapping

from mypy_extensions import mypyc_attr

from pbxcore.wire import WakeOutcome
from relay.media.session import MediaSessions
from relay.pbx.digest import DigestAuth
from relay.proxy.authbans import AuthBans
from relay.proxy.clusterevents import _NOT_HELD, OVERLOAD_RETRY_AFTER, ClusterEvents
from relay.proxy.counters import Counters
from relay.proxy.crosswake import device_id, is_woken
from relay.proxy.devices import PendingRegister, PhoneDevices
from relay.proxy.effects import (
    Effect,
    LocatePbx,
    Send,
)
from relay.proxy.flow import Flow
from relay.proxy.flowtoken import BadToken, ExpiredToken, FlowTokens
from relay.proxy.forwarding import (
    Branches,
    Hop,
    decrement_max_forwards,
    loop_hash,
    looped,
    max_forwards,
    stamp_via,
    strip_own_routes,
)
from relay.proxy.holds import COPIED, Held, Holds
from relay.proxy.identity import OUR_BRANCH, RelayIdentity
from relay.proxy.invites import InviteTransactions
from relay.proxy.liveness import Liveness
from relay.proxy.mediacalls import SDP_METHODS, MediaCalls, drop_foreign_peer
from relay.proxy.proxyconfig import ProxyConfig as ProxyConfig  # re-exported: the core's configuration
from relay.proxy.registrar import ExpiryPolicy, Ha1s, PbxRegistrar, PbxRegistration
from relay.proxy.replies import Replies
from relay.proxy.routeentries import add_route_entries, towards_phone
from relay.proxy.routetokens import TOKEN_PATH, Claim, RouteTokens
from relay.proxy.transaction import (
    InviteTransaction,
    TransactionTable,
    TxnKey,
)
from relay.proxy.wake import (
    path_user,
    uri_push_target,
    user_of,
)
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr, Via
from relay.sip.message import Request, Response, SipMessage
from relay.sip.uri import SipUri

log = logging.getLogger("relay.calls")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, PRACK, INFO, MESSAGE, SUBSCRIBE, NOTIFY, REFER"
COUNTED_METHODS = frozenset(ALLOW.replace(" ", "").split(",")) | {"PUBLISH"}
SWEEP_EVERY = 1.0  # seconds between sweeps of registrations, devices and silent media


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' RecordingProxy
class Proxy(ClusterEvents):
    """The relay's routing core. One instance per relay process; not thread-safe."""

    def __init__(self, config: ProxyConfig, key: bytes, auth: DigestAuth,
                 media: MediaSessions | None = None):
        self.cfg = config
        self.counters = Counters()
        self.identity = RelayIdentity(config.domain, config.advertise, config.ports, config.local_names)
        self.tokens = RouteTokens(FlowTokens(hashlib.sha256(b"flow" + key).digest()),
                                  config.node_id if config.cluster else "")
        self._wall_offset = 0.0  # wall clock minus ``now``: tokens carry wall-clock expiries
        branch_key = hashlib.sha256(b"branch" + key).digest()
        self.branches = Branches(branch_key)
        self.replies = Replies(branch_key, self.counters)
        self.liveness = Liveness()
        expiry = ExpiryPolicy(config.pbx_expires_default, config.pbx_expires_min, config.pbx_expires_max)
        bans = AuthBans(config.auth_failures_before_ban, first_ban=config.auth_first_ban)
        self.registrar = PbxRegistrar(auth, self.replies, self.counters, expiry, self.identity, bans,
                                      shared=config.cluster)
        self.txns = TransactionTable()
        self.holds = Holds(self.txns, self.replies, self.counters, config.ring_timeout)
        self.devices = PhoneDevices(self.counters, self.liveness, config.push)
        self.media = None if media is None else MediaCalls(media, self.replies, self.counters)
        self.invites = InviteTransactions(self.txns, self.replies, self.counters, self.holds,
                                          self.media, self._send_response, config.max_transactions,
                                          config.pending)
        self._next_sweep = 0.0
        self.drain_until: float | None = None  # set while draining: new calls get 503

    # ------------------------------------------------------------------ events
    def start(self, now: float, wall: float | None = None) -> list[Effect]:
        """Before the first message: learn the wall clock (``wall`` at ``now``) and bind
        the media port reserve."""
        self._next_sweep = now
        if wall is not None:
            self._wall_offset = self.registrar.wall_offset = wall - now
        return [] if self.media is None else list(self.media.sessions.start())

    def on_message(self, msg: SipMessage, source: Flow, now: float) -> list[Effect]:
        """A parsed SIP message from ``source``: what to send where, and what else to do."""
        self.liveness.heard(source, now)
        drop_foreign_peer(msg, source)
        if log.isEnabledFor(logging.DEBUG):
            what = msg.method if isinstance(msg, Request) else f"{msg.status}/{msg.cseq[1]}"  # type: ignore[attr-defined]
            log.debug("event=sip_in call_id=%s msg=%s flow=%s", msg.call_id, what, source)
        if isinstance(msg, Request):
            # The method is the sender's choice: count unknown ones together so
            # that a flood of invented methods cannot grow the counters forever.
            self.counters.inc("requests_in_total", msg.method if msg.method in COUNTED_METHODS else "other")
            return self._on_request(msg, source, now)
        assert isinstance(msg, Response)
        self.counters.inc("responses_in_total")
        return self._on_response(msg, source, now)

    def on_parse_error(self, err: SipParseError, source: Flow) -> list[Effect]:
        """A request we could read enough of gets its 400/505/513; the rest is dropped."""
        self.counters.inc("parse_errors_total", str(err.status))
        if isinstance(err.message, Request) and err.message.method != "ACK":
            return [self.replies.reply(err.message, source, err.status, err.reason)]
        self.counters.inc("dropped_total", "unparseable")
        return []

    def on_flow_opened(self, flow: Flow) -> None:
        """The transport accepted a TCP/TLS connection."""
        self.liveness.opened(flow)

    def on_flow_closed(self, flow: Flow) -> list[Effect]:
        """A TCP/TLS connection closed: its PBX registration and held calls go with it."""
        self.liveness.closed(flow)
        released = self.registrar.flow_closed(flow)
        if flow.reliable:
            self.holds.caller_gone(flow)
        return list(released)

    def on_keepalive(self, flow: Flow, now: float) -> None:
        """A CRLF keepalive, STUN binding or other non-SIP datagram: the peer is awake."""
        self.liveness.heard(flow, now)

    def on_directory(self, directory: Mapping[str, Ha1s]) -> None:
        """The PBX directory as it is now (serial → digest hashes)."""
        self.registrar.set_directory(directory)

    def on_wake_result(self, key: TxnKey, outcome: WakeOutcome, now: float) -> list[Effect]:
        """What came of a ``Wake``."""
        self.counters.inc("push_wakes_total", outcome.value)
        return list(self.holds.on_wake_result(key, outcome, now))

    def on_ports_bound(self, bound: tuple[int, ...], failed: tuple[int, ...]) -> list[Effect]:
        """What came of a ``BindPorts``."""
        if failed:
            self.counters.inc("media_bind_failures_total", n=len(failed))
        return [] if self.media is None else list(self.media.sessions.on_ports_bound(bound, failed))

    def drain(self, until: float) -> None:
        """Refuse new calls (503 + Retry-After) until ``until``; everything else goes on."""
        self.drain_until = until

    # ------------------------------------------------------------------ views
    @property
    def pending_invites(self) -> int:
        """INVITEs still waiting for a final answer (what a drain waits for)."""
        return self.txns.live_count

    def registrations(self) -> list[PbxRegistration]:
        """The PBX registrations held now."""
        return self.registrar.registry.snapshot()

    def customer_ips(self) -> frozenset[str]:
        """Source addresses of registered PBXs and of their accepted phones: the
        transport keeps connection headroom for them under a flood."""
        pbxs = {r.flow.remote_ip for r in self.registrar.registry.snapshot()}
        return frozenset(pbxs | self.devices.source_ips())

    # ----------------------------------------------------------------- requests
    def _on_request(self, req: Request, source: Flow, now: float) -> list[Effect]:
        try:
            via = req.top_via()
        except (LookupError, SipParseError):
            self.counters.inc("dropped_total", "no_via")
            return []
        stamp_via(req, via, source)
        if source.node_link and is_woken(req):
            return self._woken_elsewhere(req, source, now)
        if req.method == "CANCEL":
            return self.invites.cancel(req, source, via)
        absorbed = self.invites.absorb(req, via, source)
        if absorbed is not None:
            return absorbed
        if req.method == "INVITE" and self.drain_until is not None and _new_call(req):
            return self._refuse_draining(req, source, now)
        try:
            return self._route(req, source, via, now)
        except SipParseError as e:
            return list(self.replies.refuse(req, source, e.status, e.reason))

    def _route(self, req: Request, source: Flow, via: Via, now: float) -> list[Effect]:
        # RFC 3261 §16.3 request validation.
        try:
            ruri = SipUri.parse(req.uri)
        except SipParseError as e:
            if e.status == 416:
                return list(self.replies.refuse(req, source, 416, "Unsupported URI Scheme"))
            raise
        if ruri.headers:
            # RFC 4475 §3.1.2.11: escaped headers in a Request-URI are never forwarded.
            return list(self.replies.refuse(req, source, 400, "Headers in Request-URI"))
        proxy_require = req.get_all("proxy-require")
        if proxy_require:
            return list(self.replies.refuse(req, source, 420, "Bad Extension",
                                            extra=[("Unsupported", ", ".join(proxy_require))]))
        mf = max_forwards(req)
        token, ftag, routes_left, stripped = strip_own_routes(req, self.identity)
        if token is None and self.identity.is_us(ruri) and not routes_left:
            return self._for_us(req, ruri, source, now)
        if mf <= 0:
            return list(self.replies.refuse(req, source, 483, "Too Many Hops"))
        if token is not None:
            return self._route_by_token(req, source, via, (token, ftag, stripped), mf, now)
        return self._route_by_domain(req, source, via, ruri, mf, now)

    def _route_by_token(
        self, req: Request, source: Flow, via: Via, route: tuple[str, str | None, list[str]], mf: int,
        now: float,
    ) -> list[Effect]:
        """A request on a route we made: a Path (to a phone) or a Record-Route (in a dialog).
        ``route``: the token, its ``ftag`` and the Route entries of ours taken off."""
        token, ftag, stripped = route
        try:
            claim = self.tokens.read(token, now + self._wall_offset)
        except BadToken as e:
            reason = "token_expired" if isinstance(e, ExpiredToken) else "bad_token"
            self.counters.inc("forbidden_total", reason)
            return list(self.replies.refuse(req, source, 403, "Forbidden"))
        if not claim.fits(req, ftag):
            # A Record-Route token copied into another dialog (RFC 5626 §5.2 flow tokens
            # bound to what they were minted for): it routes nothing.
            self.counters.inc("forbidden_total", "token_other_dialog")
            return list(self.replies.refuse(req, source, 403, "Forbidden"))
        if claim.node and claim.node != self.cfg.node_id and self.cfg.cluster:
            hop = Hop(req, source, via, source, claim.serial, source, mf, True)
            routed = self._to_node(hop, claim, ftag, stripped, now)
            if routed is not None:
                return routed
        return self._route_claim(req, source, via, claim, ftag, mf, now)

    def _route_claim(
        self, req: Request, source: Flow, via: Via, claim: Claim, ftag: str | None, mf: int, now: float,
    ) -> list[Effect]:
        kind, serial, phone_flow = claim.kind, claim.serial, claim.flow
        path_device = claim.rest if claim.is_path() else ""
        pbx = self.registrar.lookup(serial, now) if serial else None
        if kind != TOKEN_PATH:
            phone_flow = self.devices.follow(phone_flow, serial, now)
        if towards_phone(req, source, kind, ftag, pbx.flow if pbx else None):
            if source == phone_flow:
                return list(self.replies.refuse(req, source, 482, "Loop Detected"))
            if kind == TOKEN_PATH and not source.node_link and (
                    pbx is None or pbx.flow.remote_ip != source.remote_ip):
                # Only the registrar the phone registered with may use its
                # Path: from the PBX's address (any port or connection).
                self.counters.inc("forbidden_total", "path_not_from_pbx")
                return list(self.replies.refuse(req, source, 403, "Forbidden"))
            hop = Hop(req, source, via, phone_flow, serial, phone_flow, mf, True)
            return self._to_phone(hop, path_device, now)
        if pbx is None:
            hop = Hop(req, source, via, source, serial, phone_flow, mf, False)
            return self._elsewhere(hop)
        if pbx.flow == source:
            return list(self.replies.refuse(req, source, 482, "Loop Detected"))
        return self._forward(Hop(req, source, via, pbx.flow, serial, phone_flow, mf, False), now)

    def _to_phone(self, hop: Hop, path_device: str, now: float) -> list[Effect]:
        """Towards a phone: on its flow, or held while a push wakes it (RFC 8599 §5.3.2)."""
        req = hop.req
        dead = not self.liveness.alive(hop.target)
        if dead or self._udp_asleep(hop.target, now):
            target = uri_push_target(req.uri) if self.cfg.push and path_device else None
            user = path_user(path_device, target) if target is not None else None
            if user is not None and target is not None and req.method == "INVITE":
                overload = self.invites.overloaded(self._share_of(hop), hop.serial)
                if overload is not None:
                    return self._refuse_overload(req, hop.source, overload)
                device = device_id(self.cfg.cluster_key, target, hop.serial, user) if self.cfg.cluster else ""
                held = Held(req, hop.via, hop.serial, hop.mf, target, self.replies.stateless_tag(req), user,
                            device)
                return self.holds.hold(req, hop.source, hop.via, held, now)
            if dead:
                self.counters.inc("flow_failed_total")
                # RFC 5626 §5.3: 430 tells the PBX this flow is gone.
                return list(self.replies.refuse(req, hop.source, 430, "Flow Failed"))
        return self._forward(hop, now)

    def _route_by_domain(
        self, req: Request, source: Flow, via: Via, ruri: SipUri, mf: int, now: float,
    ) -> list[Effect]:
        """A request for ``<serial>.<domain>``: to that PBX, if it is ours and online."""
        serial = self.identity.serial_of_host(ruri.host)
        if serial is None:
            self.counters.inc("forbidden_total", "foreign_domain")
            return list(self.replies.refuse(req, source, 403, "Forbidden"))
        # A serial not in the directory gets the answer of one that is offline: a
        # scanner must not learn which serials exist (issue 10).
        pbx = self.registrar.lookup(serial, now) if self.registrar.known(serial) else None
        if pbx is None:
            # In a cluster another node may hold it, whatever this node's directory says
            # (only PBXs that authenticated somewhere are claimed): a serial no node holds
            # still gets the same 480.
            return self._elsewhere(Hop(req, source, via, source, serial, source, mf, False))
        if pbx.flow == source:
            # A PBX addressing its own domain through us would loop straight back.
            return list(self.replies.refuse(req, source, 482, "Loop Detected"))
        return self._forward(Hop(req, source, via, pbx.flow, serial, source, mf, False), now)

    def _for_us(self, req: Request, ruri: SipUri, source: Flow, now: float) -> list[Effect]:
        if req.method == "REGISTER":
            return list(self.registrar.register(req, ruri, source, now))
        if req.method == "OPTIONS":
            return [self.replies.reply(req, source, 200, "OK", extra=[("Allow", ALLOW)])]
        if req.method == "ACK":
            return []
        return list(self.replies.refuse(req, source, 404, "Not Found"))

    # -------------------------------------------------------------- forwarding
    def _forward(self, hop: Hop, now: float, held: InviteTransaction | None = None) -> list[Effect]:
        """RFC 3261 §16.6: copy, Max-Forwards, Record-Route/Path, Via, send. ``held``:
        a held INVITE being released, whose transaction goes on."""
        req = hop.req
        overload = self.invites.overloaded(self._share_of(hop), hop.serial) if (
            req.method == "INVITE" and held is None) else None
        if overload is not None:
            return self._refuse_overload(req, hop.source, overload)
        loop = loop_hash(req, self.cfg.node_id)
        if looped(req, loop):
            return self._refused_on_the_way(held, self.replies.refuse(req, hop.source, 482, "Loop Detected"))
        decrement_max_forwards(req, hop.mf)
        bindings = add_route_entries(hop, self.tokens, self.identity, self.cfg.push, now + self._wall_offset)
        effects: list[Effect] = []
        if self.media is not None:
            media_effects, refusal = self.media.on_request(
                req, hop.source, hop.target, hop.to_phone, now, hop.serial, self._share_of(hop))
            if refusal is not None:
                return self._refused_on_the_way(held, refusal)
            effects += media_effects
        branch = self.branches.branch(req, hop.via, loop)
        if req.method == "REGISTER" and not hop.source.node_link:
            # The node the phone's flow is on speaks for its devices (push service, moves,
            # held calls); a node it reached through a link only forwards.
            self.devices.note_register(branch, hop.serial, user_of(req.get("to")), hop.source, bindings, now,
                                       req.get("path") or "")
        # Kept before our Via goes on: what a 100 or a 408 to the UAC copies.
        upstream = [h for h in req.headers if h.name in COPIED] if req.method == "INVITE" else []
        our_via = self.identity.via(hop.target, branch, self.tokens.via(hop.source, now + self._wall_offset),
                                    self.branches.call_mark(req.call_id))
        req.insert_before("Via", our_via)
        data = req.serialise()
        self.counters.inc("requests_forwarded_total")
        if req.method == "BYE":
            log.info("event=bye call_id=%s serial=%s from=%s", req.call_id, hop.serial, hop.source)
        if req.method != "INVITE":
            return [*effects, Send(hop.target, data)]
        return [*effects, *self.invites.start(hop, branch, our_via, upstream, data, now, held)]

    def _release(self, txn: InviteTransaction, held: Held, flow: Flow, now: float) -> list[Effect]:
        """A held INVITE goes out on the flow its phone just registered from."""
        hop = Hop(held.req, txn.inbound, held.via, flow, held.serial, flow, held.mf, True)
        return self._forward(hop, now, held=txn)

    def _refused_on_the_way(self, held: InviteTransaction | None, refusal: list[Send]) -> list[Effect]:
        """A released INVITE refused on its way out (media, loop): the caller got the
        answer; its transaction ends."""
        if held is not None:
            self.txns.remove(held)
        return list(refusal)

    def _share_of(self, hop: Hop) -> str:
        """The source whose per-source share a request counts against: "" (none) for
        the PBX itself and for sources exempt like loopback (transport.exempt)."""
        ip = hop.source.remote_ip
        if hop.to_phone or hop.source.node_link or ip in self.cfg.exempt_sources:
            return ""  # another node's link carries many phones: they count at that node
        return ip

    def _refuse_overload(self, req: Request, source: Flow, why: str) -> list[Effect]:
        self.counters.inc("overload_total", why)
        return list(self.replies.refuse(req, source, 503, "Service Unavailable",
                                        extra=[("Retry-After", str(OVERLOAD_RETRY_AFTER))]))

    def _refuse_draining(self, req: Request, source: Flow, now: float) -> list[Effect]:
        """503 + Retry-After (RFC 3261 §21.5.4): a PBX or phone with another relay
        to go to goes there; the rest may try again once this one is back."""
        assert self.drain_until is not None
        self.counters.inc("calls_refused_total", "draining")
        retry = max(1, math.ceil(self.drain_until - now))
        return list(self.replies.refuse(req, source, 503, "Service Unavailable",
                                        extra=[("Retry-After", str(retry))]))

    def _udp_asleep(self, flow: Flow, now: float) -> bool:
        """UDP has no connection to lose: a phone that sent nothing — not even a
        keepalive — for ``udp_asleep_after`` seconds is taken to be asleep (an iOS
        app cannot keep a UDP socket in the background at all)."""
        if flow.reliable or not self.cfg.push:
            return False
        heard = self.liveness.heard_at(flow)
        return heard is None or now - heard > self.cfg.udp_asleep_after

    def _on_response(self, resp: Response, source: Flow, now: float) -> list[Effect]:
        try:
            vias = resp.get_all("via")
            via = Via.parse(vias[0]) if vias else None
        except SipParseError:
            via = None
        branch = (via.branch or "") if via is not None else ""
        if via is None or not branch.startswith(OUR_BRANCH):
            self.counters.inc("dropped_total", "response_not_ours")
            return []
        try:
            back = self.tokens.back(via.params.get("pf") or "", now + self._wall_offset)
        except BadToken:
            self.counters.inc("dropped_total", "response_bad_token")
            return []
        if not hmac.compare_digest(via.params.get("ci") or "", self.branches.call_mark(resp.call_id)):
            # Our branch, another call's Call-ID (or none of ours): a responder aiming at
            # that call's media, which is found by Call-ID. Dropped, never passed on.
            self.counters.inc("dropped_total", "response_call_id_mismatch")
            return []
        resp.pop_first_value("via")
        if not resp.has("via"):
            return []  # the answer to a CANCEL we generated
        effects: list[Effect] = []
        if resp.status == 480 and resp.has(_NOT_HELD):
            effects = self._not_held(resp, source, branch)
            if effects and isinstance(effects[0], LocatePbx):
                return effects  # the INVITE goes again, to the node the shared state names
        method = resp.cseq[1]
        if method == "REGISTER" and resp.status >= 200:
            pending = self.devices.answered(branch)
            if pending is not None and resp.status < 300:
                return [*self._send_response(resp.serialise(), back), *self._registered(pending, resp, now)]
        txn = self.txns.by_our_branch(branch)
        if txn is not None and method == "INVITE":
            return [*effects, *self.invites.on_response(resp, txn, source, now)]
        if self.media is not None and method == "BYE" and resp.status >= 200:
            effects += self.media.on_bye_answered(resp)
        if self.media is not None and method in SDP_METHODS and resp.status >= 200:
            # UPDATE/PRACK answers: from the side the response is not going to
            to_pbx = self.registrar.registry.serial_of(back) is not None
            media_effects, ok = self.media.on_other_response(resp, to_pbx, source, back, now)
            if not ok:
                return list(media_effects)
            effects += media_effects
        return [*effects, *self._send_response(resp.serialise(), back)]

    def _registered(self, pending: PendingRegister, resp: Response, now: float) -> list[Effect]:
        """The PBX said 2xx to a phone: its devices move, the push service hears of
        it, and what waited for this phone goes out."""
        push_effects, released = self.devices.registered(pending, resp, now)
        out: list[Effect] = list(push_effects)
        for r in released:
            out += self.holds.release(r, pending, now, self._release)
            if self.cfg.cluster and pending.path:
                out.append(self._woken(r, pending))
        return out

    def _send_response(self, data: bytes, back: Flow) -> list[Send]:
        if not self.liveness.alive(back):
            self.counters.inc("dropped_total", "response_flow_gone")
            return []
        self.counters.inc("responses_forwarded_total")
        return [Send(back, data)]

    # ------------------------------------------------------------------ timers
    def next_timer(self) -> float:
        """When ``on_timer`` must run next (absolute, same clock as ``now``)."""
        due = self.txns.next_due()
        return self._next_sweep if due is None else min(due, self._next_sweep)

    def on_timer(self, now: float) -> list[Effect]:
        """Retransmissions, timeouts, expiries due by ``now``."""
        out: list[Effect] = []
        if now >= self._next_sweep:
            out += self._sweep(now)
        return out + self.invites.on_timer(now)

    def _sweep(self, now: float) -> list[Effect]:
        released: list[Effect] = list(self.registrar.expire(now))
        self.devices.sweep(now)
        self.liveness.sweep(now)
        self._next_sweep = now + SWEEP_EVERY
        if self.media is None:
            return released
        gone, effects = self.media.sessions.expire(now)
        if gone:
            self.counters.inc("media_timeouts_total", n=len(gone))
        return [*released, *effects]


def _new_call(req: Request) -> bool:
    """An INVITE that would start a call: no To tag (not a re-INVITE)."""
    try:
        return NameAddr.parse(req.get("to") or "").tag is None
    except SipParseError:
        return False  # answered or dropped as usual
