"""create_app: the agent's aiohttp application: /healthz here, /metrics (metrics.py), the query and
cache APIs (api.py), /readyz and the health and monitoring status endpoints (health.py)."""
from __future__ import annotations

from aiohttp import web

from config.settings import Settings
from graphql_gateway.app import setup_graphql
from proxy.listener import ProxyServer

from . import keys
from .api import setup_api
from .health import setup_health
from .metrics import setup_metrics
from .views import setup_views
from .webhooks.routes import setup_webhooks


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:  # type: ignore[no-untyped-def]
    """Every error answer is JSON: {"error": message, "status": code}."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        if exc.content_type == "application/json" and exc.text:
            return web.Response(status=exc.status, text=exc.text, content_type="application/json", headers=headers)
        return web.json_response(
            {"error": exc.reason, "status": exc.status, "path": request.path}, status=exc.status, headers=headers
        )


def create_app(settings: Settings, proxy: ProxyServer) -> web.Application:
    app = web.Application(middlewares=[_json_errors])
    app[keys.SETTINGS] = settings
    app[keys.PROXY] = proxy
    app.router.add_get("/healthz", healthz)
    setup_metrics(app)
    setup_api(app)
    setup_health(app)
    setup_webhooks(app)
    setup_views(app)
    if settings.graphql.enabled:
        setup_graphql(app)
    return app
