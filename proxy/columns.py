"""Which columns of which tables a statement reads, or an UPDATE sets: column-level cache invalidation.

The result cache (issue 4) evicts the entries that read a table when the table is written. An
UPDATE changes only the columns it sets, and a read's result depends only on the columns it
references (in its target list, joins, WHERE, GROUP BY, ORDER BY, subqueries, anywhere): so an
UPDATE that sets none of the columns a cached read references cannot change that result, and the
entry may stay. ``jobs.salary_max`` being edited no longer evicts the cached "10 best matches
of a resume" page, which shows only the jobs' titles. Pure functions of the SQL text.

``read_columns(sql)`` -> ``{table match key: frozenset of column names}`` for the tables whose
referenced columns are known; a table missing from the map depends on all its columns (every
write evicts). It is deliberately an over-approximation:

- a qualified reference ``j.title`` counts for every table aliased (or named) ``j`` anywhere in
  the statement; a qualifier that is a subquery's, a CTE's or a function's alias is left to the
  references inside them; any other qualifier (a join's alias, a schema-qualified name we cannot
  pin down) counts the column for every table;
- an unqualified column counts for every table of the statement;
- ``*``, ``t.*``, a whole-row reference (``SELECT t FROM t``, ``row_to_json(t)``), a system
  column (``ctid``, ``xmin``, ...) and an alias with column aliases (``FROM jobs AS j(a, b)``)
  make the table(s) concerned depend on all columns; a NATURAL join makes every table do so,
  and ``JOIN ... USING (c)`` counts ``c`` for every table;
- only a single SELECT is analysed; anything else (several statements, no parse) depends on all.

``update_columns(sql)`` -> ``(table match key, frozenset of the columns SET)`` for a single UPDATE
statement (``SET a = ..``, ``SET (a, b) = ..``, ``SET arr[1] = ..`` all count their column), else
None (every other write evicts per table).

What it does not know, and the caller must: user-defined functions (they may read columns the
text does not name: the cache keeps such reads table-level), and tables where an UPDATE changes
more than it sets (BEFORE triggers, generated columns, row-level security: the LISTEN monitor's
``column_safe`` excludes them). The order of rows a query does not ORDER BY is the one thing an
UPDATE of other columns may change (a new row version moves): a cached result then has the same
rows and values in the order they had when it was read. ``cache.column_invalidation: false``
turns all this off.
"""
from __future__ import annotations

import json
from typing import Any

from pglast import parser as _pg

from .cache import table_match_key

_ALL = None  # "depends on every column"
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "oid"})


def _name(field: dict[str, Any]) -> str | None:
    """The name of a ColumnRef field (a String node), or None for ``*``."""
    string = field.get("String")
    return None if string is None else str(string.get("sval", ""))


class _Walk:
    """One pass over a SELECT's parse tree: table aliases, other aliases, column references."""

    __slots__ = ("aliases", "ctes", "everything", "others", "refs", "tables", "using")

    def __init__(self) -> None:
        self.aliases: dict[str, set[str]] = {}  # alias or table name -> match keys of tables
        self.others: set[str] = set()  # aliases of subqueries, CTEs and functions
        self.ctes: set[str] = set()
        self.refs: list[list[dict[str, Any]]] = []  # ColumnRef fields
        self.using: set[str] = set()
        self.everything = False  # NATURAL join: no column knowledge at all
        self.tables: dict[str, bool] = {}  # match key -> depends on all columns (column aliases)

    def visit(self, node: Any) -> None:
        stack = [node]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
                continue
            if not isinstance(item, dict):
                continue
            for key, value in item.items():
                if key == "RangeVar":
                    self._range_var(value)
                elif key == "ColumnRef":
                    self.refs.append(value.get("fields", []))
                    continue
                elif key in ("RangeSubselect", "RangeFunction", "RangeTableFunc"):
                    alias = value.get("alias")
                    if alias:
                        self.others.add(alias.get("aliasname", ""))
                elif key == "CommonTableExpr":
                    self.others.add(value.get("ctename", ""))
                    self.ctes.add(value.get("ctename", ""))
                elif key == "JoinExpr":
                    if value.get("isNatural"):
                        self.everything = True
                    for field in value.get("usingClause", ()):
                        name = _name(field)
                        if name is not None:
                            self.using.add(name)
                if isinstance(value, (dict, list)):
                    stack.append(value)

    def _range_var(self, var: dict[str, Any]) -> None:
        key = table_match_key(var.get("relname", ""))
        alias = var.get("alias") or {}
        all_columns = bool(alias.get("colnames"))  # FROM t AS a(x, y): x is whichever column
        self.tables[key] = self.tables.get(key, False) or all_columns
        self.aliases.setdefault(var.get("relname", ""), set()).add(key)
        if alias.get("aliasname"):
            self.aliases.setdefault(alias["aliasname"], set()).add(key)

    def result(self) -> dict[str, frozenset[str]]:
        # A RangeVar naming a CTE is no table: its references are the CTE's own. (A real table of
        # that name elsewhere in the statement drops out too: it then depends on every column.)
        for name in self.ctes:
            self.tables.pop(table_match_key(name), None)
            self.aliases.pop(name, None)
        if self.everything or not self.tables:
            return {}
        columns: dict[str, set[str] | None] = {
            key: (_ALL if everything else set()) for key, everything in self.tables.items()}

        def add(keys: Any, column: str | None) -> None:
            for key in keys:
                found = columns.get(key)
                if found is None:
                    continue  # already all columns (or not a table of this statement)
                if column is None or column in _SYSTEM_COLUMNS:
                    columns[key] = _ALL
                else:
                    found.add(column)

        every = list(columns)
        for name in self.using:
            add(every, name)
        for fields in self.refs:
            names = [_name(field) for field in fields]
            if len(names) == 1:
                only = names[0]
                if only is not None and only in self.aliases:  # a whole-row reference
                    add(self.aliases[only], None)
                elif only is None or only not in self.others:
                    add(every, only)
                continue
            qualifier, last = names[-2], names[-1]
            if qualifier is None:  # pragma: no cover - the grammar has no "*.x"
                add(every, None)
            elif qualifier in self.aliases:
                add(self.aliases[qualifier], last)
            elif qualifier not in self.others:
                add(every, last)
        return {key: frozenset(found) for key, found in columns.items() if found is not None}


def _statements(sql: str) -> list[dict[str, Any]] | None:
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except Exception:  # noqa: BLE001 - anything that does not parse has no column facts
        return None
    return [raw.get("stmt", {}) for raw in tree.get("stmts", [])]


def read_columns(sql: str) -> dict[str, frozenset[str]]:
    """Columns a single SELECT references, per table (see the module docstring); {} when unknown."""
    statements = _statements(sql)
    if not statements or len(statements) != 1 or "SelectStmt" not in statements[0]:
        return {}
    walk = _Walk()
    walk.visit(statements[0])
    return walk.result()


def update_columns(sql: str) -> tuple[str, frozenset[str]] | None:
    """(table match key, columns SET) of a single UPDATE statement, or None."""
    statements = _statements(sql)
    if not statements or len(statements) != 1:
        return None
    update = statements[0].get("UpdateStmt")
    if update is None or "withClause" in update:  # a CTE may write other tables
        return None
    relation = update.get("relation") or {}
    names = set()
    for target in update.get("targetList", ()):
        name = target.get("ResTarget", {}).get("name")
        if not name:
            return None
        names.add(str(name))
    if not names or not relation.get("relname"):
        return None
    return table_match_key(relation["relname"]), frozenset(names)
