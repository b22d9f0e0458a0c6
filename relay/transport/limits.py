"""Named limits of the transport layer (sockets, connections, datagrams), each with its reason."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# ---------------------------------------------------------------- connections
# TCP and TLS connections open at once, both listeners together (they share the
# descriptor table). Kamailio's tcp_max_connections and tls_max_connections default
# to 2,048 each; we carry thousands of PBXs plus their phones on one node (DESIGN §6),
# and systemd/pbx-relay.service gives 65,536 descriptors, of which the media range
# may take 10,000. Each idle connection costs a descriptor and ~9 KiB over TCP, ~29 KiB
# over TLS (its reading task and, over TLS, ~17 KB of OpenSSL state; bench/RESULTS.md,
# issue 13), more while it has output queued: 16,384 stay under 1 GB. Config:
# transport.max_connections.
MAX_CONNECTIONS = 16_384

# Of those, the last ones only trusted sources (a registered PBX, a phone with a live
# registration, transport.exempt) may take: a flood of strangers fills the rest and
# the customers still get in. An eighth of the total. Config: transport.connections_reserved.
CONNECTIONS_RESERVED = 2_048

# Connections one untrusted source IP may hold. An office NAT puts a PBX and its
# phones behind one address, and the phones may connect before the PBX has registered
# again (after a relay restart) - 256 covers a large office; an attacker with four
# addresses holds 1,024 instead of all of them (the d9440f1 attack: 20,500 from 4).
# Precedent: Oracle SBC per-src-ip-max-incoming-conns, dnsdist setMaxTCPConnectionsPerClient.
# Config: transport.max_connections_per_source.
MAX_CONNECTIONS_PER_SOURCE = 256

# New connections per second from one untrusted source IP (burst: BURST_SECONDS of it).
# Opening and closing connections costs an accept, a task and (TLS) a handshake even
# under the per-source cap. A reconnecting office (every phone at once after a network
# flap) stays within a 2 s burst of 100. Precedent: dnsdist setMaxTCPConnectionRatePerClient,
# HAProxy maxconnrate. Config: transport.connection_rate_per_source.
CONNECTION_RATE_PER_SOURCE = 50.0

# TLS handshakes in progress at once from untrusted sources (trusted ones are never
# refused). A handshake costs a key exchange and signature; an open connection that
# never finishes one costs a slot for TLS_HANDSHAKE_TIMEOUT. Precedent: HAProxy
# maxsslconn / maxsslrate. Config: transport.max_tls_handshakes.
MAX_TLS_HANDSHAKES = 128

# Seconds a TLS client has to complete its handshake (RFC 5246 has no bound; Kamailio's
# tls connection_timeout and OpenSIPS' tls_handshake_timeout play the same role).
TLS_HANDSHAKE_TIMEOUT = 10.0

# ------------------------------------------------------------------ datagrams
# UDP datagrams per second one untrusted source IP may send before the rest is dropped
# unread (silently, counted): the gate runs before any parsing, so a flooding source
# costs one dict lookup per datagram. Kamailio's pike defaults to 30 requests per 2 s,
# Flexisip's DoSProtection to 20 packets/s averaged over 3 s per ip:port - both per
# message, banning on excess. We key by IP (one office NAT = one address, many phones)
# and so allow more: 200/s carries an office of 200 UDP phones re-registering at once
# (REGISTER + challenge in a 2 s burst), BLF NOTIFYs and keepalives. Trusted sources get
# TRUSTED_FACTOR times as much. Config: transport.udp_rate_per_source.
UDP_RATE_PER_SOURCE = 200.0

# A token bucket holds this many seconds of its rate: the burst a quiet source may send
# at once (pike's sampling_time_unit default is 2 s).
BURST_SECONDS = 2.0

# Trusted sources (registered PBX, phone with a live registration, transport.exempt)
# get this many times the per-source UDP and connection budgets: a customer's address
# is not a stranger's, but a compromised phone must still not take the relay.
TRUSTED_FACTOR = 10.0

# Source addresses the buckets remember at most. Each entry is ~200 bytes: 65,536 is
# ~13 MB. A bucket that has refilled is forgotten (it means nothing); when the table is
# full of active sources (a spoofed-source flood), the oldest entry goes first.
# Flexisip forgets a source after an hour of silence and cleans for at most 100 ms per pass.
MAX_SOURCES_TRACKED = 65_536

# Seconds between two passes that forget refilled buckets and look again at which
# sources are trusted (a phone that just registered gets its larger budget by then).
SOURCE_SWEEP_EVERY = 5.0

# Datagrams admitted (parsed and handled) per wake-up of the UDP reader before the
# other tasks (TCP flows, timers, media) get a turn: one scheduler round per burst
# instead of one per datagram, and never a long stall.
UDP_BATCH = 32

# Datagrams dropped by the gate per wake-up before the other tasks get a turn. A drop
# costs ~1 us, so a flood is read off the socket fast (keeping room in the receive
# buffer for everyone else's datagrams) without starving the rest of the relay.
UDP_DROP_BATCH = 512

# A source that goes on flooding - dropped datagrams over a check period past
# UDP_BAN_FACTOR times its whole budget (2,000/s over a 200/s budget) - is banned in
# the kernel: a socket filter (classic BPF on the UDP sockets) drops its datagrams
# before they are queued, so the flood costs the relay nothing at all and takes no
# room in the receive buffer from anyone else. Measured here: one source at ~750,000
# datagrams/s keeps the relay at ~98% of a core with the userspace gate alone.
# Config: transport.udp_ban_seconds (0: never ban). Trusted sources are never banned.
# Precedent: Flexisip's DoSProtection bans through iptables for 2 minutes; fail2ban.
# A spoofed flood can get a stranger's address banned for this long: keep it short.
UDP_BAN_SECONDS = 30.0
UDP_BAN_FACTOR = 10.0
UDP_BAN_CHECK_EVERY = 1.0
# Sources banned at once. Each is one compare per datagram in the kernel; a classic
# BPF jump reaches at most 255 instructions ahead. Beyond it, the gate alone.
MAX_UDP_BANS = 64

# ----------------------------------------------------------------- stream flows
# Bytes queued for one connection (beyond what its kernel socket buffer holds)
# before the peer counts as not reading and is closed: a phone on a bad link must
# not make the relay buffer without bound, but a busy PBX that pauses for a few
# seconds must survive — 2 MiB is ~2,000 INVITEs, 10 s at 200 calls/s.
SEND_QUEUE_BYTES = 2 * 1024 * 1024

# Bytes read from a socket at once (UDP: the largest datagram, relay.sip.limits).
READ_SIZE = 65_536

# Messages handled from one connection before the other tasks get a turn: one read
# (64 KiB) may hold ~200 small messages; a single busy connection must not hold up
# every other PBX for that long.
MESSAGES_PER_TURN = 16

# How long a connection being closed for lost framing may take to deliver its last
# answer (400/513) before it is dropped anyway.
FLUSH_TIMEOUT = 2.0

# ------------------------------------------------------------------ accepting
# An accept that fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
# ENOMEM) is retried after a delay that doubles from the first to the cap: the
# pending connection stays in the kernel's backlog meanwhile, so retrying at once
# would spin (trio.serve_listeners sleeps a fixed 0.1 s and logs a traceback each
# time). The cap bounds how late the relay notices descriptors coming back.
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_CAP = 1.0

# Listen backlog: connections the kernel completes before we accept them (Linux caps
# it at net.core.somaxconn, 4,096 by default since 5.4).
LISTEN_BACKLOG = 1024

# -------------------------------------------------------------------- notices
# A refusal is logged once per source per this many seconds, with the number refused
# since: a flood must not become a log flood (journald rate-limits a service at 10,000
# lines / 30 s and would drop the lines that matter).
NOTICE_EVERY = 10.0
# Sources whose last notice time is kept; past it the table is cleared (worst case:
# one more line per source).
MAX_NOTICE_SOURCES = 4096


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    """How long a TCP/TLS flow may stay silent (config: sip.flow_idle_timeout, default
    300 s: RFC 5626 keepalives come every 30-120 s) or leave half a message unfinished
    (sip.partial_message_timeout, default 10 s: a stalled peer must not pin a buffer)."""

    idle: float = 300.0
    partial: float = 10.0


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """The limits an operator may change (config [transport]); defaults are the
    constants above. ``exempt``: source IPs never limited per source (loopback, the
    operator's own monitoring), only by the totals."""

    max_connections: int = MAX_CONNECTIONS
    connections_reserved: int = CONNECTIONS_RESERVED
    max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE
    connection_rate_per_source: float = CONNECTION_RATE_PER_SOURCE
    max_tls_handshakes: int = MAX_TLS_HANDSHAKES
    udp_rate_per_source: float = UDP_RATE_PER_SOURCE
    udp_ban_seconds: float = UDP_BAN_SECONDS
    exempt: frozenset[str] = field(default_factory=lambda: frozenset({"127.0.0.1", "::1"}))

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> TransportLimits:
        """From the [transport] table of relay.toml (already type-checked); addresses
        in ``exempt`` are written the way the kernel reports a peer ("::1", not "0::1")."""
        values = {f.name: section[f.name] for f in fields(cls) if f.name in section}
        if "exempt" in values:
            values["exempt"] = frozenset(str(ipaddress.ip_address(a)) for a in values["exempt"])
        return cls(**values)
