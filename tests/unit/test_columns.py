"""proxy.columns (column-level cache invalidation): which columns a SELECT reads, which an UPDATE sets.

The rule every case checks: the columns reported for a table must include every column of it the
result depends on (an over-approximation is fine, an omission is a stale read); a table left out
of the map depends on all its columns.
"""
from __future__ import annotations

import struct
from typing import Any

import pytest

from proxy.cache import ReadToken, ResultCache
from proxy.caching import Bind
from proxy.invalidation import parse_payload
from proxy.columns import read_columns, read_keys, update_columns, write_keys


def cols(*names: str) -> frozenset[str]:
    return frozenset(names)


@pytest.mark.parametrize(("sql", "expected"), [
    # The recruiter benchmark's reads.
    ("SELECT m.job_id, j.title, c.name AS company, j.location, m.match_score FROM matches m "
     "JOIN jobs j ON j.id = m.job_id JOIN companies c ON c.id = j.company_id "
     "WHERE m.resume_id = 5 ORDER BY m.match_score DESC LIMIT 10",
     {"matches": cols("job_id", "match_score", "resume_id"), "jobs": cols("title", "location", "id", "company_id"),
      "companies": cols("name", "id")}),
    ("SELECT count(*) AS open_jobs FROM jobs WHERE company_id = 7 AND is_active",
     {"jobs": cols("company_id", "is_active")}),
    # Unqualified names count for every table of the statement.
    ("SELECT title, name FROM jobs, companies WHERE company_id = companies.id",
     {"jobs": cols("title", "name", "company_id"), "companies": cols("title", "name", "company_id", "id")}),
    # Aliases, schema qualification, quoted names.
    ("SELECT j.title FROM public.jobs AS j", {"jobs": cols("title")}),
    ("SELECT public.jobs.title FROM public.jobs", {"jobs": cols("title")}),
    ('SELECT j."Title" FROM "Jobs" j', {"jobs": cols("Title")}),
    # References inside subqueries, CTEs, ORDER BY, GROUP BY, HAVING, window clauses, functions.
    ("SELECT x.a FROM (SELECT salary_max AS a FROM jobs) x", {"jobs": cols("salary_max")}),
    ("WITH c AS (SELECT company_id, count(*) AS n FROM jobs GROUP BY company_id) "
     "SELECT c.n FROM c JOIN companies ON companies.id = c.company_id",
     {"jobs": cols("company_id"), "companies": cols("company_id", "id")}),  # c.n, c.company_id: inside c
    ("SELECT lower(title) FROM jobs WHERE id IN (SELECT job_id FROM matches WHERE score > 0.5) "
     "ORDER BY rank() OVER (PARTITION BY location ORDER BY posted)",
     {"jobs": cols("title", "id", "job_id", "score", "location", "posted"),
      "matches": cols("title", "id", "job_id", "score", "location", "posted")}),
    ("SELECT company_id FROM jobs GROUP BY company_id HAVING max(salary) > 5",
     {"jobs": cols("company_id", "salary")}),
    # JOIN ... USING counts its columns for every table.
    ("SELECT j.title FROM jobs j JOIN companies c USING (company_id)",
     {"jobs": cols("title", "company_id"), "companies": cols("company_id")}),
    # A join's alias is no table's alias: the column counts for every table.
    ("SELECT jc.title FROM (jobs j JOIN companies c ON c.id = j.company_id) AS jc",
     {"jobs": cols("title", "company_id"), "companies": cols("title", "id")}),
])
def test_read_columns(sql: str, expected: dict[str, frozenset[str]]) -> None:
    assert read_columns(sql) == expected


@pytest.mark.parametrize(("sql", "everything"), [
    ("SELECT * FROM jobs", {"jobs"}),
    ("SELECT j.*, c.name FROM jobs j, companies c", {"jobs"}),
    ("SELECT t FROM jobs t", {"jobs"}),  # a whole-row reference
    ("SELECT row_to_json(jobs) FROM jobs", {"jobs"}),
    ("SELECT ctid, title FROM jobs", {"jobs"}),  # system columns change on every UPDATE
    ("SELECT j.xmin FROM jobs j, companies c", {"jobs"}),
    ("SELECT a FROM jobs AS j(a, b)", {"jobs"}),  # column aliases rename whichever columns
    ("SELECT count(*) FROM (SELECT * FROM jobs) s", {"jobs"}),
    ("WITH x AS (SELECT title FROM jobs) SELECT * FROM x, companies", {"companies"}),
])
def test_reads_that_depend_on_every_column_of_some_tables(sql: str, everything: set[str]) -> None:
    found = read_columns(sql)
    for table in everything:
        assert table not in found, found


@pytest.mark.parametrize("sql", [
    "SELECT title FROM jobs NATURAL JOIN companies",  # the join columns are implicit
    "SELECT 1; SELECT title FROM jobs",  # several statements
    "UPDATE jobs SET title = 'x'",  # not a SELECT
    "SELEC title FROM jobs",  # does not parse
    "SELECT 1",  # no table
])
def test_no_column_facts(sql: str) -> None:
    assert read_columns(sql) == {}


@pytest.mark.parametrize(("sql", "expected"), [
    ("UPDATE jobs SET salary_max = salary_min + 5, updated_at = now() WHERE id = 3",
     ("jobs", cols("salary_max", "updated_at"))),
    ("UPDATE public.Jobs j SET (title, location) = ('a', 'b') FROM companies c WHERE c.id = j.company_id",
     ("jobs", cols("title", "location"))),
    ("UPDATE jobs SET tags[1] = 'x', address.city = 'y' WHERE id = $1", ("jobs", cols("tags", "address"))),
    ('UPDATE jobs SET "Title" = $1', ("jobs", cols("Title"))),
])
def test_update_columns(sql: str, expected: tuple[str, frozenset[str]]) -> None:
    assert update_columns(sql) == expected


@pytest.mark.parametrize("sql", [
    "INSERT INTO jobs (title) VALUES ('x')",
    "DELETE FROM jobs WHERE id = 1",
    "WITH x AS (DELETE FROM matches RETURNING job_id) UPDATE jobs SET title = 'x' WHERE id IN (SELECT job_id FROM x)",
    "UPDATE jobs SET title = 'x'; UPDATE companies SET name = 'y'",
    "INSERT INTO jobs (id, title) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET title = excluded.title",
    "not sql at all",
])
def test_writes_other_than_one_plain_update_have_no_columns(sql: str) -> None:
    assert update_columns(sql) is None


def test_invalidation_keeps_entries_that_read_none_of_the_columns_set() -> None:
    cache = ResultCache(clock=lambda: 0.0)

    def store(key: bytes, tables: tuple[str, ...], columns: dict[str, frozenset[str]] | None) -> None:
        assert cache.put(key, b"r", tables, 60, ReadToken(cache._sequence, 0.0, tables), columns)  # noqa: SLF001

    store(b"titles", ("jobs", "companies"), {"jobs": cols("title", "id"), "companies": cols("name")})
    store(b"salaries", ("jobs",), {"jobs": cols("salary_max")})
    store(b"everything", ("jobs",), None)  # depends on every column
    store(b"companies", ("jobs", "companies"), {"companies": cols("name")})  # jobs: every column
    assert cache.invalidate(["jobs"], "proxy", {"jobs": cols("salary_max", "updated_at")}) == 3
    assert cache.peek(b"titles") is not None and cache.peek(b"salaries") is None
    assert cache.peek(b"everything") is None and cache.peek(b"companies") is None
    # A column set for another table says nothing about this one; a write without columns evicts.
    assert cache.invalidate(["companies"], "notify", {"jobs": cols("title")}) == 1
    store(b"titles2", ("jobs",), {"jobs": cols("title")})
    assert cache.invalidate(["jobs"], "notify") == 1
    assert len(cache) == 0


def test_a_transaction_writing_some_columns_hides_only_the_entries_that_read_them() -> None:
    cache = ResultCache(clock=lambda: 0.0)
    titles, salaries = {"jobs": cols("title")}, {"jobs": cols("salary_max")}
    token = cache.begin_read(["jobs"])
    assert cache.put(b"titles", b"t", ["jobs"], 60, token, titles)
    assert cache.put(b"salaries", b"s", ["jobs"], 60, token, salaries)
    assert cache.put(b"all", b"a", ["jobs"], 60, token)
    marks = cache.begin_write(["jobs"], {"jobs": cols("salary_max")})  # an open UPDATE ... SET salary_max
    assert cache.peek(b"titles") == b"t"
    assert cache.peek(b"salaries") is None and cache.peek(b"all") is None
    # Reads that start now: stored if they read none of the columns being written.
    token = cache.begin_read(["jobs"])
    assert cache.put(b"titles2", b"t", ["jobs"], 60, token, titles)
    assert not cache.put(b"salaries2", b"s", ["jobs"], 60, token, salaries)  # write_in_flight
    # The same transaction then writes every column (a DELETE): nothing of jobs is served.
    cache.begin_write(["jobs"], None, marks)
    assert cache.peek(b"titles") is None
    cache.end_write(marks, committed=False)
    assert cache.peek(b"titles") == b"t" and cache.peek(b"all") == b"a"  # rolled back: all still right
    assert cache.writes_in_flight() == 0
    assert not cache._writing_columns and not cache._writing_unknown  # noqa: SLF001 - every mark released


def test_a_read_racing_an_update_is_refused_only_if_it_read_a_column_set() -> None:
    cache = ResultCache(clock=lambda: 0.0)
    token = cache.begin_read(["jobs", "companies"])
    cache.invalidate(["jobs"], "notify", {"jobs": cols("salary_max")})
    assert cache.put(b"titles", b"t", ["jobs", "companies"], 60, token, {"jobs": cols("title"), "companies": cols("name")})
    assert not cache.put(b"salaries", b"s", ["jobs"], 60, token, {"jobs": cols("salary_max")})
    assert not cache.put(b"all", b"a", ["jobs"], 60, token)  # depends on every column: stale
    cache.invalidate(["companies"], "proxy")  # every column of companies
    assert not cache.put(b"titles2", b"t", ["jobs", "companies"], 60, token,
                         {"jobs": cols("title"), "companies": cols("name")})
    assert cache.snapshot().rejected == {"stale": 3}


# ------------------------------------------------------------------ row keys


@pytest.mark.parametrize(("sql", "expected"), [
    ("select v from t where id = 5", {"t": ("id", (5,))}),
    ("select v from t where 5 = id", {"t": ("id", (5,))}),
    ("select v from t where id = 0", {"t": ("id", (0,))}),  # protobuf JSON drops a 0: still 0
    ("select v from t where id = -3", {"t": ("id", (-3,))}),
    ("select v from t where id = '7'", {"t": ("id", (7,))}),  # an untyped literal holding an integer
    ("select v from t where id = $2", {"t": ("id", ("$2",))}),
    ("select v from t where id in (1, 2, $1)", {"t": ("id", (1, 2, "$1"))}),
    ("select v from public.t x where x.k = 1 and x.v > 'a'", {"t": ("k", (1,))}),
    ("select m.a, j.b from matches m join jobs j on j.id = m.job_id left join c on c.id = j.c_id "
     "where m.resume_id = 17 and j.id = 4 order by 1 limit 10",
     {"matches": ("resume_id", (17,)), "jobs": ("id", (4,))}),
    ("select count(*) from t where k = 2 and id = 3", {"t": ("k", (2,))}),  # the first conjunct
    ("with x as (select 1) select v from t, x where t.id = 1", {"t": ("id", (1,))}),
])
def test_read_keys(sql: str, expected: dict[str, tuple[str, tuple[object, ...]]]) -> None:
    assert read_keys(sql) == expected


@pytest.mark.parametrize("sql", [
    "select v from t",
    "select v from t where id = 1 or id = 2",  # not a conjunct
    "select v from t where not id = 1",
    "select v from t where id = 1.5",  # not an integer
    "select v from t where id = 'x'",
    "select v from t where id = '1_000'",  # PostgreSQL 16 reads it, Python too: neither trusted
    "select v from t where id::int8 = 1",  # a cast
    "select v from t where id + 0 = 1",
    "select v from t where id = any($1)",
    "select v from t where id < 3",
    "select v from t where id operator(pg_catalog.=) 1",
    "select v from t where id = 1 and exists (select 1 from t o where o.id = 2)",  # t named twice
    "select v from t join u on u.t_id = t.id where id = 1",  # unqualified beside a join
    "select v from t, lateral (select 1) s where id = 1",  # unqualified beside a function
    "select v from (select * from t) s where s.id = 1",  # a subquery's alias
    "select v from t where t.ctid = '(0,1)'",
    "select 1 from t where id = 1 union select 2",  # a set operation
    "select v from t as a(x, y) where a.x = 1",  # column aliases
    "with t as (select 1 as id) select * from t where id = 1",  # a CTE, not the table
    "select v from t where id = 1; select 2",
    "update t set v = 1 where id = 1",
    "not sql",
])
def test_no_read_keys(sql: str) -> None:
    assert read_keys(sql) == {}


def keys(**values: tuple[int, ...]) -> dict[str, frozenset[int]]:
    return {column: frozenset(found) for column, found in values.items()}


def test_invalidation_keeps_entries_that_read_other_rows() -> None:
    cache = ResultCache(clock=lambda: 0.0)

    def store(key: bytes, row_keys: dict[str, tuple[str, frozenset[int]]] | None,
              columns: dict[str, frozenset[str]] | None = None) -> None:
        token = ReadToken(cache._sequence, 0.0, ("jobs",))  # noqa: SLF001
        assert cache.put(key, b"r", ("jobs",), 60, token, columns, None, row_keys)

    store(b"job1", {"jobs": ("id", frozenset({1}))})
    store(b"job2", {"jobs": ("id", frozenset({2}))})
    store(b"company7", {"jobs": ("company_id", frozenset({7}))})
    store(b"every", None)
    store(b"job3-title", {"jobs": ("id", frozenset({3}))}, {"jobs": cols("title")})
    # UPDATE jobs SET salary = .. WHERE id = 2 (its company is 7): job2, company7, every go.
    removed = cache.invalidate(["jobs"], "notify", {"jobs": cols("salary")},
                               {"jobs": keys(id=(2,), company_id=(7,))})
    assert removed == 3
    assert {k for k in (b"job1", b"job2", b"company7", b"every", b"job3-title") if cache.peek(k)} == {
        b"job1", b"job3-title"}
    assert cache.snapshot().spared == {"rows": 2}  # job3-title read neither: counted by rows, looked at first
    # Keys for a column the entry does not pin say nothing about its rows.
    assert cache.invalidate(["jobs"], "notify", None, {"jobs": keys(company_id=(1,))}) == 2
    # A write of no rows (json_agg over none: an empty set) changes nothing keyed.
    store(b"job1", {"jobs": ("id", frozenset({1}))})
    assert cache.invalidate(["jobs"], "notify", None, {"jobs": keys(id=())}) == 0
    assert cache.peek(b"job1") is not None
    # Without keys, per table.
    assert cache.invalidate(["jobs"], "notify") == 1


def test_a_read_racing_a_keyed_write_is_refused_only_if_it_read_a_row_changed() -> None:
    cache = ResultCache(clock=lambda: 0.0)
    token = cache.begin_read(["jobs"])
    cache.invalidate(["jobs"], "notify", None, {"jobs": keys(id=(2,))})
    assert cache.put(b"job1", b"1", ["jobs"], 60, token, None, None, {"jobs": ("id", frozenset({1}))})
    assert not cache.put(b"job2", b"2", ["jobs"], 60, token, None, None, {"jobs": ("id", frozenset({2}))})
    assert not cache.put(b"every", b"e", ["jobs"], 60, token)
    assert not cache.put(b"other", b"o", ["jobs"], 60, token, None, None, {"jobs": ("grp", frozenset({1}))})
    # A read that began after the write is stored, whatever it reads.
    later = cache.begin_read(["jobs"])
    assert cache.put(b"every", b"e", ["jobs"], 60, later)
    assert cache.snapshot().rejected == {"stale": 3}


def test_a_read_older_than_the_keyed_invalidations_remembered_is_stale() -> None:
    cache = ResultCache(clock=lambda: 0.0)
    token = cache.begin_read(["jobs"])
    for value in range(5000):  # more than the log keeps, none of them row 1
        cache.invalidate(["jobs"], "notify", None, {"jobs": keys(id=(value + 10,))})
    assert not cache.put(b"job1", b"1", ["jobs"], 60, token, None, None, {"jobs": ("id", frozenset({1}))})
    recent = ReadToken(cache._sequence - 10, 0.0, ("jobs",))  # noqa: SLF001 - within the log
    assert cache.put(b"job1", b"1", ["jobs"], 60, recent, None, None, {"jobs": ("id", frozenset({1}))})


def _bind(params: list[bytes | None], formats: list[int]) -> bytes:
    """A Bind message (portal "", statement "s") with ``params`` in ``formats``."""
    body = b"\x00s\x00" + struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    body += b"\x00\x00"
    return b"B" + struct.pack("!i", len(body) + 4) + body


def _parse_rest(types: list[int]) -> bytes:
    return b"select $1\x00" + struct.pack("!h", len(types)) + b"".join(struct.pack("!i", t) for t in types)


@pytest.mark.parametrize(("params", "formats", "types", "expected"), [
    ([b"42", b"x"], [], None, [42, None]),  # no format codes: all text
    ([b" -7 ", b"1.5"], [0], None, [-7, None]),
    ([struct.pack("!i", -5), struct.pack("!q", 2**40)], [1], [], [-5, 2**40]),  # unspecified: by length
    ([struct.pack("!i", 9), struct.pack("!d", 1.0)], [1, 1], [23, 701], [9, None]),  # float8 declared
    ([struct.pack("!h", 3), b"abcd"], [1, 0], [21, 25], [3, None]),
    ([struct.pack("!i", 9)], [1], None, [None]),  # binary, types unknown: not trusted
    ([None, struct.pack("!i", 1)], [1], [0, 20], [None, None]),  # NULL; an int4 sent for an int8
])
def test_bind_integer(params: list[bytes | None], formats: list[int], types: list[int] | None,
                      expected: list[int | None]) -> None:
    message = _bind(params, formats)
    bind = Bind(message, 8, None if types is None else _parse_rest(types))  # 5 + "\0" + "s\0"
    assert [bind.integer(n) for n in range(1, len(params) + 1)] == expected
    assert bind.integer(0) is None and bind.integer(len(params) + 1) is None


def test_notification_payloads() -> None:
    assert parse_payload('["jobs", "jobs_parent"]') == (["jobs", "jobs_parent"], None, None)
    assert parse_payload('{"tables": ["jobs"], "columns": ["title"]}') == (["jobs"], cols("title"), None)
    payload = '{"tables" : ["jobs"], "columns" : null, "keys" : {"id" : [1, 2, null], "grp" : null}}'
    assert parse_payload(payload) == (["jobs"], None, {"id": frozenset({1, 2}), "grp": frozenset()})
    assert parse_payload('{"tables": ["jobs"], "keys": {"id": [1.5]}}') == (["jobs"], None, None)
    assert parse_payload('{"tables": ["jobs"], "keys": {"id": [true]}}') == (["jobs"], None, None)
    assert parse_payload("jobs") == (["jobs"], None, None)


def _front() -> Any:
    from config.settings import CacheSettings
    from proxy.caching import CacheFront
    from proxy.fingerprint import Fingerprinter

    return CacheFront(CacheSettings(mode="all"), Fingerprinter())


@pytest.mark.parametrize("sql", [
    "select v from t where id = 17 limit 10",
    "select v from t where id in (1, 2, 30) and grp = 4 order by 1",
    "select m.a from matches m join jobs j on j.id = m.job_id where m.resume_id = 5 and j.x = 0",
    "select v from t1 where t1.id = 007",
    "select v from t where id = 1.5",  # not an integer: no key
    "select v from t where id = 1e3",
    "select v from t where grp = 3 and id = -2",  # a '-': not plain, parsed
    "select v from t where name = 'x' and id = 9",  # a quote: parsed
    "select v from t where id = 12 or id = 13",
])
def test_plain_texts_take_their_keys_from_their_numbers(sql: str) -> None:
    """The shape path (numbers -> $n once per shape, values by position) gives what a parse of
    the text itself gives; a second text of the same shape too."""
    front = _front()
    keyed = frozenset({"t", "matches", "jobs", "t1"})

    def parsed(text: str) -> dict[str, tuple[str, frozenset[int]]]:
        found = read_keys(text)
        return {table: (column, frozenset(v for v in values if isinstance(v, int)))
                for table, (column, values) in found.items()
                if table in keyed and all(isinstance(v, int) for v in values)}

    for text in (sql, sql.replace("1", "8").replace("3", "6")):
        raw = text.encode()
        fp = front.fingerprinter.of_bytes(raw, "utf-8")
        assert (front._read_keys(fp, raw, "utf-8", keyed, None) or {}) == parsed(text), text  # noqa: SLF001


@pytest.mark.parametrize(("sql", "expected"), [
    ("update jobs set salary_max = 5, updated_at = now() where id = 17", ("jobs", "id", (17,))),
    ("update matches set match_score = $1 where id = $2", ("matches", "id", ("$2",))),
    ("update t x set v = 1 where x.grp in (1, 2) and v <> 0", ("t", "grp", (1, 2))),
    ("update public.t set v = 1 where t.id = 4", ("t", "id", (4,))),
    ("update t set id = 3 where id = 2", None),  # sets its key: the new value is another row's
    ("update t set v = 1 from u where t.id = 1", None),
    ("update t set v = 1 where id = 1 or id = 2", None),
    ("with a as (select 1) update t set v = 1 where id = 1", None),
    ("update t set v = 1", None),
    ("update t set v = 1 where u.id = 1", None),
    ("delete from t where id = 1", ("t", "id", (1,))),
    ("delete from t using u where t.id = 1", None),
    ("select 1", None),
])
def test_write_keys(sql: str, expected: tuple[str, str, tuple[object, ...]] | None) -> None:
    assert write_keys(sql) == expected


def test_a_write_that_names_its_rows_hides_only_the_entries_of_those_rows() -> None:
    cache = ResultCache(clock=lambda: 0.0)
    token = cache.begin_read(["jobs"])
    for key, rows in ((b"job7", {"jobs": ("id", frozenset({7}))}), (b"job42", {"jobs": ("id", frozenset({42}))}),
                      (b"company3", {"jobs": ("company_id", frozenset({3}))}), (b"every", None)):
        assert cache.put(key, b"r", ["jobs"], 60, token, None, None, rows)
    marks = cache.begin_write(["jobs"], None, None, {"jobs": ("id", frozenset({7}))})  # UPDATE .. WHERE id = 7
    served = {k for k in (b"job7", b"job42", b"company3", b"every") if cache.peek(k) is not None}
    assert served == {b"job42"}
    # A read of another row that starts now is stored; one of row 7 is not.
    token = cache.begin_read(["jobs"])
    assert cache.put(b"job43", b"r", ["jobs"], 60, token, None, None, {"jobs": ("id", frozenset({43}))})
    assert not cache.put(b"job7b", b"r", ["jobs"], 60, token, None, None, {"jobs": ("id", frozenset({7, 8}))})
    # Another transaction writing rows no one can name hides everything of the table.
    other = cache.begin_write(["jobs"])
    assert cache.peek(b"job42") is None
    cache.end_write(other, committed=False)
    assert cache.peek(b"job42") is not None
    # The same transaction's next write of any rows: its marks cover every row from then on.
    cache.begin_write(["jobs"], None, marks, None)
    assert cache.peek(b"job42") is None
    cache.end_write(marks, committed=False)
    assert cache.peek(b"job42") is not None and cache.peek(b"job7") is not None
    assert not cache._writing_keyed and not cache._writing_values and not cache._writing  # noqa: SLF001


def test_two_writes_naming_rows_add_up() -> None:
    cache = ResultCache(clock=lambda: 0.0)
    token = cache.begin_read(["jobs"])
    for key in (1, 2, 3):
        assert cache.put(b"job%d" % key, b"r", ["jobs"], 60, token, None, None, {"jobs": ("id", frozenset({key}))})
    marks = cache.begin_write(["jobs"], None, None, {"jobs": ("id", frozenset({1}))})
    cache.begin_write(["jobs"], None, marks, {"jobs": ("id", frozenset({2}))})
    other = cache.begin_write(["jobs"], None, None, {"jobs": ("id", frozenset({2}))})
    assert [cache.peek(b"job%d" % key) is not None for key in (1, 2, 3)] == [False, False, True]
    cache.end_write(marks, committed=True)  # evicts jobs per table: nothing names the rows here
    cache.end_write(other, committed=False)
    assert not cache._writing_keyed and not cache._writing_values  # noqa: SLF001


def test_an_invalidation_visits_only_the_entries_it_may_affect() -> None:
    """Entries are indexed by key value and by column read, so an invalidation visits only those
    that read a row and a column it changed: it keeps exactly the entries the rule keeps
    (``_unaffected``, entry by entry), for random mixes of entries and writes, and the indexes
    empty out with the entries."""
    import random

    from proxy.cache import _unaffected

    rng = random.Random(7)
    for _ in range(300):
        cache = ResultCache(clock=lambda: 0.0)
        token = ReadToken(0, 0.0, ("t",))
        stored = {}
        for n in range(30):
            column = rng.choice(("id", "grp", None))
            rows = None if column is None else {"t": (column, frozenset(rng.sample(range(8), rng.randint(1, 3))))}
            columns = rng.choice((None, {"t": cols("a")}, {"t": cols("b")}, {"t": cols("a", "b")}, {"t": cols()},
                                  {"u": cols("a")}))
            assert cache.put(b"e%d" % n, b"r", ("t",), 60, token, columns, None, rows)
            stored[b"e%d" % n] = (columns, rows)
        changed_keys = rng.choice((None, {c: frozenset(rng.sample(range(8), rng.randint(0, 2)))
                                          for c in rng.choice((("id",), ("id", "grp"), ("grp",)))}))
        changed = rng.choice((None, cols("a"), cols("b"), cols("c")))
        kept = {key for key, (columns, rows) in stored.items() if _unaffected("t", columns, rows, changed, changed_keys)}
        cache.invalidate(["t"], "notify", None if changed is None else {"t": changed},
                         None if changed_keys is None else {"t": changed_keys})
        assert set(cache._entries) == kept  # noqa: SLF001
        assert sum(cache.snapshot().spared.values()) == len(kept)
        for key in kept:  # removing what is left empties every index
            cache._remove(key, "")  # noqa: SLF001
        assert not (cache._by_key or cache._unkeyed or cache._by_column or cache._all_columns  # noqa: SLF001
                    or cache._index)  # noqa: SLF001
