"""The agent's JSON API: the query API (issue 3) and the result cache API (issue 4).

Queries, what the proxy has seen per fingerprint:

- ``GET /api/queries/top?by=total_time|calls|mean|p95|errors|rows&limit=N``
- ``GET /api/queries/slow?limit=N``: most recent first, each with its SQL pretty-printed
- ``GET /api/queries/{fingerprint}``: one fingerprint's statistics and latency histogram
- ``POST /api/queries/reset``: admin only (``Authorization: Bearer <agent.admin_token>``; with no
  token configured, loopback clients only, and the log says so once)

Statements carry normalised text only (``$n`` for every literal): nothing here shows a literal
value, a bind parameter or a row. Bad parameters get 400 with a JSON message; with statistics
off (``stats.enabled: false``) every endpoint answers 404 saying so.

The result cache:

- ``GET /api/cache?limit=N``: mode, TTL, the counters of ``pgsidecar_cache_*`` (requests by result,
  bypasses, rejections, evictions, invalidations), hit ratio, occupancy, each database's LISTEN
  connection, and ``top``: the N (default 20) entries with most hits, each as key (hex), tables,
  bytes, hits, age_s, ttl_s (never SQL text or rows). With ``cache.mode: off``: 200 and
  ``{"mode": "off", "enabled": false, ...}``.
- ``POST /api/cache/flush``: admin only, as ``/api/queries/reset``; drops every entry (counted as
  an invalidation with source "flush") and answers ``{"flushed": <entries removed>}``; 409 when
  the cache is off.

Both read the cache directly: the agent runs on the proxy's event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.cache import INVALIDATION_SOURCES, CacheEntrySnapshot
from proxy.caching import CacheFront, MonitorSnapshot
from proxy.explain import Plan
from proxy.stats import LATENCY_BUCKETS, TOP_ORDERS, FingerprintSnapshot, QueryStats, SlowQuery, pretty_sql

from . import keys
from .metrics import CACHE_EVICTION_REASONS, CACHE_SPARED_BY, cache_counts, cache_hit_ratio

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
_PRETTY_MEMO_MAX = 2000


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=_json({"error": message, "status": 400}), content_type="application/json")


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise _bad_request(f"limit must be an integer between 1 and {MAX_LIMIT}, got {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad_request(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _fingerprint_doc(snap: FingerprintSnapshot, *, histogram: bool = False) -> dict[str, Any]:
    doc = dataclasses.asdict(snap)
    buckets = doc.pop("buckets")
    doc["tables"] = list(snap.tables)
    doc["application_names"] = list(snap.application_names)
    if histogram:
        # Cumulative counts per upper bound (seconds), like a Prometheus histogram.
        doc["histogram"] = [
            {"le": bound, "count": count} for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), buckets)
        ]
    return doc


def _slow_doc(slow: SlowQuery, pretty: str, plan: dict[str, Any] | None) -> dict[str, Any]:
    doc = dataclasses.asdict(slow)
    doc["pretty"] = pretty
    doc["plan"] = plan
    return doc


def _plan_doc(plan: Plan | None) -> dict[str, Any] | None:
    """The captured EXPLAIN of a fingerprint (slow_query.explain), or None."""
    if plan is None:
        return None
    return {"captured_at": plan.captured_at, "plan": plan.plan, "error": plan.error}


class QueryApi:
    """The handlers, with their per-app state (no module globals)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.warned_open_admin = False
        self._pretty: dict[str, str] = {}  # normalised text -> pretty-printed, bounded

    # ------------------------------------------------------------------ helpers
    def _stats(self) -> QueryStats:
        stats = self.app[keys.PROXY].query_stats()
        if stats is None:
            raise web.HTTPNotFound(
                text=_json({"error": "query statistics are disabled (stats.enabled: false)", "status": 404}),
                content_type="application/json",
            )
        return stats

    def _require_admin(self, request: web.Request) -> None:
        token = self.app[keys.SETTINGS].agent.admin_token
        if token:
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
                raise web.HTTPUnauthorized(
                    text=_json({"error": "admin endpoint: send Authorization: Bearer <agent.admin_token>",
                                "status": 401}),
                    content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="pgsidecar"'},
                )
            return
        if not self.warned_open_admin:
            self.warned_open_admin = True
            log.warning("admin_endpoints_loopback_only", extra={"hint": "set agent.admin_token to allow remote admins"})
        if not _is_loopback(request.remote):
            raise web.HTTPForbidden(
                text=_json({"error": "admin endpoint: no agent.admin_token is configured, so only loopback "
                                     "clients may call it", "status": 403}),
                content_type="application/json",
            )

    def _plan(self, fingerprint: str) -> dict[str, Any] | None:
        explainer = self.app[keys.PROXY].explainer
        return None if explainer is None else _plan_doc(explainer.plan(fingerprint))

    async def _pretty_all(self, texts: list[str]) -> list[str]:
        memo = self._pretty
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            # sqlparse is slow (tens of µs per character): off the event loop the proxy runs on.
            done = await asyncio.to_thread(lambda: [pretty_sql(t) for t in missing])
            if len(memo) + len(done) > _PRETTY_MEMO_MAX:
                memo.clear()
            memo.update(zip(missing, done))
        return [memo.get(t, t) for t in texts]

    # ------------------------------------------------------------------ handlers
    async def top(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "total_time")
        if by not in TOP_ORDERS:
            raise _bad_request(f"by must be one of {', '.join(TOP_ORDERS)}, got {by!r}")
        limit = _limit(request)
        stats = self._stats()
        rows = stats.top(by, limit)
        return web.json_response({"by": by, "limit": limit, "fingerprints": len(stats),
                                  "queries": [_fingerprint_doc(r) for r in rows]})

    async def slow(self, request: web.Request) -> web.Response:
        limit = _limit(request)
        stats = self._stats()
        items = stats.slow(limit)
        pretty = await self._pretty_all([s.normalized for s in items])
        return web.json_response({
            "threshold_ms": stats.slow_threshold_ms,
            "queries": [_slow_doc(s, p, self._plan(s.fingerprint)) for s, p in zip(items, pretty)],
        })

    async def one(self, request: web.Request) -> web.Response:
        fingerprint = request.match_info["fingerprint"]
        if not fingerprint.isalnum() or len(fingerprint) > 64:
            raise _bad_request(f"not a fingerprint id: {fingerprint[:80]!r}")
        snap = self._stats().get(fingerprint)
        if snap is None:
            raise web.HTTPNotFound(
                text=_json({"error": f"no statistics for fingerprint {fingerprint}", "status": 404}),
                content_type="application/json",
            )
        doc = _fingerprint_doc(snap, histogram=True)
        doc["pretty"] = (await self._pretty_all([snap.normalized]))[0]
        doc["plan"] = self._plan(fingerprint)
        return web.json_response(doc)

    async def reset(self, request: web.Request) -> web.Response:
        self._require_admin(request)
        stats = self._stats()
        forgotten = len(stats)
        stats.reset()
        log.info("query_stats_reset", extra={"fingerprints": forgotten, "by": request.remote})
        return web.json_response({"reset": True, "fingerprints_forgotten": forgotten})


def _entry_doc(entry: CacheEntrySnapshot) -> dict[str, Any]:
    return {"key": entry.key, "tables": list(entry.tables), "bytes": entry.bytes, "hits": entry.hits,
            "age_s": round(entry.age_s, 3), "ttl_s": round(entry.ttl_s, 3)}


def _monitor_doc(monitor: MonitorSnapshot) -> dict[str, Any]:
    return {"database": monitor.database, "listening": monitor.ready, "tracked_tables": monitor.tracked_tables,
            "writer_functions": monitor.writer_functions, "notifications": monitor.notifications,
            "connects": monitor.connects, "drops": monitor.drops, "last_error": monitor.last_error}


class CacheApi:
    """``/api/cache`` and ``/api/cache/flush``; ``require_admin`` is the query API's check (one
    warning per app about an open admin endpoint, not one per API)."""

    def __init__(self, app: web.Application, require_admin: Callable[[web.Request], None]) -> None:
        self.app = app
        self.require_admin = require_admin

    def _front(self) -> CacheFront | None:
        return self.app[keys.PROXY].cache_front

    async def show(self, request: web.Request) -> web.Response:
        limit = _limit(request)
        front = self._front()
        if front is None:
            return web.json_response({"mode": "off", "enabled": False,
                                      "message": "the result cache is off (cache.mode: off)"})
        snap = front.snapshot()
        cache = snap.cache
        bypasses = cache_counts(cache.bypasses)
        return web.json_response({
            "mode": snap.mode, "enabled": True, "ttl_s": snap.ttl_s, "require_triggers": snap.require_triggers,
            "paused": cache.paused,
            "requests": {"hit": cache.hits, "miss": cache.misses, "bypass": sum(bypasses.values())},
            "hit_ratio": cache_hit_ratio(cache.hits, cache.misses),
            "bypasses": bypasses, "stores": cache.stores, "rejected": cache_counts(cache.rejected),
            "evictions": cache_counts(cache.evictions, CACHE_EVICTION_REASONS),
            "invalidations": cache_counts(cache.invalidations, INVALIDATION_SOURCES),
            "spared": cache_counts(cache.spared, CACHE_SPARED_BY),
            "entries": cache.entries, "bytes": cache.bytes, "max_bytes": cache.max_bytes,
            "max_result_bytes": cache.max_result_bytes,
            "databases": [_monitor_doc(m) for m in sorted(snap.monitors, key=lambda m: m.database)],
            "limit": limit, "top": [_entry_doc(e) for e in front.cache.top(limit)],
        })

    async def flush(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        front = self._front()
        if front is None:
            raise web.HTTPConflict(
                text=_json({"error": "the result cache is off (cache.mode: off): nothing to flush", "status": 409}),
                content_type="application/json",
            )
        flushed = front.cache.flush("flush")
        log.info("cache_flushed", extra={"entries": flushed, "by": request.remote})
        return web.json_response({"flushed": flushed})


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def setup_api(app: web.Application) -> None:
    """Register /api/queries/* and /api/cache*."""
    api = QueryApi(app)
    app[keys.REQUIRE_ADMIN] = api._require_admin  # noqa: SLF001 - one admin check (and warning) per app
    app.router.add_get("/api/queries/top", api.top)
    app.router.add_get("/api/queries/slow", api.slow)
    app.router.add_post("/api/queries/reset", api.reset)
    app.router.add_get("/api/queries/{fingerprint}", api.one)
    cache = CacheApi(app, api._require_admin)  # noqa: SLF001 - one admin check (and warning) per app
    app.router.add_get("/api/cache", cache.show)
    app.router.add_post("/api/cache/flush", cache.flush)
