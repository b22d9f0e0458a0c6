"""Prometheus metrics on prometheus-client: declared once with help and label names, with # HELP / # TYPE.

Two ways in:

- A trio component updates :class:`prometheus_client.Counter`, ``Gauge`` and
  ``Histogram`` objects made by :class:`MetricSet` (labels are label *names* declared
  with the metric, never text inside a key).
- A pure (sans-I/O) component keeps plain numbers of its own and knows nothing of
  Prometheus; :class:`PlainExport` reads them at scrape time through a callable and
  exposes them under the names, help text and labels declared once in its
  :class:`Plain` specs.

Each service has its own :class:`MetricSet` (its own registry, never the process-wide
default one): ``pbx-relay run`` and the tests hold several services in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The classic text format (0.0.4) generate_latest writes; Prometheus 2 and 3 both read it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every counter would otherwise get a second series <name>_created holding a start
# timestamp: noise on a dashboard, and nothing here reads it.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# A plain component's value: one number, or label values → number for a labelled metric.
PlainValue = float | Mapping[tuple[str, ...], float]


class MetricSet:
    """The metrics of one service under one name prefix (``pbx_push``, ``pbx_relay``)."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """A counter ``<namespace>_<name>`` (``name`` ends in ``_total``)."""
        return Counter(name, help, list(labels), namespace=self.namespace, registry=self.registry)

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge ``<namespace>_<name>``."""
        return Gauge(name, help, list(labels), namespace=self.namespace, registry=self.registry)

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = (),
    ) -> Histogram:
        """A histogram ``<namespace>_<name>`` with these upper bounds (+Inf is added)."""
        return Histogram(name, help, list(labels), namespace=self.namespace, registry=self.registry,
                         buckets=list(buckets))

    def export(self, specs: Iterable[Plain], read: Callable[[], Mapping[str, PlainValue]]) -> PlainExport:
        """Expose a pure component's plain numbers; see :class:`PlainExport`."""
        collector = PlainExport(self.namespace, specs, read)
        self.registry.register(collector)
        return collector

    def render(self) -> bytes:
        """The whole set in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


@dataclass(frozen=True)
class Plain:
    """One plain number a pure component keeps: its name (without the namespace), what
    it means, counter or gauge, and its label names (the component's values for a
    labelled metric are keyed by tuples of label values in this order)."""

    name: str
    help: str
    kind: Literal["counter", "gauge"] = "counter"
    labels: tuple[str, ...] = ()


class PlainExport(Collector):
    """A prometheus-client collector over plain numbers read at scrape time.

    ``read()`` returns ``{name: value}``; a labelled metric's value is
    ``{(label values...): number}``. A declared name missing from ``read()`` shows as
    0 (unlabelled) or without samples (labelled); names ``read()`` returns that no
    spec declares are left out, and :meth:`undeclared` lists them (for a test)."""

    def __init__(self, namespace: str, specs: Iterable[Plain],
                 read: Callable[[], Mapping[str, PlainValue]]):
        self.namespace = namespace
        self.specs = {s.name: s for s in specs}
        self.read = read

    def describe(self) -> Iterator[Metric]:
        """The families, without samples (lets the registry refuse a name used twice)."""
        for spec in self.specs.values():
            yield self._family(spec)

    def collect(self) -> Iterator[Metric]:
        """The families with the values ``read()`` gives now."""
        values = self.read()
        for spec in self.specs.values():
            family = self._family(spec)
            value = values.get(spec.name)
            if spec.labels:
                for label_values, number in (value if isinstance(value, Mapping) else {}).items():
                    family.add_metric(list(label_values), float(number))
            else:
                family.add_metric([], float(value) if isinstance(value, int | float) else 0.0)
            yield family

    def undeclared(self) -> list[str]:
        """Names ``read()`` returns now that no spec declares."""
        return sorted(set(self.read()) - set(self.specs))

    def _family(self, spec: Plain) -> CounterMetricFamily | GaugeMetricFamily:
        name = f"{self.namespace}_{spec.name}"
        if spec.kind == "counter":
            return CounterMetricFamily(name, spec.help, labels=list(spec.labels))
        return GaugeMetricFamily(name, spec.help, labels=list(spec.labels))


def parse(text: str) -> dict[str, float]:
    """Prometheus text → ``{'name{label="v",...}': value}`` with labels in name order
    (for tests and the operator commands; ``_created`` series are left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
