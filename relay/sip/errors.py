"""The one error the SIP parser raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.sip.message import SipMessage


class SipParseError(Exception):
    """A message that is not valid SIP, or breaks one of our limits.

    ``status`` is the response a request deserves (400, 505, 513 …); for a
    response it is informational — broken responses are dropped. ``message``
    is what could be parsed of it, when enough was readable to build an error
    response (Via, From, To, Call-ID, CSeq), else None.
    """

    def __init__(self, reason: str, status: int = 400, message: SipMessage | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.message = message
