"""Named limits of provisioning through the relay, each with its reason and precedent.

Limits an operator may want to move are configuration keys (``[provisioning]`` in
config/relay.toml, defaults in :mod:`relay.provisioning.settings`); these are the
fixed ones, each bounding what one peer can make the relay hold.
"""

# ---------------------------------------------------------------- the phone side
# The request head (request line and header fields) of a phone's GET. h11's own
# default is 16 KiB; nginx reads request heads into 1 KiB buffers growing to 4 x
# 8 KiB (large_client_header_buffers), Apache caps one field at 8190 octets
# (LimitRequestFieldSize). A provisioning GET carries a path, a User-Agent and maybe
# an Authorization: 8 KiB is several times that. Over it → 431 and close.
MAX_REQUEST_HEAD = 8 * 1024

# Header fields in a phone's request head. Apache's LimitRequestFields is 100; a
# phone sends about ten. Also bounds what crosses the link: 100 fields of a head
# within MAX_REQUEST_HEAD stay under the agent's SETTINGS_MAX_HEADER_LIST_SIZE
# (2 x MAX_REQUEST_HEAD, RFC 9113 §6.5.2 counts 32 octets more per field). Over it → 431.
MAX_REQUEST_FIELDS = 100

# Seconds a phone has for the TLS handshake and the request head: a slowloris peer
# must not hold a connection slot. Apache's mod_reqtimeout default is 20-40 s for
# the head; nginx client_header_timeout is 60 s. A phone sends its GET at once.
REQUEST_HEAD_TIMEOUT = 10.0

# Seconds an idle keep-alive connection waits for the phone's next request. nginx's
# keepalive_timeout is 75 s, Apache's KeepAliveTimeout 5 s; phones fetch their files
# back to back, then go quiet for hours.
KEEPALIVE_IDLE = 15.0

# Seconds the relay waits for a phone to take more of a response body before it
# gives up on it (a phone that stops reading must not pin the PBX's stream). The
# relay's side of ``provisioning.body_idle_timeout`` is the PBX's.
PHONE_WRITE_TIMEOUT = 30.0

# What the relay reads from a phone's socket at once.
RECEIVE_SIZE = 16 * 1024

# ----------------------------------------------------------------- the link (h2)
# Each stream's receive window on the link (SETTINGS_INITIAL_WINDOW_SIZE the relay
# announces). The relay buffers at most this much of one response: it hands the
# window back only once the phone took the bytes (RFC 9113 §5.2), so a 100 MB file
# crosses the relay a window at a time. 256 KiB at 50 ms round trip is ~5 MB/s per
# download; curl and Go's http2 transport use 1-4 MiB to go faster on fat pipes.
STREAM_WINDOW = 256 * 1024

# The link's whole receive window: what the relay may hold for all of one PBX's
# downloads at once. 8 MiB = 32 streams' windows, so a phone that stops reading
# stalls only its own stream, never the other phones of that PBX (at the default
# provisioning.max_requests_per_serial = 32).
CONNECTION_WINDOW = 8 * 1024 * 1024

# The largest HTTP/2 frame either side accepts (SETTINGS_MAX_FRAME_SIZE). 16 KiB is
# RFC 9113's default and minimum; larger frames only save a few header bytes here.
MAX_FRAME = 16 * 1024

# Response header fields from the PBX, decoded (SETTINGS_MAX_HEADER_LIST_SIZE, RFC
# 9113 §6.5.2). 16 KiB: twice the phone's request head limit; a provisioning
# response carries a type, a length, an ETag, maybe a WWW-Authenticate.
MAX_RESPONSE_HEAD = 16 * 1024

# Streams open on one link at once (the relay never opens more, whatever the PBX
# announces). RFC 9113 §6.5.2 recommends allowing at least 100; it is also what the
# agent announces as SETTINGS_MAX_CONCURRENT_STREAMS. Per-serial limits come first.
MAX_STREAMS_PER_LINK = 100

# Seconds a PBX has to finish the link handshake (TLS, the digest challenge and the
# upgrade): the same slot a phone's head gets.
LINK_HANDSHAKE_TIMEOUT = REQUEST_HEAD_TIMEOUT

# Digest attempts on one link connection: the challenge, then one answer. A wrong
# answer closes the connection; the agent comes back after its backoff.
MAX_LINK_AUTH_ATTEMPTS = 2

# What the relay reads from a link at once.
LINK_RECEIVE_SIZE = 64 * 1024

# ------------------------------------------------------------------ access log
# Rows waiting for the access log's writer. Beyond it rows are dropped and counted
# (provisioning_access_log_dropped_total): a flood must not grow memory.
ACCESS_LOG_QUEUE = 10_000

# Rows in the access log at most. A phone fetching a few files a day makes a few
# thousand rows a year; 5 million (~250 MB) is thousands of PBXs' worth. Beyond,
# the purge deletes the oldest rows first (counted), so a peer hammering a known
# serial cannot fill the disk within the 12 months' retention.
MAX_ACCESS_LOG_ROWS = 5_000_000

# Rows the writer puts in one transaction: many requests, one fsync.
ACCESS_LOG_BATCH = 500

# Seconds between two purges of the access log (and one at start).
ACCESS_LOG_PURGE_EVERY = 3600.0
