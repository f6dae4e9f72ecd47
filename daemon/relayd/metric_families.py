"""Prometheus metric families, built one way everywhere: name, HELP, label names, samples.

Components and auth methods return these from ``metrics()``; relayd.metrics merges them into
the exposition. Families are made fresh at every scrape, so nothing is registered globally.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# One sample: its label values (in the order of the family's label names) and its value.
Sample = tuple[Sequence[str], float]


def counter(name: str, documentation: str, labels: Sequence[str] = (),
            samples: Iterable[Sample] = ()) -> Metric:
    """A counter family (exposed as ``NAME_total``)."""
    return _filled(CounterMetricFamily(name, documentation, labels=list(labels)), samples)


def gauge(name: str, documentation: str, labels: Sequence[str] = (),
          samples: Iterable[Sample] = ()) -> Metric:
    return _filled(GaugeMetricFamily(name, documentation, labels=list(labels)), samples)


def _filled(family: CounterMetricFamily | GaugeMetricFamily, samples: Iterable[Sample]) -> Metric:
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


__all__ = ["Metric", "Sample", "counter", "gauge"]
