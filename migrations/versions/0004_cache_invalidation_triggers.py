"""the result cache's invalidation trigger on the recruiter tables

Revision ID: 0004
Revises: 0003

The same functions and triggers ``pgsidecar cache install-triggers`` puts in place
(proxy.invalidation). The downgrade drops the triggers on the recruiter tables, and each function
only when no other table's trigger (one ``install-triggers`` put elsewhere) still uses it.
A database migrated before the triggers named the rows a write changes keeps the older ones
(still correct, evicting per table or column): ``pgsidecar cache install-triggers`` replaces them.
"""
from __future__ import annotations

from alembic import op

from proxy.invalidation import FUNCTION, MARK_FUNCTION, ROWS_FUNCTION, drop_trigger_sql, install_statements

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("users", "companies", "resumes", "jobs", "matches", "predictions")


def upgrade() -> None:
    for statement in install_statements("public", TABLES):
        op.execute(statement)


def downgrade() -> None:
    for table in reversed(TABLES):
        for statement in drop_trigger_sql("public", table).split("; "):
            op.execute(statement)
    for function in (FUNCTION, MARK_FUNCTION, ROWS_FUNCTION):
        op.execute(f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger AS t
                   WHERE t.tgfoid = to_regprocedure('public.{function}()')) THEN
        DROP FUNCTION IF EXISTS public.{function}();
    END IF;
END
$$""")
