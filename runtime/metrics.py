"""Prometheus metric families from plain numbers, for the custom collectors of both programs.

Each program keeps its counters as plain fields and turns them into families only when
scraped (prometheus_client's custom-collector API: `Collector.collect()` yields families), so
nothing on the event loop touches a metrics library. These build the three shapes they all
need: one gauge, one counter, a counter by one label.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def gauge(name: str, help_: str, value: float,
          labels: Mapping[str, str] | None = None) -> GaugeMetricFamily:
    """One gauge sample, with `labels` (name → value) if given."""
    family = GaugeMetricFamily(name, help_, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    """One counter sample (the exposition adds `_total`)."""
    family = CounterMetricFamily(name, help_)
    family.add_metric([], value)
    return family


def counter_by(name: str, help_: str, label: str,
               counts: Mapping[str, float]) -> CounterMetricFamily:
    """A counter with one sample per key of `counts`, labelled `label`, in key order."""
    family = CounterMetricFamily(name, help_, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([str(key)], float(n))
    return family


__all__ = ["counter", "counter_by", "gauge"]
