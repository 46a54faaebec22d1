"""The webhook emitter (issue 7) on a real PostgreSQL with the migrations applied, real HTTP
receivers on loopback, and the app's writes going through a real proxy."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from standardwebhooks.webhooks import Webhook

from agent.webhooks.delivery import matches
from agent.webhooks.service import WebhookService
from agent.webhooks.sql import TABLES
from migrations import runner
from tests.helpers.agent_http import RunningAgent
from tests.helpers.cluster import free_port
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.receiver import Receiver, Received
from tests.helpers.wire import wait_for

ROOT = Path(__file__).resolve().parents[2]

# Fast retries so a test sees several attempts in well under a second.
FAST = {
    "webhooks__backoff_base_s": 0.05,
    "webhooks__backoff_max_s": 0.3,
    "webhooks__sweep_interval_s": 0.5,
    "webhooks__max_attempts": 100,
    "webhooks__timeout_s": 2.0,
}


class Stack:
    """A migrated database, a proxy and an agent (with its emitter) in front of it."""

    def __init__(self, dsn: str, connect: Callable[[], psycopg.Connection[Any]], proxy: RunningProxy) -> None:
        self.dsn = dsn
        self.connect = connect
        self.proxy = proxy
        self.agent = RunningAgent(proxy)
        emitter = self.emitter
        assert proxy.call(emitter.wait_ready(20)), emitter.snapshot()

    @property
    def emitter(self) -> Any:
        from agent import keys

        return self.agent.runner.app[keys.WEBHOOKS]

    def register(self, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
        status, doc = self.agent.json("POST", "/api/webhooks/register",
                                      body=json.dumps({"url": url, "events": events, **extra}).encode())
        assert status == 201, doc
        return doc

    def app_conn(self) -> psycopg.Connection[Any]:
        """A connection of the app: through the proxy."""
        return psycopg.connect(**self.proxy.kwargs(dbname=self.proxy.upstream.database), autocommit=True)

    def emit(self, event_type: str, payload: Any = None) -> int:
        """One committed app event, emitted through the proxy."""
        with self.app_conn() as conn:
            return emit(conn, event_type, payload)

    def snapshot(self) -> Any:
        return self.proxy.run(self.emitter.snapshot)

    def counts(self) -> dict[str, int]:
        with self.connect() as direct:
            return table_counts(direct)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.connect() as direct:
            return direct.execute(sql, args).fetchall()

    def settled(self) -> list[tuple[Any, ...]]:
        """(event_id, state, attempts, last_status) of every delivery, once none to an active
        endpoint is pending: a receiver sees a request before the emitter records it."""
        sql = ("SELECT d.event_id, d.state, d.attempts, d.last_status FROM webhook_deliveries AS d "
               "JOIN webhook_endpoints AS e ON e.id = d.endpoint_id ORDER BY d.endpoint_id, d.event_id")
        pending = ("SELECT count(*) FROM webhook_deliveries AS d JOIN webhook_endpoints AS e ON e.id = d.endpoint_id "
                   "WHERE d.state = 'pending' AND e.active")
        wait_for("every delivery recorded", lambda: self.rows(pending) == [(0,)])
        return self.rows(sql)


def emit(conn: psycopg.Connection[Any], event_type: str, payload: Any = None) -> int:
    return int(conn.execute("SELECT pgsidecar_emit(%s, %s::jsonb)", (event_type, json.dumps(payload))).fetchone()[0])


def table_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def event_id(r: Received) -> int:
    return int(r.id.removeprefix("evt_"))


def arrived(receiver: Receiver, ids: set[int] | list[int]) -> Callable[[], list[Received] | None]:
    """Probe for wait_for: the accepted requests once every id in ``ids`` is among them."""
    want = set(ids)

    def probe() -> list[Received] | None:
        got = receiver.accepted()
        return got if want <= {event_id(r) for r in got} else None

    return probe


@pytest.fixture
def migrated(fresh_db: Any) -> tuple[str, Callable[[], psycopg.Connection[Any]]]:
    """``fresh_db`` with every migration applied (webhook tables, pgsidecar_emit, triggers)."""
    dsn, connect = fresh_db
    runner.upgrade(runner.alembic_config(dsn))
    return dsn, connect


@pytest.fixture
def stack(migrated: Any, proxy_factory: Callable[..., RunningProxy]) -> Iterator[Callable[..., Stack]]:
    dsn, connect = migrated
    made: list[Stack] = []

    def make(**settings: Any) -> Stack:
        built = Stack(dsn, connect, proxy_factory(dsn, **{**FAST, **settings}))
        made.append(built)
        return built

    yield make
    for built in made:
        built.agent.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def test_insert_update_delete_through_the_proxy_arrive_signed(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack()
    endpoint = s.register(receiver.url, ["users.*"])
    assert endpoint["secret"].startswith("whsec_")
    with s.app_conn() as conn:
        uid = conn.execute("INSERT INTO users (email, full_name) VALUES ('a@example.com', 'Ann') RETURNING id").fetchone()[0]
        conn.execute("UPDATE users SET full_name = 'Ann B' WHERE id = %s", (uid,))
        conn.execute("DELETE FROM users WHERE id = %s", (uid,))
    got = wait_for("three deliveries", lambda: receiver.accepted() if len(receiver.accepted()) >= 3 else None)
    assert [r.json["type"] for r in got] == ["users.insert", "users.update", "users.delete"]
    verifier = Webhook(endpoint["secret"])
    for r in got:
        verified = verifier.verify(r.body, r.headers)
        assert verified["data"]["table"] == "users"
    insert, update, delete = (r.json["data"] for r in got)
    assert insert["new"]["email"] == "a@example.com" and insert["old"] is None
    assert update["old"]["full_name"] == "Ann" and update["new"]["full_name"] == "Ann B"
    assert delete["new"] is None and delete["old"]["id"] == uid
    assert len({r.id for r in got}) == 3
    assert [row[1:] for row in s.settled()] == [("delivered", 1, 200)] * 3


# ----------------------------------------------------------------------------- what arrives


def test_rolled_back_changes_and_emits_never_arrive(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack()
    s.register(receiver.url, ["*"])
    with s.app_conn() as conn:
        conn.execute("BEGIN")
        uid = conn.execute("INSERT INTO users (email, full_name) VALUES ('rb@example.com', 'Rolled') RETURNING id"
                           ).fetchone()[0]
        conn.execute("UPDATE users SET full_name = 'Back' WHERE id = %s", (uid,))
        emit(conn, "app.rolled_back", {"n": 1})
        conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        committed = emit(conn, "app.committed", {"n": 2})
        conn.execute("COMMIT")
        marker = emit(conn, "marker")
    got = wait_for("the committed marker", arrived(receiver, [marker]))
    # The endpoint is ordered, so everything committed before the marker has arrived by now.
    assert [(event_id(r), r.json["type"]) for r in got] == [(committed, "app.committed"), (marker, "marker")]
    assert got[0].json["data"] == {"n": 2}
    assert [r.json["type"] for r in receiver.all()] == ["app.committed", "marker"]
    assert s.rows("SELECT event_type FROM webhook_events ORDER BY id") == [("app.committed",), ("marker",)]
    assert s.rows("SELECT count(*) FROM users") == [(0,)]


def test_receiver_down_then_back_gets_every_event_in_order_once(stack: Callable[..., Stack],
                                                                 receiver: Receiver) -> None:
    s = stack()
    endpoint = s.register(receiver.url, ["orders.*"])
    receiver.status = 500
    ids = [s.emit("orders.created", {"n": n}) for n in range(4)]
    wait_for("three 500 answers", lambda: len(receiver.all()) >= 3)
    receiver.stop_listening()
    ids += [s.emit("orders.paid", {"n": n}) for n in range(4, 7)]
    head_attempts = ("SELECT a.status_code, a.error FROM webhook_attempts AS a JOIN webhook_deliveries AS d "
                     "ON d.id = a.delivery_id WHERE d.event_id = %s ORDER BY a.id")
    refused = wait_for("an attempt refused at connect", lambda: [
        row for row in s.rows(head_attempts, ids[0]) if row[0] is None and "connect" in (row[1] or "").lower()])
    assert refused
    assert s.rows("SELECT last_status, last_error IS NOT NULL FROM webhook_deliveries WHERE event_id = %s",
                  ids[0]) == [(None, True)]
    receiver.status = 200
    receiver.listen()
    got = wait_for("every event after recovery", arrived(receiver, ids))
    assert [event_id(r) for r in got] == ids  # in order, and each webhook-id accepted exactly once
    assert [r.json["data"]["n"] for r in got] == list(range(7))
    # While it was down only the head of the queue was tried (ordered endpoint).
    assert {event_id(r) for r in receiver.all() if r.status == 500} == {ids[0]}
    verifier = Webhook(endpoint["secret"])
    assert all(verifier.verify(r.body, r.headers)["id"] == r.id for r in got)
    states = [row[1:3] for row in s.settled()]
    attempts = s.rows(head_attempts, ids[0])
    assert (500, "HTTP 500") in attempts and attempts[-1] == (200, None)
    assert len(attempts) >= 5
    assert states == [("delivered", len(attempts))] + [("delivered", 1)] * 6


def test_listen_connection_severed_events_keep_arriving(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack(webhooks__sweep_interval_s=30)  # the reconnect and NOTIFY deliver, not the periodic sweep
    s.register(receiver.url, ["*"])
    first = s.emit("before.cut")
    wait_for("the first event", arrived(receiver, [first]))
    connects = s.snapshot().connects
    listen_sql = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgsidecar-webhooks-listen' "
                  "AND datname = current_database()")
    [(old_pid,)] = s.rows(listen_sql)
    assert s.rows("SELECT pg_terminate_backend(%s)", old_pid) == [(True,)]
    after = [s.emit("after.cut", {"n": n}) for n in range(3)]
    got = wait_for("the events written after the cut", arrived(receiver, after))
    assert [event_id(r) for r in got] == [first, *after]
    assert wait_for("a reconnect", lambda: s.snapshot().connects > connects)
    [(new_pid,)] = wait_for("a new LISTEN backend", lambda: s.rows(listen_sql))
    assert new_pid != old_pid
    later = s.emit("after.reconnect")  # and NOTIFY works on the new connection
    wait_for("an event after the reconnect", arrived(receiver, [later]))
    assert s.snapshot().sweeps < 30  # no periodic sweep has run: it was the reconnect / NOTIFY


def _assert_each_once(received: list[Received], expected: list[int], ordered: bool) -> None:
    ids = [event_id(r) for r in received]
    assert sorted(ids) == sorted(expected), (len(ids), len(expected))
    if ordered:
        assert ids == sorted(expected)


def test_two_emitters_share_one_database_and_deliver_each_event_once(stack: Callable[..., Stack]) -> None:
    a, b = stack(), stack()
    receivers = [Receiver() for _ in range(4)]
    try:
        subscriptions = [(["*"], True), (["orders.*"], True), (["users.signup", "orders.paid"], True),
                         (["*"], False)]
        for rec, (patterns, ordered) in zip(receivers, subscriptions):
            a.register(rec.url, patterns, ordered=ordered)
        types = ["orders.created", "orders.paid", "users.signup", "audit.log"]
        for round_ in range(6):
            via = a if round_ % 2 else b
            with via.app_conn() as conn, conn.transaction():
                for n in range(50):
                    emit(conn, types[(n + round_) % 4], {"round": round_, "n": n})
        events = a.rows("SELECT id, event_type FROM webhook_events ORDER BY id")
        assert len(events) == 300
        for rec, (patterns, ordered) in zip(receivers, subscriptions):
            expected = [i for i, t in events if matches(t, patterns)]
            got = wait_for(f"{len(expected)} events at {patterns}", arrived(rec, expected))
            _assert_each_once(got, expected, ordered)
        total = sum(len([i for i, t in events if matches(t, p)]) for p, _ in subscriptions)
        assert [row[1:3] for row in a.settled()] == [("delivered", 1)] * total
        assert a.rows("SELECT count(*) FROM webhook_attempts") == [(total,)]
        delivered = sum(s.snapshot().deliveries["delivered"] for s in (a, b))
        assert delivered == total
    finally:
        for rec in receivers:
            rec.close()


def test_two_emitters_with_a_short_lease_and_a_slow_receiver_do_not_both_deliver(
        stack: Callable[..., Stack], receiver: Receiver) -> None:
    # One ordered batch (100 deliveries at 20 ms) takes longer than the lease: the emitter must
    # keep renewing it, or the other one takes the endpoint over and sends the same events again.
    a, b = stack(webhooks__lease_s=1.0), stack(webhooks__lease_s=1.0)
    receiver.delay = 0.02
    a.register(receiver.url, ["*"])
    with a.app_conn() as conn:
        ids = [int(row[0]) for row in conn.execute(
            "SELECT pgsidecar_emit('tick', jsonb_build_object('n', g)) FROM generate_series(1, 100) AS g")]
    got = wait_for("100 events", arrived(receiver, ids))
    _assert_each_once(got, ids, ordered=True)
    assert len(receiver.all()) == 100
