"""Prometheus metrics of one agent app: the catalogue, the collectors and ``GET /metrics``.

``setup_metrics(app)`` builds a ``CollectorRegistry`` for this app only (``keys.REGISTRY``; no
global registry, so two proxies and two agents can live in one process) and registers:

- ``ProxyCollector``: reads ``ProxyServer.snapshot()`` and ``query_stats().snapshot()`` at scrape
  time (CONVENTIONS habit 10): queries per (database, user, kind, status), their duration
  histograms, slow statements, pool and client connection states, checkout waits.
- ``CacheCollector``: reads ``ProxyServer.cache_front.snapshot()`` at scrape time (nothing when
  ``cache.mode: off``): the result cache's requests, bypass reasons, occupancy, stores, rejections,
  evictions, invalidations and each database's LISTEN connection.
- ``ProcessCollector`` (prometheus_client, ``process_*``) and ``ProcessDetailCollector`` (psutil:
  threads, open fds, CPU percent).
- ``LoopLagMonitor`` (``keys.LOOP_LAG``): a task, run by one ``cleanup_ctx``, that sleeps
  ``LOOP_LAG_INTERVAL`` and records how late it woke up: the time anything else on the loop the
  proxy shares with the agent (relay, pools, handlers) held it.
- an HTTP middleware counting requests per (method, route pattern, status) and timing them.
- ``ScrapeLog`` (``keys.SCRAPES``): when ``/metrics`` was last scraped and by whom.

The catalogue (counters end in ``_total``; ``pool`` is "database/user"):

- proxy: ``pgsidecar_build_info{version}``, ``pgsidecar_start_time_seconds``
- queries (absent with ``stats.enabled: false``): ``pgsidecar_queries_total{database,user,kind,status}``,
  ``pgsidecar_query_duration_seconds{database,user,kind}`` (histogram, ``LATENCY_BUCKETS``),
  ``pgsidecar_slow_queries_total{database,user}``, ``pgsidecar_query_fingerprints``,
  ``pgsidecar_query_fingerprints_evicted_total``; with ``stats.prometheus_top_n`` > 0 (off by default,
  capped at 100) also ``pgsidecar_query_top_{calls_total,duration_seconds_total,errors_total,p95_seconds}``
  ``{fingerprint,kind}`` for the fingerprints with the most total time
- pools, each ``{pool,database,user}``: ``pgsidecar_pool_server_connections{state}`` (active, idle,
  connecting; overflow and pinned overlap with those), ``pgsidecar_pool_size``,
  ``pgsidecar_pool_max_overflow``, ``pgsidecar_pool_waiting_clients``,
  ``pgsidecar_pool_checkout_wait_seconds`` (histogram, ``CHECKOUT_BUCKETS``),
  ``pgsidecar_pool_checkout_timeouts_total``, ``pgsidecar_pool_server_connections_opened_total``,
  ``pgsidecar_pool_server_connections_closed_total``, ``pgsidecar_pool_server_errors_total``,
  ``pgsidecar_pool_pinned_clients_total{reason}``
- clients: ``pgsidecar_client_connections{state}`` (active, idle, waiting; pinned overlaps),
  ``pgsidecar_client_connections_accepted_total``, ``pgsidecar_client_connections_rejected_total``
- result cache (absent with ``cache.mode: off``): ``pgsidecar_cache_requests_total{result}`` (hit,
  miss, bypass: a statement looked up while the client had no transaction open; bypass is the sum
  of every reason), ``pgsidecar_cache_bypasses_total{reason}`` (not_hinted, not_listening,
  no_trigger, session_state, not_select, volatile_function, writer_function, paused, ...: the part
  before any ``:``, so never a function or table name), ``pgsidecar_cache_hit_ratio`` (hits /
  (hits + misses), 0 before the first), ``pgsidecar_cache_bytes``, ``pgsidecar_cache_max_bytes``,
  ``pgsidecar_cache_entries``, ``pgsidecar_cache_stores_total``,
  ``pgsidecar_cache_rejected_total{reason}`` (too_large, stale, paused, no_ttl, expired,
  not_a_result, pipelined), ``pgsidecar_cache_evictions_total{reason}`` (lru, ttl, invalidation,
  flush: all four always present), ``pgsidecar_cache_invalidations_total{source}`` (proxy, notify,
  ttl, flush: all four always present), ``pgsidecar_cache_spared_total{by}`` (columns, rows: results an
  invalidation of their table left, both always present); per database with a LISTEN connection
  ``pgsidecar_cache_listen_up{database}`` (1 while listening: results are served and stored),
  ``pgsidecar_cache_notifications_total{database}``, ``pgsidecar_cache_listen_drops_total{database}``,
  ``pgsidecar_cache_tracked_tables{database}`` (tables carrying the invalidation trigger)
- process: ``process_*`` (prometheus_client), ``pgsidecar_process_threads``,
  ``pgsidecar_process_open_fds``, ``pgsidecar_process_cpu_percent``
- event loop: ``pgsidecar_event_loop_lag_seconds`` (last), and the histogram
  ``pgsidecar_event_loop_lag_distribution_seconds`` (not ``..._histogram_seconds``: promtool
  rejects a type in a metric name)
- webhooks (registered by ``agent/webhooks/routes.py``, listed in ``agent/webhooks/metrics.py``):
  ``pgsidecar_webhook_up``, ``pgsidecar_webhook_attempts_total{result}``,
  ``pgsidecar_webhook_deliveries_total{result}``, ``pgsidecar_webhook_delivery_duration_seconds``,
  ``pgsidecar_webhook_pending_deliveries``, ``pgsidecar_webhook_oldest_pending_age_seconds``, ...
- GraphQL gateway (registered by ``graphql_gateway.app``, listed in ``graphql_gateway/metrics.py``):
  ``pgsidecar_graphql_operations_total{operation,result}``,
  ``pgsidecar_graphql_operation_duration_seconds{operation}``,
  ``pgsidecar_graphql_operation_sql_statements{operation}``, ``pgsidecar_graphql_resolver_errors_total{kind}``,
  ``pgsidecar_graphql_subscriptions``
- materialized views (agent/views.py): ``pgsidecar_view_refresh_duration_seconds{view}``,
  ``pgsidecar_view_refreshes_total{view,result}``, ``pgsidecar_view_age_seconds{view}``
- agent HTTP: ``pgsidecar_http_requests_total{method,endpoint,status}``,
  ``pgsidecar_http_request_duration_seconds{method,endpoint}``

Labels are bounded: database and user (one pool each), statement kind, pool name, cache reasons
and sources (fixed words), route pattern
(``/api/queries/{fingerprint}``, never the raw path; "unmatched" for unknown paths), method
(unknown methods are "other"). Never SQL text or a fingerprint.

The answer is Prometheus text format, or OpenMetrics when the Accept header asks for
``application/openmetrics-text`` (prometheus_client's ``choose_encoder`` negotiates).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from itertools import accumulate

import psutil  # type: ignore[import-untyped]
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from proxy.cache import INVALIDATION_SOURCES
from proxy.listener import ProxyServer
from proxy.pool import CHECKOUT_BUCKETS
from proxy.stats import FingerprintSnapshot

from . import keys

#: Seconds the event-loop monitor sleeps between measurements.
LOOP_LAG_INTERVAL = 0.25
TOP_N_MAX = 100  # stats.prometheus_top_n is capped: fingerprints as labels must stay few
#: Upper bounds (seconds) of the event-loop lag histogram.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: HTTP methods kept as label values; anything else a client sends is counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Cache eviction reasons always exposed (0 until they happen), so rate() has a series from the start.
CACHE_EVICTION_REASONS = ("lru", "ttl", "invalidation", "flush")
CACHE_SPARED_BY = ("columns", "rows")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def histogram_buckets(bounds: tuple[float, ...], cumulative: tuple[int, ...]) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs for a HistogramMetricFamily: the bounds, then +Inf."""
    les = [floatToGoString(b) for b in bounds] + ["+Inf"]
    if len(cumulative) != len(les):
        raise ValueError(f"{len(cumulative)} bucket counts for {len(les)} bounds (+Inf included)")
    return list(zip(les, (float(c) for c in cumulative)))


class ProxyCollector:
    """The proxy's queries, pools and clients, read from its snapshots at scrape time.

    Runs on the loop the proxy runs on (the agent shares it): the snapshots are not thread-safe.
    """

    def __init__(self, proxy: ProxyServer, version: str) -> None:
        self.proxy = proxy
        self.version = version

    def collect(self) -> Iterator[Metric]:
        yield from self._proxy()
        yield from self._queries()

    def _proxy(self) -> Iterator[Metric]:
        snap = self.proxy.snapshot()

        info = GaugeMetricFamily("pgsidecar_build_info", "pgsidecar version (always 1).", labels=["version"])
        info.add_metric([self.version], 1.0)
        yield info
        yield GaugeMetricFamily("pgsidecar_start_time_seconds", "Unix time the proxy was started.",
                                value=snap.started_at)

        clients = snap.clients
        states = GaugeMetricFamily(
            "pgsidecar_client_connections",
            "Client connections by state: active (holds a server connection), idle, waiting (for a "
            "server connection); pinned ones are also counted as active or idle.",
            labels=["state"])
        for state, value in (("active", clients.active), ("idle", clients.idle),
                             ("waiting", clients.waiting), ("pinned", clients.pinned)):
            states.add_metric([state], value)
        yield states
        yield CounterMetricFamily("pgsidecar_client_connections_accepted", "Client connections accepted.",
                                  value=clients.accepted)
        yield CounterMetricFamily("pgsidecar_client_connections_rejected",
                                  "Client connections refused at proxy.max_client_connections.",
                                  value=clients.rejected)

        labels = ["pool", "database", "user"]
        servers = GaugeMetricFamily(
            "pgsidecar_pool_server_connections",
            "Server connections by state: active (lent to a client), idle, connecting; overflow "
            "(open beyond pool.size) and pinned (held for one client's session) overlap with those.",
            labels=[*labels, "state"])
        size = GaugeMetricFamily("pgsidecar_pool_size", "Configured pool.size.", labels=labels)
        overflow = GaugeMetricFamily("pgsidecar_pool_max_overflow", "Configured pool.max_overflow.", labels=labels)
        waiting = GaugeMetricFamily("pgsidecar_pool_waiting_clients",
                                    "Clients queued for a server connection.", labels=labels)
        wait = HistogramMetricFamily("pgsidecar_pool_checkout_wait_seconds",
                                     "Time clients waited for a server connection.", labels=labels)
        timeouts = CounterMetricFamily("pgsidecar_pool_checkout_timeouts",
                                       "Checkouts that gave up after pool.checkout_timeout.", labels=labels)
        opened = CounterMetricFamily("pgsidecar_pool_server_connections_opened",
                                     "Server connections opened.", labels=labels)
        closed = CounterMetricFamily("pgsidecar_pool_server_connections_closed",
                                     "Server connections closed.", labels=labels)
        errors = CounterMetricFamily("pgsidecar_pool_server_errors",
                                     "Server connections that failed (connect, check, reset or I/O).",
                                     labels=labels)
        pins = CounterMetricFamily("pgsidecar_pool_pinned_clients",
                                   "Clients pinned to one server connection, by reason.",
                                   labels=[*labels, "reason"])
        for pool in snap.pools:
            names = [pool.name, pool.database, pool.user]
            for state, value in (("active", pool.active), ("idle", pool.idle), ("overflow", pool.overflow),
                                 ("pinned", pool.pinned), ("connecting", pool.connecting)):
                servers.add_metric([*names, state], value)
            size.add_metric(names, pool.size)
            overflow.add_metric(names, pool.max_overflow)
            waiting.add_metric(names, pool.waiting)
            wait.add_metric(names, histogram_buckets(CHECKOUT_BUCKETS, pool.checkout_wait_buckets), pool.checkout_wait_sum)
            timeouts.add_metric(names, pool.checkout_timeouts)
            opened.add_metric(names, pool.servers_opened)
            closed.add_metric(names, pool.servers_closed)
            errors.add_metric(names, pool.server_errors)
            for reason, count in sorted(pool.pin_reasons.items()):
                pins.add_metric([*names, reason], count)
        yield from (servers, size, overflow, waiting, wait, timeouts, opened, closed, errors, pins)

    def _queries(self) -> Iterator[Metric]:
        stats = self.proxy.query_stats()
        if stats is None:  # stats.enabled: false
            return
        snap = stats.snapshot()
        queries = CounterMetricFamily("pgsidecar_queries", "Statements finished, by kind and status (ok, error).",
                                      labels=["database", "user", "kind", "status"])
        for labels, count in sorted(snap.queries.items()):
            queries.add_metric(list(labels), count)
        yield queries
        durations = HistogramMetricFamily("pgsidecar_query_duration_seconds",
                                          "Statement duration, from the client's request to ReadyForQuery.",
                                          labels=["database", "user", "kind"])
        for labels3, hist in sorted(snap.durations.items()):
            durations.add_metric(list(labels3), histogram_buckets(snap.bounds, hist.buckets), hist.sum)
        yield durations
        slow = CounterMetricFamily("pgsidecar_slow_queries", "Statements over slow_query.threshold_ms.",
                                   labels=["database", "user"])
        for labels2, count in sorted(snap.slow.items()):
            slow.add_metric(list(labels2), count)
        yield slow
        yield GaugeMetricFamily("pgsidecar_query_fingerprints", "Query fingerprints with statistics kept.",
                                value=snap.fingerprints)
        yield CounterMetricFamily("pgsidecar_query_fingerprints_evicted",
                                  "Statements lost to stats.max_fingerprints: an entry evicted, or a new "
                                  "fingerprint not admitted.", value=snap.evicted)
        top_n = min(self.proxy.settings.stats.prometheus_top_n, TOP_N_MAX)
        if top_n:
            yield from _top_fingerprints(stats.top("total_time", top_n))


def _top_fingerprints(top: list[FingerprintSnapshot]) -> Iterator[Metric]:
    """``stats.prometheus_top_n``: the busiest fingerprints, labelled by id (never by SQL text).

    Their values restart when a fingerprint is evicted or the statistics are reset, as a
    counter may; join on the id with /api/queries/{fingerprint} for the text."""
    labels = ["fingerprint", "kind"]
    calls = CounterMetricFamily("pgsidecar_query_top_calls", "Calls of the busiest fingerprints.", labels=labels)
    seconds = CounterMetricFamily("pgsidecar_query_top_duration_seconds",
                                  "Total time of the busiest fingerprints.", labels=labels)
    errors = CounterMetricFamily("pgsidecar_query_top_errors", "Errors of the busiest fingerprints.", labels=labels)
    p95 = GaugeMetricFamily("pgsidecar_query_top_p95_seconds", "Estimated p95 latency of the busiest fingerprints.",
                            labels=labels)
    for fp in top:
        key = [fp.id, fp.kind]
        calls.add_metric(key, fp.calls)
        seconds.add_metric(key, fp.total_ms / 1000.0)
        errors.add_metric(key, fp.errors)
        p95.add_metric(key, fp.p95_ms / 1000.0)
    yield from (calls, seconds, errors, p95)


def cache_counts(counts: dict[str, int], always: tuple[str, ...] = ()) -> dict[str, int]:
    """Cache counters by reason (or source), sorted: ``always`` present (0 until counted), and each
    reason cut at its first ``:`` (``volatile_function:now`` counts as ``volatile_function``) so the
    labels stay a fixed set of words. Shared with ``/api/cache``."""
    out = dict.fromkeys(always, 0)
    for reason, count in counts.items():
        word = reason.split(":", 1)[0]
        out[word] = out.get(word, 0) + count
    return dict(sorted(out.items()))


def cache_hit_ratio(hits: int, misses: int) -> float:
    """hits / (hits + misses), 0.0 before the first lookup that reached the store."""
    looked_up = hits + misses
    return hits / looked_up if looked_up else 0.0


class CacheCollector:
    """The result cache (issue 4), read from ``CacheFront.snapshot()`` at scrape time.

    Reads ``proxy.cache_front`` at every scrape: nothing at all when the cache is off (None).
    Runs on the proxy's loop, like ``ProxyCollector``."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        front = self.proxy.cache_front
        if front is None:  # cache.mode: off
            return
        snap = front.snapshot()
        cache = snap.cache
        bypassed = sum(cache.bypasses.values())

        requests = CounterMetricFamily(
            "pgsidecar_cache_requests",
            "Statements looked up in the result cache (sent while no transaction was open): hit, miss "
            "(forwarded; stored when it may be), bypass (not cacheable, by reason in "
            "pgsidecar_cache_bypasses_total).", labels=["result"])
        for result, value in (("hit", cache.hits), ("miss", cache.misses), ("bypass", bypassed)):
            requests.add_metric([result], value)
        yield requests
        bypasses = CounterMetricFamily("pgsidecar_cache_bypasses",
                                       "Statements that did not use the result cache, by reason.", labels=["reason"])
        for reason, count in cache_counts(cache.bypasses).items():
            bypasses.add_metric([reason], count)
        yield bypasses
        yield GaugeMetricFamily("pgsidecar_cache_hit_ratio",
                                "Result cache hits / (hits + misses) since start; 0 before the first.",
                                value=cache_hit_ratio(cache.hits, cache.misses))
        yield GaugeMetricFamily("pgsidecar_cache_bytes",
                                "Bytes the cached results occupy (responses, keys and per-entry overhead).",
                                value=cache.bytes)
        yield GaugeMetricFamily("pgsidecar_cache_max_bytes", "Configured cache.max_bytes.", value=cache.max_bytes)
        yield GaugeMetricFamily("pgsidecar_cache_entries", "Results in the cache.", value=cache.entries)
        yield CounterMetricFamily("pgsidecar_cache_stores", "Results stored in the cache.", value=cache.stores)
        rejected = CounterMetricFamily("pgsidecar_cache_rejected",
                                       "Cacheable misses whose response was not stored, by reason.",
                                       labels=["reason"])
        for reason, count in cache_counts(cache.rejected).items():
            rejected.add_metric([reason], count)
        yield rejected
        evictions = CounterMetricFamily("pgsidecar_cache_evictions",
                                        "Results removed from the cache, by reason.", labels=["reason"])
        for reason, count in cache_counts(cache.evictions, CACHE_EVICTION_REASONS).items():
            evictions.add_metric([reason], count)
        yield evictions
        invalidations = CounterMetricFamily(
            "pgsidecar_cache_invalidations",
            "Invalidation events, by source: proxy (a write through the proxy committed), notify (a "
            "trigger's notification), ttl, flush (API, or the LISTEN connection dropped).", labels=["source"])
        for source, count in cache_counts(cache.invalidations, INVALIDATION_SOURCES).items():
            invalidations.add_metric([source], count)
        yield invalidations
        spared = CounterMetricFamily(
            "pgsidecar_cache_spared",
            "Results an invalidation of their table left in the cache, by why: columns (the write set "
            "none of the columns they read), rows (it changed none of the rows they read).", labels=["by"])
        for by, count in cache_counts(cache.spared, CACHE_SPARED_BY).items():
            spared.add_metric([by], count)
        yield spared

        labels = ["database"]
        up = GaugeMetricFamily("pgsidecar_cache_listen_up",
                               "1 while the database's LISTEN connection is up (its results are served and "
                               "stored), else 0.", labels=labels)
        notifications = CounterMetricFamily("pgsidecar_cache_notifications",
                                            "Invalidation notifications received.", labels=labels)
        drops = CounterMetricFamily("pgsidecar_cache_listen_drops",
                                    "Times the LISTEN connection was lost (the cache is flushed each time).",
                                    labels=labels)
        tracked = GaugeMetricFamily("pgsidecar_cache_tracked_tables",
                                    "Tables carrying the invalidation trigger, at the last catalog read.",
                                    labels=labels)
        for monitor in sorted(snap.monitors, key=lambda m: m.database):
            name = [monitor.database]
            up.add_metric(name, 1.0 if monitor.ready else 0.0)
            notifications.add_metric(name, monitor.notifications)
            drops.add_metric(name, monitor.drops)
            tracked.add_metric(name, monitor.tracked_tables)
        yield from (up, notifications, drops, tracked)


class ProcessDetailCollector:
    """What prometheus_client's ProcessCollector leaves out, from psutil (one Process object,
    so ``cpu_percent`` measures from one scrape to the next)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first call only sets the reference point

    def collect(self) -> Iterator[Metric]:
        process = self.process
        with process.oneshot():
            yield GaugeMetricFamily("pgsidecar_process_threads", "Threads of the process.",
                                    value=process.num_threads())
            if hasattr(process, "num_fds"):  # POSIX only
                yield GaugeMetricFamily("pgsidecar_process_open_fds", "Open file descriptors.",
                                        value=process.num_fds())
            yield GaugeMetricFamily("pgsidecar_process_cpu_percent",
                                    "CPU use since the previous scrape, in percent of one CPU.",
                                    value=process.cpu_percent(None))


class LoopLagMonitor:
    """How late a sleep on the event loop wakes up: the last value and a histogram."""

    __slots__ = ("interval", "last", "counts", "sum", "count")

    def __init__(self, interval: float = LOOP_LAG_INTERVAL) -> None:
        self.interval = interval
        self.last: float | None = None
        self.counts = [0] * (len(LOOP_LAG_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, lag: float) -> None:
        self.last = lag
        self.sum += lag
        self.count += 1
        for i, bound in enumerate(LOOP_LAG_BUCKETS):
            if lag <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    async def run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock ticks in milliseconds and is read once per
        # loop iteration, which would hide exactly the sub-millisecond lags worth seeing.
        clock = time.perf_counter
        while True:
            start = clock()
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, clock() - start - self.interval))

    def collect(self) -> Iterator[Metric]:
        if self.last is not None:  # absent until measured once
            yield GaugeMetricFamily("pgsidecar_event_loop_lag_seconds",
                                    "How late the last event-loop wake-up was.", value=self.last)
        hist = HistogramMetricFamily("pgsidecar_event_loop_lag_distribution_seconds",
                                     f"How late event-loop wake-ups were (one every {self.interval:g} s).")
        hist.add_metric([], histogram_buckets(LOOP_LAG_BUCKETS, tuple(accumulate(self.counts))), self.sum)
        yield hist


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[keys.LOOP_LAG].run(), name="pgsidecar-loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _http_middleware(requests: Counter, durations: Histogram) -> Middleware:
    @web.middleware
    async def http_metrics(request: web.Request, handler: _Handler) -> web.StreamResponse:
        start = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the JSON-errors middleware outside turns it into a body
            record(request, exc.status, start)
            raise
        except Exception:  # aiohttp answers 500
            record(request, 500, start)
            raise
        # (A cancelled request, the client gone, is not counted: nobody got an answer.)
        record(request, response.status, start)
        return response

    def record(request: web.Request, status: int, start: float) -> None:
        resource = request.match_info.route.resource  # None: no route matched (404, 405)
        endpoint = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in HTTP_METHODS else "other"
        requests.labels(method, endpoint, str(status)).inc()
        durations.labels(method, endpoint).observe(time.perf_counter() - start)

    return http_metrics


class ScrapeLog:
    """When ``GET /metrics`` was last answered and to whom (``/api/monitoring/status`` shows it)."""

    __slots__ = ("count", "last_at", "last_remote", "last_user_agent")

    def __init__(self) -> None:
        self.count = 0
        self.last_at: float | None = None  # wall clock, seconds since the epoch
        self.last_remote: str | None = None
        self.last_user_agent: str | None = None

    def scraped(self, remote: str | None, user_agent: str | None) -> None:
        self.count += 1
        self.last_at = time.time()
        self.last_remote = remote
        self.last_user_agent = user_agent[:200] if user_agent else None


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: text format, or OpenMetrics when asked for in the Accept header."""
    request.app[keys.SCRAPES].scraped(request.remote, request.headers.get("User-Agent"))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[keys.REGISTRY])
    response = web.Response(body=body, headers={"Content-Type": content_type})
    response.enable_compression()
    return response


def _version() -> str:
    try:
        return importlib.metadata.version("pgsidecar")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def setup_metrics(app: web.Application) -> None:
    """Register /metrics, the HTTP metrics middleware and the event-loop lag monitor."""
    registry = CollectorRegistry()
    app[keys.REGISTRY] = registry
    app[keys.SCRAPES] = ScrapeLog()
    registry.register(ProxyCollector(app[keys.PROXY], _version()))
    registry.register(CacheCollector(app[keys.PROXY]))
    ProcessCollector(registry=registry)
    registry.register(ProcessDetailCollector())
    monitor = app[keys.LOOP_LAG] = LoopLagMonitor()
    registry.register(monitor)
    app.cleanup_ctx.append(_loop_lag_ctx)

    requests = Counter("pgsidecar_http_requests_total", "Agent HTTP requests by route pattern and status.",
                       ["method", "endpoint", "status"], registry=registry)
    durations = Histogram("pgsidecar_http_request_duration_seconds", "Agent HTTP request duration.",
                          ["method", "endpoint"], registry=registry)
    app.middlewares.append(_http_middleware(requests, durations))
    app.router.add_get("/metrics", metrics_handler)
