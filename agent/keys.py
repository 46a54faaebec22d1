"""Every aiohttp ``web.AppKey`` of the agent, declared once."""
from __future__ import annotations

from aiohttp import web

from config.settings import Settings
from proxy.listener import ProxyServer

SETTINGS = web.AppKey("settings", Settings)
PROXY = web.AppKey("proxy", ProxyServer)
