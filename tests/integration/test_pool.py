"""The pool as clients and PostgreSQL see it: exhaustion, overflow, abandoned transactions and
queries, a server restart, recycling, session mode, pinning, NOTIFY and cancellation.

Every test asserts what the client saw (SQLSTATE, rows) and, where it matters, the server side
through a direct connection (pg_stat_activity, pg_locks).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.helpers.servers import TEST_DATABASE
from tests.helpers.activity import running
from tests.helpers.wire import RawClient, cancel_request, query, wait_until


def _connect(proxy: Any, autocommit: bool = True, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(**proxy.kwargs(**kw), autocommit=autocommit, connect_timeout=10)


def _one(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _pool(proxy: Any) -> Any:
    pools = proxy.snapshot().pools
    assert len(pools) == 1, pools
    return pools[0]


def _activity(d: psycopg.Connection[Any], pid: int) -> tuple[str, str] | None:
    """(state, query) of backend ``pid``, or None when it is gone."""
    return d.execute("select state, query from pg_stat_activity where pid = %s", (pid,)).fetchone()




def _locks_on(d: psycopg.Connection[Any], table: str) -> list[tuple[int, str, bool]]:
    return d.execute(
        "select pid, mode, granted from pg_locks where relation = %s::regclass", (table,)
    ).fetchall()


def _abort_socket(conn: psycopg.Connection[Any]) -> None:
    """Kill a psycopg connection's TCP connection under its feet: RST, no Terminate."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def table(direct) -> Any:
    """A fresh table ``<name>(id int primary key, v text)`` with row (1, 'a'), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    d = direct()
    d.execute(f"create table {name} (id int primary key, v text)")
    d.execute(f"insert into {name} values (1, 'a')")
    yield name
    d.execute(f"drop table if exists {name}")


class _Background:
    """Run a blocking call in a thread and keep its result or exception."""

    def __init__(self, fn: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"


# ----------------------------------------------------------------------------- exhaustion, overflow


async def test_exhausted_pool_answers_53300_to_asyncpg_extended_protocol(proxy_factory) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=0.5)
    kw = dict(host="127.0.0.1", port=proxy.port, user="postgres", database=TEST_DATABASE, ssl=False, timeout=10)
    a = await asyncpg.connect(**kw)
    b = await asyncpg.connect(**kw)
    try:
        tx = a.transaction()
        await tx.start()
        assert await a.fetchval("select $1::int", 1) == 1
        with pytest.raises(asyncpg.TooManyConnectionsError) as caught:
            await b.fetchval("select $1::int + 1", 41)
        assert caught.value.sqlstate == "53300"
        assert "pool.size=1" in caught.value.detail and "pool.max_overflow=0" in caught.value.detail
        await tx.commit()
        assert await b.fetchval("select $1::int + 1", 41) == 42
        assert not b.is_in_transaction()
    finally:
        await a.close()
        await b.close()


async def test_each_queued_client_waits_its_own_checkout_timeout(proxy_factory) -> None:
    # The pool times its queue out with one timer, due at the head's deadline: a client queued
    # later must still wait its full checkout_timeout (not be refused with the head), and one
    # queued after the queue emptied must be timed out too.
    timeout = 1.0
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=timeout)

    async def connect(autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(**proxy.kwargs(), autocommit=autocommit, connect_timeout=10)

    holder = await connect(autocommit=False)
    waiters = [await connect() for _ in range(3)]
    await holder.execute("select 1")  # its open transaction holds the only server connection

    async def refused_after(conn: psycopg.AsyncConnection[Any], delay: float) -> float:
        await asyncio.sleep(delay)
        start = time.monotonic()
        with pytest.raises(psycopg.errors.TooManyConnections):
            await conn.execute("select 2")
        return time.monotonic() - start

    try:
        first, second = await asyncio.gather(refused_after(waiters[0], 0.0), refused_after(waiters[1], 0.4))
        third = await refused_after(waiters[2], 0.0)  # queued alone, after the queue emptied
        for waited in (first, second, third):
            assert waited >= timeout * 0.95, (first, second, third)
        assert _pool(proxy).checkout_timeouts == 3
        await holder.commit()
        for i, w in enumerate(waiters):
            assert await (await w.execute("select %s::int", (i,))).fetchone() == (i,)
    finally:
        await holder.close()
        for w in waiters:
            await w.close()


def test_client_that_leaves_while_queued_does_not_break_the_pool(proxy_factory) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    a = _connect(proxy, autocommit=False)
    assert _one(a, "select 1") == 1
    raw = RawClient(proxy.port)
    raw.login("postgres", TEST_DATABASE)
    raw.send(query("select 'queued'"))
    wait_until(lambda: _pool(proxy).waiting == 1, timeout=5, message="the raw client to queue")
    raw.kill()
    wait_until(lambda: _pool(proxy).waiting == 0, timeout=5, message="the queued client to go")
    a.commit()
    c = _connect(proxy)
    assert _one(c, "select 'served'") == "served"
    snap = _pool(proxy)
    assert (snap.active, snap.idle, snap.servers_opened) == (0, 1, 1)
    a.close()
    c.close()


def test_exhausted_pool_answers_53300_and_the_session_survives(proxy_factory) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=0.5)
    a = _connect(proxy, autocommit=False)
    b = _connect(proxy)
    assert _one(a, "select 1") == 1  # A's transaction now holds the only server connection

    with pytest.raises(psycopg.errors.TooManyConnections) as caught:
        b.execute("select 2")
    err = caught.value
    assert err.sqlstate == "53300"
    assert err.diag.severity == "ERROR"
    assert err.diag.message_primary == "no server connection available"
    assert "pool.size=1" in err.diag.message_detail
    assert "pool.max_overflow=0" in err.diag.message_detail
    assert not b.closed
    snap = _pool(proxy)
    assert (snap.checkout_timeouts, snap.active) == (1, 1)

    a.commit()
    assert _one(b, "select 2") == 2
    assert b.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    a.close()
    b.close()


def test_overflow_opens_under_load_and_closes_when_idle(proxy_factory, direct) -> None:
    proxy = proxy_factory(
        pool__size=1, pool__max_overflow=2, pool__overflow_idle_timeout=0.3, pool__checkout_timeout=5
    )
    d = direct()
    conns = [_connect(proxy, autocommit=False) for _ in range(3)]
    pids = [_one(c, "select pg_backend_pid()") for c in conns]  # three open transactions
    assert len(set(pids)) == 3
    snap = _pool(proxy)
    assert (snap.active, snap.overflow, snap.servers_opened) == (3, 2, 3)
    assert all(_activity(d, pid)[0] == "idle in transaction" for pid in pids)  # type: ignore[index]

    for c in conns:
        c.commit()
    wait_until(lambda: (lambda s: (s.overflow, s.idle, s.active) == (0, 1, 0))(_pool(proxy)),
               timeout=10, message="overflow connections to be closed")
    assert _pool(proxy).servers_closed == 2
    survivors = wait_until(
        lambda: (lambda alive: alive if len(alive) == 1 else None)([p for p in pids if _activity(d, p)]),
        timeout=5, message="two of the three backends to exit",
    )
    # The one kept is the pool's own connection: the next client gets it.
    assert _one(conns[0], "select pg_backend_pid()") == survivors[0]
    for c in conns:
        c.close()


# ----------------------------------------------------------------------------- abandoned clients


def test_client_killed_mid_transaction_releases_its_row_lock(proxy_factory, direct, table) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    a = _connect(proxy, autocommit=False)
    pid = _one(a, "select pg_backend_pid()")
    assert a.execute(f"select id, v from {table} where id = 1 for update").fetchall() == [(1, "a")]
    assert any(p == pid and granted for p, _, granted in _locks_on(d, table))

    _abort_socket(a)

    wait_until(lambda: not _locks_on(d, table), timeout=10, message="the row lock to disappear")
    wait_until(lambda: (_activity(d, pid) or ("gone",))[0] in ("idle", "gone"), timeout=5,
               message="the backend to leave its transaction")
    b = _connect(proxy, autocommit=False)
    assert b.execute(f"select id, v from {table} where id = 1 for update nowait").fetchall() == [(1, "a")]
    b.execute(f"update {table} set v = 'b' where id = 1")
    b.commit()
    assert _one(d, f"select v from {table} where id = 1") == "b"
    snap = _pool(proxy)
    assert (snap.active, snap.idle, snap.overflow) == (0, 1, 0)
    b.close()
    wait_until(lambda: proxy.run(lambda: len(proxy.server.sessions)) == 0, timeout=5, message="sessions to close")
    with contextlib.suppress(Exception):
        a.close()


def test_client_killed_holding_a_table_lock_releases_it(proxy_factory, direct, table) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    raw = RawClient(proxy.port)
    raw.login("postgres", TEST_DATABASE)
    assert raw.simple_query("begin")[-1].body == b"T"
    assert raw.simple_query(f"lock table {table} in access exclusive mode")[-1].body == b"T"
    (pid,) = RawClient.rows(raw.simple_query("select pg_backend_pid()"))[0]
    assert (int(pid), "AccessExclusiveLock", True) in _locks_on(d, table)

    raw.kill()

    wait_until(lambda: not _locks_on(d, table), timeout=10, message="the table lock to disappear")
    b = _connect(proxy, autocommit=False)
    b.execute(f"lock table {table} in access exclusive mode nowait")
    assert _one(b, f"select count(*) from {table}") == 1
    b.commit()
    assert _pool(proxy).active == 0
    b.close()


def test_client_killed_during_a_long_query_cancels_it(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    raw = RawClient(proxy.port)
    raw.login("postgres", TEST_DATABASE)
    marker = f"killed_{uuid.uuid4().hex[:8]}"
    raw.send(query(f"select pg_sleep(30) /* {marker} */"))
    (backend,) = wait_until(lambda: running(d, marker), timeout=5, message="pg_sleep to start")

    raw.kill()

    wait_until(lambda: not running(d, marker), timeout=5, message="the abandoned pg_sleep to stop")
    state = _activity(d, backend)
    assert state is None or state[0] == "idle", state
    # The pool recovered: the next client is served at once.
    c = _connect(proxy)
    assert _one(c, "select 41 + 1") == 42
    assert _pool(proxy).active == 0
    c.close()


# ----------------------------------------------------------------------------- server restart, lifetime


async def test_server_restart_errors_then_recovers_without_proxy_restart(proxy_factory, restartable_cluster) -> None:
    cluster = restartable_cluster
    proxy = proxy_factory(cluster.dsn(), pool__size=2, pool__max_overflow=0, upstream__connect_timeout=2)
    in_txn = _connect(proxy, autocommit=False)
    idle = _connect(proxy)
    assert _one(in_txn, "select 1") == 1
    assert _one(idle, "select 2") == 2

    await asyncio.to_thread(cluster.stop)

    # A client in a transaction loses it, with an error that says so.
    with pytest.raises(psycopg.OperationalError) as lost:
        in_txn.execute("select 3")
    assert lost.value.sqlstate in ("57P01", "08006"), (lost.value.sqlstate, str(lost.value))
    assert in_txn.closed or in_txn.broken

    # An idle client stays connected and gets a clear, non-fatal error.
    with pytest.raises(psycopg.OperationalError) as down:
        idle.execute("select 4")
    assert down.value.sqlstate == "08006"
    assert down.value.diag.message_primary == "could not connect to the server"
    assert "postgres/postgres" in (down.value.diag.message_detail or "")
    assert not idle.closed

    # New connections fail clearly (asyncpg's startup is new to the proxy: it must ask the server).
    with pytest.raises(asyncpg.PostgresError) as refused:
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres",
                              ssl=False, timeout=10)
    assert refused.value.sqlstate == "08006"
    assert refused.value.severity == "FATAL"
    assert refused.value.message == "could not connect to the server"

    await asyncio.to_thread(cluster.start)

    assert _one(idle, "select 5") == 5
    fresh = _connect(proxy)
    assert _one(fresh, "select pg_postmaster_start_time() > now() - interval '5 minutes'") is True
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres",
                                 ssl=False, timeout=10)
    try:
        assert await conn.fetchval("select 6") == 6
    finally:
        await conn.close()
    assert _pool(proxy).server_errors >= 1
    for c in (in_txn, idle, fresh):
        with contextlib.suppress(Exception):
            c.close()


def test_server_lifetime_recycles_connections_unnoticed(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__server_lifetime=0.3, pool__checkout_timeout=5)
    d = direct()
    c = _connect(proxy)
    first = _one(c, "select pg_backend_pid()")
    # A transaction that outlives server_lifetime keeps its backend until it ends.
    t = _connect(proxy, autocommit=False)
    t_pid = _one(t, "select pg_backend_pid()")
    t.execute("select pg_sleep(0.5)")
    assert _one(t, "select pg_backend_pid()") == t_pid
    t.commit()

    seen = {first}

    def recycled() -> bool:
        pid = _one(c, "select pg_backend_pid()")  # any error here fails the test
        seen.add(pid)
        return pid != first

    wait_until(recycled, timeout=10, interval=0.1, message="a new backend after server_lifetime")
    assert len(seen) >= 2
    assert _pool(proxy).servers_closed >= 1
    wait_until(lambda: _activity(d, first) is None, timeout=5, message="the recycled backend to exit")
    c.close()
    t.close()


# ----------------------------------------------------------------------------- session mode


def test_session_mode_keeps_one_backend_then_resets_it(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__mode="session", pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    default_work_mem = _one(d, "show work_mem")
    a = _connect(proxy)
    pid = _one(a, "select pg_backend_pid()")
    a.execute("set work_mem = '7MB'")
    a.execute("create temp table sess_tmp as select 1 as x")
    for _ in range(3):
        assert _one(a, "select pg_backend_pid()") == pid
        assert _one(a, "show work_mem") == "7MB"
        assert _one(a, "select count(*) from sess_tmp") == 1
    snap = proxy.snapshot()
    assert snap.mode == "session"
    assert (snap.clients.active, snap.pools[0].active, snap.pools[0].idle) == (1, 1, 0)
    a.close()

    # DISCARD ALL ran on the backend before it went back to the pool.
    wait_until(lambda: _activity(d, pid) == ("idle", "DISCARD ALL"), timeout=5, message="DISCARD ALL on the backend")
    b = _connect(proxy)
    assert _one(b, "select pg_backend_pid()") == pid
    assert _one(b, "show work_mem") == default_work_mem != "7MB"
    assert _one(b, "select count(*) from pg_class where relname = 'sess_tmp'") == 0
    b.close()


# ----------------------------------------------------------------------------- pinning

PIN_CASES = [
    # id, statement, pin reason, check for the pinned client, its value,
    # check for the next client on the same backend, its value
    ("set_search_path", "SET search_path TO pin_schema, public", "set",
     "show search_path", "pin_schema, public", "show search_path", '"$user", public'),
    ("set_statement_timeout", "SET statement_timeout = '1234ms'", "set",
     "show statement_timeout", "1234ms", "show statement_timeout", "0"),
    ("listen", "LISTEN pin_chan", "listen",
     "select string_agg(c, ',') from pg_listening_channels() c", "pin_chan",
     "select count(*) from pg_listening_channels()", 0),
    ("temp_table", "CREATE TEMP TABLE pin_tmp AS SELECT 7 AS x", "temp_table",
     "select x from pin_tmp", 7, "select count(*) from pg_class where relname = 'pin_tmp'", 0),
    ("advisory_lock", "SELECT pg_advisory_lock(424242)", "advisory_lock",
     "select count(*) from pg_locks where locktype = 'advisory' and objid = 424242 and pid = pg_backend_pid()", 1,
     "select count(*) from pg_locks where locktype = 'advisory' and objid = 424242", 0),
    ("prepare", "PREPARE pin_stmt AS SELECT 42", "prepare",
     "EXECUTE pin_stmt", 42, "select count(*) from pg_prepared_statements where name = 'pin_stmt'", 0),
    ("with_hold_cursor", "DECLARE pin_cur SCROLL CURSOR WITH HOLD FOR SELECT 5", "with_hold_cursor",
     "FETCH ABSOLUTE 1 FROM pin_cur", 5, "select count(*) from pg_cursors where name = 'pin_cur'", 0),
]


@pytest.mark.parametrize(
    ("statement", "reason", "check", "value", "other_check", "other_value"),
    [case[1:] for case in PIN_CASES],
    ids=[case[0] for case in PIN_CASES],
)
def test_session_state_pins_the_client_and_does_not_leak(
    proxy_factory, direct, statement, reason, check, value, other_check, other_value
) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=0.5)
    a = _connect(proxy)
    b = _connect(proxy)
    pid = _one(a, "select pg_backend_pid()")
    assert _pool(proxy).pinned == 0

    a.execute(statement)

    snap = proxy.snapshot()
    assert (snap.pools[0].pinned, snap.pools[0].pin_reasons, snap.clients.pinned) == (1, {reason: 1}, 1)
    # The state follows the client across transactions, on the same backend ...
    for _ in range(2):
        assert _one(a, check) == value
        assert _one(a, "select pg_backend_pid()") == pid
    # ... which is therefore not available to anyone else meanwhile.
    with pytest.raises(psycopg.errors.TooManyConnections):
        b.execute("select 1")

    a.close()
    wait_until(lambda: _pool(proxy).pinned == 0, timeout=5, message="the pin to be dropped")
    assert _one(b, "select pg_backend_pid()") == pid, "test needs the same backend to check for leaks"
    assert _one(b, other_check) == other_value
    assert _pool(proxy).pin_reasons == {reason: 1}
    b.close()


def test_set_local_does_not_pin(proxy_factory) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=0.5)
    a = _connect(proxy, autocommit=False)
    a.execute("SET LOCAL statement_timeout = '1s'")
    assert _one(a, "show statement_timeout") == "1s"
    a.commit()
    assert _one(a, "show statement_timeout") == "0"
    a.commit()
    snap = _pool(proxy)
    assert (snap.pinned, snap.pin_reasons, snap.active) == (0, {}, 0)
    a.close()


@pytest.mark.parametrize(
    "set_tz",
    ["SET TimeZone = 'Asia/Tokyo'", "SET TIME ZONE 'Asia/Tokyo'", "set session timezone to 'Asia/Tokyo'"],
)
def test_timezone_and_application_name_are_tracked_per_client(proxy_factory, direct, set_tz) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    a = _connect(proxy, application_name="client-a0")
    b = _connect(proxy, application_name="client-b")
    b_tz = _one(b, "show timezone")
    assert b_tz != "Asia/Tokyo"

    a.execute(set_tz)
    a.execute("SET application_name = 'client-a'")
    snap = _pool(proxy)
    assert (snap.pinned, snap.pin_reasons) == (0, {})
    assert a.info.timezone.key == "Asia/Tokyo"  # the ParameterStatus reached the client

    for _ in range(2):  # interleaved on the one backend
        assert _one(b, "show timezone") == b_tz
        assert _one(b, "show application_name") == "client-b"
        assert _one(a, "show timezone") == "Asia/Tokyo"
        assert _one(a, "select to_char(timestamptz '2024-01-01 00:00:00+00', 'HH24')") == "09"
        assert _one(a, "show application_name") == "client-a"
    assert _one(a, "select pg_backend_pid()") == _one(b, "select pg_backend_pid()")

    # The server sees each client's name while that client runs.
    a.autocommit = False
    pid = _one(a, "select pg_backend_pid()")
    assert _one(d, "select application_name from pg_stat_activity where pid = %s", (pid,)) == "client-a"
    a.commit()
    assert _one(b, "show timezone") == b_tz
    a.close()
    b.close()


def test_startup_options_apply_per_client(proxy_factory) -> None:
    """Settings from the startup packet (options=-c ...) follow their client onto the shared
    backend and are undone for the next one."""
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    a = _connect(proxy, options="-c statement_timeout=4321 -c search_path=opt_schema")
    b = _connect(proxy)
    for _ in range(2):
        assert (_one(a, "show statement_timeout"), _one(a, "show search_path")) == ("4321ms", "opt_schema")
        assert (_one(b, "show statement_timeout"), _one(b, "show search_path")) == ("0", '"$user", public')
    assert _one(a, "select pg_backend_pid()") == _one(b, "select pg_backend_pid()")
    assert _pool(proxy).pinned == 0
    a.close()
    b.close()


def test_new_client_starts_from_server_defaults_not_the_last_clients_settings(proxy_factory, direct) -> None:
    """A client that sets nothing must see the server's defaults, whoever used the backend last."""
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    server_tz = _one(d, "show timezone")
    a = _connect(proxy, application_name="client-a")
    a.execute("SET TimeZone = 'Asia/Tokyo'")
    assert _one(a, "show timezone") == "Asia/Tokyo"  # the backend last ran with A's settings
    c = _connect(proxy)  # no application_name, no options
    assert c.info.parameter_status("TimeZone") == server_tz  # ParameterStatus at login
    assert c.info.parameter_status("application_name") == ""
    assert _one(c, "show timezone") == server_tz
    assert _one(c, "show application_name") == ""
    a.close()
    c.close()


async def test_asyncpg_listener_receives_notify_through_the_proxy(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__size=2, pool__max_overflow=0, pool__checkout_timeout=5)
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database=TEST_DATABASE,
                                 ssl=False, timeout=10)
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    try:
        await conn.add_listener("pgsc_chan", lambda _c, _pid, channel, payload: received.put_nowait((channel, payload)))
        snap = _pool(proxy)
        assert (snap.pinned, snap.pin_reasons) == (1, {"listen": 1})
        d = direct()
        d.execute("NOTIFY pgsc_chan, 'hello'")
        assert await asyncio.wait_for(received.get(), 5) == ("pgsc_chan", "hello")
        assert await conn.fetchval("select 1") == 1
        d.execute("select pg_notify('pgsc_chan', 'again')")
        assert await asyncio.wait_for(received.get(), 5) == ("pgsc_chan", "again")
    finally:
        await conn.close()


# ----------------------------------------------------------------------------- cancel


def test_cancel_stops_the_query_and_keeps_the_session(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    c = _connect(proxy)
    marker = f"cancel_{uuid.uuid4().hex[:8]}"
    job = _Background(lambda: c.execute(f"select pg_sleep(30) /* {marker} */"))
    wait_until(lambda: running(d, marker), timeout=5, message="pg_sleep to start")

    c.cancel_safe(timeout=5)

    job.join()
    assert isinstance(job.error, psycopg.errors.QueryCanceled), job.error
    assert job.error.sqlstate == "57014"
    assert not running(d, marker)
    assert _one(c, "select 'still here'") == "still here"
    c.close()


def test_cancel_request_with_a_wrong_key_does_nothing(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=5)
    d = direct()
    c = _connect(proxy)
    pid = c.info.backend_pid  # the proxy's own key, not the backend's
    secret = proxy.run(lambda: proxy.server.sessions[pid].secret)
    marker = f"nocancel_{uuid.uuid4().hex[:8]}"
    job = _Background(lambda: c.execute(f"select pg_sleep(30) /* {marker} */"))
    (backend,) = wait_until(lambda: running(d, marker), timeout=5, message="pg_sleep to start")
    assert backend != pid

    for bad_pid, bad_secret in ((pid, secret ^ 1), (pid + 7, secret), (backend, secret)):
        with RawClient(proxy.port) as raw:
            raw.send(cancel_request(bad_pid, bad_secret))
            assert raw.read_to_eof() == []  # handled and closed, no answer (as PostgreSQL)
    # Nothing may happen to the query: watch it for a while.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert running(d, marker) == [backend]
        time.sleep(0.05)
    assert job.error is None

    with RawClient(proxy.port) as raw:  # the right key does cancel it
        raw.send(cancel_request(pid, secret))
        assert raw.read_to_eof() == []
    job.join()
    assert isinstance(job.error, psycopg.errors.QueryCanceled), job.error
    assert _one(c, "select 1") == 1
    c.close()


def test_full_pool_of_idle_connections_due_for_a_check_still_serves(proxy_factory) -> None:
    """Every server connection idle past server_check_delay and no room to open another:
    the checkout must check one and use it, not queue the client behind nobody."""
    proxy = proxy_factory(pool__size=2, pool__max_overflow=0, pool__checkout_timeout=2,
                          pool__server_check_delay=0.2)
    conns = [psycopg.connect(**proxy.kwargs(), autocommit=True) for _ in range(2)]
    try:
        with conns[0].transaction():
            conns[0].execute("select 1")
            conns[1].execute("select 1")  # needs the second server connection
        time.sleep(0.5)  # both idle longer than server_check_delay; the pool is full
        for conn in conns:
            assert conn.execute("select 42").fetchone() == (42,)
        pool = proxy.snapshot().pools[0]
        assert pool.checkout_timeouts == 0
        assert pool.servers_opened == 2
    finally:
        for conn in conns:
            conn.close()
