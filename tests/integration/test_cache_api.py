"""The result cache as the agent shows it (issue 4): ``pgsidecar_cache_*`` on /metrics,
``GET /api/cache`` and the admin-only ``POST /api/cache/flush``, in front of a real proxy and a
real PostgreSQL.

Every number asserted comes from real traffic: statements through the proxy (psycopg, simple
protocol), writes through the proxy and straight to the server, the invalidation trigger's
notifications arriving on the proxy's LISTEN connection. Waits for asynchronous events
(notifications, a reconnect) poll with a deadline; no assertion depends on how fast anything is.
"""
from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from aiohttp import web
from prometheus_client.samples import Sample

from agent.app import create_app
from proxy.invalidation import FUNCTION_SQL, trigger_sql
from tests.helpers.agent_http import RunningAgent, find_samples, parse_samples, sample_value
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.wire import wait_for
from tests.helpers.tools import promtool_check_metrics

ROW_VALUE = "row-value-5f1e"  # must never appear in any answer of the agent
CACHE_SETTINGS = {"cache__mode": "all", "pool__size": 3, "pool__max_overflow": 2, "pool__checkout_timeout": 10.0}
TOKEN = "s3cret-cache-token"


# ----------------------------------------------------------------------------- fixtures and helpers


def _create_table(direct: Callable[..., Any], *, trigger: bool = True) -> str:
    name = f"cache_api_{uuid.uuid4().hex[:8]}"
    d = direct()
    d.execute(f"create table {name} (id int primary key, v text)")
    d.execute(f"insert into {name} values (1, %s), (2, 'two')", (ROW_VALUE,))
    if trigger:
        d.execute(FUNCTION_SQL)
        d.execute(trigger_sql("public", name))
    return name


@pytest.fixture
def table(direct: Callable[..., Any]) -> Iterator[str]:
    """A table carrying the invalidation trigger, created before any proxy's LISTEN connection
    reads the catalog (so it is tracked from the start)."""
    name = _create_table(direct)
    yield name
    direct().execute(f"drop table if exists {name}")


def _listen(proxy: RunningProxy) -> None:
    """Start the LISTEN connection of the proxy's database and wait until it listens (as the
    first cacheable lookup would, without that lookup's "not_listening" bypass)."""
    front = proxy.server.cache_front
    assert front is not None

    def start() -> Any:
        return front.monitor_for(proxy.database, proxy.server.pool_for(proxy.database, proxy.user).endpoint)

    monitor = proxy.run(start)
    assert proxy.call(monitor.wait_ready(10))


@pytest.fixture
def cached(proxy_factory: Callable[..., RunningProxy], table: str) -> RunningProxy:
    """A proxy with ``cache.mode: all``, already listening for the table's notifications."""
    proxy = proxy_factory(**CACHE_SETTINGS)
    _listen(proxy)
    return proxy


@pytest.fixture
def agent(cached: RunningProxy) -> Iterator[RunningAgent]:
    running = RunningAgent(cached)
    yield running
    running.stop()


def _connect(proxy: RunningProxy, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    # No parameters and no server-side prepares: every execute is one simple-protocol Query,
    # which is what the cache serves.
    return psycopg.connect(**proxy.kwargs(), autocommit=autocommit, prepare_threshold=None, connect_timeout=10)


def _scrape(agent: RunningAgent) -> list[Sample]:
    status, _, body = agent.request("GET", "/metrics")
    assert status == 200, body[:500]
    return parse_samples(body.decode())






def _by_label(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in find_samples(samples, name)}


def _cache(agent: RunningAgent, query: str = "") -> dict[str, Any]:
    status, doc = agent.json("GET", "/api/cache" + query)
    assert status == 200, doc
    return doc




def _select(conn: psycopg.Connection[Any], table: str, row: int = 1) -> list[tuple[Any, ...]]:
    return conn.execute(f"select v from {table} where id = {row}").fetchall()


# ----------------------------------------------------------------------------- hits, misses, top


def test_repeated_selects_are_one_miss_then_hits_in_metrics_and_api(
        cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    n = 5
    with _connect(cached) as conn:
        for _ in range(n):
            assert _select(conn, table) == [(ROW_VALUE,)]

    samples = _scrape(agent)
    assert _by_label(samples, "pgsidecar_cache_requests_total", "result") == {"hit": n - 1, "miss": 1, "bypass": 0}
    assert sample_value(samples, "pgsidecar_cache_hit_ratio") == pytest.approx((n - 1) / n)
    assert sample_value(samples, "pgsidecar_cache_stores_total") == 1
    assert sample_value(samples, "pgsidecar_cache_entries") == 1
    max_bytes = cached.settings.cache.max_bytes
    assert sample_value(samples, "pgsidecar_cache_max_bytes") == max_bytes
    assert 0 < sample_value(samples, "pgsidecar_cache_bytes") < max_bytes
    # Every eviction reason and invalidation source has a series from the start.
    assert _by_label(samples, "pgsidecar_cache_evictions_total", "reason") == {
        "lru": 0, "ttl": 0, "invalidation": 0, "flush": 0}
    assert _by_label(samples, "pgsidecar_cache_invalidations_total", "source") == {
        "proxy": 0, "notify": 0, "ttl": 0, "flush": 0}
    assert not find_samples(samples, "pgsidecar_cache_bypasses_total")
    assert not find_samples(samples, "pgsidecar_cache_rejected_total")
    db = {"database": cached.database}
    assert sample_value(samples, "pgsidecar_cache_listen_up", **db) == 1
    assert sample_value(samples, "pgsidecar_cache_tracked_tables", **db) >= 1
    assert sample_value(samples, "pgsidecar_cache_notifications_total", **db) == 0
    assert sample_value(samples, "pgsidecar_cache_listen_drops_total", **db) == 0

    status, headers, body = agent.request("GET", "/api/cache")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    text = body.decode()
    assert ROW_VALUE not in text and "where id" not in text.lower()  # never rows or SQL text
    doc = json.loads(text)
    assert doc["mode"] == "all" and doc["enabled"] is True and doc["paused"] is False
    assert doc["ttl_s"] == cached.settings.cache.ttl_s and doc["require_triggers"] is True
    assert doc["requests"] == {"hit": n - 1, "miss": 1, "bypass": 0}
    assert doc["hit_ratio"] == pytest.approx((n - 1) / n)
    assert doc["stores"] == 1 and doc["entries"] == 1 and doc["max_bytes"] == max_bytes
    assert doc["bytes"] == sample_value(samples, "pgsidecar_cache_bytes")
    assert doc["invalidations"] == {"flush": 0, "notify": 0, "proxy": 0, "ttl": 0}
    assert doc["bypasses"] == {} and doc["rejected"] == {}
    (database,) = doc["databases"]
    assert database["database"] == cached.database and database["listening"] is True
    assert database["connects"] == 1 and database["drops"] == 0 and database["last_error"] is None
    assert doc["limit"] == 20
    (top,) = doc["top"]
    assert top["hits"] == n - 1
    assert top["bytes"] == doc["bytes"]
    assert len(top["key"]) == 32 and int(top["key"], 16) >= 0
    assert [t.rsplit(".", 1)[-1] for t in top["tables"]] == [table]
    assert 0 <= top["age_s"] and 0 < top["ttl_s"] <= cached.settings.cache.ttl_s


def test_top_is_ordered_by_hits_and_limit_is_checked(cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    with _connect(cached) as conn:
        for _ in range(4):
            _select(conn, table, 1)
        for _ in range(2):
            _select(conn, table, 2)
    doc = _cache(agent)
    assert [e["hits"] for e in doc["top"]] == [3, 1]
    assert doc["requests"] == {"hit": 4, "miss": 2, "bypass": 0}
    one = _cache(agent, "?limit=1")
    assert one["limit"] == 1 and [e["hits"] for e in one["top"]] == [3]
    assert [e["hits"] for e in _cache(agent, "?limit=1000")["top"]] == [3, 1]

    for bad in ("0", "1001", "-3", "abc", ""):
        status, err = agent.json("GET", f"/api/cache?limit={bad}")
        assert status == 400 and err["status"] == 400 and "limit" in err["error"], (bad, err)


# ----------------------------------------------------------------------------- invalidation by source


def test_flush_empties_the_cache_and_counts_a_flush(cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    with _connect(cached) as conn:
        for row in (1, 2, 1):
            _select(conn, table, row)
        assert _cache(agent)["entries"] == 2

        status, doc = agent.json("POST", "/api/cache/flush")
        assert status == 200 and doc == {"flushed": 2}

        state = _cache(agent)
        assert state["entries"] == 0 and state["bytes"] == 0 and state["top"] == []
        assert state["invalidations"]["flush"] == 1 and state["evictions"]["flush"] == 2
        samples = _scrape(agent)
        assert sample_value(samples, "pgsidecar_cache_invalidations_total", source="flush") == 1
        assert sample_value(samples, "pgsidecar_cache_evictions_total", reason="flush") == 2
        assert sample_value(samples, "pgsidecar_cache_entries") == 0
        assert sample_value(samples, "pgsidecar_cache_bytes") == 0

        # Served by the server again: a miss, stored anew.
        assert _select(conn, table, 1) == [(ROW_VALUE,)]
        state = _cache(agent)
        assert state["requests"] == {"hit": 1, "miss": 3, "bypass": 0}
        assert state["entries"] == 1 and state["stores"] == 3

    status, doc = agent.json("POST", "/api/cache/flush")
    assert status == 200 and doc == {"flushed": 1}
    status, doc = agent.json("POST", "/api/cache/flush")
    assert status == 200 and doc == {"flushed": 0}
    assert _cache(agent)["invalidations"]["flush"] == 3


def test_a_write_through_the_proxy_invalidates_with_source_proxy(
        cached: RunningProxy, agent: RunningAgent, table: str, direct: Callable[..., Any]) -> None:
    with _connect(cached) as conn:
        assert _select(conn, table) == [(ROW_VALUE,)]
        assert _select(conn, table) == [(ROW_VALUE,)]
        conn.execute(f"update {table} set v = 'changed by proxy' where id = 1")
        # Its trigger's notification names the row changed and evicts; the proxy watches the server
        # connection the write went through, so it counts under source proxy. (Until it is in,
        # nothing the write touched is served: the write's marks stay until a fence.)
        wait_for("the write's own notification", lambda: _cache(agent)["invalidations"]["proxy"] == 1)
        state = _cache(agent)
        assert state["entries"] == 0 and state["evictions"]["invalidation"] == 1
        assert direct().execute(f"select v from {table} where id = 1").fetchone() == ("changed by proxy",)
        samples = _scrape(agent)
        assert sample_value(samples, "pgsidecar_cache_invalidations_total", source="proxy") == 1
        assert sample_value(samples, "pgsidecar_cache_invalidations_total", source="notify") == 0
        assert sample_value(samples, "pgsidecar_cache_notifications_total", database=cached.database) == 1
        assert sample_value(samples, "pgsidecar_cache_spared_total", by="rows") == 0

        assert _select(conn, table) == [("changed by proxy",)]
    state = _cache(agent)
    # The UPDATE was looked up too (sent with no transaction open): a bypass, not a SELECT.
    assert state["requests"] == {"hit": 1, "miss": 2, "bypass": 1}
    assert state["bypasses"] == {"not_select": 1}
    assert state["top"][0]["hits"] == 0 and state["entries"] == 1


def test_a_rolled_back_write_through_the_proxy_invalidates_nothing(
        cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    with _connect(cached) as conn:
        _select(conn, table)
    with _connect(cached, autocommit=False) as conn:
        conn.execute(f"update {table} set v = 'never committed' where id = 1")
        conn.rollback()
    state = _cache(agent)
    assert state["invalidations"]["proxy"] == 0 and state["entries"] == 1
    with _connect(cached) as conn:
        assert _select(conn, table) == [(ROW_VALUE,)]
    assert _cache(agent)["requests"]["hit"] == 1


def test_a_direct_write_invalidates_with_source_notify(
        cached: RunningProxy, agent: RunningAgent, table: str, direct: Callable[..., Any]) -> None:
    with _connect(cached) as conn:
        assert _select(conn, table) == [(ROW_VALUE,)]
        assert _select(conn, table) == [(ROW_VALUE,)]

        direct().execute(f"update {table} set v = 'changed directly' where id = 1")
        def notified() -> list[Sample] | None:
            samples = _scrape(agent)
            return samples if sample_value(samples, "pgsidecar_cache_invalidations_total", source="notify") else None

        samples = wait_for("pgsidecar_cache_invalidations_total{source=notify}", notified)
        assert sample_value(samples, "pgsidecar_cache_invalidations_total", source="notify") == 1
        assert sample_value(samples, "pgsidecar_cache_invalidations_total", source="proxy") == 0
        assert sample_value(samples, "pgsidecar_cache_evictions_total", reason="invalidation") == 1
        assert sample_value(samples, "pgsidecar_cache_entries") == 0
        assert sample_value(samples, "pgsidecar_cache_notifications_total", database=cached.database) == 1

        assert _select(conn, table) == [("changed directly",)]
    doc = _cache(agent)
    assert doc["requests"] == {"hit": 1, "miss": 2, "bypass": 0}
    assert doc["databases"][0]["notifications"] == 1


def test_an_expired_entry_is_evicted_with_reason_ttl(cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    hinted = f"/* pgsidecar:cache ttl=0.2 */ select v from {table} where id = 1"
    with _connect(cached) as conn:
        assert conn.execute(hinted).fetchall() == [(ROW_VALUE,)]

        def expired() -> dict[str, Any] | None:
            assert conn.execute(hinted).fetchall() == [(ROW_VALUE,)]
            doc = _cache(agent)
            return doc if doc["evictions"]["ttl"] else None

        doc = wait_for("the entry to expire", expired)
    # Removed when a lookup met it expired: that lookup was a miss, and stored the result anew.
    assert doc["evictions"]["ttl"] == 1
    assert doc["requests"]["miss"] == 2 and doc["stores"] == 2 and doc["entries"] == 1
    samples = _scrape(agent)
    assert sample_value(samples, "pgsidecar_cache_evictions_total", reason="ttl") == 1


def test_a_lost_listen_connection_flushes_and_comes_back(
        cached: RunningProxy, agent: RunningAgent, table: str, direct: Callable[..., Any]) -> None:
    with _connect(cached) as conn:
        _select(conn, table)
    assert _cache(agent)["entries"] == 1
    d = direct()
    pids = [r[0] for r in d.execute(
        "select pid from pg_stat_activity where application_name = 'pgsidecar-cache-listen' and datname = %s",
        (cached.database,))]
    assert len(pids) == 1, pids
    assert d.execute("select pg_terminate_backend(%s)", (pids[0],)).fetchone() == (True,)

    def back() -> dict[str, Any] | None:
        doc = _cache(agent)
        return doc if doc["databases"][0]["drops"] == 1 and doc["databases"][0]["listening"] else None

    doc = wait_for("the LISTEN connection to drop and come back", back)
    assert doc["databases"][0]["connects"] == 2
    assert doc["entries"] == 0  # writes may have been missed while it was down
    assert doc["evictions"]["flush"] == 1 and doc["invalidations"]["flush"] >= 1
    samples = _scrape(agent)
    db = {"database": cached.database}
    assert sample_value(samples, "pgsidecar_cache_listen_drops_total", **db) == 1
    assert sample_value(samples, "pgsidecar_cache_listen_up", **db) == 1
    # A new pid listens: the old one is gone.
    assert [r[0] for r in d.execute(
        "select pid from pg_stat_activity where application_name = 'pgsidecar-cache-listen' and datname = %s",
        (cached.database,))] != pids


# ----------------------------------------------------------------------------- bypass reasons


def test_bypass_reasons_are_counted(cached: RunningProxy, agent: RunningAgent, table: str,
                                    direct: Callable[..., Any]) -> None:
    untracked = _create_table(direct, trigger=False)
    try:
        with _connect(cached) as conn:
            conn.execute("select now()")
            conn.execute(f"select v from {untracked} where id = 1")
            conn.execute(f"/* pgsidecar:nocache */ select v from {table} where id = 1")
            conn.execute("select 1; select 2")
            conn.execute("show work_mem")
    finally:
        direct().execute(f"drop table if exists {untracked}")
    doc = _cache(agent)
    assert doc["bypasses"] == {"volatile_function": 1, "no_trigger": 1, "nocache_hint": 1,
                               "multi_statement": 1, "not_select": 1}
    assert doc["requests"] == {"hit": 0, "miss": 0, "bypass": 5}
    samples = _scrape(agent)
    assert _by_label(samples, "pgsidecar_cache_bypasses_total", "reason") == doc["bypasses"]
    assert sample_value(samples, "pgsidecar_cache_requests_total", result="bypass") == 5
    for s in samples:  # the function's and the table's names are not labels
        assert not any("now" == v or untracked in v or ":" in v for v in s.labels.values()), s


def test_statements_inside_a_transaction_are_not_looked_up(
        cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    with _connect(cached) as conn:
        _select(conn, table)
        _select(conn, table)
    before = _cache(agent)
    assert before["requests"] == {"hit": 1, "miss": 1, "bypass": 0}

    with _connect(cached, autocommit=False) as conn:
        # psycopg sends BEGIN as its own Query, while no transaction is open: looked up, and
        # bypassed as not a SELECT. The statements after it (SELECT, UPDATE, SELECT, ROLLBACK)
        # run inside the transaction: never looked up, each counted as bypass "in_transaction",
        # and answered by the server.
        assert _select(conn, table) == [(ROW_VALUE,)]
        conn.execute(f"update {table} set v = 'inside' where id = 1")
        assert _select(conn, table) == [("inside",)]  # its own uncommitted write, not the cache
        conn.rollback()
    after = _cache(agent)
    assert after["requests"] == {"hit": 1, "miss": 1, "bypass": 5}
    assert after["bypasses"] == {"not_select": 1, "in_transaction": 4}
    assert after["invalidations"]["proxy"] == 0 and after["entries"] == 1

    with _connect(cached) as conn:
        assert _select(conn, table) == [(ROW_VALUE,)]
    assert _cache(agent)["requests"]["hit"] == 2


def test_a_session_with_state_bypasses_the_cache(cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    with _connect(cached) as conn:
        _select(conn, table)
        conn.execute("set work_mem = '8MB'")  # not a tracked setting: the session is pinned
        assert _select(conn, table) == [(ROW_VALUE,)]
        assert _select(conn, table) == [(ROW_VALUE,)]
    doc = _cache(agent)
    assert doc["bypasses"] == {"not_select": 1, "session_state": 2}
    assert doc["requests"] == {"hit": 0, "miss": 1, "bypass": 3}


def test_hinted_mode_counts_unhinted_statements_and_waits_for_its_listen_connection(
        proxy_factory: Callable[..., RunningProxy], table: str) -> None:
    proxy = proxy_factory(cache__mode="hinted")
    agent = RunningAgent(proxy)
    hinted = f"/* pgsidecar:cache ttl=30 */ select v from {table} where id = 1"
    try:
        with _connect(proxy) as conn:
            # The first cacheable lookup starts the LISTEN connection; until it listens, nothing is
            # served or stored.
            assert conn.execute(hinted).fetchall() == [(ROW_VALUE,)]
            front = proxy.server.cache_front
            assert proxy.call(front.monitors[proxy.database].wait_ready(10))
            conn.execute(f"select v from {table} where id = 1")
            for _ in range(3):
                assert conn.execute(hinted).fetchall() == [(ROW_VALUE,)]
        doc = _cache(agent)
        assert doc["mode"] == "hinted"
        assert doc["bypasses"] == {"not_listening": 1, "not_hinted": 1}
        assert doc["requests"] == {"hit": 2, "miss": 1, "bypass": 2}
        (top,) = doc["top"]
        assert top["hits"] == 2 and 0 < top["ttl_s"] <= 30
        samples = _scrape(agent)
        assert sample_value(samples, "pgsidecar_cache_bypasses_total", reason="not_listening") == 1
        assert sample_value(samples, "pgsidecar_cache_bypasses_total", reason="not_hinted") == 1
    finally:
        agent.stop()


# ----------------------------------------------------------------------------- cache off, admin


def test_cache_off_has_no_metrics_and_says_so(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(cache__mode="off")
    agent = RunningAgent(proxy)
    try:
        with _connect(proxy) as conn:
            conn.execute("select 1")
        doc = _cache(agent)
        assert doc["mode"] == "off" and doc["enabled"] is False and "off" in doc["message"]
        status, err = agent.json("GET", "/api/cache?limit=0")
        assert status == 400 and "limit" in err["error"]
        status, err = agent.json("POST", "/api/cache/flush")
        assert status == 409 and err["status"] == 409 and "off" in err["error"]
        assert not [s for s in _scrape(agent) if s.name.startswith("pgsidecar_cache_")]
    finally:
        agent.stop()


def test_flush_is_admin_only_with_a_token(proxy_factory: Callable[..., RunningProxy], table: str) -> None:
    proxy = proxy_factory(**CACHE_SETTINGS, agent__admin_token=TOKEN)
    _listen(proxy)
    agent = RunningAgent(proxy)
    try:
        with _connect(proxy) as conn:
            _select(conn, table)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            status, err = agent.json("POST", "/api/cache/flush", headers=headers)
            assert status == 401 and "admin_token" in err["error"], headers
        doc = _cache(agent)  # reading needs no token
        assert doc["entries"] == 1 and doc["invalidations"]["flush"] == 0
        status, doc = agent.json("POST", "/api/cache/flush", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and doc == {"flushed": 1}
        assert _cache(agent)["entries"] == 0
    finally:
        agent.stop()


def _non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, only a route is chosen
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_flush_without_a_token_refuses_clients_that_are_not_loopback(cached: RunningProxy, table: str) -> None:
    address = _non_loopback_address()
    # .ci/run gives the host one (192.0.2.2 on lo) when it has none.
    assert address is not None, "this host has no non-loopback IPv4 address to bind the agent to"

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(create_app(cached.settings, cached.server), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, address, 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001

    runner, port = cached.call(start())
    remote = RunningAgent.__new__(RunningAgent)  # the HTTP helpers only, against our own site
    remote.proxy, remote.runner, remote.port, remote.url = cached, runner, port, f"http://{address}:{port}"
    try:
        with _connect(cached) as conn:
            _select(conn, table)
        status, err = remote.json("POST", "/api/cache/flush")
        assert status == 403 and "loopback" in err["error"]
        assert _cache(remote)["entries"] == 1  # reading is open; nothing was flushed
    finally:
        remote.stop()
    loopback = RunningAgent(cached)
    try:
        status, doc = loopback.json("POST", "/api/cache/flush")
        assert status == 200 and doc == {"flushed": 1}
    finally:
        loopback.stop()


def test_promtool_accepts_the_cache_metrics(cached: RunningProxy, agent: RunningAgent, table: str) -> None:
    with _connect(cached) as conn:
        for _ in range(3):
            _select(conn, table)
        conn.execute("select now()")
    agent.json("POST", "/api/cache/flush")
    status, _, body = agent.request("GET", "/metrics")
    text = body.decode()
    for name in ("pgsidecar_cache_requests_total", "pgsidecar_cache_bypasses_total", "pgsidecar_cache_listen_up",
                 "pgsidecar_cache_hit_ratio", "pgsidecar_cache_evictions_total"):
        assert name in text
    assert promtool_check_metrics(text) == (0, "")
