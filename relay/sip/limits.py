"""Named limits of the SIP parser, each with its reason."""

# The largest SIP message we accept, on any transport. A UDP datagram cannot be
# larger (65,535 octets less IP/UDP headers), Kamailio's BUF_SIZE is 65,535 and
# OpenSIPS uses the same; a message this size is already far beyond anything a
# PBX or softphone sends (RFC 3261 §18.1.1 wants messages above MTU-200 on TCP).
# Over the limit a request gets 513 Message Too Large (RFC 3261 §21.5.14).
MAX_MESSAGE_SIZE = 65_535

# The header section alone (start line to the empty line). Bounds how much a TCP
# peer can make us buffer before we have seen a Content-Length.
MAX_HEADER_SECTION = 32 * 1024

# Header fields per message. RFC 4475 longreq.dat, the longest message of the
# torture suite, has 44 lines; a call through a dozen proxies stays under 100.
# Bounds the work one message can cost. Over it → 513.
MAX_HEADERS = 256

# One physical line (start line or header line, before unfolding). longreq.dat
# has 593-octet lines; Kamailio accepts lines up to the buffer size. 8 KiB is
# twice what a large Contact with push parameters and +sip.instance needs.
# Over it → 400 (a line this long is a broken peer, not a big message).
MAX_LINE_LENGTH = 8 * 1024

# RFC 3261 §8.1.1.5: CSeq "MUST be expressible as a 32-bit unsigned integer"
# and less than 2**31 when a UAC picks it; we reject anything above 2**32-1
# (RFC 4475 §3.1.2.4 scalar02.dat).
MAX_CSEQ = 2**32 - 1

# RFC 3261 §8.1.1.6: Max-Forwards is an integer 0-255; 70 is the default a
# proxy inserts when the header is missing (RFC 2543 peers, inv2543.dat).
MAX_MAX_FORWARDS = 255
DEFAULT_MAX_FORWARDS = 70
