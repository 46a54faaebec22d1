"""What PostgreSQL itself says is running (pg_stat_activity), for tests that check the server."""
from __future__ import annotations

from typing import Any


def running(d: Any, marker: str) -> list[int]:
    """Backends (not ``d``'s own) actively running a query whose text contains ``marker``.

    ``d`` is a psycopg connection straight to PostgreSQL.
    """
    rows = d.execute(
        "select pid from pg_stat_activity where state = 'active' and query like %s and pid <> pg_backend_pid()",
        (f"%{marker}%",),
    ).fetchall()
    return [r[0] for r in rows]
