"""the seed's indices, built CONCURRENTLY so writes to a live table are never blocked

Revision ID: 0002
Revises: 0001

CREATE INDEX CONCURRENTLY cannot run in a transaction: each statement runs in an
``autocommit_block``. A concurrent build that fails leaves an INVALID index behind; the upgrade
drops such a leftover of ours (same name, indisvalid false) before building, so a re-run after a
failure finishes the job instead of skipping the broken index.
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDICES = (
    ("idx_user_email", "users (email)"),
    ("idx_user_created", "users (created_at)"),
    ("idx_resume_user_id", "resumes (user_id)"),
    ("idx_resume_skills", "resumes USING gin (skills)"),
    ("idx_resume_created", "resumes (created_at)"),
    ("idx_job_company", "jobs (company_id)"),
    ("idx_job_created", "jobs (created_at)"),
    ("idx_match_resume_job", "matches (resume_id, job_id)"),
    ("idx_match_score", "matches (match_score DESC)"),
)

_DROP_INVALID = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
               WHERE c.oid = to_regclass('public.{name}') AND NOT i.indisvalid) THEN
        RAISE NOTICE 'dropping invalid index {name} left by a failed build';
        EXECUTE 'DROP INDEX public.{name}';
    END IF;
END
$$"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, target in INDICES:
            # DROP INDEX (not CONCURRENTLY) of an invalid index: it is used by no query, and a
            # DO block cannot run a CONCURRENTLY statement.
            op.execute(_DROP_INVALID.format(name=name))
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {target}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, _ in reversed(INDICES):
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
