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
import re
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

    __slots__ = ("aliases", "ctes", "everything", "named", "others", "refs", "tables", "using")

    def __init__(self) -> None:
        self.aliases: dict[str, set[str]] = {}  # alias or table name -> match keys of tables
        self.others: set[str] = set()  # aliases of subqueries, CTEs and functions
        self.ctes: set[str] = set()
        self.refs: list[list[dict[str, Any]]] = []  # ColumnRef fields
        self.using: set[str] = set()
        self.everything = False  # NATURAL join: no column knowledge at all
        self.tables: dict[str, bool] = {}  # match key -> depends on all columns (column aliases)
        self.named: dict[str, int] = {}  # match key -> RangeVars naming it, anywhere in the statement

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
        self.named[key] = self.named.get(key, 0) + 1
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


# ---------------------------------------------------------------------------------------------
# Row keys: which rows of a table a SELECT can depend on (issue 4, invalidation per row).
#
# ``read_keys(sql)`` -> {table match key: (column, values)} for each table whose rows the result
# can depend on only where ``column`` holds one of ``values``: a top-level WHERE conjunct
# ``alias.column = <integer>`` or ``alias.column IN (<integers>)`` (or the mirror ``<integer> =
# alias.column``) on a table named exactly once in the whole statement, in the top-level FROM. A
# value is an int (an integer literal, or a string literal holding only an integer) or a str
# ``"$n"`` (bind parameter n, resolved by the caller from the Bind message). Such a conjunct is
# strict: every output row, every aggregate and every window comes from rows of that table
# where it holds, whatever the joins (outer ones included: a null-extended row fails it). So a
# write that changed only rows whose ``column`` (before and after) is outside ``values`` cannot
# change the result. The invalidation triggers report, per write, the values of the table's
# integer columns over the rows it changed (old and new versions).
#
# An unqualified column counts only when the top-level FROM is one table and nothing else. Set
# operations, OR, NOT, casts, other operators, a schema-qualified ``OPERATOR()``, numbers that are
# not integers: no key (the table then depends on every row, as before).

_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*\Z")
KeyValue = int | str


def integer_text(text: str) -> int | None:
    """The integer a text holds and nothing else (PostgreSQL's int input, without the
    underscores and hexadecimal of version 16: those are not trusted), else None."""
    return int(text) if _INTEGER.match(text) else None


def _integer(node: Any) -> KeyValue | None:
    """The key value of one operand: an integer constant, a string constant holding one, $n."""
    if not isinstance(node, dict):
        return None
    const = node.get("A_Const")
    if const is not None:
        if "ival" in const:
            return int(const["ival"].get("ival", 0))  # protobuf JSON omits a 0
        sval = const.get("sval")
        return None if sval is None else integer_text(str(sval.get("sval", "")))
    param = node.get("ParamRef")
    if param is not None and isinstance(param.get("number"), int):
        return f"${param['number']}"
    return None


def _top_from(from_clause: list[Any], aliases: dict[str, str], items: list[str]) -> None:
    """Aliases (or names) of the RangeVars of a FROM list, through joins, not into subqueries."""
    for item in from_clause:
        if not isinstance(item, dict):
            items.append("?")
            continue
        var = item.get("RangeVar")
        if var is not None:
            alias = (var.get("alias") or {})
            if alias.get("colnames"):
                items.append("?")
                continue
            name = alias.get("aliasname") or var.get("relname", "")
            aliases[name] = table_match_key(var.get("relname", ""))
            items.append(aliases[name])
            continue
        join = item.get("JoinExpr")
        if join is not None:
            _top_from([join.get("larg"), join.get("rarg")], aliases, items)
            items.append("?")  # a join: an unqualified column may be any side's
            continue
        items.append("?")


def _conjuncts(where: Any) -> list[Any]:
    if isinstance(where, dict):
        boolean = where.get("BoolExpr")
        if boolean is not None:
            if boolean.get("boolop") == "AND_EXPR":
                found: list[Any] = []
                for arg in boolean.get("args", ()):
                    found.extend(_conjuncts(arg))
                return found
            return []
        return [where]
    return []


def read_keys(sql: str) -> dict[str, tuple[str, tuple[KeyValue, ...]]]:
    """Per table, the key column and values its rows are restricted to (see above); {} if none."""
    statements = _statements(sql)
    if not statements or len(statements) != 1:
        return {}
    select = statements[0].get("SelectStmt")
    if select is None or select.get("op", "SETOP_NONE") != "SETOP_NONE" or "whereClause" not in select:
        return {}
    walk = _Walk()
    walk.visit(statements[0])
    ctes = {table_match_key(name) for name in walk.ctes}
    named = walk.named
    aliases: dict[str, str] = {}
    items: list[str] = []
    _top_from(select.get("fromClause", []), aliases, items)
    only = items[0] if len(items) == 1 and items[0] != "?" else None
    found: dict[str, tuple[str, tuple[KeyValue, ...]]] = {}
    for table, column, values in _key_conjuncts(select["whereClause"], aliases, only):
        if table in ctes or named.get(table) != 1:
            continue
        if table not in found:  # the first conjunct on a table is enough
            found[table] = (column, values)
    return found


def _key_conjuncts(where: Any, aliases: dict[str, str], only: str | None
                   ) -> list[tuple[str, str, tuple[KeyValue, ...]]]:
    """(table, column, values) of each top-level conjunct ``col = v`` / ``v = col`` /
    ``col IN (v, ...)`` of ``where`` whose column is an alias's (``aliases``: alias -> table) or,
    unqualified, ``only``'s."""
    found = []
    for conjunct in _conjuncts(where):
        expr = conjunct.get("A_Expr") if isinstance(conjunct, dict) else None
        if expr is None or [_name(n) for n in expr.get("name", ())] != ["="]:
            continue
        kind = expr.get("kind")
        left, right = expr.get("lexpr"), expr.get("rexpr")
        values: list[KeyValue | None]
        if kind == "AEXPR_OP":
            if isinstance(left, dict) and "ColumnRef" in left:
                ref, values = left, [_integer(right)]
            elif isinstance(right, dict) and "ColumnRef" in right:
                ref, values = right, [_integer(left)]
            else:
                continue
        elif kind == "AEXPR_IN" and isinstance(left, dict) and "ColumnRef" in left:
            listed = (right or {}).get("List", {}).get("items", []) if isinstance(right, dict) else []
            ref, values = left, [_integer(item) for item in listed] or [None]
        else:
            continue
        if any(value is None for value in values):
            continue
        names = [_name(field) for field in ref["ColumnRef"].get("fields", [])]
        if len(names) == 2 and names[0] is not None and names[0] in aliases:
            table = aliases[names[0]]
        elif len(names) == 1 and only is not None:
            table = only
        else:
            continue
        column = names[-1]
        if column is None or column in _SYSTEM_COLUMNS:
            continue
        found.append((table, column, tuple(value for value in values if value is not None)))
    return found


def write_keys(sql: str) -> tuple[str, str, tuple[KeyValue, ...]] | None:
    """(table, key column, values) of a single UPDATE or DELETE that changes only rows whose key
    column holds one of the values: a top-level WHERE conjunct on the target table's column (as
    ``read_keys`` reads them), with no WITH, FROM or USING, and for an UPDATE a column it does
    not SET. None otherwise."""
    statements = _statements(sql)
    if not statements or len(statements) != 1:
        return None
    statement = statements[0]
    node = statement.get("UpdateStmt") or statement.get("DeleteStmt")
    if node is None or "withClause" in node or node.get("fromClause") or node.get("usingClause"):
        return None
    relation = node.get("relation") or {}
    relname = relation.get("relname")
    if not relname or "whereClause" not in node:
        return None
    table = table_match_key(relname)
    alias = (relation.get("alias") or {}).get("aliasname") or relname
    set_columns = {str(target.get("ResTarget", {}).get("name")) for target in node.get("targetList", ())}
    for found_table, column, values in _key_conjuncts(node["whereClause"], {alias: table}, table):
        if found_table == table and column not in set_columns:
            return table, column, values
    return None
