"""Where signalling meets media: every SDP offer and answer goes through the media relay (DESIGN §2)."""

from __future__ import annotations

import ipaddress

from relay.media.effects import MediaEffect
from relay.media.session import PBX, PHONE, MediaError, MediaSessions, NoPorts, OverShare, Owner
from relay.proxy.counters import Counters
from relay.proxy.effects import Send
from relay.proxy.flow import Flow
from relay.proxy.replies import Replies
from relay.sip.headers import NameAddr
from relay.sip.message import Request, Response, SipMessage

SDP_METHODS = frozenset({"INVITE", "ACK", "PRACK", "UPDATE"})
# Over a link between nodes the flow's address is a node's, not the phone's or the PBX's:
# a node that passes a message from a phone or a PBX on to another node names that peer's
# IP in this header, and the anchoring node (``passes_through``) reads it as the side's
# signalling IP (where its media comes from and goes before latching). Believed only from
# a link (authenticated: another node); always taken off before a phone or a PBX sees it.
PEER = "X-PbxRelay-Peer"
_PEER = PEER.lower()  # how Message.get/has/remove name it
# Seconds a caller is asked to wait after 503 for want of media ports (RFC 3261 §21.5.4).
NO_PORTS_RETRY_AFTER = 5


def drop_foreign_peer(msg: SipMessage, source: Flow) -> None:
    """On arrival: :data:`PEER` from a phone or a PBX means nothing and goes, whatever
    the message (only a node names a peer; a message the media relay never reads must
    not carry a stranger's header on either)."""
    if not source.node_link and msg.has(_PEER):
        msg.remove(_PEER)


def has_sdp(msg: SipMessage) -> bool:
    """The body is an SDP (multipart bodies are not anchored: see relay.media.sdp)."""
    if not msg.body:
        return False
    ctype = (msg.get("content-type") or "").split(";")[0].strip().lower()
    return ctype == "application/sdp"


class MediaCalls:
    """Anchors the SDPs of requests and responses in :class:`MediaSessions`."""

    def __init__(self, sessions: MediaSessions, replies: Replies, counters: Counters):
        self.sessions = sessions
        self.replies = replies
        self.counters = counters

    def passes_through(self, call_id: str, link_in: bool, link_out: bool, initial: bool) -> bool:
        """Cluster (docs/cluster.md, "Media anchored once"): a call that crosses a link
        between nodes is anchored by the node where its first INVITE entered the cluster,
        which holds its session; every other node passes its SDPs on untouched (one media
        hop, not one per node). ``link_in``/``link_out``: the message came from / goes to
        another node; ``initial``: an INVITE outside any dialog."""
        if not (link_in or link_out) or call_id in self.sessions.sessions:
            return False
        return link_in or not initial

    def on_request(
        self, req: Request, source: Flow, target: Flow, to_phone: bool, now: float, serial: str = "",
        share: str = "",
    ) -> tuple[list[MediaEffect], list[Send] | None]:
        """Rewrite the SDP of a request on its way (BYE ends the call's media).
        Returns the media effects and, when the request must not go on, what to
        answer instead (an empty list: drop it silently)."""
        # A BYE ends the media only when it is accepted (``on_bye_answered``): a
        # stranger's BYE reusing a live call's Call-ID draws a 481 from the far end.
        initial = req.method == "INVITE" and _initial(req)
        if self.passes_through(req.call_id, source.node_link, target.node_link, initial):
            self.pass_on(req, source, target.node_link)
            return [], None
        signal_ip = self.signal_ip(req, source)
        if initial and self._live(req.call_id):
            # A second dialog-creating INVITE on a live call's Call-ID: a merged or
            # forged request (RFC 3261 §8.2.2.2), never a way into that call's media.
            self.counters.inc("media_refused_total", "call_id_in_use")
            return [], self.replies.refuse(req, source, 482, "Loop Detected")
        if not initial and self._someone_elses(req.call_id, serial):
            # A Call-ID names one call (RFC 3261 §8.1.1.4): the same one in a dialog of
            # another PBX is forged, aimed at that call's media (end it, or take it).
            self.counters.inc("media_refused_total", "call_id_in_use")
            if req.method == "ACK":
                return [], []
            return [], self.replies.refuse(req, source, 481, "Call/Transaction Does Not Exist")
        if req.method not in SDP_METHODS or not has_sdp(req):
            return [], None
        if req.method == "ACK" and req.call_id not in self.sessions.sessions:
            # An ACK answers an offer the relay anchored; one that answers nothing
            # must not make the relay bind ports it would hold for minutes.
            self.counters.inc("dropped_total", "ack_sdp_without_session")
            return [], []
        try:
            body, effects = self.sessions.on_sdp(
                req.call_id, PBX if to_phone else PHONE, req.body, signal_ip, now,
                "" if target.node_link else target.remote_ip, offer=req.method in ("INVITE", "UPDATE"),
                owner=Owner(serial, share) if serial else None)
        except MediaError as e:
            self.counters.inc("media_refused_total", _reason(e))
            if req.method == "ACK":
                return [], []  # an ACK cannot be refused; without media it goes nowhere
            if isinstance(e, NoPorts):
                return [], self.replies.refuse(req, source, 503, "Service Unavailable",
                                               extra=[("Retry-After", str(NO_PORTS_RETRY_AFTER))])
            return [], self.replies.refuse(req, source, 488, "Not Acceptable Here")
        req.set_body(body)
        return effects, None

    @staticmethod
    def pass_on(msg: SipMessage, source: Flow, link_out: bool) -> None:
        """A message this node passes through without anchoring: onto a link, it names
        the phone or PBX it came from (:data:`PEER`; what a peer put there is replaced);
        to a phone or a PBX, it carries no such header."""
        if link_out:
            if not source.node_link:
                msg.set(PEER, source.remote_ip)
        elif msg.has(_PEER):
            msg.remove(_PEER)

    @staticmethod
    def signal_ip(msg: SipMessage, source: Flow) -> str:
        """The IP the side that sent ``msg`` signals from: its flow's; over a link, what
        the node it came through named (:data:`PEER`, taken off here), "" if nothing
        usable (the side is then latched by the address its SDP names, or its next SDP)."""
        if not source.node_link:
            return source.remote_ip
        named = msg.get(_PEER)
        if named is None:
            return ""
        msg.remove(_PEER)
        return named if _is_ip(named) else ""

    def _someone_elses(self, call_id: str, serial: str) -> bool:
        """The call ``call_id`` has media anchored for another PBX than ``serial`` (""
        when unknown: over a link, whose node checked it)."""
        session = self.sessions.sessions.get(call_id)
        owner = session.owner if session is not None else None
        return bool(serial) and owner is not None and owner.serial != serial

    def _live(self, call_id: str) -> bool:
        session = self.sessions.sessions.get(call_id)
        return session is not None and session.established

    def on_bye_answered(self, resp: Response) -> list[MediaEffect]:
        """A final response to a BYE (its Call-ID is its request's: ``Proxy`` checked
        it): a 2xx ends the call's media, anything else leaves it (the far end did not
        know that dialog)."""
        if 200 <= resp.status < 300:
            return self.sessions.end(resp.call_id)
        return []

    def on_response(
        self, resp: Response, from_side: str, source: Flow, now: float,
    ) -> tuple[list[MediaEffect], bool]:
        """Rewrite an answer (or late offer) in a response; False: drop the response.
        Passing the SDP on untouched would send media around the relay, which fails
        behind NAT: the caller sees no answer rather than a broken call."""
        signal_ip = self.signal_ip(resp, source)
        if not has_sdp(resp):
            return [], True
        try:
            body, effects = self.sessions.on_sdp(resp.call_id, from_side, resp.body, signal_ip, now)
        except MediaError as e:
            self.counters.inc("media_refused_total", _reason(e))
            return [], False
        resp.set_body(body)
        return effects, True

    def _passed_on(self, resp: Response, source: Flow, back: Flow) -> bool:
        """A response this node does not anchor (``passes_through``), made ready to go
        ``back`` (:meth:`pass_on`)."""
        if not self.passes_through(resp.call_id, source.node_link, back.node_link, initial=False):
            return False
        self.pass_on(resp, source, back.node_link)
        return True

    def on_invite_response(
        self, resp: Response, to_phone: bool, source: Flow, back: Flow, now: float,
    ) -> tuple[list[MediaEffect], bool]:
        """A response to an INVITE, from ``source`` going ``back``: an error ends a call's
        media that never came up, a 2xx establishes it; SDP in either way is anchored
        (unless another node anchors this call). False: drop the response."""
        if self._passed_on(resp, source, back):
            return [], True
        if resp.status >= 300:
            self.signal_ip(resp, source)  # the header goes in any case
            return self.sessions.failed(resp.call_id), True
        effects, ok = self.on_response(resp, PHONE if to_phone else PBX, source, now)
        if ok and resp.status >= 200:
            effects += self.sessions.established(resp.call_id)
        return effects, ok

    def on_other_response(
        self, resp: Response, to_pbx: bool, source: Flow, back: Flow, now: float,
    ) -> tuple[list[MediaEffect], bool]:
        """A final response to UPDATE or PRACK, from the side it is not going to."""
        if self._passed_on(resp, source, back):
            return [], True
        effects, ok = self.on_response(resp, PHONE if to_pbx else PBX, source, now)
        if ok and resp.cseq[1] == "UPDATE":
            effects += (self.sessions.established(resp.call_id) if resp.status < 300
                        else self.sessions.failed(resp.call_id))
        return effects, ok


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _initial(req: Request) -> bool:
    """No To tag: a request outside any dialog (RFC 3261 §12.2)."""
    return NameAddr.parse(req.get("to") or "").tag is None


def _reason(e: MediaError) -> str:
    if isinstance(e, OverShare):
        return "over_share"
    return "no_ports" if isinstance(e, NoPorts) else "unusable_sdp"
