"""What the relay's tokens say: the Path of a registration, the Record-Route of a dialog, the flow of a Via.

Each token (relay.proxy.flowtoken) names a flow and carries a payload bound to
what it was minted for, with an expiry (docs/relay.md, "Flow tokens"):

- Path (``p.<serial>[.<device>]``): the phone's registration; good for the
  registration's requested lifetime (at most MAX_PATH_LIFETIME) and a margin.
- Record-Route (``c|s.<serial>.<dialog>``): one dialog, named by a hash of its
  Call-ID and the dialog creator's From tag; a request with another Call-ID or
  without that tag cannot use it. Good for DIALOG_LIFETIME.
- Via ``pf``: where a response goes back; good for the transaction and a margin.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from relay.proxy.flow import Flow
from relay.proxy.flowtoken import FlowTokens
from relay.sip.message import Request

TOKEN_PATH = "p"  # Path of a phone's REGISTER: requests on it go to the phone
TOKEN_FROM_PHONE = "c"  # Record-Route of a request the phone sent (ftag = its From tag)
TOKEN_FROM_PBX = "s"  # Record-Route of a request the PBX sent

# A dialog's route through the relay works this long after its first request. Kamailio's
# dialog module ends dialogs after 12 h by default (default_timeout = 43200 s); a day leaves
# room for long calls and SUBSCRIBE dialogs refreshed all day. A UA still in the dialog
# after that gets 403 to its in-dialog requests and sets up a new dialog.
DIALOG_LIFETIME = 24 * 3600.0
# The longest registration a Path token outlives; a phone asking for more (RFC 3261 lets
# it ask for days) re-registers within this, as the PBX's registrar usually grants less.
MAX_PATH_LIFETIME = 24 * 3600.0
# A response's way back: far beyond Timer C (180 s) and any transaction's linger.
VIA_LIFETIME = 3600.0
# Between the minting node's id and the payload (node ids are letters, digits, . _ -).
NODE_MARK = "|"


def dialog_id(call_id: str, creator_tag: str | None) -> str:
    """A short, fixed-size name of a dialog for a token payload."""
    digest = hashlib.sha256(f"{call_id}\x00{creator_tag or ''}".encode()).digest()[:6]
    return base64.urlsafe_b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class Claim:
    """What a verified Route token says."""

    kind: str  # TOKEN_PATH, TOKEN_FROM_PHONE or TOKEN_FROM_PBX
    flow: Flow  # the phone's flow when it was minted
    serial: str
    rest: str  # Path: the device ("" when none); Record-Route: the dialog id
    node: str = ""  # cluster: the node that minted it, where ``flow`` is ("" on one node)

    def is_path(self) -> bool:
        return self.kind == TOKEN_PATH

    def fits(self, req: Request, ftag: str | None) -> bool:
        """A Record-Route token is good only inside its own dialog: the request's Call-ID,
        and the creator's tag as its From or To tag."""
        if self.kind == TOKEN_PATH:
            return True
        if ftag is not None and ftag != req.from_tag and ftag != req.to().tag:
            return False
        return self.rest == dialog_id(req.call_id, ftag)


class RouteTokens:
    """Mints and reads the relay's tokens; ``wall`` is wall-clock seconds (tokens outlive
    a restart, the trio clock does not). ``node``: in a cluster, this node's id, written
    into every Path and Record-Route token (``<node>|<payload>``, under the signature):
    a node that reads a token minted by another knows where its flow is."""

    def __init__(self, tokens: FlowTokens, node: str = ""):
        self.tokens = tokens
        self._node = node + NODE_MARK if node else ""

    def path(self, flow: Flow, serial: str, device: str, expires: float, wall: float) -> str:
        """The Path token of a phone's REGISTER asking for ``expires`` seconds."""
        lifetime = min(max(expires, 0.0), MAX_PATH_LIFETIME) + VIA_LIFETIME
        payload = f"{TOKEN_PATH}.{serial}.{device}" if device else f"{TOKEN_PATH}.{serial}"
        return self.tokens.mint(flow, self._node + payload, wall + lifetime)

    def record_route(self, flow: Flow, kind: str, serial: str, req: Request, wall: float) -> str:
        """The Record-Route token of the dialog ``req`` creates."""
        payload = f"{kind}.{serial}.{dialog_id(req.call_id, req.from_tag)}"
        return self.tokens.mint(flow, self._node + payload, wall + DIALOG_LIFETIME)

    def via(self, flow: Flow, wall: float) -> str:
        """The ``pf`` token of our Via: the flow the response goes back on."""
        return self.tokens.mint(flow, "", wall + VIA_LIFETIME)

    def read(self, token: str, wall: float) -> Claim:
        """The claim of a Route token; BadToken (or ExpiredToken) otherwise."""
        flow, payload = self.tokens.verify(token, wall)
        node, mark, payload = payload.rpartition(NODE_MARK)
        kind, _, rest = payload.partition(".")
        serial, _, rest = rest.partition(".")
        return Claim(kind, flow, serial, rest, node if mark else "")

    def back(self, token: str, wall: float) -> Flow:
        """The flow a Via ``pf`` token names; BadToken otherwise."""
        return self.tokens.verify(token, wall)[0]
