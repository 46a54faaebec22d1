"""The agent's materialized view refresh (issue 6) on a migrated database with demo data: periodic
CONCURRENTLY refreshes while the app reads the views through the proxy, the admin endpoint, the
metrics, and one refresh of a view at a time."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from agent import keys
from migrations import runner
from migrations.demo import seed_demo
from tests.helpers.agent_http import RunningAgent, parse_samples, sample_value
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.wire import wait_for

VIEWS = ("resume_job_matches", "user_statistics")


@pytest.fixture
def demo(fresh_db: Any) -> tuple[str, Callable[[], psycopg.Connection[Any]]]:
    dsn, connect = fresh_db
    runner.upgrade(runner.alembic_config(dsn))
    seed_demo(dsn, users=300)
    return dsn, connect


@pytest.fixture
def agent_on(proxy_factory: Callable[..., RunningProxy],
             agents: Callable[[RunningProxy], RunningAgent]) -> Callable[..., RunningAgent]:
    """``agent_on(dsn, **settings)``: a proxy on ``dsn`` and its agent."""
    return lambda dsn, **settings: agents(proxy_factory(dsn, **settings))


def _metrics(agent: RunningAgent) -> Any:
    status, _, body = agent.request("GET", "/metrics")
    assert status == 200
    return parse_samples(body.decode())


def test_periodic_concurrent_refresh_never_blocks_or_fails_readers(demo: Any, agent_on: Any) -> None:
    dsn, connect = demo
    agent = agent_on(dsn, views__refresh_interval_s=0.05)
    refresher = agent.runner.app[keys.VIEWS]
    direct = connect()
    direct.execute("UPDATE matches SET match_score = 0.99 WHERE id IN (SELECT id FROM matches ORDER BY id LIMIT 50)")
    strong = direct.execute("SELECT count(*) FROM matches WHERE match_score > 0.7").fetchone()[0]

    # Readers through the proxy, in a loop, while the agent refreshes both views again and again.
    reads, errors, stop = [0], [], threading.Event()
    blocked: set[str] = set()

    def read() -> None:
        try:
            with psycopg.connect(**agent.proxy.kwargs(dbname=agent.proxy.upstream.database), autocommit=True) as c:
                c.execute("SET statement_timeout = '5s'")
                while not stop.is_set():
                    c.execute("SELECT count(*) FROM resume_job_matches").fetchone()
                    c.execute("SELECT sum(resume_count) FROM user_statistics").fetchone()
                    reads[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def watch_locks() -> None:
        with connect() as c:
            while not stop.is_set():
                rows = c.execute("""SELECT a.application_name FROM pg_locks AS l
                                    JOIN pg_stat_activity AS a ON a.pid = l.pid
                                    WHERE NOT l.granted AND a.datname = current_database()
                                      AND a.application_name <> 'pgsidecar-views'""").fetchall()
                blocked.update(r[0] or '(no application_name)' for r in rows)
                stop.wait(0.005)

    threads = [threading.Thread(target=read) for _ in range(2)] + [threading.Thread(target=watch_locks)]
    for t in threads:
        t.start()
    try:
        wait_for("five refreshes of each view", lambda: all(
            refresher.views[v].results["ok"] >= 5 for v in VIEWS) or None, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not errors, errors
    assert reads[0] > 0
    assert not blocked, "a reader waited for a lock while the views were refreshed"
    # The refresh saw the update: the view holds what the base tables say.
    assert direct.execute("SELECT count(*) FROM resume_job_matches").fetchone()[0] == strong

    samples = _metrics(agent)
    for view in VIEWS:
        assert sample_value(samples, "pgsidecar_view_refreshes_total", view=view, result="ok") >= 5
        assert sample_value(samples, "pgsidecar_view_refresh_duration_seconds_count", view=view) >= 5
        assert sample_value(samples, "pgsidecar_view_age_seconds", view=view) >= 0


def test_admin_refresh_endpoint_unknown_view_and_one_refresh_at_a_time(demo: Any, agent_on: Any) -> None:
    dsn, connect = demo
    agent = agent_on(dsn)  # refresh_interval_s 0: only on request
    status, doc = agent.json("POST", "/api/views/user_statistics/refresh")
    assert status == 200 and doc["view"] == "user_statistics" and doc["duration_s"] >= 0
    assert sample_value(_metrics(agent), "pgsidecar_view_refreshes_total", view="user_statistics", result="ok") == 1

    status, doc = agent.json("POST", "/api/views/no_such_view/refresh")
    assert status == 404 and "not a materialized view" in doc["error"]
    status, doc = agent.json("POST", "/api/views/users/refresh")  # a table, not a view
    assert status == 404
    # Names that are not materialized views never become series (the label stays bounded).
    assert not [x for x in _metrics(agent) if x.labels.get("view") in ("no_such_view", "users")]

    # Another replica (here: a session holding the same advisory lock) is refreshing: 409, skipped.
    other = connect()
    other.execute("BEGIN")
    other.execute("SELECT pg_advisory_xact_lock(hashtext('pgsidecar_view_refresh'), hashtext('public.user_statistics'))")
    status, doc = agent.json("POST", "/api/views/user_statistics/refresh")
    assert status == 409 and "another pgsidecar" in doc["error"]
    other.execute("ROLLBACK")
    assert sample_value(_metrics(agent), "pgsidecar_view_refreshes_total", view="user_statistics",
                        result="skipped") == 1
    status, _ = agent.json("POST", "/api/views/user_statistics/refresh")
    assert status == 200


def test_admin_token_guards_the_refresh(demo: Any, agent_on: Any) -> None:
    dsn, _ = demo
    agent = agent_on(dsn, agent__admin_token="s3cret")
    status, doc = agent.json("POST", "/api/views/user_statistics/refresh")
    assert status == 401 and "admin" in doc["error"]
    status, doc = agent.json("POST", "/api/views/user_statistics/refresh",
                             headers={"Authorization": "Bearer s3cret"})
    assert status == 200, doc
