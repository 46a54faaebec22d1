"""SQL text -> Fingerprint: a stable id, literal-free normalised text, and what the text does.

Owns query identity for stats (issue 3) and, later, the result cache: ``Fingerprinter`` turns a
statement's text into a frozen ``Fingerprint`` and memoises it by exact text, so a repeated query
costs one dict lookup. Pure: no I/O, no asyncio.

How a new text is handled (PostgreSQL's own parser, through pglast):

- ``id`` is pglast's fingerprint (the pg_query algorithm, 16 hex chars, stable across processes and
  machines). It ignores constants, whitespace, comments and aliases, and it collapses lists of
  constants: ``IN (1, 2)``, ``IN (1, 2, 3)`` and ``= ANY($1)`` share an id, so do multi-row and
  one-row ``INSERT ... VALUES``; ``SELECT 1`` and ``SELECT 1, 2`` share one too.
- ``normalized`` is ``pglast.parser.normalize`` (literals -> ``$n``), then scrubbed: PostgreSQL
  leaves literals inside utility statements (``PREPARE ... AS``, ``EXECUTE p('x')``, column
  defaults, ``COMMENT ... IS``, function bodies) and keeps comments (which may carry trace ids or
  personal data), so whenever the normalised text still looks like it holds a literal or a comment
  it is re-scanned with PostgreSQL's lexer and every constant token becomes ``$n``, every comment
  is dropped. Whitespace runs are collapsed to one space; the text is capped at
  ``max_normalized_chars``. The normalised text never holds a literal value.
- One ``parse_sql_json`` gives ``kind``, ``tables``, ``functions``, ``locking``, ``read_only`` and
  ``statements`` (the JSON parse tree is ~15x cheaper than pglast's Python AST objects).

Statement kinds (one statement):

==============  ==============================================================================
select          SELECT, VALUES, TABLE (also with FOR UPDATE/SHARE: see ``locking``; also SELECT
                INTO and SELECT with a data-modifying CTE: see ``read_only``)
insert/update/  the DML statements
delete/merge
copy            COPY (either direction)
transaction     BEGIN/START, COMMIT, ROLLBACK, SAVEPOINT, RELEASE, PREPARE TRANSACTION, ...
utility         SET/RESET/SHOW, LISTEN/UNLISTEN/NOTIFY, DISCARD, PREPARE/EXECUTE/DEALLOCATE,
                DECLARE/FETCH/CLOSE, LOCK, VACUUM/ANALYZE/CLUSTER/REINDEX, CHECKPOINT, CALL, DO,
                EXPLAIN, LOAD, SET CONSTRAINTS, ALTER SYSTEM
ddl             everything else: CREATE/ALTER/DROP/RENAME/GRANT/COMMENT/REFRESH ... and TRUNCATE
                (it empties tables under an ACCESS EXCLUSIVE lock like DDL; its tables are in
                ``tables`` for cache invalidation, and it is not ``read_only``)
unknown         the text did not parse (see below)
==============  ==============================================================================

Several statements in one text: the kind is the most significant one, the first statement of the
highest rank in writes (insert/update/delete/merge/copy/ddl) > select > utility > transaction, so
``BEGIN; UPDATE ...; COMMIT`` is "update" and ``SET ...; SELECT ...`` is "select". An empty text
(or only ``;``/comments) has 0 statements and kind "utility".

``read_only`` is true only if every statement is a SELECT/VALUES without SELECT INTO, without a
locking clause and without a data-modifying CTE, a SHOW, or an EXPLAIN without ANALYZE (EXPLAIN
ANALYZE executes its statement and its output differs each run). ``locking`` is true if any
row-locking clause (FOR UPDATE/NO KEY UPDATE/SHARE/KEY SHARE) appears.

``tables``: the relations of every RangeVar (FROM, JOIN, DML targets, COPY, LOCK, TRUNCATE, ALTER,
SELECT INTO / CREATE TABLE AS targets) and of DROP TABLE/VIEW/MATERIALIZED VIEW/FOREIGN TABLE,
schema-qualified when the text qualifies them, lowercased (quoted ``"Foo"`` becomes ``foo``: for
invalidation a spurious match is harmless), sorted, unique; unqualified names of the text's own
CTEs are left out. ``functions``: every function call (``now``, ``pg_catalog.lower``) plus the
SQL-standard value functions (``current_timestamp``, ``current_user``, ...), lowercased, sorted.

Text that does not parse (syntax errors, syntax newer than the parser, a NUL byte, lone
surrogates) never raises: psycopg2/Django-style ``%s``/``%(name)s`` placeholders are first
rewritten to ``$n`` and the text parsed again; if that fails too, a regex drops comments, replaces
string/dollar-quoted/numeric literals with ``$n`` and collapses whitespace, ``id`` is the blake2b
(8 bytes, hex) of that text, kind is "unknown", no tables/functions, not read-only.

Measured on this machine (Python 3.11, pglast 8.8; see ``python -m proxy.fingerprint``):
a miss on a 2-table join costs ~60 µs, a hit ~0.1 µs.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from itertools import islice
from typing import Any

from pglast import parser as _pg

__all__ = ["KINDS", "Fingerprint", "Fingerprinter", "fallback_normalize"]

KINDS = ("select", "insert", "update", "delete", "merge", "ddl", "utility", "transaction", "copy", "unknown")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What one SQL text is: identity, literal-free text, kind and the objects it touches."""

    id: str
    normalized: str
    kind: str
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    read_only: bool = False
    locking: bool = False
    statements: int = 1


_KIND_BY_NODE = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "CopyStmt": "copy",
    "TransactionStmt": "transaction",
}
_UTILITY_NODES = frozenset({
    "VariableSetStmt", "VariableShowStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt",
    "DiscardStmt", "PrepareStmt", "ExecuteStmt", "DeallocateStmt", "DeclareCursorStmt",
    "FetchStmt", "ClosePortalStmt", "LockStmt", "VacuumStmt", "ClusterStmt", "ReindexStmt",
    "CheckPointStmt", "CallStmt", "DoStmt", "ExplainStmt", "LoadStmt", "ConstraintsSetStmt",
    "AlterSystemStmt",
})
_DML_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_RANK = {"insert": 3, "update": 3, "delete": 3, "merge": 3, "copy": 3, "ddl": 3,
         "select": 2, "utility": 1, "transaction": 0}
_DROPPED_RELATIONS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"})
_FALSE_WORDS = frozenset({"false", "off", "no", "0"})

# Anything in the normalised text that may still be a literal or a comment: a quote, a number
# that is not part of a $n or an identifier, a dollar quote, a comment opener.
_SUSPECT = re.compile(r"'|(?<![\w$])\d|\$(?!\d)|--|/\*")
_CONSTANT_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_PARAM = re.compile(r"\$(\d+)")
_SPACE = re.compile(r"\s+")
_SPACE_OUTSIDE_IDENTS = re.compile(r'("(?:[^"]|"")*")|\s+')
_PYFORMAT = re.compile(r"%\(\w+\)s|%s")

# Fallback lexer for text PostgreSQL's parser rejects. Left to right, so a quote inside a comment
# or a comment marker inside a string is read in the right context; unterminated strings, dollar
# quotes and comments run to the end (erring towards hiding too much).
_FALLBACK_TOKEN = re.compile(
    r"""
      (?P<comment>/\*.*?(?:\*/|\Z)|--[^\n]*)
    | (?P<ident>"(?:[^"]|"")*"?)
    | (?P<dollar>\$(?P<tag>[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<string>(?:[EeBbXxNn]|[Uu]&)?'(?:[^'\\]|\\.|'')*(?:'|\Z))
    | (?P<param>\$\d+)
    | (?P<number>(?<![\w$])(?:\d[\w]*(?:\.[\w]*)?|\.\d[\w]*)(?:[eE][-+]?\d+)?)
    """,
    re.VERBOSE | re.DOTALL,
)


def fallback_normalize(sql: str) -> str:
    """Literal-free text for SQL the parser rejects: no comments, literals as $n, single spaces."""
    counter = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal counter
        group = match.lastgroup
        if group == "comment":
            return " "
        if group == "ident" or group == "param":
            return match.group(0)
        counter += 1
        return f"${counter}"

    text = _FALLBACK_TOKEN.sub(replace, sql.replace("\x00", " "))
    return _collapse_space(text)


def _collapse_space(text: str) -> str:
    if '"' not in text:
        return _SPACE.sub(" ", text).strip()
    return _SPACE_OUTSIDE_IDENTS.sub(lambda m: m.group(1) or " ", text).strip()


def _scrub(normalized: str) -> str:
    """Replace every constant token left by normalize() with $n and drop comments."""
    try:
        tokens = _pg.scan(normalized)
    except Exception:
        return fallback_normalize(normalized)
    params = [int(n) for n in _PARAM.findall(normalized)]
    counter = max(params, default=0)
    parts: list[str] = []
    position = 0
    for token in tokens:
        name = token.name
        if name in _CONSTANT_TOKENS:
            counter += 1
            replacement = f"${counter}"
        elif name in _COMMENT_TOKENS:
            replacement = " "
        else:
            continue
        parts.append(normalized[position:token.start])
        parts.append(replacement)
        position = token.end + 1
    parts.append(normalized[position:])
    return "".join(parts)


class _TreeFacts:
    """Facts gathered from one statement's JSON parse tree."""

    __slots__ = ("tables", "functions", "ctes", "locking", "writes", "into")

    def __init__(self) -> None:
        self.tables: set[tuple[str | None, str]] = set()
        self.functions: set[str] = set()
        self.ctes: set[str] = set()
        self.locking = False
        self.writes = False  # a nested INSERT/UPDATE/DELETE/MERGE (data-modifying CTE)
        self.into = False  # SELECT INTO

    def walk(self, root: Any) -> None:
        stack = [root]
        pop = stack.pop
        push = stack.append
        while stack:
            node = pop()
            if type(node) is list:
                stack.extend(node)
                continue
            if type(node) is not dict:
                continue
            if "relname" in node:
                self.tables.add((node.get("schemaname"), node["relname"]))
            if "funcformat" in node and "funcname" in node:
                self.functions.add(".".join(_names(node["funcname"])))
            elif "typmod" in node and str(node.get("op", "")).startswith("SVFOP_"):  # CURRENT_DATE...
                self.functions.add(node["op"][6:].removesuffix("_N").lower())
            if "lockingClause" in node:
                self.locking = True
            if "intoClause" in node:
                self.into = True
            if "ctename" in node:
                self.ctes.add(node["ctename"])
            for key, value in node.items():
                if type(value) is dict or type(value) is list:
                    if key in _DML_NODES:
                        self.writes = True
                    push(value)


def _names(items: list[Any]) -> list[str]:
    return [item["String"]["sval"] for item in items if "String" in item]


def _explain_analyzes(explain: dict[str, Any]) -> bool:
    for option in explain.get("options", ()):
        element = option.get("DefElem", {})
        if element.get("defname") != "analyze":
            continue
        arg = element.get("arg")
        if not arg:  # EXPLAIN ANALYZE / EXPLAIN (ANALYZE)
            return True
        # pg_query's JSON omits false and zero values: {"Boolean": {}} is false, {"Integer": {}} is 0.
        if "Boolean" in arg:
            return bool(arg["Boolean"].get("boolval", False))
        if "Integer" in arg:
            return bool(arg["Integer"].get("ival", 0))
        word = str(next(iter(arg.values()), {}).get("sval", "true")).lower()
        return word not in _FALSE_WORDS
    return False


def _describe(tree: dict[str, Any]) -> tuple[str, tuple[str, ...], tuple[str, ...], bool, bool, int]:
    """kind, tables, functions, read_only, locking, statements from a parse_sql_json tree."""
    statements = tree.get("stmts", [])
    tables: set[str] = set()
    functions: set[str] = set()
    kind = "utility"
    rank = -1
    read_only = bool(statements)
    locking = False
    for raw in statements:
        stmt = raw.get("stmt", {})
        node_name, body = next(iter(stmt.items())) if stmt else ("", {})
        if node_name in _KIND_BY_NODE:
            this_kind = _KIND_BY_NODE[node_name]
        elif node_name in _UTILITY_NODES:
            this_kind = "utility"
        else:
            this_kind = "ddl"
        if _RANK[this_kind] > rank:
            kind, rank = this_kind, _RANK[this_kind]

        facts = _TreeFacts()
        facts.walk(body)
        if node_name == "DropStmt" and body.get("removeType") in _DROPPED_RELATIONS:
            for obj in body.get("objects", ()):
                names = _names(obj.get("List", {}).get("items", []))
                if names:
                    facts.tables.add((names[-2] if len(names) > 1 else None, names[-1]))
        for schema, name in facts.tables:
            if schema is None:
                if name in facts.ctes:
                    continue
                tables.add(name.lower())
            else:
                tables.add(f"{schema}.{name}".lower())
        functions.update(f.lower() for f in facts.functions)
        locking = locking or facts.locking

        if node_name == "SelectStmt":
            this_read_only = not (facts.locking or facts.writes or facts.into)
        elif node_name == "VariableShowStmt":
            this_read_only = True
        elif node_name == "ExplainStmt":
            this_read_only = not _explain_analyzes(body)
        else:
            this_read_only = False
        read_only = read_only and this_read_only
    return kind, tuple(sorted(tables)), tuple(sorted(functions)), read_only, locking, len(statements)


class Fingerprinter:
    """Memoised SQL text -> Fingerprint. One per proxy (not a module global); not thread-safe.

    The memo is keyed by exact text and bounded both in entries (``max_memo``) and in total
    characters of the memoised texts (``max_memo_chars``): when either bound is passed the oldest
    half of the entries is dropped at once (insertion order), which keeps a hit at one dict lookup
    (no LRU bookkeeping) and the amortised eviction cost at well under a microsecond per miss.
    """

    __slots__ = ("_memo", "_memo_chars", "max_memo", "max_memo_chars", "max_normalized_chars",
                 "hits", "misses", "evictions")

    def __init__(self, max_memo: int = 10000, *, max_memo_chars: int = 16_000_000,
                 max_normalized_chars: int = 8192) -> None:
        if max_memo < 1:
            raise ValueError(f"max_memo must be at least 1, got {max_memo}")
        self._memo: dict[str, Fingerprint] = {}
        self._memo_chars = 0
        self.max_memo = max_memo
        self.max_memo_chars = max_memo_chars
        self.max_normalized_chars = max_normalized_chars
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._memo)

    def __call__(self, sql: str) -> Fingerprint:
        found = self._memo.get(sql)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        fingerprint = self.compute(sql)
        memo = self._memo
        memo[sql] = fingerprint
        self._memo_chars += len(sql)
        if len(memo) > self.max_memo or self._memo_chars > self.max_memo_chars:
            self._evict()
        return fingerprint

    def clear(self) -> None:
        self._memo.clear()
        self._memo_chars = 0

    def _evict(self) -> None:
        memo = self._memo
        victims = list(islice(memo, max(1, len(memo) // 2)))
        for text in victims:
            del memo[text]
            self._memo_chars -= len(text)
        self.evictions += len(victims)

    def compute(self, sql: str) -> Fingerprint:
        """Fingerprint ``sql`` without the memo. Never raises for any str."""
        try:
            return self._parsed(sql)
        except Exception:
            pass
        if "%" in sql:
            counter = 0

            def placeholder(_: re.Match[str]) -> str:
                nonlocal counter
                counter += 1
                return f"${counter}"

            try:
                return self._parsed(_PYFORMAT.sub(placeholder, sql))
            except Exception:
                pass
        return self._fallback(sql)

    def _parsed(self, sql: str) -> Fingerprint:
        if "\x00" in sql:  # PostgreSQL rejects a Query with an embedded NUL; C parsing would truncate
            raise ValueError("NUL byte in query text")
        tree = json.loads(_pg.parse_sql_json(sql))
        kind, tables, functions, read_only, locking, count = _describe(tree)
        normalized = _pg.normalize(sql)
        if _SUSPECT.search(normalized) is not None:
            normalized = _scrub(normalized)
        return Fingerprint(
            id=_pg.fingerprint(sql),
            normalized=self._cap(_collapse_space(normalized)),
            kind=kind,
            tables=tables,
            functions=functions,
            read_only=read_only,
            locking=locking,
            statements=count,
        )

    def _fallback(self, sql: str) -> Fingerprint:
        try:
            normalized = fallback_normalize(sql)
        except Exception:  # pragma: no cover - the regex accepts any str
            normalized = ""
        digest = hashlib.blake2b(normalized.encode("utf-8", "replace"), digest_size=8).hexdigest()
        # PostgreSQL rejects the whole text, so it counts as one statement (none if blank).
        return Fingerprint(id=digest, normalized=self._cap(normalized), kind="unknown",
                           statements=1 if normalized else 0)

    def _cap(self, text: str) -> str:
        limit = self.max_normalized_chars
        return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def _measure() -> None:  # pragma: no cover - `python -m proxy.fingerprint` prints per-call costs
    import timeit

    sql = ("SELECT u.id, u.name FROM users u JOIN orders o ON o.user_id = u.id "
           "WHERE u.email = 'a@b.c' AND o.total > 10")
    fingerprinter = Fingerprinter()
    n = 2000
    miss = timeit.timeit(lambda: fingerprinter.compute(sql), number=n) / n
    fingerprinter(sql)
    n = 1_000_000
    hit = timeit.timeit(lambda: fingerprinter(sql), number=n) / n
    print(f"fingerprint miss {miss * 1e6:.1f} µs, hit {hit * 1e6:.3f} µs")


if __name__ == "__main__":  # pragma: no cover
    _measure()
