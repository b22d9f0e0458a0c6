"""Responses the relay generates itself: stateless refusals and a transaction's own answers."""

from __future__ import annotations

import hmac
import logging
import secrets

from relay.proxy.counters import Counters
from relay.proxy.effects import Send
from relay.proxy.flow import Flow
from relay.proxy.keyedmac import Sha256Mac
from relay.proxy.transaction import InviteTransaction, TxnKey
from relay.sip.errors import SipParseError
from relay.sip.headers import NameAddr, Via
from relay.sip.message import Request, make_response

log = logging.getLogger("relay.calls")

MAGIC_COOKIE = "z9hG4bK"


def txn_key(req: Request, via: Via, method: str | None = None) -> TxnKey:
    """The server transaction a request belongs to: RFC 3261 §17.2.3 (branch and
    sent-by), or the RFC 2543 fallback for a branch without the magic cookie."""
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
        return (branch, via.sent_by(), method or req.method)
    return (
        "2543", req.uri, req.from_tag or "", req.call_id, str(req.cseq[0]), via.sent_by(),
        method or req.method,
    )


class Replies:
    """Builds the relay's own responses. Refusals are stateless, like Kamailio's
    ``sl_send_reply``: a retransmission is refused again with the same To tag, and a
    flood of requests costs no memory."""

    def __init__(self, key: bytes, counters: Counters):
        self._mac = Sha256Mac(key)
        self.counters = counters

    def reply(
        self, req: Request, source: Flow, status: int, reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> Send:
        """``status`` to ``req``'s sender, with a To tag derived from the request."""
        resp = make_response(req, status, reason, to_tag=self.stateless_tag(req), extra=extra)
        return Send(source, resp.serialise())

    def refuse(
        self, req: Request, source: Flow, status: int, reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> list[Send]:
        """A counted, logged refusal; nothing at all for an ACK (RFC 3261 §17.1.1.3)."""
        self.counters.inc("responses_sent_total", str(status))
        if req.method == "ACK":
            return []
        log.log(logging.INFO if req.method == "INVITE" else logging.DEBUG,
                "event=refused call_id=%s method=%s status=%d flow=%s",
                req.call_id, req.method, status, source)
        return [self.reply(req, source, status, reason, extra)]

    def stateless_tag(self, req: Request, method: str | None = None) -> str:
        """RFC 3261 §8.2.7: a stateless answer to a retransmission carries the same
        To tag, so it is derived from the request, not drawn at random. ``method``: the
        request's transaction is that of another method (an ACK's is its INVITE's)."""
        try:
            key = txn_key(req, req.top_via(), method)
        except (LookupError, SipParseError):
            key = (req.call_id, str(req.cseq[0]))
        return self._mac.digest(b"tag|" + "|".join(key).encode())[:6].hex()

    def acks_a_refusal(self, ack: Request) -> bool:
        """``ack`` acknowledges one of this relay's stateless refusals of an INVITE (its To
        tag is the one :meth:`refuse` gave): hop by hop, it ends here (§17.1.1.3), as
        Kamailio's sl module absorbs the ACKs of its own replies."""
        try:
            tag = NameAddr.parse(ack.get("to") or "").tag
        except SipParseError:
            return False
        if tag is None or len(tag) != 12:
            return False
        return hmac.compare_digest(tag, self.stateless_tag(ack, "INVITE"))

    @staticmethod
    def upstream(txn: InviteTransaction, status: int, reason: str, to_tag: str | None = None) -> bytes:
        """The transaction's own answer to its caller (100, 180, 408, 480, 487)."""
        req = Request("INVITE", "sip:invalid", list(txn.upstream))
        tag = to_tag or (secrets.token_hex(6) if status > 100 else None)
        return make_response(req, status, reason, to_tag=tag).serialise()
