"""Writes that bypass the proxy, seen through PostgreSQL: triggers, LISTEN, and the catalog facts
the result cache needs (issue 4, invalidation paths 2 and 4).

Owns the database side of the cache's correctness:

- ``install_triggers`` puts statement-level triggers on each table:
  - ``pgsidecar_cache_invalidate`` (AFTER TRUNCATE) calls ``pgsidecar_cache_notify()``, which
    ``pg_notify``s the channel ``pgsidecar_cache`` with a JSON array of the table's name and the
    names of its partition ancestors (a write straight into a partition also invalidates results
    that read the partitioned table);
  - ``pgsidecar_cache_rows_ins``/``_del``/``_upd`` (AFTER INSERT / DELETE / UPDATE, with transition
    tables) call ``pgsidecar_cache_notify_rows()``, which notifies
    ``{"tables": [...], "columns": [...] or null, "keys": {column: [values]} or null}``: per integer
    column (int2/4/8, the first 20), its distinct values in the rows the statement changed (old and
    new versions), when it changed at most ``MAX_KEYED_ROWS`` and the payload fits; an entry
    whose read pins such a column to other values stays (``proxy.columns.read_keys``);
  - one ``pgsidecar_cache_col_<attnum>`` per column (AFTER UPDATE OF that column) calls
    ``pgsidecar_cache_mark_column(attnum)``, which notes the column in a transaction-local setting;
    the UPDATE trigger, named to fire after them, reads and clears it and names those columns (only
    when every live column has its trigger, checked as it fires: else null, every column): an
    UPDATE then evicts only the results that read a column it set (``proxy.columns``).
  Tables set up by older versions keep working as they were: a table trigger on INSERT, DELETE and
  TRUNCATE (and on UPDATE, or with column triggers that notify themselves), evicted per table or
  column; ``install-triggers`` again replaces them. On a keyed table a column added later has no
  column trigger: its UPDATEs name rows but no columns. NOTIFY is transactional: a rolled-back
  write sends nothing, a committed one is delivered after its commit, and PostgreSQL folds
  identical payloads of one transaction into one. The transition tables cost the writer a copy
  of the rows a statement changed (PostgreSQL keeps them for the trigger), bulk writes included.
- Writes through the proxy to keyed tables are *fenced* (``watch``, ``commit_fenced``): the
  session's marks (nothing it wrote is served or stored) stay after its commit until a NOTIFY on
  ``pgsidecar_cache_fence``, sent on the LISTEN connection once the commit was seen, comes back;
  the notification queue is in commit order, so by then the triggers' notifications of that
  commit (they come from the server backend the session wrote through, which the monitor
  watches) have evicted what it changed, row by row. The tables no notification of that backend
  named meanwhile are evicted then as before (per table or column). Residual imprecision, by
  choice: a notification of that backend is credited to every open watch of it, so a transaction
  whose triggers did not fire, right after one on the same server connection whose notification
  was still on its way for the same table, would take that notification as its own; triggers do
  not fire only under ``session_replication_role = replica`` (a transaction naming it is never
  fenced) or while disabled (DDL: the catalog is re-read).
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
- Families of tables (partitions, inheritance children and their parents, from ``pg_inherits``):
  a statement trigger fires only on the table a statement names, so an UPDATE of a partitioned
  table notifies only the parent, and a write through the proxy names one table. Both paths evict
  the whole family (``relatives``), per column where the columns are known (they share names).

Not on the hot path: clients read ``ready``, ``tracked`` and ``writer_functions`` (attributes).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any, Iterable

from .cache import ResultCache, WriteMarks, table_match_key
from .protocol import quote_ident, quote_literal

if TYPE_CHECKING:
    from .server import Endpoint

log = logging.getLogger(__name__)

CHANNEL = "pgsidecar_cache"
DDL_CHANNEL = "pgsidecar_cache_ddl"
TRIGGER = "pgsidecar_cache_invalidate"
FUNCTION = "pgsidecar_cache_notify"
DDL_FUNCTION = "pgsidecar_cache_ddl_notify"
EVENT_TRIGGERS = ("pgsidecar_cache_ddl", "pgsidecar_cache_drop")

COLUMN_TRIGGER_PREFIX = "pgsidecar_cache_col_"  # + attnum: AFTER UPDATE OF that column
MARK_FUNCTION = "pgsidecar_cache_mark_column"
ROWS_FUNCTION = "pgsidecar_cache_notify_rows"
# AFTER INSERT / DELETE / UPDATE with transition tables. Their names sort after the column
# triggers': PostgreSQL fires a statement's triggers in name order, so the UPDATE one reads the
# columns the column triggers marked.
ROW_TRIGGERS = ("pgsidecar_cache_rows_ins", "pgsidecar_cache_rows_del", "pgsidecar_cache_rows_upd")
COLUMN_SETTING = "pgsidecar.cache_columns"  # transaction-local: "relid.attnum," per column marked
FENCE_CHANNEL = "pgsidecar_cache_fence"
MAX_KEYED_ROWS = 100  # a write changing more rows notifies no keys (per table or column, as before)
MAX_KEY_COLUMNS = 20

FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION public.{FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    names json;
BEGIN
    -- pg_partition_ancestors lists a partition and its ancestors, and nothing for a plain table.
    names := COALESCE(
        (SELECT json_agg(c.relname)
         FROM pg_partition_ancestors(TG_RELID) AS a
         JOIN pg_class AS c ON c.oid = a.relid),
        json_build_array(TG_TABLE_NAME));
    IF TG_NARGS > 0 THEN  -- a column trigger: UPDATE ... SET that column
        PERFORM pg_notify('{CHANNEL}', json_build_object('tables', names, 'columns', to_json(TG_ARGV))::text);
    ELSE
        PERFORM pg_notify('{CHANNEL}', names::text);
    END IF;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION public.{MARK_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- A column trigger (UPDATE OF one column, TG_ARGV[0] its attnum): note the column for the
    -- rows trigger of the same statement, which fires next and notifies.
    PERFORM set_config('{COLUMN_SETTING}', COALESCE(current_setting('{COLUMN_SETTING}', true), '')
                       || TG_RELID::text || '.' || TG_ARGV[0] || ',', true);
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION public.{ROWS_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    names json;
    marked text;
    cols json;
    key_columns text[];
    covered boolean;
    source text;
    changed bigint;
    keys json;
    payload text;
BEGIN
    names := COALESCE(
        (SELECT json_agg(c.relname)
         FROM pg_partition_ancestors(TG_RELID) AS a
         JOIN pg_class AS c ON c.oid = a.relid),
        json_build_array(TG_TABLE_NAME));
    -- The integer columns (their values in the changed rows are the keys), and whether every
    -- column has its enabled column trigger (else the columns an UPDATE set are not all known).
    SELECT (array_agg(a.attname::text ORDER BY a.attnum)
                FILTER (WHERE a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)))[1:{MAX_KEY_COLUMNS}],
           bool_and(EXISTS (SELECT 1 FROM pg_trigger AS t
                            WHERE t.tgrelid = TG_RELID AND t.tgenabled <> 'D'
                              AND t.tgname = '{COLUMN_TRIGGER_PREFIX}' || a.attnum))
      INTO key_columns, covered
      FROM pg_attribute AS a
     WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
    IF TG_OP = 'UPDATE' THEN
        marked := ',' || COALESCE(current_setting('{COLUMN_SETTING}', true), '');
        PERFORM set_config('{COLUMN_SETTING}', '', true);
        IF covered THEN
            SELECT json_agg(a.attname) INTO cols FROM pg_attribute AS a
             WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
               AND position(',' || TG_RELID::text || '.' || a.attnum || ',' IN marked) > 0;
        END IF;
        source := 'SELECT %1$s FROM pgsidecar_old UNION ALL SELECT %1$s FROM pgsidecar_new';
    ELSIF TG_OP = 'INSERT' THEN
        source := 'SELECT %1$s FROM pgsidecar_new';
    ELSE
        source := 'SELECT %1$s FROM pgsidecar_old';
    END IF;
    IF key_columns IS NOT NULL THEN
        EXECUTE 'SELECT count(*) FROM (' || format(source, '1') || ') AS s' INTO changed;
        IF changed <= {MAX_KEYED_ROWS} THEN
            EXECUTE 'SELECT json_build_object('
                || (SELECT string_agg(quote_literal(k) || ', json_agg(DISTINCT ' || quote_ident(k) || ')', ', ')
                    FROM unnest(key_columns) AS k)
                || ') FROM (' || format(source, (SELECT string_agg(quote_ident(k), ', ') FROM unnest(key_columns) AS k)) || ') AS s'
              INTO keys;
        END IF;
    END IF;
    payload := json_build_object('tables', names, 'columns', cols, 'keys', keys)::text;
    IF length(payload) > 7900 THEN
        payload := json_build_object('tables', names, 'columns', cols)::text;
    END IF;
    PERFORM pg_notify('{CHANNEL}', payload);
    RETURN NULL;
END
$fn$
"""

# DDL run straight on the server (a migration in psql) changes what a cached result would be
# (ALTER TABLE ... ADD COLUMN, DROP TABLE) without firing a table trigger: an event trigger
# notifies the tables it touched. Event triggers need a superuser; without one, DDL through the
# proxy is still seen, and the TTL bounds the rest.
DDL_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION public.{DDL_FUNCTION}() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    names json;
BEGIN
    IF TG_EVENT = 'sql_drop' THEN
        SELECT json_agg(DISTINCT object_name) INTO names FROM pg_event_trigger_dropped_objects()
        WHERE object_type IN ('table', 'view', 'materialized view', 'foreign table') AND NOT is_temporary;
    ELSE
        SELECT json_agg(DISTINCT c.relname) INTO names
        FROM pg_event_trigger_ddl_commands() AS d JOIN pg_class AS c ON c.oid = d.objid
        WHERE d.classid = 'pg_class'::regclass AND c.relpersistence <> 't';
    END IF;
    PERFORM pg_notify('{DDL_CHANNEL}', COALESCE(names::text, '[]'));
END
$fn$
"""
_EVENT_TRIGGERS_SQL = (
    f"DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGERS[0]}; "
    f"CREATE EVENT TRIGGER {EVENT_TRIGGERS[0]} ON ddl_command_end EXECUTE FUNCTION public.{DDL_FUNCTION}(); "
    f"DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGERS[1]}; "
    f"CREATE EVENT TRIGGER {EVENT_TRIGGERS[1]} ON sql_drop EXECUTE FUNCTION public.{DDL_FUNCTION}()"
)

# Ordinary and partitioned tables outside the system schemas (temporary ones excluded).
_ALL_TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 1, 2
"""

# Per table with the triggers: whether the table trigger fires on every UPDATE (as installed before
# column triggers existed), whether every live column has its enabled column trigger, whether an
# UPDATE may change more than it sets (row security, generated columns, BEFORE UPDATE triggers),
# whether the table trigger fires on INSERT and DELETE too (installed before the rows triggers
# existed), and whether the rows triggers are all there (keyed: writes name the rows they change).
# Tracked: keyed, or the older kinds (every UPDATE, or all column triggers). Column-safe: tracked,
# all column triggers present, nothing more.
_TRACKED_SQL = f"""
SELECT c.relname,
       bool_or(t.tgname = '{TRIGGER}' AND (t.tgtype::int & 16) <> 0) AS every_update,
       NOT EXISTS (
           SELECT 1 FROM pg_attribute AS a
           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             AND NOT EXISTS (SELECT 1 FROM pg_trigger AS k
                             WHERE k.tgrelid = c.oid AND k.tgenabled <> 'D'
                               AND k.tgname = '{COLUMN_TRIGGER_PREFIX}' || a.attnum
                               AND a.attnum = ANY (k.tgattr::int2[]))) AS covered,
       c.relrowsecurity
       OR EXISTS (SELECT 1 FROM pg_attribute AS a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> '')
       OR EXISTS (SELECT 1 FROM pg_trigger AS b
                  WHERE b.tgrelid = c.oid AND NOT b.tgisinternal AND b.tgenabled <> 'D'
                    AND (b.tgtype::int & 2) <> 0 AND (b.tgtype::int & 16) <> 0) AS more_than_set,
       bool_or(t.tgname = '{TRIGGER}' AND (t.tgtype::int & 12) = 12) AS old_style,
       count(DISTINCT t.tgname) FILTER (WHERE t.tgname <> '{TRIGGER}') = {len(ROW_TRIGGERS)}
       AND bool_or(t.tgname = '{TRIGGER}' AND (t.tgtype::int & 32) <> 0) AS keyed
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE t.tgname IN ('{TRIGGER}', '{"', '".join(ROW_TRIGGERS)}') AND t.tgenabled <> 'D'
GROUP BY c.oid, c.relname, c.relrowsecurity
"""

# Relations whose writes reach other tables, for writes through the proxy: views (their base
# tables; INSTEAD OF triggers and rules can do anything), tables with AFTER or INSTEAD OF
# triggers of the application's (audit logs, denormalised counters), and foreign keys whose
# ON DELETE/UPDATE action changes the referencing table (CASCADE, SET NULL, SET DEFAULT).
_VIEWS_SQL = """
SELECT DISTINCT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
# The webhook emitter's change triggers (agent/webhooks/sql.py) are AFTER triggers whose writes
# are known: the outbox tables below. They are edges like a foreign key's, not an unknown trigger
# (which would make every write to a watched table flush the whole cache).
WEBHOOK_TRIGGERS = ("pgsidecar_webhook_capture", "pgsidecar_webhook_truncate")
WEBHOOK_WRITES = ("webhook_events", "webhook_deliveries")
_AFTER_TRIGGERS_SQL = f"""
SELECT DISTINCT c.relname FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal
  AND t.tgname NOT IN ('{TRIGGER}', '{WEBHOOK_TRIGGERS[0]}', '{WEBHOOK_TRIGGERS[1]}', '{"', '".join(ROW_TRIGGERS)}')
  AND t.tgname NOT LIKE '{COLUMN_TRIGGER_PREFIX}%'
  AND (t.tgtype::int & 2) = 0
"""
_CASCADES_SQL = f"""
SELECT DISTINCT p.relname AS parent, ch.relname AS child, k.confupdtype IN ('c', 'n', 'd') AS on_update
FROM pg_constraint AS k JOIN pg_class AS p ON p.oid = k.confrelid JOIN pg_class AS ch ON ch.oid = k.conrelid
WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
UNION
SELECT DISTINCT c.relname, w.name, true
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid,
     (VALUES ('{WEBHOOK_WRITES[0]}'), ('{WEBHOOK_WRITES[1]}')) AS w (name)
WHERE t.tgname IN ('{WEBHOOK_TRIGGERS[0]}', '{WEBHOOK_TRIGGERS[1]}')
"""

# Partitions and inheritance children, with their parents. A statement trigger fires only on the
# table a statement names: an UPDATE of a partitioned table notifies the parent, not the partitions
# whose rows it changed, and a write through the proxy names one table of the family.
_INHERITS_SQL = """
SELECT p.relname AS parent, c.relname AS child
FROM pg_inherits AS i JOIN pg_class AS p ON p.oid = i.inhparent JOIN pg_class AS c ON c.oid = i.inhrelid
"""

# Functions an application defined (not PostgreSQL's, not an extension's), by name, and whether
# one of that name is VOLATILE: those may write. Any of them may read columns a statement's text
# does not name.
_FUNCTIONS_SQL = """
SELECT p.proname, bool_or(p.provolatile = 'v') AS volatile
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND p.prorettype <> 'trigger'::regtype
  AND NOT EXISTS (SELECT 1 FROM pg_depend AS d
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
GROUP BY p.proname
"""


def _drop_column_triggers_sql(qualified: str) -> str:
    # No "; " inside: migration 0004 splits trigger_sql's text on it.
    return (f"DO $do$ DECLARE r record;\nBEGIN\n"
            f"FOR r IN SELECT tgname FROM pg_trigger WHERE tgrelid = {quote_literal(qualified)}::regclass"
            f" AND tgname LIKE '{COLUMN_TRIGGER_PREFIX}%' LOOP\n"
            f"EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, {quote_literal(qualified)}::regclass);\n"
            f"END LOOP;\nEND $do$")


def trigger_sql(schema: str, table: str) -> str:
    """Statements (separated by "; ") that put the cache's triggers on one table: one for TRUNCATE
    (it names the table), one each for INSERT, DELETE and UPDATE with transition tables (they name
    the table and, per integer column, its values in the rows changed: an entry that read other
    rows stays), and one per column for UPDATE OF that column (it marks the column for the UPDATE
    trigger: an UPDATE evicts only results that read a column it sets)."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    literal = quote_literal(qualified)
    columns = (
        f"DO $do$ DECLARE r record;\nBEGIN\n"
        f"FOR r IN SELECT attnum, attname FROM pg_attribute WHERE attrelid = {literal}::regclass"
        f" AND attnum > 0 AND NOT attisdropped LOOP\n"
        f"EXECUTE format('CREATE TRIGGER %I AFTER UPDATE OF %I ON %s FOR EACH STATEMENT"
        f" EXECUTE FUNCTION public.{MARK_FUNCTION}(%L)', '{COLUMN_TRIGGER_PREFIX}' || r.attnum, r.attname,"
        f" {literal}::regclass, r.attnum);\n"
        f"END LOOP;\nEND $do$")
    insert, delete, update = ROW_TRIGGERS
    rows = f"FOR EACH STATEMENT EXECUTE FUNCTION public.{ROWS_FUNCTION}()"
    return (f"{drop_trigger_sql(schema, table)}; "
            f"CREATE TRIGGER {TRIGGER} AFTER TRUNCATE ON {qualified} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION public.{FUNCTION}(); "
            f"CREATE TRIGGER {insert} AFTER INSERT ON {qualified} REFERENCING NEW TABLE AS pgsidecar_new {rows}; "
            f"CREATE TRIGGER {delete} AFTER DELETE ON {qualified} REFERENCING OLD TABLE AS pgsidecar_old {rows}; "
            f"CREATE TRIGGER {update} AFTER UPDATE ON {qualified} "
            f"REFERENCING OLD TABLE AS pgsidecar_old NEW TABLE AS pgsidecar_new {rows}; "
            f"{columns}")


def install_statements(schema: str, tables: Iterable[str]) -> list[str]:
    """The statements, one by one, that put the notify functions and the cache's triggers on
    ``tables`` of ``schema`` (what Alembic migrations execute)."""
    statements = [FUNCTION_SQL]
    for table in tables:
        statements += trigger_sql(schema, table).split("; ")
    return statements


def drop_trigger_sql(schema: str, table: str) -> str:
    """Statements (separated by "; ") that remove the cache's triggers from one table."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    drops = "; ".join(f"DROP TRIGGER IF EXISTS {name} ON {qualified}" for name in (TRIGGER, *ROW_TRIGGERS))
    return f"{drops}; {_drop_column_triggers_sql(qualified)}"


async def install_triggers(conn: Any, tables: list[str] | None = None) -> list[str]:
    """Install the notify function and a trigger on each table (every table when None).

    ``tables`` are names as a user types them (``jobs``, ``public.jobs``), resolved with
    ``to_regclass``; an unknown one raises ValueError naming it. Returns the qualified names.
    One transaction: all or nothing.
    """
    if tables:
        resolved = await _resolve_tables(conn, tables)
    else:
        resolved = [(r["nspname"], r["relname"]) for r in await conn.fetch(_ALL_TABLES_SQL)]
    async with conn.transaction():
        await conn.execute(FUNCTION_SQL)
        for schema, table in resolved:
            await conn.execute(trigger_sql(schema, table))
    return [f"{schema}.{table}" for schema, table in resolved]


async def _resolve_tables(conn: Any, tables: list[str]) -> list[tuple[str, str]]:
    """(schema, table) of each name as a user types it (``jobs``, ``public.jobs``), resolved with
    ``to_regclass``; ValueError naming an unknown name or one that is not a table."""
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
    return resolved


async def install_event_triggers(conn: Any) -> bool:
    """Install the DDL event triggers; False when the role may not (they need a superuser)."""
    is_super = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if not is_super:
        return False
    async with conn.transaction():
        await conn.execute(DDL_FUNCTION_SQL)
        await conn.execute(_EVENT_TRIGGERS_SQL)
    return True


async def _announce_dropped(conn: Any, tables: list[str]) -> None:
    """Inside the transaction that dropped the triggers of ``tables``: tell a running sidecar (the
    DDL channel: it evicts them and re-reads which tables carry the trigger)."""
    if tables:
        await conn.execute("SELECT pg_notify($1, $2)", DDL_CHANNEL, json.dumps(tables))


async def remove_triggers(conn: Any, tables: list[str] | None = None) -> list[str]:
    """Drop the cache's triggers from ``tables`` (names as ``install_triggers`` takes them; the
    functions and the DDL event triggers stay for the other tables), or, when None, every
    pgsidecar cache trigger, the functions and the event triggers. Returns the tables.

    In the same transaction a notification on the DDL channel names the tables: a running
    sidecar evicts their entries at once and re-reads which tables carry the trigger (then their
    reads bypass the cache, reason ``no_trigger``), without waiting for its periodic refresh."""
    if tables:
        resolved = await _resolve_tables(conn, tables)
        async with conn.transaction():
            for schema, table in resolved:
                await conn.execute(drop_trigger_sql(schema, table))
            await _announce_dropped(conn, [table for _, table in resolved])
        return [f"{schema}.{table}" for schema, table in resolved]
    rows = await conn.fetch(
        "SELECT DISTINCT n.nspname, c.relname FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE t.tgname = $1 OR starts_with(t.tgname, $2) OR t.tgname = ANY($3::text[]) ORDER BY 1, 2",
        TRIGGER, COLUMN_TRIGGER_PREFIX, list(ROW_TRIGGERS))
    has_events = await conn.fetchval(
        "SELECT count(*) FROM pg_event_trigger WHERE evtname = ANY($1::text[])", list(EVENT_TRIGGERS))
    async with conn.transaction():
        for row in rows:
            await conn.execute(drop_trigger_sql(row[0], row[1]))
        for name in (FUNCTION, MARK_FUNCTION, ROWS_FUNCTION):
            await conn.execute(f"DROP FUNCTION IF EXISTS public.{name}()")
        if has_events:
            for name in EVENT_TRIGGERS:
                await conn.execute(f"DROP EVENT TRIGGER IF EXISTS {name}")
            await conn.execute(f"DROP FUNCTION IF EXISTS public.{DDL_FUNCTION}()")
        await _announce_dropped(conn, [row[1] for row in rows])
    return [f"{row[0]}.{row[1]}" for row in rows]


def cascade_closure(edges: Any) -> dict[str, frozenset[str]]:
    """parent -> every table a write to it may change through chains of FK actions."""
    direct: dict[str, set[str]] = {}
    for parent, child in edges:
        direct.setdefault(parent, set()).add(child)
    closure: dict[str, frozenset[str]] = {}
    for start in direct:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for child in direct.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        seen.discard(start)
        closure[start] = frozenset(seen)
    return closure


def parse_payload(payload: str) -> tuple[list[str], frozenset[str] | None, dict[str, frozenset[int]] | None]:
    """Table names of one notification; the columns the write changed (None: any may have); and
    per integer column, its values in the rows the write changed (None: any rows). A JSON array
    of names, an object ``{"tables": [...], "columns": [...], "keys": {column: [values]}}``, or a
    bare name."""
    try:
        names = json.loads(payload)
    except ValueError:
        return ([payload] if payload else []), None, None
    if isinstance(names, dict):
        tables, columns, keys = names.get("tables"), names.get("columns"), names.get("keys")
        found = [str(name) for name in tables] if isinstance(tables, list) else []
        changed = None
        if isinstance(columns, list) and columns:
            changed = frozenset(str(column) for column in columns)
        rows: dict[str, frozenset[int]] | None = None
        if isinstance(keys, dict) and found:
            rows = {}
            for column, values in keys.items():
                if values is None:
                    values = []  # json_agg over no rows: the write changed no row
                if not isinstance(values, list) or not all(
                        isinstance(v, int) and not isinstance(v, bool) or v is None for v in values):
                    rows = None
                    break
                rows[str(column)] = frozenset(v for v in values if v is not None)
        return found, changed, rows
    if isinstance(names, list):
        return [str(name) for name in names], None, None
    return ([str(names)] if names is not None else []), None, None


def _add_linked(keys: set[str], links: dict[str, frozenset[str]]) -> None:
    """Add to ``keys`` every table ``links`` (a ``cascade_closure``) maps one of them to."""
    for key in list(keys):
        more = links.get(key)
        if more:
            keys |= more


async def close_quietly(closable: Any, timeout: float = 2.0) -> None:
    """Close an asyncpg connection or pool politely; terminate it when that fails (a dead one)."""
    try:
        await asyncio.wait_for(closable.close(), timeout)
    except Exception:  # noqa: BLE001 - already broken
        closable.terminate()


class ListenLoop:
    """A task that keeps a LISTEN connection: connect, serve until it fails, go down, close, back
    off (0.5 s, doubling to 10 s), again. Used by the cache's InvalidationMonitor and the agent's
    webhook emitter; a subclass provides ``_connect``, ``_serve``, ``_went_down``, ``_close``, a
    ``ready`` flag, ``database`` and the name of its failure log event."""

    FAILED_EVENT = "listen_failed"
    database: str
    last_error: str | None
    ready: bool  # an attribute or a property of the subclass
    _task: asyncio.Task[None] | None

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _went_down(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{type(self).__name__}")

    async def _cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_ready(self, timeout: float) -> bool:
        """For tests and start-up: wait until ``ready`` (True) or ``timeout`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.ready:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._connect()
                delay = 0.5
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: go down, wait, reconnect
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                logging.getLogger(type(self).__module__).warning(
                    self.FAILED_EVENT, extra={"database": self.database, "error": self.last_error})
            await self._went_down()
            await self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


FENCE_TIMEOUT_S = 5.0
# The names at the head of a rows trigger's payload, when none holds a quote or a backslash.
_PAYLOAD_TABLES = re.compile(r'\{"tables" : \[("[^"\\]*"(?:, "[^"\\]*")*)\]')


class Watch:
    """The tables notified by one server backend (``pid``) while a transaction of a session
    writes through it, up to the fence after its commit (``InvalidationMonitor.watch``)."""

    __slots__ = ("pid", "tables")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tables: set[str] = set()  # match keys, with their relatives


class InvalidationMonitor(ListenLoop):
    """The LISTEN connection of one database, and its catalog facts."""

    FAILED_EVENT = "cache_listen_failed"

    def __init__(self, cache: ResultCache, endpoint: Endpoint, refresh_s: float = 30.0, *,
                 column_invalidation: bool = True, row_invalidation: bool = True) -> None:
        self.cache = cache
        self.column_invalidation = column_invalidation  # else every notification evicts per table
        self.endpoint = endpoint
        self.database = endpoint.database
        self.refresh_s = refresh_s
        self.ready = False  # listening: results of this database may be served and stored
        self.tracked: frozenset[str] = frozenset()  # match keys of tables with the trigger
        # Tables whose UPDATEs are notified per column and change only what they set (see
        # _TRACKED_SQL): their UPDATEs evict only results that read a column set.
        self.column_safe: frozenset[str] = frozenset()
        self.keyed: frozenset[str] = frozenset()  # tables whose writes notify the rows they change
        self.user_functions: frozenset[str] = frozenset()  # lowercased names, any volatility
        self.writer_functions: frozenset[str] = frozenset()  # lowercased names
        self.views: frozenset[str] = frozenset()  # match keys of views
        self.after_triggers: frozenset[str] = frozenset()  # tables with the app's AFTER triggers
        self.cascades: dict[str, frozenset[str]] = {}  # table -> tables its FK actions change
        self.update_cascades: dict[str, frozenset[str]] = {}  # ... those of ON UPDATE only
        # table -> its partitions / inheritance children and parents, transitively: a write to one
        # may change the rows another reads (same column names: column facts hold for all)
        self.relatives: dict[str, frozenset[str]] = {}
        self.notifications = 0
        self.connects = 0
        self.drops = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh = asyncio.Event()
        self._lost = asyncio.Event()
        self._conn: Any = None
        # Writes through the proxy, fenced (see ``commit_fenced``)
        self.row_invalidation = row_invalidation  # else notifications' row keys are ignored, no fences
        self.fences = 0
        self.fence_fallbacks = 0  # committed writes some table of which no trigger notified
        self._watches: dict[int, list[Watch]] = {}
        self._fenced: list[tuple[WriteMarks, Watch]] = []
        self._fence_task: asyncio.Task[None] | None = None
        self._conn_lock = asyncio.Lock()  # the fences and the catalog's queries share the connection
        self._fence_waiter: asyncio.Future[None] | None = None
        self._fence_payload = ""
        self._fence_prefix = secrets.token_hex(6) + "-"
        self._fence_number = 0

    def refresh_soon(self) -> None:
        self._refresh.set()

    async def stop(self) -> None:
        await self._cancel()
        await self._stop_fences()
        await self._close()
        self.ready = False

    async def _stop_fences(self) -> None:
        task = self._fence_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        batch, self._fenced = self._fenced, []
        self._release(batch, False)

    # ------------------------------------------------------------------ internals

    async def _connect(self) -> None:
        import asyncpg

        ep = self.endpoint
        self._lost.clear()
        # synchronous_commit off: a fence NOTIFY need not wait for its commit record to be flushed.
        conn = await asyncpg.connect(statement_cache_size=0,
                                     **ep.connect_args("pgsidecar-cache-listen", synchronous_commit="off"))
        self._conn = conn
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        await conn.add_listener(DDL_CHANNEL, self._ddl_notified)
        await conn.add_listener(FENCE_CHANNEL, self._fence_arrived)
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
            async with self._conn_lock:  # not while a fence uses the connection
                await self._load_catalog()

    async def _load_catalog(self) -> None:
        conn = self._conn
        tracked = await conn.fetch(_TRACKED_SQL)
        functions = await conn.fetch(_FUNCTIONS_SQL)
        views = await conn.fetch(_VIEWS_SQL)
        after = await conn.fetch(_AFTER_TRIGGERS_SQL)
        edges = await conn.fetch(_CASCADES_SQL)
        family = [(table_match_key(r[0]), table_match_key(r[1])) for r in await conn.fetch(_INHERITS_SQL)]
        new_tracked = frozenset(table_match_key(r[0]) for r in tracked if (r[4] and (r[1] or r[2])) or r[5])
        unsafe = {table_match_key(r[0]) for r in tracked if r[1] or not r[2] or r[3]}
        new_safe = new_tracked - unsafe
        self.keyed = frozenset(table_match_key(r[0]) for r in tracked if r[5])
        new_user_functions = frozenset(r[0].lower() for r in functions)
        new_writers = frozenset(r[0].lower() for r in functions if r[1])
        new_views = frozenset(table_match_key(r[0]) for r in views)
        new_after = frozenset(table_match_key(r[0]) for r in after)
        new_cascades = cascade_closure((table_match_key(r[0]), table_match_key(r[1])) for r in edges)
        new_update_cascades = cascade_closure((table_match_key(r[0]), table_match_key(r[1])) for r in edges if r[2])
        new_relatives = cascade_closure(family + [(child, parent) for parent, child in family])
        loosened = (not new_tracked >= self.tracked or not new_writers <= self.writer_functions
                    or not new_views <= self.views or not new_after <= self.after_triggers
                    or new_cascades != self.cascades or new_update_cascades != self.update_cascades
                    or new_relatives != self.relatives
                    or not new_user_functions <= self.user_functions)
        if self.ready and loosened:
            # A trigger was dropped, a writer function, a user function (results stored per column
            # may depend on what it reads) or a foreign-key action appeared ...: entries
            # stored under the old facts may no longer be invalidated when they should be.
            self.cache.flush("flush")
        self.tracked = new_tracked
        self.column_safe = new_safe
        self.user_functions = new_user_functions
        self.writer_functions = new_writers
        self.views = new_views
        self.after_triggers = new_after
        self.cascades = new_cascades
        self.update_cascades = new_update_cascades
        self.relatives = new_relatives

    # ------------------------------------------------------------------ writes through the proxy
    def watch(self, pid: int) -> Watch:
        """A session's transaction starts writing through server backend ``pid``: collect the
        tables that backend's triggers notify from now on, until ``commit_fenced``'s fence or
        ``unwatch``."""
        found = Watch(pid)
        self._watches.setdefault(pid, []).append(found)
        return found

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.pid)
        if watches is not None:
            try:
                watches.remove(watch)
            except ValueError:
                pass
            if not watches:
                del self._watches[watch.pid]

    def commit_fenced(self, marks: WriteMarks, watch: Watch) -> bool:
        """The transaction that marked ``marks`` committed through ``watch``'s backend: keep the
        marks (what it wrote is neither served nor stored) until a fence shows every notification
        of that commit has arrived, then release them; the tables no trigger notified are
        invalidated then as a write through the proxy always was (per table or column). False
        (the caller invalidates now) when not listening, or when a table written is not ``keyed``
        (its notification would name no rows: evicting at once is as precise), or when no stored
        result read a table written (the usual write of a table no one reads through the cache:
        fences cost a NOTIFY each, and PostgreSQL serialises the commits of NOTIFYing transactions).

        The fence is a NOTIFY sent on this LISTEN connection after the commit was seen: the
        notification queue is in commit order, so when the fence comes back every notification
        of transactions committed before it has been handled. The triggers' notifications name
        the rows a write changed, which the proxy cannot know: cached reads of other rows stay."""
        if not self.ready or self._conn is None or not self.row_invalidation:
            return False
        keyed = self.keyed
        if not all(key in keyed for key in marks.tables):
            return False  # a notification would name no rows: evicting now is as precise
        if not watch.tables and not any(map(self.cache.holds, marks.tables)):
            # No stored result read them: nothing to spare, evicting now is as precise. (Not when
            # a notification of that backend is in already: it may have evicted them itself, and
            # the fence then keeps one invalidation per write instead of two.)
            return False
        self._fenced.append((marks, watch))
        if self._fence_task is None:
            # A task of its own, started at once: under load every hop through the event loop
            # costs milliseconds (the LISTEN loop's wake-up took ~20 ms at 50 clients).
            self._fence_task = asyncio.get_running_loop().create_task(self._fence_loop(), name="cache-fence")
        return True

    async def _fence_loop(self) -> None:
        """Fence whatever committed, round after round, until nothing waits. A failure (the
        connection broke: the LISTEN loop goes down and flushes) releases what waits."""
        try:
            while self._fenced and self.ready:
                async with self._conn_lock:
                    await self._fence()
        except Exception as exc:  # noqa: BLE001 - the LISTEN loop sees the connection's state
            log.info("cache_fence_failed", extra={"database": self.database, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._fence_task = None
            batch, self._fenced = self._fenced, []
            self._release(batch, False)

    async def _fence(self) -> None:
        batch, self._fenced = self._fenced, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        self._fence_number += 1
        payload = self._fence_payload = f"{self._fence_prefix}{self._fence_number}"
        waiter = self._fence_waiter = loop.create_future()
        arrived = False
        try:
            await self._conn.execute(f"NOTIFY {FENCE_CHANNEL}, {quote_literal(payload)}")
            lost = loop.create_task(self._lost.wait())
            try:
                await asyncio.wait({waiter, lost}, timeout=FENCE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
            arrived = waiter.done()
        finally:
            self._fence_waiter = None
            self.fences += 1
            self._release(batch, arrived)

    def _release(self, batch: list[tuple[WriteMarks, Watch]], arrived: bool) -> None:
        for marks, watch in batch:
            self.unwatch(watch)
            notified = watch.tables if arrived else ()
            if any(key not in notified for key in marks.tables):
                self.fence_fallbacks += 1
            self.cache.end_write(marks, True, notified)

    def _fence_arrived(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        waiter = self._fence_waiter
        if waiter is not None and payload == self._fence_payload and not waiter.done():
            waiter.set_result(None)

    def _notified(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        if pid not in self._watches:
            # The usual notification of a table no stored result read (a login, a logged event):
            # its names alone, without reading the rest of the JSON, and evicted per table.
            match = _PAYLOAD_TABLES.match(payload)
            if match is not None:
                names = self.with_relatives(match.group(1)[1:-1].split('", "'))
                if not any(self.cache.holds(table_match_key(name)) for name in names):
                    self.cache.invalidate(names, "notify")
                    return
        tables, columns, keys = parse_payload(payload)
        if tables:
            tables = self.with_relatives(tables)
            watches = self._watches.get(pid)
            if watches:
                matched = {table_match_key(table) for table in tables}
                for watch in watches:
                    watch.tables |= matched
            self.cache.invalidate(tables, "proxy" if watches else "notify", self.columns_of(tables, columns),
                                  self.keys_of(tables, keys))

    def keys_of(self, tables: Any, keys: dict[str, frozenset[int]] | None) -> dict[str, dict[str, frozenset[int]]] | None:
        """The invalidation's row keys for a write to ``tables`` whose rows held ``keys``."""
        if keys is None or not self.row_invalidation:
            return None
        return {table_match_key(table): keys for table in tables}

    def with_relatives(self, tables: list[str]) -> list[str]:
        """``tables`` and their partitions, inheritance children and parents."""
        if not self.relatives:
            return tables
        found = {table_match_key(table) for table in tables}
        _add_linked(found, self.relatives)
        return list(found)

    def columns_of(self, tables: Any, columns: frozenset[str] | None) -> dict[str, frozenset[str]] | None:
        """The invalidation's column map for an UPDATE of ``tables`` that set ``columns``: only
        for the column-safe ones (None: per table)."""
        if columns is None or not self.column_safe or not self.column_invalidation:
            return None
        safe = self.column_safe
        found = {key: columns for key in map(table_match_key, tables) if key in safe}
        return found or None

    def _ddl_notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        """DDL straight on the server: evict its tables, and re-read the catalog facts."""
        self.notifications += 1
        tables, _, _ = parse_payload(payload)
        if tables:
            self.cache.invalidate(self.with_relatives(tables), "notify")
        self.refresh_soon()

    def expand_writes(self, keys: set[str], kind: str = "") -> bool:
        """Add to ``keys`` (match keys of written tables) the tables their foreign-key actions
        change and their partitions, inheritance children and parents; False when a write may
        reach tables no one can name (a view, an AFTER trigger, on any of them). ``kind``
        "update" or "insert" (ON CONFLICT DO UPDATE): only ON UPDATE actions can fire (an
        ON DELETE CASCADE cannot)."""
        cascades = self.update_cascades if kind in ("update", "insert") else self.cascades
        for links in (self.relatives, cascades, self.relatives):  # a cascade may reach a family
            _add_linked(keys, links)
        return keys.isdisjoint(self.views) and keys.isdisjoint(self.after_triggers)

    async def _went_down(self) -> None:
        if self.ready:
            self.drops += 1
        self.ready = False
        await self._stop_fences()
        # Writes may go unseen from now on: nothing cached may be served any more.
        self.cache.flush("flush")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await close_quietly(conn)
