"""The errors the SIP parser raises: SipParseError, and SipLimitExceeded for a limit."""

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


class SipLimitExceeded(SipParseError):
    """A message over one of the named limits of relay/sip/limits.py.

    ``limit`` is the constant's name (e.g. "MAX_ROUTES"), for tests and counters
    to tell limits apart without reading ``reason``; ``status`` is 513 (414 for
    the Request-URI), see limits.py.
    """

    def __init__(self, limit: str, reason: str, status: int = 513,
                 message: SipMessage | None = None):
        super().__init__(reason, status, message)
        self.limit = limit
