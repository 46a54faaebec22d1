"""Synthetic recruiter data for demos and benchmarks (``pgsidecar seed-demo --users N``).

Set-based SQL (generate_series), so N=10,000 users (about 15k resumes, 1k jobs, 300k matches,
30k predictions) loads in seconds; deterministic for a given N. Run after ``pgsidecar migrate``.
Ends with ANALYZE and a refresh of both materialized views.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import create_engine, text

from migrations.runner import sqlalchemy_url

SKILLS = ["python", "go", "sql", "rust", "java", "kotlin", "typescript", "react", "postgres",
          "kubernetes", "aws", "terraform", "spark", "ml", "django", "fastapi"]

_STATEMENTS = (
    ("companies", """
        INSERT INTO companies (name, industry, created_at)
        SELECT 'Company ' || g, (ARRAY['tech','finance','health','retail','energy'])[1 + g % 5],
               now() - (g % 1000) * interval '1 day'
        FROM generate_series(1, greatest(:users / 50, 1)) AS g"""),
    ("users", """
        INSERT INTO users (email, full_name, location, created_at)
        SELECT 'user' || g || '@example.com', 'User ' || g,
               (ARRAY['Berlin','London','Paris','Remote','NYC'])[1 + g % 5],
               now() - (g % 730) * interval '1 day'
        FROM generate_series(1, :users) AS g"""),
    ("resumes", """
        INSERT INTO resumes (user_id, title, summary, skills, experience_years, created_at)
        SELECT u.id, (ARRAY['Backend engineer','Data engineer','Frontend engineer','SRE'])[1 + (u.id + k) % 4],
               'Synthetic resume',
               ARRAY(SELECT (CAST(:skills AS text[]))[1 + ((u.id * 7 + k * 3 + s * 5) % 16)] FROM generate_series(0, 2 + (u.id + k) % 3) AS s),
               (u.id + k) % 20, u.created_at + k * interval '30 days'
        FROM users AS u CROSS JOIN generate_series(0, 1) AS k
        WHERE k = 0 OR u.id % 2 = 0"""),
    ("jobs", """
        INSERT INTO jobs (company_id, title, description, required_skills, salary_min, salary_max, created_at)
        SELECT c.id, 'Job ' || g || ' at ' || c.name, 'Synthetic job',
               ARRAY[(CAST(:skills AS text[]))[1 + g % 16], (CAST(:skills AS text[]))[1 + (g * 3) % 16]],
               40000 + (g % 50) * 1000, 80000 + (g % 50) * 2000, now() - (g % 365) * interval '1 day'
        FROM generate_series(1, greatest(:users / 10, 1)) AS g
        JOIN companies AS c ON c.id = 1 + g % (SELECT count(*) FROM companies)"""),
    ("matches", """
        INSERT INTO matches (resume_id, job_id, match_score, created_at)
        SELECT r.id, 1 + (r.id * 31 + k * 17) % (SELECT count(*) FROM jobs),
               ((r.id * 7919 + k * 104729) % 1000) / 1000.0, r.created_at + interval '1 day'
        FROM resumes AS r CROSS JOIN generate_series(1, 20) AS k"""),
    ("predictions", """
        INSERT INTO predictions (resume_id, job_id, model_version, predicted_score, features)
        SELECT m.resume_id, m.job_id, 'demo-v1', m.match_score, jsonb_build_object('source', 'demo')
        FROM matches AS m WHERE m.id % 10 = 0"""),
)


def seed_demo(dsn: str, users: int, progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Insert the demo rows (one transaction); return rows inserted per table."""
    if users < 1:
        raise ValueError(f"users must be at least 1, got {users}")
    counts: dict[str, int] = {}
    engine = create_engine(sqlalchemy_url(dsn))
    try:
        with engine.begin() as conn:
            for table, sql in _STATEMENTS:
                n = conn.execute(text(sql), {"users": users, "skills": SKILLS}).rowcount
                counts[table] = n
                if progress is not None:
                    progress(table, n)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text("ANALYZE"))
            for view in ("resume_job_matches", "user_statistics"):
                conn.execute(text(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {view}"))
    finally:
        engine.dispose()
    return counts
