"""The recruiter migrations (issue 6) on a real PostgreSQL: a fresh database per test, the
``pgsidecar migrate`` command as an operator runs it, and the catalog as the witness."""
from __future__ import annotations

import json

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrations import runner
from proxy.invalidation import drop_trigger_sql

ROOT = Path(__file__).resolve().parents[2]
REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006"]
SEED_INDICES = {
    "idx_user_email": ("users", "(email)"),
    "idx_user_created": ("users", "(created_at)"),
    "idx_resume_user_id": ("resumes", "(user_id)"),
    "idx_resume_skills": ("resumes", "USING gin (skills)"),
    "idx_resume_created": ("resumes", "(created_at)"),
    "idx_job_company": ("jobs", "(company_id)"),
    "idx_job_created": ("jobs", "(created_at)"),
    "idx_match_resume_job": ("matches", "(resume_id, job_id)"),
    "idx_match_score": ("matches", "(match_score DESC)"),
}

# Everything a migration could leave in the public schema, in one comparable value.
_SNAPSHOT_SQL = {
    "relations": """SELECT c.relname, c.relkind::text FROM pg_class AS c
                    JOIN pg_namespace AS n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'public' AND c.relname NOT LIKE 'alembic_version%' ORDER BY 1""",
    "columns": """SELECT table_name, column_name, data_type, is_nullable, column_default
                  FROM information_schema.columns WHERE table_schema = 'public'
                  AND table_name <> 'alembic_version' ORDER BY 1, 2""",
    "indexes": """SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
                  AND tablename <> 'alembic_version' ORDER BY 1""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
                      WHERE connamespace = 'public'::regnamespace
                      AND conrelid::regclass::text <> 'alembic_version' ORDER BY 1, 2""",
    "matviews": "SELECT matviewname, definition FROM pg_matviews WHERE schemaname = 'public' ORDER BY 1",
    "triggers": """SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "functions": """SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1""",
}


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {name: conn.execute(sql).fetchall() for name, sql in _SNAPSHOT_SQL.items()}


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PGSIDECAR_")}
    env["DATABASE_URL"] = dsn
    env["PYTHONPATH"] = str(ROOT)
    return env


def migrate(dsn: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "agent", "migrate", *args], env=_env(dsn), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _demo_rows(conn: psycopg.Connection[Any], users: int = 200) -> None:
    skills = ["python", "go", "sql", "rust", "java", "k8s", "react", "postgres"]
    conn.execute("INSERT INTO companies (name, industry) SELECT 'company ' || g, 'tech' FROM generate_series(1, 20) AS g")
    conn.execute("INSERT INTO users (email, full_name) SELECT 'u' || g || '@example.com', 'User ' || g "
                 "FROM generate_series(1, %s) AS g", (users,))
    conn.execute("""INSERT INTO resumes (user_id, title, skills, experience_years)
                    SELECT u.id, 'engineer', ARRAY[(%(s)s::text[])[1 + u.id %% 8], (%(s)s::text[])[1 + (u.id / 8) %% 8]], u.id %% 15
                    FROM users AS u""", {"s": skills})
    conn.execute("""INSERT INTO jobs (company_id, title, required_skills, salary_min, salary_max)
                    SELECT 1 + g % 20, 'job ' || g, ARRAY['python'], 50000, 90000 FROM generate_series(1, 50) AS g""")
    conn.execute("""INSERT INTO matches (resume_id, job_id, match_score)
                    SELECT r.id, j.id, ((r.id * 7 + j.id * 13) % 100) / 100.0
                    FROM resumes AS r JOIN jobs AS j ON j.id % 10 = r.id % 10""")
    conn.execute("ANALYZE")


def test_upgrade_downgrade_upgrade_leaves_nothing_at_base(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    empty = snapshot(conn)
    out = migrate(dsn).stdout
    for rev in REVISIONS:
        assert f"applied {rev}:" in out
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0006",)]
    head = snapshot(conn)
    assert {"resume_job_matches", "user_statistics"} <= {r[0] for r in head["matviews"]}

    out = migrate(dsn, "--down", "base").stdout
    for rev in REVISIONS:
        assert f"reverted {rev}:" in out
    assert snapshot(conn) == empty, "downgrade to base left objects behind"
    assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (0,)

    migrate(dsn)
    assert snapshot(conn) == head


def test_each_single_step_down_restores_the_schema_before_it(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    cfg = runner.alembic_config(dsn)
    before = [snapshot(conn)]
    for rev in REVISIONS:
        runner.upgrade(cfg, rev)
        before.append(snapshot(conn))
    for i in range(len(REVISIONS), 0, -1):
        runner.downgrade(cfg, "-1")
        assert snapshot(conn) == before[i - 1], f"downgrade of {REVISIONS[i - 1]} is not exact"
        runner.upgrade(cfg, "+1")
        assert snapshot(conn) == before[i], f"re-upgrade to {REVISIONS[i - 1]} differs"
        runner.downgrade(cfg, "-1")


def test_seed_indices_exist_valid_and_are_used(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    migrate(dsn)
    rows = conn.execute("""SELECT c.relname, t.relname, pg_get_indexdef(i.indexrelid), i.indisvalid
                           FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
                           JOIN pg_class AS t ON t.oid = i.indrelid WHERE c.relname LIKE 'idx\\_%'""").fetchall()
    found = {name: (table, definition, valid) for name, table, definition, valid in rows}
    assert set(found) == set(SEED_INDICES)
    for name, (table, shape) in SEED_INDICES.items():
        got_table, definition, valid = found[name]
        assert got_table == table and valid, name
        assert definition.endswith(f"ON public.{table} {shape}" if shape.startswith("USING")
                                   else f"ON public.{table} USING btree {shape}"), definition

    _demo_rows(conn)
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT id FROM resumes WHERE skills @> ARRAY['python']").fetchall())
    assert "idx_resume_skills" in plan, plan
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT id, match_score FROM matches ORDER BY match_score DESC LIMIT 10").fetchall())
    assert "idx_match_score" in plan, plan
    n = conn.execute("SELECT count(*) FROM resumes WHERE skills @> ARRAY['python']").fetchone()
    assert n is not None and n[0] > 0


def test_views_refresh_concurrently_and_cache_trigger_notifies(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    migrate(dsn)
    _demo_rows(conn, users=50)
    for view in ("resume_job_matches", "user_statistics"):
        conn.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {view}")
    strong = conn.execute("SELECT count(*) FROM matches WHERE match_score > 0.7").fetchone()
    assert conn.execute("SELECT count(*) FROM resume_job_matches").fetchone() == strong
    assert conn.execute("SELECT count(*) FROM user_statistics").fetchone() == (50,)
    # Readers are not blocked by a concurrent refresh running in an open transaction.
    refresher, reader = connect(), connect()
    with refresher.transaction():
        refresher.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY resume_job_matches")
        reader.execute("SET statement_timeout = '2s'")
        assert reader.execute("SELECT count(*) FROM resume_job_matches").fetchone() == strong

    listener = connect()
    listener.execute("LISTEN pgsidecar_cache")
    company = conn.execute("SELECT company_id FROM jobs WHERE id = 1").fetchone()[0]
    # The column trigger marks the column, the rows trigger names it and the rows' integer keys.
    conn.execute("UPDATE jobs SET title = title WHERE id = 1")
    notes = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert len(notes) == 1 and notes[0]["tables"] == ["jobs"] and notes[0]["columns"] == ["title"]
    assert notes[0]["keys"]["id"] == [1] and notes[0]["keys"]["company_id"] == [company]
    conn.execute("DELETE FROM jobs WHERE id = -1")  # statement-level: fires for 0 rows, names none
    notes = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert len(notes) == 1 and notes[0]["tables"] == ["jobs"] and notes[0]["columns"] is None
    assert notes[0]["keys"]["id"] is None
    conn.execute("TRUNCATE predictions")  # the table trigger: the name alone
    notes = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert notes == [["predictions"]]


def test_two_runners_at_once_apply_each_revision_once(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    # Hold the runners' lock so both are polling for it before either starts.
    conn.execute("SELECT pg_advisory_lock(%s)", (runner.LOCK_KEY,))
    procs = [subprocess.Popen([sys.executable, "-m", "agent", "migrate"], env=_env(dsn), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND application_name = %s", (runner.APPLICATION_NAME,)).fetchone()
            if waiting and waiting[0] == 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the two runners never both connected")
        time.sleep(0.3)  # both have tried the lock at least once
        conn.execute("SELECT pg_advisory_unlock(%s)", (runner.LOCK_KEY,))
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    for rev in REVISIONS:
        applied = sum(f"applied {rev}:" in out for out, _ in outs)
        assert applied == 1, (rev, outs)
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0006",)]


def test_status_and_offline_sql(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    out = migrate(dsn, "--status").stdout
    assert "at base" in out and "pending: 0001, 0002, 0003, 0004, 0005" in out
    migrate(dsn, "--to", "0002")
    out = migrate(dsn, "--status").stdout
    assert "at 0002" in out and "pending: 0003, 0004, 0005" in out
    sql = migrate(dsn, "--sql").stdout
    assert "CREATE MATERIALIZED VIEW resume_job_matches" in sql and "CREATE TRIGGER pgsidecar_cache_invalidate" in sql
    assert "CREATE TABLE users" not in sql  # from the database's revision on
    # --sql ran nothing.
    assert connect().execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    down = migrate(dsn, "--down", "0001", "--sql").stdout
    assert "DROP INDEX CONCURRENTLY IF EXISTS idx_user_email" in down


def test_a_failure_names_the_revision_and_statement_and_keeps_what_was_applied(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    conn.execute("CREATE TABLE user_statistics (id int)")  # in the way of revision 0003
    proc = migrate(dsn, check=False)
    assert proc.returncode == 1
    assert "applied 0001:" in proc.stdout and "applied 0002:" in proc.stdout
    assert "revision 0003 failed" in proc.stderr and 'relation "user_statistics" already exists' in proc.stderr
    assert "statement: CREATE MATERIALIZED VIEW user_statistics" in proc.stderr
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    # 0003 ran in one transaction: its first view is not left behind.
    assert conn.execute("SELECT to_regclass('resume_job_matches')").fetchone() == (None,)
    conn.execute("DROP TABLE user_statistics")
    assert "applied 0003:" in migrate(dsn).stdout


def test_seed_script_runs_the_same_command(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_migrations.py"), "--to", "0001"],
                          env=_env(dsn), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "applied 0001:" in proc.stdout
    assert connect().execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]


def test_seed_demo_fills_the_schema_and_the_seed_queries_use_the_indices(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    migrate(dsn)
    proc = subprocess.run([sys.executable, "-m", "agent", "seed-demo", "--users", "500"], env=_env(dsn), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "users: 500 rows" in proc.stdout
    conn = connect()
    counts = dict(conn.execute("""SELECT 'users', count(*) FROM users UNION ALL SELECT 'resumes', count(*) FROM resumes
                                  UNION ALL SELECT 'matches', count(*) FROM matches
                                  UNION ALL SELECT 'predictions', count(*) FROM predictions""").fetchall())
    assert counts["users"] == 500 and counts["resumes"] == 750 and counts["matches"] == 15000
    assert counts["predictions"] == 1500
    assert conn.execute("SELECT count(*) FROM user_statistics").fetchone() == (500,)
    strong = conn.execute("SELECT count(*) FROM matches WHERE match_score > 0.7").fetchone()
    assert strong is not None and strong[0] > 0
    assert conn.execute("SELECT count(*) FROM resume_job_matches").fetchone() == strong
    conn.execute("SET enable_seqscan = off")  # 750 resumes: a sequential scan is cheaper
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT id FROM resumes WHERE skills @> ARRAY['python', 'sql']").fetchall())
    assert "idx_resume_skills" in plan, plan


def test_0006_replaces_cache_triggers_an_earlier_0004_installed(fresh_db: Any) -> None:
    """A database migrated to 0005 by an older pgsidecar has one table trigger on INSERT, DELETE
    and TRUNCATE per recruiter table (and column triggers that notify themselves): 0006 puts the
    triggers that name the rows in their place, and a write then notifies its rows' keys."""
    dsn, connect = fresh_db
    conn = connect()
    cfg = runner.alembic_config(dsn)
    runner.upgrade(cfg, "0005")
    for table in ("users", "companies", "resumes", "jobs", "matches", "predictions"):
        conn.execute(drop_trigger_sql("public", table))
        conn.execute(f"CREATE TRIGGER pgsidecar_cache_invalidate AFTER INSERT OR DELETE OR TRUNCATE ON {table} "
                     "FOR EACH STATEMENT EXECUTE FUNCTION public.pgsidecar_cache_notify()")
    rows_triggers = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgsidecar_cache_rows_%'"
    assert conn.execute(rows_triggers).fetchone() == (0,)
    runner.upgrade(cfg, "0006")
    assert conn.execute(rows_triggers).fetchone() == (18,)  # six tables, three each
    _demo_rows(conn, users=5)
    listener = connect()
    listener.execute("LISTEN pgsidecar_cache")
    conn.execute("UPDATE jobs SET title = title WHERE id = 1")
    notes = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert notes[0]["tables"] == ["jobs"] and notes[0]["keys"]["id"] == [1], notes
