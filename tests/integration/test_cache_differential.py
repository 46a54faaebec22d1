"""Differential test of the result cache (issue 4): random programs of reads and writes from several
clients, through a caching proxy and straight to the server, with PostgreSQL itself as the oracle.

The rule checked, from the issue: every read through the proxy returns what PostgreSQL would have
returned at that moment; a read after a committed write never sees the old value.

What a program is made of (Hypothesis draws up to 120 steps, about 30 on average, and shrinks
any failure):

- three proxy clients (psycopg 3, autocommit, ``prepare_threshold=None``), a fourth that pipelines
  (a raw socket sending several Queries before reading any answer) and one direct connection,
  over two tables carrying the invalidation trigger: ``acc`` (id, owner, balance) and
  ``own`` (id, name), keys 1-3, reset to the same rows before every program;
- reads through the proxy: by key, an aggregate, a left join with GROUP BY, a join by owner, and
  one that fails with 22012 when a balance is 0 (an error is never answered from the cache:
  asserted); each over the simple protocol (literals inline), the extended protocol ($n
  parameters) or a named prepared statement; repeats of earlier reads by any client, and probes
  that read again every statement the program has read so far;
- writes through the proxy: UPDATE, INSERT ... ON CONFLICT DO UPDATE and DELETE on either table,
  an UPDATE inside a data-modifying CTE, some schema-qualified, and a write followed by a read in
  one multi-statement Query;
- explicit transactions through the proxy: BEGIN/START TRANSACTION, writes, reads by the same
  client and by the others while it is open, SAVEPOINT/ROLLBACK TO/RELEASE, and every way to end
  one (COMMIT, END, COMMIT WORK, ROLLBACK, ABORT, ROLLBACK WORK, COMMIT/ROLLBACK AND CHAIN);
- pipelined batches of BEGIN, writes and ends of transactions;
- writes straight to the server, one or two statements in a transaction, that the proxy learns
  about only from the trigger's NOTIFY.

The oracle. A read by a client outside a transaction is compared with the same statement run on
the direct connection right after it (nothing runs in between: steps are sequential). A client
inside a transaction reads through its own server connection (reads in a transaction bypass the
cache: asserted, no hit may be counted during one), so it must see the committed rows plus its own
uncommitted writes: the direct connection computes that in a transaction it rolls back, on
temporary copies of the tables (same names: pg_temp comes first in the search path) to which it
replays the client's writes since BEGIN (less those undone by ROLLBACK TO). Steps that would wait
for a row lock another open transaction holds are skipped, so no step ever blocks; every write
touches one key, so the replay sees exactly what the client's statements saw.

The window the cache is allowed, made explicit. A write that bypasses the proxy reaches the cache
only when its notification arrives on the LISTEN connection, some time after the write committed;
until then the cache may serve the rows from before it (invalidation path 2). The test does not
race that window, it controls it: the monitor's notifications are held (``HeldNotifications``
stands in for the cache the monitor invalidates and queues them), and after each direct write the
direct connection sends a sentinel notification; PostgreSQL delivers notifications in commit
order, so once the sentinel is held every notification of the write is held too. Then they are all
released into the cache, and only then does the next step run: reads are always checked strictly.
Only the notifications of writes that bypass the proxy are held. A write through the proxy is
path 1: its cached reads are neither served nor stored from its first statement until the fence
after its commit (``InvalidationMonitor.commit_fenced``), and its own trigger's notification,
which names the rows it changed, does the eviction before that fence comes back; so a read right
after it must already be right, "immediately" as the issue asks.
The wait for the sentinel has a deadline only so that a lost notification fails instead of hanging;
nothing asserts how fast anything is.

And the cache must have done something: hits, stores and invalidations of both sources are
asserted after the run, so the test cannot pass by bypassing everything.

Two kinds of stale read it found (a ROLLBACK after a COMMIT AND CHAIN, and a ROLLBACK behind other
statements of a pipelined batch) are fixed; their shrunk programs stay as regression tests in
``test_once_stale_read``: see ``ONCE_STALE``.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg.pq import TransactionStatus

from proxy.invalidation import CHANNEL, FUNCTION_SQL, trigger_sql
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.wire import RawClient
from tests.helpers.wire import query as wire_query

# 500: about 20 s on 2 cores. A longer hunt by hand: PGSIDECAR_DIFFERENTIAL_EXAMPLES=3000 and
# pytest's --timeout raised (3,000 programs passed in 4.4 minutes at 3df477e).
MAX_EXAMPLES = int(os.environ.get("PGSIDECAR_DIFFERENTIAL_EXAMPLES", "500"))
N_CLIENTS = 3
KEYS = (1, 2, 3)  # 3 is in neither table until a program inserts it
SEED_ACC = "(1, 1, 2), (2, 1, 0)"  # (id, owner, balance)
SEED_OWN = "(1, 'a'), (2, 'b')"
SENTINEL = "~differential-sentinel-"  # payload prefix of the test's own notifications
PROBE_LIMIT = 8
SYNC_DEADLINE_S = 15.0  # a lost notification fails the test instead of hanging it
# No step waits for a lock by construction; should a broken proxy leave a transaction open behind
# a client's back, the direct connection's TRUNCATE and DROP fail instead of hanging.
LOCK_GUARD = "-c lock_timeout=10s"

# {acc} and {own} are the table names, %(name)s the values (inlined for the simple protocol).
READS = (
    "select id, owner, balance from {acc} where id = %(k)s",
    "select count(*), coalesce(sum(balance), 0) from {acc}",
    "select o.id, o.name, count(a.id), coalesce(sum(a.balance), 0) from {own} o"
    " left join {acc} a on a.owner = o.id group by o.id, o.name order by o.id",
    "select name from {own} where id = %(k)s",
    "select a.id, a.balance, o.name from {acc} a join {own} o on o.id = a.owner"
    " where a.owner = %(k)s order by a.id",
    "select id, 12 / balance from {acc} where id = %(k)s",  # 22012 division_by_zero when balance is 0
    # Column-level invalidation: UPDATEs that set only balance leave it cached, of owner evict it.
    "select id, owner from {acc} where owner <= %(k)s order by id",
)
FAILING_READ = 5  # not used after a write in one Query (an error would undo the write)
WRITES = (  # (table written, statement): each writes the row with id %(k)s and no other
    ("acc", "update {acc} set balance = balance + %(d)s where id = %(k)s"),
    ("acc", "insert into {acc} (id, owner, balance) values (%(k)s, %(o)s, %(b)s)"
            " on conflict (id) do update set owner = excluded.owner, balance = excluded.balance"),
    ("acc", "delete from {acc} where id = %(k)s"),
    ("acc", "with moved as (update {acc} set owner = %(o)s where id = %(k)s returning id)"
            " select count(*) from moved"),
    ("own", "update {own} set name = %(n)s where id = %(k)s"),
    ("own", "insert into {own} (id, name) values (%(k)s, %(n)s)"
            " on conflict (id) do update set name = excluded.name"),
    ("own", "delete from {own} where id = %(k)s"),
    ("acc", "update {acc} set owner = %(o)s where id = %(k)s"),  # evicts only reads of owner
)
PROTOCOLS = ("simple", "extended", "prepared")
BEGINS = ("begin", "start transaction", "begin isolation level read committed")
ENDS = ("commit", "end", "commit work", "rollback", "abort", "rollback work", "commit and chain",
        "rollback and chain")
ROLLBACKS = ("rollback", "abort")  # how the ends that do not commit begin
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")

# What a statement returned: ("rows", column names, rows) or ("error", SQLSTATE).
Outcome = tuple[Any, ...]


def _values(key: int, value: int) -> dict[str, Any]:
    return {"k": key, "d": value - 1, "o": value % 3 + 1, "b": value, "n": f"n{value}"}


# ----------------------------------------------------------------------------- program steps


@dataclass(frozen=True)
class Read:
    client: int
    query: int
    key: int
    protocol: str


@dataclass(frozen=True)
class Repeat:
    """The read ``back`` reads ago in this program (of any client), by ``client``: repeated
    statements are what the cache answers."""

    client: int
    back: int


@dataclass(frozen=True)
class Probe:
    """Every distinct statement this program has read so far (the last ``PROBE_LIMIT``), read
    again by ``client``: whatever the cache holds at this point is checked at once."""

    client: int


@dataclass(frozen=True)
class Write:
    client: int
    stmt: int
    key: int
    value: int
    protocol: str
    qualified: bool  # "public.acc": invalidation matches on the last name component


@dataclass(frozen=True)
class WriteThenRead:
    """One simple-protocol Query: "<write>; <read>" (never cached: several statements)."""

    client: int
    stmt: int
    key: int
    value: int
    query: int
    qkey: int


@dataclass(frozen=True)
class Begin:
    client: int
    spelling: str


@dataclass(frozen=True)
class End:
    """Ends the transaction of ``client`` or, when it has none open, of the next client (by number)
    that has one: open transactions mark their tables uncacheable, so they must not last forever."""

    client: int
    spelling: str


@dataclass(frozen=True)
class Savepoint:
    client: int
    action: str  # "savepoint", "rollback to savepoint", "release savepoint"


@dataclass(frozen=True)
class Direct:
    """Writes straight to the server, in one transaction: the proxy sees only their NOTIFY."""

    writes: tuple[tuple[int, int, int], ...]  # (stmt, key, value)


@dataclass(frozen=True)
class Pipelined:
    """Statements of a fourth client (a raw socket) sent back to back, all before the first
    answer is read, as a pipelining driver does: the proxy sees every one of them before the
    server has run the first. Items: "begin", an end of transaction, or a write (stmt, key, value)."""

    items: tuple[Union[str, tuple[int, int, int]], ...]


Step = Union[Read, Repeat, Probe, Write, WriteThenRead, Begin, End, Savepoint, Direct, Pipelined]

_clients = st.integers(0, N_CLIENTS - 1)
_keys = st.sampled_from(KEYS)
_values_st = st.integers(0, 3)
_stmts = st.integers(0, len(WRITES) - 1)
_protocols = st.sampled_from(PROTOCOLS)


# (weight, strategy): reads 6, writes 5, transaction control 4. Each write touches the row of one key.
_STEP_WEIGHTS: tuple[tuple[int, st.SearchStrategy[Any]], ...] = (
    (3, st.builds(Repeat, _clients, st.integers(0, 2))),
    (2, st.builds(Read, _clients, st.integers(0, len(READS) - 1), _keys, _protocols)),
    (1, st.builds(Probe, _clients)),
    (2, st.builds(Write, _clients, _stmts, _keys, _values_st, _protocols, st.booleans())),
    (1, st.builds(WriteThenRead, _clients, _stmts, _keys, _values_st,
                  st.sampled_from([i for i in range(len(READS)) if i != FAILING_READ]), _keys)),
    (1, st.builds(Direct, st.lists(st.tuples(_stmts, _keys, _values_st), min_size=1, max_size=2).map(tuple))),
    (1, st.builds(Pipelined, st.lists(
        st.one_of(st.sampled_from(("begin", *ENDS)), st.tuples(_stmts, _keys, _values_st)), min_size=2, max_size=6,
    ).map(tuple))),
    (2, st.builds(End, _clients, st.sampled_from(ENDS))),
    (1, st.builds(Begin, _clients, st.sampled_from(BEGINS))),
    (1, st.builds(Savepoint, _clients,
                  st.sampled_from(("savepoint", "rollback to savepoint", "release savepoint")))),
)
# A strategy listed ``weight`` times, each time as a new object: one_of drops a branch equal to
# one it already has, and identity mappings are never equal.
STEPS: st.SearchStrategy[Step] = st.one_of(
    *[strategy.map(lambda step: step) for weight, strategy in _STEP_WEIGHTS for _ in range(weight)])

# Lists of lists, flattened: Hypothesis keeps a flat list short (about 6 steps on average), while
# cache bugs need a read, a write and the same read again, often with a transaction around them.
# Shrinking still removes single steps.
PROGRAMS = st.lists(st.lists(STEPS, min_size=1, max_size=12), min_size=1, max_size=10).map(
    lambda chunks: [step for chunk in chunks for step in chunk])


# ----------------------------------------------------------------------------- the harness


class HeldNotifications:
    """Stands in for the ResultCache that the LISTEN monitor invalidates: keeps its "notify"
    invalidations until ``release``; the test's sentinels are noted, never applied. Everything
    else (a flush when the LISTEN connection drops) goes straight to the cache. Used on the
    proxy's loop only."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache
        self.held: list[tuple[list[str], str, Any, Any]] = []
        self.sentinels: set[str] = set()
        self.released = 0

    def invalidate(self, tables: Any, source: str, columns: Any = None, keys: Any = None) -> int:
        names = list(tables)
        if len(names) == 1 and names[0].startswith(SENTINEL):
            self.sentinels.add(names[0])
        elif source == "proxy":
            # A notification of a write through the proxy (its server backend is watched): part
            # of path 1, fenced (InvalidationMonitor.commit_fenced), never held.
            return int(self._cache.invalidate(names, source, columns, keys))
        else:
            self.held.append((names, source, columns, keys))
        return 0

    def release(self) -> int:
        for names, source, columns, keys in self.held:
            self._cache.invalidate(names, source, columns, keys)
        self.released += len(self.held)
        self.held.clear()
        return self.released

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


@dataclass
class Client:
    conn: Any  # psycopg.Connection; a RawClient for the pipelining client
    in_txn: bool = False
    failed: bool = False  # the transaction had an error: only its end (or ROLLBACK TO) runs
    log: list[str] = field(default_factory=list)  # literal SQL of its writes since BEGIN
    savepoints: list[int] = field(default_factory=list)  # len(log) at each SAVEPOINT
    locks: set[tuple[str, int]] = field(default_factory=set)  # rows it wrote: others must not
    chained: bool = False  # a COMMIT AND CHAIN ran since the last BEGIN (see ONCE_STALE)

    def forget(self) -> None:
        self.failed = False
        self.log.clear()
        self.savepoints.clear()
        self.locks.clear()


def _outcome(cur: psycopg.Cursor[Any]) -> Outcome:
    if cur.description is None:
        return ("rows", (), ())
    return ("rows", tuple(d.name for d in cur.description), tuple(cur.fetchall()))


class Harness:
    """Runs programs against one proxy; the direct connection is the oracle and the bypass."""

    def __init__(self, proxy: RunningProxy, oracle: psycopg.Connection[Any], acc: str, own: str,
                 held: HeldNotifications) -> None:
        self.proxy = proxy
        front = proxy.server.cache_front
        assert front is not None
        self.front = front
        self.oracle = oracle
        self.tables = {"acc": acc, "own": own}
        self.qualified = {"acc": f"public.{acc}", "own": f"public.{own}"}
        self.held = held
        self.mogrifier = psycopg.ClientCursor(oracle)
        self.clients = [Client(self._connect()) for _ in range(N_CLIENTS)]
        self.pipeliner = Client(self._connect_raw())
        self.everyone = [*self.clients, self.pipeliner]
        self.sentinels = 0
        self.checked = 0  # reads compared with the oracle
        self.hits = 0  # of which answered from the cache
        self.history: list[str] = []
        self.reads: list[Read] = []  # this program's reads, for Repeat
        self.avoid_known_stale = False  # True: skip the statements of ONCE_STALE's programs

    def _connect(self) -> psycopg.Connection[Any]:
        # prepare_threshold=None: psycopg prepares only when asked (the "prepared" protocol).
        return psycopg.connect(**self.proxy.kwargs(), autocommit=True, prepare_threshold=None,
                               connect_timeout=10)

    def _connect_raw(self) -> RawClient:
        raw = RawClient(self.proxy.port, timeout=30.0)
        raw.login(self.proxy.user, self.proxy.database)
        return raw

    # -- rendering ------------------------------------------------------------------------------

    def _sql(self, template: str, qualified: bool = False) -> str:
        return template.format(**(self.qualified if qualified else self.tables))

    @staticmethod
    def _params(template: str, values: dict[str, Any]) -> dict[str, Any] | None:
        names = _PLACEHOLDER.findall(template)
        return {name: values[name] for name in names} if names else None

    def _literal(self, sql: str, params: dict[str, Any] | None) -> str:
        return sql if params is None else self.mogrifier.mogrify(sql, params)

    # -- running statements ---------------------------------------------------------------------

    def _proxy(self, client: Client, sql: str, params: dict[str, Any] | None, protocol: str) -> Outcome:
        cur = client.conn.cursor()
        try:
            if protocol == "simple" or params is None and protocol == "extended":
                cur.execute(self._literal(sql, params).encode())  # bytes: sent as it is, one Query
            elif protocol == "extended":
                cur.execute(sql, params)
            else:
                cur.execute(sql, params, prepare=True)
            return _outcome(cur)
        except psycopg.Error as exc:
            return ("error", exc.sqlstate)

    def _direct(self, sql: str) -> Outcome:
        try:
            return _outcome(self.oracle.execute(sql.encode()))
        except psycopg.Error as exc:
            return ("error", exc.sqlstate)

    def _as_of(self, client: Client, sql: str) -> Outcome:
        """What ``sql`` returns to ``client`` now: committed rows, plus its open transaction's writes."""
        if not client.in_txn or not client.log:
            return self._direct(sql)
        o = self.oracle
        o.execute("begin")
        try:
            for name in self.tables.values():
                o.execute(f"create temp table {name} (like public.{name} including all) on commit drop")
                o.execute(f"insert into {name} select * from public.{name}")
            for write in client.log:
                o.execute(write.encode())
            return self._direct(sql)
        finally:
            o.execute("rollback")

    def _hit_count(self) -> int:
        return self.proxy.run(lambda: self.front.cache.hits)

    def _blocked(self, writer: int | None, rows: set[tuple[str, int]]) -> bool:
        """Would a write of ``rows`` by ``writer`` (None: the direct connection) wait for a lock?"""
        return any(i != writer and c.locks & rows for i, c in enumerate(self.everyone))

    def _check(self, step: Step, sql: str, got: Outcome, expected: Outcome) -> None:
        self.checked += 1
        assert got == expected, (
            f"{step}: the proxy returned {got!r}, PostgreSQL {expected!r}\n  for: {sql}\n"
            f"  after: {self.history[-12:]}")

    # -- program --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Every client idle, the same rows in both tables, the cache told about it."""
        for client in self.clients:
            if client.conn.closed or client.conn.broken:
                client.conn = self._connect()
            else:  # even when psycopg believes it idle: a broken proxy could have misled it
                client.conn.execute("rollback")
            client.in_txn = client.chained = False
            client.forget()
        raw = self.pipeliner.conn
        if raw.eof:
            raw.close()
            raw = self.pipeliner.conn = self._connect_raw()
        else:
            raw.simple_query("rollback")
        self.pipeliner.in_txn = self.pipeliner.chained = False
        self.pipeliner.forget()
        o = self.oracle
        if o.info.transaction_status != TransactionStatus.IDLE:
            o.execute("rollback")
        acc, own = self.tables["acc"], self.tables["own"]
        with o.transaction():
            o.execute(f"truncate {acc}, {own}")
            o.execute(f"insert into {acc} (id, owner, balance) values {SEED_ACC}")
            o.execute(f"insert into {own} (id, name) values {SEED_OWN}")
        self.sync()
        self.history = []
        self.reads = []

    def close(self) -> None:
        self.pipeliner.conn.close()
        for client in self.clients:
            client.conn.close()  # an open transaction ends with its session: no lock outlives the test

    def sync(self) -> None:
        """Wait until every notification committed so far has reached the monitor, then let
        the cache have them all (see the module docstring)."""
        self.sentinels += 1
        name = f"{SENTINEL}{self.sentinels}"
        self.oracle.execute("select pg_notify(%s, %s)", (CHANNEL, json.dumps([name])))
        deadline = time.monotonic() + SYNC_DEADLINE_S
        while not self.proxy.run(lambda: name in self.held.sentinels):
            assert time.monotonic() < deadline, f"notification {name} never reached the proxy's monitor"
            time.sleep(0.001)
        self.proxy.run(self.held.release)

    def run(self, program: list[Step]) -> None:
        self.reset()
        for step in program:
            if self.step(step):
                self.history.append(repr(step))

    def step(self, step: Step) -> bool:
        """Run one step and check what it read; False when it was skipped."""
        if isinstance(step, Direct):
            return self._direct_writes(step)
        if isinstance(step, Pipelined):
            return self._pipelined(step)
        client = self.clients[step.client]
        if isinstance(step, Probe):
            seen: dict[tuple[int, int, str], None] = {}
            for read in reversed(self.reads):
                seen.setdefault((read.query, read.key, read.protocol), None)
            if not seen:
                return False
            for query, key, protocol in list(seen)[:PROBE_LIMIT]:
                self._read(Read(step.client, query, key, protocol), client)
            return True
        if isinstance(step, Repeat):
            if not self.reads:
                return False
            read = self.reads[-1 - step.back % len(self.reads)]
            step = Read(step.client, read.query, read.key, read.protocol)
        if isinstance(step, Read):
            self.reads.append(step)
            return self._read(step, client)
        if isinstance(step, Write):
            return self._write(step, client)
        if isinstance(step, WriteThenRead):
            return self._write_then_read(step, client)
        if isinstance(step, Begin):
            if client.in_txn:
                return False
            self._statement(step, client, step.spelling)
            client.in_txn = True
            return True
        if isinstance(step, End):
            for offset in range(N_CLIENTS):
                number = (step.client + offset) % N_CLIENTS
                if self.clients[number].in_txn:
                    return self._end(End(number, step.spelling), self.clients[number])
            return False
        return self._savepoint(step, client)

    def _statement(self, step: Step, client: Client, sql: str) -> None:
        got = self._proxy(client, sql, None, "simple")
        assert got[0] == "rows", f"{step}: {sql!r} failed with {got!r} after {self.history[-12:]}"

    def _read(self, step: Read, client: Client) -> bool:
        template = READS[step.query]
        sql = self._sql(template)
        params = self._params(template, _values(step.key, 0))
        before = self._hit_count()
        got = self._proxy(client, sql, params, step.protocol)
        hits = self._hit_count() - before
        literal = self._literal(sql, params)
        if client.in_txn:
            assert hits == 0, f"{step}: a read inside a transaction was answered from the cache"
            expected = ("error", "25P02") if client.failed else self._as_of(client, literal)
            if got[0] == "error":
                client.failed = True
        else:
            assert not (hits and got[0] == "error"), f"{step}: an error was answered from the cache"
            expected = self._direct(literal)
            self.hits += hits
        self._check(step, literal, got, expected)
        return True

    def _write(self, step: Write, client: Client) -> bool:
        table, template = WRITES[step.stmt]
        rows = {(table, step.key)}
        if client.failed or self._blocked(step.client, rows):
            return False
        params = self._params(template, _values(step.key, step.value))
        got = self._proxy(client, self._sql(template, step.qualified), params, step.protocol)
        assert got[0] == "rows", f"{step}: the write failed with {got!r} after {self.history[-12:]}"
        if client.in_txn:
            client.log.append(self._literal(self._sql(template), params))
            client.locks |= rows
        return True

    def _write_then_read(self, step: WriteThenRead, client: Client) -> bool:
        table, template = WRITES[step.stmt]
        rows = {(table, step.key)}
        if client.failed or self._blocked(step.client, rows):
            return False
        write = self._literal(self._sql(template), self._params(template, _values(step.key, step.value)))
        read_template = READS[step.query]
        read = self._literal(self._sql(read_template), self._params(read_template, _values(step.qkey, 0)))
        cur = client.conn.cursor()
        try:
            cur.execute(f"{write}; {read}".encode())
            while cur.nextset():
                pass
            got = _outcome(cur)
        except psycopg.Error as exc:
            got = ("error", exc.sqlstate)
        if client.in_txn:
            client.log.append(write)
            client.locks |= rows
        self._check(step, f"{write}; {read}", got, self._as_of(client, read))
        return True

    def _end(self, step: End, client: Client) -> bool:
        chain = step.spelling.endswith("chain")
        if not client.in_txn or (chain and client.failed):
            return False
        if self.avoid_known_stale and client.chained and step.spelling.startswith(ROLLBACKS):
            return False  # ONCE_STALE: "commit and chain, then rollback"
        self._statement(step, client, step.spelling)
        self._ended(client, step.spelling)
        return True

    @staticmethod
    def _ended(client: Client, spelling: str) -> None:
        client.in_txn = spelling.endswith("chain")
        client.chained = client.in_txn and (client.chained or not spelling.startswith(ROLLBACKS))
        client.forget()

    def _savepoint(self, step: Savepoint, client: Client) -> bool:
        if not client.in_txn:
            return False
        if step.action == "savepoint":
            if client.failed:
                return False
            self._statement(step, client, "savepoint sp")
            client.savepoints.append(len(client.log))
        elif step.action == "rollback to savepoint":
            if not client.savepoints:
                return False
            self._statement(step, client, "rollback to savepoint sp")
            del client.log[client.savepoints[-1]:]
            client.failed = False  # rows it locked since stay in ``locks``: fewer steps, never a wait
        else:
            if client.failed or not client.savepoints:
                return False
            self._statement(step, client, "release savepoint sp")
            client.savepoints.pop()
        return True

    def _pipelined(self, step: Pipelined) -> bool:
        client = self.pipeliner
        me = len(self.everyone) - 1
        batch: list[str] = []
        for item in step.items:
            if isinstance(item, tuple):
                stmt, key, value = item
                table, template = WRITES[stmt]
                rows = {(table, key)}
                if self._blocked(me, rows):
                    continue
                sql = self._literal(self._sql(template), self._params(template, _values(key, value)))
                if client.in_txn:
                    client.log.append(sql)
                    client.locks |= rows
            elif item == "begin":
                if client.in_txn:
                    continue
                client.in_txn = True
                sql = item
            else:
                if not client.in_txn:
                    continue
                if self.avoid_known_stale and item.startswith(ROLLBACKS) and (batch or client.chained):
                    continue  # ONCE_STALE: "pipelined autocommit write, then begin and rollback"
                self._ended(client, item)
                sql = item
            batch.append(sql)
        if not batch:
            return False
        raw = client.conn
        raw.send(b"".join(wire_query(sql) for sql in batch))
        for sql in batch:
            errors = [m.fields for m in raw.read_until(b"Z") if m.kind == b"E"]
            assert not errors, f"{step}: {sql!r} failed with {errors} after {self.history[-12:]}"
        return True

    def _direct_writes(self, step: Direct) -> bool:
        writes = [(WRITES[stmt], key, value) for stmt, key, value in step.writes]
        if self._blocked(None, {(table, key) for (table, _), key, _ in writes}):
            return False
        o = self.oracle
        with o.transaction():
            for (_, template), key, value in writes:
                o.execute(self._literal(self._sql(template), self._params(template, _values(key, value))).encode())
        self.sync()
        return True


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
def tables(direct: Callable[..., psycopg.Connection[Any]]) -> Iterator[tuple[str, str]]:
    """Two tables with the invalidation trigger, made before any proxy reads the catalog."""
    tag = uuid.uuid4().hex[:8]
    acc, own = f"diff_acc_{tag}", f"diff_own_{tag}"
    d = direct(options=LOCK_GUARD)
    d.execute(f"create table {acc} (id int primary key, owner int not null, balance int not null)")
    d.execute(f"create table {own} (id int primary key, name text not null)")
    d.execute(FUNCTION_SQL)
    for name in (acc, own):
        d.execute(trigger_sql("public", name))
    yield acc, own
    d.execute(f"drop table if exists {acc}, {own}")


@pytest.fixture
def harness(proxy_factory: Callable[..., RunningProxy], direct: Callable[..., psycopg.Connection[Any]],
            tables: tuple[str, str]) -> Iterator[Harness]:
    """A proxy with ``cache.mode: all`` listening for the tables' notifications (held), and the
    clients that run programs through it."""
    acc, own = tables
    proxy = proxy_factory(cache__mode="all", pool__checkout_timeout=10.0)
    front = proxy.server.cache_front
    assert front is not None
    with psycopg.connect(**proxy.kwargs(), autocommit=True) as first:
        first.execute(f"select count(*) from {acc}")  # starts the database's LISTEN monitor
    assert proxy.call(front.monitors[proxy.database].wait_ready(10))
    monitor = front.monitors[proxy.database]
    held = HeldNotifications(front.cache)

    def hold() -> None:
        monitor.cache = held  # type: ignore[assignment]  # a stand-in, see HeldNotifications

    proxy.run(hold)
    running = Harness(proxy, direct(options=LOCK_GUARD), acc, own, held)
    try:
        yield running
    finally:
        running.close()  # before the tables are dropped


# Programs that once went wrong, or that a weakened proxy gets wrong while random programs rarely
# find them: replayed first on every run.
ANCHORS: list[list[Step]] = [
    # Parameters are part of the key, in both protocols.
    [Read(0, 0, 1, "extended"), Read(1, 0, 2, "extended"), Read(2, 0, 1, "prepared"), Read(0, 0, 2, "prepared")],
    # A transaction reads through its server, even a statement that is cached.
    [Read(0, 0, 1, "simple"), Begin(0, "begin"), Repeat(0, 0), Repeat(1, 0)],
    # An autocommit write through the proxy evicts at once.
    [Read(0, 0, 1, "simple"), Write(1, 0, 1, 3, "extended", True), Repeat(2, 0)],
    # A write in a data-modifying CTE (a SELECT that is not read-only) evicts too.
    [Read(0, 0, 1, "prepared"), Repeat(1, 0), Write(2, 3, 1, 1, "simple", False), Repeat(0, 0)],
    # An error is never served from the cache, and once the balance is no longer 0 the row comes back.
    [Read(0, 5, 2, "simple"), Repeat(1, 0), Write(2, 1, 2, 3, "simple", False), Repeat(0, 0)],
    # While a transaction that wrote is open, others read the committed rows; at COMMIT they see
    # its rows; after a ROLLBACK, the rows from before.
    [Read(0, 2, 1, "simple"), Begin(1, "begin"), Write(1, 4, 1, 2, "prepared", False), Repeat(2, 0),
     Read(1, 2, 1, "simple"), End(1, "commit"), Repeat(0, 0),
     Begin(1, "start transaction"), Write(1, 6, 2, 0, "simple", False), Repeat(2, 0), End(1, "abort"),
     Repeat(0, 0)],
    # A write behind the proxy's back reaches the cache through NOTIFY.
    [Read(0, 1, 1, "extended"), Repeat(1, 0), Direct(((1, 3, 2),)), Repeat(2, 0)],
    # Column-level invalidation: an UPDATE of balance (proxy, then direct) keeps the read of
    # owners; an UPDATE of owner evicts it, through the proxy and behind its back; so does an
    # INSERT and a DELETE (rows come and go), and an UPDATE of owner in a CTE.
    [Read(0, 6, 3, "simple"), Write(1, 0, 1, 3, "simple", True), Repeat(2, 0),
     Direct(((0, 2, 5),)), Repeat(0, 0), Write(1, 7, 1, 2, "extended", True), Repeat(2, 0),
     Direct(((7, 2, 4),)), Repeat(1, 0), Write(2, 2, 3, 0, "simple", True), Repeat(0, 0),
     Write(0, 1, 3, 5, "prepared", True), Repeat(1, 0), Direct(((3, 1, 6),)), Repeat(2, 0)],
    # Pipelined: a transaction that commits behind a write the server has not run yet.
    [Read(0, 0, 1, "simple"), Pipelined(((0, 1, 3), "begin", (1, 2, 2), "commit")), Repeat(1, 0)],
]


def test_every_read_through_the_caching_proxy_is_what_postgresql_returns(harness: Harness) -> None:
    # Hypothesis drives an inner function, not the test: the proxy and the tables live across all
    # examples (each starts with reset()), and the assertions after it see the whole run.
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(program=PROGRAMS)
    def every_read_matches(program: list[Step]) -> None:
        harness.run(program)

    for anchor in reversed(ANCHORS):
        every_read_matches = example(program=anchor)(every_read_matches)
    every_read_matches()

    proxy, held = harness.proxy, harness.held
    monitor = harness.front.monitors[proxy.database]
    snap = proxy.run(harness.front.cache.snapshot)
    assert monitor.ready and monitor.drops == 0, (monitor.ready, monitor.drops, monitor.last_error)
    assert harness.checked > MAX_EXAMPLES
    assert harness.hits > 0 and snap.hits >= harness.hits, (harness.hits, snap)
    assert snap.stores > 0, snap
    assert snap.invalidations.get("proxy", 0) > 0, snap  # writes through the proxy, evicted at commit
    assert snap.invalidations.get("notify", 0) > 0 and held.released > 0, snap  # direct writes, via NOTIFY


# Found by this test, fixed since: both times the ROLLBACK the proxy forwarded discarded the
# transaction's marks and written tables at once (ClientSession._classify, ROLLBACK branch),
# although writes of the same client had committed without the proxy evicting them yet: before a
# COMMIT AND CHAIN (whose ReadyForQuery still says "in a transaction"), or in statements pipelined
# ahead of the ROLLBACK. The entries that read the tables were served again with the rows from
# before the commit, until the trigger's NOTIFY arrived.
ONCE_STALE: dict[str, list[Step]] = {
    "commit and chain, then rollback": [
        Read(0, 0, 1, "simple"),
        Begin(1, "begin"), Write(1, 0, 1, 3, "simple", False), End(1, "commit and chain"), End(1, "rollback"),
        Repeat(0, 0),
    ],
    "pipelined autocommit write, then begin and rollback": [
        Read(0, 0, 1, "simple"),
        Pipelined(((0, 1, 3), "begin", "rollback")),
        Repeat(0, 0),
    ],
}


# Found by this test in CI, fixed since: the server's answers to a pipelined batch came in one
# read, and ServerConnection told the client only the last ReadyForQuery's status ('T': a BEGIN
# at the end of the batch), so the autocommit writes ahead of it committed without an eviction;
# a ROLLBACK later released their marks, and the entries from before them were served again.
# It needs the answers in one read, so it is replayed many times.
ONE_READ_STALE: list[Step] = [
    Read(0, 1, 2, "simple"),
    Pipelined(((0, 1, 3), "begin", (0, 2, 1))),
    Pipelined(("rollback",)),
    Repeat(0, 0),
]


@pytest.mark.parametrize("name", list(ONCE_STALE))
def test_once_stale_read(harness: Harness, name: str) -> None:
    harness.run(ONCE_STALE[name])


def test_pipelined_autocommit_writes_answered_in_one_read_with_a_begin_after_them(harness: Harness) -> None:
    for _ in range(40):
        harness.run(ONE_READ_STALE)
