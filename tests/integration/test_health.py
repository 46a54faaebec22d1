"""The agent's health and monitoring endpoints (issue 5): ``/readyz``, ``/api/health/detailed``
and ``/api/monitoring/status``, in front of a real proxy and a real PostgreSQL.

States are produced for real: an upstream cluster stopped (down, 503) and started again, a client
queued behind a one-connection pool (degraded), a cache LISTEN connection that cannot come back
because its database refuses connections (degraded), an upstream DSN with a password (never shown),
a wrong password (unreachable, and still never shown). Waits poll with a deadline; nothing asserts
how fast anything is.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from agent.health import Health
from tests.helpers.agent_http import RunningAgent
from tests.helpers.cluster import Cluster
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.wire import wait_for

SMALL_POOL = {"pool__size": 3, "pool__max_overflow": 2, "pool__checkout_timeout": 10.0}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def agent(proxy: RunningProxy, agents: Callable[[RunningProxy], RunningAgent]) -> RunningAgent:
    return agents(proxy)


def _health(agent: RunningAgent) -> Health:
    """The Health object behind the app's routes (to read its probe counter or change its TTL)."""
    for route in agent.runner.app.router.routes():
        if route.resource is not None and route.resource.canonical == "/readyz":
            return route.handler.__self__  # type: ignore[union-attr, no-any-return]
    raise AssertionError("no /readyz route")




def _connect(proxy: RunningProxy, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    return psycopg.connect(**proxy.kwargs(), prepare_threshold=None, connect_timeout=10, **kw)


def _health_backends(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select count(*) from pg_stat_activity where application_name = 'pgsidecar-health'").fetchone()
    assert row is not None
    return int(row[0])


# ----------------------------------------------------------------------------- ok


def test_ready_and_detailed_ok_with_real_figures(
        proxy: RunningProxy, agent: RunningAgent, direct: Callable[..., Any]) -> None:
    with _connect(proxy) as conn:  # opens the pool of (database, user)
        assert conn.execute("select 1").fetchone() == (1,)
    opened_before = proxy.snapshot().pools[0].servers_opened
    wait_for("the webhook emitter's LISTEN connection",
             lambda: agent.json("GET", "/api/health/detailed")[1]["webhook_listen"]["listening"] or None)

    status, doc = agent.json("GET", "/readyz")
    assert status == 200, doc
    assert doc["status"] == "ready" and doc["upstream_round_trip_ms"] >= 0

    status, doc = agent.json("GET", "/api/health/detailed")
    assert status == 200, doc
    assert doc["status"] == "ok" and doc["reasons"] == []

    d = direct()
    version, in_recovery = d.execute("select current_setting('server_version'), pg_is_in_recovery()").fetchone()
    up = doc["upstream"]
    assert up["status"] == "ok" and up["reachable"] is True and up["error"] is None
    assert up["server_version"] == version and up["in_recovery"] is in_recovery
    assert up["round_trip_ms"] >= 0 and up["connect_ms"] >= 0
    assert up["database"] == proxy.upstream.database and up["port"] == proxy.upstream.port

    assert doc["proxy"]["status"] == "ok" and doc["proxy"]["accepting"] is True
    assert doc["proxy"]["port"] == proxy.port and doc["proxy"]["clients"]["total"] == 0

    pools = doc["pools"]
    assert pools["status"] == "ok" and pools["count"] == 1
    (pool,) = pools["pools"]
    assert pool["database"] == proxy.upstream.database and pool["user"] == proxy.user
    assert (pool["size"], pool["max_overflow"]) == (3, 2)
    assert pool["active"] == 0 and pool["idle"] == 1 and pool["waiting"] == 0 and pool["overflow"] == 0

    assert doc["cache"]["status"] in ("ok", "off")
    assert doc["cache"]["mode"] == proxy.settings.cache.mode
    # The test database has no webhook tables: the emitter listens and says what is missing.
    assert doc["webhooks"]["status"] == "not_installed" and "pgsidecar migrate" in doc["webhooks"]["message"]
    assert doc["webhook_listen"]["status"] == "ok" and doc["webhook_listen"]["listening"] is True

    process = doc["process"]
    assert process["status"] == "ok" and process["rss_bytes"] > 0 and process["open_fds"] > 0
    assert process["threads"] >= 1 and process["cpu_percent"] >= 0
    assert "event_loop_lag_s" in process
    assert doc["platform"]["name"] in ("amvera", "kubernetes", "docker", "bare_host")

    # The probe used its own short connection: no pool server connection was opened or lent,
    # and the probe's backend goes away.
    snap = proxy.snapshot().pools[0]
    assert snap.servers_opened == opened_before and snap.active == 0
    wait_for("the health probe's backend to close", lambda: _health_backends(d) == 0)


def test_concurrent_requests_share_one_probe(proxy: RunningProxy, agent: RunningAgent) -> None:
    health = _health(agent)
    health.probe.ttl = 0.0  # no reuse: only the probe in flight is shared
    before = health.probe.probes

    async def ten() -> list[Any]:
        return await asyncio.gather(*(health.probe.check() for _ in range(10)))

    results = proxy.call(ten())
    # All ten checks start before the probe's own task runs (the loop runs tasks in order).
    assert health.probe.probes == before + 1
    assert all(r is results[0] and r.reachable for r in results)


def test_probe_result_is_reused_for_its_ttl(proxy: RunningProxy, agent: RunningAgent) -> None:
    health = _health(agent)
    assert health.probe.ttl == pytest.approx(1.0)
    health.probe.ttl = 3600.0  # a TTL no test run outlives: reuse does not depend on speed
    assert agent.json("GET", "/readyz")[0] == 200
    probes = health.probe.probes
    for _ in range(5):
        assert agent.json("GET", "/readyz")[0] == 200
        assert agent.json("GET", "/api/health/detailed")[0] == 200
    assert health.probe.probes == probes
    health.probe.ttl = 0.0
    assert agent.json("GET", "/readyz")[0] == 200
    assert health.probe.probes == probes + 1


# ----------------------------------------------------------------------------- down and back


def test_upstream_stopped_is_down_503_then_ready_again(
        restartable_cluster: Cluster, proxy_factory: Callable[..., RunningProxy],
        agents: Callable[[RunningProxy], RunningAgent]) -> None:
    proxy = proxy_factory(restartable_cluster.dsn(), **SMALL_POOL)
    agent = agents(proxy)
    assert agent.json("GET", "/readyz")[0] == 200

    restartable_cluster.stop()

    def ready_status() -> tuple[int, Any]:
        return agent.json("GET", "/readyz")

    status, doc = wait_for("readyz to answer 503", lambda: (r := ready_status())[0] == 503 and r)
    assert doc["status"] == "not_ready" and "upstream PostgreSQL unreachable" in doc["reason"]
    assert doc["upstream"]["port"] == restartable_cluster.port

    status, doc = agent.json("GET", "/api/health/detailed")
    assert status == 503, doc
    assert doc["status"] == "down" and "upstream: down" in doc["reasons"]
    up = doc["upstream"]
    assert up["status"] == "down" and up["reachable"] is False and up["error"]
    assert up["server_version"] is None and up["round_trip_ms"] is None
    assert doc["process"]["status"] == "ok"  # the other sections still report
    # The agent itself is alive, and its monitoring status still answers.
    assert agent.json("GET", "/healthz") == (200, {"status": "ok"})
    assert agent.json("GET", "/api/monitoring/status")[0] == 200

    restartable_cluster.start()
    wait_for("readyz to answer 200 again", lambda: ready_status()[0] == 200)
    # The LISTEN connections (cache invalidation, webhooks) retry on their own clock, about once a
    # second, so for a moment after readiness the detailed status may say degraded because of them,
    # and only because of them.
    seen: list[list[str]] = []

    def detailed_ok() -> Any:
        status, doc = agent.json("GET", "/api/health/detailed")
        assert status == 200, doc
        seen.append(doc["reasons"])
        return doc["status"] == "ok" and doc

    doc = wait_for("the detailed status to be ok again", detailed_ok)
    assert doc["upstream"]["reachable"] is True and doc["upstream"]["status"] == "ok"
    transient = {reason for reasons in seen for reason in reasons}
    assert transient <= {"cache: degraded", "webhooks: degraded", "webhook_listen: degraded"}, seen


def test_proxy_not_accepting_is_down(proxy: RunningProxy, agent: RunningAgent) -> None:
    proxy.call(proxy.server.stop())
    status, doc = agent.json("GET", "/readyz")
    assert status == 503 and doc["reason"] == "the proxy is not accepting connections"
    status, doc = agent.json("GET", "/api/health/detailed")
    assert status == 503 and doc["status"] == "down"
    assert doc["proxy"]["accepting"] is False and "proxy: down" in doc["reasons"]


# ----------------------------------------------------------------------------- degraded


def test_clients_waiting_for_the_pool_is_degraded(
        proxy_factory: Callable[..., RunningProxy], agents: Callable[[RunningProxy], RunningAgent]) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=30.0)
    agent = agents(proxy)
    holder = _connect(proxy, autocommit=False)
    holder.execute("select 1")  # a transaction holds the only server connection
    waiter_done = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with _connect(proxy) as conn:
                conn.execute("select 2")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            waiter_done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        def degraded() -> Any:
            status, doc = agent.json("GET", "/api/health/detailed")
            return doc["pools"]["pools"] and doc["pools"]["pools"][0]["waiting"] >= 1 and (status, doc)

        status, doc = wait_for("a client waiting for the pool", degraded)
        assert status == 200  # degraded is still 200
        assert doc["status"] == "degraded" and "pools: degraded" in doc["reasons"]
        (pool,) = doc["pools"]["pools"]
        assert pool["status"] == "degraded" and pool["active"] == 1 and pool["idle"] == 0 and pool["size"] == 1
        assert agent.json("GET", "/readyz")[0] == 200  # still ready: the upstream answers
    finally:
        holder.commit()
        holder.close()
        assert waiter_done.wait(30)
        thread.join()
    assert not errors
    status, doc = agent.json("GET", "/api/health/detailed")
    assert status == 200 and doc["status"] == "ok"


def test_cache_off_and_listen_connection_down_is_degraded(
        restartable_cluster: Cluster, proxy_factory: Callable[..., RunningProxy],
        agents: Callable[[RunningProxy], RunningAgent]) -> None:
    off = proxy_factory(restartable_cluster.dsn(), cache__mode="off", **SMALL_POOL)
    status, doc = agents(off).json("GET", "/api/health/detailed")
    assert status == 200 and doc["cache"]["status"] == "off" and doc["cache"]["mode"] == "off"

    admin = psycopg.connect(restartable_cluster.dsn(), autocommit=True, connect_timeout=10)
    try:
        admin.execute("create database side")
        proxy = proxy_factory(restartable_cluster.dsn(), cache__mode="all", **SMALL_POOL)
        agent = agents(proxy)
        front = proxy.server.cache_front
        assert front is not None
        monitor = proxy.run(lambda: front.monitor_for("side", proxy.server.pool_for("side", proxy.user).endpoint))
        assert proxy.call(monitor.wait_ready(10))

        status, doc = agent.json("GET", "/api/health/detailed")
        assert status == 200 and doc["status"] == "ok", doc
        cache = doc["cache"]
        assert cache["status"] == "ok" and cache["mode"] == "all" and cache["entries"] == 0
        assert cache["hit_ratio"] == 0.0
        assert [(d["database"], d["listening"]) for d in cache["databases"]] == [("side", True)]

        # The LISTEN connection is cut and cannot come back; the upstream database still answers.
        admin.execute("alter database side allow_connections false")
        admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                      "where application_name = 'pgsidecar-cache-listen' and datname = 'side'")

        def degraded() -> Any:
            status, doc = agent.json("GET", "/api/health/detailed")
            return doc["cache"]["status"] == "degraded" and (status, doc)

        status, doc = wait_for("the cache's LISTEN connection to be reported down", degraded)
        assert status == 200 and doc["status"] == "degraded" and "cache: degraded" in doc["reasons"]
        (side,) = doc["cache"]["databases"]
        assert side["listening"] is False and side["status"] == "degraded" and side["drops"] >= 1
        assert doc["upstream"]["reachable"] is True

        admin.execute("alter database side allow_connections true")
        wait_for("the LISTEN connection to come back",
                  lambda: agent.json("GET", "/api/health/detailed")[1]["status"] == "ok")
    finally:
        admin.execute("alter database side allow_connections true")
        admin.close()


# ----------------------------------------------------------------------------- secrets


def test_no_endpoint_shows_the_upstream_password(
        auth_cluster: Cluster, proxy_factory: Callable[..., RunningProxy],
        agents: Callable[[RunningProxy], RunningAgent], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.health")
    paths = ["/readyz", "/api/health/detailed", "/api/monitoring/status", "/metrics", "/healthz",
             "/api/cache", "/api/nope"]

    good = agents(proxy_factory(auth_cluster.dsn("scram_user", "scram_pw"), **SMALL_POOL))
    assert good.json("GET", "/readyz")[0] == 200
    for path in paths:
        for method in ("GET", "POST"):
            _, _, body = good.request(method, path)
            assert b"scram_pw" not in body, (method, path)

    # A wrong password: unreachable (authentication fails), and the error text never echoes it.
    secret = "Wr0ng-s3cret-Pw"
    bad = agents(proxy_factory(auth_cluster.dsn("scram_user", secret), **SMALL_POOL))
    status, doc = bad.json("GET", "/readyz")
    assert status == 503 and "unreachable" in doc["reason"]
    status, doc = bad.json("GET", "/api/health/detailed")
    assert status == 503 and doc["upstream"]["error"]
    assert doc["upstream"]["user"] == "scram_user"
    for path in paths:
        _, _, body = bad.request("GET", path)
        assert secret.encode() not in body, path
    # The log says once that the upstream is unreachable, and why, without the password.
    lines = [r for r in caplog.records if r.name == "agent.health" and r.getMessage() == "upstream_unreachable"]
    assert len(lines) == 1 and "scram_user" in lines[0].error  # type: ignore[attr-defined]
    for record in caplog.records:
        assert secret not in record.getMessage() and secret not in str(record.__dict__)


# ----------------------------------------------------------------------------- monitoring status


def test_monitoring_status_counts_series_scrapes_and_targets(proxy: RunningProxy, agent: RunningAgent) -> None:
    status, doc = agent.json("GET", "/api/monitoring/status")
    assert status == 200, doc
    assert doc["scrapes"] == {"count": 0, "last_at": None, "last_scraper": None, "last_user_agent": None,
                              "seconds_since_last": None}
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) == {"p95_latency", "error_rate", "cache_hit_ratio", "memory_rss", "active_server_connections"}
    assert targets["p95_latency"]["value"] is None and targets["p95_latency"]["met"] is None
    assert targets["error_rate"]["note"] == "no statement measured yet"

    with _connect(proxy) as conn:
        for _ in range(9):
            conn.execute("select 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
    status, _, body = agent.request("GET", "/metrics", headers={"User-Agent": "Prometheus/2.45.0"})
    assert status == 200
    scraped_series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))

    status, doc = agent.json("GET", "/api/monitoring/status")
    assert status == 200
    scrapes = doc["scrapes"]
    assert scrapes["count"] == 1 and scrapes["last_scraper"] == "127.0.0.1"
    assert scrapes["last_user_agent"] == "Prometheus/2.45.0" and scrapes["seconds_since_last"] >= 0
    # Series the registry holds now: the scrape's, plus at most the HTTP series of that scrape.
    assert doc["metrics"]["families"] > 10
    assert scraped_series <= doc["metrics"]["series"] <= scraped_series + 20

    targets = {t["name"]: t for t in doc["targets"]}
    assert targets["error_rate"]["value"] == pytest.approx(0.1) and targets["error_rate"]["met"] is False
    p95 = targets["p95_latency"]
    assert p95["value"] is not None and p95["value"] > 0 and p95["met"] is (p95["value"] < 1.0)
    assert p95["unit"] == "s" and p95["target"] == "< 1 s"
    mem = targets["memory_rss"]
    assert mem["value"] > 0 and mem["met"] is (mem["value"] < 500) and mem["unit"] == "MB"
    active = targets["active_server_connections"]
    assert active["value"] == 0 and active["met"] is True
    cache = targets["cache_hit_ratio"]
    if proxy.settings.cache.mode == "off":
        assert cache["value"] is None and cache["met"] is None

    rules = doc["alert_rules"]
    assert rules["file"] == "alert_rules.yml"
    if rules["status"] == "missing":
        assert rules["alerts"] == 0
    else:
        assert rules["status"] == "shipped" and rules["alerts"] == len(rules["names"]) > 0


def test_monitoring_status_with_stats_off(proxy_factory: Callable[..., RunningProxy],
                                          agents: Callable[[RunningProxy], RunningAgent]) -> None:
    agent = agents(proxy_factory(stats__enabled=False, **SMALL_POOL))
    status, doc = agent.json("GET", "/api/monitoring/status")
    assert status == 200
    targets = {t["name"]: t for t in doc["targets"]}
    for name in ("p95_latency", "error_rate"):
        assert targets[name]["value"] is None and targets[name]["met"] is None
        assert "stats.enabled: false" in targets[name]["note"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method,path,code", [
    ("GET", "/api/health/nope", 404),
    ("GET", "/api/monitoring", 404),
    ("GET", "/readyz/extra", 404),
    ("POST", "/readyz", 405),
    ("DELETE", "/api/health/detailed", 405),
    ("PUT", "/api/monitoring/status", 405),
    ("POST", "/healthz", 405),
])
def test_unknown_paths_and_bad_methods_answer_json(agent: RunningAgent, method: str, path: str, code: int) -> None:
    status, headers, body = agent.request(method, path)
    assert status == code and headers["Content-Type"].startswith("application/json"), (status, headers, body)
    doc = json.loads(body)
    assert doc["status"] == code and doc["error"]
    if code == 405:
        assert "GET" in headers["Allow"]
