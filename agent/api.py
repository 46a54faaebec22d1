"""Placeholder: the query API (issue 3)."""
from __future__ import annotations

from aiohttp import web


def setup_query_api(app: web.Application) -> None:
    """Register /api/queries/*."""
