"""The relay's counters: plain integers the sans-I/O core keeps, each declared once.

A counter is a name from :data:`CATALOGUE` and, for labelled ones, one label value;
the exporter (the shell's /metrics) reads them at scrape time with their help text
and label name. Label values chosen by peers (SIP methods, statuses) are folded into
a bounded set before they get here, so no peer can grow the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    """One counter family: its name (``pbx_relay_`` is prefixed on export), what it
    counts, and its label's name when it has one."""

    name: str
    help: str
    label: str = ""
    kind: str = "counter"  # or "gauge": moved up and down (streams a backend holds)


_METRICS = (
    Metric("requests_in_total", "SIP requests received, by method (unknown methods as 'other')", "method"),
    Metric("responses_in_total", "SIP responses received"),
    Metric("requests_forwarded_total", "SIP requests forwarded"),
    Metric("responses_forwarded_total", "SIP responses forwarded"),
    Metric("responses_sent_total", "Responses the relay generated itself, by status", "status"),
    Metric("parse_errors_total", "Messages that were not valid SIP, by the status they deserved", "status"),
    Metric("dropped_total", "Messages dropped without an answer, by reason", "reason"),
    Metric("forbidden_total", "Requests refused with 403, by reason", "reason"),
    Metric("retransmissions_absorbed_total", "INVITE retransmissions answered from the transaction"),
    Metric("invite_retransmissions_total", "INVITEs the relay retransmitted downstream (Timer A)"),
    Metric("invite_timeouts_total", "INVITEs the relay ended with 408 (Timer B or C)"),
    Metric("cancels_forwarded_total", "CANCELs sent downstream"),
    Metric("overload_total", "INVITEs refused 503: the table, a source's or a PBX's share full",
           "reason"),
    Metric("calls_refused_total", "New calls refused, by reason", "reason"),
    Metric("flow_failed_total", "Requests for a phone whose connection is gone (430)"),
    Metric("pbx_registrations_total", "Accepted PBX registrations"),
    Metric("pbx_auth_failures_total", "PBX registrations refused for a wrong digest response"),
    Metric("pbx_auth_bans_total", "Sources banned for repeated wrong digest responses"),
    Metric("pbx_auth_bans_shared_total",
           "Sources banned here because another node of the cluster banned them"),
    Metric("pbx_auth_refused_total", "REGISTERs refused unchecked, by reason", "reason"),
    Metric("pbx_unregistered_total", "PBX bindings removed, by reason", "reason"),
    Metric("phone_moves_total", "Phones that registered again from another flow"),
    Metric("push_holds_total", "INVITEs held for a sleeping phone, by what came of them", "outcome"),
    Metric("push_wakes_total", "Wake-up results from the push service, by outcome", "outcome"),
    Metric("push_errors_total", "Requests to the push service that failed"),
    Metric("push_events_dropped_total", "Push events dropped because the push queue was full"),
    Metric("media_refused_total", "SDPs the media relay refused, by reason", "reason"),
    Metric("media_timeouts_total", "Calls ended because no media flowed for media.no_media_timeout"),
    Metric("media_bind_failures_total", "RTP port pairs that could not be bound (held by another program)"),
    Metric("cluster_lookups_total", "Requests for a PBX held by no local flow, looked up in the cluster, "
           "by outcome (located, nowhere, failed, busy)", "outcome"),
    Metric("cluster_store_errors_total", "Calls to the shared state (Redis/Valkey) that failed or timed out, "
           "by operation", "operation"),
    Metric("cluster_claims_dropped_total", "Claims and releases dropped: their queue was full"),
    Metric("cluster_bans_dropped_total", "Bans not shared with the other nodes: their queue was full"),
    Metric("cluster_wakes_total", "Wake-ups across nodes: calls awaited in the shared state, nodes told "
           "of a device that registered here, failures (docs/cluster.md)", "outcome"),
    Metric("cluster_node_links_total", "Requests sent to the node a token names (no lookup), on a link "
           "open already (open) or opened for it (opened)", "link"),
    Metric("cluster_lookup_cache_total", "Lookups of a PBX's node answered by the holder cache (hit), "
           "asked of the shared state (miss), and cached holders dropped early (forgotten)", "result"),
    Metric("cluster_links_refused_total", "Links from or to other nodes refused or failed, by reason",
           "reason"),
    Metric("internal_errors_total", "Messages that hit a bug (one message lost, the relay kept running)"),
    # The shell's (transports, media forwarder): kept in the same table, one /metrics.
    Metric("connections_total", "TCP/TLS connections accepted, by transport", "transport"),
    Metric("keepalives_total", "CRLF keepalives received, by transport", "transport"),
    Metric("stun_requests_total", "STUN binding requests answered on the SIP UDP port"),
    Metric("flows_closed_total", "TCP/TLS connections the relay closed, by reason", "reason"),
    Metric("connections_refused_total", "TCP/TLS connections refused at accept, by reason", "reason"),
    Metric("accept_failures_total", "accept() failures (descriptors exhausted...), by errno name", "error"),
    Metric("messages_unsent_total", "Messages forwarded but never written: their connection closed first"),
    Metric("udp_dropped_total", "UDP datagrams dropped unread, by reason", "reason"),
    Metric("udp_bans_total", "UDP sources banned in the kernel for flooding"),
    Metric("framing_lost_total", "TCP/TLS connections closed because SIP framing was lost"),
    Metric("tls_handshake_failures_total", "TLS handshakes that failed or timed out"),
    Metric("receive_errors_total", "Socket receive errors, by transport", "transport"),
    Metric("send_errors_total", "Socket send errors, by transport", "transport"),
    Metric("media_dropped_total", "RTP/RTCP packets dropped, by reason", "reason"),
    Metric("media_receive_errors_total", "RTP/RTCP socket receive errors"),
    Metric("media_streams_forwarded", "RTP streams (one per leg and direction) forwarded now, by backend",
           "backend", kind="gauge"),
    Metric("media_kernel_errors_total", "nftables commands of the kernel media backend that failed"),
)
CATALOGUE: dict[str, Metric] = {m.name: m for m in _METRICS}


class Counters:
    """Monotonic counters by (name, label value). Incrementing is one dict update:
    it sits on the path of every message."""

    __slots__ = ("_values", "catalogue")

    def __init__(self, catalogue: dict[str, Metric] | None = None) -> None:
        self.catalogue = CATALOGUE if catalogue is None else catalogue
        self._values: dict[tuple[str, str], int] = {}

    def inc(self, name: str, label: str = "", n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (with ``label`` for a labelled family)."""
        key = (name, label)
        self._values[key] = self._values.get(key, 0) + n

    def get(self, name: str, label: str = "") -> int:
        """The current value (0 for a counter never incremented)."""
        return self._values.get((name, label), 0)

    def items(self) -> Iterator[tuple[Metric, str, int]]:
        """(family, label value, value) of every counter that moved; a name missing
        from the catalogue is a bug and raises KeyError here, at scrape time."""
        for (name, label), value in sorted(self._values.items()):
            yield self.catalogue[name], label, value
