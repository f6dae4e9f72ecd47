"""The http_proxy's metric families: per-service counts from its Counters (relayd.metric_families)."""

from __future__ import annotations

from collections.abc import Iterator

from relayd.metric_families import Metric, counter

from .counters import Counters
from .store import COLUMNS


def proxy_metrics(component: str, counters: Counters) -> Iterator[Metric]:
    totals = sorted(counters.totals().items())
    labels = ["component", "service"]
    yield counter("relayd_http_proxy_requests", "Authorized requests", labels,
                  (([component, service], row[0]) for service, row in totals))
    yield counter("relayd_http_proxy_request_bytes", "Request body bytes", labels,
                  (([component, service], row[1]) for service, row in totals))
    yield counter("relayd_http_proxy_response_bytes", "Response body bytes", labels,
                  (([component, service], row[2]) for service, row in totals))
    yield counter("relayd_http_proxy_responses", "Responses by status class", labels + ["class"],
                  (([component, service, column.removeprefix("s")], row[i])
                   for service, row in totals for i, column in enumerate(COLUMNS[3:], start=3)))
    yield counter("relayd_http_proxy_rejected", "Requests refused by auth (401/403)", labels,
                  (([component, service], count) for service, count in sorted(counters.rejected_counts.items())))
