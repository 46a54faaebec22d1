"""Materialized view refresh (issue 6): periodic, concurrent, one at a time per view.

Every ``views.refresh_interval_s`` (0: never on its own) the agent runs
``REFRESH MATERIALIZED VIEW CONCURRENTLY`` for each view in ``views.names``, in order, on a short
connection of its own straight to the upstream (maintenance, not the app's traffic: it takes no
pool connection and stays out of the query statistics). CONCURRENTLY lets readers go on reading
the old contents while the new ones are computed; a view that cannot be refreshed concurrently
(never populated, or no unique index) gets a plain REFRESH once, with a warning in the log.

Never two refreshes of one view at once: in this process an ``asyncio.Lock`` per view, and across
replicas a transaction-level advisory lock keyed by the view's name (``pg_try_advisory_xact_lock``):
a replica that finds the view being refreshed skips that round (the API answers 409).

``POST /api/views/{name}/refresh`` (admin only) refreshes one view now: 200 with the duration,
404 for a name that is not a materialized view, 409 while it is being refreshed.

Metrics: ``pgsidecar_view_refresh_duration_seconds{view}`` (histogram of successful refreshes),
``pgsidecar_view_refreshes_total{view,result}`` (ok, error, skipped), and
``pgsidecar_view_age_seconds{view}``: seconds since this agent last refreshed the view (absent
until it has; the database does not record when another replica did).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from itertools import accumulate

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from config.settings import ViewsSettings
from proxy.server import Endpoint

from . import keys
from .metrics import histogram_buckets

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
RESULTS = ("ok", "error", "skipped")
_FIND_SQL = """
SELECT format('%I.%I', schemaname, matviewname) AS qualified, ispopulated
FROM pg_matviews WHERE matviewname = $1 AND schemaname = ANY(current_schemas(false))
ORDER BY array_position(current_schemas(false), schemaname) LIMIT 1
"""


class ViewBusy(Exception):
    """The view is being refreshed (here or by another replica)."""


class ViewNotFound(Exception):
    """No materialized view of that name."""


@dataclass(slots=True)
class _ViewState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refreshed_at: float | None = None  # time.time() of this agent's last successful refresh
    results: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum_s: float = 0.0


class ViewRefresher:
    def __init__(self, settings: ViewsSettings, endpoint: Endpoint) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.views: dict[str, _ViewState] = {name: _ViewState() for name in settings.names}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.refresh_interval_s > 0 and self.views and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="view-refresher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            for name in list(self.settings.names):
                with contextlib.suppress(Exception):  # counted and logged by refresh(); the next round retries
                    await self.refresh(name)

    async def refresh(self, name: str) -> float:
        """Refresh one view now; returns seconds taken. ViewBusy / ViewNotFound / the DB's error.

        A view outside ``views.names`` gets its state (and metric labels) only once it exists,
        so names that are not materialized views never become series."""
        state = self.views.get(name)
        if state is None:
            state = _ViewState()
        if state.lock.locked():
            state.results["skipped"] += 1
            raise ViewBusy(f"materialized view {name!r} is being refreshed by this agent")
        async with state.lock:
            start = time.perf_counter()
            try:
                await self._refresh(name)
            except ViewBusy:
                state.results["skipped"] += 1
                raise
            except Exception as exc:
                state.results["error"] += 1  # kept only for a view that exists (or is configured)
                log.warning("view_refresh_failed", extra={"view": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                raise
            self.views.setdefault(name, state)
            took = time.perf_counter() - start
            state.results["ok"] += 1
            state.refreshed_at = time.time()
            state.duration_sum_s += took
            state.buckets[bisect_left(DURATION_BUCKETS, took)] += 1
            log.info("view_refreshed", extra={"view": name, "duration_s": round(took, 3)})
            return took

    async def _refresh(self, name: str) -> None:
        import asyncpg

        database = self.endpoint.database
        conn = await asyncpg.connect(statement_cache_size=0, **self.endpoint.connect_args("pgsidecar-views"))
        try:
            found = await conn.fetchrow(_FIND_SQL, name, timeout=self.settings.refresh_timeout_s)
            if found is None:
                raise ViewNotFound(f"{name!r} is not a materialized view in database {database!r}")
            qualified = found["qualified"]
            async with conn.transaction():
                key = await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('pgsidecar_view_refresh'), "
                                          "hashtext($1))", qualified)
                if not key:
                    raise ViewBusy(f"materialized view {name!r} is being refreshed by another pgsidecar")
                if found["ispopulated"]:
                    try:
                        async with conn.transaction():  # a savepoint: the fallback runs after a failure
                            await conn.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {qualified}",
                                               timeout=self.settings.refresh_timeout_s)
                        return
                    except asyncpg.ObjectNotInPrerequisiteStateError as exc:  # no unique index
                        log.warning("view_refresh_not_concurrent", extra={"view": name, "reason": str(exc)})
                await conn.execute(f"REFRESH MATERIALIZED VIEW {qualified}", timeout=self.settings.refresh_timeout_s)
        finally:
            await conn.close()

    def collect(self) -> Iterator[Metric]:
        durations = HistogramMetricFamily("pgsidecar_view_refresh_duration_seconds",
                                          "Time of a successful materialized view refresh", labels=["view"])
        refreshes = CounterMetricFamily("pgsidecar_view_refreshes", "Materialized view refreshes by result",
                                        labels=["view", "result"])
        age = GaugeMetricFamily("pgsidecar_view_age_seconds",
                                "Seconds since this agent last refreshed the materialized view", labels=["view"])
        now = time.time()
        for name, state in sorted(self.views.items()):
            durations.add_metric([name], histogram_buckets(DURATION_BUCKETS, tuple(accumulate(state.buckets))),
                                 state.duration_sum_s)
            for result in RESULTS:
                refreshes.add_metric([name, result], state.results[result])
            if state.refreshed_at is not None:
                age.add_metric([name], max(now - state.refreshed_at, 0.0))
        yield durations
        yield refreshes
        yield age


def _json_error(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": message, "status": cls.status_code}), content_type="application/json")


async def refresh_handler(request: web.Request) -> web.Response:
    request.app[keys.REQUIRE_ADMIN](request)
    refresher = request.app[keys.VIEWS]
    name = request.match_info["name"]
    try:
        took = await refresher.refresh(name)
    except ViewNotFound as exc:
        raise _json_error(web.HTTPNotFound, str(exc)) from None
    except ViewBusy as exc:
        raise _json_error(web.HTTPConflict, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the database's own message, without a DSN
        raise _json_error(web.HTTPServiceUnavailable, f"refresh of {name!r} failed: {type(exc).__name__}: {exc}"[:400]) \
            from None
    return web.json_response({"view": name, "refreshed": True, "duration_s": round(took, 6)})


async def _refresher_ctx(app: web.Application) -> AsyncIterator[None]:
    refresher = app[keys.VIEWS]
    refresher.start()
    yield
    await refresher.stop()


def setup_views(app: web.Application) -> None:
    """The periodic refresher, its metrics and POST /api/views/{name}/refresh (after setup_api)."""
    settings = app[keys.SETTINGS]
    refresher = ViewRefresher(settings.views, app[keys.PROXY].upstream_endpoint())
    app[keys.VIEWS] = refresher
    app[keys.REGISTRY].register(refresher)
    app.cleanup_ctx.append(_refresher_ctx)
    app.router.add_post("/api/views/{name}/refresh", refresh_handler)
