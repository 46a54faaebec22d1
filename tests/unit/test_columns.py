"""proxy.columns (column-level cache invalidation): which columns a SELECT reads, which an UPDATE sets.

The rule every case checks: the columns reported for a table must include every column of it the
result depends on (an over-approximation is fine, an omission is a stale read); a table left out
of the map depends on all its columns.
"""
from __future__ import annotations

import pytest

from proxy.cache import ReadToken, ResultCache
from proxy.columns import read_columns, update_columns


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
