"""Fixtures that start a real pgsidecar proxy in front of the test PostgreSQL."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.helpers.agent_http import RunningAgent
from tests.helpers.proxy_thread import RunningProxy


@pytest.fixture
def proxy_factory(pg_server: Any) -> Iterator[Callable[..., RunningProxy]]:
    """``proxy_factory(upstream_dsn=None, **settings)`` -> a RunningProxy on a free port.

    Settings are dotted keys with ``__`` for the dot, e.g. ``pool__size=3``.
    """
    started: list[RunningProxy] = []

    def start(upstream_dsn: str | None = None, **settings: Any) -> RunningProxy:
        overrides = {key.replace("__", "."): value for key, value in settings.items()}
        proxy = RunningProxy(upstream_dsn or pg_server.dsn, overrides)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(proxy_factory: Callable[..., RunningProxy]) -> RunningProxy:
    """A transaction-mode proxy with a small pool (size 3, overflow 2)."""
    return proxy_factory(pool__size=3, pool__max_overflow=2, pool__checkout_timeout=10.0)


@pytest.fixture
def fresh_db(pg_server: Any, direct: Callable[..., psycopg.Connection[Any]]) -> Iterator[tuple[str, Callable[[], psycopg.Connection[Any]]]]:
    """(DSN, connect) of an empty database created for this test and dropped after it."""
    name = f"pgsidecar_t_{uuid.uuid4().hex[:10]}"
    admin = direct()
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.dsn_for(database=name), lambda: direct(dbname=name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def agents() -> Iterator[Callable[[RunningProxy], RunningAgent]]:
    """``agents(proxy)`` -> the agent's app served over HTTP for that proxy, stopped after the test."""
    started: list[RunningAgent] = []

    def start(proxy: RunningProxy) -> RunningAgent:
        agent = RunningAgent(proxy)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
