"""proxy.stats: per-fingerprint statistics, aggregated counters and the slow-query ring (pure)."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.fingerprint import Fingerprint, Fingerprinter
from proxy.protocol import rows_in_tag
from proxy.recorder import Recorder
from proxy.stats import (
    FOLD,
    LATENCY_BUCKETS,
    MAX_APPLICATION_NAMES,
    TOP_ORDERS,
    FingerprintSnapshot,
    QueryStats,
    SlowQuery,
    pretty_sql,
)

SELECT = Fingerprint(id="00000000000000a1", normalized="SELECT * FROM t WHERE id = $1", kind="select",
                     tables=("t",), read_only=True)
UPDATE = Fingerprint(id="00000000000000b2", normalized="UPDATE t SET a = $1", kind="update", tables=("t",))


def finish(stats: QueryStats, fp: Fingerprint = SELECT, *, duration: float = 0.002, wait: float = 0.0,
           rows: int = 1, sqlstate: str | None = None, database: str = "app", user: str = "alice",
           application_name: str = "web", now: float = 1000.0, **kw: Any) -> SlowQuery | None:
    return stats.query_finished(fp, database=database, user=user, application_name=application_name,
                                client=kw.get("client", "10.0.0.5:40000"), duration=duration, wait=wait,
                                rows=rows, sqlstate=sqlstate, now=now)


def test_buckets_resolve_1ms_to_10s_including_half_and_one_second() -> None:
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    for bound in (0.001, 0.5, 1.0, 10.0):
        assert bound in LATENCY_BUCKETS
    assert LATENCY_BUCKETS[-1] == 10.0


def test_counts_rows_errors_and_times_match_what_was_recorded() -> None:
    stats = QueryStats()
    finish(stats, duration=0.001, rows=3, wait=0.0005, now=10.0, application_name="web")
    finish(stats, duration=0.003, rows=5, now=20.0, application_name="worker")
    finish(stats, duration=0.002, rows=0, sqlstate="23505", now=30.0, application_name="web")
    snap = stats.get(SELECT.id)
    assert snap is not None
    assert (snap.calls, snap.errors, snap.rows) == (3, 1, 8)
    assert snap.total_ms == pytest.approx(6.0)
    assert (snap.min_ms, snap.max_ms, snap.mean_ms) == (pytest.approx(1.0), pytest.approx(3.0), pytest.approx(2.0))
    assert (snap.first_seen, snap.last_seen) == (10.0, 30.0)
    assert snap.application_names == ("web", "worker")
    assert snap.wait_ms_total == pytest.approx(0.5)
    assert snap.last_sqlstate == "23505"
    assert (snap.id, snap.normalized, snap.kind, snap.tables) == (SELECT.id, SELECT.normalized, "select", ("t",))
    assert snap.buckets[-1] == 3 and len(snap.buckets) == len(LATENCY_BUCKETS) + 1
    assert stats.get("ffffffffffffffff") is None


def test_aggregated_counters_and_histograms_by_database_user_kind_status() -> None:
    stats = QueryStats()
    finish(stats, duration=0.002)
    finish(stats, duration=0.004)
    finish(stats, duration=0.004, sqlstate="57014")
    finish(stats, UPDATE, duration=0.02, user="bob")
    snap = stats.snapshot()
    assert snap.queries == {("app", "alice", "select", "ok"): 2, ("app", "alice", "select", "error"): 1,
                            ("app", "bob", "update", "ok"): 1}
    selects = snap.durations[("app", "alice", "select")]
    assert selects.count == 3 and selects.sum == pytest.approx(0.010)
    assert selects.buckets[LATENCY_BUCKETS.index(0.0025)] == 1
    assert selects.buckets[LATENCY_BUCKETS.index(0.005)] == 3
    assert selects.buckets[-1] == 3
    assert snap.durations[("app", "bob", "update")].buckets[LATENCY_BUCKETS.index(0.025)] == 1
    assert snap.fingerprints == 2 and snap.evicted == 0 and snap.slow == {}
    assert snap.bounds == LATENCY_BUCKETS


def test_snapshot_is_a_copy() -> None:
    stats = QueryStats()
    finish(stats)
    snap = stats.snapshot()
    finish(stats)
    assert snap.queries[("app", "alice", "select", "ok")] == 1
    assert snap.durations[("app", "alice", "select")].count == 1


def test_bucket_bounds_are_inclusive_like_prometheus_le() -> None:
    stats = QueryStats()
    finish(stats, duration=0.001)
    finish(stats, duration=0.0010001)
    finish(stats, duration=60.0)
    buckets = stats.snapshot().durations[("app", "alice", "select")].buckets
    i = LATENCY_BUCKETS.index(0.001)
    assert (buckets[i], buckets[i + 1]) == (1, 2)
    assert buckets[-2] == 2 and buckets[-1] == 3  # 60 s only in +Inf


def test_percentiles_land_in_the_right_bucket() -> None:
    stats = QueryStats()
    for _ in range(90):
        finish(stats, duration=0.003)  # (2.5 ms, 5 ms]
    for _ in range(9):
        finish(stats, duration=0.3)  # (250 ms, 500 ms]
    finish(stats, duration=2.0)  # (1 s, 2.5 s]
    snap = stats.get(SELECT.id)
    assert snap is not None
    # rank 50 is the 50th of 90 calls in (2.5 ms, 5 ms]; rank 95 the 5th of 9 in (250 ms, 500 ms]
    assert snap.p50_ms == pytest.approx(2.5 + 2.5 * 50 / 90)
    assert snap.p95_ms == pytest.approx(250.0 + 250.0 * 5 / 9)
    assert snap.p99_ms == pytest.approx(500.0)
    assert snap.p50_ms <= snap.p95_ms <= snap.p99_ms <= snap.max_ms


def test_percentiles_are_clamped_to_observed_min_and_max() -> None:
    stats = QueryStats()
    for _ in range(10):
        finish(stats, duration=0.0003)
    snap = stats.get(SELECT.id)
    assert snap is not None
    assert snap.p50_ms == snap.p95_ms == snap.p99_ms == pytest.approx(0.3)


def test_percentile_in_the_inf_bucket_is_the_maximum() -> None:
    stats = QueryStats()
    finish(stats, duration=42.0)
    snap = stats.get(SELECT.id)
    assert snap is not None and snap.p99_ms == pytest.approx(42000.0)


def test_percentile_interpolates_linearly_within_the_bucket() -> None:
    stats = QueryStats()
    for _ in range(50):
        finish(stats, duration=0.011)  # (10 ms, 25 ms]
    for _ in range(50):
        finish(stats, duration=0.024)
    snap = stats.get(SELECT.id)
    assert snap is not None
    assert snap.p50_ms == pytest.approx(10.0 + 15.0 * 0.5)  # rank 50 of 100, all in one bucket


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=200))
def test_percentiles_are_ordered_and_within_min_max(durations: list[float]) -> None:
    stats = QueryStats()
    for duration in durations:
        finish(stats, duration=duration)
    snap = stats.get(SELECT.id)
    assert snap is not None and snap.calls == len(durations) == snap.buckets[-1]
    assert snap.min_ms <= snap.p50_ms <= snap.p95_ms <= snap.p99_ms <= snap.max_ms
    assert list(snap.buckets) == sorted(snap.buckets)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(LATENCY_BUCKETS + (0.0, 0.0003, 0.7, 12.0)) | st.floats(0.0, 20.0), st.booleans()),
        min_size=1, max_size=3 * FOLD + 7,
    ),
    st.sets(st.integers(0, 3 * FOLD + 7), max_size=4),
)
def test_folded_statistics_equal_statement_by_statement_ones(statements: list[tuple[float, bool]],
                                                              reads_after: set[int]) -> None:
    # Durations are folded every FOLD statements and on every read: whatever the number of
    # statements and wherever reads fall, every figure is what one-by-one counting gives.
    stats = QueryStats()
    for i, (duration, failed) in enumerate(statements):
        finish(stats, duration=duration, sqlstate="57014" if failed else None)
        if i in reads_after:
            stats.snapshot()
            stats.get(SELECT.id)
    durations = [d for d, _ in statements]
    errors = sum(failed for _, failed in statements)
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    for d in durations:
        expected[next((i for i, bound in enumerate(LATENCY_BUCKETS) if d <= bound), len(LATENCY_BUCKETS))] += 1
    cumulative = tuple(sum(expected[: i + 1]) for i in range(len(expected)))
    snap = stats.get(SELECT.id)
    assert snap is not None
    assert (snap.calls, snap.errors, snap.buckets) == (len(durations), errors, cumulative)
    assert snap.total_ms == pytest.approx(sum(durations) * 1000.0)
    assert (snap.min_ms, snap.max_ms) == (min(durations) * 1000.0, max(durations) * 1000.0)
    agg = stats.snapshot()
    histogram = agg.durations[("app", "alice", "select")]
    assert (histogram.buckets, histogram.count) == (cumulative, len(durations))
    assert histogram.sum == pytest.approx(sum(durations))
    assert agg.queries.get(("app", "alice", "select", "ok"), 0) == len(durations) - errors
    assert agg.queries.get(("app", "alice", "select", "error"), 0) == errors
    assert stats.top("calls", 1)[0].calls == len(durations)


def test_slow_threshold_exactly_at_is_not_slow_over_is() -> None:
    stats = QueryStats(slow_threshold_ms=500.0)
    assert finish(stats, duration=0.5) is None
    slow = finish(stats, duration=0.5000001, wait=0.25, rows=7, sqlstate="57014", now=99.0, client="10.1.2.3:5555")
    assert slow is not None and slow.duration_ms == pytest.approx(500.0001)
    assert slow == SlowQuery(fingerprint=SELECT.id, normalized=SELECT.normalized, kind="select",
                             duration_ms=slow.duration_ms, wait_ms=250.0, rows=7, database="app",
                             user="alice", application_name="web", client="10.1.2.3:5555", sqlstate="57014",
                             at=99.0)
    assert stats.snapshot().slow == {("app", "alice"): 1}
    assert stats.slow(10) == [slow]


def test_slow_ring_is_bounded_most_recent_first_and_counted_per_database_user() -> None:
    stats = QueryStats(slow_threshold_ms=100.0, slow_ring=5)
    for i in range(12):
        finish(stats, duration=1.0 + i, user="alice" if i % 2 else "bob", now=float(i))
    recent = stats.slow(100)
    assert [s.at for s in recent] == [11.0, 10.0, 9.0, 8.0, 7.0]
    assert [s.at for s in stats.slow(2)] == [11.0, 10.0]
    assert stats.slow(0) == []
    assert stats.snapshot().slow == {("app", "alice"): 6, ("app", "bob"): 6}
    with pytest.raises(ValueError, match="limit"):
        stats.slow(-1)


def test_application_names_are_bounded() -> None:
    stats = QueryStats()
    for i in range(50):
        finish(stats, application_name=f"app-{i}")
    snap = stats.get(SELECT.id)
    assert snap is not None
    assert len(snap.application_names) == MAX_APPLICATION_NAMES + 1
    assert "other" in snap.application_names


def test_eviction_keeps_memory_bounded_with_100000_distinct_fingerprints() -> None:
    stats = QueryStats(max_fingerprints=1000)
    heavy = Fingerprint(id="heavyheavyheavy0", normalized="SELECT pg_sleep($1)", kind="select")
    finish(stats, heavy, duration=5.0)
    for i in range(100_000):
        finish(stats, Fingerprint(id=f"{i:016x}", normalized="SELECT $1", kind="select"), duration=0.001)
        assert len(stats) <= 1000
    snap = stats.snapshot()
    assert snap.fingerprints == len(stats) <= 1000
    assert snap.evicted == 100_001 - snap.fingerprints
    assert stats.get(heavy.id) is not None  # the significant one survives
    assert sum(snap.queries.values()) == 100_001  # aggregates are not evicted


def _fp(i: int) -> Fingerprint:
    return Fingerprint(id=f"{i:016x}", normalized=f"SELECT c{i}", kind="select")


def test_a_full_table_admits_a_query_that_becomes_hot_within_a_few_calls() -> None:
    stats = QueryStats(max_fingerprints=100)
    for i in range(100):
        finish(stats, _fp(i))
    hot = _fp(10_000)
    calls = 0
    while stats.get(hot.id) is None:
        finish(stats, hot, duration=0.05)
        calls += 1
        assert calls <= 3, "a query called again and again must get a place"
    assert len(stats) == 100
    for _ in range(10):
        finish(stats, hot, duration=0.05)
    assert stats.get(hot.id).calls == 10 + 1  # type: ignore[union-attr]  # from its admission on
    # Counted: the entry it replaced and each sighting that was refused before.
    assert stats.evicted == calls


def test_uniform_traffic_over_twice_the_table_does_not_swap_entries_on_every_statement() -> None:
    """10,000 fingerprints through 5,000 slots, scaled down: without admission, half of all
    statements replaced an entry (the distinct-10k benchmark); with it the table settles."""
    import random

    rng = random.Random(7)
    stats = QueryStats(max_fingerprints=200)
    stream = [_fp(rng.randrange(400)) for _ in range(40_000)]
    for fp in stream[:20_000]:
        finish(stats, fp)
    before = {s.id for s in stats.top("calls", 1000)}
    for fp in stream[20_000:]:
        finish(stats, fp)
    after = {s.id for s in stats.top("calls", 1000)}
    assert len(before) == len(after) == 200
    # With replacement on every miss about every entry would have changed twice over.
    assert len(after - before) < 100, len(after - before)
    assert sum(stats.snapshot().queries.values()) == 40_000  # aggregates count every statement


def test_reset_forgets_the_newcomers_seen_too() -> None:
    stats = QueryStats(max_fingerprints=2)
    finish(stats, _fp(1))
    finish(stats, _fp(2))
    finish(stats, _fp(3))  # seen once, refused
    stats.reset()
    finish(stats, _fp(3))
    assert stats.get(_fp(3).id).calls == 1  # type: ignore[union-attr]  # an empty table takes it at once


def test_eviction_with_real_fingerprints() -> None:
    fingerprint = Fingerprinter(max_memo=500)
    stats = QueryStats(max_fingerprints=200)
    for i in range(2000):
        finish(stats, fingerprint(f"SELECT c{i} FROM t{i} WHERE id = {i}"))
    assert len(stats) <= 200 and stats.evicted >= 1800


def _ids(snaps: list[FingerprintSnapshot]) -> list[str]:
    return [s.id for s in snaps]


def test_top_orderings() -> None:
    stats = QueryStats()
    a = Fingerprint(id="a" * 16, normalized="a", kind="select")  # many cheap calls
    b = Fingerprint(id="b" * 16, normalized="b", kind="select")  # one slow call, many rows
    c = Fingerprint(id="c" * 16, normalized="c", kind="update")  # errors
    for _ in range(100):
        finish(stats, a, duration=0.001, rows=1)
    finish(stats, b, duration=0.9, rows=10_000)
    for _ in range(10):
        finish(stats, c, duration=0.02, rows=0, sqlstate="40001")
    assert _ids(stats.top("calls", 3)) == [a.id, c.id, b.id]
    assert _ids(stats.top("total_time", 3)) == [b.id, c.id, a.id]
    assert _ids(stats.top("mean", 3)) == [b.id, c.id, a.id]
    assert _ids(stats.top("p95", 3)) == [b.id, c.id, a.id]
    assert _ids(stats.top("errors", 1)) == [c.id]
    assert _ids(stats.top("rows", 2)) == [b.id, a.id]
    assert stats.top("calls", 0) == []
    assert len(stats.top("calls", 100)) == 3
    assert set(TOP_ORDERS) == {"total_time", "calls", "mean", "p95", "errors", "rows"}


def test_top_rejects_unknown_order_naming_the_allowed_ones() -> None:
    stats = QueryStats()
    with pytest.raises(ValueError, match="total_time, calls, mean, p95, errors, rows.*'bogus'"):
        stats.top("bogus", 10)
    with pytest.raises(ValueError, match="limit"):
        stats.top("calls", -1)


def test_reset_clears_fingerprints_and_slow_ring_but_counters_keep_counting() -> None:
    clock = iter([500.0])
    stats = QueryStats(slow_threshold_ms=1.0, clock=lambda: next(clock))
    finish(stats, duration=0.5)
    stats.reset()
    assert len(stats) == 0 and stats.get(SELECT.id) is None and stats.slow(10) == [] and stats.top("calls", 5) == []
    snap = stats.snapshot()
    assert snap.queries == {("app", "alice", "select", "ok"): 1}  # Prometheus counters are monotonic
    assert snap.slow == {("app", "alice"): 1}
    assert snap.reset_at == 500.0 and snap.fingerprints == 0
    finish(stats, duration=0.5)
    assert stats.get(SELECT.id) is not None and stats.snapshot().queries[("app", "alice", "select", "ok")] == 2


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="max_fingerprints"):
        QueryStats(max_fingerprints=0)
    with pytest.raises(ValueError, match="slow_ring"):
        QueryStats(slow_ring=-1)


def test_query_stats_is_slotted() -> None:
    assert not hasattr(QueryStats(), "__dict__")


def test_pretty_sql() -> None:
    text = pretty_sql("select a, b from t where a = $1 and b in (select c from u)")
    assert text.startswith("SELECT a,")
    assert "\nFROM t" in text and "WHERE a = $1" in text
    assert pretty_sql("") == ""
    long = "select " + ", ".join(f"c{i}" for i in range(1000)) + " from t"
    assert pretty_sql(long) == long  # too long to be worth sqlparse's time


# ----------------------------------------------------------------------------- the recorder's batches

_TEXTS = [b"SELECT * FROM t WHERE id = 1", b"SELECT * FROM t WHERE id = 22", b"UPDATE t SET a = 3",
          b"SELECT * FROM u", b"select 'x' from t"]


@settings(max_examples=150, deadline=None)
@given(st.lists(
    st.tuples(
        st.sampled_from(range(len(_TEXTS))), st.sampled_from(range(2)), st.sampled_from(["web", "cron", ""]),
        st.sampled_from([0.0001, 0.002, 0.02, 0.4, 0.7, 3.0]), st.sampled_from([0.0, 0.001]),
        st.sampled_from([0, 3, b"SELECT 1", b"UPDATE 7", b"CREATE TABLE"]), st.sampled_from([None, None, "57014"]),
    ),
    min_size=1, max_size=300,
))
def test_a_batch_counted_in_groups_equals_one_statement_at_a_time(statements: list[tuple[Any, ...]]) -> None:
    """The recorder counts a batch in groups of one fingerprint and scope (record_many) when
    fingerprints repeat, else one statement at a time (record): every figure, the slow-query
    ring and its order are what recording each statement in turn gives."""
    grouped, reference = QueryStats(slow_threshold_ms=500.0), QueryStats(slow_threshold_ms=500.0)
    fingerprinter = Fingerprinter()
    scopes = [grouped.scope("app", "alice"), grouped.scope("app", "bob")]
    batch = [(_TEXTS[t], "utf-8", scopes[s], app, f"10.0.0.{s}:1", duration, wait, rows, sqlstate)
             for t, s, app, duration, wait, rows, sqlstate in statements]
    recorder = Recorder(grouped, fingerprinter)

    async def flush() -> None:
        recorder.pending = list(batch)
        recorder.flush()

    asyncio.run(flush())
    for sql, _, scope, app, client, duration, wait, rows, sqlstate in batch:
        count = rows_in_tag(rows) if isinstance(rows, bytes) else rows
        reference.record(fingerprinter.of_bytes(sql), reference.scope(scope.database, scope.user), app, client,
                         duration, wait, count, sqlstate, 0.0)
    assert recorder.failures == 0
    assert _comparable(grouped.top("calls", 50)) == _comparable(reference.top("calls", 50))
    assert grouped.snapshot().queries == reference.snapshot().queries
    assert {k: (h.buckets, round(h.sum, 9)) for k, h in grouped.snapshot().durations.items()} == {
        k: (h.buckets, round(h.sum, 9)) for k, h in reference.snapshot().durations.items()}
    assert grouped.snapshot().slow == reference.snapshot().slow
    assert [(s.fingerprint, s.duration_ms, s.rows, s.application_name, s.sqlstate) for s in grouped.slow(500)] == [
        (s.fingerprint, s.duration_ms, s.rows, s.application_name, s.sqlstate) for s in reference.slow(500)]


def _comparable(snaps: list[FingerprintSnapshot]) -> list[tuple[Any, ...]]:
    return sorted((s.id, s.calls, s.errors, s.rows, round(s.total_ms, 6), s.min_ms, s.max_ms, s.buckets,
                   tuple(sorted(s.application_names)), round(s.wait_ms_total, 6), s.last_sqlstate) for s in snaps)
