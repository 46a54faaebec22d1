"""Authentication in both directions, against the auth cluster's real roles.

Client -> proxy: the method the proxy offers (seen on the wire), right and wrong passwords with
asyncpg, psycopg and psycopg2, unknown users (same answer as a wrong password), unknown
databases (PostgreSQL's 3D000), and the "no auth.users" mode where clients present the upstream
DSN's credentials. Proxy -> server: one proxy per hba method of the auth cluster, and a wrong
upstream password reported to the client at login.
"""
from __future__ import annotations

import re
import struct
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pytest

from config.loader import ConfigError
from config.settings import UserSettings
from tests.helpers.cluster import Cluster
from tests.helpers.servers import AUTH_ROLES
from tests.helpers.wire import RawClient, startup_packet, wait_until

USERS = (
    UserSettings("scram_user", "scram_pw"),
    UserSettings("md5_user", "md5_pw"),
)
PASSWORD_ROLES = [r for r in AUTH_ROLES.values() if r.password is not None]

# (auth.method, Authentication request code the proxy must send first)
CLIENT_METHODS = [("scram-sha-256", 10), ("md5", 5), ("trust", 0)]
CHECKING_METHODS = ["scram-sha-256", "md5"]


def _proxy_with_users(proxy_factory: Any, auth_cluster: Cluster, method: str | None) -> Any:
    settings: dict[str, Any] = {"auth__users": USERS}
    if method is not None:
        settings["auth__method"] = method
    return proxy_factory(auth_cluster.dsn("scram_user", "scram_pw"), **settings)


async def _asyncpg_connect(proxy: Any, user: str, password: str | None, database: str = "postgres") -> Any:
    return await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user=user, password=password, database=database,
        timeout=10, ssl=False,
    )


def _psycopg_kwargs(proxy: Any, user: str, password: str | None, database: str = "postgres") -> dict[str, Any]:
    kw: dict[str, Any] = {"host": "127.0.0.1", "port": proxy.port, "user": user, "dbname": database,
                          "connect_timeout": 10, "sslmode": "disable"}
    if password is not None:
        kw["password"] = password
    return kw


def _first_auth_request(proxy: Any, user: str) -> tuple[int, bytes]:
    """Code and payload of the first Authentication message the proxy sends for ``user``."""
    with RawClient(proxy.port) as raw:
        raw.send(startup_packet({"user": user, "database": "postgres"}))
        msg = raw.read_message()
    assert msg is not None and msg.kind == b"R", msg
    (code,) = struct.unpack("!i", msg.body[:4])
    return code, msg.body[4:]


def _sessions_settle(proxy: Any, expected_sessions: int = 0) -> None:
    """The proxy forgets every failed login: no pending session stays behind."""
    wait_until(
        lambda: proxy.run(lambda: (len(proxy.server.pending_sessions), len(proxy.server.sessions)))
        == (0, expected_sessions),
        timeout=5,
        message="pending_sessions/sessions to settle",
    )


# ----------------------------------------------------------------------------- client -> proxy


@pytest.mark.parametrize(("method", "code"), CLIENT_METHODS)
def test_proxy_offers_the_configured_method(proxy_factory, auth_cluster, method, code) -> None:
    proxy = _proxy_with_users(proxy_factory, auth_cluster, method)
    got, payload = _first_auth_request(proxy, "scram_user")
    assert got == code
    if method == "scram-sha-256":
        assert payload == b"SCRAM-SHA-256\x00\x00"
    elif method == "md5":
        assert len(payload) == 4  # the salt


def test_scram_is_the_default_method(proxy_factory, auth_cluster) -> None:
    proxy = _proxy_with_users(proxy_factory, auth_cluster, None)
    assert proxy.settings.auth.method == "scram-sha-256"
    assert _first_auth_request(proxy, "md5_user")[0] == 10


def test_password_method_is_refused_by_the_config(proxy_factory, auth_cluster) -> None:
    with pytest.raises(ConfigError) as caught:
        _proxy_with_users(proxy_factory, auth_cluster, "password")
    assert caught.value.key == "auth.method"
    assert "'password'" in str(caught.value)


@pytest.mark.parametrize("method", [m for m, _ in CLIENT_METHODS])
@pytest.mark.parametrize("user", USERS, ids=lambda u: u.name)
async def test_right_password_logs_in_with_every_driver(proxy_factory, auth_cluster, method, user) -> None:
    proxy = _proxy_with_users(proxy_factory, auth_cluster, method)
    conn = await _asyncpg_connect(proxy, user.name, user.password)
    try:
        assert await conn.fetchval("select current_user") == user.name
    finally:
        await conn.close()
    with psycopg.connect(**_psycopg_kwargs(proxy, user.name, user.password)) as pconn:
        assert pconn.execute("select current_user, 1 + 1").fetchone() == (user.name, 2)
    conn2 = psycopg2.connect(**_psycopg_kwargs(proxy, user.name, user.password))
    try:
        with conn2.cursor() as cur:
            cur.execute("select session_user")
            assert cur.fetchone() == (user.name,)
    finally:
        conn2.close()


@pytest.mark.parametrize("method", CHECKING_METHODS)
async def test_wrong_password_is_28P01_and_proxy_keeps_serving(proxy_factory, auth_cluster, method) -> None:
    proxy = _proxy_with_users(proxy_factory, auth_cluster, method)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await _asyncpg_connect(proxy, "scram_user", "not-the-password")
    err = caught.value
    assert err.sqlstate == "28P01"
    assert err.severity == "FATAL"
    assert err.message == 'password authentication failed for user "scram_user"'
    assert isinstance(err, asyncpg.InvalidPasswordError)

    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "md5_user"'):
        psycopg.connect(**_psycopg_kwargs(proxy, "md5_user", "nope"))
    with pytest.raises(psycopg2.OperationalError, match='password authentication failed for user "md5_user"'):
        psycopg2.connect(**_psycopg_kwargs(proxy, "md5_user", "nope"))

    # Others are still served, and the failed logins left nothing behind.
    conn = await _asyncpg_connect(proxy, "md5_user", "md5_pw")
    try:
        assert await conn.fetchval("select current_user") == "md5_user"
        _sessions_settle(proxy, expected_sessions=1)
    finally:
        await conn.close()
    _sessions_settle(proxy, expected_sessions=0)


@pytest.mark.parametrize("method", CHECKING_METHODS)
async def test_unknown_user_gets_the_wrong_password_answer(proxy_factory, auth_cluster, method) -> None:
    proxy = _proxy_with_users(proxy_factory, auth_cluster, method)
    with pytest.raises(asyncpg.PostgresError) as wrong:
        await _asyncpg_connect(proxy, "scram_user", "bad")
    # pw_user exists on the server but is not in auth.users; ghost exists nowhere.
    for user in ("ghost", "pw_user"):
        with pytest.raises(asyncpg.PostgresError) as unknown:
            await _asyncpg_connect(proxy, user, "bad")
        assert unknown.value.sqlstate == "28P01"
        assert unknown.value.severity == "FATAL"
        assert unknown.value.message.replace(user, "U") == wrong.value.message.replace("scram_user", "U")
    # The exchange itself looks the same: a SCRAM challenge / an md5 salt, not an early refusal.
    assert _first_auth_request(proxy, "ghost")[0] == _first_auth_request(proxy, "scram_user")[0]
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "ghost"'):
        psycopg.connect(**_psycopg_kwargs(proxy, "ghost", "bad"))
    _sessions_settle(proxy)


async def test_trust_accepts_any_password_of_a_configured_user(proxy_factory, auth_cluster) -> None:
    proxy = _proxy_with_users(proxy_factory, auth_cluster, "trust")
    conn = await _asyncpg_connect(proxy, "md5_user", "whatever")
    try:
        assert await conn.fetchval("select current_user") == "md5_user"
    finally:
        await conn.close()


async def test_trust_still_refuses_users_not_in_auth_users(proxy_factory, auth_cluster) -> None:
    """With auth.users configured the list is the allow-list, as PgBouncer's auth_file is for
    auth_type=trust: trust_user exists on the server (hba trust) but is not configured."""
    proxy = _proxy_with_users(proxy_factory, auth_cluster, "trust")
    with pytest.raises(asyncpg.PostgresError) as caught:
        await _asyncpg_connect(proxy, "trust_user", None)
    assert caught.value.sqlstate in ("28P01", "28000")
    assert caught.value.severity == "FATAL"
    assert all(p.user != "trust_user" or p.servers_opened == 0 for p in proxy.snapshot().pools)


async def test_unknown_database_is_3D000_from_postgresql(proxy_factory, auth_cluster) -> None:
    # md5 between client and proxy, so that libpq's SCRAM trouble cannot mask the 3D000.
    proxy = _proxy_with_users(proxy_factory, auth_cluster, "md5")
    with pytest.raises(asyncpg.PostgresError) as caught:
        await _asyncpg_connect(proxy, "scram_user", "scram_pw", database="no_such_db")
    err = caught.value
    assert isinstance(err, asyncpg.InvalidCatalogNameError)
    assert err.sqlstate == "3D000"
    assert err.severity == "FATAL"
    assert err.message == 'database "no_such_db" does not exist'
    with pytest.raises(psycopg.OperationalError, match='database "no_such_db" does not exist'):
        psycopg.connect(**_psycopg_kwargs(proxy, "scram_user", "scram_pw", database="no_such_db"))
    pool = next(p for p in proxy.snapshot().pools if p.database == "no_such_db")
    assert pool.servers_opened == 0 and pool.server_errors >= 1 and pool.active == 0
    # The proxy still serves the database that exists.
    with psycopg.connect(**_psycopg_kwargs(proxy, "scram_user", "scram_pw")) as conn:
        assert conn.execute("select current_database()").fetchone() == ("postgres",)
    _sessions_settle(proxy)


async def test_without_auth_users_clients_present_the_upstream_credentials(proxy_factory, auth_cluster) -> None:
    proxy = proxy_factory(auth_cluster.dsn(user="scram_user", password="scram_pw"))
    assert _first_auth_request(proxy, "scram_user")[0] == 10
    conn = await _asyncpg_connect(proxy, "scram_user", "scram_pw")
    try:
        assert await conn.fetchval("select current_user") == "scram_user"
    finally:
        await conn.close()
    with pytest.raises(asyncpg.PostgresError) as wrong:
        await _asyncpg_connect(proxy, "scram_user", "md5_pw")
    assert wrong.value.sqlstate == "28P01"
    # md5_user/md5_pw is valid on the server, but it is not the upstream DSN's user.
    with pytest.raises(asyncpg.PostgresError) as other:
        await _asyncpg_connect(proxy, "md5_user", "md5_pw")
    assert other.value.sqlstate == "28P01"
    assert other.value.message == 'password authentication failed for user "md5_user"'
    assert [p.user for p in proxy.snapshot().pools] == ["scram_user"]


# ----------------------------------------------------------------------------- proxy -> server


def _log_lines_since(cluster: Cluster, offset: int) -> str:
    return cluster.log_text()[offset:]


@pytest.mark.parametrize("role", list(AUTH_ROLES.values()), ids=lambda r: r.name)
async def test_proxy_logs_in_to_the_server_with_each_method(proxy_factory, auth_cluster, role) -> None:
    offset = len(auth_cluster.log_text())
    proxy = proxy_factory(auth_cluster.dsn(user=role.name, password=role.password))
    conn = await _asyncpg_connect(proxy, role.name, role.password)
    try:
        assert await conn.fetchval("select current_user") == role.name
        backend = await conn.fetchval("select pg_backend_pid()")
    finally:
        await conn.close()
    pool = proxy.snapshot().pools[0]
    assert (pool.user, pool.servers_opened, pool.server_errors) == (role.name, 1, 0)

    # log_connections: the backend the proxy opened authenticated with the role's hba method.
    def backend_lines() -> list[str]:
        return [line for line in _log_lines_since(auth_cluster, offset).splitlines() if f"[{backend}]" in line]

    lines = wait_until(
        lambda: [ln for ln in backend_lines() if "connection authorized" in ln],
        timeout=5, message="the proxy's backend in the server log",
    )
    assert f"user={role.name} database=postgres" in lines[0]
    text = "\n".join(backend_lines())
    if role.password is None:
        assert "connection authenticated" not in text  # trust: nothing to authenticate
    else:
        assert f'connection authenticated: identity="{role.name}" method={role.method}' in text


@pytest.mark.parametrize("role", PASSWORD_ROLES, ids=lambda r: r.name)
async def test_wrong_upstream_password_is_fatal_28P01_at_login(proxy_factory, auth_cluster, role) -> None:
    # md5 between client and proxy keeps this about the proxy -> server login for libpq too.
    proxy = proxy_factory(auth_cluster.dsn(user=role.name, password="stale-password"), auth__method="md5")
    # The client presents exactly what the proxy expects (the DSN's credentials) ...
    with pytest.raises(asyncpg.PostgresError) as caught:
        await _asyncpg_connect(proxy, role.name, "stale-password")
    err = caught.value
    # ... and learns at login that the server refused the proxy.
    assert err.sqlstate == "28P01"
    assert err.severity == "FATAL"
    assert f'password authentication failed for user "{role.name}"' in err.message
    with pytest.raises(psycopg.OperationalError, match=re.escape(f'password authentication failed for user "{role.name}"')):
        psycopg.connect(**_psycopg_kwargs(proxy, role.name, "stale-password"))
    pool = proxy.snapshot().pools[0]
    assert pool.servers_opened == 0 and pool.server_errors >= 2 and pool.active == 0 and pool.idle == 0
    _sessions_settle(proxy)


async def test_wrong_upstream_password_error_says_it_is_the_upstream_login(proxy_factory, auth_cluster) -> None:
    """The client's own credentials were accepted, so the error must tell it that the proxy's
    login to PostgreSQL failed (habit 3: the detail names the setting), not just repeat
    PostgreSQL's text, which reads as if the client had typed a wrong password."""
    proxy = proxy_factory(auth_cluster.dsn(user="scram_user", password="stale-password"))
    with pytest.raises(asyncpg.PostgresError) as caught:
        await _asyncpg_connect(proxy, "scram_user", "stale-password")
    err = caught.value
    assert err.sqlstate == "28P01"
    explanation = " ".join(x for x in (err.message, err.detail, err.hint) if x)
    assert re.search(r"upstream|server", explanation, re.I), explanation
