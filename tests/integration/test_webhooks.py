"""The webhook emitter (issue 7) on a real PostgreSQL with the migrations applied, real HTTP
receivers on loopback, and the app's writes going through a real proxy."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from standardwebhooks.webhooks import Webhook

from migrations import runner
from tests.helpers.agent_http import RunningAgent
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.receiver import Receiver
from tests.helpers.wire import wait_for

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


@pytest.fixture
def stack(fresh_db: Any, proxy_factory: Callable[..., RunningProxy]) -> Iterator[Callable[..., Stack]]:
    dsn, connect = fresh_db
    runner.upgrade(runner.alembic_config(dsn))
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
    with s.connect() as direct:
        states = direct.execute("SELECT state, attempts, last_status FROM webhook_deliveries ORDER BY id").fetchall()
    assert states == [("delivered", 1, 200)] * 3
