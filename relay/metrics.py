"""The relay's /metrics in the Prometheus text format, with # HELP and # TYPE for every family."""

from __future__ import annotations

from collections.abc import Mapping

from relay.proxy.counters import Counters


def render(prefix: str, counters: Counters, gauges: Mapping[str, tuple[str, float]]) -> str:
    """Counters by family (labelled ones with their label name), then the gauges
    (name → (help, value); a name ending in ``_total`` is typed a counter)."""
    lines: list[str] = []
    family = ""
    for metric, label, value in counters.items():
        if metric.name != family:
            family = metric.name
            lines += [f"# HELP {prefix}{family} {metric.help}", f"# TYPE {prefix}{family} {metric.kind}"]
        labels = f'{{{metric.label}="{_escape(label)}"}}' if metric.label else ""
        lines.append(f"{prefix}{family}{labels} {value}")
    for name, (help_text, gauge) in sorted(gauges.items()):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} {kind}",
                  f"{prefix}{name} {gauge}"]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_labelled(prefix: str, samples: Mapping[str, int], labels: Mapping[str, str], what: str) -> str:
    """Samples keyed "name" or "name:label value" (a component's own counters), one
    family per name; ``labels`` names each labelled family's label, ``what`` says
    whose they are in the help text."""
    families: dict[str, list[tuple[str, int]]] = {}
    for key, value in samples.items():
        name, _, label = key.partition(":")
        families.setdefault(name, []).append((label, value))
    lines: list[str] = []
    for name in sorted(families):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {prefix}{name} {what}: {name.replace('_', ' ')}", f"# TYPE {prefix}{name} {kind}"]
        for label, value in sorted(families[name]):
            tag = f'{{{labels.get(name, "kind")}="{_escape(label)}"}}' if label else ""
            lines.append(f"{prefix}{name}{tag} {value}")
    return "\n".join(lines) + "\n" if lines else ""
