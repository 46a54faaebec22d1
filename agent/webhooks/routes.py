"""The webhook HTTP API on the agent, and the emitter's place in the app's lifetime.

- ``POST /api/webhooks/register`` {url, events, secret?, description?, ordered?}: 201 with the
  endpoint and its secret (the only time it is shown).
- ``GET /api/webhooks``: the endpoints, without secrets.
- ``DELETE /api/webhooks/{id}``: the endpoint and its delivery records.
- ``GET /api/webhooks/events?event_type=&limit=``: history, newest first, with delivery state per
  endpoint.
- ``POST /api/webhooks/events/{id}/redeliver`` {endpoint_id?}: 202; queued again with a full retry
  budget for every matching active endpoint (or the one named).
- ``POST /api/webhooks/trigger`` {event_type, payload}: 202 with the event id.

Mutating routes are admin-only (``agent.admin_token``, as /api/queries/reset). Bad input gets 400
with a message and stores nothing; unknown fields are refused rather than ignored. While the
webhook tables are missing or the database is unreachable, the routes answer 503 saying which.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .. import keys
from .delivery import InvalidWebhook, networks
from .emitter import Emitter
from .metrics import WebhookCollector
from .service import WebhookService

REGISTER_FIELDS = frozenset({"url", "events", "secret", "description", "ordered"})
TRIGGER_FIELDS = frozenset({"event_type", "payload"})
REDELIVER_FIELDS = frozenset({"endpoint_id"})
MAX_REGISTER_BYTES = 64 * 1024


def _error(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": message, "status": cls.status_code}), content_type="application/json")


async def _body(request: web.Request, allowed: frozenset[str], max_bytes: int, setting: str,
                *, optional: bool = False) -> dict[str, Any]:
    chunks, size = [], 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > max_bytes:
            raise _error(web.HTTPBadRequest, f"request body is larger than {max_bytes} bytes ({setting})")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and optional:
        return {}
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _error(web.HTTPBadRequest, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _error(web.HTTPBadRequest, "request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _error(web.HTTPBadRequest, "request body must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise _error(web.HTTPBadRequest, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return doc


def _int_param(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _error(web.HTTPBadRequest, f"{name} must be an integer, got {raw[:40]!r}") from None
    if not 1 <= value <= 2**63 - 1:
        raise _error(web.HTTPBadRequest, f"{name} must be a positive integer, got {value}")
    return value


class WebhookApi:
    def __init__(self, app: web.Application) -> None:
        self.app = app

    def _service(self) -> WebhookService:
        emitter = self.app[keys.WEBHOOKS]
        if emitter.pool is None:
            if emitter.state == "waiting_for_tables":
                why = (f"the webhook tables do not exist in database {emitter.database!r}: run `pgsidecar migrate` "
                       "or `pgsidecar webhooks install`")
            else:
                why = f"the webhook emitter is not connected to database {emitter.database!r} ({emitter.last_error})"
            raise _error(web.HTTPServiceUnavailable, why)
        return WebhookService(emitter.pool, networks(self.app[keys.SETTINGS].webhooks.deny_networks))

    async def register(self, request: web.Request) -> web.Response:
        self.app[keys.REQUIRE_ADMIN](request)
        doc = await _body(request, REGISTER_FIELDS, MAX_REGISTER_BYTES, "registration bodies")
        if "url" not in doc or "events" not in doc:
            raise _error(web.HTTPBadRequest, "url and events are required")
        service = self._service()
        try:
            endpoint = await service.register_webhook(
                doc["url"], doc["events"], doc.get("secret"), description=doc.get("description"),
                ordered=doc.get("ordered", True))
        except InvalidWebhook as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from None
        return web.json_response(endpoint.as_json(), status=201)

    async def endpoints(self, request: web.Request) -> web.Response:
        found = await self._service().list_endpoints()
        return web.json_response({"endpoints": [e.as_json() for e in found]})

    async def delete(self, request: web.Request) -> web.Response:
        self.app[keys.REQUIRE_ADMIN](request)
        endpoint_id = _int_param(request.match_info["id"], "endpoint id")
        if not await self._service().delete_endpoint(endpoint_id):
            raise _error(web.HTTPNotFound, f"no webhook endpoint with id {endpoint_id}")
        return web.json_response({"deleted": endpoint_id})

    async def events(self, request: web.Request) -> web.Response:
        event_type = request.query.get("event_type") or None
        limit = _int_param(request.query.get("limit", "50"), "limit")
        try:
            found = await self._service().get_event_history(event_type, limit)
        except InvalidWebhook as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from None
        return web.json_response({"events": [e.as_json() for e in found]}, dumps=lambda d: json.dumps(d, default=str))

    async def redeliver(self, request: web.Request) -> web.Response:
        self.app[keys.REQUIRE_ADMIN](request)
        event_id = _int_param(request.match_info["id"], "event id")
        doc = await _body(request, REDELIVER_FIELDS, 1024, "redelivery bodies", optional=True)
        endpoint_id = doc.get("endpoint_id")
        if endpoint_id is not None and (not isinstance(endpoint_id, int) or isinstance(endpoint_id, bool)):
            raise _error(web.HTTPBadRequest, "endpoint_id must be an integer")
        service = self._service()
        if not await service.event_exists(event_id):
            raise _error(web.HTTPNotFound, f"no webhook event with id {event_id}")
        queued = await service.redeliver(event_id, endpoint_id)
        self.app[keys.WEBHOOKS].wake()
        return web.json_response({"event_id": event_id, "endpoints": queued}, status=202)

    async def trigger(self, request: web.Request) -> web.Response:
        self.app[keys.REQUIRE_ADMIN](request)
        limit = self.app[keys.SETTINGS].webhooks.max_payload_bytes
        doc = await _body(request, TRIGGER_FIELDS, limit, f"webhooks.max_payload_bytes = {limit}")
        if "event_type" not in doc:
            raise _error(web.HTTPBadRequest, "event_type is required")
        service = self._service()
        try:
            event_id = await service.trigger_webhook(doc["event_type"], doc.get("payload"))
        except InvalidWebhook as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from None
        return web.json_response({"event_id": event_id}, status=202)


async def _emitter_ctx(app: web.Application) -> AsyncIterator[None]:
    emitter = app[keys.WEBHOOKS]
    emitter.start()
    yield
    await emitter.stop()


def setup_webhooks(app: web.Application) -> None:
    """The emitter (started with the app, stopped with it), its metrics and /api/webhooks*
    (after ``setup_metrics`` and ``setup_api``: it uses their registry and admin check)."""
    settings = app[keys.SETTINGS]
    proxy = app[keys.PROXY]
    emitter = Emitter(settings.webhooks, proxy.upstream_endpoint(settings.webhooks.database))
    app[keys.WEBHOOKS] = emitter
    app[keys.CHANGE_FEED] = emitter.feed
    app[keys.REGISTRY].register(WebhookCollector(emitter))
    app.cleanup_ctx.append(_emitter_ctx)
    api = WebhookApi(app)
    app.router.add_post("/api/webhooks/register", api.register)
    app.router.add_get("/api/webhooks", api.endpoints)
    app.router.add_delete("/api/webhooks/{id}", api.delete)
    app.router.add_get("/api/webhooks/events", api.events)
    app.router.add_post("/api/webhooks/events/{id}/redeliver", api.redeliver)
    app.router.add_post("/api/webhooks/trigger", api.trigger)
