"""Routing decisions of the edge proxy: a message and a flow in, messages to send out.

Pure code over values (no sockets, no clock): ``now`` is an argument and the
transport layer tells us which connection-oriented flows are alive. RFC 3261
§16 is the frame; RFC 3327 (Path), RFC 3581 (rport), RFC 5626 (flows) and
RFC 8760 (SHA-256 digest) fill it in.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from push.model import PushTarget
from relay.media.session import PBX, PHONE, MediaController, MediaError
from relay.pbx.digest import DigestAuth
from relay.pbx.registry import PbxRegistry
from relay.proxy.flow import Flow
from relay.proxy.flowtoken import BadToken, FlowTokens
from relay.proxy.transaction import (
    LINGER,
    T1,
    TIMER_B,
    TIMER_C,
    InviteTransaction,
    TransactionTable,
    TxnKey,
)
from relay.proxy.wake import (
    MAX_PENDING_REGISTERS,
    PENDING_REGISTER_TTL,
    Binding,
    DeviceGone,
    DeviceSeen,
    Held,
    KnownDevice,
    Moved,
    PendingRegister,
    PushEvent,
    WakeDevice,
    granted_expires,
    path_device_of,
    path_user,
    register_bindings,
    uri_push_target,
    user_of,
)
from relay.sip import limits
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr, Via, format_host, split_commas
from relay.sip.message import Header, Request, Response, SipMessage, make_response
from relay.sip.uri import SipUri

# One line per event of a call, each with its call id (issue 5: logs an operator can
# follow a call by); never a body, an SDP or a push token.
log = logging.getLogger("relay.calls")
pbx_log = logging.getLogger("relay.pbx")  # registrations: PBXs and phones, no call id

DEBUG = logging.DEBUG

MAGIC_COOKIE = "z9hG4bK"
OUR_BRANCH = MAGIC_COOKIE + "-pr"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, PRACK, INFO, MESSAGE, SUBSCRIBE, NOTIFY, REFER"
COUNTED_METHODS = frozenset(ALLOW.replace(" ", "").split(",")) | {"PUBLISH"}
# Methods whose out-of-dialog request creates a dialog: the relay must stay on
# its route (Record-Route, RFC 3261 §16.6 item 4).
DIALOG_FORMING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})
# What a flow token's payload ("<kind>.<serial>") says about the route it is in.
TOKEN_PATH = "p"  # Path of a phone's REGISTER: requests on it go to the phone
TOKEN_FROM_PHONE = "c"  # Record-Route of a request the phone sent (ftag = its From tag)
TOKEN_FROM_PBX = "s"  # Record-Route of a request the PBX sent
# INVITE transactions in flight at most (each ~2 KB). Beyond, new INVITEs get
# 503 + Retry-After (RFC 3261 §21.5.4) instead of the relay growing without bound.
MAX_TRANSACTIONS = 100_000
# Phones whose device (instance id or push token) → flow the relay remembers at most,
# and how often expired ones are dropped (seconds).
MAX_DEVICES = 200_000
DEVICE_SWEEP = 60.0
# RFC 3261 §8.2.6.2: a response copies these from the request.
_COPIED = frozenset({"via", "from", "to", "call-id", "cseq"})


@dataclass(frozen=True, slots=True)
class Send:
    flow: Flow
    data: bytes


@dataclass(slots=True)
class ProxyConfig:
    domain: str  # relay domain: PBXs register sip:<serial>@domain, phones use <serial>.domain
    advertise: str  # host (name or IP) we put in Via / Record-Route / Path
    ports: dict[str, int]  # transport → advertised port
    local_names: frozenset[str] = frozenset()  # extra hosts meaning "us" (listen IPs)
    pbx_expires_default: int = 3600
    pbx_expires_min: int = 60  # RFC 3261 §10.3: 423 Interval Too Brief below this
    pbx_expires_max: int = 3600
    # RFC 8599: wake phones that registered push parameters (needs a push service)
    push: bool = False
    ring_timeout: float = 30.0  # seconds an INVITE waits for a woken phone, then 480
    udp_asleep_after: float = 40.0  # a UDP phone silent this long (no SIP, CRLF or STUN) sleeps


@dataclass(slots=True)
class Stats:
    """Counters exposed as metrics (issue 5 turns them into Prometheus series)."""

    c: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.c[name] += n


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        key: bytes,
        directory: Callable[[str], dict[str, str] | None],
        auth: DigestAuth,
        flow_alive: Callable[[Flow], bool],
        media: MediaController | None = None,
        flow_heard: Callable[[Flow], float | None] | None = None,
    ):
        self.cfg = config
        self.tokens = FlowTokens(hashlib.sha256(b"flow" + key).digest())
        self._branch_key = hashlib.sha256(b"branch" + key).digest()
        self.directory = directory
        self.auth = auth
        self.flow_alive = flow_alive
        # When a UDP flow last sent anything (SIP, CRLF, STUN), on the clock of ``now``.
        self.flow_heard = flow_heard
        self.media = media
        self.registry = PbxRegistry()
        self.txns = TransactionTable()
        self.stats = Stats()
        self._names = frozenset({config.domain.lower(), config.advertise.lower()}) | {
            n.lower() for n in config.local_names
        }
        self._suffix = "." + config.domain.lower()
        self._next_sweep = 0.0
        self._heap: list[tuple[float, int, InviteTransaction]] = []
        self._seq = 0
        # RFC 8599: what the shell must tell the push service (drained by it).
        self.push_out: list[PushEvent] = []
        self._pending_reg: dict[str, PendingRegister] = {}  # our REGISTER branch → device
        self._held: dict[PushTarget, list[InviteTransaction]] = {}  # device → INVITEs waiting
        # A device's current flow (by serial, AOR user, instance or push token) and, for a
        # device that registered again from another flow, old flow → new flow: in-dialog
        # requests for a phone that changed network follow it (RFC 5626 §4.2 in spirit).
        self._device_flow: dict[tuple[str, str, str | PushTarget], KnownDevice] = {}
        self._alias: dict[Flow, Moved] = {}
        self._next_device_sweep = 0.0

    # ------------------------------------------------------------------ entry
    def on_message(self, msg: SipMessage, source: Flow, now: float) -> list[Send]:
        if log.isEnabledFor(DEBUG):
            what = msg.method if isinstance(msg, Request) else f"{msg.status}/{msg.cseq[1]}"  # type: ignore[attr-defined]
            log.debug("event=sip_in call_id=%s msg=%s flow=%s", msg.call_id, what, source)
        if isinstance(msg, Request):
            # The method is the sender's choice: count unknown ones together so
            # that a flood of invented methods cannot grow the counters forever.
            method = msg.method if msg.method in COUNTED_METHODS else "other"
            self.stats.inc(f"requests_in_total:{method}")
            return self._on_request(msg, source, now)
        assert isinstance(msg, Response)
        self.stats.inc("responses_in_total")
        return self._on_response(msg, source, now)

    def has_transaction(self, req: Request) -> bool:
        """Whether ``req`` (an INVITE) matches a transaction the relay keeps: a
        retransmission, not a new call."""
        try:
            return self.txns.get(self._txn_key_from(req, req.top_via())) is not None
        except (LookupError, SipParseError):
            return False

    def on_parse_error(self, err: SipParseError, source: Flow) -> list[Send]:
        """A request we could read enough of gets its 400/505/513; the rest is dropped."""
        self.stats.inc(f"parse_errors_total:{err.status}")
        if err.message is not None and isinstance(err.message, Request) and err.message.method != "ACK":
            return [self._reply(err.message, source, err.status, err.reason)]
        self.stats.inc("dropped_total:unparseable")
        return []

    def on_flow_closed(self, flow: Flow) -> None:
        if self.registry.flow_closed(flow) is not None:
            self.stats.inc("pbx_unregistered_total:flow_closed")
        if self._held and flow.reliable:
            # Nobody is left to answer: a phone woken for these calls must not ring.
            for target, waiting in list(self._held.items()):
                gone = [t for t in waiting if t.inbound == flow]
                for txn in gone:
                    self.stats.inc("push_holds_total:caller_gone")
                    log.info("event=push_hold_ended call_id=%s reason=caller_gone", txn.call_id)
                    txn.held = None
                    self.txns.remove(txn)
                if gone:
                    left = [t for t in waiting if t.inbound != flow]
                    if left:
                        self._held[target] = left
                    else:
                        del self._held[target]

    # ----------------------------------------------------------------- requests
    def _on_request(self, req: Request, source: Flow, now: float) -> list[Send]:
        try:
            via = req.top_via()
        except (LookupError, SipParseError):
            self.stats.inc("dropped_total:no_via")
            return []
        self._stamp_via(req, via, source)
        if req.method == "CANCEL":
            return self._on_cancel(req, source, now)
        if req.method == "INVITE":
            txn = self.txns.get(self._txn_key_from(req, via))
            if txn is not None:
                # A retransmission: answer with what we last sent, forward nothing.
                self.stats.inc("retransmissions_absorbed_total")
                return [Send(source, txn.last_response)] if txn.last_response else []
        elif req.method == "ACK":
            # The ACK of a non-2xx matches the INVITE's server transaction
            # (RFC 3261 §17.2.3: same branch and sent-by, method INVITE).
            txn = self.txns.get(self._txn_key_from(req, via, "INVITE"))
            if txn is not None and txn.local_final:
                return []  # ACK for the 408 the relay generated itself
            if txn is not None and txn.released and txn.outbound is not None and txn.final:
                # The caller's Route names the flow the phone slept on; the INVITE
                # went out on the one it woke up on: so does the ACK (§17.1.1.3).
                return self._downstream_request(txn, "ACK", req.get("to") or "")
        try:
            return self._route(req, source, via, now)
        except SipParseError as e:
            return self._refuse(req, source, e.status, e.reason, now)

    def _route(self, req: Request, source: Flow, via: Via, now: float) -> list[Send]:
        # RFC 3261 §16.3 request validation.
        try:
            ruri = SipUri.parse(req.uri)
        except SipParseError as e:
            if e.status == 416:
                return self._refuse(req, source, 416, "Unsupported URI Scheme", now)
            raise
        if ruri.headers:
            # RFC 4475 §3.1.2.11: escaped headers in a Request-URI are never forwarded.
            return self._refuse(req, source, 400, "Headers in Request-URI", now)
        proxy_require = req.get_all("proxy-require")
        if proxy_require:
            return self._refuse(
                req, source, 420, "Bad Extension", now,
                extra=[("Unsupported", ", ".join(proxy_require))],
            )
        mf_value = req.get("max-forwards")
        mf = int(mf_value) if mf_value is not None else limits.DEFAULT_MAX_FORWARDS

        # Loose routing (§16.4): strip our own Route entries, keep the token.
        token: str | None = None
        ftag: str | None = None
        while True:
            top = req.get_all("route")
            if not top:
                break
            try:
                route_uri = SipUri.parse(NameAddr.parse(top[0]).uri)
            except SipParseError:
                break
            if not self._is_us(route_uri):
                break
            req.pop_first_value("route")
            if route_uri.user:
                token = route_uri.user
                ftag = route_uri.params.get("ftag")

        if token is None and self._is_us(ruri) and not req.has("route"):
            return self._for_us(req, ruri, source, via, mf, now)
        if mf <= 0:
            return self._refuse(req, source, 483, "Too Many Hops", now)

        if token is not None:
            try:
                phone_flow, payload = self.tokens.verify(token)
            except BadToken:
                self.stats.inc("forbidden_total:bad_token")
                return self._refuse(req, source, 403, "Forbidden", now)
            kind, _, serial = payload.partition(".")
            path_device = ""
            if kind == TOKEN_PATH:
                serial, _, path_device = serial.partition(".")
            pbx = self.registry.lookup(serial, now) if serial else None
            if self._alias and kind != TOKEN_PATH:
                phone_flow = self._moved(phone_flow, serial, now)
            if self._towards_phone(req, source, kind, ftag, pbx.flow if pbx else None):
                if source == phone_flow:
                    return self._refuse(req, source, 482, "Loop Detected", now)
                if kind == TOKEN_PATH and (pbx is None or pbx.flow.remote_ip != source.remote_ip):
                    # Only the registrar the phone registered with may use its
                    # Path: from the PBX's address (any port or connection).
                    self.stats.inc("forbidden_total:path_not_from_pbx")
                    return self._refuse(req, source, 403, "Forbidden", now)
                dead = phone_flow.reliable and not self.flow_alive(phone_flow)
                if dead or self._udp_asleep(phone_flow, now):
                    target = uri_push_target(req.uri) if self.cfg.push and path_device else None
                    user = path_user(path_device, target) if target is not None else None
                    if user is not None and target is not None and req.method == "INVITE":
                        # RFC 8599 §5.3.2: the phone sleeps; wake it and hold the call.
                        return self._hold(req, source, via, serial, target, user, mf, now)
                    if dead:
                        self.stats.inc("flow_failed_total")
                        # RFC 5626 §5.3: 430 tells the PBX this flow is gone.
                        return self._refuse(req, source, 430, "Flow Failed", now)
                return self._forward(req, source, via, phone_flow, serial, phone_flow, mf, now, True)
            if pbx is None:
                return self._refuse(req, source, 480, "Temporarily Unavailable", now)
            if pbx.flow == source:
                return self._refuse(req, source, 482, "Loop Detected", now)
            return self._forward(req, source, via, pbx.flow, serial, phone_flow, mf, now, False)

        target_serial = self._serial_of_host(ruri.host)
        if target_serial is None:
            self.stats.inc("forbidden_total:foreign_domain")
            return self._refuse(req, source, 403, "Forbidden", now)
        serial = target_serial
        if self.directory(serial) is None:
            return self._refuse(req, source, 404, "Not Found", now)
        pbx = self.registry.lookup(serial, now)
        if pbx is None:
            return self._refuse(req, source, 480, "Temporarily Unavailable", now)
        if pbx.flow == source:
            # A PBX addressing its own domain through us would loop straight back.
            return self._refuse(req, source, 482, "Loop Detected", now)
        return self._forward(req, source, via, pbx.flow, serial, source, mf, now, False)

    @staticmethod
    def _towards_phone(
        req: Request, source: Flow, kind: str, ftag: str | None, pbx_flow: Flow | None,
    ) -> bool:
        """Which end of the dialog a token-routed request is for.

        A Path token is only ever used by the registrar, the PBX. For a
        Record-Route token, ``ftag`` is the From tag of the request that made
        the route and ``kind`` says who sent it (TOKEN_FROM_PHONE/PBX): a
        request carrying that From tag comes from the same party (Kamailio's
        rr ``ftag`` rule). This holds when the PBX uses another connection or
        the phone another network; the source flow decides only when the
        route carries no ftag.
        """
        if kind == TOKEN_PATH:
            return True
        if ftag is not None and kind in (TOKEN_FROM_PHONE, TOKEN_FROM_PBX):
            from_creator = (req.from_tag or "") == ftag
            return from_creator == (kind == TOKEN_FROM_PBX)
        return pbx_flow is not None and pbx_flow == source

    def _forward(
        self, req: Request, source: Flow, via: Via, target: Flow, serial: str, phone_flow: Flow,
        mf: int, now: float, to_phone: bool,
    ) -> list[Send]:
        """RFC 3261 §16.6: copy, Max-Forwards, Record-Route/Path, Via, send."""
        if req.method == "INVITE" and len(self.txns) >= MAX_TRANSACTIONS:
            self.stats.inc("overload_total")
            return self._refuse(req, source, 503, "Service Unavailable", now,
                                extra=[("Retry-After", "5")])
        loop = self._loop_hash(req)
        for value in req.get_all("via")[1:]:
            if OUR_BRANCH in value:  # only our own Vias can tell a loop
                branch = Via.parse(value).branch or ""
                if branch.startswith(OUR_BRANCH) and branch.endswith("." + loop):
                    return self._refuse(req, source, 482, "Loop Detected", now)
        if req.has("max-forwards"):
            req.set("Max-Forwards", str(mf - 1))
        else:
            req.insert_before("Max-Forwards", str(limits.DEFAULT_MAX_FORWARDS - 1))
        bindings: list[Binding] = []
        if req.method == "REGISTER":
            # RFC 3327: requests from the PBX to this phone come back through us,
            # on this very flow (RFC 5626 §5.1). With push parameters, the token
            # also names the device and its AOR user: only that device can be woken
            # along this Path, and only that user's next registration gets the call.
            bindings = register_bindings(req)
            push_b = next((b for b in bindings if b.target is not None), None)
            device = ""
            if push_b is not None and push_b.target is not None and self.cfg.push:
                device = "." + path_device_of(push_b.target, user_of(req.get("to")))
            token = self.tokens.mint(phone_flow, f"{TOKEN_PATH}.{serial}{device}")
            req.insert_before("Path", f"<{self._uri(token, target)};lr>")
        elif req.method in DIALOG_FORMING:
            kind = TOKEN_FROM_PBX if to_phone else TOKEN_FROM_PHONE
            token = self.tokens.mint(phone_flow, f"{kind}.{serial}")
            ftag = req.from_tag
            rr = f";lr;ftag={ftag}>" if ftag else ";lr>"
            # Double Record-Route when the two sides use different sockets
            # (RFC 5658): each side must see the entry it can reach. Inside a
            # dialog (re-INVITE) it is harmless and keeps target refreshes simple.
            if (source.transport, source.local_port) != (target.transport, target.local_port):
                req.insert_before("Record-Route", f"<{self._uri(token, source)}{rr}")
            req.insert_before("Record-Route", f"<{self._uri(token, target)}{rr}")
        if self.media is not None:
            refused = self._anchor_media(req, source, target, to_phone, now)
            if refused is not None:
                return refused
        branch = self._branch(req, via, loop)
        if req.method == "REGISTER":
            self._note_register(req, branch, serial, source, now, bindings)
        if req.method == "INVITE":
            # Kept before our Via goes on: what a 100 or a 408 to the UAC copies.
            upstream = [h for h in req.headers if h.name in _COPIED]
        req.insert_before("Via", self._our_via(target, branch, source))
        data = req.serialise()
        self.stats.inc("requests_forwarded_total")
        if req.method == "BYE":
            log.info("event=bye call_id=%s serial=%s from=%s", req.call_id, serial, source)
        if req.method != "INVITE":
            return [Send(target, data)]
        # INVITE: keep the transaction, answer 100 Trying at once (§16.7 step 2).
        txn = InviteTransaction(
            key=self._txn_key_from(req, via), inbound=source, created=now, outbound=target,
            forwarded=data, call_id=req.call_id, give_up_at=now + TIMER_C,
            upstream=upstream, to_phone=to_phone,
        )
        txn.downstream = {
            "uri": req.uri, "via": self._our_via(target, branch, source),
            "from": req.get("from") or "", "to": req.get("to") or "",
            "call-id": req.call_id, "cseq": str(req.cseq[0]),
            "route": ", ".join(req.get_all("route")),
        }
        if not target.reliable:
            txn.retransmit_at = now + T1
            txn.give_up_at = now + TIMER_B
            self._schedule(txn, txn.retransmit_at)
        self._schedule(txn, txn.give_up_at)
        txn.last_response = self._upstream_response(txn, 100, "Trying")
        self.txns.add(txn)
        self.txns.link_branch(branch, txn)
        log.info("event=invite call_id=%s serial=%s direction=%s from=%s to=%s", req.call_id, serial,
                 "to_phone" if to_phone else "to_pbx", source, target)
        return [Send(source, txn.last_response), Send(target, data)]

    def _for_us(
        self, req: Request, ruri: SipUri, source: Flow, via: Via, mf: int, now: float
    ) -> list[Send]:
        if req.method == "REGISTER":
            return self._pbx_register(req, ruri, source, now)
        if req.method == "OPTIONS":
            return [self._reply(req, source, 200, "OK", extra=[("Allow", ALLOW)])]
        if req.method == "ACK":
            return []
        return self._refuse(req, source, 404, "Not Found", now)

    # ------------------------------------------------------------- PBX phone-home
    def _pbx_register(self, req: Request, ruri: SipUri, source: Flow, now: float) -> list[Send]:
        to_uri = SipUri.parse(NameAddr.parse(req.get("to") or "").uri)
        serial = to_uri.user or ruri.user
        if not serial or (ruri.user and ruri.user != serial) or not self._is_us(to_uri):
            return self._refuse(req, source, 404, "Not Found", now)
        ha1s = self.directory(serial)
        authorization = req.get("authorization")
        bind = f"{source.transport}:{source.remote_ip}"
        verdict = "none"
        if authorization:
            verdict, username = self.auth.check(authorization, "REGISTER", ha1s, now, bind)
            if verdict == "ok" and username != serial:
                verdict = "fail"
        if verdict == "fail":
            # Wrong secret and unknown serial get the same answer: nobody can
            # use the relay to find out which serials exist.
            self.stats.inc("pbx_auth_failures_total")
            return self._refuse(req, source, 403, "Forbidden", now)
        if verdict != "ok":
            # RFC 3261 §22.4: challenge; stale=true when only the nonce aged.
            return [self._reply(
                req, source, 401, "Unauthorized",
                extra=[("WWW-Authenticate", c)
                       for c in self.auth.challenges(now, verdict == "stale", bind)],
            )]
        contacts = req.get_all("contact")
        expires_hdr = req.get("expires")
        if contacts == ["*"]:
            if expires_hdr is None or expires_hdr.strip() != "0":
                return self._refuse(req, source, 400, "Contact * needs Expires: 0", now)
            self.registry.unbind(serial)
            self.stats.inc("pbx_unregistered_total:request")
            return [self._reply(req, source, 200, "OK")]
        if not contacts:
            # A query: tell the PBX whether it is bound.
            reg = self.registry.lookup(serial, now)
            extra = []
            if reg is not None:
                extra.append(("Contact", f"<sip:{serial}@{format_host(reg.flow.remote_ip)}:"
                              f"{reg.flow.remote_port}>;expires={int(reg.expires_at - now)}"))
            return [self._reply(req, source, 200, "OK", extra=extra)]
        contact = NameAddr.parse(contacts[0])
        raw_expires = contact.params.get("expires") or expires_hdr
        try:
            expires = int(raw_expires) if raw_expires is not None else self.cfg.pbx_expires_default
        except ValueError:
            return self._refuse(req, source, 400, "Bad Expires", now)
        if expires == 0:
            self.registry.unbind(serial)
            self.stats.inc("pbx_unregistered_total:request")
            return [self._reply(req, source, 200, "OK")]
        if expires < self.cfg.pbx_expires_min:
            return self._refuse(
                req, source, 423, "Interval Too Brief", now,
                extra=[("Min-Expires", str(self.cfg.pbx_expires_min))],
            )
        expires = min(expires, self.cfg.pbx_expires_max)
        if self.registry.lookup(serial, now) is None:
            pbx_log.info("event=pbx_registered serial=%s flow=%s expires=%d", serial, source, expires)
        self.registry.bind(serial, source, now + expires)
        self.stats.inc("pbx_registrations_total")
        # RFC 3261 §10.3 step 8: the binding as granted, its other parameters kept.
        params = "".join(
            f";{k}" if v is None else f";{k}={v}" for k, v in contact.params.items() if k != "expires"
        )
        value = f"<{contact.uri}>{params};expires={expires}"
        return [self._reply(req, source, 200, "OK", extra=[("Contact", value)])]

    # ------------------------------------------------------- RFC 8599 wake-ups
    def _udp_asleep(self, flow: Flow, now: float) -> bool:
        """UDP has no connection to lose: a phone that sent nothing — not even a
        keepalive — for ``udp_asleep_after`` seconds is taken to be asleep (an iOS
        app cannot keep a UDP socket in the background at all)."""
        if flow.reliable or not self.cfg.push or self.flow_heard is None:
            return False
        heard = self.flow_heard(flow)
        return heard is None or now - heard > self.cfg.udp_asleep_after

    def _note_register(
        self, req: Request, branch: str, serial: str, source: Flow, now: float, bindings: list[Binding],
    ) -> None:
        """Remember a phone's REGISTER until the PBX answers it: only an accepted
        registration moves a device, updates the push service or releases a call."""
        if not bindings and not self._alias:
            return
        if len(self._pending_reg) >= MAX_PENDING_REGISTERS:
            self.stats.inc("dropped_total:pending_registers_full")
            return
        self._pending_reg[branch] = PendingRegister(
            serial, user_of(req.get("to")), source, bindings, now + PENDING_REGISTER_TTL)

    def _registered(self, pending: PendingRegister, resp: Response, now: float) -> list[Send]:
        """The PBX said 2xx: note the device's flow, tell the push service, and
        forward what waited for this phone."""
        out: list[Send] = []
        # Whoever registers from a flow now owns it: a move recorded away from this
        # address (NAT port reuse by someone else) no longer applies.
        self._alias.pop(pending.flow, None)
        granted = granted_expires(resp)
        for b in pending.bindings:
            key = (pending.serial, pending.username, b.device)
            expires = granted.get(b.contact_uri, b.expires)
            if b.expires == 0 or expires == 0:
                gone = self._device_flow.pop(key, None)
                target = b.target or (gone.target if gone is not None else None)
                if target is not None and self.cfg.push:
                    self.push_out.append(DeviceGone(target, pending.serial, pending.username))
                continue
            self._note_device(key, b.target, pending.flow, pending.serial, now, now + expires)
            if b.target is None or not self.cfg.push:
                continue
            self.push_out.append(DeviceSeen(b.target, pending.serial, pending.username, pending.flow))
            waiting = self._held.pop(b.target, None)
            for txn in waiting or ():
                out.extend(self._release(txn, b.contact_uri, pending, now))
        return out

    def _note_device(
        self, key: tuple[str, str, str | PushTarget], target: PushTarget | None, flow: Flow, serial: str,
        now: float, until: float,
    ) -> None:
        prev = self._device_flow.get(key)
        if prev is None and len(self._device_flow) >= MAX_DEVICES:
            self.stats.inc("dropped_total:devices_full")
            return
        self._device_flow[key] = KnownDevice(flow, target, until)
        if prev is None:
            return
        if prev.target is not None and prev.target != target and self.cfg.push:
            # Same phone (instance id), new push token: the old one is dead (DESIGN §3).
            self.push_out.append(DeviceGone(prev.target, key[0], key[1]))
        if prev.flow != flow and len(self._alias) < MAX_DEVICES:
            self._alias[prev.flow] = Moved(flow, serial, now, until)
            self.stats.inc("phone_moves_total")
            pbx_log.info("event=phone_moved serial=%s from=%s to=%s", serial, prev.flow, flow)

    def _moved(self, flow: Flow, serial: str, now: float) -> Flow:
        """The flow a phone last registered from, if it registered again elsewhere —
        only while the old flow is out of use: a closed connection, or a UDP address
        that has not been heard from since the phone left it."""
        for _ in range(4):  # a phone that moved several times: follow, but never loop
            nxt = self._alias.get(flow)
            if nxt is None or nxt.until < now or nxt.serial != serial:
                break
            if flow.reliable:
                if self.flow_alive(flow):
                    break
            else:
                heard = self.flow_heard(flow) if self.flow_heard is not None else None
                if heard is not None and heard > nxt.since:
                    break
            flow = nxt.flow
        return flow

    def _sweep_devices(self, now: float) -> None:
        self._device_flow = {k: v for k, v in self._device_flow.items() if v.until >= now}
        self._alias = {k: v for k, v in self._alias.items() if v.until >= now}
        self._next_device_sweep = now + DEVICE_SWEEP

    def _hold(
        self, req: Request, source: Flow, via: Via, serial: str, target: PushTarget, user: str, mf: int,
        now: float,
    ) -> list[Send]:
        """Answer 100, ask for a push, keep the INVITE until the phone registers
        again (then :meth:`_release`) or the ring timeout ends (480)."""
        if len(self.txns) >= MAX_TRANSACTIONS:
            self.stats.inc("overload_total")
            return self._refuse(req, source, 503, "Service Unavailable", now, extra=[("Retry-After", "5")])
        txn = InviteTransaction(
            key=self._txn_key_from(req, via), inbound=source, created=now, call_id=req.call_id,
            give_up_at=now + self.cfg.ring_timeout, to_phone=True,
            upstream=[h for h in req.headers if h.name in _COPIED],
            held=Held(req, via, serial, mf, target, self._stateless_tag(req), user),
        )
        txn.last_response = self._upstream_response(txn, 100, "Trying")
        self.txns.add(txn)
        self._schedule(txn, txn.give_up_at)
        self._held.setdefault(target, []).append(txn)
        self.push_out.append(WakeDevice(
            key=txn.key, target=target, serial=serial, user=user, call_id=req.call_id,
            caller=user_of(req.get("from")), callee=user_of(req.get("to")), src=source.remote,
            ring_timeout=self.cfg.ring_timeout,
        ))
        self.stats.inc("push_holds_total:started")
        log.info("event=push_hold call_id=%s serial=%s provider=%s", req.call_id, serial, target.provider)
        return [Send(source, txn.last_response)]

    def on_wake_result(self, key: tuple[str, ...], delivered: bool, now: float) -> list[Send]:
        """The push service's answer for a held INVITE: 180 Ringing once the push
        is on its way (Flexisip does the same), 480 when it could not be sent."""
        txn = self.txns.get(key)
        if txn is None or txn.held is None or txn.final:
            return []  # answered, released or timed out meanwhile
        log.info("event=push_result call_id=%s delivered=%s", txn.call_id, delivered)
        if not delivered:
            self.stats.inc("push_holds_total:push_failed")
            return self._end_hold(txn, now)
        if txn.held.ringing:
            return []
        txn.held.ringing = True
        txn.last_response = self._upstream_response(txn, 180, "Ringing", txn.held.tag)
        return [Send(txn.inbound, txn.last_response)]

    def _end_hold(self, txn: InviteTransaction, now: float) -> list[Send]:
        """No phone came: 480, or 487 when the caller CANCELled meanwhile."""
        held = txn.held
        assert held is not None
        status, reason = (
            (487, "Request Terminated") if txn.cancel_pending else (480, "Temporarily Unavailable"))
        txn.held = None
        waiting = self._held.get(held.target)
        if waiting is not None:
            if txn in waiting:
                waiting.remove(txn)
            if not waiting:
                del self._held[held.target]
        log.info("event=push_hold_ended call_id=%s status=%d", txn.call_id, status)
        txn.last_response = self._upstream_response(txn, status, reason, held.tag)
        txn.local_final = True
        self._finish(txn, now)
        self.stats.inc(f"responses_sent_total:{status}")
        return [Send(txn.inbound, txn.last_response)]

    def _release(
        self, txn: InviteTransaction, contact_uri: str, pending: PendingRegister, now: float,
    ) -> list[Send]:
        """Forward a held INVITE on the flow the phone just registered from, to the
        contact it registered (RFC 8599 §5.3.2). A CANCEL that came meanwhile follows
        the phone's first provisional response (RFC 3261 §9.1), so the app sees the
        call end instead of ringing for a call already gone."""
        held = txn.held
        if held is None or txn.final or self.txns.get(txn.key) is not txn:
            return []
        if held.serial != pending.serial or held.user != pending.username:
            # Another PBX's or another user's registration naming the same token: keep waiting.
            self.stats.inc("push_holds_total:release_refused")
            self._held.setdefault(held.target, []).append(txn)
            return []
        req = held.req
        req.set_uri(contact_uri)
        self.txns.remove(txn)
        txn.held = None
        self.stats.inc("push_holds_total:released")
        log.info("event=push_release call_id=%s flow=%s", txn.call_id, pending.flow)
        sends = self._forward(req, txn.inbound, held.via, pending.flow, held.serial, pending.flow, held.mf,
                              now, True)
        fresh = self.txns.get(txn.key)
        if fresh is None or fresh is txn:
            return sends  # refused on the way (media, overload): the caller got the answer
        hundred = fresh.last_response
        fresh.cancel_pending = txn.cancel_pending
        fresh.released = True
        fresh.upstream = txn.upstream
        if held.ringing:
            fresh.last_response = txn.last_response
        # The caller had our 100 long ago; the INVITE itself goes out.
        return [s for s in sends if s.data is not hundred]

    # ------------------------------------------------------------------ CANCEL
    def _on_cancel(self, req: Request, source: Flow, now: float) -> list[Send]:
        via = req.top_via()
        txn = self.txns.get(self._txn_key_from(req, via, "INVITE"))
        if txn is None:
            # RFC 3261 §16.10 says forward statelessly; with no INVITE state we
            # would not know where the INVITE went, so we answer instead.
            return self._refuse(req, source, 481, "Call/Transaction Does Not Exist", now)
        out = [self._reply(req, source, 200, "OK")]
        log.info("event=cancel call_id=%s final=%s", req.call_id, txn.final)
        if txn.final:
            return out
        if self.media is not None:
            self.media.failed(txn.call_id)  # a CANCELled re-INVITE keeps the call's media
        if not txn.got_provisional:
            # RFC 3261 §9.1: "a CANCEL ... SHOULD NOT be sent" before a provisional
            # response: the callee could not match it yet. Sent on the first one.
            txn.cancel_pending = True
            return out
        out.extend(self._cancel_downstream(txn))
        return out

    # ------------------------------------------------------------------- media
    def _anchor_media(
        self, req: Request, source: Flow, target: Flow, to_phone: bool, now: float,
    ) -> list[Send] | None:
        """Every SDP offer/answer in a request goes through the media relay
        (DESIGN §2 media row); BYE ends the call's media."""
        assert self.media is not None
        if req.method == "BYE":
            self.media.end(req.call_id)  # (the BYE itself is logged by _forward)
            return None
        if req.method not in SDP_METHODS or not _has_sdp(req):
            return None
        if req.method == "ACK" and req.call_id not in self.media.sessions:
            # An ACK answers an offer the relay anchored; one that answers nothing
            # must not make the relay bind ports it would hold for minutes.
            self.stats.inc("dropped_total:ack_sdp_without_session")
            return []
        try:
            req.set_body(self.media.on_sdp(req.call_id, PBX if to_phone else PHONE, req.body,
                                           source.remote_ip, now, target.remote_ip,
                                           offer=req.method in ("INVITE", "UPDATE")))
        except MediaError as e:
            self.stats.inc("media_refused_total")
            if req.method == "ACK":
                return []  # an ACK cannot be refused; without media it goes nowhere
            if "port" in str(e):
                return self._refuse(req, source, 503, "Service Unavailable", now,
                                    extra=[("Retry-After", "5")])
            return self._refuse(req, source, 488, "Not Acceptable Here", now)
        return None

    def _anchor_media_response(self, resp: Response, from_side: str, source_ip: str, now: float) -> bool:
        """Rewrite an answer (or late offer) in a response; False: drop it."""
        assert self.media is not None
        if not _has_sdp(resp):
            return True
        try:
            resp.set_body(self.media.on_sdp(resp.call_id, from_side, resp.body, source_ip, now))
        except MediaError:
            # Passing the SDP on untouched would send media around the relay,
            # which fails behind NAT: the caller sees no answer rather than a broken call.
            self.stats.inc("media_refused_total")
            return False
        return True

    def _cancel_downstream(self, txn: InviteTransaction) -> list[Send]:
        if txn.outbound is None or txn.cancelled:
            return []
        txn.cancelled = True
        self.stats.inc("cancels_forwarded_total")
        return self._downstream_request(txn, "CANCEL", txn.downstream["to"])

    def _downstream_request(self, txn: InviteTransaction, method: str, to: str) -> list[Send]:
        """CANCEL, or ACK for a non-2xx: the forwarded INVITE's Request-URI, Route
        set, From, Call-ID, CSeq number and top Via (RFC 3261 §9.1, §17.1.1.3)."""
        if txn.outbound is None:
            return []
        t = txn.downstream
        headers = [
            Header("Via", t["via"]),
            Header("Max-Forwards", str(limits.DEFAULT_MAX_FORWARDS)),
        ]
        if t["route"]:
            headers.append(Header("Route", t["route"]))
        headers += [
            Header("From", t["from"]), Header("To", to), Header("Call-ID", t["call-id"]),
            Header("CSeq", f"{t['cseq']} {method}"), Header("Content-Length", "0"),
        ]
        return [Send(txn.outbound, Request(method, t["uri"], headers).serialise())]

    # --------------------------------------------------------------- responses
    def _on_response(self, resp: Response, source: Flow, now: float) -> list[Send]:
        try:
            vias = resp.get_all("via")
            via = Via.parse(vias[0]) if vias else None
        except SipParseError:
            via = None
        if via is None or not (via.branch or "").startswith(OUR_BRANCH):
            self.stats.inc("dropped_total:response_not_ours")
            return []
        flow_token = via.params.get("pf")
        try:
            back, _ = self.tokens.verify(flow_token or "")
        except BadToken:
            self.stats.inc("dropped_total:response_bad_token")
            return []
        resp.pop_first_value("via")
        if not resp.has("via"):
            return []  # the answer to a CANCEL we generated
        if self._pending_reg and resp.cseq[1] == "REGISTER" and resp.status >= 200:
            pending = self._pending_reg.pop(via.branch or "", None)
            if pending is not None and resp.status < 300:
                out = self._send_response(resp.serialise(), back)
                return out + self._registered(pending, resp, now)
        txn = self.txns.by_our_branch(via.branch or "")
        if txn is not None and resp.cseq[1] == "INVITE":
            if resp.status < 200 and not txn.final:
                # Any provisional, 100 included, ends Timer A and Timer B (RFC 3261
                # §17.1.1.2); from then on proxy Timer C applies, and one other
                # than 100 restarts it (§16.7 step 2).
                txn.retransmit_at = None
                txn.got_provisional = True
                give_up = now + TIMER_C if resp.status > 100 else txn.created + TIMER_C
                # One heap entry per second at most, however fast 180s come in.
                if give_up > txn.give_up_at + 1.0 or txn.give_up_at < txn.created + TIMER_C:
                    txn.give_up_at = give_up
                    self._schedule(txn, give_up)
                if txn.cancel_pending:
                    # RFC 3261 §9.1: a CANCEL waits for a provisional response.
                    txn.cancel_pending = False
                    cancel = self._cancel_downstream(txn)
                    if resp.status == 100:
                        return cancel
                    return [*cancel, *self._on_response_forward(resp, txn, source, now)]
            if resp.status == 100:
                return []  # hop by hop: we sent our own 100 already (§16.7 step 3)
            return self._on_response_forward(resp, txn, source, now)
        if self.media is not None and resp.cseq[1] in SDP_METHODS and resp.status >= 200:
            # UPDATE/PRACK answers: from the side the response is not going to
            to_pbx = self.registry.serial_of(back) is not None
            if _has_sdp(resp) and not self._anchor_media_response(
                resp, PHONE if to_pbx else PBX, source.remote_ip, now,
            ):
                return []
            if resp.cseq[1] == "UPDATE":
                if resp.status < 300:
                    self.media.established(resp.call_id)
                else:
                    self.media.failed(resp.call_id)
        return self._send_response(resp.serialise(), back)

    def _on_response_forward(
        self, resp: Response, txn: InviteTransaction, source: Flow, now: float,
    ) -> list[Send]:
        """A response (not 100) to an INVITE the relay keeps a transaction for."""
        if self.media is not None and not txn.local_final:
            if resp.status >= 300:
                self.media.failed(txn.call_id)
            elif not self._anchor_media_response(
                resp, PHONE if txn.to_phone else PBX, source.remote_ip, now,
            ):
                return []
            elif resp.status >= 200:
                self.media.established(txn.call_id)
        txn.retransmit_at = None
        data = resp.serialise()
        if txn.local_final:
            # The caller already has our 408: end the callee's transaction
            # ourselves (RFC 3261 §17.1.1.3, ACK for a non-2xx). A 2xx still
            # goes to the caller (§16.7 step 5): the callee answered.
            if resp.status >= 300:
                return self._downstream_request(txn, "ACK", resp.get("to") or "")
            if resp.status < 200:
                return []
        if resp.status >= 200 and not txn.final:
            log.info("event=invite_final call_id=%s status=%d", txn.call_id, resp.status)
            self._finish(txn, now)
        if not txn.final or resp.status >= 200:
            txn.last_response = data  # a late provisional does not replace the final
        return self._send_response(data, txn.inbound)

    def _send_response(self, data: bytes, back: Flow) -> list[Send]:
        if back.reliable and not self.flow_alive(back):
            self.stats.inc("dropped_total:response_flow_gone")
            return []
        self.stats.inc("responses_forwarded_total")
        return [Send(back, data)]

    # ------------------------------------------------------------------ timers
    def _schedule(self, txn: InviteTransaction, when: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, txn))

    def _finish(self, txn: InviteTransaction, now: float) -> None:
        txn.final = True
        txn.retransmit_at = None
        txn.expires_at = now + LINGER
        self._schedule(txn, txn.expires_at)

    def next_timer(self) -> float:
        """When on_timer must run next (absolute, same clock as ``now``)."""
        return min(self._heap[0][0], self._next_sweep) if self._heap else self._next_sweep

    def on_timer(self, now: float) -> list[Send]:
        out: list[Send] = []
        if now >= self._next_sweep:
            for _ in self.registry.expire(now):
                self.stats.inc("pbx_unregistered_total:expired")
            if self.media is not None:
                for _ in self.media.expire(now):
                    self.stats.inc("media_sessions_ended_total:no_media")
            if self._pending_reg:
                self._pending_reg = {b: p for b, p in self._pending_reg.items() if p.until > now}
            if now >= self._next_device_sweep:
                self._sweep_devices(now)
            self._next_sweep = now + 1.0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, txn = heapq.heappop(heap)
            if self.txns.get(txn.key) is not txn:
                continue  # already gone; a stale heap entry
            if txn.final:
                if now >= txn.expires_at:
                    self.txns.remove(txn)
                continue
            if now >= txn.give_up_at and txn.held is not None:
                # The woken phone did not register within the ring timeout.
                self.stats.inc("push_holds_total:timeout")
                out.extend(self._end_hold(txn, now))
                continue
            if now >= txn.give_up_at:
                # Timer B (UDP, nothing heard) or C (rang too long): 408 upstream
                # and, if the far end rang, CANCEL it (RFC 3261 §16.8).
                if txn.got_provisional:
                    out.extend(self._cancel_downstream(txn))
                txn.last_response = self._upstream_response(txn, 408, "Request Timeout")
                txn.local_final = True
                if self.media is not None:
                    self.media.failed(txn.call_id)
                self._finish(txn, now)
                self.stats.inc("invite_timeouts_total")
                log.info("event=invite_timeout call_id=%s status=408", txn.call_id)
                out.append(Send(txn.inbound, txn.last_response))
                continue
            if txn.retransmit_at is not None and now >= txn.retransmit_at and txn.outbound:
                out.append(Send(txn.outbound, txn.forwarded))
                self.stats.inc("invite_retransmissions_total")
                txn.interval *= 2
                txn.retransmit_at = now + txn.interval
                self._schedule(txn, txn.retransmit_at)
        return out

    def _upstream_response(
        self, txn: InviteTransaction, status: int, reason: str, to_tag: str | None = None,
    ) -> bytes:
        req = Request("INVITE", "sip:invalid", list(txn.upstream))
        tag = to_tag or (_tag() if status > 100 else None)
        return make_response(req, status, reason, to_tag=tag).serialise()

    # ----------------------------------------------------------------- pieces
    def _reply(
        self, req: Request, source: Flow, status: int, reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> Send:
        resp = make_response(req, status, reason, to_tag=self._stateless_tag(req), extra=extra)
        return Send(source, resp.serialise())

    def _refuse(
        self, req: Request, source: Flow, status: int, reason: str, now: float,
        extra: list[tuple[str, str]] | None = None,
    ) -> list[Send]:
        self.stats.inc(f"responses_sent_total:{status}")
        if req.method == "ACK":
            return []  # ACK is never answered (RFC 3261 §17.1.1.3)
        log.log(logging.INFO if req.method == "INVITE" else DEBUG,
                "event=refused call_id=%s method=%s status=%d flow=%s",
                req.call_id, req.method, status, source)
        # Stateless, like Kamailio's sl_send_reply: a retransmission is refused
        # again, and a flood of INVITEs costs no memory.
        send = self._reply(req, source, status, reason, extra)
        return [send]

    def _stamp_via(self, req: Request, via: Via, source: Flow) -> None:
        """RFC 3261 §18.2.1 received, RFC 3581 rport, on the top Via."""
        needs_received = via.host != source.remote_ip
        wants_rport = "rport" in via.params and not via.params.get("rport")
        if not needs_received and not wants_rport:
            return
        for i, h in enumerate(req.headers):
            if h.name == "via":
                values = split_commas(h.value)
                top = values[0]
                if wants_rport:
                    top = _set_param(top, "rport", str(source.remote_port))
                if needs_received or wants_rport:
                    top = _set_param(top, "received", source.remote_ip)
                req.headers[i] = Header(h.raw_name, ", ".join([top, *values[1:]]))
                return

    def _our_via(self, target: Flow, branch: str, inbound: Flow) -> str:
        port = self.cfg.ports.get(target.transport, 5060)
        return (
            f"SIP/2.0/{target.transport.upper()} {format_host(self.cfg.advertise)}:{port}"
            f";branch={branch};pf={self.tokens.mint(inbound)}"
        )

    def _uri(self, token: str, facing: Flow) -> str:
        port = self.cfg.ports.get(facing.transport, 5060)
        tp = "" if facing.transport == "udp" else f";transport={facing.transport}"
        return f"sip:{token}@{format_host(self.cfg.advertise)}:{port}{tp}"

    def _is_us(self, uri: SipUri) -> bool:
        if uri.host not in self._names:
            return False
        return uri.port is None or uri.port in self.cfg.ports.values()

    def _serial_of_host(self, host: str) -> str | None:
        if host.endswith(self._suffix):
            label = host[: -len(self._suffix)]
            if label and "." not in label:
                return label
        return None

    @staticmethod
    def _txn_key_from(req: Request, via: Via, method: str | None = None) -> TxnKey:
        """RFC 3261 §17.2.3 (branch + sent-by), or the RFC 2543 fallback."""
        branch = via.branch or ""
        if branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
            return (branch, via.sent_by(), method or req.method)
        from_tag = req.from_tag or ""
        return (
            "2543", req.uri, from_tag, req.call_id, str(req.cseq[0]), via.sent_by(),
            method or req.method,
        )

    def _branch(self, req: Request, via: Via, loop: str) -> str:
        """Stateless-proxy branch (RFC 3261 §16.11): the same for a retransmission,
        for the CANCEL and for the ACK of a non-2xx of the same INVITE."""
        key = self._txn_key_from(req, via, "INVITE")
        mac = hmac.new(self._branch_key, "|".join(key).encode(), hashlib.sha256).digest()[:9]
        return f"{OUR_BRANCH}{base64.urlsafe_b64encode(mac).decode()}.{loop}"

    def _stateless_tag(self, req: Request) -> str:
        """RFC 3261 §8.2.7: a stateless answer to a retransmission carries the same
        To tag, so it is derived from the request, not drawn at random."""
        try:
            key = self._txn_key_from(req, req.top_via())
        except (LookupError, SipParseError):
            key = (req.call_id, str(req.cseq[0]))
        return hmac.new(self._branch_key, b"tag|" + "|".join(key).encode(), hashlib.sha256).hexdigest()[:12]

    def _loop_hash(self, req: Request) -> str:
        """RFC 3261 §16.6 item 8: what must differ for a spiral not to be a loop."""
        from_tag = req.from_tag or ""
        data = f"{req.uri}|{from_tag}|{req.call_id}|{req.cseq[0]}".encode()
        return hashlib.sha256(data).hexdigest()[:8]


SDP_METHODS = frozenset({"INVITE", "ACK", "PRACK", "UPDATE"})


def _has_sdp(msg: SipMessage) -> bool:
    if not msg.body:
        return False
    ctype = (msg.get("content-type") or "").split(";")[0].strip().lower()
    return ctype == "application/sdp"


def _tag() -> str:
    return secrets.token_hex(6)


def _set_param(value: str, name: str, param: str) -> str:
    """Set ``;name=param`` on a Via value, replacing an empty or old one."""
    head, _, rest = value.partition(";")
    params = [p for p in rest.split(";") if p.strip()] if rest else []
    out = []
    done = False
    for p in params:
        if p.strip().split("=", 1)[0].strip().lower() == name:
            out.append(f"{name}={param}")
            done = True
        else:
            out.append(p.strip())
    if not done:
        out.append(f"{name}={param}")
    return ";".join([head.rstrip(), *out])


