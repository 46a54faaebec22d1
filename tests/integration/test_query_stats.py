"""Query observability through the proxy (issue 3): every statement a real client runs is
timed, fingerprinted and counted; slow ones are flagged and logged without literal values; the
agent's query API shows it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.helpers.agent_http import RunningAgent
from tests.helpers.proxy_thread import RunningProxy


def _stats(proxy: RunningProxy) -> Any:
    return proxy.run(lambda: proxy.server.query_stats())


def _by_text(proxy: RunningProxy, fragment: str) -> list[Any]:
    """Fingerprint snapshots whose normalised text contains ``fragment`` (read on the proxy loop)."""
    def read() -> list[Any]:
        stats = proxy.server.query_stats()
        return [s for s in stats.top("calls", 100_000) if fragment in s.normalized]

    return proxy.run(read)


def _one(proxy: RunningProxy, fragment: str) -> Any:
    found = _by_text(proxy, fragment)
    assert len(found) == 1, [(s.id, s.normalized) for s in found]
    return found[0]


@pytest.fixture
def table(direct: Any) -> Iterator[str]:
    name = f"qs_{uuid.uuid4().hex[:8]}"
    d = direct()
    d.execute(f"create table {name} (id int primary key, v text)")
    yield name
    d.execute(f"drop table if exists {name}")


@pytest.fixture
def agent(proxy: RunningProxy) -> Iterator[RunningAgent]:
    running = RunningAgent(proxy)
    yield running
    running.stop()


def test_a_slow_statement_is_flagged_logged_and_kept_without_its_literal(
        proxy: RunningProxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    marker = uuid.uuid4().hex[:10]
    with psycopg.connect(**proxy.kwargs(), autocommit=True, application_name="recruiter-web") as conn:
        conn.execute(f"select pg_sleep(0.6), 'secret-{marker}' as note")
        conn.execute("select 1")  # fast: not flagged
    stats = _stats(proxy)
    slow = proxy.run(lambda: stats.slow(10))
    assert len(slow) == 1, slow
    entry = slow[0]
    assert entry.normalized == "select pg_sleep($1), $2 as note"
    assert 600 <= entry.duration_ms < 5000
    assert entry.kind == "select" and entry.rows == 1 and entry.sqlstate is None
    assert entry.application_name == "recruiter-web" and entry.database == proxy.database
    assert entry.client.startswith("127.0.0.1:")
    snap = proxy.run(lambda: stats.snapshot())
    assert sum(snap.slow.values()) == 1
    # One structured line, with the fields an operator needs and never the literal.
    lines = [r for r in caplog.records if r.getMessage() == "slow_query"]
    assert len(lines) == 1
    record = lines[0]
    assert record.query == "select pg_sleep($1), $2 as note"  # type: ignore[attr-defined]
    assert record.duration_ms >= 600 and record.fingerprint == entry.fingerprint  # type: ignore[attr-defined]
    assert record.application_name == "recruiter-web"  # type: ignore[attr-defined]
    assert marker not in json.dumps(vars(record), default=str)
    assert "0.6" not in record.query  # type: ignore[attr-defined]


def test_queries_differing_only_in_literals_share_one_fingerprint_and_counts_match(
        proxy: RunningProxy, table: str) -> None:
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
        conn.execute(f"insert into {table} values (1, 'a'), (2, 'b'), (3, 'c')")  # simple protocol
        for i in range(1, 4):
            conn.execute(f"select * from {table} where id = {i}")  # literals: simple protocol
            conn.execute(f"SELECT  *  FROM {table}\n WHERE id = '{i}'")  # other spacing, quoted
        conn.execute(f"update {table} set v = %s where id >= %s", ("z", 2))  # extended protocol
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"insert into {table} values (1, 'dup')")
        rows = conn.execute(f"select * from {table} order by id").fetchall()
        assert len(rows) == 3
    select = _one(proxy, f"from {table} where id = $1")
    assert select.calls == 6 and select.rows == 6 and select.errors == 0
    assert select.kind == "select" and select.tables == (table,)
    insert = _one(proxy, f"insert into {table} values")
    assert (insert.calls, insert.errors, insert.rows, insert.last_sqlstate) == (2, 1, 3, "23505")
    update = _one(proxy, f"update {table} set v")
    assert (update.calls, update.rows, update.kind) == (1, 2, "update")
    everything = _one(proxy, f"from {table} order by id")
    assert everything.rows == 3
    for snap in (select, insert, update, everything):
        assert 0 < snap.min_ms <= snap.p50_ms <= snap.p95_ms <= snap.p99_ms <= snap.max_ms
        assert snap.buckets[-1] == snap.calls
    counts = proxy.run(lambda: proxy.server.query_stats().snapshot().queries)
    key = (proxy.database, proxy.user)
    assert counts[(*key, "select", "ok")] >= 7
    assert counts[(*key, "insert", "ok")] == 1
    assert counts[(*key, "insert", "error")] == 1
    assert counts[(*key, "update", "ok")] == 1


async def test_asyncpg_prepared_statements_and_an_invalid_statement_are_counted(
        proxy: RunningProxy, table: str) -> None:
    conn = await asyncpg.connect(**proxy.asyncpg_kwargs())
    try:
        stmt = await conn.prepare(f"select v from {table} where id = $1")
        await conn.execute(f"insert into {table} values (7, 'x')")
        for _ in range(5):
            assert await stmt.fetchval(7) == "x"
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.execute("selec oops")
        assert await conn.fetchval("select 'still usable'") == "still usable"
    finally:
        await conn.close()
    prepared = await asyncio.to_thread(_one, proxy, f"select v from {table} where id = $1")
    assert prepared.calls == 5 and prepared.rows == 5  # the prepare itself ran nothing
    invalid = await asyncio.to_thread(_by_text, proxy, "selec oops")
    assert len(invalid) == 1 and invalid[0].kind == "unknown" and invalid[0].last_sqlstate == "42601"


def test_time_waiting_for_a_server_is_measured_and_a_refused_statement_counted(
        proxy_factory: Any) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=1.0)
    holder = psycopg.connect(**proxy.kwargs())
    holder.execute("select 'holding'")  # its transaction keeps the only server connection
    waiter = psycopg.connect(**proxy.kwargs(), autocommit=True)
    release = threading.Timer(0.4, holder.commit)
    release.start()
    try:
        waiter.execute("select upper('waited')")  # queued until the commit, 0.4 s later
        release.join()
        holder.execute("select 'holding'")
        with pytest.raises(psycopg.errors.TooManyConnections):
            waiter.execute("select lower('refused')")  # nobody commits now: 53300 after 1 s
        holder.commit()
    finally:
        release.cancel()
        holder.close()
        waiter.close()
    waited = _one(proxy, "upper($1)")
    assert waited.wait_ms_total >= 300, waited
    assert waited.total_ms >= waited.wait_ms_total  # latency as the client saw it includes the wait
    refused = _one(proxy, "lower($1)")
    assert (refused.calls, refused.errors, refused.last_sqlstate) == (1, 1, "53300")
    assert refused.wait_ms_total >= 900


def test_stats_disabled_records_nothing_and_the_api_says_so(proxy_factory: Any) -> None:
    proxy = proxy_factory(stats__enabled=False)
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)
    assert proxy.run(lambda: proxy.server.query_stats()) is None
    agent = RunningAgent(proxy)
    try:
        status, doc = agent.json("GET", "/api/queries/top")
        assert status == 404 and "stats.enabled" in doc["error"]
    finally:
        agent.stop()


def test_distinct_queries_beyond_the_bound_evict_and_stay_bounded(proxy_factory: Any) -> None:
    proxy = proxy_factory(stats__max_fingerprints=100)
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
        for i in range(1500):  # 1,500 distinct fingerprints (column names differ)
            conn.execute(f"select c{i} from (select 1 as c{i}) s")
    stats = _stats(proxy)
    count, evicted = proxy.run(lambda: (len(stats), stats.evicted))
    assert count <= 100
    assert evicted >= 1400
    assert proxy.run(lambda: len(proxy.server.fingerprinter)) <= proxy.run(
        lambda: proxy.server.fingerprinter.max_memo)


# ----------------------------------------------------------------------------- the API


def test_api_top_slow_one_and_bad_parameters(proxy: RunningProxy, agent: RunningAgent, table: str) -> None:
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
        for i in range(4):
            conn.execute(f"select * from {table} where id = {i} and v <> 'private-{i}'")
        conn.execute("select pg_sleep(0.55)")
    status, doc = agent.json("GET", "/api/queries/top?by=calls&limit=5")
    assert status == 200 and doc["by"] == "calls"
    top = doc["queries"][0]
    assert top["calls"] == 4 and top["normalized"].startswith(f"select * from {table} where id = $1")
    assert "private" not in json.dumps(doc)
    status, one = agent.json("GET", f"/api/queries/{top['id']}")
    assert status == 200 and one["calls"] == 4
    assert one["histogram"][-1] == {"le": "+Inf", "count": 4}
    assert "SELECT *" in one["pretty"] and "\n" in one["pretty"]
    status, slow = agent.json("GET", "/api/queries/slow?limit=5")
    assert status == 200 and slow["threshold_ms"] == 500
    assert [q["normalized"] for q in slow["queries"]] == ["select pg_sleep($1)"]
    assert slow["queries"][0]["pretty"] == "SELECT pg_sleep($1)"
    for path, needle in [("/api/queries/top?by=nonsense", "total_time"), ("/api/queries/top?limit=0", "limit"),
                         ("/api/queries/top?limit=x", "limit"), ("/api/queries/slow?limit=100000", "limit"),
                         ("/api/queries/not-a-fingerprint!", "fingerprint")]:
        status, err = agent.json("GET", path)
        assert status == 400 and needle in err["error"], (path, err)
    status, err = agent.json("GET", "/api/queries/0123456789abcdef")
    assert status == 404 and "0123456789abcdef" in err["error"]
    status, err = agent.json("DELETE", "/api/queries/top")
    assert status == 405 and err["status"] == 405


def test_reset_is_admin_only_with_a_token(proxy_factory: Any) -> None:
    proxy = proxy_factory(agent__admin_token="s3cret-token")
    agent = RunningAgent(proxy)
    try:
        with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
            conn.execute("select 'before reset'")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            status, err = agent.json("POST", "/api/queries/reset", headers=headers)
            assert status == 401 and "admin_token" in err["error"]
        assert _by_text(proxy, "$1")  # still there
        status, doc = agent.json("POST", "/api/queries/reset", headers={"Authorization": "Bearer s3cret-token"})
        assert status == 200 and doc["reset"] is True and doc["fingerprints_forgotten"] >= 1
        assert _by_text(proxy, "$1") == []
        # Prometheus-facing counters keep counting across a reset.
        assert sum(proxy.run(lambda: proxy.server.query_stats().snapshot().queries.values())) >= 1
    finally:
        agent.stop()


def test_reset_without_a_token_is_for_loopback_clients(proxy: RunningProxy, agent: RunningAgent,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    status, doc = agent.json("POST", "/api/queries/reset")
    assert status == 200 and doc["reset"] is True
    agent.json("POST", "/api/queries/reset")
    warnings = [r for r in caplog.records if r.getMessage() == "admin_endpoints_loopback_only"]
    assert len(warnings) == 1


def test_statement_timing_is_client_observed(proxy: RunningProxy) -> None:
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
        start = time.monotonic()
        conn.execute("select pg_sleep(0.2), 'nap'")
        elapsed_ms = (time.monotonic() - start) * 1000
    nap = _one(proxy, "pg_sleep($1), $2")
    assert 200 <= nap.total_ms <= elapsed_ms


# ----------------------------------------------------------------------------- EXPLAIN of slow SELECTs


def _explained(proxy: RunningProxy, fragment: str) -> Any:
    def read() -> Any:
        stats = proxy.server.query_stats()
        found = [s for s in stats.top("calls", 1000) if fragment in s.normalized]
        assert len(found) == 1, found
        return found[0].id, proxy.server.explainer.plan(found[0].id)

    proxy.run(lambda: proxy.server.query_stats())  # flush: slow statements start their EXPLAIN
    proxy.call(proxy.server.explainer.wait())
    return proxy.run(read)


def test_slow_select_gets_a_generic_plan_once_per_interval(proxy_factory: Any, table: str, direct: Any) -> None:
    proxy = proxy_factory(slow_query__threshold_ms=100, slow_query__explain=True)
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as conn:
        conn.execute(f"insert into {table} select g, 'v' || g from generate_series(1, 100) g")
        query = f"select v, pg_sleep(0.15) from {table} where id = %s and v <> 'secret-literal'"
        conn.execute(query.replace("%s", "5"))  # simple protocol, literal in the text
        fid, plan = _explained(proxy, f"from {table} where id = $2")
        assert plan is not None and plan.error is None, plan
        root = plan.plan[0]["Plan"]
        assert root["Relation Name"] == table or table in json.dumps(root)
        assert "secret-literal" not in json.dumps(plan.plan)  # only the normalised text was explained
        captured = proxy.server.explainer.captured
        conn.execute(query.replace("%s", "6"))  # slow again, within the interval: not explained again
        _explained(proxy, f"from {table} where id = $2")
        assert proxy.server.explainer.captured == captured
        conn.execute(f"update {table} set v = v where id = 1 and pg_sleep(0.15) is not null")  # slow write
    proxy.run(lambda: proxy.server.query_stats())
    proxy.call(proxy.server.explainer.wait())
    assert proxy.server.explainer.captured == captured  # writes are never explained
    assert len(proxy.run(lambda: proxy.server.query_stats().slow(10))) == 3
    agent = RunningAgent(proxy)
    try:
        status, doc = agent.json("GET", f"/api/queries/{fid}")
        assert status == 200 and doc["plan"]["plan"][0]["Plan"]
        status, slow = agent.json("GET", "/api/queries/slow")
        assert any(q["plan"] for q in slow["queries"])
    finally:
        agent.stop()
    # The EXPLAIN ran on its own connection, named so, and is gone.
    assert direct().execute(
        "select count(*) from pg_stat_activity where application_name = 'pgsidecar-explain'").fetchone() == (0,)


async def test_a_multi_statement_query_counts_once_with_all_its_rows(proxy: RunningProxy, table: str) -> None:
    conn = await asyncpg.connect(**proxy.asyncpg_kwargs())
    try:  # asyncpg's execute() without arguments sends one simple Query
        await conn.execute(f"insert into {table} values (1, 'a'), (2, 'b'); "
                           f"update {table} set v = 'c' where id <= 2; select * from {table} where id = 1")
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.execute(f"select 1 from {table}; select 1 from no_such_table_here")
    finally:
        await conn.close()
    many = await asyncio.to_thread(_one, proxy, f"update {table} set v")
    assert many.calls == 1 and many.kind == "insert"  # the first of the most significant statements
    assert many.rows == 2 + 2 + 1
    failed = await asyncio.to_thread(_one, proxy, "no_such_table_here")
    assert (failed.calls, failed.errors, failed.last_sqlstate) == (1, 1, "42P01")
