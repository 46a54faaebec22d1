"""The agent's health and monitoring endpoints (issue 5): readiness, detailed health, and the
monitoring system's own state.

- ``GET /readyz``: 200 ``{"status": "ready", ...}`` when the proxy is accepting connections and
  the upstream PostgreSQL answered a real round trip; else 503 with ``{"status": "not_ready",
  "reason": ...}``. For container probes (``GET /healthz``, in app.py, only says the process
  answers).
- ``GET /api/health/detailed``: ``status`` ok / degraded / down and one section per component,
  each with its own ``status``: ``proxy`` (accepting, clients), ``upstream`` (reachable,
  round_trip_ms, server_version, in_recovery), ``pools`` (size, active, idle, overflow, waiting
  per pool), ``cache`` (mode, entries, bytes, hit ratio, each database's LISTEN connection; "off"
  when ``cache.mode: off``), ``webhooks`` (backlog: pending deliveries and the oldest one's age,
  attempts by result, endpoints being delivered to; "not_installed" while the webhook tables do
  not exist, "off" with ``webhooks.enabled: false``; degraded when the oldest pending event is
  older than ``WEBHOOK_BACKLOG_DEGRADED_S``), ``webhook_listen`` (the emitter's LISTEN
  connection: listening, connects, notifications, last error), ``process`` (RSS, CPU %, open fds,
  threads, event-loop lag), ``platform`` (Amvera, Kubernetes, Docker or bare host, with what
  identifies it). 200 when ok or degraded, 503 when down. Down: the upstream is unreachable or
  the proxy is not accepting. Degraded: a pool has clients waiting, a LISTEN connection is down,
  or the webhook backlog is old.
- ``GET /api/monitoring/status``: series the agent's registry exposes, the last scrape of
  ``/metrics`` (time and address), the alert rules shipped in ``config/alert_rules.yml``, and the
  seed's targets (p95 < 1 s, error rate < 1 %, cache hit ratio > 70 %, memory < 500 MB, active
  server connections < 20), each with its current value and ``met`` (null when there is no data
  yet: no statement measured, or the cache off). Latency and error rate are since the proxy
  started (the Prometheus counters, which ``POST /api/queries/reset`` does not reset).

The upstream check is one short asyncpg connection (``application_name`` pgsidecar-health) and
one ``SELECT``: it never takes a pool's server connection away from clients. Its result is kept
``PROBE_TTL`` seconds and concurrent requests share one probe in flight, so probes cannot hammer
the database. Nothing shown carries a password or the DSN: the upstream is named by host, port,
database and user, and error texts are scrubbed of the password.

Platform detection reads the process environment and a few files (``/.dockerenv``,
``/proc/self/cgroup``, the Kubernetes service-account namespace) once, at setup: these describe
where the process runs, not how pgsidecar is configured, so they stay out of ``config/loader.py``.
Only names of variables and non-secret identifying values are shown (never other values).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import yaml
from aiohttp import web

from proxy.listener import ProxyServer
from proxy.stats import LATENCY_BUCKETS

from . import keys
from .metrics import cache_hit_ratio

log = logging.getLogger(__name__)

#: Seconds an upstream probe's result is reused.
PROBE_TTL = 1.0
#: Where the shipped alert rules live (the repository's config/).
ALERT_RULES = Path(__file__).resolve().parent.parent / "config" / "alert_rules.yml"

# The seed's targets.
TARGET_P95_S = 1.0
TARGET_ERROR_RATE = 0.01
TARGET_CACHE_HIT_RATIO = 0.70
TARGET_MEMORY_MB = 500.0
TARGET_ACTIVE_CONNECTIONS = 20

# Oldest undelivered webhook event older than this: the webhooks section says degraded.
WEBHOOK_BACKLOG_DEGRADED_S = 300.0


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """One probe of the upstream PostgreSQL."""

    reachable: bool
    checked_at: float  # wall clock, seconds since the epoch
    connect_ms: float | None = None
    round_trip_ms: float | None = None  # one SELECT on the open connection
    server_version: str | None = None
    in_recovery: bool | None = None
    error: str | None = None


class UpstreamProbe:
    """A real round trip to the upstream, at most one per ``ttl`` seconds."""

    def __init__(self, proxy: ProxyServer, ttl: float = PROBE_TTL) -> None:
        self.endpoint = proxy.upstream_endpoint()
        self.timeout = self.endpoint.connect_timeout
        self.ttl = ttl
        self._last: UpstreamStatus | None = None
        self._last_mono = 0.0
        self._inflight: asyncio.Future[UpstreamStatus] | None = None
        self.probes = 0  # round trips attempted (tests read it)

    def describe(self) -> dict[str, Any]:
        """Where the upstream is, without its password."""
        ep = self.endpoint
        return {"host": ep.host, "port": ep.port, "database": ep.database, "user": ep.user}

    async def check(self) -> UpstreamStatus:
        if self._last is not None and time.monotonic() - self._last_mono < self.ttl:
            return self._last
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._probe())
            self._inflight.add_done_callback(self._probed)
        return await asyncio.shield(self._inflight)

    def _probed(self, fut: asyncio.Future[UpstreamStatus]) -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is None:
            self._last = fut.result()
            self._last_mono = time.monotonic()

    async def _probe(self) -> UpstreamStatus:
        import asyncpg

        self.probes += 1
        checked_at = time.time()
        start = time.perf_counter()
        conn = None
        try:
            conn = await asyncpg.connect(statement_cache_size=0, **self.endpoint.connect_args("pgsidecar-health"))
            connected = time.perf_counter()
            row = await conn.fetchrow("SELECT current_setting('server_version') AS v, pg_is_in_recovery() AS r",
                                      timeout=self.timeout)
            done = time.perf_counter()
            assert row is not None
            if self._last is not None and not self._last.reachable:
                log.info("upstream_reachable", extra={"upstream": f"{self.endpoint.host}:{self.endpoint.port}"})
            return UpstreamStatus(reachable=True, checked_at=checked_at,
                                  connect_ms=round((connected - start) * 1000.0, 3),
                                  round_trip_ms=round((done - connected) * 1000.0, 3),
                                  server_version=row["v"], in_recovery=row["r"])
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable, and says why
            error = self._scrub(f"{type(exc).__name__}: {exc}")[:300]
            if self._last is None or self._last.reachable:  # one line per change, not per probe
                log.warning("upstream_unreachable", extra={"upstream": f"{self.endpoint.host}:{self.endpoint.port}", "error": error})
            return UpstreamStatus(reachable=False, checked_at=checked_at, error=error)
        finally:
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.close(), self.timeout)
                except Exception:  # noqa: BLE001
                    conn.terminate()

    def _scrub(self, text: str) -> str:
        if self.endpoint.password:
            text = text.replace(self.endpoint.password, "***")
        return text


# ----------------------------------------------------------------------------- platform


def detect_platform(environ: Mapping[str, str], root: Path = Path("/")) -> dict[str, Any]:
    """Where the process runs: Amvera, Kubernetes, Docker or a bare host, with identifying fields.

    ``environ`` and ``root`` are parameters so tests can describe any platform. Values are shown
    only for known identifying variables; of other ``AMVERA*`` variables only names."""
    hostname = socket.gethostname()
    amvera = sorted(name for name in environ if name.upper().startswith("AMVERA"))
    if amvera:
        return {"name": "amvera", "detected_by": amvera[0], "hostname": hostname, "variables": amvera}
    if environ.get("KUBERNETES_SERVICE_HOST"):
        namespace = environ.get("POD_NAMESPACE") or _read(root / "var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return {"name": "kubernetes", "detected_by": "KUBERNETES_SERVICE_HOST",
                "namespace": namespace, "pod": environ.get("POD_NAME") or environ.get("HOSTNAME") or hostname,
                "node": environ.get("NODE_NAME"),
                "api_server": f"{environ['KUBERNETES_SERVICE_HOST']}:{environ.get('KUBERNETES_SERVICE_PORT', '443')}"}
    if (root / ".dockerenv").exists():
        return {"name": "docker", "detected_by": "/.dockerenv", "hostname": hostname,
                "container_id": _container_id(root)}
    cgroup = _read(root / "proc/self/cgroup") or ""
    if any(word in cgroup for word in ("docker", "containerd", "kubepods", "libpod")):
        return {"name": "docker", "detected_by": "/proc/self/cgroup", "hostname": hostname,
                "container_id": _container_id(root)}
    return {"name": "bare_host", "detected_by": None, "hostname": hostname}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _container_id(root: Path) -> str | None:
    """The 64-hex container id from cgroup (v1) or mountinfo (v2), if either names it."""
    for name in ("proc/self/cgroup", "proc/self/mountinfo"):
        text = _read(root / name) or ""
        for token in text.replace("/", " ").replace("-", " ").replace(".", " ").split():
            if len(token) == 64 and all(c in "0123456789abcdef" for c in token):
                return token
    return None


# ----------------------------------------------------------------------------- alert rules


def alert_rules_summary(path: Path = ALERT_RULES) -> dict[str, Any]:
    """How many alerting (and recording) rules the shipped rules file holds."""
    if not path.exists():
        return {"status": "missing", "file": str(path.name), "alerts": 0, "recording": 0, "groups": 0, "names": []}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
        groups = doc.get("groups") or []
        rules = [rule for group in groups for rule in (group.get("rules") or [])]
    except (OSError, yaml.YAMLError, AttributeError, TypeError) as exc:
        return {"status": "invalid", "file": str(path.name), "alerts": 0, "recording": 0, "groups": 0, "names": [],
                "error": f"{type(exc).__name__}: {exc}"[:300]}
    names = [str(rule["alert"]) for rule in rules if isinstance(rule, dict) and "alert" in rule]
    recording = sum(1 for rule in rules if isinstance(rule, dict) and "record" in rule)
    return {"status": "shipped", "file": str(path.name), "alerts": len(names), "recording": recording,
            "groups": len(groups), "names": names}


# ----------------------------------------------------------------------------- figures


def histogram_quantile(q: float, bounds: tuple[float, ...], cumulative: list[int]) -> float | None:
    """Prometheus' histogram_quantile on cumulative bucket counts (the last is +Inf): linear
    within the bucket; the highest finite bound when the rank falls in +Inf; None when empty."""
    total = cumulative[-1] if cumulative else 0
    if total == 0:
        return None
    rank = q * total
    previous = 0
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            in_bucket = count - previous
            if in_bucket == 0:
                return bounds[i]
            return lower + (bounds[i] - lower) * ((rank - previous) / in_bucket)
        previous = count
    return bounds[-1]  # pragma: no cover


def _target(name: str, value: float | None, op: str, threshold: float, unit: str,
            note: str | None = None) -> dict[str, Any]:
    met = None if value is None else (value < threshold if op == "<" else value > threshold)
    doc: dict[str, Any] = {"name": name, "target": f"{op} {threshold:g} {unit}".strip(), "value": value,
                           "unit": unit, "met": met}
    if note:
        doc["note"] = note
    return doc


class Health:
    """The handlers with their state: the upstream probe, one psutil Process (so CPU % measures
    from one call to the next) and the platform, detected once."""

    def __init__(self, app: web.Application, environ: Mapping[str, str] | None = None,
                 root: Path = Path("/"), alert_rules: Path = ALERT_RULES) -> None:
        self.app = app
        self.proxy: ProxyServer = app[keys.PROXY]
        self.probe = UpstreamProbe(self.proxy)
        self.process = psutil.Process()
        self.process.cpu_percent(None)
        self.platform = detect_platform(os.environ if environ is None else environ, root)
        self.alert_rules = alert_rules

    # ------------------------------------------------------------------ components
    def _accepting(self) -> bool:
        return self.proxy.accepting

    def _proxy_section(self) -> dict[str, Any]:
        snap = self.proxy.snapshot()
        accepting = self._accepting()
        return {"status": "ok" if accepting else "down", "accepting": accepting,
                "host": self.proxy.host, "port": self.proxy.port, "mode": snap.mode,
                "started_at": snap.started_at, "uptime_s": round(time.time() - snap.started_at, 3),
                "clients": asdict(snap.clients)}

    def _upstream_section(self, up: UpstreamStatus) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": "ok" if up.reachable else "down", **self.probe.describe(), **asdict(up)}
        doc["cached_for_s"] = self.probe.ttl
        return doc

    def _pools_section(self) -> dict[str, Any]:
        pools = []
        for p in self.proxy.snapshot().pools:
            pools.append({"name": p.name, "database": p.database, "user": p.user,
                          "status": "degraded" if p.waiting else "ok",
                          "size": p.size, "max_overflow": p.max_overflow, "active": p.active, "idle": p.idle,
                          "overflow": p.overflow, "connecting": p.connecting, "pinned": p.pinned,
                          "waiting": p.waiting, "checkout_timeouts": p.checkout_timeouts,
                          "server_errors": p.server_errors})
        status = "degraded" if any(p["status"] != "ok" for p in pools) else "ok"
        return {"status": status, "count": len(pools), "pools": pools}

    def _cache_section(self) -> dict[str, Any]:
        front = self.proxy.cache_front
        if front is None:
            return {"status": "off", "mode": "off", "message": "the result cache is off (cache.mode: off)"}
        snap = front.snapshot()
        cache = snap.cache
        databases = [{"database": m.database, "listening": m.ready, "status": "ok" if m.ready else "degraded",
                      "tracked_tables": m.tracked_tables, "notifications": m.notifications, "drops": m.drops,
                      "last_error": m.last_error}
                     for m in sorted(snap.monitors, key=lambda m: m.database)]
        status = "degraded" if any(not d["listening"] for d in databases) else "ok"
        return {"status": status, "mode": snap.mode, "entries": cache.entries, "bytes": cache.bytes,
                "max_bytes": cache.max_bytes, "hits": cache.hits, "misses": cache.misses,
                "hit_ratio": cache_hit_ratio(cache.hits, cache.misses), "paused": cache.paused,
                "databases": databases}

    def _process_section(self) -> dict[str, Any]:
        process = self.process
        with process.oneshot():
            rss = process.memory_info().rss
            doc: dict[str, Any] = {
                "status": "ok", "pid": process.pid, "rss_bytes": rss, "rss_mb": round(rss / (1024 * 1024), 1),
                "cpu_percent": process.cpu_percent(None), "threads": process.num_threads(),
                "open_fds": process.num_fds() if hasattr(process, "num_fds") else None,
            }
        lag = self.app.get(keys.LOOP_LAG)
        doc["event_loop_lag_s"] = lag.last if lag is not None else None
        doc["event_loop_lag_samples"] = lag.count if lag is not None else 0
        return doc

    def _webhook_sections(self) -> tuple[dict[str, Any], dict[str, Any]]:
        emitter = self.app[keys.WEBHOOKS]
        snap = emitter.snapshot()
        listen_status = "ok" if snap.listening else "starting" if snap.state == "starting" else "degraded"
        listen = {"status": listen_status, "listening": snap.listening,
                  "database": emitter.database, "connects": snap.connects, "notifications": snap.notifications,
                  "last_error": snap.last_error}
        doc: dict[str, Any] = {
            "emitter_id": snap.emitter_id, "state": snap.state, "delivering": snap.delivering,
            "pending": snap.pending, "oldest_pending_age_s": snap.oldest_pending_age_s,
            "attempts": snap.deliveries, "endpoints_delivering": snap.endpoints_delivering,
        }
        if not snap.delivering:
            doc.update(status="off", message="webhook delivery is off (webhooks.enabled: false)")
        elif snap.state == "waiting_for_tables":
            doc.update(status="not_installed", message=f"the webhook tables do not exist in database "
                       f"{emitter.database!r}: run `pgsidecar migrate` or `pgsidecar webhooks install`")
        elif snap.state != "running":
            doc.update(status="degraded", message=f"the emitter is {snap.state}")
        elif (snap.oldest_pending_age_s or 0.0) > WEBHOOK_BACKLOG_DEGRADED_S:
            doc.update(status="degraded", message=f"the oldest undelivered event is {snap.oldest_pending_age_s:.0f} s "
                       f"old (more than {WEBHOOK_BACKLOG_DEGRADED_S:.0f} s)")
        else:
            doc["status"] = "ok"
        return doc, listen

    # ------------------------------------------------------------------ handlers
    async def readyz(self, request: web.Request) -> web.Response:
        if not self._accepting():
            return web.json_response({"status": "not_ready", "reason": "the proxy is not accepting connections"},
                                     status=503)
        up = await self.probe.check()
        if not up.reachable:
            return web.json_response({"status": "not_ready", "reason": f"upstream PostgreSQL unreachable: {up.error}",
                                      "upstream": self.probe.describe()}, status=503)
        return web.json_response({"status": "ready", "upstream_round_trip_ms": up.round_trip_ms,
                                  "checked_at": up.checked_at})

    async def detailed(self, request: web.Request) -> web.Response:
        up = await self.probe.check()
        webhooks, webhook_listen = self._webhook_sections()
        components = {
            "proxy": self._proxy_section(),
            "upstream": self._upstream_section(up),
            "pools": self._pools_section(),
            "cache": self._cache_section(),
            "webhooks": webhooks,
            "webhook_listen": webhook_listen,
            "process": self._process_section(),
            "platform": {"status": "ok", **self.platform},
        }
        statuses = {c["status"] for c in components.values()}
        overall = "down" if "down" in statuses else "degraded" if "degraded" in statuses else "ok"
        reasons = [f"{name}: {c['status']}" for name, c in components.items() if c["status"] in ("down", "degraded")]
        return web.json_response({"status": overall, "reasons": reasons, "checked_at": time.time(), **components},
                                 status=503 if overall == "down" else 200)

    async def monitoring(self, request: web.Request) -> web.Response:
        registry = self.app[keys.REGISTRY]
        families = list(registry.collect())
        series = sum(len(f.samples) for f in families)
        scrapes = self.app[keys.SCRAPES]
        return web.json_response({
            "metrics": {"families": len(families), "series": series, "endpoint": "/metrics"},
            "scrapes": {"count": scrapes.count, "last_at": scrapes.last_at, "last_scraper": scrapes.last_remote,
                        "last_user_agent": scrapes.last_user_agent,
                        "seconds_since_last": None if scrapes.last_at is None
                        else round(time.time() - scrapes.last_at, 3)},
            "alert_rules": alert_rules_summary(self.alert_rules),
            "targets": self._targets(),
        })

    def _targets(self) -> list[dict[str, Any]]:
        stats = self.proxy.query_stats()
        p95: float | None = None
        error_rate: float | None = None
        stats_note = None
        if stats is None:
            stats_note = "query statistics are disabled (stats.enabled: false)"
        else:
            snap = stats.snapshot()
            cumulative = [0] * (len(LATENCY_BUCKETS) + 1)
            for hist in snap.durations.values():
                for i, count in enumerate(hist.buckets):
                    cumulative[i] += count
            p95 = histogram_quantile(0.95, LATENCY_BUCKETS, cumulative)
            total = sum(snap.queries.values())
            errors = sum(n for (_db, _user, _kind, status), n in snap.queries.items() if status == "error")
            error_rate = errors / total if total else None
            if not total:
                stats_note = "no statement measured yet"
        front = self.proxy.cache_front
        hit_ratio = None
        cache_note = None
        if front is None:
            cache_note = "the result cache is off (cache.mode: off)"
        else:
            cache = front.cache.snapshot()
            if cache.hits + cache.misses:
                hit_ratio = cache_hit_ratio(cache.hits, cache.misses)
            else:
                cache_note = "no cacheable lookup yet"
        rss = self.process.memory_info().rss
        active = sum(p.active for p in self.proxy.snapshot().pools)
        return [
            _target("p95_latency", p95, "<", TARGET_P95_S, "s", stats_note),
            _target("error_rate", error_rate, "<", TARGET_ERROR_RATE, "ratio", stats_note),
            _target("cache_hit_ratio", hit_ratio, ">", TARGET_CACHE_HIT_RATIO, "ratio", cache_note),
            _target("memory_rss", round(rss / (1024 * 1024), 1), "<", TARGET_MEMORY_MB, "MB"),
            _target("active_server_connections", active, "<", TARGET_ACTIVE_CONNECTIONS, "connections"),
        ]


def setup_health(app: web.Application, environ: Mapping[str, str] | None = None) -> None:
    """Register /readyz, /api/health/detailed and /api/monitoring/status (after setup_metrics:
    the monitoring status reads its registry and scrape log)."""
    health = Health(app, environ)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/api/health/detailed", health.detailed)
    app.router.add_get("/api/monitoring/status", health.monitoring)
