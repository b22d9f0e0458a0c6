"""The proxy's cluster events and routes (docs/cluster.md): a part of :class:`relay.proxy.core.Proxy`.

What a node of a cluster does beyond one relay — a lookup's outcome and the retry of an
INVITE its cached node no longer holds, a token another node minted, a request for a PBX
registered elsewhere, the 480 that says "not held here", bans shared by other nodes, a
phone woken for a call held elsewhere (relay/proxy/crosswake.py) — kept apart from the
coordinator so that core.py stays the SIP proxy. A mixin: it owns no state; the names it
reads are the Proxy's, declared below for the type checker. Pure like the rest of the core.
"""

from __future__ import annotations

import hashlib

from mypy_extensions import mypyc_attr

from relay.proxy.counters import Counters
from relay.proxy.crosswake import WokenElsewhere, device_id, parse_woken, woken_message
from relay.proxy.devices import PendingRegister, Registered
from relay.proxy.effects import (
    LOCATE_BUSY,
    LOCATED,
    NOWHERE,
    ClaimPbx,
    Effect,
    ForgetPbx,
    LocatePbx,
    Send,
    Woken,
)
from relay.proxy.flow import Flow
from relay.proxy.forwarding import Hop
from relay.proxy.holds import Held, Holds
from relay.proxy.identity import OUR_BRANCH, RelayIdentity
from relay.proxy.mediacalls import MediaCalls
from relay.proxy.proxyconfig import ProxyConfig
from relay.proxy.registrar import PbxRegistrar
from relay.proxy.replies import Replies
from relay.proxy.routeentries import towards_phone
from relay.proxy.routetokens import TOKEN_PATH, Claim, RouteTokens
from relay.proxy.transaction import InviteTransaction, TransactionTable, TxnEvent, TxnKey, TxnState
from relay.sip.message import Request, Response

# Seconds a caller is asked to wait after a 503 for overload or a failed lookup.
OVERLOAD_RETRY_AFTER = 5
# The header of the 480 a node sends back over a link for a PBX it does not hold, naming
# the serial (docs/cluster.md, "The holder cache"). Only a 480 that came over a link
# (authenticated: another node) is believed; the node that gets it forgets its cached
# holder and, for an INVITE, asks the shared state once and sends it again. The header
# never leaves the relay: it is taken off every 480 that passes through.
NOT_HELD = "X-PbxRelay-Not-Held"
_NOT_HELD = NOT_HELD.lower()  # how Message.get/has/remove name it


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' RecordingProxy
class ClusterEvents:
    """The cluster's part of the Proxy (see the module's docstring)."""

    cfg: ProxyConfig
    counters: Counters
    replies: Replies
    txns: TransactionTable
    media: MediaCalls | None
    tokens: RouteTokens
    registrar: PbxRegistrar
    holds: Holds
    identity: RelayIdentity
    _wall_offset: float

    # The Proxy's own (core.py); declared here as real methods rather than under
    # TYPE_CHECKING so that mypyc can compile the class (docs/operations.md, "Compiled build").
    def _forward(self, hop: Hop, now: float, held: InviteTransaction | None = None) -> list[Effect]:
        raise NotImplementedError

    def _release(self, txn: InviteTransaction, held: Held, flow: Flow, now: float) -> list[Effect]:
        raise NotImplementedError

    def on_shared_ban(self, ip: str, seconds: float, now: float) -> None:
        """Another node of the cluster banned ``ip`` for wrong digest responses: REGISTERs
        from it are refused here too for ``seconds`` (docs/cluster.md, "Shared bans")."""
        self.registrar.impose_ban(ip, seconds, now)

    def on_located(self, locate: LocatePbx, link: Flow | None, outcome: str, now: float) -> list[Effect]:
        """What came of a ``LocatePbx``: ``link`` (outcome LOCATED) is the flow to the node
        that holds the PBX; NOWHERE gets the 480 of an offline PBX; LOCATE_FAILED and
        LOCATE_BUSY a 503 the phone may retry."""
        self.counters.inc("cluster_lookups_total", outcome)
        if locate.retry:
            return self._relocated(locate.retry, link, outcome, now)
        hop = locate.hop
        assert hop is not None
        if outcome == LOCATED and link is not None:
            hop.target = link
            if locate.node:
                hop.phone_flow = link  # our Record-Route names the way to the phone's node
            return self._forward(hop, now)
        if outcome == NOWHERE and locate.node:
            # RFC 5626 §5.3: the flow the token names is gone, with its node.
            self.counters.inc("flow_failed_total")
            return list(self.replies.refuse(hop.req, hop.source, 430, "Flow Failed"))
        if outcome == NOWHERE:
            return list(self.replies.refuse(hop.req, hop.source, 480, "Temporarily Unavailable"))
        retry = str(1 if outcome == LOCATE_BUSY else OVERLOAD_RETRY_AFTER)
        return list(self.replies.refuse(hop.req, hop.source, 503, "Service Unavailable",
                                        extra=[("Retry-After", retry)]))

    def _relocated(self, key: TxnKey, link: Flow | None, outcome: str, now: float) -> list[Effect]:
        """The fresh lookup of an INVITE the cached node said it no longer holds: the
        same INVITE (our Via, Record-Route and branch as before) on the new link, or the
        caller gets the answer it would have got without the cache."""
        txn = self.txns.get(key)
        if txn is None or txn.state is not TxnState.CALLING:
            return []
        if outcome == LOCATED and link is not None:
            txn.outbound = link
            return [Send(link, txn.forwarded)]
        status, reason = (480, "Temporarily Unavailable") if outcome == NOWHERE else (
            503, "Service Unavailable")
        self.counters.inc("responses_sent_total", str(status))
        txn.last_response = self.replies.upstream(txn, status, reason)
        self.txns.finish(txn, TxnEvent.TIMEOUT, now)
        effects: list[Effect] = [] if self.media is None else list(self.media.sessions.failed(txn.call_id))
        return [*effects, Send(txn.inbound, txn.last_response)]

    def claim_token(self, claim: ClaimPbx, now: float) -> str:
        """The signed flow token a ClaimPbx stores in the shared state: it names the
        PBX's flow on this node (payload ``n.<serial>``), good for the claim's TTL."""
        return self.tokens.tokens.mint(claim.flow, "n." + claim.serial, now + self._wall_offset + claim.ttl)

    def _to_node(
        self, hop: Hop, claim: Claim, ftag: str | None, stripped: list[str], now: float,
    ) -> list[Effect] | None:
        """A token another node minted (docs/cluster.md, "Tokens that name their node"): the
        phone's flow is on ``claim.node``. Towards the phone, the request goes to that node
        over a link with our Route entries put back (it routes them as its own), no lookup;
        towards the PBX, None: routed here as any request (the PBX's claim says where it is)."""
        req, source = hop.req, hop.source
        pbx = self.registrar.lookup(claim.serial, now) if claim.serial else None
        if not towards_phone(req, source, claim.kind, ftag, pbx.flow if pbx else None):
            return None
        if source.node_link:
            # One hop only: the node that sent it should have held the flow itself.
            self.counters.inc("flow_failed_total")
            return list(self.replies.refuse(req, source, 430, "Flow Failed"))
        if claim.kind == TOKEN_PATH and (pbx is None or pbx.flow.remote_ip != source.remote_ip):
            self.counters.inc("forbidden_total", "path_not_from_pbx")
            return list(self.replies.refuse(req, source, 403, "Forbidden"))
        req.insert_before("Route", ", ".join(stripped))
        return [LocatePbx(claim.serial, hop, node=claim.node)]

    def _elsewhere(self, hop: Hop) -> list[Effect]:
        """A request for a PBX not registered here: in a cluster, ask which node holds it
        (``LocatePbx``; ``hop.target`` is set by ``on_located``). One hop only: what came
        from another node, and everything on a single node, gets the 480 of an offline PBX."""
        if self.cfg.cluster and not hop.source.node_link:
            return [LocatePbx(hop.serial, hop)]
        # Over a link: the node that sent it may have a stale holder cached (NOT_HELD).
        extra = [(NOT_HELD, hop.serial)] if hop.source.node_link else None
        return list(self.replies.refuse(hop.req, hop.source, 480, "Temporarily Unavailable", extra=extra))

    def _not_held(self, resp: Response, source: Flow, branch: str) -> list[Effect]:
        """A 480 with NOT_HELD: taken off in any case; from a link, the cached holder of
        its serial is forgotten, and a first INVITE not yet answered is located afresh
        (once: a second NOT_HELD for it goes up to the caller)."""
        serial = resp.get(_NOT_HELD) or ""
        resp.remove(_NOT_HELD)
        if not source.node_link or not serial:
            return []  # a PBX's own header passing through: it means nothing
        txn = self.txns.by_our_branch(branch)
        if (isinstance(txn, InviteTransaction) and resp.cseq[1] == "INVITE" and txn.state is TxnState.CALLING
                and txn.serial == serial and not txn.relocated and not txn.to_phone):
            txn.relocated = True
            return [LocatePbx(serial, None, fresh=True, retry=txn.key)]
        return [ForgetPbx(serial)]

    def _woken(self, r: Registered, pending: PendingRegister) -> Woken:
        """Cluster: a node may hold calls for this device (crosswake, step 2)."""
        device = device_id(self.cfg.cluster_key, r.target, pending.serial, pending.username)
        woken = WokenElsewhere(device, pending.serial, pending.username, r.contact_uri, pending.path)
        branch = OUR_BRANCH + hashlib.sha256(f"{device}{pending.until}".encode()).hexdigest()[:20]
        return Woken(device, woken_message(woken, self.identity.advertise, branch))

    def _woken_elsewhere(self, req: Request, link: Flow, now: float) -> list[Effect]:
        """Another node says a device registered again through it (crosswake, step 3)."""
        woken = parse_woken(req)
        if woken is None:
            self.counters.inc("dropped_total", "bad_woken")
            return []
        return self.holds.release_elsewhere(woken, link, now, self._release)
