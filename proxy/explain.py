"""Explainer: the plan of a slow SELECT, captured off the client's path (``slow_query.explain``).

When a read-only, single-statement SELECT is slow, its fingerprint gets at most one
``EXPLAIN (FORMAT JSON)`` per ``slow_query.explain_interval_s``, on a connection of its own
(never a pooled one, so no client waits for it), with ``statement_timeout`` 5 s.

What is explained is the *normalised* text (``$n`` for every literal): the proxy never keeps
literal values or bind parameters, which may hold personal data. The text is prepared with
``plan_cache_mode = force_generic_plan`` and explained as ``EXECUTE (NULL, ...)``: the generic
plan, which does not depend on the values (what PostgreSQL 16 calls ``EXPLAIN (GENERIC_PLAN)``,
done in a way PostgreSQL 12+ understands). The plan is not executed (no ANALYZE).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fingerprint import Fingerprint
    from .server import Endpoint

log = logging.getLogger(__name__)

_PARAM = re.compile(r"\$(\d+)")
MAX_CONCURRENT = 2


@dataclass(frozen=True, slots=True)
class Plan:
    fingerprint: str
    captured_at: float  # wall clock
    plan: Any  # EXPLAIN (FORMAT JSON) output, parsed; None when it failed
    error: str | None = None


def explainable(fp: Fingerprint) -> bool:
    """Only what EXPLAIN cannot change anything with: one parsed, read-only SELECT, whole text."""
    return (fp.parsed and fp.kind == "select" and fp.read_only and not fp.locking and fp.statements == 1
            and not fp.normalized.endswith("…"))


class Explainer:
    """One per proxy, on its event loop."""

    def __init__(self, interval: float, endpoint_for: Callable[[str, str], Endpoint], *,
                 max_plans: int = 500) -> None:
        self.interval = interval
        self.endpoint_for = endpoint_for
        self.max_plans = max_plans
        self._last: dict[str, float] = {}  # fingerprint -> monotonic time of its last attempt
        self._plans: dict[str, Plan] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.captured = 0
        self.failed = 0

    def consider(self, fp: Fingerprint, database: str, user: str) -> bool:
        """A statement of ``fp`` was slow: explain it unless done recently. True: started."""
        if not explainable(fp) or len(self._running) >= MAX_CONCURRENT:
            return False
        now = time.monotonic()
        last = self._last.get(fp.id)
        if last is not None and now - last < self.interval:
            return False
        self._last[fp.id] = now
        _bound(self._last, self.max_plans)
        task = asyncio.get_running_loop().create_task(self._explain(fp, database, user))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    def plan(self, fingerprint_id: str) -> Plan | None:
        return self._plans.get(fingerprint_id)

    async def wait(self) -> None:
        """Until every started EXPLAIN has finished (tests, shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*list(self._running), return_exceptions=True)

    async def _explain(self, fp: Fingerprint, database: str, user: str) -> None:
        import asyncpg  # only needed when explain is on

        ep = self.endpoint_for(database, user)
        try:
            conn = await asyncpg.connect(statement_cache_size=0, **ep.connect_args(
                "pgsidecar-explain", statement_timeout="5000", plan_cache_mode="force_generic_plan"))
            try:
                params = max((int(n) for n in _PARAM.findall(fp.normalized)), default=0)
                await conn.execute(f"PREPARE pgsidecar_explain AS {fp.normalized}")
                call = "EXECUTE pgsidecar_explain"
                if params:
                    call += "(" + ", ".join(["NULL"] * params) + ")"
                raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {call}")
            finally:
                await asyncio.wait_for(conn.close(), 2)
            plan = Plan(fp.id, time.time(), json.loads(raw) if isinstance(raw, str) else raw)
            self.captured += 1
            log.info("slow_query_explained", extra={"fingerprint": fp.id})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plan we cannot get is reported, not raised
            plan = Plan(fp.id, time.time(), None, f"{type(exc).__name__}: {exc}"[:300])
            self.failed += 1
            log.info("slow_query_explain_failed", extra={"fingerprint": fp.id, "error": plan.error})
        self._plans[fp.id] = plan
        _bound(self._plans, self.max_plans)


def _bound(mapping: dict[str, Any], limit: int) -> None:
    if len(mapping) > limit:
        for key in list(islice(mapping, len(mapping) - limit // 2)):
            del mapping[key]
