"""The webhook emitter: LISTEN for wake-ups, lease endpoints, deliver, record, retry.

NOTIFY is only a wake-up; the tables are the truth. The emitter looks for due deliveries when a
notification arrives, on start, after every reconnect of its LISTEN connection, when the next
retry falls due and at least every ``webhooks.sweep_interval_s``, so a lost notification or a
crashed sidecar delays an event but never loses it.

Sharing work between replicas: an emitter claims whole endpoints (``FOR UPDATE SKIP LOCKED`` on
``webhook_endpoints``, then a lease: ``lease_owner``/``lease_until``), so while one replica
delivers to an endpoint no other does, and events reach each endpoint in order. The lease is
renewed while delivering and released when the endpoint's queue is empty; a crashed replica's
lease runs out after ``webhooks.lease_s`` and another takes over. What the crashed one sent but
had not yet recorded is sent again with the same ``webhook-id`` (at least once; receivers
deduplicate on the id).

Ordering: an endpoint's deliveries go out in event-id order, one at a time; a failing head
blocks the ones behind it until it succeeds or is marked dead (``ordered: false`` endpoints
skip that and deliver up to 8 at once). Event ids come from a sequence taken inside the writing
transaction, so two changes of one row, or two transactions where one began after the other
committed, always have ids in commit order; only truly concurrent, independent transactions may
be delivered in id rather than commit order.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from config.settings import WebhookSettings
from proxy.invalidation import ListenLoop, close_quietly
from proxy.server import Endpoint

from .delivery import Outcome, Sender, backoff, body, message_id
from .feed import ChangeFeed
from .sql import CHANNEL, TABLES, TABLES_PRESENT_SQL

log = logging.getLogger(__name__)

# Histogram buckets of delivery latency (seconds), shared with the metrics collector.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNORDERED_PARALLEL = 8
# Notifications arrive once per change: the dispatcher looks for work at most once per ROUND_GAP_S
# (a burst of NOTIFYs costs one claim query, not one each), and a worker whose queue ran dry keeps
# its lease for WORKER_LINGER_S in case the next event for its endpoint is already on its way.
ROUND_GAP_S = 0.02
WORKER_LINGER_S = 0.25
# Retention (webhooks.retention_days): at most one pruning batch per PRUNE_INTERVAL_S.
PRUNE_INTERVAL_S = 60.0
PRUNE_BATCH = 5000

_CLAIM_SQL = """
WITH candidates AS (
    SELECT e.id FROM public.webhook_endpoints AS e
    WHERE e.active AND (e.lease_until IS NULL OR e.lease_until < now() OR e.lease_owner = $1)
      AND e.id <> ALL($4::bigint[])
      AND CASE WHEN e.ordered THEN
            (SELECT d.next_attempt_at FROM public.webhook_deliveries AS d
             WHERE d.endpoint_id = e.id AND d.state = 'pending' ORDER BY d.event_id LIMIT 1) <= now()
          ELSE EXISTS (SELECT 1 FROM public.webhook_deliveries AS d
                       WHERE d.endpoint_id = e.id AND d.state = 'pending' AND d.next_attempt_at <= now())
          END
    ORDER BY e.id LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE public.webhook_endpoints AS e
SET lease_owner = $1, lease_until = now() + $3 * interval '1 second'
FROM candidates WHERE e.id = candidates.id
RETURNING e.id, e.url, e.secret, e.ordered
"""
_RENEW_SQL = """
UPDATE public.webhook_endpoints SET lease_until = now() + $3 * interval '1 second'
WHERE id = $1 AND lease_owner = $2 AND active RETURNING id
"""
_RELEASE_SQL = """
UPDATE public.webhook_endpoints SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2
"""
_QUEUE_SQL = """
SELECT d.id, d.event_id, d.attempts, d.next_attempt_at <= now() AS due,
       e.event_type, e.payload::text AS payload, e.created_at
FROM public.webhook_deliveries AS d JOIN public.webhook_events AS e ON e.id = d.event_id
WHERE d.endpoint_id = $1 AND d.state = 'pending' AND ($3 OR d.next_attempt_at <= now())
ORDER BY d.event_id LIMIT $2
"""
_RECORD_SQL = """
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::float8[], $6::float8[])
        AS u(id, state, status, error, latency_ms, delay_s)
), done AS (
    UPDATE public.webhook_deliveries AS d
    SET state = u.state, attempts = d.attempts + 1, last_status = u.status, last_error = u.error,
        last_latency_ms = u.latency_ms,
        next_attempt_at = CASE WHEN u.delay_s IS NULL THEN d.next_attempt_at
                               ELSE now() + u.delay_s * interval '1 second' END,
        delivered_at = CASE WHEN u.state = 'delivered' THEN now() END
    FROM u WHERE d.id = u.id AND d.state = 'pending'
    RETURNING d.id, d.attempts, d.state, d.next_attempt_at
)
INSERT INTO public.webhook_attempts (delivery_id, attempt, status_code, latency_ms, error, next_attempt_at, emitter)
SELECT done.id, done.attempts, u.status, u.latency_ms, u.error,
       CASE WHEN done.state = 'pending' THEN done.next_attempt_at END, $7
FROM done JOIN u ON u.id = done.id
"""
_DISABLE_SQL = """
UPDATE public.webhook_endpoints SET active = false, disabled_reason = $2, lease_owner = NULL, lease_until = NULL
WHERE id = $1
"""
_NEXT_DUE_SQL = """
SELECT extract(epoch FROM min(d.next_attempt_at) - now())::float8
FROM public.webhook_deliveries AS d JOIN public.webhook_endpoints AS e ON e.id = d.endpoint_id
WHERE d.state = 'pending' AND e.active
"""
_BACKLOG_SQL = """
SELECT count(*)::bigint AS pending, extract(epoch FROM now() - min(ev.created_at))::float8 AS oldest
FROM public.webhook_deliveries AS d
JOIN public.webhook_endpoints AS e ON e.id = d.endpoint_id
JOIN public.webhook_events AS ev ON ev.id = d.event_id
WHERE d.state = 'pending' AND e.active
"""
_MAX_EVENT_SQL = "SELECT coalesce(max(id), 0) FROM public.webhook_events"
# Old events whose deliveries are all finished; SKIP LOCKED so replicas prune different rows.
_PRUNE_SQL = """
WITH old AS (
    SELECT ev.id FROM public.webhook_events AS ev
    WHERE ev.created_at < now() - $1 * interval '1 day'
      AND NOT EXISTS (SELECT 1 FROM public.webhook_deliveries AS d WHERE d.event_id = ev.id AND d.state = 'pending')
    ORDER BY ev.id LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM public.webhook_events AS ev USING old WHERE ev.id = old.id
"""


@dataclass(frozen=True, slots=True)
class WebhookSnapshot:
    """The emitter's state and counters, read at scrape time and by the health endpoint."""

    emitter_id: str
    state: str  # starting | running | waiting_for_tables | disconnected | stopped
    delivering: bool
    listening: bool
    deliveries: dict[str, int]  # result -> count: delivered, retried, dead
    attempts: int
    latency_buckets: tuple[int, ...]  # cumulative per LATENCY_BUCKETS, then +Inf
    latency_sum_s: float
    pending: int | None  # deliveries waiting (active endpoints), None before the first reading
    oldest_pending_age_s: float | None
    endpoints_delivering: int
    pruned: int  # old finished events deleted (webhooks.retention_days)
    notifications: int
    sweeps: int
    connects: int
    last_error: str | None


@dataclass(slots=True)
class _Counters:
    deliveries: dict[str, int] = field(default_factory=lambda: {"delivered": 0, "retried": 0, "dead": 0})
    attempts: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum_s: float = 0.0

    def observe(self, result: str, outcome: Outcome) -> None:
        self.deliveries[result] += 1
        self.attempts += 1
        seconds = outcome.latency_ms / 1000
        self.latency_sum_s += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


@dataclass(frozen=True, slots=True)
class _Endpoint:
    id: int
    url: str
    secret: str
    ordered: bool


class Emitter(ListenLoop):
    """One replica's emitter for one database (``start``/``stop``; ``feed`` for subscribers)."""

    FAILED_EVENT = "webhook_emitter_disconnected"

    def __init__(self, settings: WebhookSettings, endpoint: Endpoint, *, name: str | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.database = endpoint.database
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.delivering = settings.enabled
        self.feed = ChangeFeed(self._fetch)
        self.sender = Sender(settings)
        self.state = "starting"
        self.listening = False
        self.notifications = 0
        self.sweeps = 0
        self.connects = 0
        self.last_error: str | None = None
        self.pending: int | None = None
        self.oldest_pending_age_s: float | None = None
        self._counters = _Counters()
        self._listen: Any = None
        self._pool: Any = None
        self._task: asyncio.Task[None] | None = None
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._news: asyncio.Future[None] | None = None  # resolved by the next notification
        self._lost = asyncio.Event()
        self._backlog_at = 0.0
        self._pruned_at = 0.0
        self.pruned = 0

    # ------------------------------------------------------------------ lifecycle
    async def stop(self) -> None:
        await self._cancel()
        await self._stop_workers()
        self.feed.close()
        await self._close()
        await self.sender.close()
        self.state = "stopped"

    def wake(self) -> None:
        """Look for due deliveries now (the API calls this after it queues something)."""
        self._wake.set()

    @property
    def ready(self) -> bool:  # type: ignore[override]  # read-only here: derived from state
        """Listening, with the webhook tables present."""
        return self.state == "running"

    @property
    def pool(self) -> Any:
        """The emitter's asyncpg pool (None until connected with the tables present)."""
        return self._pool

    def snapshot(self) -> WebhookSnapshot:
        c = self._counters
        return WebhookSnapshot(
            self.id, self.state, self.delivering, self.listening, dict(c.deliveries), c.attempts,
            tuple(accumulate(c.buckets)),
            c.latency_sum_s, self.pending, self.oldest_pending_age_s, len(self._workers), self.pruned,
            self.notifications,
            self.sweeps, self.connects, self.last_error,
        )

    # ------------------------------------------------------------------ connection
    async def _went_down(self) -> None:
        self.state = "disconnected"
        self.listening = False
        await self._stop_workers()

    async def _connect(self) -> None:
        import asyncpg

        self._lost.clear()
        conn = await asyncpg.connect(statement_cache_size=0, **self.endpoint.connect_args("pgsidecar-webhooks-listen"))
        self._listen = conn
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        self.listening = True
        self.connects += 1
        self.last_error = None
        log.info("webhook_emitter_listening", extra={"database": self.database, "emitter": self.id})

    async def _ensure_tables(self) -> bool:
        import asyncpg

        if self._pool is not None:  # created once the tables were found
            return True
        present = await self._listen.fetchval(TABLES_PRESENT_SQL, list(TABLES), timeout=self.settings.timeout_s)
        if not present:
            if self.state != "waiting_for_tables":
                log.warning("webhook_tables_missing", extra={
                    "database": self.database, "hint": "run `pgsidecar migrate` or `pgsidecar webhooks install`"})
            self.state = "waiting_for_tables"
            return False
        self._pool = await asyncpg.create_pool(min_size=1, max_size=4, **self.endpoint.connect_args("pgsidecar-webhooks"))
        if not self.feed.last_id:
            self.feed.last_id = await self._pool.fetchval(_MAX_EVENT_SQL)
        return True

    async def _close(self) -> None:
        conn, self._listen = self._listen, None
        pool, self._pool = self._pool, None
        if conn is not None:
            await close_quietly(conn)
        if pool is not None:
            await close_quietly(pool)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        head, _, event_type = payload.partition(" ")
        try:
            event_id = int(head)
        except ValueError:
            event_id = 0
        self.feed.notified(event_id, event_type)
        self._wake.set()
        news, self._news = self._news, None
        if news is not None and not news.done():
            news.set_result(None)

    async def _await_news(self, timeout: float) -> bool:
        """True when a notification arrives within ``timeout`` seconds."""
        if self._news is None or self._news.done():
            self._news = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._news), timeout)
        except TimeoutError:
            return False
        return True

    async def _fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        if self._pool is None:
            raise ConnectionError("the webhook emitter is not connected")
        return list(await self._pool.fetch(sql, *args, timeout=self.settings.timeout_s))

    # ------------------------------------------------------------------ dispatch
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        first = True
        wait_s = 0.0
        last_round = 0.0
        while True:
            if not first:
                gap = last_round + ROUND_GAP_S - loop.time()
                if gap > 0:
                    await asyncio.sleep(gap)
                lost = loop.create_task(self._lost.wait())
                woken = loop.create_task(self._wake.wait())
                try:
                    await asyncio.wait({lost, woken}, timeout=max(wait_s, 0.0), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                    woken.cancel()
            if self._lost.is_set() or self._listen is None or self._listen.is_closed():
                raise ConnectionError("LISTEN connection lost")
            self._wake.clear()
            if not await self._ensure_tables():
                wait_s = self.settings.sweep_interval_s
                first = False
                continue
            if first or self.state != "running":
                self.state = "running"
                await self.feed.catch_up()  # on start and after a reconnect
            first = False
            last_round = loop.time()
            self.sweeps += 1
            if self.delivering:
                await self._claim()
            wait_s = await self._next_wait(loop.time())

    async def _next_wait(self, now: float) -> float:
        sweep = self.settings.sweep_interval_s
        if now - self._backlog_at >= min(sweep, 5.0):
            self._backlog_at = now
            row = await self._pool.fetchrow(_BACKLOG_SQL, timeout=self.settings.timeout_s)
            self.pending, self.oldest_pending_age_s = int(row["pending"]), row["oldest"]
        if self.settings.retention_days > 0 and now - self._pruned_at >= PRUNE_INTERVAL_S:
            self._pruned_at = now
            await self.prune()
        if not self.delivering:
            return sweep
        due = await self._pool.fetchval(_NEXT_DUE_SQL, timeout=self.settings.timeout_s)
        if due is None:
            return sweep
        return min(sweep, max(due, 0.01))

    async def prune(self) -> int:
        """Delete one batch of events past ``webhooks.retention_days`` whose deliveries all
        finished (with their delivery and attempt records); returns how many."""
        status = await self._pool.execute(_PRUNE_SQL, self.settings.retention_days, PRUNE_BATCH,
                                          timeout=self.settings.timeout_s)
        count = int(status.split()[-1])
        if count:
            self.pruned += count
            log.info("webhook_events_pruned", extra={"events": count, "retention_days": self.settings.retention_days})
        return count

    async def _claim(self) -> None:
        room = self.settings.concurrency - len(self._workers)
        if room <= 0:
            return
        # Our own leases count as free unless a worker of ours holds them: a reconnect stopped the
        # workers whose release could not reach the server, and they must not wait out lease_s.
        rows = await self._pool.fetch(_CLAIM_SQL, self.id, room, self.settings.lease_s, list(self._workers),
                                      timeout=self.settings.timeout_s)
        loop = asyncio.get_running_loop()
        for row in rows:
            endpoint = _Endpoint(row["id"], row["url"], row["secret"], row["ordered"])
            if endpoint.id not in self._workers:
                self._workers[endpoint.id] = loop.create_task(self._work(endpoint))

    async def _stop_workers(self) -> None:
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()

    # ------------------------------------------------------------------ one endpoint
    async def _work(self, endpoint: _Endpoint) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()

        async def keep_lease() -> bool:
            """Renew the lease once a third of it has passed (also between the POSTs of one batch,
            which can outlast the lease); False when it is no longer ours."""
            nonlocal renewed
            if loop.time() - renewed <= self.settings.lease_s / 3:
                return True
            if not await self._renew(endpoint):
                return False
            renewed = loop.time()
            return True

        lingered = False
        try:
            while True:
                rows = await self._pool.fetch(_QUEUE_SQL, endpoint.id, self.settings.batch_size, endpoint.ordered,
                                              timeout=self.settings.timeout_s)
                if endpoint.ordered:
                    rows = _due_prefix(rows)
                if not rows:
                    if lingered or not await self._await_news(WORKER_LINGER_S):
                        return
                    lingered = True  # one look after the news; then the dispatcher takes over
                    continue
                lingered = False
                results, stop = await self._deliver(endpoint, rows, keep_lease)
                await self._record(endpoint, results)
                if stop:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the lease runs out and the sweep retries
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("webhook_worker_failed", extra={"endpoint_id": endpoint.id, "error": self.last_error})
        finally:
            self._workers.pop(endpoint.id, None)
            await self._release(endpoint)
            self._wake.set()

    async def _deliver(self, endpoint: _Endpoint, rows: list[Any],
                       keep_lease: Callable[[], Awaitable[bool]]) -> tuple[list[tuple[Any, Outcome]], bool]:
        """Send ``rows`` while the lease is ours; returns (row, outcome) pairs and whether this
        endpoint should stop now."""
        results: list[tuple[Any, Outcome]] = []
        if endpoint.ordered:
            for row in rows:
                if not await keep_lease():
                    return results, True
                outcome = await self._post(endpoint, row)
                results.append((row, outcome))
                if not outcome.ok:
                    return results, True
            return results, False
        gate = asyncio.Semaphore(UNORDERED_PARALLEL)

        async def one(row: Any) -> tuple[Any, Outcome] | None:
            async with gate:
                if not await keep_lease():
                    return None
                return row, await self._post(endpoint, row)

        results = [done for done in await asyncio.gather(*(one(row) for row in rows)) if done is not None]
        return results, len(results) < len(rows) or any(outcome.gone for _, outcome in results)

    async def _post(self, endpoint: _Endpoint, row: Any) -> Outcome:
        payload = body(row["event_id"], row["event_type"], row["created_at"], row["payload"])
        return await self.sender.post(endpoint.url, endpoint.secret, message_id(row["event_id"]), payload)

    async def _record(self, endpoint: _Endpoint, results: list[tuple[Any, Outcome]]) -> None:
        ids, states, statuses, errors, latencies, delays = [], [], [], [], [], []
        gone = False
        for row, outcome in results:
            attempts = row["attempts"] + 1
            if outcome.ok:
                state, delay, result = "delivered", None, "delivered"
            elif attempts >= self.settings.max_attempts:
                state, delay, result = "dead", None, "dead"
            else:
                state, delay, result = "pending", backoff(attempts, self.settings), "retried"
            gone = gone or outcome.gone
            self._counters.observe(result, outcome)
            ids.append(row["id"])
            states.append(state)
            statuses.append(outcome.status)
            errors.append(outcome.error)
            latencies.append(outcome.latency_ms)
            delays.append(delay)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_RECORD_SQL, ids, states, statuses, errors, latencies, delays, self.id,
                               timeout=self.settings.timeout_s)
        if gone:
            await self._pool.execute(_DISABLE_SQL, endpoint.id, "the receiver answered 410 Gone")
            log.warning("webhook_endpoint_disabled", extra={"endpoint_id": endpoint.id, "reason": "410 Gone"})

    async def _renew(self, endpoint: _Endpoint) -> bool:
        row = await self._pool.fetchval(_RENEW_SQL, endpoint.id, self.id, self.settings.lease_s,
                                        timeout=self.settings.timeout_s)
        return row is not None

    async def _release(self, endpoint: _Endpoint) -> None:
        if self._pool is None:
            return
        try:
            await self._pool.execute(_RELEASE_SQL, endpoint.id, self.id, timeout=self.settings.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the lease runs out on its own
            log.info("webhook_lease_release_failed", extra={"endpoint_id": endpoint.id, "error": str(exc)[:200]})


def _due_prefix(rows: list[Any]) -> list[Any]:
    """An ordered endpoint's queue up to (not including) the first delivery not yet due."""
    for i, row in enumerate(rows):
        if not row["due"]:
            return rows[:i]
    return rows
