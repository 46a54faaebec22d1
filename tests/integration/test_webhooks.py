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

from agent.webhooks.delivery import matches, new_secret
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
    wait_for("the 500 recorded", lambda: s.rows(
        "SELECT last_status, last_error FROM webhook_deliveries WHERE event_id = %s", ids[0]) == [(500, "HTTP 500")])
    receiver.stop_listening()
    ids += [s.emit("orders.paid", {"n": n}) for n in range(4, 7)]
    head_attempts = ("SELECT a.status_code, a.error FROM webhook_attempts AS a JOIN webhook_deliveries AS d "
                     "ON d.id = a.delivery_id WHERE d.event_id = %s ORDER BY a.id")
    refused = wait_for("an attempt refused at connect", lambda: [
        row for row in s.rows(head_attempts, ids[0]) if row[0] is None and "Cannot connect to host" in (row[1] or "")])
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


def test_truncate_arrives_as_one_event(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack()
    s.register(receiver.url, ["predictions.*"])
    with s.app_conn() as conn:
        conn.execute("TRUNCATE predictions")
    [got] = wait_for("the truncate event", lambda: receiver.accepted() or None)
    assert got.json["type"] == "predictions.truncate"
    assert got.json["data"] == {"table": "predictions", "schema": "public", "op": "truncate", "new": None,
                                "old": None}


def test_a_receiver_that_does_not_answer_in_time_is_retried(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack(webhooks__timeout_s=0.3)
    s.register(receiver.url, ["*"])
    receiver.delay = 1.0
    event = s.emit("slow.one")
    timed_out = ("SELECT a.error FROM webhook_attempts AS a JOIN webhook_deliveries AS d ON d.id = a.delivery_id "
                 "WHERE d.event_id = %s AND a.status_code IS NULL")
    assert wait_for("a timed-out attempt", lambda: s.rows(timed_out, event))[0] == (
        "no answer within 0.3 s (webhooks.timeout_s)",)
    receiver.delay = 0.0
    wait_for("an answer in time", lambda: s.rows(
        "SELECT state, last_status FROM webhook_deliveries WHERE event_id = %s", event) == [("delivered", 200)])
    ids = {r.id for r in receiver.all()}
    assert ids == {f"evt_{event}"}  # every try (late answers included) carries the same webhook-id


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
    wait_for("a new LISTEN backend", lambda: s.rows(listen_sql) and old_pid not in [pid for pid, in s.rows(listen_sql)])
    later = s.emit("after.reconnect")  # and NOTIFY works on the new connection
    wait_for("an event after the reconnect", arrived(receiver, [later]))


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


@pytest.mark.parametrize("ordered, delay", [(True, 0.02), (False, 0.12)])
def test_two_emitters_with_a_short_lease_and_a_slow_receiver_do_not_both_deliver(
        stack: Callable[..., Stack], receiver: Receiver, ordered: bool, delay: float) -> None:
    # One batch (100 deliveries, one at a time or 8 at once) takes longer than the lease: the
    # emitter must keep renewing it, or the other one takes the endpoint over and sends the same
    # events again.
    a, _b = stack(webhooks__lease_s=1.0), stack(webhooks__lease_s=1.0)  # _b: the competing emitter
    receiver.delay = delay
    a.register(receiver.url, ["*"], ordered=ordered)
    with a.app_conn() as conn:
        ids = [int(row[0]) for row in conn.execute(
            "SELECT pgsidecar_emit('tick', jsonb_build_object('n', g)) FROM generate_series(1, 100) AS g")]
    got = wait_for("100 events", arrived(receiver, ids))
    _assert_each_once(got, ids, ordered)
    assert len(receiver.all()) == 100
    assert [row[1:3] for row in a.settled()] == [("delivered", 1)] * 100


# ----------------------------------------------------------------------------- a real sidecar process


def _http(base: str, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
    """(status, JSON) of one request to an agent at ``base``; HTTP errors are answers."""
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class SidecarProcess:
    """``python -m agent run`` on free ports, its output in a file; ``kill()`` is SIGKILL."""

    ENV = {"WEBHOOKS__LEASE_S": "1", "WEBHOOKS__BATCH_SIZE": "8", "WEBHOOKS__SWEEP_INTERVAL_S": "0.5",
           "WEBHOOKS__BACKOFF_BASE_S": "0.05", "WEBHOOKS__BACKOFF_MAX_S": "0.3", "LOGGING__LEVEL": "info"}

    def __init__(self, dsn: str, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PGSIDECAR_")}
        env.update({f"PGSIDECAR_{k}": v for k, v in self.ENV.items()}, PYTHONPATH=str(ROOT))
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--upstream", dsn, "--listen", f"127.0.0.1:{free_port()}",
                 "--http", self.url.removeprefix("http://")], env=env, cwd=ROOT, stdout=out, stderr=out)

    def ready(self) -> bool:
        try:
            return _http(self.url, "GET", "/api/webhooks")[0] == 200
        except OSError:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for proc in started:
        proc.kill()


def test_sidecar_killed_mid_delivery_and_restarted_loses_nothing(
        migrated: Any, receiver: Receiver, processes: list[SidecarProcess], tmp_path: Path) -> None:
    dsn, connect = migrated
    first = SidecarProcess(dsn, tmp_path / "sidecar.log")
    processes.append(first)
    wait_for("the sidecar's webhook API", first.ready)
    status, endpoint = _http(first.url, "POST", "/api/webhooks/register", {"url": receiver.url, "events": ["job.*"]})
    assert status == 201, endpoint
    receiver.delay = 0.05
    with connect() as direct:
        ids = [row[0] for row in direct.execute(
            "SELECT pgsidecar_emit('job.done', jsonb_build_object('n', g)) FROM generate_series(1, 40) AS g")]
    wait_for("a few deliveries", lambda: len(receiver.accepted()) >= 10)
    receiver.delay = 1.0  # hold the request in flight, so the kill lands mid-delivery
    first.kill()
    receiver.delay = 0.02
    with connect() as direct:
        states = dict(direct.execute("SELECT state, count(*) FROM webhook_deliveries GROUP BY state").fetchall())
    # Killed mid-delivery: the first batch (8) was recorded before the 9th was sent; work was left.
    assert states["delivered"] >= 8 and states["pending"] > 0, states
    processes.append(SidecarProcess(dsn, tmp_path / "sidecar.log"))
    got = wait_for("all 40 events after the restart", arrived(receiver, ids))
    assert set(ids) <= {event_id(r) for r in got}
    verifier = Webhook(endpoint["secret"])
    ids_by_n: dict[int, set[str]] = {}
    for r in receiver.all():  # duplicates are allowed, but always the same message, validly signed
        doc = verifier.verify(r.body, r.headers)
        assert doc["id"] == r.id and doc["type"] == "job.done"
        ids_by_n.setdefault(doc["data"]["n"], set()).add(r.id)
    assert sorted(ids_by_n) == list(range(1, 41)) and all(len(v) == 1 for v in ids_by_n.values())
    with connect() as direct:
        wait_for("every delivery recorded", lambda: direct.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'").fetchone() == (40,))
        emitters = direct.execute("SELECT count(DISTINCT emitter) FROM webhook_attempts").fetchone()[0]
    assert emitters == 2  # the killed one and its successor both recorded attempts


# ----------------------------------------------------------------------------- the HTTP API

TOKEN = "t0ken-for-admin"
SHORT_SECRET = "whsec_" + "a2V5" * 7  # base64 of 21 bytes


def _bad_registrations(good: str) -> list[tuple[Any, str]]:
    """(body, what the 400's message must say) for POST /api/webhooks/register."""
    ok = {"url": good, "events": ["users.*"]}
    return [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"url"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        ({"events": ["*"]}, "url and events are required"),
        ({"url": good}, "url and events are required"),
        ({**ok, "retries": 3}, "unknown field 'retries'"),
        ({**ok, "url": 5}, "url must be a non-empty string"),
        ({**ok, "url": ""}, "url must be a non-empty string"),
        ({**ok, "url": "ftp://127.0.0.1/hook"}, "http or https"),
        ({**ok, "url": "127.0.0.1/hook"}, "http or https"),
        ({**ok, "url": "http:///hook"}, "no host"),
        ({**ok, "url": "http://127.0.0.1 /hook"}, "whitespace"),
        ({**ok, "url": "http://127.0.0.1:0/hook"}, "port 0"),
        ({**ok, "url": "http://127.0.0.1:70000/hook"}, "bad port"),
        ({**ok, "url": good + "/" + "x" * 2100}, "characters long"),
        ({**ok, "url": "http://169.254.169.254/latest/meta-data/"}, "deny_networks"),
        ({**ok, "url": "http://[::ffff:169.254.169.254]/"}, "deny_networks"),
        ({**ok, "url": "http://2852039166/"}, "resolves to 169.254.169.254"),  # the same address, spelt
        ({**ok, "url": "http://0251.0376.0251.0376/"}, "resolves to 169.254.169.254"),  # as inet_aton reads it
        ({**ok, "events": "users.*"}, "events must be a non-empty list"),
        ({**ok, "events": []}, "events must be a non-empty list"),
        ({**ok, "events": [1]}, "is not an event pattern"),
        ({**ok, "events": ["users.%"]}, "is not an event pattern"),
        ({**ok, "events": ["users insert"]}, "is not an event pattern"),
        ({**ok, "events": ["users.*\n"]}, "is not an event pattern"),
        ({**ok, "secret": "s3cret"}, "Standard Webhooks secret"),
        ({**ok, "secret": 12345}, "Standard Webhooks secret"),
        ({**ok, "secret": "whsec_!!notbase64!!"}, "not valid base64"),
        ({**ok, "secret": SHORT_SECRET}, "fewer than 24"),
        ({**ok, "ordered": "yes"}, "ordered must be true or false"),
        ({**ok, "description": ["x"]}, "description must be a string"),
        ({**ok, "description": "x" * 65 * 1024}, "larger than 65536 bytes"),
        (b'{"url": "' + good.encode() + b'", "events": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        ({**ok, "description": "nul \u0000 inside"}, "0x00"),
        ({**ok, "url": good + "\u0000"}, "0x00"),
    ]


def test_bad_input_gets_400_naming_the_problem_and_stores_nothing(stack: Callable[..., Stack],
                                                                  receiver: Receiver) -> None:
    s = stack(agent__admin_token=TOKEN, webhooks__max_payload_bytes=4000)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def call(method: str, path: str, doc: Any = None, headers: dict[str, str] = auth) -> tuple[int, Any]:
        raw = doc if isinstance(doc, bytes) or doc is None else json.dumps(doc).encode()
        return s.agent.json(method, path, body=raw, headers=headers)

    status, endpoint = call("POST", "/api/webhooks/register", {"url": receiver.url, "events": ["users.*"]})
    assert status == 201
    status, trig = call("POST", "/api/webhooks/trigger", {"event_type": "users.ok", "payload": {"a": 1}})
    assert status == 202
    wait_for("the one good event", arrived(receiver, [trig["event_id"]]))
    assert [row[1:3] for row in s.settled()] == [("delivered", 1)]
    before = s.counts()
    assert before["webhook_endpoints"] == 1 and before["webhook_events"] == 1
    cases = [("POST", "/api/webhooks/register", doc, 400, needle) for doc, needle in _bad_registrations(receiver.url)]
    cases += [
        ("POST", "/api/webhooks/trigger", b"{", 400, "not valid JSON"),
        ("POST", "/api/webhooks/trigger", {"payload": {}}, 400, "event_type is required"),
        ("POST", "/api/webhooks/trigger", {"event_type": "x", "extra": 1}, 400, "unknown field 'extra'"),
        ("POST", "/api/webhooks/trigger", {"event_type": "bad type"}, 400, "is not an event type"),
        ("POST", "/api/webhooks/trigger", {"event_type": 7}, 400, "is not an event type"),
        ("POST", "/api/webhooks/trigger", {"event_type": "users.big", "payload": "x" * 5000}, 400,
         "larger than 4000 bytes (webhooks.max_payload_bytes"),
        ("POST", "/api/webhooks/trigger", {"event_type": "users.nul", "payload": {"a": "\u0000"}}, 400,
         "payload: the database refused it: unsupported Unicode escape sequence"),
        ("POST", "/api/webhooks/trigger", {"event_type": "users.nul", "payload": {"\u0000": 1}}, 400,
         "unsupported Unicode escape sequence"),
        ("POST", "/api/webhooks/trigger", b'{"event_type": "users.nan", "payload": NaN}', 400, "NaN"),
        ("POST", "/api/webhooks/trigger", b'{"event_type": "users.inf", "payload": [1e400]}', 400, "Infinity"),
        ("POST", "/api/webhooks/trigger", b'{"event_type": "deep", "payload": ' + b"[" * 1900 + b"]" * 1900 + b"}",
         400, "nested too deeply"),
        ("DELETE", "/api/webhooks/424242", None, 404, "no webhook endpoint with id 424242"),
        ("DELETE", "/api/webhooks/abc", None, 400, "endpoint id must be an integer"),
        ("DELETE", "/api/webhooks/0", None, 400, "endpoint id must be a positive integer"),
        ("POST", "/api/webhooks/events/424242/redeliver", None, 404, "no webhook event with id 424242"),
        ("POST", "/api/webhooks/events/abc/redeliver", None, 400, "event id must be an integer"),
        ("POST", f"/api/webhooks/events/{trig['event_id']}/redeliver", {"endpoint_id": "1"}, 400,
         "endpoint_id must be an integer"),
        ("POST", f"/api/webhooks/events/{trig['event_id']}/redeliver", {"what": 1}, 400, "unknown field 'what'"),
        ("GET", "/api/webhooks/events?limit=0", None, 400, "limit must be a positive integer"),
        ("GET", "/api/webhooks/events?limit=5000", None, 400, "limit must be between 1 and 1000"),
        ("GET", "/api/webhooks/events?event_type=a%20b", None, 400, "is not an event type"),
    ]
    # Without the admin token every mutating route is refused, whatever the body.
    no_auth = {"Content-Type": "application/json"}
    for method, path, doc in [("POST", "/api/webhooks/register", {"url": receiver.url, "events": ["*"]}),
                              ("POST", "/api/webhooks/trigger", {"event_type": "users.sneaky"}),
                              ("DELETE", f"/api/webhooks/{endpoint['id']}", None),
                              ("POST", f"/api/webhooks/events/{trig['event_id']}/redeliver", None)]:
        cases.append((method, path, doc, 401, "admin endpoint", no_auth))  # type: ignore[arg-type]
    failures = []
    for method, path, doc, want, needle, *headers in cases:
        status, answer = call(method, path, doc, *headers)
        if status != want or needle not in answer.get("error", "") or answer.get("status") != want:
            failures.append((method, path, str(doc)[:80], status, answer))
    assert not failures, "\n".join(map(repr, failures))
    assert s.counts() == before
    assert call("GET", "/api/webhooks", headers={})[0] == 200  # reading needs no token


def test_targets_in_deny_networks_are_refused_at_registration_and_at_delivery(stack: Callable[..., Stack],
                                                                             receiver: Receiver) -> None:
    s = stack(webhooks__deny_networks=["127.0.0.0/8", "::1/128"])
    by_name = receiver.url.replace("127.0.0.1", "localhost")
    for url in (receiver.url, by_name):
        status, doc = s.agent.json("POST", "/api/webhooks/register",
                                   body=json.dumps({"url": url, "events": ["*"]}).encode())
        assert status == 400 and "webhooks.deny_networks" in doc["error"], doc
    assert s.counts()["webhook_endpoints"] == 0
    # Written straight into the table (as if DNS changed after registration): the emitter checks
    # again when it connects, for an IP literal and for a name its resolver answers.
    with s.connect() as direct:
        for url in (receiver.url, by_name):
            direct.execute("INSERT INTO webhook_endpoints (url, events, secret) VALUES (%s, '{*}', %s)",
                           (url, new_secret()))
    s.emit("x.y")
    refused = ("SELECT DISTINCT e.url FROM webhook_attempts AS a JOIN webhook_deliveries AS d ON d.id = a.delivery_id "
               "JOIN webhook_endpoints AS e ON e.id = d.endpoint_id WHERE a.error LIKE '%%webhooks.deny_networks%%' "
               "AND a.status_code IS NULL ORDER BY 1")
    wait_for("both refused by the emitter", lambda: s.rows(refused) == sorted([(receiver.url,), (by_name,)]))
    assert receiver.all() == []


def test_410_gone_disables_the_endpoint_and_nothing_more_is_sent(stack: Callable[..., Stack]) -> None:
    s = stack()
    gone, other = Receiver(), Receiver()
    try:
        gone.status = 410
        endpoint = s.register(gone.url, ["*"])
        s.register(other.url, ["*"])
        ids = [s.emit("orders.created", {"n": n}) for n in range(3)]
        wait_for("the endpoint disabled", lambda: s.rows(
            "SELECT active, disabled_reason FROM webhook_endpoints WHERE id = %s", endpoint["id"]) == [
            (False, "the receiver answered 410 Gone")])
        marker = s.emit("marker")  # the other endpoint gets it: the emitter went on working
        wait_for("the marker at the other endpoint", arrived(other, [*ids, marker]))
        assert [event_id(r) for r in gone.all()] == [ids[0]]  # one attempt, then nothing more
        status, doc = s.agent.json("GET", "/api/webhooks")
        listed = {e["id"]: e for e in doc["endpoints"]}
        assert listed[endpoint["id"]]["active"] is False
        assert "410" in listed[endpoint["id"]]["disabled_reason"]
        # An inactive endpoint gets no deliveries for new events.
        assert s.rows("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s AND event_id = %s",
                      endpoint["id"], marker) == [(0,)]
        assert s.rows("SELECT status_code FROM webhook_attempts AS a JOIN webhook_deliveries AS d "
                      "ON d.id = a.delivery_id WHERE d.endpoint_id = %s", endpoint["id"]) == [(410,)]
    finally:
        gone.close()
        other.close()


def test_dead_after_max_attempts_stays_visible_and_redeliver_sends_it(stack: Callable[..., Stack],
                                                                      receiver: Receiver) -> None:
    s = stack(webhooks__max_attempts=3)
    receiver.status = 500
    s.register(receiver.url, ["billing.*"])
    event = s.emit("billing.failed", {"invoice": 7})
    wait_for("the delivery dead", lambda: s.rows("SELECT state FROM webhook_deliveries") == [("dead",)])
    attempts = s.rows("SELECT a.attempt, a.status_code, a.next_attempt_at IS NULL FROM webhook_attempts AS a "
                      "ORDER BY a.id")
    assert attempts == [(1, 500, False), (2, 500, False), (3, 500, True)]
    assert len(receiver.all()) == 3 and not receiver.accepted()
    status, doc = s.agent.json("GET", "/api/webhooks/events?event_type=billing.failed")
    assert status == 200
    [shown] = doc["events"]
    assert shown["id"] == event and shown["payload"] == {"invoice": 7}
    [delivery] = shown["deliveries"]
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("dead", 3, 500)
    assert delivery["next_attempt_at"] is None
    receiver.status = 200
    status, doc = s.agent.json("POST", f"/api/webhooks/events/{event}/redeliver")
    assert status == 202 and doc["event_id"] == event and len(doc["endpoints"]) == 1
    [got] = wait_for("the redelivered event", arrived(receiver, [event]))
    assert got.json["data"] == {"invoice": 7}
    assert [row[1:] for row in s.settled()] == [("delivered", 1, 200)]
    assert len(receiver.all()) == 4
    _, doc = s.agent.json("GET", "/api/webhooks/events?event_type=billing.failed")
    assert doc["events"][0]["deliveries"][0]["state"] == "delivered"


def test_secrets_are_never_listed_and_trigger_round_trips_through_history(stack: Callable[..., Stack],
                                                                         receiver: Receiver) -> None:
    s = stack()
    given = "whsec_" + "c2VjcmV0LWJ5dGVzLWZvci10ZXN0aW5nLTEyMzQ="
    generated = s.register(receiver.url, ["user_*"])["secret"]
    assert s.register(receiver.url, ["other.*"], secret=given, description="second")["secret"] == given
    status, headers, raw = s.agent.request("GET", "/api/webhooks")
    assert status == 200
    listed = json.loads(raw)["endpoints"]
    assert [e["events"] for e in listed] == [["user_*"], ["other.*"]]
    assert all("secret" not in e for e in listed)
    assert given.encode() not in raw and generated.encode() not in raw and b"whsec_" not in raw
    ids = {}
    for event_type, payload in [("user_signup", {"email": "u@example.com"}), ("other.thing", [1, 2]),
                                ("user_signup", {"email": "v@example.com"})]:
        status, doc = s.agent.json("POST", "/api/webhooks/trigger",
                                   body=json.dumps({"event_type": event_type, "payload": payload}).encode())
        assert status == 202
        ids.setdefault(event_type, []).append(doc["event_id"])
    wait_for("the three events", arrived(receiver, [i for v in ids.values() for i in v]))
    s.settled()
    status, doc = s.agent.json("GET", "/api/webhooks/events?event_type=user_signup")
    assert [e["id"] for e in doc["events"]] == ids["user_signup"][::-1]  # newest first
    assert [e["payload"]["email"] for e in doc["events"]] == ["v@example.com", "u@example.com"]
    assert all(e["deliveries"][0]["state"] == "delivered" for e in doc["events"])
    _, doc = s.agent.json("GET", "/api/webhooks/events?event_type=user_signup&limit=1")
    assert [e["id"] for e in doc["events"]] == ids["user_signup"][-1:]
    _, doc = s.agent.json("GET", "/api/webhooks/events")
    assert len(doc["events"]) == 3 and b"whsec_" not in json.dumps(doc).encode()
    for r in receiver.accepted():  # each endpoint signs with its own secret
        assert Webhook(given if r.json["type"] == "other.thing" else generated).verify(r.body, r.headers)


def test_webhook_service_seed_api_directly_over_asyncpg(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack()  # the emitter that delivers; the service only writes the tables

    async def scenario() -> tuple[Any, int, list[Any], list[Any]]:
        service = await WebhookService.connect(s.dsn)
        try:
            endpoint = await service.register_webhook(receiver.url, ["signup.*"])
            async with service.db.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                await service.trigger_webhook("signup.rolled_back", {"n": 0}, conn=conn)
                await tx.rollback()
                async with conn.transaction():
                    inside = await service.trigger_webhook("signup.in_tx", {"n": 1}, conn=conn)
            plain = await service.trigger_webhook("signup.done", {"n": 2})
            history = await service.get_event_history()
            with pytest.raises(ValueError, match="event_type"):
                await service.trigger_webhook("bad type", {})
            return endpoint, plain, history, [inside, await service.list_endpoints()]
        finally:
            await service.close()

    endpoint, plain, history, (inside, endpoints) = asyncio.run(scenario())
    assert endpoint.secret and endpoint.secret.startswith("whsec_") and endpoint.events == ("signup.*",)
    assert [e.secret for e in endpoints] == [None]
    assert [(e.id, e.event_type, e.payload) for e in history] == [(plain, "signup.done", {"n": 2}),
                                                                 (inside, "signup.in_tx", {"n": 1})]
    got = wait_for("the two committed events", arrived(receiver, [inside, plain]))
    assert [r.json["type"] for r in got] == ["signup.in_tx", "signup.done"]
    assert all(Webhook(endpoint.secret).verify(r.body, r.headers) for r in got)

    async def later() -> list[Any]:
        service = await WebhookService.connect(s.dsn)
        try:
            return await service.get_event_history("signup.done", limit=5)
        finally:
            await service.close()

    s.settled()
    [done] = asyncio.run(later())
    assert done.deliveries[0]["state"] == "delivered" and done.deliveries[0]["endpoint_id"] == endpoint.id


PATTERNS = ["*", "users.*", "users_insert", "user_*", "*.insert", "a-b", "*_*", "resumes.update", "r*s.*e",
            "users.insert", "*s*"]
EVENT_TYPES = ["users.insert", "users_insert", "usersXinsert", "user_signup", "userXsignup", "a-b", "a_b",
               "resumes.update", "matches.insert", "x_y", "xy", "users.insert\n", "USERS.INSERT", "rs.e"]


def test_matches_agrees_with_the_like_in_pgsidecar_emit(migrated: Any) -> None:
    _, connect = migrated
    with connect() as conn:
        endpoints = {conn.execute("INSERT INTO webhook_endpoints (url, events, secret) VALUES (%s, %s, 'whsec_x') "
                                  "RETURNING id", (f"http://127.0.0.1/{i}", [p])).fetchone()[0]: p
                     for i, p in enumerate(PATTERNS)}
        events = {emit(conn, t): t for t in EVENT_TYPES}
        in_sql = set(conn.execute("SELECT endpoint_id, event_id FROM webhook_deliveries").fetchall())
    in_python = {(e, v) for e, p in endpoints.items() for v, t in events.items() if matches(t, [p])}
    assert in_python == in_sql, {"sql only": [(endpoints[e], events[v]) for e, v in in_sql - in_python],
                                 "python only": [(endpoints[e], events[v]) for e, v in in_python - in_sql]}
    assert len(in_sql) > len(EVENT_TYPES)  # the table is not trivially empty


def test_old_finished_events_are_pruned_and_pending_ones_never(stack: Callable[..., Stack],
                                                                  receiver: Receiver) -> None:
    s = stack(webhooks__retention_days=1)
    s.register(receiver.url, ["app.done"])
    down = Receiver()
    down.stop_listening()  # nothing listens there: its delivery stays pending
    try:
        s.register(down.url, ["app.waiting"])
        done = [s.emit("app.done", {"n": n}) for n in range(2)]
        waiting = s.emit("app.waiting", {"n": 3})
        wait_for("the two finished deliveries", arrived(receiver, done))
        wait_for("an attempt at the pending one", lambda: s.rows(
            "SELECT attempts FROM webhook_deliveries WHERE event_id = %s AND attempts > 0", waiting) or None)
        fresh = s.emit("app.done", {"n": 4})  # recent: kept however finished it is
        wait_for("the recent one delivered", arrived(receiver, [fresh]))
        with s.connect() as direct:
            direct.execute("UPDATE webhook_events SET created_at = now() - interval '2 days' WHERE id <> %s", (fresh,))
        assert s.proxy.call(s.emitter.prune()) == 2
        kept = [r[0] for r in s.rows("SELECT id FROM webhook_events ORDER BY id")]
        assert kept == [waiting, fresh]
        assert s.rows("SELECT count(*) FROM webhook_deliveries WHERE event_id = ANY(%s)", done) == [(0,)]
        assert s.rows("SELECT count(*) FROM webhook_attempts AS a JOIN webhook_deliveries AS d "
                      "ON d.id = a.delivery_id WHERE d.event_id = %s", waiting)[0][0] >= 1
        assert s.proxy.call(s.emitter.prune()) == 0
        assert s.snapshot().pruned == 2
    finally:
        down.close()


def test_delivery_off_queues_events_and_says_so(stack: Callable[..., Stack], receiver: Receiver) -> None:
    s = stack(webhooks__enabled=False)
    s.register(receiver.url, ["app.*"])
    before = s.snapshot()
    event = s.emit("app.queued", {"n": 1})
    wait_for("the wake-up seen and a dispatcher round after it", lambda: (
        (snap := s.snapshot()).notifications > before.notifications and snap.sweeps > before.sweeps + 1) or None)
    assert s.rows("SELECT state, attempts FROM webhook_deliveries WHERE event_id = %s", event) == [("pending", 0)]
    assert receiver.all() == []
    status, doc = s.agent.json("GET", "/api/health/detailed")
    assert doc["webhooks"]["status"] == "off" and "webhooks.enabled: false" in doc["webhooks"]["message"]


def test_postgresql_restarted_with_events_pending_loses_nothing(
        restartable_cluster: Any, proxy_factory: Callable[..., RunningProxy]) -> None:
    """The server itself goes down (the LISTEN connection and the emitter's pool with it) while
    deliveries are pending and a receiver is slow; events committed before and after come out."""
    cluster = restartable_cluster
    dsn = cluster.dsn()
    runner.upgrade(runner.alembic_config(dsn))
    # A lease far longer than the test's waits: the emitter's own lease from before the restart
    # (its release could not reach the server) must not hold its deliveries back.
    s = Stack(dsn, lambda: psycopg.connect(dsn, autocommit=True),
              proxy_factory(dsn, **{**FAST, "webhooks__lease_s": 600.0}))
    receiver = Receiver()
    receiver.delay = 0.05
    try:
        s.register(receiver.url, ["app.*"])
        with s.connect() as direct:
            before = [emit(direct, "app.before", {"n": n}) for n in range(20)]
        wait_for("the first deliveries", lambda: len(receiver.accepted()) >= 2 or None)
        connects = s.snapshot().connects
        cluster.restart()
        with s.connect() as direct:
            after = [emit(direct, "app.after", {"n": n}) for n in range(5)]
        wait_for("every event, from before and after the restart", arrived(receiver, before + after), timeout=60)
        assert s.snapshot().connects > connects  # it reconnected; the sweep found what was pending
        assert {event_id(r) for r in receiver.accepted()} == set(before + after)
        ordered = [event_id(r) for r in receiver.accepted()]
        assert [e for e in sorted(set(ordered))] == sorted(before + after)
        # One endpoint, ordered: the first arrival of each event comes in event order.
        firsts = list(dict.fromkeys(ordered))
        assert firsts == sorted(firsts)
    finally:
        s.agent.stop()
        receiver.close()
