"""The result cache in front of the pools: what a client session asks before and after a statement.

Owns the glue between sessions and the cache (issue 4): ``CacheFront`` (one per proxy) holds the
``ResultCache``, one ``InvalidationMonitor`` per database, and the settings; sessions call it

- ``lookup`` for a simple-protocol Query or an extended-protocol segment while the client is
  idle (no transaction open, nothing outstanding): a hit returns the stored response to replay, a cacheable miss a ``Fill`` that
  collects the server's response as it is forwarded, anything else None (counted by reason);
- ``finish`` at the ReadyForQuery that ends a Fill: the response is stored only if it is exactly
  RowDescription/DataRow*/CommandComplete/ReadyForQuery('I') (no error, notice, notification or
  ParameterStatus in it), within ``max_result_bytes``, and not raced by an invalidation;
- ``classify`` for every statement a client runs (Query text, and the text of every Bind), to
  collect the tables the client's transaction writes. The session marks them in the cache from
  the first write on (``ResultCache.begin_write``: their entries are neither served nor stored
  while the transaction is open, which closes the window between the server's commit and the
  proxy seeing it), and at the ReadyForQuery that ends the transaction (status idle) releases the
  marks and evicts the tables' entries (``end_write``): immediately in autocommit, never on
  rollback (the entries are still right then).

What a stored value is: 8 bytes of row count (for the statistics of a hit) followed by the server's
response bytes, ReadyForQuery included, exactly as they came. A hit is replayed with one write.

Choices where the issue is silent:

- Both protocols are cached. Simple: a Query of one SELECT. Extended: a segment that is exactly
  Parse?, Bind, Describe?, Execute, Sync arriving in one read (psycopg 3, asyncpg, pgbench -M
  extended/prepared, JDBC), keyed by the statement's text, the Parse parameter types, the Bind
  parameter values and formats, the result formats and the Describes; a hit replays the whole
  segment's response (ParseComplete, BindComplete, ...) and registers the named statements the
  segment parsed, as if a server had prepared them. Segments with Close, Flush, several Executes
  or a statement the proxy does not know pass through uncached; a Bind parameter that reads the
  clock ('now', 'today', ...) bypasses ("volatile_literal").
- With ``cache.require_triggers`` (default) only results whose every table carries the invalidation
  trigger are cached ("no_trigger" otherwise): then writes that bypass the proxy are seen too, and
  views, materialized views and foreign tables (which cannot carry it) are never cached.
- A statement that calls a user-defined VOLATILE function may write anything: it is never cached
  ("writer_function"), and a transaction that ran one flushes the whole cache when it commits.
  So do CALL, DO, the fast-path function call, statements that did not parse, and COMMIT PREPARED.
- Invalidation per column (``cache.column_invalidation``, default on): a Fill carries the columns
  its SELECT references per table (``proxy.columns``, memoised per statement shape) unless it calls
  a user-defined function; an UPDATE of a column-safe table (``InvalidationMonitor.column_safe``)
  is classified with the columns it sets, and the session's transaction marks, evicts and refuses
  racing reads only for those columns.
- Invalidation per row (``cache.row_invalidation``, default on): a Fill on a keyed table
  (``InvalidationMonitor.keyed``) carries, per table, the integer column and values its WHERE pins
  the rows to (``proxy.columns.read_keys``: literals from the text, ``$n`` from the Bind: a text
  value holding an integer, or a binary int2/4/8); the triggers' notifications name the values in
  the rows each write changed, and an entry of other rows stays. Writes through the proxy are
  fenced (``InvalidationMonitor.commit_fenced``) so that their own notifications decide.
- Sessions with state the key does not hold (pinned clients: temp tables, session SET, SET ROLE;
  in session mode any such statement) bypass the cache ("session_state").
"""
from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .cache import (
    HINT_MARK,
    CachedResult,
    RowKey,
    CacheSnapshot,
    ReadToken,
    ResultCache,
    cache_key,
    decide,
    table_match_key,
)
from .columns import KeyValue, integer_text, read_columns, read_keys, update_columns, write_keys
from .fingerprint import decode_sql, numbered, plain_numbers
from .invalidation import InvalidationMonitor

if TYPE_CHECKING:
    from config.settings import CacheSettings

    from .fingerprint import Fingerprint, Fingerprinter
    from .server import Endpoint

T = TypeVar("T")
_H = struct.Struct("!h")
_L = struct.Struct("!i")
_D = ord("D")
_T = ord("T")
_C = ord("C")
_Z = ord("Z")
_I = ord("I")
_ROLLBACK = ("ROLLBACK", "ABORT")
_COLUMN_MEMO = 10_000
_MEMO_TEXT_LIMIT = 8_000  # below Fingerprinter.max_normalized_chars: a normalised text shorter is whole
_UNKNOWN_WRITERS = ("CALL", "DO", "EXECUTE")
_WITH = re.compile(rb"with", re.IGNORECASE)  # a CTE may hide more writes (any "with" counts)

# What classify() says about a statement.
READ = 0  # writes nothing the cache holds
WRITE = 1  # writes the tables returned
FLUSH = 2  # may write anything: flush at commit
ROLLBACK = 3  # ends the transaction without committing it
CHAIN = 4  # COMMIT AND CHAIN: commits, and a new transaction begins at once


@dataclass(frozen=True, slots=True)
class MonitorSnapshot:
    """One database's LISTEN connection, for the API and metrics."""

    database: str
    ready: bool  # listening: results of this database are served and stored
    tracked_tables: int  # tables carrying the invalidation trigger
    writer_functions: int  # user-defined VOLATILE functions (never cached; flush on commit)
    notifications: int
    connects: int
    drops: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class FrontSnapshot:
    mode: str
    ttl_s: float
    require_triggers: bool
    cache: CacheSnapshot
    monitors: tuple[MonitorSnapshot, ...]


class Fill:
    """A cacheable miss in flight: the response bytes as they are forwarded to the client."""

    __slots__ = ("key", "tables", "ttl", "token", "parts", "size", "limit", "dead", "extended", "columns",
                 "fingerprint", "keys")

    def __init__(self, key: bytes, tables: tuple[str, ...], ttl: float, token: ReadToken, limit: int,
                 extended: bool = False, columns: dict[str, frozenset[str]] | None = None,
                 fingerprint: Fingerprint | None = None, keys: dict[str, RowKey] | None = None) -> None:
        self.extended = extended
        self.keys = keys  # per table, (column, values): the only rows the result depends on
        self.fingerprint = fingerprint
        self.columns = columns  # per table, the only columns the result depends on (see proxy.columns)
        self.key = key
        self.tables = tables
        self.ttl = ttl
        self.token = token
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.dead = False  # too large: nothing will be stored

    def add(self, data: bytes) -> None:
        if self.dead:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.dead = True
            self.parts.clear()
        else:
            self.parts.append(data)


def _bypass_label(reason: str) -> str:
    """Bounded label for a bypass reason: "volatile_function:now" counts as "volatile_function"."""
    return reason.split(":", 1)[0]


_SIMPLE_TYPES = frozenset(b"T")
# Extended protocol: ParseComplete, BindComplete, ParameterDescription, NoData, RowDescription.
_EXTENDED_TYPES = frozenset(b"12tnT")
_VOLATILE_PARAM = re.compile(rb"\b(?:now|today|tomorrow|yesterday)\b", re.IGNORECASE)


def volatile_params(bind: bytes, pos: int) -> bool:
    """True if a text parameter of the Bind message body ``bind`` (its parameter count at
    ``pos``) is a datetime input read from the clock ('now', 'today', ...)."""
    (count,) = _H.unpack_from(bind, pos)
    pos += 2 + 2 * count  # parameter format codes
    (params,) = _H.unpack_from(bind, pos)
    pos += 2
    for _ in range(params):
        (length,) = _L.unpack_from(bind, pos)
        pos += 4
        if 0 < length <= 64 and _VOLATILE_PARAM.search(bind, pos, pos + length) is not None:
            return True
        if length > 0:
            pos += length
    return False


_INT_TYPES = {0: (2, 4, 8), 21: (2,), 23: (4,), 20: (8,)}  # parameter type OID -> binary lengths


def _has_keys(text: str) -> bool:
    return bool(read_keys(text))


def _has_write_keys(text: str) -> bool:
    return write_keys(text) is not None


def _plain_integer(numbers: list[bytes], number: int) -> int | None:
    """The ``number``-th (1-based) of a plain text's numbers, when it is an integer."""
    if not 0 < number <= len(numbers):
        return None
    text = numbers[number - 1]
    return int(text) if text.isdigit() else None


def _keys_by_text(compute: Callable[[str], T], plain: dict[bytes, T], texts: dict[bytes, T], sql: bytes,
                  encoding: str) -> tuple[T, list[bytes] | None]:
    """``compute`` (``read_keys`` or ``write_keys``) of ``sql``, and a plain text's numbers.

    A text with only numbers for literals (no quote, ``$``, comment or backslash: what an app
    interpolating ids sends) is read by its shape: its numbers, in order, become ``$1``, ``$2``
    ... once per shape (memo ``plain``), and a text of that shape takes the values of its own
    numbers (``_resolve``: one regex pass, no parse). Any other text is computed once per exact
    text (memo ``texts``: parameter texts repeat). Each memo is cleared when it holds _COLUMN_MEMO."""
    shaped = plain_numbers(sql)
    if shaped is not None:
        memo, memo_key = plain, shaped[0]
    else:
        memo, memo_key = texts, sql
    if memo_key in memo:
        found = memo[memo_key]
    else:  # (numbered only now: a regex pass with a Python call per number, for a new shape)
        found = compute(decode_sql(sql if shaped is None else numbered(sql), encoding))
        if len(memo) >= _COLUMN_MEMO:
            memo.clear()
        memo[memo_key] = found
    return found, None if shaped is None else shaped[1]


def _resolve(values: tuple[KeyValue, ...], numbers: list[bytes] | None, bind: Bind | None) -> frozenset[int] | None:
    """Key values as integers: literals as they are, ``$n`` the n-th number of a plain text or
    parameter n of ``bind``; None when one is not plainly an integer."""
    resolved: set[int] = set()
    for value in values:
        if isinstance(value, int):
            number: int | None = value
        elif numbers is not None:
            number = _plain_integer(numbers, int(value[1:]))
        else:
            number = None if bind is None else bind.integer(int(value[1:]))
        if number is None:
            return None
        resolved.add(number)
    return frozenset(resolved)


class Bind:
    """The parameters of one Bind message, read when a keyed read needs one as an integer."""

    __slots__ = ("body", "pos", "types")

    def __init__(self, body: bytes | bytearray, pos: int, parse: bytes | None) -> None:
        self.body = body  # the message (or a buffer holding it)
        self.pos = pos  # where its parameter format count is
        self.types = parse  # the statement's Parse message after its name (text, types), if known

    def integer(self, number: int) -> int | None:
        """Parameter ``number`` (1-based) as an integer, or None when it is not plainly one: a
        text value holding only an integer, or a binary int2/int4/int8 (by its declared type, or
        of the length of one when the server infers its type)."""
        try:
            body, pos = self.body, self.pos
            (nformats,) = _H.unpack_from(body, pos)
            if nformats == 0:
                fmt = 0
            else:
                index = 0 if nformats == 1 else number - 1
                if index >= nformats:
                    return None
                (fmt,) = _H.unpack_from(body, pos + 2 + 2 * index)
            pos += 2 + 2 * nformats
            (nparams,) = _H.unpack_from(body, pos)
            if not 0 < number <= nparams:
                return None
            pos += 2
            for _ in range(number - 1):
                (length,) = _L.unpack_from(body, pos)
                pos += 4 + max(length, 0)
            (length,) = _L.unpack_from(body, pos)
            if length < 0:
                return None  # NULL
            value = body[pos + 4 : pos + 4 + length]
            if fmt == 0:
                return integer_text(bytes(value).decode("latin-1"))
            oid = self._type(number)
            if oid is None or length not in _INT_TYPES.get(oid, ()):
                return None
            return int.from_bytes(value, "big", signed=True)
        except (struct.error, ValueError):
            return None

    def _type(self, number: int) -> int | None:
        """The declared type OID of parameter ``number`` (0: unspecified), None when unknown."""
        parse = self.types
        if parse is None:
            return None
        end = parse.find(0)
        if end < 0:
            return None
        (count,) = _H.unpack_from(parse, end + 1)
        if number > count:
            return 0
        return int(_L.unpack_from(parse, end + 3 + 4 * (number - 1))[0])


def _check_response(data: bytes, extended: bool = False) -> int:
    """Rows of a storable response, or -1 when it must not be stored. Simple protocol:
    T D* C Z('I'); extended: any of ParseComplete, BindComplete, ParameterDescription, NoData,
    RowDescription, then D* C Z('I'). Never an error, notice, notification or ParameterStatus."""
    allowed = _EXTENDED_TYPES if extended else _SIMPLE_TYPES
    n = len(data)
    if n < 6 or data[n - 6] != _Z or data[n - 1] != _I:
        return -1
    pos = 0
    tag = -1
    rows = 0
    while pos < n - 6:
        t = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if t == _D:
            rows += 1
        elif t == _C:
            if tag >= 0:
                return -1
            tag = pos
        elif t not in allowed:
            return -1
        pos += 1 + length
    if pos != n - 6 or tag < 0:
        return -1
    return rows


class CacheFront:
    """One per proxy: the cache, its monitors and its policy."""

    def __init__(self, settings: CacheSettings, fingerprinter: Fingerprinter) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.ttl = settings.ttl_s
        self.require_triggers = settings.require_triggers
        self.fingerprinter = fingerprinter
        self.cache = ResultCache(settings.max_bytes, settings.max_result_bytes)
        self.monitors: dict[str, InvalidationMonitor] = {}
        self.fills = 0  # Fills started (for tests and the API)
        self.column_invalidation = settings.column_invalidation
        self.row_invalidation = settings.row_invalidation
        # proxy.columns' answers by (fingerprint id, normalised text): texts that differ only in
        # literal values reference the same columns. Cleared when it reaches _COLUMN_MEMO.
        self._reads: dict[tuple[str, str], dict[str, frozenset[str]]] = {}
        self._updates: dict[tuple[str, str], tuple[str, frozenset[str]] | None] = {}
        # Whether a statement shape restricts a table's rows by key (proxy.columns.read_keys), and
        # read_keys' answers by exact text (parameter texts repeat; literal texts mostly do not).
        self._key_shapes: dict[tuple[str, str], bool] = {}
        self._key_texts: dict[bytes, dict[str, tuple[str, tuple[KeyValue, ...]]]] = {}
        self._key_plain: dict[bytes, dict[str, tuple[str, tuple[KeyValue, ...]]]] = {}  # by text shape
        # ... and of UPDATEs (proxy.columns.write_keys)
        self._write_shapes: dict[tuple[str, str], bool] = {}
        self._write_plain: dict[bytes, tuple[str, str, tuple[KeyValue, ...]] | None] = {}
        self._write_texts: dict[bytes, tuple[str, str, tuple[KeyValue, ...]] | None] = {}  # by exact text

    # ------------------------------------------------------------------ monitors
    def monitor_for(self, database: str, endpoint: Endpoint) -> InvalidationMonitor:
        monitor = self.monitors.get(database)
        if monitor is None:
            monitor = self.monitors[database] = InvalidationMonitor(
                self.cache, endpoint, self.settings.catalog_refresh_s,
                column_invalidation=self.column_invalidation, row_invalidation=self.row_invalidation)
            monitor.start()
        return monitor

    async def stop(self) -> None:
        for monitor in list(self.monitors.values()):
            await monitor.stop()

    def snapshot(self) -> FrontSnapshot:
        return FrontSnapshot(
            mode=self.mode, ttl_s=self.ttl, require_triggers=self.require_triggers, cache=self.cache.snapshot(),
            monitors=tuple(
                MonitorSnapshot(database=m.database, ready=m.ready, tracked_tables=len(m.tracked),
                                writer_functions=len(m.writer_functions), notifications=m.notifications,
                                connects=m.connects, drops=m.drops, last_error=m.last_error)
                for m in self.monitors.values()),
        )

    # ------------------------------------------------------------------ reads
    def lookup(self, sql: bytes, database: str, user: str, settings: str, encoding: str,
               endpoint: Endpoint, segment: bytes = b"", bind: Bind | None = None) -> CachedResult | Fill | None:
        """A stored entry (hit: its ``response`` and ``fingerprint``), a Fill (cacheable miss), or
        None (bypass, counted).

        ``settings`` is every session setting that shapes a result (search_path, TimeZone,
        DateStyle, client_encoding, ...) as one string: part of the key. ``segment``, for the
        extended protocol, is the client's messages up to Sync with statement names replaced by
        their text (so Bind parameters, formats and Describes are in the key); empty for a Query.
        ``bind``: its Bind's parameters, for the rows a keyed read depends on."""
        cache = self.cache
        if self.mode == "hinted" and HINT_MARK not in sql:
            cache.not_hinted += 1
            return None
        monitor = self.monitor_for(database, endpoint)
        if not monitor.ready:
            cache.record_bypass("not_listening")
            return None
        key = cache_key(database, user, settings, sql, segment)
        hit = cache.peek_entry(key)
        if hit is not None:
            # Stored under this exact key, so it passed every check below; the checks that depend
            # on the catalog (triggers, writer functions) flush the cache when they loosen.
            return hit
        fp = self.fingerprinter.of_bytes(sql, encoding)
        decision = decide(fp, sql, mode=self.mode, in_transaction=False, default_ttl=self.ttl)
        if not decision.cacheable:
            cache.record_bypass(_bypass_label(decision.reason))
            return None
        writers = monitor.writer_functions
        if writers:
            for function in fp.functions:
                if function.rsplit(".", 1)[-1] in writers:
                    cache.record_bypass("writer_function")
                    return None
        if self.require_triggers:
            tracked = monitor.tracked
            for table in decision.tables:
                if table_match_key(table) not in tracked:
                    cache.record_bypass("no_trigger")
                    return None
        cache.record_miss()
        self.fills += 1
        columns = keys = None
        if (self.column_invalidation and monitor.column_safe) or (self.row_invalidation and monitor.keyed):
            # A user-defined function may read columns and rows the text does not name.
            user_functions = monitor.user_functions
            if not any(function.rsplit(".", 1)[-1] in user_functions for function in fp.functions):
                if self.column_invalidation and monitor.column_safe:
                    columns = self._read_columns(fp, sql, encoding)
                if self.row_invalidation and monitor.keyed:
                    keys = self._read_keys(fp, sql, encoding, monitor.keyed, bind)
        return Fill(key, decision.tables, decision.ttl, cache.begin_read(decision.tables),
                    cache.max_result_bytes + 6, bool(segment), columns, fp, keys)

    def _read_keys(self, fp: Fingerprint, sql: bytes, encoding: str, keyed: frozenset[str],
                   bind: Bind | None) -> dict[str, RowKey] | None:
        """Per keyed table, (column, values): the only rows of it the result depends on."""
        if not _memoised(self._key_shapes, _has_keys, fp, sql, encoding):
            return None
        found, numbers = _keys_by_text(read_keys, self._key_plain, self._key_texts, sql, encoding)
        keys: dict[str, RowKey] = {}
        for table, (column, values) in found.items():
            if table in keyed:
                resolved = _resolve(values, numbers, bind)
                if resolved is not None:
                    keys[table] = (column, resolved)
        return keys or None

    def _read_columns(self, fp: Fingerprint, sql: bytes, encoding: str) -> dict[str, frozenset[str]] | None:
        return _memoised(self._reads, read_columns, fp, sql, encoding) or None

    def _update_columns(self, fp: Fingerprint, sql: bytes, encoding: str) -> tuple[str, frozenset[str]] | None:
        return _memoised(self._updates, update_columns, fp, sql, encoding)

    def finish(self, fill: Fill, status: int) -> bool:
        """The ReadyForQuery that ends ``fill`` came with ``status``: store it if it may be."""
        cache = self.cache
        if fill.dead:
            cache.record_rejected("too_large")
            return False
        data = fill.parts[0] if len(fill.parts) == 1 else b"".join(fill.parts)
        rows = _check_response(data, fill.extended) if status == _I else -1
        if rows < 0:
            cache.record_rejected("not_a_result")
            return False
        return cache.put(fill.key, rows.to_bytes(8, "big") + data, fill.tables, fill.ttl, fill.token, fill.columns,
                         fill.fingerprint, fill.keys)

    # ------------------------------------------------------------------ writes
    def classify(self, sql: bytes, encoding: str, monitor: InvalidationMonitor | None, bind: Bind | None = None
                 ) -> tuple[int, set[str], bool, dict[str, frozenset[str]] | None, dict[str, RowKey] | None]:
        """What ``sql`` does to cached results: (READ|WRITE|FLUSH|ROLLBACK|CHAIN, match keys of the
        tables written, whether it is DDL, and for an UPDATE of a column-safe table the columns it
        sets: {match key: columns}, else None, and the rows it changes: {match key: (key column,
        values)} when its WHERE names them, see ``proxy.columns.write_keys``; ``bind``: the Bind
        that runs it, for its parameters). Writes are expanded with the tables
        their foreign-key actions change (per table; an UPDATE or INSERT only by ON UPDATE
        actions); a write through a view or to a table with the application's AFTER triggers may
        reach tables no one can name: FLUSH."""
        fp = self.fingerprinter.of_bytes(sql, encoding)
        action, tables = self._action(fp, monitor)
        ddl = fp.kind == "ddl"
        if action != WRITE:
            return action, set(), ddl, None, None
        keys = {table_match_key(table) for table in tables}
        plain = fp.statements == 1 and _WITH.search(sql) is None
        if monitor is not None and not monitor.expand_writes(keys, fp.kind if plain else ""):
            return FLUSH, set(), ddl, None, None
        columns = rows = None
        if fp.kind == "update" and monitor is not None and monitor.column_safe:
            if self.column_invalidation:
                found = self._update_columns(fp, sql, encoding)
                if found is not None and found[0] in monitor.column_safe and found[0] in keys:
                    columns = {found[0]: found[1]}
            if self.row_invalidation:
                rows = self._write_rows(fp, sql, encoding, bind)
                if rows is not None and not all(table in monitor.column_safe and table in keys for table in rows):
                    rows = None
        return WRITE, keys, ddl, columns, rows

    def _write_rows(self, fp: Fingerprint, sql: bytes, encoding: str, bind: Bind | None = None
                    ) -> dict[str, RowKey] | None:
        """The rows an UPDATE changes, when its WHERE names them by literals or by parameters of
        ``bind``."""
        if not _memoised(self._write_shapes, _has_write_keys, fp, sql, encoding):
            return None
        found, numbers = _keys_by_text(write_keys, self._write_plain, self._write_texts, sql, encoding)
        if found is None:
            return None
        table, column, values = found
        resolved = _resolve(values, numbers, bind)
        return None if resolved is None else {table: (column, resolved)}

    @staticmethod
    def _action(fp: Fingerprint, monitor: InvalidationMonitor | None) -> tuple[int, tuple[str, ...]]:
        kind = fp.kind
        writers = monitor.writer_functions if monitor is not None else frozenset()
        if writers:
            for function in fp.functions:
                if function.rsplit(".", 1)[-1] in writers:
                    return FLUSH, ()
        if kind == "select":
            return (READ, ()) if fp.read_only else (WRITE, fp.tables)
        if kind == "transaction":
            head = fp.normalized.lstrip().upper()
            if head.startswith(_ROLLBACK) and not head.startswith(("ROLLBACK TO", "ROLLBACK PREPARED")):
                return ROLLBACK, ()
            if head.startswith(("COMMIT", "END")) and "AND CHAIN" in head and "AND NO CHAIN" not in head:
                return CHAIN, ()
            if head.startswith("COMMIT PREPARED"):
                return FLUSH, ()
            return READ, ()
        if kind == "utility":
            head = fp.normalized.lstrip().upper()
            if head.startswith(_UNKNOWN_WRITERS):
                return FLUSH, ()
            return READ, ()
        if kind == "ddl":
            # CREATE FUNCTION/TRIGGER, ALTER, DROP, TRUNCATE, REFRESH ...: its tables (if any) are
            # written, and the triggers or functions the cache relies on may have changed.
            if "CASCADE" in fp.normalized.upper() and fp.normalized.lstrip().upper().startswith("TRUNCATE"):
                return FLUSH, ()  # TRUNCATE ... CASCADE empties every table referencing them too
            return WRITE, fp.tables
        if kind == "unknown" or not fp.tables:
            return FLUSH, ()  # did not parse, or a write whose tables are not named
        return WRITE, fp.tables


def _memoised(memo: dict[tuple[str, str], T], compute: Callable[[str], T], fp: Fingerprint, sql: bytes,
              encoding: str) -> T:
    """``compute(text)`` memoised by the statement's (fingerprint id, normalised text): texts that
    differ only in literal values share the answer. A normalised text near its cap may not tell two
    statements apart: computed every time. The memo is cleared when it holds _COLUMN_MEMO."""
    memo_key = (fp.id, fp.normalized)
    if memo_key in memo:
        return memo[memo_key]
    found = compute(decode_sql(sql, encoding))
    if len(fp.normalized) < _MEMO_TEXT_LIMIT:
        if len(memo) >= _COLUMN_MEMO:
            memo.clear()
        memo[memo_key] = found
    return found
