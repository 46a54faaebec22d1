"""QueryStats: per-fingerprint statistics, aggregated query counters and the slow-query ring.

Owns what the proxy remembers about the queries it has timed (issue 3): per fingerprint, what
pg_stat_statements keeps plus latency histograms (so percentiles) and the application_names that
ran it; aggregated counters and duration histograms keyed by (database, user, kind) for
Prometheus; and a bounded ring of recent slow queries. Pure and synchronous: the client session
calls ``query_finished`` once per statement; the agent's collectors read ``snapshot()`` at scrape
time and its API reads ``top``/``get``/``slow``. No prometheus import (CONVENTIONS habit 10).

Decisions worth knowing:

- Histograms use ``LATENCY_BUCKETS`` (seconds, ``le`` upper bounds like Prometheus, plus +Inf).
  Percentiles are estimated like Prometheus' ``histogram_quantile``: find the bucket holding the
  rank ``q * calls`` and interpolate linearly inside it (the first bucket starts at 0; the +Inf
  bucket reports the observed maximum); the estimate is then clamped to the observed min/max, so
  a fingerprint whose calls all take 0.3 ms reports 0.3 ms, not a bucket midpoint.
- A statement is slow when ``duration * 1000 > slow_threshold_ms``: exactly at the threshold is
  not slow (the issue says "over the threshold"; PostgreSQL's ``log_min_duration_statement``
  logs at >=, a difference of one timer tick).
- Memory is bounded: at most ``max_fingerprints`` entries. At the bound a new fingerprint must
  earn its place (admission, as in TinyLFU): it is compared with the least significant entry
  (lowest total time, then least recently seen; taken from a batch of the least significant 10 %
  computed at once), and replaces it only when it has been seen more often recently than that
  entry was called, by ``ADMIT_MARGIN`` (``recent`` counts, halved every ``AGING_FACTOR * max_fingerprints``
  sightings of untracked fingerprints, so old popularity fades). Otherwise the newcomer is the
  least significant and is the one dropped. ``evicted`` counts both (an entry evicted, or a
  statement whose fingerprint was not admitted): every statement lost to the bound is counted.
  Without admission, 10,000 fingerprints cycling through 5,000 slots replaced an entry on half of
  all statements (the ``distinct-10k`` benchmark: ~10 µs per statement); with it the table
  settles and a newcomer costs a dict update. A query that becomes hot is admitted after a few
  calls. An entry keeps at most ``MAX_APPLICATION_NAMES`` names, then adds "other". (The total
  time compared is the one folded so far: up to ``FOLD`` - 1 recent durations may not be in it.)
- Durations are folded into counts, sums and histograms every ``FOLD`` statements and before any
  read (``_Timings``), not one by one: every read sees every statement recorded before it.
- ``reset()`` clears what the API shows (fingerprints and the slow ring) but leaves the
  aggregated counters, histograms, slow counts and ``evicted`` alone: they are Prometheus counters
  and must only go up during a process's life. ``snapshot().reset_at`` says when it happened.

Measured with ``python -m proxy.stats`` while benchmarks loaded this 2-CPU machine:
``query_finished`` for a known fingerprint costs 1.2-2.3 µs (target: well under 5 µs); for a new
fingerprint, with the batch evictions amortised, ~5-10 µs.
"""
from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import Callable, Mapping

from .fingerprint import Fingerprint

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_APPLICATION_NAMES",
    "TOP_ORDERS",
    "FingerprintSnapshot",
    "HistogramSnapshot",
    "QueryStats",
    "Scope",
    "SlowQuery",
    "StatsSnapshot",
    "pretty_sql",
]

#: Upper bounds in seconds (``le``), resolving 0.25 ms ... 10 s; +Inf is implicit (the last count).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
MAX_APPLICATION_NAMES = 10
OTHER_APPLICATIONS = "other"
EVICT_FRACTION = 0.10
#: Recent counts (entries' and newcomers') are halved after this many times ``max_fingerprints``
#: sightings of untracked fingerprints.
AGING_FACTOR = 10
#: A newcomer replaces the least significant entry once it has been seen this many times more
#: (recently) than that entry was called: with frequencies all alike, entries are not swapped
#: back and forth on every statement.
ADMIT_MARGIN = 1


@dataclass(frozen=True, slots=True)
class SlowQuery:
    """One statement over the slow threshold. Normalised text only: never literals or binds."""

    fingerprint: str  # Fingerprint.id
    normalized: str
    kind: str
    duration_ms: float
    wait_ms: float
    rows: int
    database: str
    user: str
    application_name: str
    client: str
    sqlstate: str | None
    at: float  # wall clock, seconds since the epoch


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A Prometheus-shaped histogram: cumulative counts per ``LATENCY_BUCKETS`` bound and +Inf."""

    buckets: tuple[int, ...]  # cumulative; len(LATENCY_BUCKETS) + 1, the last is the count
    sum: float  # seconds
    count: int


@dataclass(frozen=True, slots=True)
class FingerprintSnapshot:
    """One fingerprint's statistics at one moment (times in milliseconds, wall-clock seconds)."""

    id: str
    normalized: str
    kind: str
    tables: tuple[str, ...]
    calls: int
    errors: int
    rows: int
    total_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    buckets: tuple[int, ...]  # cumulative counts per LATENCY_BUCKETS bound, then +Inf (== calls)
    first_seen: float
    last_seen: float
    application_names: tuple[str, ...]
    wait_ms_total: float
    last_sqlstate: str | None


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Everything the Prometheus collectors need, as plain values (fresh copies)."""

    queries: Mapping[tuple[str, str, str, str], int]  # (database, user, kind, status) -> count
    durations: Mapping[tuple[str, str, str], HistogramSnapshot]  # (database, user, kind)
    slow: Mapping[tuple[str, str], int]  # (database, user) -> slow statements
    evicted: int
    fingerprints: int
    bounds: tuple[float, ...]
    reset_at: float | None


#: Durations a fingerprint or a kind gathers before they are folded into its counts (and before
#: anyone reads them): see ``_Timings``.
FOLD = 64


def _fold_into(counts: list[int], durations: list[float]) -> None:
    """Add ``durations`` (sorted here) to ``counts``, one per ``LATENCY_BUCKETS`` bound and +Inf."""
    durations.sort()
    n = len(durations)
    done = 0
    for index, bound in enumerate(LATENCY_BUCKETS):
        upto = bisect_right(durations, bound, done)  # durations <= bound: the ``le`` buckets
        if upto > done:
            counts[index] += upto - done
            done = upto
            if done == n:
                return
    counts[-1] += n - done


class _Timings:
    """Statements seen: their count, errors among them, and their durations' sum, min, max and
    histogram.

    Recording a statement only appends its duration to ``pending``; every ``FOLD`` durations, and
    before anything is read, ``fold`` adds them up in one pass (C builtins and a sort, one bisect
    per bucket bound). Measured: recording ~60 bytecodes cheaper per statement than updating six
    fields and a bucket each time, on the path every statement takes."""

    __slots__ = ("calls", "errors", "total", "min", "max", "counts", "pending")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = 0.0
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.pending: list[float] = []

    def fold(self) -> None:
        pending = self.pending
        if not pending:
            return
        self.calls += len(pending)
        self.total += sum(pending)
        low = min(pending)
        if low < self.min:
            self.min = low
        high = max(pending)
        if high > self.max:
            self.max = high
        _fold_into(self.counts, pending)
        pending.clear()


class _Entry(_Timings):
    """Mutable per-fingerprint accumulator (hot path: plain attributes; durations via _Timings)."""

    __slots__ = ("fingerprint", "rows", "first_seen", "last_seen", "applications", "wait",
                 "last_sqlstate", "recent")

    def __init__(self, fingerprint: Fingerprint, now: float) -> None:
        super().__init__()
        self.fingerprint = fingerprint
        self.rows = 0
        self.first_seen = now
        self.last_seen = now
        self.applications: set[str] = set()
        self.wait = 0.0
        self.last_sqlstate: str | None = None
        self.recent = 0  # calls since the last aging (admission compares newcomers with it)


#: Aggregated counters of one statement kind within a Scope (Prometheus-facing).
_KindStats = _Timings


class Scope:
    """The aggregated counters of one (database, user). A client session holds its scope, so
    recording a statement costs no key tuples and no lookups by database and user."""

    __slots__ = ("database", "user", "kinds", "slow")

    def __init__(self, database: str, user: str) -> None:
        self.database = database
        self.user = user
        self.kinds: dict[str, _KindStats] = {}
        self.slow = 0


# Least significant first: least total time, then least recently seen (attrgetter: no Python
# frame per entry, which matters when 10,000 fingerprints cycle through 5,000 slots).
_SIGNIFICANCE = attrgetter("total", "last_seen")


def _cumulative(counts: list[int]) -> tuple[int, ...]:
    running = 0
    out = []
    for count in counts:
        running += count
        out.append(running)
    return tuple(out)


def _quantile(q: float, counts: list[int], total: int, low: float, high: float) -> float:
    """Seconds at quantile ``q`` by linear interpolation in the bucket, clamped to [low, high]."""
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(LATENCY_BUCKETS):
                return high
            lower = LATENCY_BUCKETS[index - 1] if index else 0.0
            upper = LATENCY_BUCKETS[index]
            value = lower + (upper - lower) * ((rank - seen) / count)
            return min(max(value, low), high)
        seen += count
    return high  # pragma: no cover - unreachable when counts sum to total


def _snapshot(entry: _Entry) -> FingerprintSnapshot:
    entry.fold()
    fp = entry.fingerprint
    calls = entry.calls
    low, high = entry.min, entry.max
    counts = entry.counts
    return FingerprintSnapshot(
        id=fp.id,
        normalized=fp.normalized,
        kind=fp.kind,
        tables=fp.tables,
        calls=calls,
        errors=entry.errors,
        rows=entry.rows,
        total_ms=entry.total * 1000.0,
        min_ms=low * 1000.0,
        max_ms=high * 1000.0,
        mean_ms=entry.total * 1000.0 / calls,
        p50_ms=_quantile(0.50, counts, calls, low, high) * 1000.0,
        p95_ms=_quantile(0.95, counts, calls, low, high) * 1000.0,
        p99_ms=_quantile(0.99, counts, calls, low, high) * 1000.0,
        buckets=_cumulative(counts),
        first_seen=entry.first_seen,
        last_seen=entry.last_seen,
        application_names=tuple(sorted(entry.applications)),
        wait_ms_total=entry.wait * 1000.0,
        last_sqlstate=entry.last_sqlstate,
    )


def _p95(entry: _Entry) -> float:
    return _quantile(0.95, entry.counts, entry.calls, entry.min, entry.max)


_ORDERS: dict[str, Callable[[_Entry], float]] = {
    "total_time": lambda e: e.total,
    "calls": lambda e: e.calls,
    "mean": lambda e: e.total / e.calls,
    "p95": _p95,
    "errors": lambda e: e.errors,
    "rows": lambda e: e.rows,
}
TOP_ORDERS: tuple[str, ...] = tuple(_ORDERS)


class QueryStats:
    """Per-fingerprint and aggregated query statistics. One per proxy; not thread-safe."""

    __slots__ = ("max_fingerprints", "slow_threshold_ms", "_entries", "_scopes",
                 "_slow_ring", "_evicted", "_reset_at", "_clock", "_seen", "_victims", "_sightings")

    def __init__(self, max_fingerprints: int = 5000, slow_threshold_ms: float = 500.0,
                 slow_ring: int = 200, *, clock: Callable[[], float] = time.time) -> None:
        if max_fingerprints < 1:
            raise ValueError(f"max_fingerprints must be at least 1, got {max_fingerprints}")
        if slow_ring < 0:
            raise ValueError(f"slow_ring must not be negative, got {slow_ring}")
        self.max_fingerprints = max_fingerprints
        self.slow_threshold_ms = float(slow_threshold_ms)
        self._entries: dict[str, _Entry] = {}
        self._scopes: dict[tuple[str, str], Scope] = {}
        self._slow_ring: deque[SlowQuery] = deque(maxlen=slow_ring)
        self._evicted = 0
        self._reset_at: float | None = None
        self._clock = clock
        self._seen: dict[str, int] = {}  # untracked fingerprint id -> recent sightings
        self._victims: list[_Entry] = []  # the least significant entries, most significant first
        self._sightings = 0  # of untracked fingerprints since the last aging

    # -- events ---------------------------------------------------------------------------------

    def scope(self, database: str, user: str) -> Scope:
        """The counters of (database, user), created on first use (bounded by the pools)."""
        key = (database, user)
        found = self._scopes.get(key)
        if found is None:
            found = self._scopes[key] = Scope(database, user)
        return found

    def query_finished(self, fp: Fingerprint, *, database: str, user: str, application_name: str,
                       client: str, duration: float, wait: float, rows: int, sqlstate: str | None,
                       now: float | None = None) -> SlowQuery | None:
        """Record one finished statement (seconds). Returns a SlowQuery for the caller to log."""
        return self.record(fp, self.scope(database, user), application_name, client, duration, wait,
                           rows, sqlstate, self._clock() if now is None else now)

    def record(self, fp: Fingerprint, scope: Scope, application_name: str, client: str,
               duration: float, wait: float, rows: int, sqlstate: str | None,
               now: float) -> SlowQuery | None:
        """``query_finished`` for the proxy's hot path: positional, with the session's scope."""
        entry = self._entries.get(fp.id)
        if entry is None and (len(self._entries) < self.max_fingerprints or self._admit(fp.id)):
            entry = self._entries[fp.id] = _Entry(fp, now)
        if entry is not None:
            pending = entry.pending
            pending.append(duration)
            if len(pending) >= FOLD:
                entry.fold()
            entry.recent += 1
            entry.rows += rows
            entry.last_seen = now
            entry.wait += wait
            applications = entry.applications
            if application_name not in applications:
                if len(applications) < MAX_APPLICATION_NAMES:
                    applications.add(application_name)
                else:
                    applications.add(OTHER_APPLICATIONS)
            if sqlstate is not None:
                entry.errors += 1
                entry.last_sqlstate = sqlstate

        kind = fp.kind
        stats = scope.kinds.get(kind)
        if stats is None:
            stats = scope.kinds[kind] = _KindStats()
        pending = stats.pending
        pending.append(duration)
        if len(pending) >= FOLD:
            stats.fold()
        if sqlstate is not None:
            stats.errors += 1

        if duration * 1000.0 <= self.slow_threshold_ms:
            return None
        return self.report_slow(fp, scope, application_name, client, duration, wait, rows, sqlstate, now)

    def record_many(self, fp: Fingerprint, scope: Scope, durations: list[float], wait: float, rows: int,
                    applications: set[str], sqlstates: list[str], now: float) -> None:
        """``record`` for several statements of one fingerprint and scope at once (the recorder
        groups its batches): their durations in order, the sums of their waits and rows, their
        application_names and the SQLSTATEs of those that failed, in order. The same counts as
        one ``record`` each, except that slow statements are the caller's to report (``report_slow``)."""
        n = len(durations)
        entry = self._entries.get(fp.id)
        if entry is None and (len(self._entries) < self.max_fingerprints or self._admit(fp.id, n)):
            entry = self._entries[fp.id] = _Entry(fp, now)
        if entry is not None:
            pending = entry.pending
            pending += durations
            if len(pending) >= FOLD:
                entry.fold()
            entry.recent += n
            entry.rows += rows
            entry.last_seen = now
            entry.wait += wait
            known = entry.applications
            if not known.issuperset(applications):
                for application_name in sorted(applications - known):
                    known.add(application_name if len(known) < MAX_APPLICATION_NAMES else OTHER_APPLICATIONS)
            if sqlstates:
                entry.errors += len(sqlstates)
                entry.last_sqlstate = sqlstates[-1]

        kind = fp.kind
        stats = scope.kinds.get(kind)
        if stats is None:
            stats = scope.kinds[kind] = _KindStats()
        pending = stats.pending
        pending += durations
        if len(pending) >= FOLD:
            stats.fold()
        stats.errors += len(sqlstates)

    def report_slow(self, fp: Fingerprint, scope: Scope, application_name: str, client: str, duration: float,
                    wait: float, rows: int, sqlstate: str | None, now: float) -> SlowQuery:
        """Report a statement over ``slow_threshold_ms`` that was counted already."""
        slow = SlowQuery(
            fingerprint=fp.id, normalized=fp.normalized, kind=fp.kind,
            duration_ms=duration * 1000.0, wait_ms=wait * 1000.0, rows=rows, database=scope.database,
            user=scope.user, application_name=application_name, client=client, sqlstate=sqlstate,
            at=now,
        )
        self._slow_ring.append(slow)
        scope.slow += 1
        return slow

    def _admit(self, fingerprint_id: str, calls: int = 1) -> bool:
        """The table is full: may ``fingerprint_id``, just seen ``calls`` times more, replace the
        least significant entry?"""
        seen = self._seen
        sightings = seen.get(fingerprint_id, 0) + calls
        self._sightings += calls
        if self._sightings >= AGING_FACTOR * self.max_fingerprints:
            self._age()
            sightings = (sightings + 1) // 2
        victims = self._victims
        if not victims:
            entries = self._entries
            count = max(1, int(len(entries) * EVICT_FRACTION))
            victims[:] = heapq.nsmallest(count, entries.values(), key=_SIGNIFICANCE)[::-1]
        # Every victim is still in the table: only this method evicts (the victim it pops) and
        # reset() empties the victims with the table.
        victim = victims[-1]
        self._evicted += 1  # the victim, or else the newcomer
        if sightings <= victim.recent + ADMIT_MARGIN:
            seen[fingerprint_id] = sightings
            return False
        victims.pop()
        del self._entries[victim.fingerprint.id]
        seen.pop(fingerprint_id, None)
        return True

    def _age(self) -> None:
        """Halve every recent count, so what was popular long ago stops protecting an entry."""
        self._sightings = 0
        self._seen = {key: n // 2 for key, n in self._seen.items() if n > 1}
        for entry in self._entries.values():
            entry.recent //= 2

    def reset(self) -> None:
        """Forget fingerprints and slow queries; Prometheus-facing counters keep counting."""
        self._entries.clear()
        self._slow_ring.clear()
        self._seen.clear()
        self._victims.clear()
        self._reset_at = self._clock()

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def evicted(self) -> int:
        return self._evicted

    def snapshot(self) -> StatsSnapshot:
        queries: dict[tuple[str, str, str, str], int] = {}
        durations: dict[tuple[str, str, str], HistogramSnapshot] = {}
        slow: dict[tuple[str, str], int] = {}
        for scope in self._scopes.values():
            database, user = scope.database, scope.user
            for kind, stats in scope.kinds.items():
                stats.fold()
                if stats.calls > stats.errors:
                    queries[(database, user, kind, "ok")] = stats.calls - stats.errors
                if stats.errors:
                    queries[(database, user, kind, "error")] = stats.errors
                counts = stats.counts
                durations[(database, user, kind)] = HistogramSnapshot(_cumulative(counts), stats.total, stats.calls)
            if scope.slow:
                slow[(database, user)] = scope.slow
        return StatsSnapshot(
            queries=queries,
            durations=durations,
            slow=slow,
            evicted=self._evicted,
            fingerprints=len(self._entries),
            bounds=LATENCY_BUCKETS,
            reset_at=self._reset_at,
        )

    def top(self, by: str = "total_time", limit: int = 20) -> list[FingerprintSnapshot]:
        """The ``limit`` fingerprints with the highest ``by`` (one of ``TOP_ORDERS``)."""
        order = _ORDERS.get(by)
        if order is None:
            raise ValueError(f"by must be one of {', '.join(TOP_ORDERS)}, got {by!r}")
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        for entry in self._entries.values():
            entry.fold()
        best = heapq.nlargest(limit, self._entries.values(), key=order)
        return [_snapshot(entry) for entry in best]

    def get(self, fingerprint_id: str) -> FingerprintSnapshot | None:
        entry = self._entries.get(fingerprint_id)
        return None if entry is None else _snapshot(entry)

    def slow(self, limit: int = 50) -> list[SlowQuery]:
        """Recent slow queries, most recent first."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        return list(islice(reversed(self._slow_ring), limit))


def pretty_sql(text: str, max_chars: int = 2048) -> str:
    """Reindented, upper-case-keyword SQL for humans (API, reports). Never on the hot path.

    sqlparse costs ~30 µs per character (a 3 kB statement ~80 ms), so texts longer than
    ``max_chars`` come back unchanged; callers formatting many (the slow-query list) should still
    do it off the event loop or cache the result per fingerprint.
    """
    if len(text) > max_chars:
        return text
    import sqlparse  # only the agent's report paths need it

    try:
        return str(sqlparse.format(text, reindent=True, keyword_case="upper")).strip()
    except Exception:  # sqlparse gives up on some inputs (e.g. its nesting limits): show as is
        return text


def _measure() -> None:  # pragma: no cover - `python -m proxy.stats` prints per-call costs
    import timeit

    from .fingerprint import Fingerprinter

    fp = Fingerprinter()("SELECT abalance FROM pgbench_accounts WHERE aid = 42")
    stats = QueryStats()
    call = lambda: stats.query_finished(  # noqa: E731
        fp, database="app", user="app", application_name="pgbench", client="127.0.0.1:5000",
        duration=0.0004, wait=0.00001, rows=1, sqlstate=None)
    n = 200_000
    best = min(timeit.repeat(call, number=n, repeat=5)) / n
    print(f"query_finished (known fingerprint) {best * 1e6:.2f} µs")
    with_now = lambda: stats.query_finished(  # noqa: E731
        fp, database="app", user="app", application_name="pgbench", client="127.0.0.1:5000",
        duration=0.0004, wait=0.00001, rows=1, sqlstate=None, now=1.0)
    best = min(timeit.repeat(with_now, number=n, repeat=5)) / n
    print(f"query_finished (known fingerprint, now given) {best * 1e6:.2f} µs")
    fps = [Fingerprint(id=f"{i:016x}", normalized="select $1", kind="select") for i in range(100_000)]
    stats = QueryStats()
    it = iter(fps)
    n = 100_000
    t = timeit.timeit(lambda: stats.query_finished(
        next(it), database="app", user="app", application_name="x", client="c",
        duration=0.001, wait=0.0, rows=1, sqlstate=None), number=n) / n
    print(f"query_finished (new fingerprint, evictions amortised) {t * 1e6:.2f} µs; "
          f"tracked {len(stats)}, evicted {stats.evicted}")


if __name__ == "__main__":  # pragma: no cover
    _measure()
