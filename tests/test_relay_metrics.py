"""The relay's /metrics is prometheus-client's text: every counter of the catalogue with # HELP and # TYPE."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import RelayCollector, relay_metrics
from relay.proxy.counters import CATALOGUE, Counters


def test_every_catalogued_counter_is_exported_with_its_type_help_and_label() -> None:
    counters = Counters()
    for metric in CATALOGUE.values():
        counters.inc(metric.name, "x" if metric.label else "", 2)
    gauges = {"flows_open": ("TCP/TLS connections open", 3), "media_packets_total": ("RTP packets", 7)}
    parts = [({"provisioning_requests_total:504": 1}, {"provisioning_requests_total": "outcome"}, "Prov")]
    content_type, text = relay_metrics(RelayCollector(counters, lambda: gauges, lambda: parts))()
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for metric in CATALOGUE.values():
        name = f"pbx_relay_{metric.name}".removesuffix("_total" if metric.kind == "counter" else "")
        family = families[name]
        assert (family.type, family.documentation) == (metric.kind, metric.help)
        (sample,) = family.samples
        assert sample.value == 2 and sample.labels == ({metric.label: "x"} if metric.label else {})
    assert "# TYPE pbx_relay_flows_open gauge\npbx_relay_flows_open 3.0" in text
    assert families["pbx_relay_media_packets"].type == "counter"
    (prov,) = families["pbx_relay_provisioning_requests"].samples
    assert prov.labels == {"outcome": "504"} and prov.value == 1
