"""The change feed: the webhook emitter's NOTIFY wake-ups, turned into events for in-process
subscribers (the GraphQL gateway's subscriptions).

``pgsidecar_emit`` notifies ``'<event id> <event type>'`` at commit, in commit order. For every
notification a subscriber's patterns match, the feed reads the event row (a batch of ids per
query) and hands it to each matching subscriber in notification order. After the LISTEN
connection comes back, ``catch_up`` replays what committed while it was down (events with an id
above the last one seen), so a subscription sees a reconnect as a delay, not a gap. A subscriber
that does not keep up (its queue holds ``max_queue`` events) is closed with ``FeedOverflow``
rather than letting memory grow.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

from .delivery import matches

log = logging.getLogger(__name__)

_EVENTS_SQL = """
SELECT id, event_type, payload::text AS payload, created_at FROM public.webhook_events
WHERE id = ANY($1::bigint[]) ORDER BY id
"""
_AFTER_SQL = """
SELECT id, event_type, payload::text AS payload, created_at FROM public.webhook_events
WHERE id > $1 ORDER BY id LIMIT $2
"""
CATCH_UP_LIMIT = 10000


class FeedOverflow(Exception):
    """The subscriber fell more than ``max_queue`` events behind and was closed."""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    id: int
    event_type: str  # "matches.insert", "resumes.update", or an app event such as "user_signup"
    table: str | None  # for row changes: the table; None for app events
    op: str | None  # insert | update | delete | truncate; None for app events
    new: dict[str, Any] | None  # the row after the change, column -> value (JSON types)
    old: dict[str, Any] | None  # the row before it
    payload: Any  # the event's data as stored (for row changes: {table, schema, op, new, old})
    created_at: datetime


def _event(row: Any) -> ChangeEvent:
    payload = json.loads(row["payload"])
    table = op = new = old = None
    if isinstance(payload, dict) and {"table", "op"} <= payload.keys() and row["event_type"].count(".") == 1:
        table, op = payload.get("table"), payload.get("op")
        new, old = payload.get("new"), payload.get("old")
    return ChangeEvent(row["id"], row["event_type"], table, op, new, old, payload, row["created_at"])


class FeedSubscription:
    """An async iterator of ChangeEvent; ``close()`` (or ``async with``) unsubscribes."""

    def __init__(self, feed: ChangeFeed, patterns: Sequence[str], max_queue: int) -> None:
        self.feed = feed
        self.patterns = tuple(patterns)
        self.max_queue = max_queue
        self._queue: asyncio.Queue[ChangeEvent | BaseException] = asyncio.Queue()
        self.closed = False

    def wants(self, event_type: str) -> bool:
        return matches(event_type, self.patterns)

    def put(self, event: ChangeEvent) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self.max_queue:
            self.feed.unsubscribe(self)
            self._queue.put_nowait(FeedOverflow(f"subscriber fell {self.max_queue} events behind"))
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        self.feed.unsubscribe(self)
        self._queue.put_nowait(StopAsyncIteration())

    def __aiter__(self) -> FeedSubscription:
        return self

    async def __anext__(self) -> ChangeEvent:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class ChangeFeed:
    """Subscribers and the notifications they want; ``fetch`` reads event rows (emitter's pool)."""

    def __init__(self, fetch: Callable[[str, Sequence[Any]], Awaitable[list[Any]]]) -> None:
        self._fetch = fetch
        self._subscribers: list[FeedSubscription] = []
        self._wanted: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self.last_id = 0  # highest event id notified (or caught up) so far

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, patterns: Sequence[str] = ("*",), max_queue: int = 1000) -> FeedSubscription:
        sub = FeedSubscription(self, patterns, max_queue)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: FeedSubscription) -> None:
        sub.closed = True
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def notified(self, event_id: int, event_type: str) -> None:
        self.last_id = max(self.last_id, event_id)
        if any(sub.wants(event_type) for sub in self._subscribers):
            self._wanted.append(event_id)
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._wanted:
            ids, self._wanted = self._wanted, []
            try:
                rows = await self._fetch(_EVENTS_SQL, [ids])
            except Exception as exc:  # noqa: BLE001 - the emitter's reconnect catches up later
                log.warning("change_feed_fetch_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                return
            self._publish(rows)

    def _publish(self, rows: list[Any]) -> None:
        for row in rows:
            event = _event(row)
            for sub in list(self._subscribers):
                if sub.wants(event.event_type):
                    sub.put(event)

    async def catch_up(self) -> None:
        """After a reconnect: publish the events committed since the last one seen."""
        if not self._subscribers or not self.last_id:
            return
        rows = await self._fetch(_AFTER_SQL, [self.last_id, CATCH_UP_LIMIT])
        if rows:
            self.last_id = max(self.last_id, rows[-1]["id"])
        self._publish(rows)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for sub in list(self._subscribers):
            sub.close()
