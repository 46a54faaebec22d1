"""webhook emitter: outbox tables, pgsidecar_emit() and the change triggers on the recruiter tables

Revision ID: 0005
Revises: 0004

The same objects ``pgsidecar webhooks install`` and ``webhooks watch`` create (agent.webhooks.sql).
The downgrade drops the triggers, the functions and the four tables (and with them every event
and delivery record).
"""
from __future__ import annotations

from alembic import op

from agent.webhooks.sql import DROP_SCHEMA_SQL, SCHEMA_SQL, unwatch_sql, watch_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("users", "companies", "resumes", "jobs", "matches", "predictions")


def upgrade() -> None:
    op.execute(SCHEMA_SQL)
    for table in TABLES:
        op.execute(watch_sql(table))


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(unwatch_sql(table))
    op.execute(DROP_SCHEMA_SQL)
