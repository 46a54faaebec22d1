"""proxy.cache: the caching policy (decide) and the result store (ResultCache), pure."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import proxy.cache as cache_module
from proxy.cache import (
    key_id,
    ENTRY_OVERHEAD,
    SAFE_PG_FUNCTIONS,
    VOLATILE_FUNCTIONS,
    Decision,
    ReadToken,
    ResultCache,
    cache_key,
    decide,
    parse_hint,
    table_match_key,
    volatile_function,
    volatile_literal,
)
from proxy.fingerprint import Fingerprinter

FINGERPRINTER = Fingerprinter()


def decision(sql: str, *, mode: str = "all", in_transaction: bool = False, default_ttl: float = 60.0) -> Decision:
    raw = sql.encode()
    return decide(FINGERPRINTER.of_bytes(raw), raw, mode=mode, in_transaction=in_transaction,
                  default_ttl=default_ttl)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry_size(key: bytes, response: bytes) -> int:
    return len(response) + len(key) + ENTRY_OVERHEAD


def store(cache: ResultCache, key: bytes, response: bytes = b"rows", tables: tuple[str, ...] = ("jobs",),
          ttl: float = 60.0) -> bool:
    return cache.put(key, response, tables, ttl, cache.begin_read(tables))


# -- decide: modes and hints ------------------------------------------------------------------------

def test_mode_off_bypasses_even_a_hinted_select() -> None:
    assert decision("/* pgsidecar:cache */ select * from jobs", mode="off") == Decision(False, 0.0, "off", ("jobs",))


def test_mode_all_caches_a_plain_select_with_the_default_ttl_and_its_tables() -> None:
    assert decision("select j.id from public.jobs j join matches m on m.job_id = j.id where j.id = 4",
                    default_ttl=30.0) == Decision(True, 30.0, "", ("matches", "public.jobs"))


def test_mode_hinted_needs_a_hint() -> None:
    assert decision("select * from jobs", mode="hinted") == Decision(False, 0.0, "not_hinted", ("jobs",))
    assert decision("/* pgsidecar:cache */ select * from jobs", mode="hinted", default_ttl=5.0) == Decision(
        True, 5.0, "", ("jobs",))
    # a hint does not make an uncacheable statement cacheable
    assert decision("/* pgsidecar:cache */ select now()", mode="hinted").reason == "volatile_function:now"


@pytest.mark.parametrize("mode", ["all", "hinted"])
def test_hint_ttl_overrides_the_default_in_every_mode(mode: str) -> None:
    assert decision("select * from jobs /* pgsidecar:cache ttl=90 */", mode=mode, default_ttl=5.0).ttl == 90.0
    assert decision("/*pgsidecar:cache ttl=2.5s*/ select * from jobs", mode=mode, default_ttl=5.0).ttl == 2.5


@pytest.mark.parametrize("mode", ["all", "hinted"])
def test_nocache_hint_bypasses_in_every_mode_and_wins_over_a_cache_hint(mode: str) -> None:
    assert decision("/* pgsidecar:nocache */ select * from jobs", mode=mode).reason == "nocache_hint"
    assert decision("/* pgsidecar:cache */ select * from jobs /* PGSIDECAR:NOCACHE */", mode=mode).reason == (
        "nocache_hint")


def test_parse_hint_forms() -> None:
    assert parse_hint(b"select 1") == ("", None)
    assert parse_hint(b"/* plain comment */ select 1") == ("", None)
    assert parse_hint(b"/* pgsidecar:cache */ select 1") == ("cache", None)
    assert parse_hint(b"/* pgsidecar:cache ttl=60 */ select 1") == ("cache", 60.0)
    assert parse_hint(b"/* PgSidecar:Cache TTL = 7 */ select 1") == ("cache", 7.0)
    assert parse_hint(b"/* pgsidecar:nocache */ select 1") == ("nocache", None)
    assert parse_hint(b"/* pgsidecar:cache ttl=abc */ select 1") == ("", None)  # malformed: no hint
    assert parse_hint(b"/* pgsidecar:cached */ select 1") == ("", None)
    assert parse_hint(b"-- pgsidecar:cache\nselect 1") == ("", None)  # only /* */ comments


def test_hint_ttl_zero_is_no_ttl_and_so_is_a_zero_default() -> None:
    assert decision("/* pgsidecar:cache ttl=0 */ select * from jobs", mode="hinted") == Decision(
        False, 0.0, "no_ttl", ("jobs",))
    assert decision("select * from jobs", default_ttl=0.0).reason == "no_ttl"


def test_unknown_mode_is_an_error_naming_the_value() -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        decision("select 1", mode="sometimes")


# -- decide: what is cacheable ------------------------------------------------------------------------

BYPASS = [
    pytest.param("select * from jobs for update", "locking", id="for-update"),
    pytest.param("select * from jobs for share", "locking", id="for-share"),
    pytest.param("with x as (delete from t returning *) select * from x", "not_read_only", id="dml-cte"),
    pytest.param("select * into t2 from t", "not_read_only", id="select-into"),
    pytest.param("select 1; select 2", "multi_statement", id="two-selects"),
    pytest.param("insert into jobs (title) values ('x')", "not_select", id="insert"),
    pytest.param("update jobs set title = 'x'", "not_select", id="update"),
    pytest.param("begin", "not_select", id="begin"),
    pytest.param("show search_path", "not_select", id="show"),
    pytest.param("explain select * from jobs", "not_select", id="explain"),
    pytest.param("selec * frm jobs", "unparsed", id="syntax-error"),
    pytest.param("select now()", "volatile_function:now", id="now"),
    pytest.param("select * from jobs where created_at > now() - interval '1 day'", "volatile_function:now",
                 id="now-in-where"),
    pytest.param("select pg_catalog.now() from jobs", "volatile_function:now", id="qualified-now"),
    pytest.param("select nextval('s')", "volatile_function:nextval", id="nextval"),
    pytest.param("select * from jobs order by random() limit 1", "volatile_function:random", id="random"),
    pytest.param("select clock_timestamp()", "volatile_function:clock_timestamp", id="clock_timestamp"),
    pytest.param("select current_timestamp(3)", "volatile_function:current_timestamp", id="current_timestamp"),
    pytest.param("select current_date", "volatile_function:current_date", id="current_date"),
    pytest.param("select gen_random_uuid()", "volatile_function:gen_random_uuid", id="gen_random_uuid"),
    pytest.param("select current_user", "volatile_function:current_user", id="current_user"),
    pytest.param("select pg_advisory_lock(1)", "volatile_function:pg_advisory_lock", id="advisory-lock"),
    pytest.param("select pg_try_advisory_xact_lock(1)", "volatile_function:pg_try_advisory_xact_lock",
                 id="try-advisory-lock"),
    pytest.param("select pg_sleep(1)", "volatile_function:pg_sleep", id="pg_sleep"),
    pytest.param("select txid_current()", "volatile_function:txid_current", id="txid_current"),
    pytest.param("select current_setting('work_mem')", "volatile_function:current_setting", id="current_setting"),
    pytest.param("select dblink('x', 'select 1')", "volatile_function:dblink", id="dblink"),
    pytest.param("select * from jobs where created_at > 'now'::timestamptz", "volatile_literal", id="now-literal"),
    pytest.param("select * from jobs where d = 'TODAY'::date", "volatile_literal", id="today-literal"),
    pytest.param("select * from pg_stat_activity", "system_table:pg_stat_activity", id="pg_stat_activity"),
    pytest.param("select relname from pg_catalog.pg_class", "system_table:pg_catalog.pg_class", id="pg_class"),
    pytest.param("select * from information_schema.tables", "system_table:information_schema.tables",
                 id="information_schema"),
    pytest.param("select * from jobs tablesample system (10)", "tablesample", id="tablesample"),
    pytest.param("SELECT * FROM jobs TABLESAMPLE BERNOULLI (5)", "tablesample", id="tablesample-upper"),
]


@pytest.mark.parametrize(("sql", "reason"), BYPASS)
def test_bypass_reasons_from_real_fingerprints(sql: str, reason: str) -> None:
    result = decision(sql)
    assert (result.cacheable, result.reason, result.ttl) == (False, reason, 0.0)


CACHEABLE = [
    pytest.param("select * from jobs where id = 7", ("jobs",), id="simple"),
    pytest.param("select 1", (), id="no-table"),
    pytest.param("values (1), (2)", (), id="values"),
    pytest.param("table jobs", ("jobs",), id="table"),
    pytest.param("select lower(title), count(*) from jobs group by 1", ("jobs",), id="stable-functions"),
    pytest.param("select pg_size_pretty(sum(size)) from files", ("files",), id="safe-pg-function"),
    pytest.param("select current_database(), current_schema()", (), id="keyed-session-functions"),
    pytest.param("with recent as (select * from jobs) select * from recent", ("jobs",), id="cte"),
    pytest.param("select * from jobs tablesample system (10) repeatable (1)", ("jobs",), id="repeatable-sample"),
    pytest.param("select 'now is the time' from jobs", ("jobs",), id="now-inside-a-longer-literal"),
]


@pytest.mark.parametrize(("sql", "tables"), CACHEABLE)
def test_cacheable_selects(sql: str, tables: tuple[str, ...]) -> None:
    assert decision(sql, default_ttl=12.0) == Decision(True, 12.0, "", tables)


@pytest.mark.parametrize(("sql", "reason"), [
    pytest.param("select now() from pg_class", "volatile_function:now", id="function-before-system-table"),
    pytest.param("select * from pg_class where d = 'now'::date", "volatile_literal", id="literal-before-system-table"),
    pytest.param("select * from jobs tablesample system (1) where d = 'today'::date", "volatile_literal",
                 id="literal-before-tablesample"),
    pytest.param("select random() from jobs tablesample system (1)", "volatile_function:random",
                 id="function-before-tablesample"),
    pytest.param("select * from pg_class for update", "locking", id="locking-before-system-table"),
])
def test_the_first_reason_in_the_documented_order_wins(sql: str, reason: str) -> None:
    assert decision(sql).reason == reason


def test_what_decide_remembers_of_a_fingerprint_never_covers_its_literal_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Texts differing only in a literal share one Fingerprint object (the fingerprinter's memo by
    shape), and what decide keeps per object is read off the object alone: a special time literal
    is still found in the one text that has it, in any order, with the memo warm, cold or cleared
    in between (a bound of 2 objects)."""
    monkeypatch.setattr(cache_module, "_STRUCTURES", 2)
    fingerprinter = Fingerprinter()
    texts = [b"select * from jobs where d = 'now'::date", b"select * from jobs where d = '2026-12-07'::date",
             b"select * from pg_class where d = 'x'::date", b"select * from jobs where d = 'today'::date",
             b"select 1 from jobs for update", b"select * from jobs where d = 'tomorrow'::date"]
    expected = ["volatile_literal", "", "system_table:pg_class", "volatile_literal", "locking", "volatile_literal"]
    assert fingerprinter.of_bytes(texts[0]) is fingerprinter.of_bytes(texts[1])  # one object, two verdicts
    for order in (range(6), reversed(range(6)), [1, 0, 1, 0, 2, 4, 3, 5, 1]):
        for i in order:
            got = decide(fingerprinter.of_bytes(texts[i]), texts[i], mode="all", in_transaction=False,
                         default_ttl=60.0)
            assert (got.reason, got.cacheable) == (expected[i], not expected[i]), texts[i]
    assert len(cache_module._structures) <= 2


def test_in_transaction_bypasses_a_cacheable_select() -> None:
    assert decision("select * from jobs", in_transaction=True).reason == "in_transaction"
    assert decision("/* pgsidecar:cache */ select * from jobs", mode="hinted", in_transaction=True).reason == (
        "in_transaction")


def test_an_unparsed_long_select_bypasses() -> None:
    sql = "select * from jobs where id in (" + ", ".join(str(i) for i in range(6000)) + ")"
    fp = Fingerprinter(max_parse_chars=1000).of_bytes(sql.encode())
    assert fp.kind == "select" and not fp.parsed
    assert decide(fp, sql.encode(), mode="all", in_transaction=False, default_ttl=60.0).reason == "unparsed"


def test_volatile_function_matching_rules() -> None:
    assert volatile_function("now") and volatile_function("pg_catalog.NOW") and volatile_function("Public.NextVal")
    assert volatile_function("pg_advisory_lock_shared") and volatile_function("pg_backend_pid")
    assert volatile_function("uuid_generate_v4") and volatile_function("lo_import")
    assert volatile_function("has_table_privilege") and volatile_function("query_to_xml")
    assert not volatile_function("lower") and not volatile_function("pg_catalog.lower")
    assert not volatile_function("count") and not volatile_function("coalesce")
    for name in SAFE_PG_FUNCTIONS:
        assert not volatile_function(name)
    for name in ("now", "random", "nextval", "currval", "lastval", "setval", "timeofday", "session_user",
                 "statement_timestamp", "transaction_timestamp", "set_config", "inet_client_addr"):
        assert name in VOLATILE_FUNCTIONS


def test_volatile_literal_only_for_whole_special_values() -> None:
    assert volatile_literal(b"x > 'now'") and volatile_literal(b"x = ' Tomorrow '") and volatile_literal(b"'yesterday'")
    assert not volatile_literal(b"x = 'nowhere'") and not volatile_literal(b"select now") and not volatile_literal(b"")


# -- cache_key ----------------------------------------------------------------------------------------

def test_cache_key_is_stable_and_distinguishes_every_part() -> None:
    base = ("app", "alice", '"$user", public', b"select * from jobs where id = $1", b"\x00\x00\x00\x017")
    key = cache_key(*base)
    assert key == cache_key(*base)
    variants = [
        ("app2",) + base[1:],
        base[:1] + ("bob",) + base[2:],
        base[:2] + ("public",) + base[3:],
        base[:3] + (b"select * from jobs where id = $2",) + base[4:],
        base[:4] + (b"\x00\x00\x00\x018",),
    ]
    keys = {cache_key(*variant) for variant in variants}
    assert len(keys) == len(variants) and key not in keys
    assert cache_key("app", "alice", "public", b"select 1") == cache_key("app", "alice", "public", b"select 1", b"")


def test_cache_key_is_not_fooled_by_moving_bytes_between_parts() -> None:
    assert cache_key("ab", "c", "", b"") != cache_key("a", "bc", "", b"")
    assert cache_key("a", "b", "c", b"select", b"") != cache_key("a", "b", "cselect", b"", b"")
    assert cache_key("a", "b", "c", b"select 1", b"x") != cache_key("a", "b", "c", b"select 1x", b"")
    assert cache_key("", "", "", b"", b"") != cache_key("", "", "", b"", b"\x00")


def test_cache_key_ids_are_not_reused_when_the_scope_table_is_cleared() -> None:
    before = cache_key("app", "alice", "public", b"select 1")
    for i in range(cache_module._KEY_SCOPES + 1):  # noqa: SLF001 - fills the table: it is cleared
        cache_key("app", f"user{i}", "public", b"select 1")
    assert len(cache_module._key_scopes) <= cache_module._KEY_SCOPES  # noqa: SLF001
    after = cache_key("app", "alice", "public", b"select 1")
    # The same scope gets a new id: what was stored before is unreachable, never another scope's.
    assert after != before and after == cache_key("app", "alice", "public", b"select 1")
    assert before not in {cache_key("app", f"user{i}", "public", b"select 1") for i in range(50)}


# -- store: get / put / LRU / size ----------------------------------------------------------------------

def test_put_then_get_counts_hits_misses_and_stores() -> None:
    cache = ResultCache(clock=FakeClock())
    assert cache.get(b"k1") is None
    assert store(cache, b"k1", b"response-bytes")
    assert cache.get(b"k1") == b"response-bytes"
    assert cache.get(b"k1") == b"response-bytes"
    assert cache.get(b"k2") is None
    snap = cache.snapshot()
    assert (snap.entries, snap.hits, snap.misses, snap.stores) == (1, 2, 2, 1)
    assert snap.bytes == entry_size(b"k1", b"response-bytes") == cache.used_bytes


def test_byte_budget_evicts_least_recently_used_first() -> None:
    response = b"x" * 100
    one = entry_size(b"k0", response)
    cache = ResultCache(max_bytes=3 * one, clock=FakeClock())
    for key in (b"k0", b"k1", b"k2"):
        assert store(cache, key, response)
    assert cache.get(b"k0") == response  # k1 is now the least recently used
    assert store(cache, b"k3", response)
    assert cache.get(b"k1") is None
    assert [cache.get(k) is not None for k in (b"k0", b"k2", b"k3")] == [True, True, True]
    snap = cache.snapshot()
    assert snap.bytes == 3 * one <= snap.max_bytes
    assert snap.evictions == {"lru": 1}


def test_a_large_entry_evicts_as_many_as_needed() -> None:
    cache = ResultCache(max_bytes=10_000, clock=FakeClock())
    for number in range(5):
        assert store(cache, b"small%d" % number, b"x" * 1000)
    assert store(cache, b"big", b"y" * 7000)
    assert cache.used_bytes <= 10_000
    assert cache.get(b"big") == b"y" * 7000
    # 5 x 1262 bytes + 7259 > 10000: the three oldest small entries go, the two newest stay
    assert cache.snapshot().evictions == {"lru": 3} and len(cache) == 3
    assert [cache.get(b"small%d" % n) is not None for n in range(5)] == [False, False, False, True, True]


def test_results_over_max_result_bytes_or_the_whole_budget_are_not_stored() -> None:
    cache = ResultCache(max_bytes=100_000, max_result_bytes=1000, clock=FakeClock())
    assert store(cache, b"ok", b"x" * 1000)
    assert not store(cache, b"big", b"x" * 1001)
    tiny = ResultCache(max_bytes=ENTRY_OVERHEAD + 10, max_result_bytes=1000, clock=FakeClock())
    assert not store(tiny, b"k", b"x" * 20)
    assert cache.get(b"big") is None and cache.get(b"ok") is not None
    assert cache.snapshot().rejected == {"too_large": 1} and tiny.snapshot().rejected == {"too_large": 1}
    assert len(tiny) == 0 and tiny.used_bytes == 0


def test_overwriting_a_key_replaces_entry_bytes_and_index_without_an_eviction() -> None:
    cache = ResultCache(clock=FakeClock())
    assert store(cache, b"k", b"old", ("jobs",))
    assert store(cache, b"k", b"newer", ("users",))
    assert cache.get(b"k") == b"newer"
    assert cache.used_bytes == entry_size(b"k", b"newer")
    assert cache.invalidate(["jobs"], "proxy") == 0
    assert cache.invalidate(["users"], "proxy") == 1
    assert cache.snapshot().evictions == {"invalidation": 1}


def test_zero_ttl_is_refused() -> None:
    cache = ResultCache(clock=FakeClock())
    assert not store(cache, b"k", ttl=0.0)
    assert cache.get(b"k") is None and cache.snapshot().rejected == {"no_ttl": 1}


def test_constructor_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ResultCache(max_bytes=0)
    with pytest.raises(ValueError, match="max_result_bytes"):
        ResultCache(max_result_bytes=-1)


# -- store: TTL -----------------------------------------------------------------------------------------

def test_entries_expire_after_their_ttl_counted_as_ttl_evictions() -> None:
    clock = FakeClock(1000.0)
    cache = ResultCache(clock=clock)
    assert store(cache, b"short", ttl=10.0) and store(cache, b"long", ttl=100.0)
    clock.now = 1009.9
    assert cache.get(b"short") == b"rows"
    clock.now = 1010.0
    assert cache.get(b"short") is None
    assert cache.get(b"long") == b"rows"
    snap = cache.snapshot()
    assert snap.evictions == {"ttl": 1} and snap.entries == 1 and snap.misses == 1
    assert snap.bytes == entry_size(b"long", b"rows")


def test_ttl_runs_from_the_start_of_the_read_and_a_read_longer_than_the_ttl_is_not_stored() -> None:
    clock = FakeClock(1000.0)
    cache = ResultCache(clock=clock)
    token = cache.begin_read(("jobs",))
    clock.now = 1004.0
    assert cache.put(b"k", b"rows", ("jobs",), 10.0, token)
    clock.now = 1010.0
    assert cache.get(b"k") is None  # 10 s after the read began, not after the put
    slow = cache.begin_read(("jobs",))
    clock.now = 1021.0
    assert not cache.put(b"k", b"rows", ("jobs",), 10.0, slow)
    assert cache.snapshot().rejected == {"expired": 1}


def test_purge_expired_removes_only_expired_entries() -> None:
    clock = FakeClock()
    cache = ResultCache(clock=clock)
    assert store(cache, b"a", ttl=1.0) and store(cache, b"b", ttl=5.0) and store(cache, b"c", ttl=1.0)
    clock.now += 2.0
    assert cache.purge_expired() == 2
    assert len(cache) == 1 and cache.get(b"b") == b"rows"
    assert cache.invalidate(["jobs"], "notify") == 1  # the purged entries left the index too


# -- store: invalidation ----------------------------------------------------------------------------------

def test_invalidate_removes_entries_of_the_named_tables_only() -> None:
    cache = ResultCache(clock=FakeClock())
    store(cache, b"jobs", tables=("jobs",))
    store(cache, b"join", tables=("jobs", "matches"))
    store(cache, b"users", tables=("users",))
    store(cache, b"none", tables=())
    assert cache.invalidate(["matches"], "proxy") == 1
    assert cache.get(b"join") is None and cache.get(b"jobs") == b"rows"
    assert cache.invalidate(["jobs", "resumes"], "notify") == 1
    assert [cache.get(k) for k in (b"jobs", b"users", b"none")] == [None, b"rows", b"rows"]
    snap = cache.snapshot()
    assert snap.invalidations == {"proxy": 1, "notify": 1} and snap.evictions == {"invalidation": 2}


@pytest.mark.parametrize(("read", "written"), [
    ("jobs", "public.jobs"), ("public.jobs", "jobs"), ("Public.Jobs", "JOBS"), ("jobs", "Jobs"),
    ("archive.jobs", "public.jobs"),  # same last component: spurious, harmless
])
def test_invalidation_matches_case_insensitively_on_the_unqualified_name(read: str, written: str) -> None:
    cache = ResultCache(clock=FakeClock())
    store(cache, b"k", tables=(read,))
    assert cache.invalidate([written], "proxy") == 1
    assert cache.get(b"k") is None


def test_table_match_key() -> None:
    assert table_match_key("Public.Jobs") == table_match_key("jobs") == "jobs"
    assert table_match_key("jobs_archive") != table_match_key("jobs")


def test_invalidation_sources_are_a_closed_set() -> None:
    cache = ResultCache()
    with pytest.raises(ValueError, match="'cron'"):
        cache.invalidate(["jobs"], "cron")
    with pytest.raises(ValueError, match="'x'"):
        cache.flush("x")


# -- store: the race rule ---------------------------------------------------------------------------------

def test_a_read_that_began_before_an_invalidation_is_not_stored() -> None:
    cache = ResultCache(clock=FakeClock())
    token = cache.begin_read(("public.jobs",))
    cache.invalidate(["jobs"], "notify")
    assert not cache.put(b"k", b"old rows", ("public.jobs",), 60.0, token)
    assert cache.get(b"k") is None
    assert cache.snapshot().rejected == {"stale": 1}


def test_a_read_that_began_after_the_invalidation_is_stored() -> None:
    cache = ResultCache(clock=FakeClock())
    cache.invalidate(["jobs"], "notify")
    token = cache.begin_read(("jobs",))
    assert cache.put(b"k", b"new rows", ("jobs",), 60.0, token)
    assert cache.get(b"k") == b"new rows"


def test_an_invalidation_of_another_table_does_not_spoil_a_read() -> None:
    cache = ResultCache(clock=FakeClock())
    token = cache.begin_read(("jobs",))
    cache.invalidate(["users"], "proxy")
    assert cache.put(b"k", b"rows", ("jobs",), 60.0, token)


def test_the_tables_given_to_put_are_checked() -> None:
    cache = ResultCache(clock=FakeClock())
    token = cache.begin_read()
    cache.invalidate(["jobs"], "proxy")
    assert not cache.put(b"k", b"rows", ["matches", "Jobs"], 60.0, token)
    assert cache.put(b"k", b"rows", iter(["matches"]), 60.0, token)  # any iterable
    assert cache.invalidate(["matches"], "proxy") == 1


def test_flush_removes_everything_and_makes_outstanding_tokens_stale() -> None:
    cache = ResultCache(clock=FakeClock())
    store(cache, b"a", tables=("jobs",))
    store(cache, b"b", tables=())
    before = cache.begin_read(("users",))
    no_tables = cache.begin_read()
    assert cache.flush() == 2
    assert len(cache) == 0 and cache.used_bytes == 0 and cache.get(b"a") is None
    assert not cache.put(b"c", b"rows", ("users",), 60.0, before)
    assert not cache.put(b"d", b"rows", (), 60.0, no_tables)
    after = cache.begin_read(("users",))
    assert cache.put(b"c", b"rows", ("users",), 60.0, after)
    snap = cache.snapshot()
    assert snap.invalidations == {"flush": 1} and snap.evictions == {"flush": 2} and snap.rejected == {"stale": 2}


def test_too_many_tracked_tables_forgets_them_by_making_every_token_stale() -> None:
    cache = ResultCache(clock=FakeClock(), max_tracked_tables=3)
    token = cache.begin_read(("jobs",))
    cache.invalidate(["a", "b", "c"], "notify")
    assert cache.put(b"k1", b"rows", ("jobs",), 60.0, token)
    cache.invalidate(["d"], "notify")  # 4 tracked > 3: the record is cleared, old tokens stale
    assert len(cache._invalidated_at) == 0
    assert not cache.put(b"k2", b"rows", ("jobs",), 60.0, token)
    assert cache.put(b"k2", b"rows", ("a",), 60.0, cache.begin_read(("a",)))


# -- store: pause / resume --------------------------------------------------------------------------------

def test_pause_flushes_serves_nothing_stores_nothing_and_resume_restarts() -> None:
    cache = ResultCache(clock=FakeClock())
    store(cache, b"k", b"rows")
    before_pause = cache.begin_read(("jobs",))
    cache.pause()
    assert cache.paused and len(cache) == 0
    assert cache.get(b"k") is None
    during = cache.begin_read(("jobs",))
    assert not store(cache, b"k", b"rows")
    cache.resume()
    assert not cache.paused
    # reads that began before the resume may have missed a write: not stored
    assert not cache.put(b"k", b"rows", ("jobs",), 60.0, before_pause)
    assert not cache.put(b"k", b"rows", ("jobs",), 60.0, during)
    assert store(cache, b"k", b"rows") and cache.get(b"k") == b"rows"
    snap = cache.snapshot()
    assert snap.rejected == {"paused": 1, "stale": 2}
    assert snap.bypasses == {"paused": 1} and snap.misses == 0 and snap.hits == 1
    assert snap.invalidations == {"flush": 1} and snap.paused is False


# -- counters and the API views ---------------------------------------------------------------------------

def test_snapshot_counts_bypasses_by_reason_and_is_a_copy() -> None:
    cache = ResultCache(max_bytes=1_000_000, max_result_bytes=2000, clock=FakeClock())
    cache.record_bypass("not_hinted")
    cache.record_bypass("not_hinted")
    cache.record_bypass("volatile_function:now")
    snap = cache.snapshot()
    assert snap.bypasses == {"not_hinted": 2, "volatile_function:now": 1}
    assert (snap.max_bytes, snap.max_result_bytes, snap.paused) == (1_000_000, 2000, False)
    snap.bypasses["x"] = 1
    assert "x" not in cache.snapshot().bypasses


def test_top_orders_entries_by_hits_and_shows_no_rows() -> None:
    clock = FakeClock(100.0)
    cache = ResultCache(clock=clock)
    store(cache, b"a" * 16, b"secret row data", tables=("jobs",), ttl=60.0)
    clock.now = 110.0
    store(cache, b"b" * 16, b"other", tables=("users", "matches"), ttl=60.0)
    store(cache, b"c" * 16, b"third", tables=(), ttl=60.0)
    for _ in range(3):
        cache.get(b"b" * 16)
    cache.get(b"a" * 16)
    clock.now = 120.0
    top = cache.top(2)
    assert [entry.key for entry in top] == [key_id(b"b" * 16), key_id(b"a" * 16)]
    assert (top[0].hits, top[0].tables, top[0].age_s, top[0].ttl_s) == (3, ("users", "matches"), 10.0, 50.0)
    assert (top[1].hits, top[1].age_s, top[1].ttl_s) == (1, 20.0, 40.0)
    assert top[1].bytes == entry_size(b"a" * 16, b"secret row data")
    assert "secret" not in repr(top)
    assert cache.top(0) == [] and len(cache.top(10)) == 3


# -- the index stays exact under any sequence of operations (differential against a model) ---------------

KEYS = [b"k%d" % n for n in range(6)]
TABLES = ["jobs", "public.jobs", "Jobs", "users", "s.users", "matches", "resumes"]
MAX_BYTES = 4 * (ENTRY_OVERHEAD + 2 + 100)


class Model:
    """The cache's contract written the simple way: per-token dirty sets instead of sequence numbers."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[bytes, frozenset[str], float, int]] = {}  # LRU order
        self.tokens: list[dict[str, Any]] = []
        self.paused = False
        self.evictions: dict[str, int] = {}
        self.hits = self.misses = self.stores = self.bypasses = 0

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.evictions[reason] = self.evictions.get(reason, 0) + n

    @property
    def used(self) -> int:
        return sum(entry[3] for entry in self.entries.values())

    def begin(self, now: float) -> int:
        self.tokens.append({"dirty": set(), "stale": False, "started": now})
        return len(self.tokens) - 1

    def get(self, key: bytes, now: float) -> bytes | None:
        if self.paused:
            self.bypasses += 1
            return None
        if key not in self.entries:
            self.misses += 1
            return None
        entry = self.entries.pop(key)
        if entry[2] <= now:
            self.count("ttl")
            self.misses += 1
            return None
        self.entries[key] = entry
        self.hits += 1
        return entry[0]

    def put(self, key: bytes, response: bytes, tables: list[str], ttl: float, token: int, now: float) -> bool:
        names = frozenset(t.rsplit(".", 1)[-1].lower() for t in tables)
        size = len(response) + len(key) + ENTRY_OVERHEAD
        state = self.tokens[token]
        if (self.paused or ttl <= 0 or len(response) > 150 or size > MAX_BYTES or state["stale"]
                or state["dirty"] & names or state["started"] + ttl <= now):
            return False
        self.entries.pop(key, None)
        while self.used + size > MAX_BYTES:
            del self.entries[next(iter(self.entries))]
            self.count("lru")
        self.entries[key] = (response, names, state["started"] + ttl, size)
        self.stores += 1
        return True

    def invalidate(self, tables: list[str]) -> int:
        names = {t.rsplit(".", 1)[-1].lower() for t in tables}
        for state in self.tokens:
            state["dirty"] |= names
        doomed = [key for key, entry in self.entries.items() if entry[1] & names]
        for key in doomed:
            del self.entries[key]
        self.count("invalidation", len(doomed))
        return len(doomed)

    def flush(self) -> int:
        removed = len(self.entries)
        self.count("flush", removed)
        self.entries.clear()
        for state in self.tokens:
            state["stale"] = True
        return removed


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.cache = ResultCache(max_bytes=MAX_BYTES, max_result_bytes=150, clock=self.clock)
        self.model = Model()
        self.tokens: list[ReadToken] = []

    @rule(tables=st.lists(st.sampled_from(TABLES), max_size=3))
    def begin_read(self, tables: list[str]) -> None:
        self.tokens.append(self.cache.begin_read(tables))
        self.model.begin(self.clock.now)

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: bytes) -> None:
        assert self.cache.get(key) == self.model.get(key, self.clock.now)

    @rule(key=st.sampled_from(KEYS), size=st.integers(0, 160), tables=st.lists(st.sampled_from(TABLES), max_size=3),
          ttl=st.sampled_from([0.0, 1.0, 5.0, 60.0]), pick=st.integers(0, 1000))
    def put(self, key: bytes, size: int, tables: list[str], ttl: float, pick: int) -> None:
        if not self.tokens:
            self.begin_read(tables)
        index = pick % len(self.tokens)
        response = key + b"=" + bytes([pick % 256]) * size
        expected = self.model.put(key, response, tables, ttl, index, self.clock.now)
        assert self.cache.put(key, response, tables, ttl, self.tokens[index]) == expected

    @rule(tables=st.lists(st.sampled_from(TABLES), min_size=1, max_size=2),
          source=st.sampled_from(["proxy", "notify"]))
    def invalidate(self, tables: list[str], source: str) -> None:
        assert self.cache.invalidate(tables, source) == self.model.invalidate(tables)

    @rule()
    def flush(self) -> None:
        assert self.cache.flush() == self.model.flush()

    @rule()
    def pause(self) -> None:
        self.cache.pause()
        self.model.flush()
        self.model.paused = True

    @rule()
    def resume(self) -> None:
        self.cache.resume()
        self.model.paused = False
        for state in self.model.tokens:
            state["stale"] = True

    @rule(seconds=st.sampled_from([0.5, 2.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def purge(self) -> None:
        now = self.clock.now
        expired = [key for key, entry in self.model.entries.items() if entry[2] <= now]
        for key in expired:
            del self.model.entries[key]
        self.model.count("ttl", len(expired))
        assert self.cache.purge_expired() == len(expired)

    @invariant()
    def same_entries_in_the_same_lru_order(self) -> None:
        assert list(self.cache._entries) == list(self.model.entries)
        assert self.cache.used_bytes == self.model.used <= MAX_BYTES

    @invariant()
    def index_holds_exactly_the_live_entries(self) -> None:
        expected: dict[str, set[bytes]] = {}
        for key, entry in self.cache._entries.items():
            for name in entry.match_keys:
                expected.setdefault(name, set()).add(key)
        assert self.cache._index == expected

    @invariant()
    def counters_match_the_model(self) -> None:
        snap = self.cache.snapshot()
        model = self.model
        assert (snap.entries, snap.hits, snap.misses, snap.stores) == (
            len(model.entries), model.hits, model.misses, model.stores)
        assert snap.evictions == model.evictions
        assert snap.bypasses.get("paused", 0) == model.bypasses


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# --------------------------------------------------------------------------- writes in flight


def test_a_table_written_by_an_open_transaction_is_neither_served_nor_stored() -> None:
    cache = ResultCache(clock=FakeClock())
    assert store(cache, b"k1", tables=("jobs",)) and store(cache, b"k2", tables=("users",))
    marks = cache.begin_write(["public.JOBS"])  # match keys: the last component, lowercased
    assert cache.get(b"k1") is None and cache.get(b"k2") == b"rows"
    assert not store(cache, b"k3", tables=("jobs", "users"))
    assert cache.snapshot().rejected == {"write_in_flight": 1}
    assert cache.writes_in_flight() == 1
    cache.end_write(marks, committed=False)  # rolled back: the entry is still right
    assert cache.get(b"k1") == b"rows" and cache.writes_in_flight() == 0
    assert cache.snapshot().invalidations == {}


def test_a_committed_write_evicts_and_makes_reads_begun_before_it_stale() -> None:
    cache = ResultCache(clock=FakeClock())
    assert store(cache, b"k1")
    marks = cache.begin_write(["jobs"])
    token = cache.begin_read(("jobs",))  # a read that starts while the write is open
    assert cache.end_write(marks, committed=True) == 1
    assert cache.get(b"k1") is None
    assert not cache.put(b"k1", b"old", ("jobs",), 60.0, token)
    assert cache.snapshot().rejected == {"stale": 1}
    assert cache.snapshot().invalidations == {"proxy": 1}


def test_marks_are_counted_per_transaction() -> None:
    cache = ResultCache(clock=FakeClock())
    first, second = cache.begin_write(["jobs"]), cache.begin_write(["jobs"])
    cache.end_write(first, committed=False)
    assert not store(cache, b"k1")  # the other transaction still writes jobs
    cache.end_write(second, committed=False)
    assert store(cache, b"k1") and cache.writes_in_flight() == 0


def test_a_transaction_that_may_write_anything_blocks_everything_until_it_ends() -> None:
    cache = ResultCache(clock=FakeClock())
    assert store(cache, b"k1", tables=("a",)) and store(cache, b"k2", tables=())
    cache.begin_write_all()
    assert cache.get(b"k1") is None and cache.get(b"k2") is None
    assert not store(cache, b"k3", tables=("b",))
    cache.end_write_all(committed=False)
    assert cache.get(b"k1") == b"rows"
    cache.begin_write_all()
    assert cache.end_write_all(committed=True) == 2
    assert len(cache) == 0


def test_a_result_read_before_the_stored_one_never_replaces_it() -> None:
    clock = FakeClock()
    cache = ResultCache(clock=clock)
    early = cache.begin_read(("jobs",))
    clock.now += 1
    assert cache.put(b"k", b"newer", ("jobs",), 60.0, cache.begin_read(("jobs",)))
    assert not cache.put(b"k", b"older", ("jobs",), 60.0, early)
    assert cache.get(b"k") == b"newer" and cache.snapshot().rejected == {"older": 1}
