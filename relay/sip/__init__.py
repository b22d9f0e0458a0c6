"""SIP message model, parser, serialiser and stream framer (sans-I/O)."""

from relay.sip.errors import SipParseError
from relay.sip.framer import FramingLost, Invalid, Ping, StreamFramer
from relay.sip.message import Header, Request, Response, SipMessage, make_response
from relay.sip.parser import parse_message
from relay.sip.uri import SipUri

__all__ = [
    "FramingLost", "Header", "Invalid", "Ping", "Request", "Response", "SipMessage",
    "SipParseError", "SipUri", "StreamFramer", "make_response", "parse_message",
]
