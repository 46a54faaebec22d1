"""The GraphQL gateway across a PostgreSQL restart: its sessions are the proxy's clients, and the
proxy replaces the server connections the restart killed, so no query after it fails."""
from __future__ import annotations

import json
import urllib.request
from typing import Any

import psycopg

from migrations import runner
from tests.helpers.agent_http import RunningAgent
from tests.helpers.proxy_thread import RunningProxy


def _users(agent: RunningAgent) -> Any:
    req = urllib.request.Request(agent.url + "/graphql", method="POST",
                                 data=json.dumps({"query": "{ users(first: 2) { id } }"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_no_gateway_query_fails_after_postgresql_restarts(restartable_cluster: Any) -> None:
    dsn = restartable_cluster.dsn()
    runner.upgrade(runner.alembic_config(dsn))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users (email, full_name) VALUES ('a@x', 'A'), ('b@x', 'B')")
    proxy = RunningProxy(dsn)
    agent = RunningAgent(proxy)
    try:
        for _ in range(12):  # every gateway session and several server connections in use
            assert _users(agent) == {"data": {"users": [{"id": "1"}, {"id": "2"}]}}
        restartable_cluster.restart()
        answers = [_users(agent) for _ in range(12)]
        assert answers == [{"data": {"users": [{"id": "1"}, {"id": "2"}]}}] * 12
    finally:
        agent.stop()
        proxy.stop()
