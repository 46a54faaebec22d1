"""Every aiohttp ``web.AppKey`` of the agent, declared once."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from config.settings import Settings
from proxy.listener import ProxyServer

if TYPE_CHECKING:
    from .metrics import LoopLagMonitor, ScrapeLog

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", ProxyServer)
# Metrics (agent/metrics.py): the app's own registry and its event-loop lag monitor.
REGISTRY = web.AppKey("registry", CollectorRegistry)
LOOP_LAG: web.AppKey[LoopLagMonitor] = web.AppKey("loop_lag")
# The last GET /metrics (agent/metrics.py), for /api/monitoring/status (agent/health.py).
SCRAPES: web.AppKey[ScrapeLog] = web.AppKey("scrapes")
