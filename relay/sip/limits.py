"""Named limits of the SIP parser, each with its reason.

Every list a message can carry has a limit here, so that no message costs more
than a fixed amount of work whatever its shape (issue 10). What happens over a
limit: a request gets the answer RFC 3261 names for it — 513 Message Too Large
(§21.5.14: "the message length exceeded its capabilities") for anything too
large or too many, 414 Request-URI Too Long (§21.4.12) for the Request-URI, 400
for what is malformed rather than large — raised as ``SipLimitExceeded`` (a
``SipParseError`` whose ``limit`` names the constant). A response over a limit
is dropped and counted (``parse_errors_total`` and ``dropped_total:unparseable``
in the proxy), never answered.

There is no 413 here: RFC 3261 §21.4.11 is for a body larger than the server
accepts, and the SIP layer has no body limit of its own besides the message
limit (the body is carried, not read); an SDP body over its limits is refused
by the media layer with 488 (relay/media/sdp.py). 420 (Proxy-Require) is a
routing decision and stays with the proxy.

Precedents: Kamailio (src/core/config.h, src/core/parser/, commit 38711a3e),
OpenSIPS (config.h, parser/, commit 8f4f1e1b), Flexisip (module-registrar.cc,
module-forward.cc, commit b3cf98c0). Where none of them has a limit, the reason
is the relay's own and says so.

The work budget. Each octet of a message is looked at a bounded number of times
(no rescans), by C code; Python steps only over things capped below (header
fields, lines, list values, parameters). So one message costs at most
``WORK_PER_MESSAGE`` steps plus C time linear in its size, which is capped:
tests/test_sip_budget.py counts the steps (Python line events inside relay/sip)
for adversarial shapes; bench/run_parse.py prints the CPU time.
"""

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

# Physical lines of the header section, start line and continuation lines
# included. Folding (RFC 3261 §7.3.1) lets a peer spread a field over as many
# lines as it likes; the parser steps once per line, so this caps those steps.
# RFC 4475 wsinv.dat folds 6 lines; real peers seldom fold at all. Four lines
# per allowed header field. Over it → 513.
MAX_LINES = 4 * MAX_HEADERS

# One physical line (start line or header line, before unfolding). longreq.dat
# has 593-octet lines; Kamailio accepts lines up to the buffer size. 8 KiB is
# twice what a large Contact with push parameters and +sip.instance needs.
# Over it → 400 (a line this long is a broken peer, not a big message).
MAX_LINE_LENGTH = 8 * 1024

# One header value after unfolding (RFC 3261 §7.3.1: a value may go on over
# continuation lines, each under MAX_LINE_LENGTH). Twice the line limit: a
# folded Contact list of a REGISTER's 200 with many bindings still fits, and no
# single value can take more than half of the header section. Kamailio and
# OpenSIPS bound a value only by their buffer (BUF_SIZE). Over it → 513.
MAX_HEADER_VALUE = 16 * 1024

# -- lists ---------------------------------------------------------------------------
# Each list below is split into values at parse time (once, in one pass) and the
# message is refused when one holds more values than its limit. Counting all of
# a kind's fields together: "Route: a" twice is two values, as is "Route: a, b".

# Via values (all Via fields). RFC 3261 §8.1.1.6: a UAC starts Max-Forwards at
# 70 and every proxy takes one off and adds one Via (§16.6 steps 3 and 8), so a
# request that made more than 70 hops has already been refused on its way under
# the default. RFC 4475 longreq.dat carries 34. Flexisip answers 483 when
# Max-Forwards is not above the Via count (module-forward.cc); Kamailio counts
# Vias (via_cnt) without a cap. Over it → 513.
MAX_VIAS = 70

# Route values. A route set holds one or two entries (double Record-Route,
# RFC 5658) per record-routing proxy of the dialog. Kamailio and OpenSIPS print
# at most 64 route entries (MAX_RR_HDRS in parser/parse_rr.c, print_rr_body)
# and fail beyond; the same cap keeps us interoperable with them. Over it → 513.
# This is the list the loose-routing loop walks (RFC 3261 §16.4): bounded here,
# walked in one pass there (SipMessage.pop_first_values).
MAX_ROUTES = 64

# Record-Route values: the same entries as a route set, before the UAC reverses
# them (RFC 3261 §12.1.2); the same limit as Route (Kamailio/OpenSIPS
# MAX_RR_HDRS). Over it → 513.
MAX_RECORD_ROUTES = 64

# Path values (RFC 3327): one per proxy between a phone and its registrar.
# Kamailio stores at most 512 octets of Path per binding (MAX_PATH_SIZE in
# config.h), OpenSIPS 255: a handful of entries. Ours alone is ~120 octets (it
# carries a flow token). 16 is more than those registrars can keep. Over → 513.
MAX_PATHS = 16

# Contact values. A REGISTER adds one binding (Flexisip refuses more than 12:
# max-contacts-per-registration, and keeps 12 per address of record:
# max-contacts-by-aor); its 200 lists every binding of the address of record; a
# 3xx lists the alternatives. Kamailio's parser stops at 256 per field
# (KSR_MAX_CONTACTS, parser/contact/contact.c). 32 is well above what a
# registrar keeps for one user. Over it → 513.
MAX_CONTACTS = 32

# Which header (full lower-case name) carries which list limit.
LIST_LIMITS: dict[str, tuple[str, int]] = {
    "via": ("MAX_VIAS", MAX_VIAS),
    "route": ("MAX_ROUTES", MAX_ROUTES),
    "record-route": ("MAX_RECORD_ROUTES", MAX_RECORD_ROUTES),
    "path": ("MAX_PATHS", MAX_PATHS),
    "contact": ("MAX_CONTACTS", MAX_CONTACTS),
}

# ',' in the header section (start line included): an upper bound on the
# comma-separated values of the whole message, whichever headers the proxy
# splits (Allow, Supported, Proxy-Require … as well as the lists above). A
# legitimate message has a few dozen (RFC 4475: at most 5); a REGISTER's 200
# with MAX_CONTACTS bindings that each quote +sip.methods stays under 500. No
# precedent in Kamailio, OpenSIPS or Flexisip (they parse lists lazily in C).
# Over it → 513.
MAX_COMMAS = 1024

# ';' in the header section: an upper bound on the parameters of the whole
# message (URI and header parameters). RFC 4475 has at most 17; a Via carries
# ~5, a Contact with RFC 8599 push parameters ~15. Our own choice, like
# MAX_COMMAS. Over it → 513.
MAX_SEMICOLONS = 1024

# Parameters of one header value, or of one URI (RFC 3261 §19.1.1 uri-parameters,
# §20 generic-param). A Contact of a push-capable phone has ~15 (pn-provider,
# pn-prid, pn-param, pn-*-str, +sip.instance, reg-id, expires, q …); Via ~5.
# None of Kamailio, OpenSIPS, Flexisip caps it (linked lists in C). Over → 513.
MAX_PARAMS = 32

# One URI (Request-URI, or the URI of a name-addr). Kamailio and OpenSIPS size
# their URI buffers at 1,024 octets (MAX_URI_SIZE in config.h) and cannot
# rewrite a longer one. A phone's Contact with RFC 8599 push parameters is
# ~450; longreq.dat's longest URI is 379. Over it: Request-URI → 414 Request-URI
# Too Long (RFC 3261 §21.4.12), any other URI → 513.
MAX_URI_LENGTH = 1024

# -- numbers ---------------------------------------------------------------------------

# RFC 3261 §8.1.1.5: CSeq "MUST be expressible as a 32-bit unsigned integer"
# and less than 2**31 when a UAC picks it; we reject anything above 2**32-1
# (RFC 4475 §3.1.2.4 scalar02.dat).
MAX_CSEQ = 2**32 - 1

# RFC 3261 §8.1.1.6: Max-Forwards is an integer 0-255; 70 is the default a
# proxy inserts when the header is missing (RFC 2543 peers, inv2543.dat).
MAX_MAX_FORWARDS = 255
DEFAULT_MAX_FORWARDS = 70

# -- the work budget (see the module docstring) ------------------------------------------

# Python line events inside relay/sip that parsing one message may cost, whatever
# its shape and size (and reading it the way the proxy does, again at most this
# much). Every loop in Python steps over something capped above (header fields,
# physical lines, commas, semicolons, parameters); the octets themselves are only
# touched by C code (bytes.find, str.split, compiled patterns), linear in the
# size, which MAX_MESSAGE_SIZE caps. tests/test_sip_budget.py searches for the
# costliest shapes with hypothesis and holds them under this: the worst found
# cost ~40,000 (70 Vias with 13 parameters each, 256 one-octet fields, a field
# folded over 1,000 lines), ~0.5 ms of CPU here; a plain INVITE costs ~600.
# bench/run_parse.py prints the CPU time of those shapes.
WORK_PER_MESSAGE = 60_000
