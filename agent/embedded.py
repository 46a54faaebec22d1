"""The embedded PostgreSQL a newcomer gets when no upstream is configured (pgserver)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    return Path.home() / ".cache" / "pgsidecar" / "pgdata"


def start_embedded(data_dir: str | None) -> tuple[str, Any]:
    """Start (or reuse) the embedded cluster; return its DSN and the handle that stops it."""
    import pgserver  # imported here: only this path needs it

    path = Path(data_dir) if data_dir else default_data_dir()
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(path, cleanup_mode="stop")
    dsn = server.get_uri()
    log.info("embedded_postgres_started", extra={"data_dir": str(path)})
    return dsn, server
