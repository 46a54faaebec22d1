"""Real client libraries through the proxy, in transaction mode, with many more clients than
server connections: psql, asyncpg, psycopg 3, psycopg2, SQLAlchemy 2 (three drivers) and pgbench.

Each test drives a client the way applications do (prepared-statement caches, pipelines, COPY,
cancellation, LISTEN, server-side cursors, connection pools of their own) and asserts what the
client saw (rows, values, SQLSTATE) and, where it matters, the server side through a direct
connection: at no moment does PostgreSQL see more backends for the database than the proxy's
``pool.size + pool.max_overflow``, and nothing keeps running after a cancel.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers.activity import running
from tests.helpers.wire import wait_until

# Direct (test-side) connections carry this application_name so that backend counts leave
# them out; the proxy's own server connections never do.
DIRECT_APP = "pgsc_direct"


# ----------------------------------------------------------------------------- helpers


def _d(direct: Callable[..., psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
    return direct(application_name=DIRECT_APP)


def _one(conn: Any, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _pool(proxy: Any, database: str | None = None) -> Any:
    pools = [p for p in proxy.snapshot().pools if database is None or p.database == database]
    assert len(pools) == 1, pools
    return pools[0]


def _asyncpg_kwargs(proxy: Any, **overrides: Any) -> dict[str, Any]:
    kw = proxy.kwargs()
    kw["database"] = kw.pop("dbname")
    kw.update(ssl=False, timeout=10)
    kw.update(overrides)
    return kw


async def _close_quickly(*conns: asyncpg.Connection) -> None:
    """Close asyncpg connections; one still waiting for a query (a failed test) is aborted."""
    for conn in conns:
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (asyncio.TimeoutError, OSError, asyncpg.PostgresError):
            conn.terminate()




def _backends(d: psycopg.Connection[Any], database: str) -> int:
    """Client backends connected to ``database``, other than the tests' own direct ones."""
    return _one(
        d,
        "select count(*) from pg_stat_activity where datname = %s and backend_type = 'client backend'"
        " and coalesce(application_name, '') not like 'pgsc\\_%%' and pid <> pg_backend_pid()",
        (database,),
    )


class ServerWatch:
    """Samples from its own thread, between start() and stop() (or over a with block): how many
    PostgreSQL backends serve ``database`` (pg_stat_activity) and how many clients the proxy holds."""

    def __init__(self, direct: Callable[..., psycopg.Connection[Any]], proxy: Any, database: str) -> None:
        self.conn = direct(application_name="pgsc_watch")
        self.proxy = proxy
        self.database = database
        self.max_backends = 0
        self.max_clients = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-watch", daemon=True)

    def start(self) -> ServerWatch:
        """Start sampling; call before the first client connects (its login opens a backend)."""
        # Backends of an earlier test's proxy may still be on their way out.
        wait_until(lambda: _backends(self.conn, self.database) == 0, timeout=10,
                   message=f"no backends on {self.database} before the test")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> ServerWatch:
        return self.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.max_backends = max(self.max_backends, _backends(self.conn, self.database))
                # The proxy's own high-water mark: sampling every 10 ms can miss a short peak.
                self.max_clients = max(self.max_clients, self.proxy.run(lambda: self.proxy.server.peak_clients))
                self.samples += 1
                self._stop.wait(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check(self, limit: int, min_clients: int = 0) -> None:
        assert self.error is None, self.error
        assert self.samples > 0
        assert 0 < self.max_backends <= limit, (self.max_backends, limit)
        assert self.max_clients >= min_clients, (self.max_clients, min_clients)


class _Background:
    """A blocking call in a daemon thread (a stuck client cannot hang the test run)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self._error = exc

    def result(self, timeout: float = 60.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background call did not finish within {timeout:g} s"
        if self._error is not None:
            raise self._error
        return self._result


def _threads(n: int, fn: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """Run ``fn(0..n-1)`` in ``n`` threads at once; results in order, the first error raised."""
    jobs = [_Background(fn, i) for i in range(n)]
    deadline = time.monotonic() + timeout
    for job in jobs:
        job._thread.join(max(0.0, deadline - time.monotonic()))  # noqa: SLF001
    errors = [job._error for job in jobs if job._error is not None]  # noqa: SLF001
    if errors:
        raise errors[0]
    return [job.result(0) for job in jobs]


def _table(direct: Callable[..., psycopg.Connection[Any]], columns: str, name: str = "t") -> Iterator[str]:
    table = f"{name}_{uuid.uuid4().hex[:10]}"
    d = _d(direct)
    d.execute(f"create table {table} ({columns})")
    yield table
    d.execute(f"drop table if exists {table}")


@pytest.fixture
def items(direct) -> Iterator[str]:
    """A fresh table ``items(id int primary key, worker int, v text)``, dropped afterwards."""
    yield from _table(direct, "id int primary key, worker int not null, v text", "items")


@pytest.fixture
def small_proxy(proxy_factory) -> Any:
    """Transaction mode, pool size 3, no overflow: 3 backends at most."""
    return proxy_factory(pool__size=3, pool__max_overflow=0, pool__checkout_timeout=20.0)


_CHILD_PROXY = r"""
import dataclasses, json, sys
from tests.helpers.proxy_thread import RunningProxy
proxy = RunningProxy(sys.argv[1], json.loads(sys.argv[2]))
print(proxy.port, flush=True)
for line in sys.stdin:
    if line.strip() == "pool":
        print(json.dumps(dataclasses.asdict(proxy.snapshot().pools[0])), flush=True)
proxy.stop()
"""


class ProxyProcess:
    """The proxy in a child process, for clients whose blocking calls hold the GIL.

    psycopg2's ``connection.cancel()`` and psycopg's ``Connection.cancel()`` call libpq's
    PQcancel without releasing the GIL; against a proxy running in a thread of the test process
    that freezes both (the proxy never gets to answer the CancelRequest). Applications never run
    the proxy inside their own process, so these tests don't either.
    """

    def __init__(self, pg_server: Any, **settings: Any) -> None:
        self.pg_server = pg_server
        overrides = {key.replace("__", "."): value for key, value in settings.items()}
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_PROXY, pg_server.dsn, json.dumps(overrides)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"the proxy process did not start: {line!r}"
        self.port = int(line)

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        return self.pg_server.psycopg_kwargs(host="127.0.0.1", port=self.port, **overrides)

    def pool(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("pool\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def proxy_process(pg_server) -> Iterator[ProxyProcess]:
    """Transaction mode, pool size 3, no overflow, in a child process."""
    proxy = ProxyProcess(pg_server, pool__size=3, pool__max_overflow=0, pool__checkout_timeout=20.0)
    yield proxy
    proxy.stop()


# ============================================================================= psql


def _psql(proxy: Any, script: str | bytes, *args: str, env: dict[str, str] | None = None,
          database: str | None = None) -> subprocess.CompletedProcess[bytes]:
    kw = proxy.kwargs()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    full_env.update(PGHOST="127.0.0.1", PGPORT=str(proxy.port), PGUSER=kw["user"],
                    PGDATABASE=database or kw["dbname"], PGCONNECT_TIMEOUT="10", LC_ALL="C.UTF-8")
    if "password" in kw:
        full_env["PGPASSWORD"] = kw["password"]
    full_env.update(env or {})
    data = script.encode() if isinstance(script, str) else script
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", *args],
                          input=data, capture_output=True, env=full_env, timeout=60, check=False)


def _lines(out: bytes) -> list[str]:
    return [line for line in out.decode().splitlines() if line]


def test_psql_scripts_from_many_sessions_share_three_servers(small_proxy, direct, pg_server, items) -> None:
    workers = 8

    def script(w: int) -> str:
        rounds = "".join(  # ten transactions per session, so that the sessions overlap
            f"begin;\ninsert into {items} (id, worker, v)"
            f" select {w} * 1000 + g, {w}, 'row ' || g from generate_series({r * 5 + 1}, {r * 5 + 5}) g;\n"
            f"commit;\n" for r in range(10))
        return rounds + f"""
begin;
select count(*) as mine from {items} where worker = {w} \\gset
commit;
\\echo mine=:mine
select 'multi' \\; select 7 * {w} \\; select current_database();
select 1; select 2;
select sum(id - {w} * 1000) from {items} where worker = {w};
"""

    with ServerWatch(direct, small_proxy, pg_server.database) as watch:
        runs = _threads(workers, lambda w: _psql(small_proxy, script(w)))
    for w, run in enumerate(runs):
        assert run.returncode == 0, run.stderr.decode()
        assert run.stderr == b""
        assert _lines(run.stdout) == ["mine=50", "multi", str(7 * w), pg_server.database, "1", "2", "1275"]
    watch.check(limit=3)
    d = _d(direct)
    assert d.execute(f"select worker, count(*) from {items} group by worker order by worker").fetchall() == [
        (w, 50) for w in range(workers)
    ]
    snap = _pool(small_proxy)
    assert snap.servers_opened <= 3 and snap.pinned == 0
    assert small_proxy.snapshot().clients.accepted == workers


def test_psql_copy_in_and_out(small_proxy, direct, tmp_path, items) -> None:
    tmp_path.chmod(0o755)
    big = tmp_path / "big.csv"
    big.write_text("".join(f"{i},{i % 7},value {i}\n" for i in range(100, 10100)))
    out = tmp_path / "out.csv"
    script = f"""
\\copy {items} (id, worker, v) from stdin with (format csv)
1,1,alpha
2,1,"with,comma"
3,2,
\\.
\\copy {items} (id, worker, v) from '{big}' with (format csv)
\\copy (select id, worker, v from {items} where id < 100 order by id) to '{out}' with (format csv, header)
\\copy (select id, v from {items} where id in (1, 2, 3) order by id) to stdout with (format csv)
select count(*), sum(id) from {items};
"""
    run = _psql(small_proxy, script)
    assert run.returncode == 0, run.stderr.decode()
    assert _lines(run.stdout) == ["1,alpha", '2,"with,comma"', "3,", f"10003|{6 + sum(range(100, 10100))}"]
    assert out.read_text() == 'id,worker,v\n1,1,alpha\n2,1,"with,comma"\n3,2,\n'
    d = _d(direct)
    assert d.execute(f"select v from {items} where id = 3").fetchone() == (None,)
    assert _one(d, f"select count(*) from {items} where v = 'value ' || id") == 10000

    # And back in through the proxy, in many sessions at once.
    many = f"\\copy {items} (id, worker, v) from '{big}' with (format csv)\n"
    d.execute(f"truncate {items}")
    runs = _threads(6, lambda _: _psql(small_proxy, many))
    assert sorted(r.returncode for r in runs) == [0, 3, 3, 3, 3, 3]  # the others hit the primary key
    assert all(b"duplicate key value" in r.stderr for r in runs if r.returncode)
    assert _one(d, f"select count(*) from {items}") == 10000
    assert _pool(small_proxy).active == 0


def test_psql_errors_keep_the_session(small_proxy, direct, items) -> None:
    d = _d(direct)
    d.execute(f"insert into {items} values (1, 0, 'taken')")
    script = f"""
\\set ON_ERROR_STOP off
select 1/0;
\\echo state=:LAST_ERROR_SQLSTATE
begin;
insert into {items} values (2, 0, 'rolled back');
select * from no_such_table_here;
\\echo state=:LAST_ERROR_SQLSTATE
select 'in aborted transaction';
\\echo state=:LAST_ERROR_SQLSTATE
rollback;
\\copy {items} (id, worker, v) from stdin with (format csv)
5,0,five
1,0,duplicate
\\.
\\set ON_ERROR_STOP on
select 'alive', count(*), string_agg(v, ',') from {items};
begin;
insert into {items} values (3, 0, 'committed');
commit;
"""
    run = _psql(small_proxy, script)
    assert run.returncode == 0, run.stderr.decode()
    assert _lines(run.stdout) == ["state=22012", "state=42P01", "state=25P02", "alive|1|taken"]
    err = run.stderr.decode()
    assert "division by zero" in err
    assert 'relation "no_such_table_here" does not exist' in err
    assert "current transaction is aborted" in err
    assert "duplicate key value violates unique constraint" in err
    assert d.execute(f"select id, v from {items} order by id").fetchall() == [(1, "taken"), (3, "committed")]
    snap = _pool(small_proxy)
    assert (snap.active, snap.pinned) == (0, 0)


def test_psql_client_encoding_and_application_name(proxy_factory, direct) -> None:
    # One server connection: psql and the other client take turns on the same backend.
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=10.0)
    other = psycopg.connect(**proxy.kwargs(application_name="utf8-client"), autocommit=True)
    pid = _one(other, "select pg_backend_pid()")
    script = (
        "show client_encoding;\n\\encoding\nshow application_name;\n"
        "select length('\u00e9'), octet_length('\u00e9'), convert_to('\u00e9', 'UTF8');\n"
        "select chr(233);\n"
        "begin;\nselect application_name, pg_backend_pid() from pg_stat_activity where pid = pg_backend_pid();\n"
        "commit;\n"
    ).encode("latin-1")
    run = _psql(proxy, script, env={"PGCLIENTENCODING": "LATIN1"})
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode("latin-1").splitlines() == [
        "LATIN1", "LATIN1", "psql", "1|2|\\xc3a9", "\u00e9", f"psql|{pid}",
    ]
    assert run.stdout.splitlines()[4] == b"\xe9"  # a LATIN1 byte, converted by the backend

    # The other client, on that same backend, still has its own encoding and name.
    assert (_one(other, "show client_encoding"), _one(other, "show application_name")) == ("UTF8", "utf8-client")
    assert _one(other, "select pg_backend_pid()") == pid

    # PGAPPNAME and the locale's encoding; \encoding switches it mid-session.
    script2 = (
        "show client_encoding;\nshow application_name;\n\\encoding LATIN1\nshow client_encoding;\n"
        "select chr(233);\nselect pg_backend_pid();\n"
    )
    run = _psql(proxy, script2, env={"PGAPPNAME": "report-job"})
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.split(b"\n")[:-1] == [b"UTF8", b"report-job", b"LATIN1", b"\xe9", str(pid).encode()]
    assert (_one(other, "show client_encoding"), _one(other, "show application_name")) == ("UTF8", "utf8-client")
    assert _one(other, "select chr(233)") == "\u00e9"
    snap = _pool(proxy)
    assert (snap.servers_opened, snap.pinned, snap.pin_reasons) == (1, 0, {})
    other.close()


# ============================================================================= asyncpg


async def test_asyncpg_statement_cache_20_clients_50_iterations(proxy, direct, pg_server, items) -> None:
    watch = ServerWatch(direct, proxy, pg_server.database).start()
    d = _d(direct)
    d.execute(f"insert into {items} select g, 0, 'v' || g from generate_series(1, 100) g")
    conns = [await asyncpg.connect(**_asyncpg_kwargs(proxy)) for _ in range(20)]

    async def work(w: int, conn: asyncpg.Connection) -> int:
        done = 0
        for i in range(50):
            row = await conn.fetchrow("select $1::int + $2::int as s, $3::text || '!' as t", i, w, f"w{w}")
            assert (row["s"], row["t"]) == (i + w, f"w{w}!")
            n = i % 100 + 1
            assert await conn.fetchval(f"select v from {items} where id = $1", n) == f"v{n}"
            assert await conn.fetch(f"select id from {items} where id between $1 and $2 order by id", n, n + 2) == [
                (k,) for k in range(n, min(n + 2, 100) + 1)
            ]
            done += 1
        return done

    try:
        assert await asyncio.gather(*(work(w, c) for w, c in enumerate(conns))) == [50] * 20
        watch.stop()
        watch.check(limit=5, min_clients=20)
        # The statements really were named and prepared, under the proxy's pool-wide names.
        async with conns[0].transaction():
            await conns[0].fetchval(f"select v from {items} where id = $1", 1)
            names = await conns[0].fetch(
                "select name, statement from pg_prepared_statements where not from_sql")
        assert names and all(r["name"].startswith("pgsc_") for r in names), names
        assert any(r["statement"] == f"select v from {items} where id = $1" for r in names), names
    finally:
        watch.stop()
        for c in conns:
            await c.close()
    snap = _pool(proxy)
    assert snap.checkouts >= 20 * 50 * 3
    assert snap.servers_opened <= 5 and snap.pinned == 0


async def test_asyncpg_transactions_commit_and_rollback(proxy, direct, pg_server, items) -> None:
    watch = ServerWatch(direct, proxy, pg_server.database).start()
    d = _d(direct)
    conns = [await asyncpg.connect(**_asyncpg_kwargs(proxy)) for _ in range(12)]

    async def work(w: int, conn: asyncpg.Connection) -> None:
        for i in range(10):
            base = w * 1000 + i * 10
            async with conn.transaction():
                pid = await conn.fetchval("select pg_backend_pid()")
                await conn.execute(f"insert into {items} values ($1, $2, 'kept')", base, w)
                # Not visible outside before the commit.
                assert await asyncio.to_thread(_one, d, f"select count(*) from {items} where id = {base}") == 0
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with conn.transaction():  # a savepoint, rolled back by the error
                        await conn.execute(f"insert into {items} values ($1, $2, 'savepoint')", base + 1, w)
                        await conn.execute(f"insert into {items} values ($1, $2, 'dup')", base, w)
                assert await conn.fetchval("select pg_backend_pid()") == pid  # one backend per transaction
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute(f"insert into {items} values ($1, $2, 'rolled back')", base + 2, w)
                    raise ZeroDivisionError
            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():
                    await conn.execute(f"insert into {items} values ($1, $2, 'failed')", base + 3, w)
                    await conn.fetchval("select 1 / $1::int", 0)
            assert not conn.is_in_transaction()

    try:
        await asyncio.gather(*(work(w, c) for w, c in enumerate(conns)))
        watch.stop()
        watch.check(limit=5, min_clients=12)
    finally:
        watch.stop()
        for c in conns:
            await c.close()
    rows = d.execute(f"select id, worker, v from {items} order by id").fetchall()
    assert rows == [(w * 1000 + i * 10, w, "kept") for w in range(12) for i in range(10)]
    assert _pool(proxy).active == 0


async def test_asyncpg_executemany(proxy, direct, pg_server, items) -> None:
    watch = ServerWatch(direct, proxy, pg_server.database).start()
    d = _d(direct)
    conns = [await asyncpg.connect(**_asyncpg_kwargs(proxy)) for _ in range(10)]

    async def work(w: int, conn: asyncpg.Connection) -> None:
        await conn.executemany(f"insert into {items} (id, worker, v) values ($1, $2, $3)",
                               [(w * 1000 + i, w, f"m{i}") for i in range(200)])
        # executemany is atomic: one duplicate and none of the batch goes in.
        with pytest.raises(asyncpg.UniqueViolationError) as caught:
            await conn.executemany(f"insert into {items} (id, worker, v) values ($1, $2, $3)",
                                   [(w * 1000 + 500 + i, w, "x") for i in range(50)] + [(w * 1000, w, "dup")])
        assert caught.value.sqlstate == "23505"
        assert await conn.fetchval(f"select count(*) from {items} where worker = $1", w) == 200

    try:
        await asyncio.gather(*(work(w, c) for w, c in enumerate(conns)))
        watch.stop()
        watch.check(limit=5, min_clients=10)
    finally:
        watch.stop()
        for c in conns:
            await c.close()
    assert d.execute(f"select count(*), count(distinct worker), max(id) from {items}").fetchone() == (
        2000, 10, 9199)


async def test_asyncpg_copy(small_proxy, direct, pg_server, items) -> None:
    watch = ServerWatch(direct, small_proxy, pg_server.database).start()
    d = _d(direct)
    conns = [await asyncpg.connect(**_asyncpg_kwargs(small_proxy)) for _ in range(8)]

    async def work(w: int, conn: asyncpg.Connection) -> None:
        records = [(w * 10000 + i, w, f"rec {i}") for i in range(1000)]
        assert await conn.copy_records_to_table(items, records=records, columns=["id", "worker", "v"]) == "COPY 1000"
        csv = "".join(f"{w * 10000 + 5000 + i},{w},csv {i}\n" for i in range(500)).encode()
        assert await conn.copy_to_table(items, source=io.BytesIO(csv), columns=["id", "worker", "v"],
                                        format="csv") == "COPY 500"
        out = io.BytesIO()
        assert await conn.copy_from_query(f"select id, v from {items} where worker = $1 order by id", w,
                                          output=out, format="csv") == "COPY 1500"
        lines = out.getvalue().decode().splitlines()
        assert lines[0] == f"{w * 10000},rec 0" and lines[-1] == f"{w * 10000 + 5499},csv 499"
        assert len(lines) == 1500
        table_out = io.BytesIO()
        assert (await conn.copy_from_table(items, output=table_out, columns=["id"])).startswith("COPY ")

        async def broken_source():  # type: ignore[no-untyped-def]
            for i in range(3000):
                if i == 2000:
                    raise RuntimeError("source broke")
                yield (w * 10000 + 6000 + i, w, "never")

        with pytest.raises(RuntimeError, match="source broke"):  # asyncpg sends CopyFail
            await conn.copy_records_to_table(items, records=broken_source(), columns=["id", "worker", "v"])
        assert not conn.is_in_transaction()
        assert await conn.fetchval(f"select count(*) from {items} where worker = $1", w) == 1500

    try:
        await asyncio.gather(*(work(w, c) for w, c in enumerate(conns)))
        watch.stop()
        watch.check(limit=3, min_clients=8)
    finally:
        watch.stop()
        for c in conns:
            await c.close()
    assert d.execute(f"select count(*), count(distinct worker) from {items}").fetchone() == (12000, 8)
    assert _pool(small_proxy).active == 0


async def test_asyncpg_query_timeout_cancels_the_query(small_proxy, direct) -> None:
    d = _d(direct)
    conns = [await asyncpg.connect(**_asyncpg_kwargs(small_proxy)) for _ in range(6)]
    marker = f"timeout_{uuid.uuid4().hex[:8]}"
    try:
        async def busy(conn: asyncpg.Connection) -> int:  # other clients keep the pool busy meanwhile
            return sum([await conn.fetchval("select $1::int", i) for i in range(100)])

        others = asyncio.gather(*(busy(c) for c in conns[1:]))
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conns[0].fetch(f"select pg_sleep(10) /* {marker} */", timeout=0.5)
        assert time.monotonic() - start < 8, "the timeout did not interrupt pg_sleep(10)"
        # The query really was cancelled on its backend, not left to run out its 10 s.
        await asyncio.to_thread(wait_until, lambda: not running(d, marker), 5.0, 0.05, "pg_sleep to stop")
        assert await others == [sum(range(100))] * 5
        assert await conns[0].fetchval("select 'usable'") == "usable"
        assert not conns[0].is_in_transaction()
    finally:
        for c in conns:
            await c.close()
    assert _pool(small_proxy).active == 0


async def test_asyncpg_timeout_while_queued_for_a_server_cancels_the_query(proxy_factory, direct) -> None:
    """A client's timeout fires while its query still waits for a server connection (all busy):
    PostgreSQL would have cancelled it; the query must not run later, for nobody."""
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=30.0)
    d = _d(direct)
    marker = f"queued_{uuid.uuid4().hex[:8]}"
    holder = await asyncpg.connect(**_asyncpg_kwargs(proxy))
    waiter = await asyncpg.connect(**_asyncpg_kwargs(proxy))
    try:
        sleep = f"select pg_sleep($1) /* {marker} */"
        assert await waiter.fetch(sleep, 0) == [(None,)]  # prepared and cached: next time only Bind/Execute
        tx = holder.transaction()
        await tx.start()
        await holder.fetchval("select 1")  # the only server connection is now in holder's transaction
        accepted = proxy.snapshot().clients.accepted
        queued = asyncio.ensure_future(waiter.fetch(sleep, 10, timeout=2.0))
        await asyncio.to_thread(wait_until, lambda: _pool(proxy).waiting == 1, 5.0, 0.01, "the query to queue")
        with pytest.raises(asyncio.TimeoutError):
            await queued
        # asyncpg sends its CancelRequest on a new connection, in the background: let the proxy
        # receive and finish it while the query is still queued.
        await asyncio.to_thread(
            wait_until,
            lambda: proxy.snapshot().clients.accepted == accepted + 1
            and not proxy.run(lambda: len(proxy.server.pending_sessions)),
            5.0, 0.02, "the proxy to handle asyncpg's CancelRequest")
        # It was queued (nothing else could have answered it) and the cancel took it out of
        # the queue: answered with 57014 at once, as PostgreSQL cancels a statement.
        assert _pool(proxy).waiting == 0
        assert proxy.snapshot().pools[0].checkout_timeouts == 0
        await tx.commit()  # a server connection is free again
        # Nothing may now start the abandoned pg_sleep(10).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert not running(d, marker), "the timed-out query ran after all"
            await asyncio.sleep(0.05)
        assert await waiter.fetchval("select 'usable'") == "usable"
        assert await holder.fetchval("select 'usable'") == "usable"
    finally:
        await _close_quickly(holder, waiter)


async def test_asyncpg_statement_cache_survives_a_schema_change(small_proxy, direct, items) -> None:
    """asyncpg re-prepares a cached statement whose result type changed (ALTER TABLE) and
    retries, invisibly to the application; it must do so through the proxy too."""
    d = _d(direct)
    d.execute(f"insert into {items} values (1, 0, 'a')")
    conns = [await asyncpg.connect(**_asyncpg_kwargs(small_proxy)) for _ in range(6)]
    query = f"select * from {items} where id = $1"
    try:
        for conn in conns:
            assert [tuple(r) for r in await conn.fetch(query, 1)] == [(1, 0, "a")]
        d.execute(f"alter table {items} add column extra int not null default 7")
        for conn in conns:
            rows = await conn.fetch(query, 1)
            assert [dict(r) for r in rows] == [{"id": 1, "worker": 0, "v": "a", "extra": 7}]
        for conn in conns:  # and it stays fixed
            assert [tuple(r) for r in await conn.fetch(query, 1)] == [(1, 0, "a", 7)]
    finally:
        for conn in conns:
            await conn.close()


async def test_asyncpg_prepared_statement_migrates_between_servers(small_proxy) -> None:
    conn = await asyncpg.connect(**_asyncpg_kwargs(small_proxy))
    blockers = [await asyncpg.connect(**_asyncpg_kwargs(small_proxy)) for _ in range(2)]
    try:
        stmt = await conn.prepare("select $1::int * 2 as doubled, pg_backend_pid() as pid")
        assert stmt.get_name().startswith("__asyncpg_stmt_")
        seen = []
        held: list[int] = []
        txs = []
        for blocker in [*blockers, None]:
            doubled, pid = await stmt.fetchrow(len(seen) + 20)
            assert doubled == 2 * (len(seen) + 20)
            assert pid not in held  # a held backend cannot run it
            seen.append(pid)
            if blocker is not None:  # hold the backend just used, in an open transaction
                tx = blocker.transaction()
                await tx.start()
                txs.append(tx)
                held.append(await blocker.fetchval("select pg_backend_pid()"))
        assert len(set(seen)) == 3, seen  # the statement ran on all three backends
        for tx in txs:
            await tx.commit()

        others = [await asyncpg.connect(**_asyncpg_kwargs(small_proxy)) for _ in range(6)]

        async def churn(c: asyncpg.Connection) -> None:
            for i in range(40):
                async with c.transaction():
                    assert await c.fetchval("select $1::int + 1", i) == i + 1

        churning = asyncio.gather(*(churn(c) for c in others))
        pids = set()
        for i in range(60):
            async with conn.transaction():
                doubled, pid = await stmt.fetchrow(i)
                assert doubled == 2 * i
                assert await stmt.fetchval(i + 1) == 2 * (i + 1)
                pids.add(pid)
        await churning
        for c in others:
            await c.close()
        assert pids <= set(seen)
        assert stmt.get_query() == "select $1::int * 2 as doubled, pg_backend_pid() as pid"
    finally:
        await conn.close()
        for b in blockers:
            await b.close()
    snap = _pool(small_proxy)
    assert (snap.servers_opened, snap.active, snap.pinned) == (3, 0, 0)


async def test_asyncpg_create_pool(small_proxy, direct, pg_server, items) -> None:
    watch = ServerWatch(direct, small_proxy, pg_server.database).start()
    d = _d(direct)
    pool = await asyncpg.create_pool(**_asyncpg_kwargs(small_proxy), min_size=10, max_size=15)
    try:
        async def task(i: int) -> None:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute(f"insert into {items} values ($1, $2, $3)", i, i % 15, f"p{i}")
                    assert await conn.fetchval(f"select v from {items} where id = $1", i) == f"p{i}"
            assert await pool.fetchval("select $1::text || '-' || $2::int", "n", i) == f"n-{i}"

        await asyncio.gather(*(task(i) for i in range(150)))
        watch.stop()
        watch.check(limit=3, min_clients=10)
        assert pool.get_size() >= 10
        assert await pool.fetchval(f"select count(*) from {items}") == 150
    finally:
        watch.stop()
        await asyncio.wait_for(pool.close(), 10)
    assert _one(d, f"select sum(id) from {items}") == sum(range(150))
    snap = _pool(small_proxy)
    assert (snap.active, snap.pinned) == (0, 0)


async def test_asyncpg_listen_pins_and_receives_notify(small_proxy, direct, pg_server) -> None:
    watch = ServerWatch(direct, small_proxy, pg_server.database).start()
    listener = await asyncpg.connect(**_asyncpg_kwargs(small_proxy))
    notifier = await asyncpg.connect(**_asyncpg_kwargs(small_proxy))
    others = [await asyncpg.connect(**_asyncpg_kwargs(small_proxy)) for _ in range(8)]
    received: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
    try:
        assert _pool(small_proxy).pinned == 0
        await listener.add_listener("pgsc_jobs", lambda _c, pid, ch, payload: received.put_nowait((ch, payload, pid)))
        snap = _pool(small_proxy)
        assert (snap.pinned, snap.pin_reasons.get("listen")) == (1, 1)
        assert small_proxy.snapshot().clients.pinned == 1
        listener_pid = await listener.fetchval("select pg_backend_pid()")

        async def chatter(c: asyncpg.Connection) -> None:
            for i in range(30):
                assert await c.fetchval("select $1::int", i) == i
                assert await c.fetchval("select pg_backend_pid()") != listener_pid  # pinned: not shared

        chatting = asyncio.gather(*(chatter(c) for c in others))
        for i in range(5):
            await notifier.execute(f"notify pgsc_jobs, 'job {i}'")
        async with notifier.transaction():  # delivered at commit
            await notifier.execute("select pg_notify('pgsc_jobs', 'in a transaction')")
        await chatting
        watch.stop()
        watch.check(limit=3, min_clients=10)
        got = [await asyncio.wait_for(received.get(), 5) for _ in range(6)]
        assert [(ch, payload) for ch, payload, _ in got] == [
            *(("pgsc_jobs", f"job {i}") for i in range(5)), ("pgsc_jobs", "in a transaction")]
        assert await listener.fetchval("select string_agg(c, ',') from pg_listening_channels() c") == "pgsc_jobs"
        assert await listener.fetchval("select pg_backend_pid()") == listener_pid
    finally:
        watch.stop()
        await listener.close()
        await notifier.close()
        for c in others:
            await c.close()
    wait_until(lambda: _pool(small_proxy).pinned == 0, timeout=5, message="the pin to be dropped")
    assert _pool(small_proxy).pin_reasons == {"listen": 1}


# ============================================================================= psycopg 3


def test_psycopg_prepare_threshold_zero_and_default(proxy, direct, pg_server, items) -> None:
    d = _d(direct)
    d.execute(f"insert into {items} select g, 0, 'v' || g from generate_series(1, 50) g")

    def prepared_here(conn: psycopg.Connection[Any], text: str) -> list[str]:
        """Names under which ``text`` is prepared on the backend running this transaction."""
        return [r[0] for r in conn.execute(
            "select name from pg_prepared_statements where statement = %s and not from_sql", (text,),
            prepare=False).fetchall()]

    def work(t: int) -> None:
        query = f"select v, %s::int as t from {items} where id = %s /* thread {t} */"
        server_text = f"select v, $1::int as t from {items} where id = $2 /* thread {t} */"
        # prepare_threshold=0: prepared on first execution
        with psycopg.connect(**proxy.kwargs(), prepare_threshold=0) as conn:
            for i in range(30):
                with conn.transaction():
                    n = i % 50 + 1
                    assert conn.execute(query, (t, n)).fetchone() == (f"v{n}", t)
                    names = prepared_here(conn, server_text)
                    assert len(names) == 1 and names[0].startswith("pgsc_"), names
                if i % 10 == 9:  # a rollback: psycopg drops its cache and sends DEALLOCATE ALL
                    with conn.transaction(force_rollback=True):
                        conn.execute(f"update {items} set v = 'x' where id = %s", (n,))
            assert conn.execute(query, (t, 7)).fetchone() == ("v7", t)
        # default threshold (5): not prepared before, prepared after
        query = query.replace("/* thread", "/* default, thread")
        server_text = server_text.replace("/* thread", "/* default, thread")
        with psycopg.connect(**proxy.kwargs()) as conn:
            for i in range(8):
                with conn.transaction():
                    assert conn.execute(query, (t, i + 1)).fetchone() == (f"v{i + 1}", t)
                    names = prepared_here(conn, server_text)
                    if i < 4:
                        assert names == [], (i, names)
                    elif i >= 5:
                        assert len(names) == 1 and names[0].startswith("pgsc_"), (i, names)

    with ServerWatch(direct, proxy, pg_server.database) as watch:
        _threads(10, work)
    watch.check(limit=5, min_clients=10)
    assert _one(d, f"select count(*) from {items} where v = 'v' || id") == 50
    assert _pool(proxy).pinned == 0


def test_psycopg_pipeline_with_an_error_recovers(proxy, direct, pg_server, items) -> None:
    d = _d(direct)
    together = threading.Barrier(10)  # all connected at once: more clients than server connections

    def work(t: int) -> None:
        with psycopg.connect(**proxy.kwargs(), autocommit=True, prepare_threshold=0) as conn:
            together.wait(30)
            for r in range(5):
                base = t * 1000 + r * 10
                with conn.pipeline() as p:
                    c1 = conn.execute(f"insert into {items} values (%s, %s, 'ok')", (base, t))
                    c2 = conn.execute("select %s::int * 3", (base,))
                    c3 = conn.execute(f"select count(*) from {items} where worker = %s", (t,))
                    p.sync()
                    c4 = None
                    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
                        with conn.pipeline():
                            conn.execute(f"insert into {items} values (%s, %s, 'aborted')", (base + 1, t))
                            conn.execute(f"insert into {items} values (%s, %s, 'dup')", (base, t))
                            # psycopg may already raise here, when the error has arrived by then
                            c4 = conn.execute("select %s::int * 3", (base,))
                            conn.execute(f"insert into {items} values (%s, %s, 'skipped')", (base + 2, t))
                    assert caught.value.sqlstate == "23505"
                    if c4 is not None:
                        with pytest.raises(psycopg.ProgrammingError):
                            c4.fetchone()  # aborted by the error before it
                    c5 = conn.execute("select %s::int * 3", (base,))
                    c6 = conn.execute(f"select count(*) from {items} where worker = %s", (t,))
                assert c1.statusmessage == "INSERT 0 1"
                assert c2.fetchone() == (base * 3,)
                assert c3.fetchone() == (r + 1,)
                assert c5.fetchone() == (base * 3,)
                assert c6.fetchone() == (r + 1,)
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                assert _one(conn, "select 'recovered'") == "recovered"

    with ServerWatch(direct, proxy, pg_server.database) as watch:
        _threads(10, work)
    watch.check(limit=5, min_clients=10)
    rows = d.execute(f"select v, count(*) from {items} group by v").fetchall()
    assert rows == [("ok", 50)]
    assert _pool(proxy).active == 0


def test_psycopg_server_side_cursor_in_a_transaction(proxy, direct, pg_server) -> None:
    together = threading.Barrier(10)  # all connected at once: more clients than server connections

    def work(t: int) -> tuple[int, int]:
        with psycopg.connect(**proxy.kwargs()) as conn:
            together.wait(30)
            with conn.transaction():
                pid = _one(conn, "select pg_backend_pid()")
                with conn.cursor(name=f"big_{t}") as cur:
                    cur.itersize = 100
                    cur.execute("select g, pg_backend_pid() from generate_series(1, %s) g", (2000 + t,))
                    total = 0
                    count = 0
                    for g, backend in cur:
                        assert backend == pid
                        total += g
                        count += 1
                    cur.scroll(0, mode="absolute")
                    assert cur.fetchmany(3) == [(1, pid), (2, pid), (3, pid)]
            return count, total

    with ServerWatch(direct, proxy, pg_server.database) as watch:
        results = _threads(10, work)
    watch.check(limit=5, min_clients=10)
    assert results == [(2000 + t, (2000 + t) * (2001 + t) // 2) for t in range(10)]
    snap = _pool(proxy)
    assert (snap.pinned, snap.pin_reasons, snap.active) == (0, {}, 0)


def test_psycopg_cancel_from_another_thread(proxy_process, direct) -> None:
    d = _d(direct)
    marker = f"pg3cancel_{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(**proxy_process.kwargs(), autocommit=True)
    others = [psycopg.connect(**proxy_process.kwargs(), autocommit=True) for _ in range(5)]
    sleeping = _Background(conn.execute, f"select pg_sleep(10) /* {marker} */")
    busy = [_Background(lambda c: [_one(c, "select %s::int", (i,)) for i in range(50)], c) for c in others]
    (backend,) = wait_until(lambda: running(d, marker), timeout=5, message="pg_sleep to start")
    assert backend != conn.info.backend_pid  # the client sees the proxy's key, not the backend's
    conn.cancel()
    with pytest.raises(psycopg.errors.QueryCanceled) as caught:
        sleeping.result(timeout=8)
    assert [b.result(timeout=30) for b in busy] == [list(range(50))] * 5
    assert caught.value.sqlstate == "57014"
    assert not running(d, marker)
    assert _one(conn, "select 'still here'") == "still here"
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    for c in [conn, *others]:
        c.close()
    assert proxy_process.pool()["active"] == 0


def test_psycopg_copy(small_proxy, direct, pg_server, items) -> None:
    d = _d(direct)

    def work(t: int) -> tuple[int, list[tuple[Any, ...]], bytes]:
        with psycopg.connect(**small_proxy.kwargs()) as conn:
            with conn.cursor() as cur:
                with cur.copy(f"copy {items} (id, worker, v) from stdin") as copy:
                    for i in range(1000):
                        copy.write_row((t * 10000 + i, t, f"tab\there {i}"))
                with cur.copy(f"copy {items} (id, worker, v) from stdin (format binary)") as copy:
                    copy.set_types(["int4", "int4", "text"])
                    for i in range(1000, 1500):
                        copy.write_row((t * 10000 + i, t, None))
                conn.commit()
                with pytest.raises(ValueError, match="app error"):  # psycopg sends CopyFail
                    with cur.copy(f"copy {items} (id, worker, v) from stdin") as copy:
                        for i in range(2000, 4000):
                            copy.write_row((t * 10000 + i, t, "never"))
                        raise ValueError("app error")
                conn.rollback()
                with cur.copy(f"copy (select id, v from {items} where worker = {t} order by id limit 3) to stdout") as copy:
                    rows = list(copy.rows())
                with cur.copy(f"copy (select count(*) from {items} where worker = {t}) to stdout (format csv)") as copy:
                    raw = b"".join(bytes(b) for b in copy)
                count = _one(cur, f"select count(*) from {items} where worker = %s", (t,))
            conn.commit()
            return count, rows, raw

    with ServerWatch(direct, small_proxy, pg_server.database) as watch:
        results = _threads(6, work)
    watch.check(limit=3, min_clients=6)
    for t, (count, rows, raw) in enumerate(results):
        assert count == 1500
        assert rows == [(str(t * 10000 + i), f"tab\there {i}") for i in range(3)]
        assert raw == b"1500\n"
    assert d.execute(f"select count(*), count(v) from {items}").fetchone() == (9000, 6000)
    assert _pool(small_proxy).active == 0


# ----------------------------------------------------------------------------- libpq pipeline mode
# psycopg's ``pq`` layer is libpq itself: the pipeline API every libpq-based client uses (psycopg's
# own pipeline, pgbench's \\startpipeline, C applications). A typical pattern: send, flush, look at
# the results so far, then Sync and go on sending without waiting for the Sync's answer.


def _pipeline_results(pg: Any, syncs: int, timeout: float = 10.0) -> list[Any]:
    """Results until ``syncs`` PIPELINE_SYNCs: ("SYNC"), (status name, sqlstate, first value)."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while syncs and time.monotonic() < deadline:
        pg.consume_input()
        if pg.is_busy():
            time.sleep(0.005)
            continue
        res = pg.get_result()
        if res is None:
            continue
        status = psycopg.pq.ExecStatus(res.status).name
        if status == "PIPELINE_SYNC":
            syncs -= 1
            out.append("SYNC")
            continue
        sqlstate = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
        value = res.get_value(0, 0) if status == "TUPLES_OK" else None
        out.append((status, sqlstate.decode() if sqlstate else None, value))
    assert not syncs, f"pipeline results incomplete: {out}"
    return out


def _fail_then_sync(pg: Any) -> None:
    """Pipeline: a failing query and a Flush; wait until its error has arrived (no Sync sent yet)."""
    pg.enter_pipeline_mode()
    pg.send_query_params(b"select 1 / $1::int", [b"0"])
    pg.send_flush_request()
    pg.flush()
    deadline = time.monotonic() + 10
    while True:
        pg.consume_input()
        if not pg.is_busy():
            break
        assert time.monotonic() < deadline, "no error from the failing query"
        time.sleep(0.005)
    res = pg.get_result()
    assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"22012"
    assert pg.get_result() is None
    pg.pipeline_sync()  # not waited for: the next batch follows at once


def test_libpq_pipeline_parse_after_an_error_and_sync(proxy_factory) -> None:
    """After a failed pipeline segment and its Sync, a named Parse whose text another client
    already prepared on the same server connection must succeed (PostgreSQL: a new name)."""
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=10.0)
    other = psycopg.connect(**proxy.kwargs(), autocommit=True)
    # The same statement (text and parameter types), prepared by another client on the only backend.
    assert other.pgconn.prepare(b"o", b"select $1::int * 10", [23]).status == psycopg.pq.ExecStatus.COMMAND_OK
    conn = psycopg.connect(**proxy.kwargs(), autocommit=True)
    pg = conn.pgconn
    try:
        _fail_then_sync(pg)
        pg.send_prepare(b"s1", b"select $1::int * 10", [23])
        pg.send_query_prepared(b"s1", [b"4"])
        pg.pipeline_sync()
        pg.flush()
        assert _pipeline_results(pg, 2) == [
            "SYNC", ("COMMAND_OK", None, None), ("TUPLES_OK", None, b"40"), "SYNC"]
        pg.exit_pipeline_mode()
        assert _one(conn, "select 'usable'") == "usable"
    finally:
        conn.close()
        other.close()


def test_libpq_pipeline_bind_after_an_error_and_sync(proxy_factory) -> None:
    """After a failed pipeline segment and its Sync, a Bind to the client's own prepared
    statement must run even when that server connection has to prepare it again (here another
    client's psycopg rollback sent DEALLOCATE ALL on the shared backend)."""
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=10.0)
    conn = psycopg.connect(**proxy.kwargs(), autocommit=True)
    pg = conn.pgconn
    assert pg.prepare(b"x", b"select $1::int * 10", [23]).status == psycopg.pq.ExecStatus.COMMAND_OK
    other = psycopg.connect(**proxy.kwargs(), prepare_threshold=0)
    with other.transaction(force_rollback=True):  # psycopg: ROLLBACK, then DEALLOCATE ALL
        assert _one(other, "select %s::int + 1", (1,)) == 2
    try:
        _fail_then_sync(pg)
        pg.send_query_prepared(b"x", [b"5"])
        pg.pipeline_sync()
        pg.flush()
        assert _pipeline_results(pg, 2) == ["SYNC", ("TUPLES_OK", None, b"50"), "SYNC"]
        pg.exit_pipeline_mode()
        assert _one(conn, "select 'usable'") == "usable"
    finally:
        conn.close()
        other.close()


# ============================================================================= psycopg2


def _pg2(proxy: Any, **kw: Any) -> Any:
    return psycopg2.connect(**proxy.kwargs(**kw), connect_timeout=10)


def test_psycopg2_queries_transactions_cursors_executemany(small_proxy, direct, pg_server, items) -> None:
    d = _d(direct)

    def work(t: int) -> None:
        conn = _pg2(small_proxy)
        try:
            cur = conn.cursor()
            cur.execute("select %s + %s, %s::text, %s", (t, 1, "o'quote", None))
            assert cur.fetchone() == (t + 1, "o'quote", None)
            cur.executemany(f"insert into {items} (id, worker, v) values (%s, %s, %s)",
                            [(t * 1000 + i, t, f"e{i}") for i in range(100)])
            conn.rollback()  # the whole implicit transaction goes
            cur.execute(f"select count(*) from {items} where worker = %s", (t,))
            assert cur.fetchone() == (0,)
            conn.rollback()
            cur.executemany(f"insert into {items} (id, worker, v) values (%s, %s, %s)",
                            [(t * 1000 + i, t, f"e{i}") for i in range(100)])
            conn.commit()
            named = conn.cursor(name=f"srv_{t}")
            named.itersize = 17
            named.execute(f"select id, v from {items} where worker = %s order by id", (t,))
            fetched = list(named)
            assert fetched == [(t * 1000 + i, f"e{i}") for i in range(100)]
            named.close()
            conn.commit()
            with conn:  # commits
                with conn.cursor() as c2:
                    c2.execute(f"update {items} set v = 'updated' where id = %s", (t * 1000,))
                    assert c2.rowcount == 1
        finally:
            conn.close()

    with ServerWatch(direct, small_proxy, pg_server.database) as watch:
        _threads(10, work)
    watch.check(limit=3, min_clients=10)
    assert d.execute(f"select count(*), count(*) filter (where v = 'updated') from {items}").fetchone() == (1000, 10)
    snap = _pool(small_proxy)
    assert (snap.pinned, snap.active) == (0, 0)


@pytest.mark.parametrize(
    ("sql", "pgcode", "exc"),
    [
        ("select 1/0", "22012", psycopg2.errors.DivisionByZero),
        ("select * from no_such_table", "42P01", psycopg2.errors.UndefinedTable),
        ("selec 1", "42601", psycopg2.errors.SyntaxError),
        ("insert into {items} values (1, 0, 'dup')", "23505", psycopg2.errors.UniqueViolation),
        ("select 'x'::int", "22P02", psycopg2.errors.InvalidTextRepresentation),
    ],
    ids=["division_by_zero", "undefined_table", "syntax_error", "unique_violation", "invalid_text"],
)
def test_psycopg2_errors_carry_the_right_pgcode(small_proxy, direct, items, sql, pgcode, exc) -> None:
    _d(direct).execute(f"insert into {items} values (1, 0, 'first')")
    conns = [_pg2(small_proxy) for _ in range(6)]
    try:
        for conn in conns:
            cur = conn.cursor()
            cur.execute("select 1")
            with pytest.raises(exc) as caught:
                cur.execute(sql.format(items=items))
            assert caught.value.pgcode == pgcode
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
            with pytest.raises(psycopg2.errors.InFailedSqlTransaction) as aborted:
                cur.execute("select 2")
            assert aborted.value.pgcode == "25P02"
            conn.rollback()
            cur.execute("select 3")
            assert cur.fetchone() == (3,)
            conn.commit()
        # autocommit: the error ends the statement and nothing more
        conn = conns[0]
        conn.autocommit = True
        cur = conn.cursor()
        with pytest.raises(exc):
            cur.execute(sql.format(items=items))
        cur.execute("select 4")
        assert cur.fetchone() == (4,)
    finally:
        for conn in conns:
            conn.close()
    assert _pool(small_proxy).active == 0


def test_psycopg2_cancel(proxy_process, direct) -> None:
    d = _d(direct)
    marker = f"pg2cancel_{uuid.uuid4().hex[:8]}"
    conn = _pg2(proxy_process)
    conn.autocommit = True
    others = [_pg2(proxy_process) for _ in range(5)]

    def busy(c: Any) -> int:
        cur = c.cursor()
        total = 0
        for i in range(50):
            cur.execute("select %s", (i,))
            total += cur.fetchone()[0]
            c.commit()
        return total

    sleeping = _Background(lambda: conn.cursor().execute(f"select pg_sleep(10) /* {marker} */"))
    busy_jobs = [_Background(busy, c) for c in others]
    wait_until(lambda: running(d, marker), timeout=5, message="pg_sleep to start")
    conn.cancel()
    with pytest.raises(psycopg2.extensions.QueryCanceledError) as caught:
        sleeping.result(timeout=8)
    assert [j.result(timeout=30) for j in busy_jobs] == [sum(range(50))] * 5
    assert caught.value.pgcode == "57014"
    assert not running(d, marker)
    cur = conn.cursor()
    cur.execute("select 'still here'")
    assert cur.fetchone() == ("still here",)
    for c in [conn, *others]:
        c.close()
    assert proxy_process.pool()["active"] == 0


# ============================================================================= SQLAlchemy


def _sa_url(proxy: Any, driver: str) -> sa.URL:
    kw = proxy.kwargs()
    return sa.URL.create(driver, username=kw["user"], password=kw.get("password"), host="127.0.0.1",
                         port=proxy.port, database=kw["dbname"])


@pytest.mark.parametrize("driver", ["postgresql+psycopg2", "postgresql+psycopg"])
def test_sqlalchemy_core_round_trip(small_proxy, direct, pg_server, driver) -> None:
    watch = ServerWatch(direct, small_proxy, pg_server.database).start()
    d = _d(direct)
    engine = sa.create_engine(_sa_url(small_proxy, driver), pool_size=12, max_overflow=4, pool_pre_ping=True)
    metadata = sa.MetaData()
    table = sa.Table(
        f"sa_{uuid.uuid4().hex[:10]}", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("worker", sa.Integer, nullable=False),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("score", sa.Numeric(10, 2)),
    )
    try:
        metadata.create_all(engine)
        assert _one(d, "select count(*) from pg_class where relname = %s", (table.name,)) == 1

        def work(t: int) -> None:
            for i in range(20):
                with engine.begin() as conn:
                    conn.execute(table.insert(), [{"id": t * 100 + i, "worker": t, "name": f"n{i}", "score": i / 4}])
                with engine.connect() as conn:
                    row = conn.execute(sa.select(table.c.name, table.c.score).where(table.c.id == t * 100 + i)).one()
                    assert (row.name, float(row.score)) == (f"n{i}", i / 4)
            with pytest.raises(sa.exc.IntegrityError):
                with engine.begin() as conn:
                    conn.execute(table.insert(), [{"id": t * 100 + 50, "worker": t, "name": "gone"}])
                    conn.execute(table.insert(), [{"id": t * 100, "worker": t, "name": "dup"}])
            with engine.connect() as conn:
                total = conn.execute(
                    sa.select(sa.func.count(), sa.func.sum(table.c.score)).where(table.c.worker == sa.bindparam("w")),
                    {"w": t}).one()
                assert (total[0], float(total[1])) == (20, sum(range(20)) / 4)
                conn.execute(table.update().where(table.c.worker == t).values(name=table.c.name + "!"))
                conn.commit()

        _threads(12, work)
        watch.stop()
        watch.check(limit=3, min_clients=12)
        assert engine.pool.size() == 12
        assert d.execute(
            f"select count(*), count(*) filter (where name like '%%!'), count(*) filter (where id % 100 = 50) "
            f"from {table.name}").fetchone() == (240, 240, 0)
    finally:
        watch.stop()
        metadata.drop_all(engine)
        engine.dispose()
    assert _one(d, "select count(*) from pg_class where relname = %s", (table.name,)) == 0
    assert _pool(small_proxy).pinned == 0


async def test_sqlalchemy_asyncpg(small_proxy, direct, pg_server) -> None:
    watch = ServerWatch(direct, small_proxy, pg_server.database).start()
    d = _d(direct)
    engine = create_async_engine(_sa_url(small_proxy, "postgresql+asyncpg"), pool_size=15, max_overflow=5)
    metadata = sa.MetaData()
    table = sa.Table(
        f"saa_{uuid.uuid4().hex[:10]}", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("worker", sa.Integer, nullable=False),
        sa.Column("doc", sa.JSON),
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

        async def work(t: int) -> None:
            for i in range(15):
                async with engine.begin() as conn:
                    await conn.execute(table.insert().values(id=t * 100 + i, worker=t, doc={"i": i, "t": [t]}))
                async with engine.connect() as conn:
                    doc = (await conn.execute(sa.select(table.c.doc).where(table.c.id == t * 100 + i))).scalar_one()
                    assert doc == {"i": i, "t": [t]}
            with pytest.raises(sa.exc.IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(table.insert().values(id=t * 100 + 50, worker=t))
                    await conn.execute(table.insert().values(id=t * 100, worker=t))
            async with engine.connect() as conn:
                assert (await conn.execute(
                    sa.select(sa.func.count()).where(table.c.worker == t))).scalar_one() == 15

        await asyncio.gather(*(work(t) for t in range(15)))
        watch.stop()
        watch.check(limit=3, min_clients=15)
        assert d.execute(f"select count(*), sum((doc->>'i')::int) from {table.name}").fetchone() == (
            225, 15 * sum(range(15)))
    finally:
        watch.stop()
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
        await engine.dispose()
    assert _pool(small_proxy).active == 0


# ============================================================================= pgbench


@pytest.fixture(scope="module")
def bench_db(pg_server) -> Iterator[str]:
    """A database of its own, initialised by ``pgbench -i -s 1`` directly against PostgreSQL."""
    name = f"pgsc_clients_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(**pg_server.psycopg_kwargs(dbname=pg_server.admin_database,
                                                        application_name=DIRECT_APP),
                            autocommit=True, connect_timeout=10)
    admin.execute(f'create database "{name}"')
    try:
        init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "--no-vacuum", name],
                              env=_pg_env(pg_server.host, pg_server.port, pg_server.user, pg_server.password),
                              capture_output=True, text=True, timeout=120, check=False)
        assert init.returncode == 0, init.stderr
        yield name
    finally:
        admin.execute(f'drop database if exists "{name}" with (force)')
        admin.close()


def _pg_env(host: str, port: int, user: str, password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=host, PGPORT=str(port), PGUSER=user, PGCONNECT_TIMEOUT="10")
    if password:
        env["PGPASSWORD"] = password
    return env


PIPELINE_SCRIPT = """\\set aid random(1, 100000)
\\startpipeline
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT count(*) FROM pgbench_branches;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\\endpipeline
"""


@pytest.mark.parametrize(
    "workload",
    [["-S", "-M", "simple"], ["-S", "-M", "extended"], ["-S", "-M", "prepared"], [],
     ["-M", "prepared", "-f", "{pipeline}"]],
    ids=["select-simple", "select-extended", "select-prepared", "tpcb", "select-prepared-pipeline"],
)
def test_pgbench_through_a_pool_of_five(proxy_factory, direct, pg_server, bench_db, tmp_path, workload) -> None:
    proxy = proxy_factory(pool__size=5, pool__max_overflow=0, pool__checkout_timeout=30.0)
    script = tmp_path / "pipeline.sql"
    script.write_text(PIPELINE_SCRIPT)
    workload = [arg.format(pipeline=script) for arg in workload]
    bench = direct(dbname=bench_db, application_name=DIRECT_APP)
    history_before = _one(bench, "select count(*) from pgbench_history")
    clients, per_client = 50, 20
    env = _pg_env("127.0.0.1", proxy.port, pg_server.user, pg_server.password)
    with ServerWatch(direct, proxy, bench_db) as watch:
        run = subprocess.run(
            ["pgbench", "-n", "-c", str(clients), "-j", "2", "-t", str(per_client), *workload, bench_db],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "aborted" not in output, output
    assert "number of failed transactions: 0 (0.000%)" in run.stdout, output
    total = clients * per_client
    assert f"number of transactions actually processed: {total}/{total}" in run.stdout, output
    watch.check(limit=5, min_clients=clients)
    history_after = _one(bench, "select count(*) from pgbench_history")
    # TPC-B inserts one history row per transaction; the select-only runs write nothing.
    assert history_after - history_before == (total if not workload else 0)
    snap = _pool(proxy, bench_db)
    assert snap.servers_opened <= 5
    assert (snap.active, snap.pinned) == (0, 0)
    assert snap.checkouts >= total
