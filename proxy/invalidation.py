"""Writes that bypass the proxy, seen through PostgreSQL: triggers, LISTEN, and the catalog facts
the result cache needs (issue 4, invalidation paths 2 and 4).

Owns the database side of the cache's correctness:

- ``install_triggers`` puts one statement-level trigger (``pgsidecar_cache_invalidate``, AFTER
  INSERT OR UPDATE OR DELETE OR TRUNCATE) on each table; it calls ``pgsidecar_cache_notify()``,
  which ``pg_notify``s the channel ``pgsidecar_cache`` with a JSON array of the table's name and
  the names of its partition ancestors (a write straight into a partition also invalidates results
  that read the partitioned table). NOTIFY is transactional: a rolled-back write sends nothing, a
  committed one is delivered after its commit, and PostgreSQL folds identical payloads of one
  transaction into one.
- ``InvalidationMonitor`` (one per database the proxy serves) holds a LISTEN connection (asyncpg)
  and evicts the named tables from the ``ResultCache`` on each notification. It also reads the
  catalog facts the cache decides with: the tables that carry the trigger (``tracked``) and the
  names of user-defined functions that are not IMMUTABLE/STABLE (``writer_functions``: they may
  write, and their reads are not seen). Both are re-read every ``refresh_s`` and on
  ``refresh_soon()`` (DDL through the proxy).
- When the LISTEN connection drops, writes may be missed from that moment: the whole cache is
  flushed at once and ``ready`` is False (the cache serves and stores nothing for this database)
  until the connection is back and listening; then the catalog is re-read and ``ready`` returns.
  Reconnection backs off from 0.5 s to 10 s.

Not on the hot path: clients read ``ready``, ``tracked`` and ``writer_functions`` (attributes).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from .cache import ResultCache, table_match_key

if TYPE_CHECKING:
    from .server import Endpoint

log = logging.getLogger(__name__)

CHANNEL = "pgsidecar_cache"
TRIGGER = "pgsidecar_cache_invalidate"
FUNCTION = "pgsidecar_cache_notify"

FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION public.{FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- pg_partition_ancestors lists a partition and its ancestors, and nothing for a plain table.
    PERFORM pg_notify('{CHANNEL}', COALESCE(
        (SELECT json_agg(c.relname)::text
         FROM pg_partition_ancestors(TG_RELID) AS a
         JOIN pg_class AS c ON c.oid = a.relid),
        json_build_array(TG_TABLE_NAME)::text));
    RETURN NULL;
END
$fn$
"""

# Ordinary and partitioned tables outside the system schemas (temporary ones excluded).
_ALL_TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 1, 2
"""

_TRACKED_SQL = f"""
SELECT DISTINCT c.relname
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE t.tgname = '{TRIGGER}' AND t.tgenabled <> 'D'
"""

# Functions an application defined (not PostgreSQL's, not an extension's) that may write.
_WRITER_FUNCTIONS_SQL = """
SELECT DISTINCT p.proname
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND p.provolatile = 'v' AND p.prorettype <> 'trigger'::regtype
  AND NOT EXISTS (SELECT 1 FROM pg_depend AS d
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
"""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def trigger_sql(schema: str, table: str) -> str:
    qualified = f"{_ident(schema)}.{_ident(table)}"
    return (f"DROP TRIGGER IF EXISTS {TRIGGER} ON {qualified}; "
            f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {qualified} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION public.{FUNCTION}()")


async def install_triggers(conn: Any, tables: list[str] | None = None) -> list[str]:
    """Install the notify function and a trigger on each table (every table when None).

    ``tables`` are names as a user types them (``jobs``, ``public.jobs``), resolved with
    ``to_regclass``; an unknown one raises ValueError naming it. Returns the qualified names.
    One transaction: all or nothing.
    """
    if tables:
        resolved: list[tuple[str, str]] = []
        for name in tables:
            row = await conn.fetchrow(
                "SELECT n.nspname, c.relname, c.relkind::text AS relkind FROM pg_class AS c "
                "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)", name)
            if row is None:
                raise ValueError(f"table {name!r} does not exist")
            if row["relkind"] not in ("r", "p"):
                raise ValueError(f"{name!r} is not a table (triggers can only be put on tables)")
            resolved.append((row["nspname"], row["relname"]))
    else:
        resolved = [(r["nspname"], r["relname"]) for r in await conn.fetch(_ALL_TABLES_SQL)]
    async with conn.transaction():
        await conn.execute(FUNCTION_SQL)
        for schema, table in resolved:
            await conn.execute(trigger_sql(schema, table))
    return [f"{schema}.{table}" for schema, table in resolved]


async def remove_triggers(conn: Any) -> list[str]:
    """Drop every pgsidecar cache trigger and the notify function; return the tables."""
    rows = await conn.fetch(
        "SELECT n.nspname, c.relname FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE t.tgname = $1 ORDER BY 1, 2", TRIGGER)
    async with conn.transaction():
        for row in rows:
            await conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {_ident(row[0])}.{_ident(row[1])}")
        await conn.execute(f"DROP FUNCTION IF EXISTS public.{FUNCTION}()")
    return [f"{row[0]}.{row[1]}" for row in rows]


def parse_payload(payload: str) -> list[str]:
    """Table names of one notification: a JSON array of names, or a bare name."""
    try:
        names = json.loads(payload)
    except ValueError:
        return [payload] if payload else []
    if isinstance(names, list):
        return [str(name) for name in names]
    return [str(names)] if names is not None else []


class InvalidationMonitor:
    """The LISTEN connection of one database, and its catalog facts."""

    def __init__(self, cache: ResultCache, endpoint: Endpoint, refresh_s: float = 30.0) -> None:
        self.cache = cache
        self.endpoint = endpoint
        self.database = endpoint.database
        self.refresh_s = refresh_s
        self.ready = False  # listening: results of this database may be served and stored
        self.tracked: frozenset[str] = frozenset()  # match keys of tables with the trigger
        self.writer_functions: frozenset[str] = frozenset()  # lowercased names
        self.notifications = 0
        self.connects = 0
        self.drops = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh = asyncio.Event()
        self._lost = asyncio.Event()
        self._conn: Any = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def refresh_soon(self) -> None:
        self._refresh.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._close()
        self.ready = False

    async def wait_ready(self, timeout: float) -> bool:
        """For tests and start-up: wait until listening (True) or ``timeout`` passes (False)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.ready:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # ------------------------------------------------------------------ internals
    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._connect()
                delay = 0.5
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: flush, wait, reconnect
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("cache_listen_failed", extra={"database": self.database, "error": self.last_error})
            self._went_down()
            await self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _connect(self) -> None:
        import asyncpg

        ep = self.endpoint
        self._lost.clear()
        conn = await asyncpg.connect(
            host=ep.host, port=ep.port, user=ep.user, password=ep.password, database=ep.database,
            timeout=ep.connect_timeout, statement_cache_size=0, ssl=False,
            server_settings={"application_name": "pgsidecar-cache-listen"},
        )
        self._conn = conn
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        await self._load_catalog()
        self.connects += 1
        self.ready = True
        self.last_error = None
        log.info("cache_listening", extra={"database": self.database, "tables": len(self.tracked)})

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lost = loop.create_task(self._lost.wait())
            refresh = loop.create_task(self._refresh.wait())
            try:
                await asyncio.wait({lost, refresh}, timeout=self.refresh_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                refresh.cancel()
            if self._lost.is_set() or self._conn is None or self._conn.is_closed():
                raise ConnectionError("LISTEN connection lost")
            self._refresh.clear()
            await self._load_catalog()

    async def _load_catalog(self) -> None:
        conn = self._conn
        tracked = await conn.fetch(_TRACKED_SQL)
        writers = await conn.fetch(_WRITER_FUNCTIONS_SQL)
        self.tracked = frozenset(table_match_key(r[0]) for r in tracked)
        self.writer_functions = frozenset(r[0].lower() for r in writers)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        tables = parse_payload(payload)
        if tables:
            self.cache.invalidate(tables, "notify")

    def _went_down(self) -> None:
        if self.ready:
            self.drops += 1
        self.ready = False
        # Writes may go unseen from now on: nothing cached may be served any more.
        self.cache.flush("flush")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:  # noqa: BLE001 - already broken
                conn.terminate()
