"""Placeholder: replaced by the metrics module (issue 3)."""
from __future__ import annotations

from aiohttp import web


def setup_metrics(app: web.Application) -> None:
    """Register /metrics, the HTTP metrics middleware and the event-loop lag monitor."""
