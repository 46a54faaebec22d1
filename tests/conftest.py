"""Shared fixtures: a real PostgreSQL for every integration test.

- ``pg_server`` (session): `PgServer` for the database ``pgsidecar_test`` (dropped and created at
  session start) on the server named by ``PGSIDECAR_TEST_DSN``, or else on a throwaway cluster
  started from pgserver's bundled binaries and removed at the end.
- ``auth_cluster`` (session): always a dedicated `Cluster` with the roles of `AUTH_ROLES`
  (scram-sha-256, md5, password and trust logins over 127.0.0.1).
- ``restartable_cluster`` (function): a fresh `Cluster` a test may stop, restart or break.
- ``direct`` (function): opens autocommit psycopg connections straight to ``pg_server`` to check
  the server side (pg_stat_activity, pg_locks, rows).

`tests/bench/` is never collected (see pytest.ini and `collect_ignore` below).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest

from tests.helpers.cluster import Cluster, live_clusters
from tests.helpers.servers import AUTH_ROLES, TEST_DATABASE, PgServer, from_cluster, parse_dsn

collect_ignore = ["bench"]

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    leftovers = list(live_clusters())
    for cluster in leftovers:
        cluster.cleanup()
    if leftovers:
        warnings.warn(f"test session left clusters running, stopped them: {leftovers}", stacklevel=1)


@contextlib.contextmanager
def throwaway_cluster(tag: str, **create_kwargs: Any) -> Iterator[Cluster]:
    """A `Cluster` in a fresh temp dir, stopped and removed on exit, even if creation is
    interrupted (a pytest-timeout during setup, Ctrl-C)."""
    # Not pytest's tmp_path: its root is 0700 and owned by the test runner, and when the tests
    # run as root the server runs as an unprivileged user that must traverse the directory.
    base = Path(tempfile.mkdtemp(prefix=f"pgsidecar-{tag}-"))
    cluster: Cluster | None = None
    try:
        base.chmod(0o711)
        cluster = Cluster.create(base / "cluster", **create_kwargs)
        yield cluster
    finally:
        if cluster is not None:
            cluster.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    dsn = os.environ.get("PGSIDECAR_TEST_DSN")
    with contextlib.ExitStack() as stack:
        if dsn:
            admin = parse_dsn(dsn)
        else:
            admin = from_cluster(stack.enter_context(throwaway_cluster("server")))
        with psycopg.connect(**admin.psycopg_kwargs(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DATABASE}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{TEST_DATABASE}"')
        yield admin.with_database(TEST_DATABASE)


@pytest.fixture(scope="session")
def auth_cluster() -> Iterator[Cluster]:
    hba = [f"host all {r.name} 127.0.0.1/32 {r.method}" for r in AUTH_ROLES.values()]
    with throwaway_cluster(
        "auth",
        hba_lines=hba,
        users={r.name: r.password for r in AUTH_ROLES.values()},
        settings={"log_connections": "on"},  # the log names the hba method each login used
    ) as cluster:
        yield cluster


@pytest.fixture
def restartable_cluster() -> Iterator[Cluster]:
    with throwaway_cluster("restart") as cluster:
        yield cluster


@pytest.fixture
def direct(pg_server: PgServer) -> Iterator[Callable[..., psycopg.Connection[Any]]]:
    """``direct(**overrides)`` -> an autocommit psycopg connection to pg_server's test database
    (overrides are psycopg keyword arguments, e.g. ``dbname=``); all closed after the test."""
    opened: list[psycopg.Connection[Any]] = []

    def connect(**overrides: Any) -> psycopg.Connection[Any]:
        conn = psycopg.connect(**pg_server.psycopg_kwargs(**overrides), autocommit=True,
                               connect_timeout=10)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()
