"""materialized views resume_job_matches and user_statistics, refreshable CONCURRENTLY

Revision ID: 0003
Revises: 0002

Each view has a unique index, which REFRESH MATERIALIZED VIEW CONCURRENTLY requires.
"""
from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

RESUME_JOB_MATCHES = """
CREATE MATERIALIZED VIEW resume_job_matches AS
SELECT m.id          AS match_id,
       m.resume_id,
       m.job_id,
       m.match_score,
       r.user_id,
       r.title       AS resume_title,
       r.skills,
       r.experience_years,
       j.title       AS job_title,
       j.company_id,
       c.name        AS company_name,
       j.required_skills,
       j.salary_min,
       j.salary_max,
       m.created_at  AS matched_at
FROM matches AS m
JOIN resumes AS r ON r.id = m.resume_id
JOIN jobs AS j ON j.id = m.job_id
JOIN companies AS c ON c.id = j.company_id
WHERE m.match_score > 0.7
"""

USER_STATISTICS = """
CREATE MATERIALIZED VIEW user_statistics AS
SELECT u.id                                 AS user_id,
       u.email,
       u.created_at                         AS user_created_at,
       count(DISTINCT r.id)                 AS resume_count,
       count(m.id)                          AS match_count,
       count(m.id) FILTER (WHERE m.match_score > 0.7) AS strong_match_count,
       avg(m.match_score)                   AS avg_match_score,
       max(m.match_score)                   AS best_match_score,
       max(r.created_at)                    AS last_resume_at
FROM users AS u
LEFT JOIN resumes AS r ON r.user_id = u.id
LEFT JOIN matches AS m ON m.resume_id = r.id
GROUP BY u.id, u.email, u.created_at
"""


def upgrade() -> None:
    op.execute(RESUME_JOB_MATCHES)
    op.execute("CREATE UNIQUE INDEX resume_job_matches_match_id_key ON resume_job_matches (match_id)")
    op.execute("CREATE INDEX resume_job_matches_score ON resume_job_matches (match_score DESC)")
    op.execute(USER_STATISTICS)
    op.execute("CREATE UNIQUE INDEX user_statistics_user_id_key ON user_statistics (user_id)")


def downgrade() -> None:
    op.execute("DROP MATERIALIZED VIEW user_statistics")
    op.execute("DROP MATERIALIZED VIEW resume_job_matches")
