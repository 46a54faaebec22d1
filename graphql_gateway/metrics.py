"""What the GraphQL gateway counts (``GatewayStats``) and the Prometheus collector that reads it at
scrape time (``GatewayCollector``, registered into the agent's registry by ``setup_graphql``).

Metrics (``operation`` is the operation's name, "anonymous" without one, and "other" once
``MAX_OPERATION_NAMES`` distinct names have been seen: clients choose names, labels stay bounded):

- ``pgsidecar_graphql_operations_total{operation,result}``: result ok (no errors), error (executed
  with field errors), rejected (a request error: unparsable, invalid, over a limit; no SQL ran),
  timeout (``graphql.query_timeout_s``)
- ``pgsidecar_graphql_operation_duration_seconds{operation}`` (histogram)
- ``pgsidecar_graphql_operation_sql_statements{operation}`` (histogram): the SQL statements each
  executed operation sent through the proxy (one per relation per level when batching works)
- ``pgsidecar_graphql_resolver_errors_total{kind}``: field errors by kind: argument (a GraphQL error
  a resolver raised: a bad id, a page size), database (PostgreSQL's error), connection (the proxy
  could not be reached), internal (a bug: logged with its traceback)
- ``pgsidecar_graphql_subscriptions``: WebSocket subscriptions running now
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = ["DURATION_BUCKETS", "MAX_OPERATION_NAMES", "STATEMENT_BUCKETS", "GatewayCollector", "GatewayStats"]

MAX_OPERATION_NAMES = 50
MAX_NAME_CHARS = 64
DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATEMENT_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50, 100)
RESULTS = ("ok", "error", "rejected", "timeout")


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0


class GatewayStats:
    """Counters of one gateway; plain values, read by ``GatewayCollector`` on the same loop."""

    def __init__(self) -> None:
        self.operations: dict[tuple[str, str], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.statements: dict[str, _Histogram] = {}
        self.resolver_errors: dict[str, int] = {}
        self.subscriptions = 0
        self._names: set[str] = set()

    def label(self, name: str | None) -> str:
        """The bounded ``operation`` label for an operation name."""
        if not name:
            return "anonymous"
        name = name[:MAX_NAME_CHARS]
        if name in self._names:
            return name
        if len(self._names) >= MAX_OPERATION_NAMES:
            return "other"
        self._names.add(name)
        return name

    def operation_finished(self, name: str | None, result: str, duration: float, statements: int | None) -> None:
        """One operation answered; ``statements`` is None when it never reached execution."""
        label = self.label(name)
        key = (label, result)
        self.operations[key] = self.operations.get(key, 0) + 1
        _observe(self.durations, label, DURATION_BUCKETS, duration)
        if statements is not None:
            _observe(self.statements, label, STATEMENT_BUCKETS, statements)

    def resolver_failed(self, kind: str) -> None:
        self.resolver_errors[kind] = self.resolver_errors.get(kind, 0) + 1


def _observe(into: dict[str, _Histogram], label: str, bounds: tuple[float, ...], value: float) -> None:
    hist = into.get(label)
    if hist is None:
        hist = into[label] = _Histogram(bounds)
    hist.counts[bisect_left(bounds, value)] += 1
    hist.sum += value


def _buckets(bounds: tuple[float, ...], hist: _Histogram) -> list[tuple[str, float]]:
    cumulative = list(accumulate(hist.counts))
    return [(floatToGoString(b), float(c)) for b, c in zip(bounds, cumulative)] + [("+Inf", float(cumulative[-1]))]


def _histogram(name: str, documentation: str, bounds: tuple[float, ...],
               per_operation: dict[str, _Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["operation"])
    for operation, hist in sorted(per_operation.items()):
        family.add_metric([operation], _buckets(bounds, hist), hist.sum)
    return family


class GatewayCollector:
    """Reads a ``GatewayStats`` at scrape time."""

    def __init__(self, stats: GatewayStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        ops = CounterMetricFamily(
            "pgsidecar_graphql_operations",
            "GraphQL operations answered, by operation name and result (ok, error: field errors, rejected: "
            "request errors and limits before any SQL, timeout).", labels=["operation", "result"])
        for (operation, result), n in sorted(stats.operations.items()):
            ops.add_metric([operation, result], n)
        yield ops
        yield _histogram("pgsidecar_graphql_operation_duration_seconds",
                         "Time from request to answer of GraphQL operations.", DURATION_BUCKETS, stats.durations)
        yield _histogram("pgsidecar_graphql_operation_sql_statements",
                         "SQL statements each executed GraphQL operation sent through the proxy.",
                         STATEMENT_BUCKETS, stats.statements)
        errors = CounterMetricFamily(
            "pgsidecar_graphql_resolver_errors",
            "Fields that failed to resolve, by kind (argument, database, connection, internal).", labels=["kind"])
        for kind, n in sorted(stats.resolver_errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield GaugeMetricFamily("pgsidecar_graphql_subscriptions", "GraphQL subscriptions running now.",
                                value=stats.subscriptions)
