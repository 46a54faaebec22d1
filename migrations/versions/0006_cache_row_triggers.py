"""the result cache's triggers name the rows a write changed (invalidation per row)

Revision ID: 0006
Revises: 0005

A database migrated to 0004 before ``cache.row_invalidation`` has the earlier triggers (a table
trigger on INSERT/DELETE/TRUNCATE, column triggers that notify themselves): still correct, evicted
per table or column. This revision puts in place what 0004 now installs (proxy.invalidation:
TRUNCATE trigger, INSERT/DELETE/UPDATE triggers with transition tables that name each integer
column's values in the rows changed, column triggers that mark their column), on the recruiter
tables. On a database 0004 set up with them already, it replaces them with the same.

The downgrade changes nothing: the triggers it leaves are what 0004 installs, and an older
pgsidecar does not track a table carrying them (its results are then not cached; nothing stale).
"""
from __future__ import annotations

from alembic import op

from proxy.invalidation import install_statements

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ("users", "companies", "resumes", "jobs", "matches", "predictions")


def upgrade() -> None:
    for statement in install_statements("public", TABLES):
        op.execute(statement)


def downgrade() -> None:
    pass
