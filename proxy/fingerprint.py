"""SQL text -> Fingerprint: a stable id, literal-free normalised text, and what the text does.

Owns query identity for stats (issue 3) and, later, the result cache: ``Fingerprinter`` turns a
statement's text into a frozen ``Fingerprint`` and memoises it by exact text, so a repeated query
costs one dict lookup. Pure: no I/O, no asyncio.

How a new text is handled (PostgreSQL's own parser, through pglast):

- ``id`` is pglast's fingerprint (the pg_query algorithm, 16 hex chars, stable across processes and
  machines). It ignores constants, whitespace, comments, aliases and schema qualification
  (``s1.t`` and ``s2.t`` share an id; ``tables`` keeps the schema), and it collapses lists of
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
  ``statements`` (pglast's Python AST objects cost ~240 µs for a join; the JSON text, read with
  regular expressions, ~20 µs).

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
unknown         the text did not parse, or is too long to parse and starts with no known keyword
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
(8 bytes, hex) of that text, kind is "unknown", no tables/functions, not read-only,
``parsed=False``. A long unbroken run of operator characters is not given to the parser at all
(PostgreSQL's lexer is quadratic on it: 16 kB of ``+-+-`` takes seconds).

Texts longer than ``max_parse_chars`` (default 16 kB) are not parsed either: parsing costs about
1-2 µs per character on the event loop, and the usual long texts are multi-row INSERTs or huge IN
lists with inline literals (psycopg2 ``execute_values``, Rails/Django bulk inserts), distinct on
every call so the memo never helps. They get ``parsed=False``, the kind of their first keyword,
the target table of INSERT/UPDATE/DELETE/MERGE/COPY (enough for cache invalidation), not
read-only, and an id hashed from the fallback-normalised text up to its first literal within the
first 2 kB, so every bulk insert into the same columns of a table shares one fingerprint.

Measured while other benchmarks loaded this 2-CPU machine (Python 3.11, pglast 8.8; run
``python -m proxy.fingerprint``): a miss on a two-table join costs ~60-80 µs (pglast's fingerprint
~15 µs, normalize ~8 µs, parse_sql_json ~14 µs, the rest is reading the tree and scrubbing), a hit
~0.1-0.3 µs; a 36 kB bulk INSERT over ``max_parse_chars`` ~1.5 ms.
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
    parsed: bool = True  # False: facts are a guess (text too long to parse, or not SQL we can parse)


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
_RANK = {"insert": 3, "update": 3, "delete": 3, "merge": 3, "copy": 3, "ddl": 3,
         "select": 2, "utility": 1, "transaction": 0}
_FALSE_WORDS = frozenset({"false", "off", "no", "0"})

# Anything in the normalised text that may still be a literal or a comment: a quote, a comment
# opener, a number that is not part of a $n or an identifier, a dollar quote. (Patterns that start
# with a character class or a literal let the regex engine skip ahead quickly.)
_LOOSE_DIGIT = re.compile(r"\d(?<![\w$]\d)")
_DOLLAR_QUOTE = re.compile(r"\$(?!\d)")


def _may_hold_literal(normalized: str) -> bool:
    return ("'" in normalized or "--" in normalized or "/*" in normalized
            or _LOOSE_DIGIT.search(normalized) is not None or _DOLLAR_QUOTE.search(normalized) is not None)


_CONSTANT_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_PARAM = re.compile(r"\$(\d+)")
_SPACE_OUTSIDE_IDENTS = re.compile(r'("(?:[^"]|"")*")|\s+')
_PYFORMAT = re.compile(r"%\(\w+\)s|%s")
# PostgreSQL's lexer is quadratic in a long unbroken run of operator characters that it must cut
# again and again: each token first matches the whole run, then is trimmed back to before a "/*"
# or a trailing "+"/"-" (``+-+-+-...``, ``/*/*/*...``: 16 kB take seconds). The server would
# reject such text; it must not stall the proxy's event loop, so it is not parsed. Banners
# (``/*****/``, ``-- -----``) are one cut at most and still parse.
_OPERATOR_RUN = re.compile(r"(?<![-+*/<>=~!@#%^&|`?])[-+*/<>=~!@#%^&|`?]{256,}")


def _quadratic_for_lexer(sql: str) -> bool:
    for match in _OPERATOR_RUN.finditer(sql):
        run = match.group(0)
        cuts = run.count("+") + run.count("/*") + (0 if "--" in run else run.count("-"))
        if cuts >= 64:
            return True
    return False


# Texts longer than max_parse_chars are described without parsing (see Fingerprinter).
_LONG_HEAD_CHARS = 2048
_NAME = r'(?:"(?:[^"]|"")*"|[^\W\d][\w$]*)'
_QUALIFIED = _NAME + r"(?:\s*\.\s*" + _NAME + r")?"
_LEADING_WORDS = re.compile(r"[\s(]*([A-Za-z]+)(?:\s+([A-Za-z]+))?")
_TARGET = {
    "insert": re.compile(r"INSERT\s+INTO\s+(" + _QUALIFIED + ")", re.IGNORECASE),
    "update": re.compile(r"UPDATE\s+(?:ONLY\s+)?(" + _QUALIFIED + ")", re.IGNORECASE),
    "delete": re.compile(r"DELETE\s+FROM\s+(?:ONLY\s+)?(" + _QUALIFIED + ")", re.IGNORECASE),
    "merge": re.compile(r"MERGE\s+INTO\s+(?:ONLY\s+)?(" + _QUALIFIED + ")", re.IGNORECASE),
    "copy": re.compile(r"COPY\s+(" + _QUALIFIED + ")", re.IGNORECASE),
}
_KIND_BY_KEYWORD = {
    **dict.fromkeys(("select", "values", "table"), "select"),
    **{kind: kind for kind in ("insert", "update", "delete", "merge", "copy")},
    **dict.fromkeys(("begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"),
                    "transaction"),
    **dict.fromkeys(("set", "reset", "show", "listen", "unlisten", "notify", "discard", "prepare",
                     "execute", "deallocate", "declare", "fetch", "move", "close", "lock", "vacuum",
                     "analyze", "analyse", "cluster", "reindex", "checkpoint", "call", "do", "explain",
                     "load"), "utility"),
    **dict.fromkeys(("create", "alter", "drop", "truncate", "grant", "revoke", "comment", "refresh",
                     "security", "import", "reassign"), "ddl"),
}

# Fallback lexer for text PostgreSQL's parser rejects. Left to right, so a quote inside a comment
# or a comment marker inside a string is read in the right context; unterminated strings, dollar
# quotes and comments run to the end (erring towards hiding too much).
_FALLBACK_TOKEN = re.compile(
    r"""
      (?P<comment>/\*.*?(?:\*/|\Z)|--[^\n]*)
    | (?P<ident>"(?:[^"]|"")*"?)
    | (?P<dollar>\$(?P<tag>[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<string>(?:[EeBbXxNn]|[Uu]&)?'(?:[^'\\]|\\.|\\\Z|'')*(?:'|\Z))
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
        return " ".join(text.split())
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


# Facts are read from pg_query's JSON parse tree as text (str.find and anchored regular
# expressions) rather than by json.loads and a Python walk: several times cheaper on a miss, and
# linear in the tree's size. This is sound because JSON escapes every quote inside string values
# (SQL text can never forge a key) and pg_query writes a node's fields in a fixed order (RangeVar:
# catalogname, schemaname, relname; FuncCall: funcname first; DefElem: defname, arg). The unit
# tests check these facts against a full walk of the decoded tree over many statements, so a
# pglast upgrade that changes the format fails there.
_STMT_START = re.compile(r'\{"stmt":\{"(\w+)"')  # RawStmt is the only node with a "stmt" field
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_SCHEMA_BEFORE = re.compile(r'"schemaname":"((?:[^"\\]|\\.)*)",\Z')
_NAME_LIST = re.compile(r'\[((?:\{"String":\{"sval":"(?:[^"\\]|\\.)*"\}\},?)+)\]')
_SVAL = re.compile(r'"sval":"((?:[^"\\]|\\.)*)"')
_VALUE_FUNCTION = re.compile(r'"SQLValueFunction":\{"op":"SVFOP_(\w+?)(?:_N)?"')
_CTE_NAME = re.compile(r'"ctename":"((?:[^"\\]|\\.)*)"')
_NESTED_DML = ('"InsertStmt":{', '"UpdateStmt":{', '"DeleteStmt":{', '"MergeStmt":{')
_DROPPED = re.compile(r'"removeType":"OBJECT_(?:TABLE|VIEW|MATVIEW|FOREIGN_TABLE)"')
_OBJECT_NAME = re.compile(r'\{"List":\{"items":\[((?:\{"String":\{"sval":"(?:[^"\\]|\\.)*"\}\},?)+)\]\}\}')
_EXPLAIN_ANALYZE = re.compile(
    r'\{"DefElem":\{"defname":"analyze"(?:,"arg":\{"(\w+)":\{(?:"\w+":(?:"([^"]*)"|([\w.-]+)))?\}\})?')
_RELNAME = '"relname":'
_FUNCNAME = '"funcname":'
_FUNC_CALL_OPENERS = ('"FuncCall":{', '"funccall":{')  # FuncCall as a Node, and CallStmt.funccall


def _unescape(value: str) -> str:
    return str(json.loads(f'"{value}"')) if "\\" in value else value


def _dotted(names: str) -> str:
    return ".".join(_unescape(v) for v in _SVAL.findall(names))


def _relations(tree: str, start: int, end: int) -> list[tuple[str, str]]:
    """(schema or "", relname) of every RangeVar in tree[start:end]."""
    found = []
    index = tree.find(_RELNAME, start, end)
    while index != -1:
        name = _JSON_STRING.match(tree, index + len(_RELNAME))
        if name is None:  # pragma: no cover - pg_query always writes a string here
            break
        schema = _SCHEMA_BEFORE.search(tree, max(start, index - 512), index)
        found.append((_unescape(schema.group(1)) if schema else "", _unescape(name.group(1))))
        index = tree.find(_RELNAME, name.end(), end)
    return found


def _function_calls(tree: str, start: int, end: int) -> set[str]:
    raw: set[str] = set()  # a bulk INSERT may call now() thousands of times: decode each name once
    index = tree.find(_FUNCNAME, start, end)
    while index != -1:
        after = index + len(_FUNCNAME)
        if tree.startswith(_FUNC_CALL_OPENERS, index - 12, index):  # not CREATE FUNCTION's name
            names = _NAME_LIST.match(tree, after)
            if names is not None:
                raw.add(names.group(1))
        index = tree.find(_FUNCNAME, after, end)
    return {_dotted(names).lower() for names in raw}


def _explain_analyzes(tree: str, start: int, end: int) -> bool:
    match = _EXPLAIN_ANALYZE.search(tree, start, end)
    if match is None:
        return False
    arg_type, text, raw = match.groups()
    if arg_type is None:  # EXPLAIN ANALYZE / EXPLAIN (ANALYZE)
        return True
    if text is not None:  # EXPLAIN (ANALYZE off)
        return text.lower() not in _FALSE_WORDS
    # pg_query omits false and zero: {"Boolean":{}} is false, {"Integer":{}} is 0.
    return raw is not None and raw.lower() not in _FALSE_WORDS


def _describe(tree: str) -> tuple[str, tuple[str, ...], tuple[str, ...], bool, bool, int]:
    """kind, tables, functions, read_only, locking, statements from parse_sql_json's text."""
    starts = list(_STMT_START.finditer(tree))
    tables: set[str] = set()
    functions: set[str] = set()
    kind = "utility"
    rank = -1
    read_only = bool(starts)
    locking = False
    for number, match in enumerate(starts):
        node_name = match.group(1)
        start = match.start()
        end = starts[number + 1].start() if number + 1 < len(starts) else len(tree)
        if node_name in _KIND_BY_NODE:
            this_kind = _KIND_BY_NODE[node_name]
        elif node_name in _UTILITY_NODES:
            this_kind = "utility"
        else:
            this_kind = "ddl"
        if _RANK[this_kind] > rank:
            kind, rank = this_kind, _RANK[this_kind]

        ctes: set[str] = set()
        if tree.find('"ctename":', start, end) != -1:
            ctes = {_unescape(name) for name in _CTE_NAME.findall(tree, start, end)}
        for schema, name in _relations(tree, start, end):
            if schema:
                tables.add(f"{schema}.{name}".lower())
            elif name not in ctes:
                tables.add(name.lower())
        if node_name == "DropStmt" and _DROPPED.search(tree, start, end):
            tables.update(_dotted(names).lower() for names in _OBJECT_NAME.findall(tree, start, end))
        functions.update(_function_calls(tree, start, end))
        if tree.find('"SQLValueFunction":', start, end) != -1:
            functions.update(op.lower() for op in _VALUE_FUNCTION.findall(tree, start, end))
        this_locking = tree.find('"lockingClause":', start, end) != -1
        locking = locking or this_locking

        if node_name == "SelectStmt":
            this_read_only = not (this_locking or tree.find('"intoClause":', start, end) != -1
                                  or any(tree.find(dml, start, end) != -1 for dml in _NESTED_DML))
        elif node_name == "VariableShowStmt":
            this_read_only = True
        elif node_name == "ExplainStmt":
            this_read_only = not _explain_analyzes(tree, start, end)
        else:
            this_read_only = False
        read_only = read_only and this_read_only
    return kind, tuple(sorted(tables)), tuple(sorted(functions)), read_only, locking, len(starts)


# The shape of a text for the memo of ``Fingerprinter.of_bytes``: numbers and '...' strings become
# ``?`` (quoted identifiers and comments are kept as they are), so texts that differ only in literal
# values share one memo entry: ``WHERE aid = 48213`` and ``WHERE aid = 7`` cost one parse, not one
# each. The lookahead lets the engine skip to the few bytes that can start a token. Texts with a
# backslash (E'' escapes) or a dollar quote are not shaped: those literals could fool the scanner.
_SHAPE = re.compile(
    rb"(?=[-/\"'0-9])(?:(\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/)|'(?:[^']|'')*'"
    rb"|(?<![\w$.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w$]))",
    re.S,
)
_UNSHAPEABLE = re.compile(rb"\\|\$\w*\$")


def _shape_token(match: re.Match[bytes]) -> bytes:
    return match.group(1) or b"?"


# Texts with no quote, comment, ``$`` or backslash (most statements an ORM interpolates numbers
# into) hold no token to keep: numbers alone are replaced, by a constant, with no Python callback.
# The same as rb"\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b", written to start with a digit class (the
# lookbehind is the leading \b): the engine then skips to the next digit instead of trying \b at
# every byte, ~25 % less time on a typical statement.
_NUMBERS = re.compile(rb"[0-9](?<!\w[0-9])[0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?\b")


def decode_sql(sql: bytes, encoding: str = "utf-8") -> str:
    """A statement's text as the client sent it (``encoding``: its client_encoding); bytes that
    do not decode become U+FFFD, an encoding Python does not know is read as UTF-8."""
    try:
        return sql.decode(encoding, "replace")
    except LookupError:
        return sql.decode("utf-8", "replace")


# The bytes whose absence makes a text plain (``plain_numbers``): deleting them with
# bytes.translate is one C pass (~0.15 µs here) where six ``in`` tests cost ~2.5 µs.
_NOT_PLAIN = b"'\"$\\-/"


def shape_plain_py(sql: bytes) -> bytes | None:
    """A plain text (no byte of ``_NOT_PLAIN``) with its numbers made ``?``; None for any other
    text. (``plain_numbers``: the cache reads such a text's numbers as all its literals.)"""
    if len(sql.translate(None, _NOT_PLAIN)) != len(sql):
        return None
    return _NUMBERS.sub(b"?", sql)


# ``text_shape``'s fast path also takes a lone ``-`` or ``/`` (an operator, a negative number:
# TPC-B's ``abalance + -1234``), but no ``--`` or ``/*`` (comments, which the shape keeps).
_NOT_NUMBERS_ONLY = b"'\"$\\"


def shape_numbers_py(sql: bytes) -> bytes | None:
    """``text_shape`` of a text whose only literals are numbers (no quote, ``$``, backslash or
    comment): its numbers made ``?``; None for any other text. ``proxy/_speedups.c`` has this
    and ``shape_plain_py`` in one C pass each (the regex and the translate cost ~7,000 CPU
    instructions per pgbench statement, most of recording it)."""
    if len(sql.translate(None, _NOT_NUMBERS_ONLY)) != len(sql) or b"--" in sql or b"/*" in sql:
        return None
    return _NUMBERS.sub(b"?", sql)


def shape_quoted_py(sql: bytes) -> bytes | None:
    """``_unplain_shape`` of a text with quoted strings but no token the shape keeps or that could
    fool it (no double quote, comment, ``$`` or backslash): every string and number made ``?``, the
    regex with a constant; None for any other text. ``_speedups.shape_quoted`` in C: the
    recruiter app's texts through psycopg2 carry their strings inline."""
    if b'"' in sql or b"\\" in sql or b"$" in sql or b"--" in sql or b"/*" in sql:
        return None
    return _SHAPE.sub(b"?", sql)


try:  # the three in C (proxy/_speedups.c), where it was built
    from ._speedups import shape_numbers, shape_plain, shape_quoted
except ImportError:  # no C compiler when the package was installed
    shape_numbers, shape_plain, shape_quoted = shape_numbers_py, shape_plain_py, shape_quoted_py


def text_shape(sql: bytes) -> bytes:
    """The memo key for ``sql``: literal values replaced, everything else as it is."""
    shape = shape_numbers(sql)
    return shape if shape is not None else _unplain_shape(sql)


def _unplain_shape(sql: bytes) -> bytes:
    """``text_shape`` of a text ``shape_numbers`` leaves to it (a quote, ``$``, backslash or comment)."""
    shape = shape_quoted(sql)
    if shape is not None:
        return shape
    if (b"\\" in sql or b"$" in sql) and _UNSHAPEABLE.search(sql) is not None:
        return sql
    return _SHAPE.sub(_shape_token, sql)


def plain_numbers(sql: bytes) -> tuple[bytes, list[bytes]] | None:
    """A plain text's ``text_shape`` and its numbers in order (no quote, ``$``, comment, ``-``,
    ``/`` or backslash: its numbers are all the shape replaces); None for any other text."""
    shape = shape_plain(sql)
    return None if shape is None else (shape, _NUMBERS.findall(sql))


def numbered(sql: bytes) -> bytes:
    """A plain text with its numbers replaced by $1, $2, ... in the order ``plain_numbers`` lists them."""
    counter = iter(range(1, 1 << 30))
    return _NUMBERS.sub(lambda _match: b"$%d" % next(counter), sql)


class Fingerprinter:
    """Memoised SQL text -> Fingerprint. One per proxy (not a module global); not thread-safe.

    The memo is keyed by exact text and bounded both in entries (``max_memo``) and in total
    characters of the memoised texts (``max_memo_chars``): when either bound is passed the oldest
    1/256 of the entries is dropped at once (insertion order; again until both bounds hold),
    which keeps a hit at one dict lookup (no LRU bookkeeping) and the amortised eviction cost well
    under a microsecond per miss. A small slice, because every entry dropped is a parse when its
    statement comes back: with a working set just over the bound (10,001 distinct statements
    drawn uniformly, 10,000 entries) dropping half cost a parse on ~8 % of statements, a
    sixteenth ~1.2 %, 1/256 ~0.1 % (10,100 statements: 3.1 % against 1.2 %, where no policy can
    do better than 1 %); the trimming itself costs the same ~0.6 µs per insert either way.
    """

    __slots__ = ("_memo", "_memo_chars", "_shapes", "_shape_bytes", "max_memo", "max_memo_chars",
                 "max_normalized_chars", "max_parse_chars", "hits", "misses", "evictions")

    def __init__(self, max_memo: int = 10000, *, max_memo_chars: int = 16_000_000,
                 max_normalized_chars: int = 8192, max_parse_chars: int = 16384) -> None:
        if max_memo < 1:
            raise ValueError(f"max_memo must be at least 1, got {max_memo}")
        self._memo: dict[str, Fingerprint] = {}
        self._memo_chars = 0
        self._shapes: dict[bytes, Fingerprint] = {}
        self._shape_bytes = 0
        self.max_memo = max_memo
        self.max_memo_chars = max_memo_chars
        self.max_normalized_chars = max_normalized_chars
        self.max_parse_chars = max_parse_chars
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._memo) + len(self._shapes)

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
            self._memo_chars = self._trim(memo, self._memo_chars)
        return fingerprint

    def of_bytes(self, sql: bytes | Fingerprint, encoding: str = "utf-8") -> Fingerprint:
        """Fingerprint of a statement as it came off the wire, memoised by its shape (see
        ``text_shape``): a query run with ever new literal values still costs one regex pass
        and one dict lookup, not a parse. A Fingerprint (what a cache hit hands the recorder)
        is its own answer."""
        if isinstance(sql, Fingerprint):
            return sql
        shapes = self._shapes
        found = shapes.get(sql)  # texts without literals (bind parameters) are their own shape
        if found is not None:
            self.hits += 1
            return found
        shape = text_shape(sql)
        found = shapes.get(shape)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        fingerprint = self.compute(decode_sql(sql, encoding))
        shapes[shape] = fingerprint
        self._shape_bytes += len(shape)
        if len(shapes) > self.max_memo or self._shape_bytes > self.max_memo_chars:
            self._shape_bytes = self._trim(shapes, self._shape_bytes)
        return fingerprint

    def clear(self) -> None:
        self._memo.clear()
        self._memo_chars = 0
        self._shapes.clear()
        self._shape_bytes = 0

    def _trim(self, memo: dict[Any, Fingerprint], chars: int) -> int:
        """Drop ``memo``'s oldest entries until both bounds hold; return its characters left."""
        while memo and (len(memo) > self.max_memo or chars > self.max_memo_chars):
            victims = list(islice(memo, max(1, len(memo) // 256)))
            for key in victims:
                del memo[key]
                chars -= len(key)
            self.evictions += len(victims)
        return chars

    def compute(self, sql: str) -> Fingerprint:
        """Fingerprint ``sql`` without the memo. Never raises for any str."""
        if len(sql) > self.max_parse_chars:
            return self._long(sql)
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
        if len(sql) >= 256 and _quadratic_for_lexer(sql):
            raise ValueError("operator run too long to parse")
        tree = _pg.parse_sql_json(sql)
        kind, tables, functions, read_only, locking, count = _describe(tree)
        normalized = _pg.normalize(sql)
        if _may_hold_literal(normalized):
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
                           statements=1 if normalized else 0, parsed=False)

    def _long(self, sql: str) -> Fingerprint:
        """A text over max_parse_chars: grouped by its head, kind by keyword, the DML target table."""
        try:
            head = fallback_normalize(sql[:_LONG_HEAD_CHARS])
        except Exception:  # pragma: no cover - the regex accepts any str
            head = ""
        words = _LEADING_WORDS.match(head)
        first = words.group(1).lower() if words else ""
        kind = _KIND_BY_KEYWORD.get(first, "unknown")
        if first == "prepare" and words and (words.group(2) or "").lower() == "transaction":
            kind = "transaction"
        tables: tuple[str, ...] = ()
        target = _TARGET.get(kind)
        if target is not None:
            found = target.match(head, words.start(1) if words else 0)
            if found is not None:
                name = re.sub(r'\s*\.\s*', ".", found.group(1)) if "." in found.group(1) else found.group(1)
                tables = (name.replace('""', "\x00").replace('"', "").replace("\x00", '"').lower(),)
        # Literal lengths shift everything after the first literal, so the group is the text up
        # to the first $n: e.g. ``INSERT INTO t (a, b) VALUES (`` for every multi-row insert into t.
        placeholder = head.find("$")
        shape = head if placeholder == -1 else head[:placeholder]
        digest = hashlib.blake2b(f"long:{kind}:{shape}".encode("utf-8", "replace"), digest_size=8).hexdigest()
        return Fingerprint(id=digest, normalized=self._cap(head + " …"), kind=kind, tables=tables,
                           statements=1, parsed=False)

    def _cap(self, text: str) -> str:
        limit = self.max_normalized_chars
        return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def _measure() -> None:  # pragma: no cover - `python -m proxy.fingerprint` prints per-call costs
    import timeit

    def best(call: object, number: int) -> float:
        return min(timeit.repeat(call, number=number, repeat=7)) / number  # type: ignore[arg-type]

    sql = ("SELECT u.id, u.name FROM users u JOIN orders o ON o.user_id = u.id "
           "WHERE u.email = 'a@b.c' AND o.total > 10")
    fingerprinter = Fingerprinter()
    fingerprinter(sql)
    print(f"pglast fingerprint alone {best(lambda: _pg.fingerprint(sql), 2000) * 1e6:.1f} µs")
    print(f"fingerprint miss (join)  {best(lambda: fingerprinter.compute(sql), 2000) * 1e6:.1f} µs")
    print(f"fingerprint hit          {best(lambda: fingerprinter(sql), 200_000) * 1e6:.3f} µs")
    bulk = "INSERT INTO t (a, b) VALUES " + ", ".join(f"({i}, 'name {i}')" for i in range(2000))
    print(f"fingerprint miss ({len(bulk) // 1000} kB bulk insert, not parsed) "
          f"{best(lambda: fingerprinter.compute(bulk), 20) * 1e3:.2f} ms")


if __name__ == "__main__":  # pragma: no cover
    _measure()
