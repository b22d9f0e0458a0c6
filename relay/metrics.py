"""The relay's /metrics on prometheus-client: the core's counters, the shell's gauges, components' counts.

The sans-I/O core keeps plain integers (relay.proxy.counters, each declared once in
its CATALOGUE with help text and label name); the shell adds gauges read at scrape
time. :class:`RelayCollector` turns both into prometheus-client metric families, so
the text, ``# HELP`` and ``# TYPE`` are prometheus-client's (DESIGN §8), on the
relay's own :class:`pbxcore.metrics.MetricSet` registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pbxcore.metrics import CONTENT_TYPE, MetricSet
from relay.proxy.counters import Counters

NAMESPACE = "pbx_relay"

# name → (help, value); a name ending in ``_total`` is typed a counter.
Gauges = Mapping[str, tuple[str, float]]
# A component's own counts keyed "name" or "name:label value", and its label names.
Labelled = tuple[Mapping[str, int], Mapping[str, str], str]


def _family(
    name: str, help_text: str, kind: str, labels: list[str],
) -> CounterMetricFamily | GaugeMetricFamily:
    full = f"{NAMESPACE}_{name}"
    if kind == "counter":
        return CounterMetricFamily(full, help_text, labels=labels)
    return GaugeMetricFamily(full, help_text, labels=labels)


class RelayCollector(Collector):
    """Everything /metrics shows, read at scrape time: ``counters`` (the core's),
    ``gauges()`` (the shell's) and ``labelled()`` (components with counts of their own,
    e.g. provisioning: (counts, label names, what they are))."""

    def __init__(self, counters: Counters, gauges: Callable[[], Gauges],
                 labelled: Callable[[], list[Labelled]]):
        self.counters = counters
        self.gauges = gauges
        self.labelled = labelled

    def collect(self) -> Iterator[Metric]:
        """The families with their values now."""
        yield from self._counters()
        for name, (help_text, value) in sorted(self.gauges().items()):
            family = _family(name, help_text, "counter" if name.endswith("_total") else "gauge", [])
            family.add_metric([], float(value))
            yield family
        for counts, labels, what in self.labelled():
            yield from _labelled(counts, labels, what)

    def _counters(self) -> Iterator[Metric]:
        family: CounterMetricFamily | GaugeMetricFamily | None = None
        for metric, label, value in self.counters.items():
            if family is None or family.name != _base(f"{NAMESPACE}_{metric.name}", metric.kind):
                if family is not None:
                    yield family
                labels = [metric.label] if metric.label else []
                family = _family(metric.name, metric.help, metric.kind, labels)
            family.add_metric([label] if metric.label else [], float(value))
        if family is not None:
            yield family


def _base(name: str, kind: str) -> str:
    """The family name prometheus-client keeps (a counter's without ``_total``)."""
    return name.removesuffix("_total") if kind == "counter" else name


def _labelled(counts: Mapping[str, int], labels: Mapping[str, str], what: str) -> Iterator[Metric]:
    families: dict[str, list[tuple[str, int]]] = {}
    for key, value in counts.items():
        name, _, label = key.partition(":")
        families.setdefault(name, []).append((label, value))
    for name in sorted(families):
        samples = families[name]
        label_names = [labels.get(name, "kind")] if any(label for label, _ in samples) else []
        family = _family(name, f"{what}: {name.replace('_', ' ')}",
                         "counter" if name.endswith("_total") else "gauge", label_names)
        for label, value in sorted(samples):
            family.add_metric([label] if label_names else [], float(value))
        yield family


def relay_metrics(collector: RelayCollector) -> Callable[[], tuple[str, str]]:
    """The /metrics route over ``collector`` on a registry of its own."""
    metrics = MetricSet(NAMESPACE)
    metrics.registry.register(collector)

    def route() -> tuple[str, str]:
        return CONTENT_TYPE, metrics.render().decode()

    return route
