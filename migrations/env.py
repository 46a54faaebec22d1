"""Alembic environment: the URL from ``config.attributes['url']`` (set by migrations.runner) or
else from the proxy's settings (``upstream.dsn``, by default ``DATABASE_URL``).

Online runs hold the advisory lock ``LOCK_KEY`` on the migration connection for the whole run,
so two runners never apply one revision twice: the second waits, then reads the version table
the first left. It waits by polling ``pg_try_advisory_lock`` between idle pauses, not with a
blocking ``pg_advisory_lock``: a statement blocked on the lock holds a snapshot, and
``CREATE INDEX CONCURRENTLY`` in the first runner waits for every older snapshot to go, a
deadlock PostgreSQL breaks by failing one of them. Each revision runs in its own transaction (``transaction_per_migration``), so a
failure leaves the version table matching what was applied; revisions that build indices
``CONCURRENTLY`` step out of it with ``autocommit_block()``.
"""
from __future__ import annotations

import time
from typing import Any

from alembic import context
from sqlalchemy import create_engine, text

from migrations.runner import LOCK_KEY, Applied, sqlalchemy_url

cfg = context.config


def _url() -> Any:
    url = cfg.attributes.get("url")
    if url is not None:
        return url
    from config.loader import load_settings

    dsn = load_settings(None).upstream.dsn
    if not dsn:
        raise SystemExit("migrations: no database: set DATABASE_URL or upstream.dsn")
    return sqlalchemy_url(dsn)


def _on_version_apply(ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
    report = cfg.attributes.get("on_apply")
    if report is not None:
        # For a downgrade step too, up_revision is the revision being reverted.
        doc = (step.up_revision.doc if step.up_revision is not None else "") or ""
        report(Applied(revision=step.up_revision_id, direction="up" if step.is_upgrade else "down", doc=doc))


def _lock(conn: Any) -> None:
    waited = False
    while True:
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar()
        conn.commit()
        if got:
            return
        if not waited:
            waited = True
            report = cfg.attributes.get("on_wait")
            if report is not None:
                report()
        time.sleep(0.2)


def run_offline() -> None:
    context.configure(url=_url(), literal_binds=True, transaction_per_migration=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(_url())
    try:
        with engine.connect() as conn:
            _lock(conn)
            try:
                context.configure(connection=conn, transaction_per_migration=True,
                                  on_version_apply=_on_version_apply)
                with context.begin_transaction():
                    context.run_migrations()
                conn.commit()
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
