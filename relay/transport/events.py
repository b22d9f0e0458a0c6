"""What the transport layer reports to the service above it (a Protocol), and a plain implementation of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relay.proxy.flow import Flow
from relay.sip.errors import SipParseError
from relay.sip.message import SipMessage


class TransportEvents(Protocol):
    """Called synchronously from the transport's tasks; none of them may block.
    The transport never calls into the proxy: the service answers through
    ``Transports.send``/``send_many``."""

    def on_message(self, msg: SipMessage, flow: Flow) -> None:
        """A parsed SIP message arrived on ``flow``."""

    def on_error(self, err: SipParseError, flow: Flow) -> None:
        """Bytes on ``flow`` did not parse (``err.status`` says the answer due, if any)."""

    def on_opened(self, flow: Flow) -> None:
        """A TCP/TLS connection was accepted (and its TLS handshake completed)."""

    def on_closed(self, flow: Flow) -> None:
        """A TCP/TLS connection ended: nothing more can be sent on ``flow``."""

    def on_keepalive(self, flow: Flow) -> None:
        """Something that is not SIP came on ``flow``: a CRLFCRLF ping, a STUN
        binding request (RFC 5626 §4.4), any datagram that is neither. The peer
        is alive (RFC 8599: a UDP phone that sends nothing is asleep)."""

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` ("name:label" for a labelled one)."""


def _ignore(flow: Flow) -> None:
    return None


@dataclass(slots=True)
class EventHandlers:
    """TransportEvents from plain callables, for a service that has them apart."""

    message: Callable[[SipMessage, Flow], None]
    error: Callable[[SipParseError, Flow], None]
    counter: Callable[[str, int], None]
    closed: Callable[[Flow], None] = _ignore
    opened: Callable[[Flow], None] = _ignore
    keepalive: Callable[[Flow], None] = _ignore

    def on_message(self, msg: SipMessage, flow: Flow) -> None:
        """See TransportEvents."""
        self.message(msg, flow)

    def on_error(self, err: SipParseError, flow: Flow) -> None:
        """See TransportEvents."""
        self.error(err, flow)

    def on_opened(self, flow: Flow) -> None:
        """See TransportEvents."""
        self.opened(flow)

    def on_closed(self, flow: Flow) -> None:
        """See TransportEvents."""
        self.closed(flow)

    def on_keepalive(self, flow: Flow) -> None:
        """See TransportEvents."""
        self.keepalive(flow)

    def count(self, name: str, n: int = 1) -> None:
        """See TransportEvents."""
        self.counter(name, n)
