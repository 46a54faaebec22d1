"""The PostgreSQL fixtures themselves: each one answers, authenticates and restarts as promised."""
from __future__ import annotations

import asyncpg
import psycopg
import pytest

from tests.helpers.cluster import Cluster
from tests.helpers.servers import AUTH_ROLES, TEST_DATABASE, PgServer

PASSWORD_ROLES = [r for r in AUTH_ROLES.values() if r.password is not None]


async def test_pg_server_answers_asyncpg(pg_server: PgServer) -> None:
    conn = await asyncpg.connect(**pg_server.connect_kwargs(), timeout=10)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == TEST_DATABASE
    finally:
        await conn.close()


def test_pg_server_answers_psycopg(pg_server: PgServer) -> None:
    with psycopg.connect(pg_server.dsn, connect_timeout=10) as conn:
        assert conn.execute("select 1, current_database()").fetchone() == (1, TEST_DATABASE)


async def test_direct_sees_client_in_pg_stat_activity(pg_server: PgServer, direct) -> None:
    conn = await asyncpg.connect(**pg_server.connect_kwargs(),
                                 server_settings={"application_name": "fixture-probe"})
    try:
        pid = await conn.fetchval("select pg_backend_pid()")
        row = direct().execute(
            "select datname, application_name from pg_stat_activity where pid = %s", (pid,)
        ).fetchone()
        assert row == (TEST_DATABASE, "fixture-probe")
    finally:
        await conn.close()


@pytest.mark.parametrize("role", PASSWORD_ROLES, ids=lambda r: r.name)
async def test_auth_cluster_rejects_wrong_password_asyncpg(auth_cluster: Cluster, role) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as caught:
        await asyncpg.connect(auth_cluster.dsn(role.name, "wrong"), timeout=10)
    assert caught.value.sqlstate == "28P01"


@pytest.mark.parametrize("role", PASSWORD_ROLES, ids=lambda r: r.name)
def test_auth_cluster_rejects_wrong_password_psycopg(auth_cluster: Cluster, role) -> None:
    # libpq reports connection-time errors as text only, so psycopg has no sqlstate here.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(auth_cluster.dsn(role.name, "wrong"), connect_timeout=10)


@pytest.mark.parametrize("role", PASSWORD_ROLES, ids=lambda r: r.name)
async def test_auth_cluster_accepts_right_password_with_its_method(
    auth_cluster: Cluster, role
) -> None:
    conn = await asyncpg.connect(auth_cluster.dsn(role.name, role.password), timeout=10)
    try:
        assert await conn.fetchval("select current_user") == role.name
    finally:
        await conn.close()
    with psycopg.connect(auth_cluster.dsn(role.name, role.password), connect_timeout=10) as pconn:
        assert pconn.execute("select current_user").fetchone() == (role.name,)
    # log_connections names the hba method that actually ran: md5 really is md5, not SCRAM.
    assert f'identity="{role.name}" method={role.method}' in auth_cluster.log_text()


def test_auth_cluster_stores_md5_password_only_for_md5_user(auth_cluster: Cluster) -> None:
    with psycopg.connect(auth_cluster.dsn(), connect_timeout=10) as conn:
        stored = dict(conn.execute(
            "select rolname, left(rolpassword, 6) from pg_authid where rolname = any(%s)",
            (list(AUTH_ROLES),),
        ).fetchall())
    assert stored.pop("md5_user").startswith("md5")
    assert stored == {"scram_user": "SCRAM-", "pw_user": "SCRAM-", "trust_user": None}


async def test_auth_cluster_trust_user_needs_no_password(auth_cluster: Cluster) -> None:
    conn = await asyncpg.connect(auth_cluster.dsn("trust_user"), timeout=10)
    try:
        assert await conn.fetchval("select current_user") == "trust_user"
    finally:
        await conn.close()


async def test_restartable_cluster_restarts_on_same_port(restartable_cluster: Cluster) -> None:
    cluster = restartable_cluster
    port = cluster.port
    conn = await asyncpg.connect(cluster.dsn(), timeout=10)
    started = await conn.fetchval("select pg_postmaster_start_time()")

    cluster.restart()

    assert cluster.port == port and cluster.running
    with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError, asyncpg.InterfaceError)):
        await conn.fetchval("select 1")
    await conn.close()
    conn = await asyncpg.connect(cluster.dsn(), timeout=10)
    try:
        assert await conn.fetchval("select pg_postmaster_start_time()") > started
    finally:
        await conn.close()


def test_restartable_cluster_refuses_connections_while_stopped(restartable_cluster: Cluster) -> None:
    restartable_cluster.stop()
    assert not restartable_cluster.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(restartable_cluster.dsn(), connect_timeout=5)
    restartable_cluster.start()
    with psycopg.connect(restartable_cluster.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
