"""The seed's ``WebhookService`` (register_webhook, trigger_webhook, get_event_history) and its
models ``WebhookEndpoint`` and ``WebhookEvent``, over asyncpg.

An app can use it directly (``service = await WebhookService.connect(DATABASE_URL)``); the agent's
HTTP API (routes.py) uses one on the emitter's pool. It writes the same tables the change
triggers write, and ``trigger_webhook`` goes through ``pgsidecar_emit``, so an app event and a
row change are queued, ordered and delivered alike. ``trigger_webhook(..., conn=c)`` emits on
the caller's connection, inside the caller's transaction: the event exists only if it commits.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from config.settings import WebhookSettings

from .delivery import (
    InvalidWebhook,
    Network,
    check_event_type,
    check_patterns,
    check_secret,
    check_target,
    check_url,
    networks,
    new_secret,
)
from .sql import LIKE_PATTERN

DEFAULT_DENY = networks(WebhookSettings().deny_networks)
HISTORY_MAX = 1000

_ENDPOINT_COLUMNS = "id, url, events, description, ordered, active, disabled_reason, created_at"
_INSERT_ENDPOINT_SQL = f"""
INSERT INTO public.webhook_endpoints (url, events, secret, description, ordered)
VALUES ($1, $2, $3, $4, $5) RETURNING {_ENDPOINT_COLUMNS}
"""
_HISTORY_SQL = """
SELECT ev.id, ev.event_type, ev.payload::text AS payload, ev.txid::text AS txid, ev.created_at,
       coalesce(json_agg(json_build_object(
           'endpoint_id', d.endpoint_id, 'state', d.state, 'attempts', d.attempts,
           'last_status', d.last_status, 'last_error', d.last_error, 'last_latency_ms', d.last_latency_ms,
           'next_attempt_at', CASE WHEN d.state = 'pending' THEN d.next_attempt_at END,
           'delivered_at', d.delivered_at) ORDER BY d.endpoint_id) FILTER (WHERE d.id IS NOT NULL), '[]')::text
           AS deliveries
FROM (SELECT * FROM public.webhook_events WHERE ($1::text IS NULL OR event_type = $1)
      ORDER BY id DESC LIMIT $2) AS ev
LEFT JOIN public.webhook_deliveries AS d ON d.event_id = ev.id
GROUP BY ev.id, ev.event_type, ev.payload, ev.txid, ev.created_at
ORDER BY ev.id DESC
"""
# Redelivery: every endpoint (active) whose patterns match gets the event again, with a full
# retry budget, including endpoints registered after the event.
_REDELIVER_SQL = rf"""
INSERT INTO public.webhook_deliveries (event_id, endpoint_id)
SELECT ev.id, e.id FROM public.webhook_events AS ev, public.webhook_endpoints AS e
WHERE ev.id = $1 AND e.active AND ($2::bigint IS NULL OR e.id = $2)
  AND EXISTS (SELECT 1 FROM unnest(e.events) AS p WHERE ev.event_type LIKE {LIKE_PATTERN})
ON CONFLICT (endpoint_id, event_id) DO UPDATE
SET state = 'pending', attempts = 0, next_attempt_at = now(), delivered_at = NULL
RETURNING endpoint_id
"""


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    id: int
    url: str
    events: tuple[str, ...]
    description: str | None
    ordered: bool
    active: bool
    disabled_reason: str | None
    created_at: datetime
    secret: str | None = None  # only in register_webhook's answer, never again

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id, "url": self.url, "events": list(self.events), "description": self.description,
            "ordered": self.ordered, "active": self.active, "disabled_reason": self.disabled_reason,
            "created_at": self.created_at.isoformat(),
        }
        if self.secret is not None:
            doc["secret"] = self.secret
        return doc


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: int
    event_type: str
    payload: Any
    txid: str
    created_at: datetime
    deliveries: tuple[dict[str, Any], ...]  # per endpoint: state, attempts, last status/error/latency

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "event_type": self.event_type, "payload": self.payload, "txid": self.txid,
                "created_at": self.created_at.isoformat(), "deliveries": list(self.deliveries)}


def _data_error() -> type[Exception]:
    import asyncpg

    return asyncpg.DataError  # type: ignore[no-any-return]


def _refused(what: str, exc: Any) -> InvalidWebhook:
    detail = f" ({exc.detail})" if getattr(exc, "detail", None) else ""
    return InvalidWebhook(f"{what}: the database refused it: {exc}{detail}")


def _endpoint(row: Any, secret: str | None = None) -> WebhookEndpoint:
    return WebhookEndpoint(row["id"], row["url"], tuple(row["events"]), row["description"], row["ordered"],
                           row["active"], row["disabled_reason"], row["created_at"], secret)


class WebhookService:
    """Register endpoints, emit events, read history: ``db`` is an asyncpg pool or connection."""

    def __init__(self, db: Any, deny_networks: Sequence[Network] = DEFAULT_DENY) -> None:
        self.db = db
        self.deny = tuple(deny_networks)
        self._owned = False

    @classmethod
    async def connect(cls, dsn: str, deny_networks: Sequence[Network] = DEFAULT_DENY) -> WebhookService:
        import asyncpg

        service = cls(await asyncpg.create_pool(dsn, min_size=1, max_size=4), deny_networks)
        service._owned = True
        return service

    async def close(self) -> None:
        if self._owned:
            await self.db.close()

    async def register_webhook(self, url: str, events: Sequence[str], secret: str | None = None, *,
                               description: str | None = None, ordered: bool = True) -> WebhookEndpoint:
        """Store an endpoint; the answer carries its secret (generated when not given), once."""
        url = check_url(url)
        patterns = check_patterns(events)
        secret = new_secret() if secret is None else check_secret(secret)
        if description is not None and (not isinstance(description, str) or len(description) > 500):
            raise InvalidWebhook("description must be a string of at most 500 characters")
        if not isinstance(ordered, bool):
            raise InvalidWebhook("ordered must be true or false")
        await check_target(url, self.deny)
        try:
            row = await self.db.fetchrow(_INSERT_ENDPOINT_SQL, url, list(patterns), secret, description, ordered)
        except _data_error() as exc:  # e.g. a NUL character, which text cannot hold
            raise _refused("url or description", exc) from None
        return _endpoint(row, secret)

    async def list_endpoints(self) -> list[WebhookEndpoint]:
        rows = await self.db.fetch(f"SELECT {_ENDPOINT_COLUMNS} FROM public.webhook_endpoints ORDER BY id")
        return [_endpoint(row) for row in rows]

    async def delete_endpoint(self, endpoint_id: int) -> bool:
        """Remove an endpoint and its delivery records; False when there is none with this id."""
        return await self.db.fetchval("DELETE FROM public.webhook_endpoints WHERE id = $1 RETURNING id",
                                      endpoint_id) is not None

    async def trigger_webhook(self, event_type: str, payload: Any, *, conn: Any = None) -> int:
        """Emit an app event (in ``conn``'s transaction when given); returns its id."""
        event_type = check_event_type(event_type)
        text = json.dumps(payload)
        try:
            return int(await (conn or self.db).fetchval("SELECT public.pgsidecar_emit($1, $2::jsonb)", event_type,
                                                        text))
        except _data_error() as exc:  # \u0000, NaN or Infinity: JSON to Python, but not to jsonb
            raise _refused("payload", exc) from None

    async def get_event_history(self, event_type: str | None = None, limit: int = 50) -> list[WebhookEvent]:
        """Newest first, each with its delivery state per endpoint."""
        if event_type is not None:
            check_event_type(event_type)
        if not 1 <= limit <= HISTORY_MAX:
            raise InvalidWebhook(f"limit must be between 1 and {HISTORY_MAX}, got {limit}")
        rows = await self.db.fetch(_HISTORY_SQL, event_type, limit)
        return [WebhookEvent(row["id"], row["event_type"], json.loads(row["payload"]), row["txid"], row["created_at"],
                             tuple(json.loads(row["deliveries"]))) for row in rows]

    async def redeliver(self, event_id: int, endpoint_id: int | None = None) -> list[int]:
        """Queue the event again for every matching active endpoint (or one); returns their ids."""
        rows = await self.db.fetch(_REDELIVER_SQL, event_id, endpoint_id)
        return sorted(row["endpoint_id"] for row in rows)

    async def event_exists(self, event_id: int) -> bool:
        return bool(await self.db.fetchval("SELECT EXISTS (SELECT 1 FROM public.webhook_events WHERE id = $1)",
                                           event_id))
