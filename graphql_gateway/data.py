"""The gateway's SQL and its batch loaders: every statement the GraphQL gateway sends is written here.

``RequestData`` is built once per GraphQL operation (per event for a subscription) over the
gateway's asyncpg pool, whose client sessions are connected to the proxy itself (see
``graphql_gateway.app``). It owns:

- one ``aiodataloader.DataLoader`` per (relation, arguments) and per table for loads by id, so a
  level of the query tree costs one statement per relation: children are fetched with
  ``fk = ANY($1)`` and cut to a page per parent with ``row_number() OVER (PARTITION BY fk)``,
  rows by id with ``id = ANY($1)``;
- ``statements``: how many statements this operation sent (for the metrics and the tests);
- ``cancel()``: the statements still running when the operation ends (timeout, closed socket),
  whichever task runs them.

Id lists are bound as ``text[]`` and cast to ``bigint[]`` by the server: asyncpg has no built-in
codec for ``bigint[]`` and would introspect the catalog for it on every new session, with a
session-level ``set_config('jit', ...)`` that makes the proxy pin the session to one server
connection for good.

SQL text is built only from the constants below (table and column names, fixed operators);
every value the client chose (ids, ``first``, ``after``, filters) is a bound parameter.
Pagination is keyset on ``id``: ``first`` rows with ``id > after``, in id order (or, where an
order is offered, in that order with ``id`` as the tie-break).
"""
from __future__ import annotations

import json
from asyncio import Future, Task, current_task
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiodataloader import DataLoader

__all__ = ["COLUMNS", "Filter", "Page", "PageError", "RequestData", "Row"]

Row = dict[str, Any]

#: The recruiter tables (migrations/versions/0001_recruiter_schema.py) and the columns served.
COLUMNS: Mapping[str, tuple[str, ...]] = {
    "users": ("id", "email", "full_name", "location", "created_at"),
    "companies": ("id", "name", "industry", "created_at"),
    "resumes": ("id", "user_id", "title", "summary", "skills", "experience_years", "created_at"),
    "jobs": ("id", "company_id", "title", "description", "required_skills", "salary_min", "salary_max",
             "created_at"),
    "matches": ("id", "resume_id", "job_id", "match_score", "created_at"),
    "predictions": ("id", "resume_id", "job_id", "model_version", "predicted_score", "features", "created_at"),
}
#: Every gateway read may be served from the proxy's result cache (``cache.mode: hinted``, the
#: default, caches hinted statements; ``all`` caches them anyway; ``off`` never), invalidated like the
#: app's reads by the tables' triggers.
CACHE_HINT = "/* pgsidecar:cache */"
#: Comparison operators a filter may use (the SQL text of each).
_OPERATORS = {"eq": "=", "ge": ">="}
#: Orders a list may be sorted by: (SQL ORDER BY text, whether keyset on id applies).
ORDERS: Mapping[str, tuple[str, bool]] = {
    "id": ("id", True),
    "match_score_desc": ("match_score DESC, id", False),
}


class PageError(ValueError):
    """A page request the data layer refuses (``first`` out of range, ``after`` with a non-id order)."""


@dataclass(frozen=True, slots=True)
class Page:
    """``first`` rows after id ``after`` in ``order``."""

    first: int
    after: int | None = None
    order: str = "id"

    def check(self, max_page_size: int) -> None:
        if self.first < 0:
            raise PageError(f"first must not be negative, got {self.first}")
        if self.first > max_page_size:
            raise PageError(f"first={self.first} exceeds the maximum page size (graphql.max_page_size={max_page_size})")
        if self.after is not None and not ORDERS[self.order][1]:
            raise PageError(f"after cannot be combined with order {self.order.upper()}: keyset pagination is on id")


@dataclass(frozen=True, slots=True)
class Filter:
    """``column <op> value``; column and op come from the schema, never from the client."""

    column: str
    op: str
    value: Any


def _columns(table: str, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + c for c in COLUMNS[table])


def _row(table: str, record: asyncpg.Record) -> Row:
    row = dict(record)
    if table == "predictions" and isinstance(row.get("features"), str):
        row["features"] = json.loads(row["features"])  # asyncpg returns jsonb as its text
    return row


def _conditions(filters: Sequence[Filter], page: Page, first_param: int) -> tuple[list[str], list[Any]]:
    """WHERE terms and their values, numbered from ``$first_param``."""
    terms: list[str] = []
    args: list[Any] = []
    for f in filters:
        args.append(f.value)
        terms.append(f"{f.column} {_OPERATORS[f.op]} ${first_param + len(args) - 1}")
    if page.after is not None:
        args.append(page.after)
        terms.append(f"id > ${first_param + len(args) - 1}")
    return terms, args


class RequestData:
    """The data access of one operation: loaders, list queries and the statement count."""

    def __init__(self, pool: asyncpg.Pool, max_page_size: int, timeout: float | None = None) -> None:
        self.pool = pool
        self.max_page_size = max_page_size
        self.timeout = timeout
        self.statements = 0
        self._by_id: dict[str, DataLoader[int, Row | None]] = {}
        self.loaded: dict[str, dict[int, Row | None]] = {}  # rows loaded by id so far, per table
        self._children: dict[tuple[Any, ...], DataLoader[int, list[Row]]] = {}
        self._fetching: set[Task[Any]] = set()  # tasks in ``fetch`` now

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one statement on a client session of the gateway's pool (through the proxy)."""
        self.statements += 1
        task = current_task()
        if task is not None:
            self._fetching.add(task)
        try:
            async with self.pool.acquire() as conn:
                return await conn.fetch(sql, *args, timeout=self.timeout)
        finally:
            self._fetching.discard(task)  # type: ignore[arg-type]

    def cancel(self) -> None:
        """Cancel the statements still running for this operation.

        The loaders run their batches in tasks of their own (``aiodataloader`` starts one per
        batch), which cancelling the operation does not reach: without this, a relation's statement
        of an operation that timed out (or whose result nobody awaits any more) would go on holding
        a gateway session and a server connection, however long it ran."""
        for task in list(self._fetching):
            if task is not current_task():
                task.cancel()

    # ------------------------------------------------------------------ by id
    def by_id(self, table: str) -> DataLoader[int, Row | None]:
        loader = self._by_id.get(table)
        if loader is None:
            sql = f"{CACHE_HINT} SELECT {_columns(table)} FROM {table} WHERE id = ANY($1::text[]::bigint[])"

            loaded = self.loaded.setdefault(table, {})

            async def load(ids: list[int]) -> list[Row | None]:
                rows = {r["id"]: _row(table, r) for r in await self.fetch(sql, [str(i) for i in ids])}
                for i in ids:
                    loaded[i] = rows.get(i)
                return [rows.get(i) for i in ids]

            loader = self._by_id[table] = DataLoader(load)
        return loader

    def get(self, table: str, id_: int) -> Future[Row | None]:
        """The row of ``table`` with id ``id_`` (None when there is none), batched with the other gets."""
        return self.by_id(table).load(id_)

    def get_missing(self, table: str, ids: Iterable[int | None]) -> list[Future[Row | None]]:
        """Loads of the distinct ``ids`` of ``table`` not loaded yet (None ids skipped), batched like ``get``."""
        loader = self.by_id(table)
        loaded = self.loaded[table]
        return [loader.load(i) for i in dict.fromkeys(ids) if i is not None and i not in loaded]

    # ------------------------------------------------------------------ lists
    async def rows(self, table: str, page: Page, filters: Sequence[Filter] = ()) -> list[Row]:
        """A top-level list: one page of ``table``."""
        page.check(self.max_page_size)
        terms, args = _conditions(filters, page, 1)
        where = f" WHERE {' AND '.join(terms)}" if terms else ""
        args.append(page.first)
        sql = (f"{CACHE_HINT} SELECT {_columns(table)} FROM {table}{where} ORDER BY {ORDERS[page.order][0]} "
               f"LIMIT ${len(args)}")
        return [_row(table, r) for r in await self.fetch(sql, *args)]

    def children(self, table: str, fk: str, parent_id: int, page: Page,
                 filters: Sequence[Filter] = ()) -> Future[list[Row]]:
        """A relation list (``table.fk = parent_id``), one page per parent, batched across parents."""
        page.check(self.max_page_size)
        key = (table, fk, page, tuple(filters))
        loader = self._children.get(key)
        if loader is None:
            terms, args = _conditions(filters, page, 2)
            where = " AND ".join([f"{fk} = ANY($1::text[]::bigint[])", *terms])
            rank = len(args) + 2
            sql = (f"{CACHE_HINT} SELECT {_columns(table)} FROM (SELECT {_columns(table)}, row_number() OVER "
                   f"(PARTITION BY {fk} ORDER BY {ORDERS[page.order][0]}) AS page_rank FROM {table} "
                   f"WHERE {where}) AS paged WHERE page_rank <= ${rank} ORDER BY {fk}, page_rank")
            fixed = (*args, page.first)

            async def load(parent_ids: list[int]) -> list[list[Row]]:
                grouped: dict[int, list[Row]] = {i: [] for i in parent_ids}
                for r in await self.fetch(sql, [str(i) for i in parent_ids], *fixed):
                    grouped[r[fk]].append(_row(table, r))
                return [grouped[i] for i in parent_ids]

            loader = self._children[key] = DataLoader(load)
        return loader.load(parent_id)
