"""Every aiohttp ``web.AppKey`` of the agent, declared once."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from config.settings import Settings
from proxy.listener import ProxyServer

if TYPE_CHECKING:
    from graphql_gateway.gateway import Gateway

    from .metrics import LoopLagMonitor, ScrapeLog
    from .views import ViewRefresher
    from .webhooks.emitter import Emitter
    from .webhooks.feed import ChangeFeed

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", ProxyServer)
# Metrics (agent/metrics.py): the app's own registry and its event-loop lag monitor.
REGISTRY = web.AppKey("registry", CollectorRegistry)
LOOP_LAG: web.AppKey[LoopLagMonitor] = web.AppKey("loop_lag")
# The last GET /metrics (agent/metrics.py), for /api/monitoring/status (agent/health.py).
SCRAPES: web.AppKey[ScrapeLog] = web.AppKey("scrapes")
# The admin check of mutating endpoints (agent/api.py): bearer token, or loopback without one.
REQUIRE_ADMIN: web.AppKey[Callable[[web.Request], None]] = web.AppKey("require_admin")
# The webhook emitter (agent/webhooks) and its change feed (GraphQL subscriptions read it).
WEBHOOKS: web.AppKey[Emitter] = web.AppKey("webhooks")
CHANGE_FEED: web.AppKey[ChangeFeed] = web.AppKey("change_feed")
# The GraphQL gateway (graphql_gateway/gateway.py): its schema, pool to the proxy and statistics.
GRAPHQL: web.AppKey[Gateway] = web.AppKey("graphql")
# The materialized view refresher (agent/views.py).
VIEWS: web.AppKey[ViewRefresher] = web.AppKey("views")
