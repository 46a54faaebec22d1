"""GET /metrics of the agent, in front of a real proxy and a real PostgreSQL.

The agent runs on the proxy's own event loop (as ``pgsidecar run`` does) and is scraped over
HTTP from the test thread; the answer is read back with prometheus_client's parsers and, where
it is installed, checked by ``promtool check metrics``.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from agent import keys
from agent.app import create_app
from tests.helpers.agent_http import RunningAgent, find_samples, parse_samples, sample_value
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.tools import promtool_check_metrics

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
def agent(proxy: RunningProxy) -> Iterator[RunningAgent]:
    running = RunningAgent(proxy)
    yield running
    running.stop()


@pytest.fixture
def table(direct: Any) -> Iterator[str]:
    name = f"metrics_{uuid.uuid4().hex[:8]}"
    d = direct()
    d.execute(f"create table {name} (id int primary key)")
    yield name
    d.execute(f"drop table if exists {name}")


def _connect(proxy: RunningProxy) -> psycopg.Connection[Any]:
    # No server-side prepares: one execute is exactly one statement the proxy times.
    return psycopg.connect(**proxy.kwargs(), autocommit=True, prepare_threshold=None, connect_timeout=10)


def _scrape_text(agent: RunningAgent, **headers: str) -> str:
    status, got, body = agent.request("GET", "/metrics", headers=headers)
    assert status == 200, body[:500]
    return body.decode()








def test_queries_pools_and_clients_from_real_traffic(proxy: RunningProxy, agent: RunningAgent, table: str,
                                                     direct: Any) -> None:
    with _connect(proxy) as conn:
        for n in range(5):
            assert conn.execute("select generate_series(1, %s)", (n + 1,)).fetchall()[-1] == (n + 1,)
        for n in range(2):
            conn.execute(f"insert into {table} (id) values (%s)", (n,))
        with pytest.raises(psycopg.errors.DivisionByZero) as err:
            conn.execute("select 1/0")
        assert err.value.sqlstate == "22012"
        # The server has the rows the client inserted.
        assert direct().execute(f"select count(*) from {table}").fetchone() == (2,)

        samples = parse_samples(_scrape_text(agent))

    db, user = proxy.database, proxy.user
    scope = {"database": db, "user": user}
    selects = sample_value(samples, "pgsidecar_queries_total", **scope, kind="select", status="ok")
    assert selects >= 5
    assert sample_value(samples, "pgsidecar_queries_total", **scope, kind="insert", status="ok") == 2
    failed = sample_value(samples, "pgsidecar_queries_total", **scope, kind="select", status="error")
    assert failed >= 1
    assert not find_samples(samples, "pgsidecar_queries_total", kind="insert", status="error")

    # Duration histograms: one observation per statement of the kind, cumulative buckets.
    for kind, expected in (("select", selects + failed), ("insert", 2)):
        labels = {**scope, "kind": kind}
        count = sample_value(samples, "pgsidecar_query_duration_seconds_count", **labels)
        assert count == expected
        buckets = find_samples(samples, "pgsidecar_query_duration_seconds_bucket", **labels)
        values = [b.value for b in buckets]
        assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf" and values[-1] == count
        assert sample_value(samples, "pgsidecar_query_duration_seconds_sum", **labels) > 0

    # Pools: one (database, user) pool sized as configured, with the connections it opened.
    pool = {"pool": f"{db}/{user}", **scope}
    assert sample_value(samples, "pgsidecar_pool_size", **pool) == proxy.settings.pool.size == 3
    assert sample_value(samples, "pgsidecar_pool_max_overflow", **pool) == proxy.settings.pool.max_overflow
    servers = {s.labels["state"]: s.value for s in find_samples(samples, "pgsidecar_pool_server_connections", **pool)}
    assert set(servers) == {"active", "idle", "overflow", "pinned", "connecting"}
    assert servers["idle"] + servers["active"] > 0
    assert sample_value(samples, "pgsidecar_pool_server_connections_opened_total", **pool) >= 1
    assert sample_value(samples, "pgsidecar_pool_waiting_clients", **pool) == 0
    # Every statement checked a server connection out (transaction mode).
    assert sample_value(samples, "pgsidecar_pool_checkout_wait_seconds_count", **pool) >= 8

    # Clients: ours, connected and between statements.
    clients = {s.labels["state"]: s.value for s in find_samples(samples, "pgsidecar_client_connections")}
    assert clients == {"active": 0, "idle": 1, "waiting": 0, "pinned": 0}
    assert sample_value(samples, "pgsidecar_client_connections_accepted_total") >= 1
    assert sample_value(samples, "pgsidecar_client_connections_rejected_total") == 0

    (info,) = find_samples(samples, "pgsidecar_build_info")
    assert info.value == 1 and info.labels["version"]
    assert 0 < sample_value(samples, "pgsidecar_start_time_seconds") <= time.time()
    assert sample_value(samples, "pgsidecar_process_threads") >= 1
    assert sample_value(samples, "process_resident_memory_bytes") > 0

    # Labels carry no SQL text (nor anything of the statements' values).
    for s in samples:
        for value in s.labels.values():
            assert not any(part in value for part in ("generate_series", "1/0", table, "select ")), s


def test_promtool_finds_nothing_to_lint(proxy: RunningProxy, agent: RunningAgent) -> None:
    with _connect(proxy) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table_here")
    agent.request("GET", "/healthz")
    agent.request("GET", "/nope")
    text = _scrape_text(agent)
    assert "pgsidecar_query_duration_seconds_bucket" in text  # every family has samples to lint
    assert promtool_check_metrics(text) == (0, "")


def test_openmetrics_when_asked_for_and_text_format_otherwise(proxy: RunningProxy, agent: RunningAgent) -> None:
    with _connect(proxy) as conn:
        conn.execute("select 1")

    status, headers, body = agent.request("GET", "/metrics", headers={"Accept": OPENMETRICS})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0"), headers
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}  # strict: raises on malformed input
    assert families["pgsidecar_queries"].type == "counter"
    assert families["pgsidecar_query_duration_seconds"].type == "histogram"
    assert families["pgsidecar_pool_checkout_wait_seconds"].type == "histogram"
    assert families["pgsidecar_pool_server_connections"].type == "gauge"
    assert any(s.name == "pgsidecar_queries_total" and s.labels["kind"] == "select" and s.value >= 1
               for s in families["pgsidecar_queries"].samples)

    status, headers, body = agent.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    assert "# EOF" not in body.decode()


def test_http_requests_are_counted_by_route_pattern(agent: RunningAgent) -> None:
    assert agent.request("GET", "/healthz")[0] == 200
    assert agent.request("GET", "/healthz")[0] == 200
    status, body = agent.json("GET", "/nope")
    assert status == 404 and body["status"] == 404  # still the JSON error answer
    # An HTTPException raised by a handler of a matched route.
    status, body = agent.json("GET", "/api/queries/top?by=bogus")
    assert status == 400

    samples = parse_samples(_scrape_text(agent))
    requests = "pgsidecar_http_requests_total"
    assert sample_value(samples, requests, method="GET", endpoint="/healthz", status="200") == 2
    assert sample_value(samples, requests, method="GET", endpoint="unmatched", status="404") == 1
    assert sample_value(samples, requests, method="GET", endpoint="/api/queries/top", status="400") == 1
    assert sample_value(samples, "pgsidecar_http_request_duration_seconds_count", method="GET", endpoint="/healthz") == 2
    for s in samples:
        assert not any("/nope" in v or "bogus" in v for v in s.labels.values()), s


def test_event_loop_lag_is_measured(proxy: RunningProxy, agent: RunningAgent) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        samples = parse_samples(_scrape_text(agent))
        if find_samples(samples, "pgsidecar_event_loop_lag_seconds") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sample_value(samples, "pgsidecar_event_loop_lag_seconds") >= 0
    assert sample_value(samples, "pgsidecar_event_loop_lag_distribution_seconds_count") >= 1

    # Block the loop the proxy and the agent share for longer than the monitor's interval: its
    # next wake-up is at least 0.05 s late (a lower bound that holds however slow the machine).
    before = sample_value(samples, "pgsidecar_event_loop_lag_distribution_seconds_sum")
    proxy.run(time.sleep, 0.3)
    deadline = time.monotonic() + 2.0
    while True:
        samples = parse_samples(_scrape_text(agent))
        grown = sample_value(samples, "pgsidecar_event_loop_lag_distribution_seconds_sum") - before
        if grown >= 0.04 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert grown >= 0.04
    assert sample_value(samples, "pgsidecar_event_loop_lag_distribution_seconds_bucket", le="0.025") < sample_value(
        samples, "pgsidecar_event_loop_lag_distribution_seconds_count")


def test_stopping_the_app_stops_the_lag_monitor(proxy: RunningProxy) -> None:
    def monitors() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "pgsidecar-loop-lag"]

    running = RunningAgent(proxy)
    assert len(proxy.run(monitors)) == 1
    running.stop()
    assert proxy.run(monitors) == []


def test_stats_disabled_still_serves_metrics_without_query_counters(proxy_factory: Any) -> None:
    proxy = proxy_factory(stats__enabled=False)
    agent = RunningAgent(proxy)
    try:
        with _connect(proxy) as conn:
            conn.execute("select 1")
        samples = parse_samples(_scrape_text(agent))
    finally:
        agent.stop()
    assert not find_samples(samples, "pgsidecar_queries_total")
    assert not find_samples(samples, "pgsidecar_query_duration_seconds_count")
    assert sample_value(samples, "pgsidecar_pool_size", pool=f"{proxy.database}/{proxy.user}") == proxy.settings.pool.size


def test_each_app_has_its_own_registry(proxy: RunningProxy) -> None:
    # A global registry would refuse the second app's HTTP counters (duplicated timeseries).
    first = create_app(proxy.settings, proxy.server)
    second = create_app(proxy.settings, proxy.server)
    assert first[keys.REGISTRY] is not second[keys.REGISTRY]


def test_top_n_fingerprint_series_only_when_asked_for_and_capped(proxy_factory: Any) -> None:
    default = proxy_factory()
    agent = RunningAgent(default)
    try:
        with psycopg.connect(**default.kwargs(), autocommit=True) as conn:
            conn.execute("select 1")
        assert not [s for s in parse_samples(_scrape_text(agent)) if s.name.startswith("pgsidecar_query_top_")]
    finally:
        agent.stop()
    proxy = proxy_factory(stats__prometheus_top_n=2)
    agent = RunningAgent(proxy)
    try:
        with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
            for _ in range(3):
                conn.execute("select pg_sleep(0.05)")
            conn.execute("select 2 + 2")
            conn.execute("select 'three', 3")
        text = _scrape_text(agent)
        samples = parse_samples(text)
        calls = find_samples(samples, "pgsidecar_query_top_calls_total")
        assert len(calls) == 2  # capped at the setting
        busiest = max(calls, key=lambda s: s.value)
        assert busiest.value == 3 and busiest.labels["kind"] == "select"
        fid = busiest.labels["fingerprint"]
        status, doc = agent.json("GET", f"/api/queries/{fid}")
        assert status == 200 and doc["normalized"] == "select pg_sleep($1)"
        seconds = find_samples(samples, "pgsidecar_query_top_duration_seconds_total", fingerprint=fid)
        assert seconds and seconds[0].value >= 0.15
        assert "pg_sleep" not in "".join(str(s.labels) for s in samples)  # ids, never SQL text
        assert promtool_check_metrics(text) == (0, "")
    finally:
        agent.stop()
