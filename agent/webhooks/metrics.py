"""The webhook emitter's metrics, read from ``Emitter.snapshot()`` at scrape time:

- ``pgsidecar_webhook_up``: 1 while the emitter listens and the webhook tables exist
- ``pgsidecar_webhook_attempts_total{result}``: HTTP attempts by what became of the delivery:
  ``delivered`` (2xx), ``retried`` (failed, another attempt is scheduled), ``dead`` (failed the
  last allowed attempt); all three always present
- ``pgsidecar_webhook_deliveries_total{result}``: deliveries that reached a final state
  (``delivered``, ``dead``)
- ``pgsidecar_webhook_delivery_duration_seconds``: histogram of one attempt's HTTP time
- ``pgsidecar_webhook_pending_deliveries``: deliveries waiting for an active endpoint (the
  backlog, all replicas together: read from the tables every few seconds)
- ``pgsidecar_webhook_oldest_pending_age_seconds``: age of the oldest waiting event (0 when none)
- ``pgsidecar_webhook_endpoints_delivering``: endpoints this replica holds a lease on right now
- ``pgsidecar_webhook_events_pruned_total``: old events whose deliveries all finished, deleted
  after ``webhooks.retention_days``
- ``pgsidecar_webhook_notifications_total``: NOTIFY wake-ups received
- ``pgsidecar_webhook_listen_connects_total``: LISTEN connections opened (more than 1: reconnects)
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from ..metrics import histogram_buckets
from .emitter import LATENCY_BUCKETS, Emitter

RESULTS = ("delivered", "retried", "dead")


class WebhookCollector:
    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter

    def collect(self) -> Iterator[Metric]:
        snap = self.emitter.snapshot()
        yield GaugeMetricFamily("pgsidecar_webhook_up", "1 while the webhook emitter listens and its tables exist",
                                value=1.0 if snap.state == "running" else 0.0)
        attempts = CounterMetricFamily("pgsidecar_webhook_attempts", "Webhook HTTP attempts by what became of the "
                                       "delivery (delivered, retried, dead)", labels=["result"])
        for result in RESULTS:
            attempts.add_metric([result], snap.deliveries.get(result, 0))
        yield attempts
        final = CounterMetricFamily("pgsidecar_webhook_deliveries", "Webhook deliveries that reached a final state",
                                    labels=["result"])
        for result in ("delivered", "dead"):
            final.add_metric([result], snap.deliveries.get(result, 0))
        yield final
        yield HistogramMetricFamily("pgsidecar_webhook_delivery_duration_seconds", "HTTP time of one webhook attempt",
                                    buckets=histogram_buckets(LATENCY_BUCKETS, snap.latency_buckets),
                                    sum_value=snap.latency_sum_s)
        yield GaugeMetricFamily("pgsidecar_webhook_pending_deliveries",
                                "Webhook deliveries waiting for an active endpoint (all replicas)",
                                value=float(snap.pending or 0))
        yield GaugeMetricFamily("pgsidecar_webhook_oldest_pending_age_seconds",
                                "Age of the oldest event still waiting for delivery (0 when none)",
                                value=float(snap.oldest_pending_age_s or 0.0))
        yield GaugeMetricFamily("pgsidecar_webhook_endpoints_delivering",
                                "Webhook endpoints this replica holds a delivery lease on", value=snap.endpoints_delivering)
        yield CounterMetricFamily("pgsidecar_webhook_events_pruned", "Old finished webhook events deleted "
                                  "(webhooks.retention_days)", value=snap.pruned)
        yield CounterMetricFamily("pgsidecar_webhook_notifications", "NOTIFY wake-ups the webhook emitter received",
                                  value=snap.notifications)
        yield CounterMetricFamily("pgsidecar_webhook_listen_connects", "LISTEN connections the webhook emitter opened",
                                  value=snap.connects)
