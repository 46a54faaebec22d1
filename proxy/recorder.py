"""Recorder: statements finished by client sessions, recorded in batches off the relay path.

A session hands over one tuple per finished statement (a list append, then ``added`` for the
first and the ``max_batch``-th); fingerprinting (``Fingerprinter.of_bytes``) and the statistics
(``QueryStats.record``) run over the batch a few milliseconds later, or as soon as ``max_batch`` statements wait, or before anyone reads the
statistics (``flush``). The relay answers the client first and does the bookkeeping in one
tight loop afterwards: measured here, that costs the proxy about half the CPU of recording each
statement as it finishes (better locality, fewer calls). When fingerprints repeat in a batch,
each fingerprint and scope is counted once for all its statements (``QueryStats.record_many``,
C builtins over the group). Slow statements are logged from the flush, in the order they
finished, at most ``delay`` seconds after.
"""
from __future__ import annotations

import asyncio
import logging
import time
from itertools import groupby
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING

from .protocol import rows_in_tag

if TYPE_CHECKING:
    from .explain import Explainer
    from .fingerprint import Fingerprint, Fingerprinter
    from .stats import QueryStats, Scope, SlowQuery

log = logging.getLogger(__name__)

#: (text or its Fingerprint already known (a cache hit), client_encoding, scope, application_name,
#:  client address, duration s, waited s, rows or the CommandComplete tag to read them from, sqlstate)
Finished = tuple["bytes | Fingerprint", str, "Scope", str, str, float, float, "int | bytes", "str | None"]
_SQL, _ENCODING, _SCOPE, _APPLICATION, _DURATION, _WAITED, _ROWS, _SQLSTATE = (
    itemgetter(i) for i in (0, 1, 2, 3, 5, 6, 7, 8))
_ID = attrgetter("id")


class Recorder:
    """One per proxy; used from the proxy's event loop only."""

    __slots__ = ("stats", "fingerprinter", "explainer", "delay", "max_batch", "pending", "_timer", "failures", "_rows")

    def __init__(self, stats: QueryStats, fingerprinter: Fingerprinter, *, explainer: Explainer | None = None,
                 delay: float = 0.02, max_batch: int = 256) -> None:
        self.stats = stats
        self.fingerprinter = fingerprinter
        self.explainer = explainer
        self.delay = delay
        self.max_batch = max_batch
        self.pending: list[Finished] = []
        self._timer: asyncio.TimerHandle | None = None
        self.failures = 0
        self._rows = _RowCounts()

    def added(self) -> None:
        """Sessions append their finished statements to ``pending`` themselves, and call this
        when it holds one statement or ``max_batch``: arm the timer, or flush."""
        if len(self.pending) >= self.max_batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self.flush)

    def flush(self) -> None:
        """Record everything waiting. Never raises: a failure is logged and counted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self.pending
        if not batch:
            return
        self.pending = []
        stats = self.stats
        now = time.time()
        rows_of = self._rows
        try:
            # Fingerprints (a memo hit each: a regex and a dict lookup), then the statements in
            # groups of one fingerprint and scope, each group counted at once with C builtins
            # over its items: a batch of `pgbench -S` is one group.
            fingerprints = list(map(self.fingerprinter.of_bytes, map(_SQL, batch), map(_ENCODING, batch)))
            if len(set(map(_ID, fingerprints))) * 4 > len(batch) * 3:
                keys = None  # mostly one statement per fingerprint: no grouping
            else:
                keys = list(zip(map(_ID, fingerprints), map(id, map(_SCOPE, batch))))
        except Exception:  # noqa: BLE001 - a bug here must not take the proxy down
            self._failed(len(batch), batch[0][4])
            return
        if keys is None:
            self._record_each(batch, fingerprints, now)
            return
        order = sorted(range(len(batch)), key=keys.__getitem__)  # stable: in order within a group
        slow_ms = stats.slow_threshold_ms
        slow: list[int] = []  # positions in the batch, reported in that order once all is counted
        for _, run in groupby(order, keys.__getitem__):
            group = list(run)
            item = batch[group[0]]
            try:
                items = list(map(batch.__getitem__, group))
                durations = list(map(_DURATION, items))
                stats.record_many(fingerprints[group[0]], item[2], durations, sum(map(_WAITED, items)),
                                  sum(map(rows_of.__getitem__, map(_ROWS, items))), set(map(_APPLICATION, items)),
                                  list(filter(None, map(_SQLSTATE, items))), now)
                if max(durations) * 1000.0 > slow_ms:
                    slow.extend(i for i in group if batch[i][5] * 1000.0 > slow_ms)
            except Exception:  # noqa: BLE001 - a bug here must not cost the other statements
                self._failed(len(group), item[4])
        if slow:
            slow.sort()
            self._report(batch, fingerprints, slow, now)

    def _record_each(self, batch: list[Finished], fingerprints: list[Fingerprint], now: float) -> None:
        record = self.stats.record
        rows_of = self._rows
        for fp, (_, _, scope, application_name, client, duration, waited, rows, sqlstate) in zip(fingerprints, batch):
            try:
                report = record(fp, scope, application_name, client, duration, waited, rows_of[rows], sqlstate, now)
            except Exception:  # noqa: BLE001 - a bug here must not cost the other statements
                self._failed(1, client)
                continue
            if report is not None:
                self._slow(report, fp, scope)

    def _report(self, batch: list[Finished], fingerprints: list[Fingerprint], slow: list[int], now: float) -> None:
        """Report and log the slow statements of a batch counted in groups (at ``slow``, in the
        order they finished), and consider them for EXPLAIN."""
        for i in slow:
            fp = fingerprints[i]
            _, _, scope, application_name, client, duration, waited, rows, sqlstate = batch[i]
            self._slow(self.stats.report_slow(fp, scope, application_name, client, duration, waited, self._rows[rows],
                                              sqlstate, now), fp, scope)

    def _slow(self, report: SlowQuery, fp: Fingerprint, scope: Scope) -> None:
        _log_slow(report)
        if self.explainer is not None:
            self.explainer.consider(fp, scope.database, scope.user)

    def _failed(self, statements: int, client: str) -> None:
        self.failures += statements
        if self.failures <= 10:
            log.exception("statement_stats_failed", extra={"client": client, "statements": statements})


class _RowCounts(dict[object, int]):
    """Rows of a statement by what the relay handed over: a count is its own, a CommandComplete
    tag ("SELECT 1") is read once and remembered (a workload repeats a few tags). Bounded."""

    def __missing__(self, rows: object) -> int:
        count = rows_in_tag(rows) if isinstance(rows, bytes) else int(rows)  # type: ignore[call-overload]
        if len(self) >= 4096:
            self.clear()
        self[rows] = count
        return count


def _log_slow(slow: SlowQuery) -> None:
    log.warning(
        "slow_query",
        extra={
            "fingerprint": slow.fingerprint,
            "query": slow.normalized,
            "kind": slow.kind,
            "duration_ms": round(slow.duration_ms, 3),
            "wait_ms": round(slow.wait_ms, 3),
            "rows": slow.rows,
            "sqlstate": slow.sqlstate,
            "database": slow.database,
            "user": slow.user,
            "application_name": slow.application_name,
            "client": slow.client,
        },
    )
