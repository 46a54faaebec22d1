"""Result-cache benchmark (issue 4): a read-heavy recruiter workload through pgbench custom scripts,
direct PostgreSQL vs pgsidecar with the cache vs pgsidecar without it vs PgBouncer, side by side.

Owns one run end to end: it creates the database ``pgsidecar_bench_cache`` and fills it with a
recruiter schema (users, companies, jobs, resumes, matches, predictions; the seed's indexes),
installs the cache's invalidation trigger with ``pgsidecar cache install-triggers`` on the tables
the mix reads (``--trigger-tables`` for others: every write to a table with the trigger NOTIFYs,
and PostgreSQL commits those one at a time),
starts PgBouncer, pgsidecar with ``cache.mode: all`` ("pgsidecar-cache") and pgsidecar with
``cache.mode: off`` ("pgsidecar-nocache") on free 127.0.0.1 ports (transaction pooling, same pool
size), runs pgbench with the weighted scripts of ``SCRIPTS`` (90 % reads an app repeats, keys drawn
from Zipf distributions; 9.5 % "cold" writes to predictions and users, tables no hot read joins)
against the four targets *interleaved* (target order rotated every round), each run accompanied by
a second, rate-limited pgbench (``--hot-write-rate``, default 5 per second) that edits ``jobs`` and
``matches`` (tables every hot read joins) at a fixed rate, measures the proxies' CPU per 1,000
transactions, reads the cache's own counters from
the agent (``GET /api/cache``, else ``pgsidecar_cache_requests_total`` on ``/metrics``, else
nothing: "n/a") before and after each pgsidecar-cache run, and writes
``tests/bench/results/cache-<timestamp>.json`` and ``tests/bench/results/cache-latest.md``.

Why the hot-table edits run at a fixed rate: pgbench is a closed loop (each client sends its next
transaction as soon as the last one returns), so a write that is a fixed share of the mix happens
in proportion to throughput: 0.5 % of 8,000 TPS is 40 edits per second, and every one of them evicts
every cached read of the table it writes (the cache invalidates per table). The app's edits do not
scale with how fast the database answers reads: recruiters edit a job and the matcher re-scores a
match at human/batch speed. So those edits come from their own open-loop pgbench (``-c 1 -R N``),
and the cold writes stay in the closed-loop mix, where their rate does scale with traffic (every
page view can log a prediction; every login updates users). ``--invalidating-writes`` puts the hot
edits back into the mix as a share (this benchmark's first model) for sensitivity runs.

The issue's targets, cache hit ratio >= 70 % and pgsidecar-cache >= 2x direct PostgreSQL's TPS,
are printed as "met"/"not met" per client count; nothing is asserted (CONVENTIONS habit 14).
Run it by hand::

    python tests/bench/bench_cache.py --quick      # ~1-2 minutes, checks it works
    python tests/bench/bench_cache.py              # full run, about 5 minutes
    python tests/bench/bench_cache.py --hot-write-rate 50   # sensitivity: 10x the edit rate

The proxies, PgBouncer's config and the pgbench scripts live in a temp dir; pgsidecar runs from a
copy of the checkout's code taken at start, so edits made meanwhile do not change a run halfway.
It only talks to 127.0.0.1 and stops by itself (bounded loops, subprocess timeouts, proxies stopped
in ``finally``, also on Ctrl-C).

Reuses the machinery of ``bench_pgbench.py`` (Upstream, the proxy classes, run_pgbench, Supervisor).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench is not a package

from bench_pgbench import (  # noqa: E402
    DEFAULT_DSN,
    RE_ABORTED,
    RE_FAILED,
    RE_LAT,
    RE_TPS,
    RE_TX,
    REPO_ROOT,
    RESULTS_DIR,
    PgBouncer,
    PgSidecar,
    Proxy,
    Supervisor,
    Upstream,
    fmt,
    git_commit,
    log,
    median_or_none,
    parse_scripts,
    run_pgbench,
)

CACHE_DB = "pgsidecar_bench_cache"
SCHEMA_VERSION = 1  # bump when the schema or the data generator changes (--skip-init then refills)
TARGETS = ("direct", "pgsidecar-cache", "pgsidecar-nocache", "pgbouncer")
PROXIES = ("pgsidecar-cache", "pgsidecar-nocache", "pgbouncer")
TABLES = ("users", "companies", "jobs", "resumes", "matches", "predictions")
# The tables the mix reads: the cache's triggers go on these only by default, as the README
# advises (a trigger's NOTIFY makes PostgreSQL commit its writes one at a time, and nothing here
# reads users or predictions through the cache). --trigger-tables puts them elsewhere too.
READ_TABLES = ("companies", "jobs", "resumes", "matches")
# the cache's targets (issue 4)
TARGET_HIT_RATIO = 0.70
TARGET_SPEEDUP = 2.0

# Rows per table: a small recruiter site, sized so a run on 2 cores spends its time in queries,
# not in I/O (everything fits in shared_buffers). predictions grows with the run (INSERTs);
# extra rows are deleted again before the next run.
SIZES = {"users": 10_000, "companies": 500, "jobs": 5_000, "resumes": 20_000, "matches": 100_000,
         "predictions": 50_000}
ZIPF_S = 1.1  # skew of the hot keys: with s = 1.1 the 1 % most-read keys take ~60-70 % of the reads

SKILLS = ("python", "sql", "java", "javascript", "typescript", "go", "rust", "c++", "c#", "ruby", "php",
          "kotlin", "swift", "scala", "r", "matlab", "aws", "azure", "gcp", "docker", "kubernetes",
          "terraform", "linux", "git", "postgresql", "mysql", "mongodb", "redis", "kafka", "spark",
          "hadoop", "airflow", "pandas", "numpy", "pytorch", "tensorflow", "scikit-learn", "react",
          "angular", "vue", "node.js", "django", "flask", "spring", "graphql", "rest", "ci/cd", "agile",
          "excel", "tableau")
_SKILL_ARRAY = "ARRAY[" + ",".join(f"'{s}'" for s in SKILLS) + "]"


def _zipf(var: str, n: int, seed: int) -> str:
    """``\\set var`` to a key in 1..n drawn from Zipf(ZIPF_S), the hot keys scattered over the id
    range by a fixed permutation (the same hot set in every run and for every target)."""
    return f"\\set {var} permute(random_zipfian(1, {n}, {ZIPF_S}) - 1, {n}, {seed}) + 1\n"


# name -> (weight in the main closed-loop mix, "read"/"write", pgbench script). One statement per
# script, one script per transaction; pgbench picks a script per transaction by weight (its share is
# weight / sum of weights: 9,000 reads + 950 cold writes = 9,950 by default, i.e. 90.5 % reads and
# 9.5 % writes). rescore_match and edit_job have weight 0 here: they run in the fixed-rate writer
# (DEFAULT_HOT_WRITE_RATE, below), unless --invalidating-writes puts them back into the mix.
SCRIPTS: dict[str, tuple[int, str, str]] = {
    # a candidate's dashboard: their resume's best matches, with the job and its company
    "resume_matches": (4000, "read", _zipf("rid", SIZES["resumes"], 11) + (
        "SELECT m.job_id, j.title, c.name AS company, j.location, m.match_score "
        "FROM matches m JOIN jobs j ON j.id = m.job_id JOIN companies c ON c.id = j.company_id "
        "WHERE m.resume_id = :rid ORDER BY m.match_score DESC LIMIT 10;\n")),
    # a job's page, with its company
    "job_page": (3000, "read", _zipf("jid", SIZES["jobs"], 12) + (
        "SELECT j.id, j.title, j.description, j.location, j.salary_min, j.salary_max, j.required_skills, "
        "j.created_at, c.id AS company_id, c.name AS company, c.industry "
        "FROM jobs j JOIN companies c ON c.id = j.company_id WHERE j.id = :jid;\n")),
    # a company's page: how many open jobs it has
    "company_open_jobs": (1500, "read", _zipf("cid", SIZES["companies"], 13) + (
        "SELECT count(*) AS open_jobs FROM jobs WHERE company_id = :cid AND is_active;\n")),
    # a recruiter's search: newest resumes with a skill (GIN index on skills)
    "skill_search": (500, "read", f"\\set sk random_zipfian(1, {len(SKILLS)}, {ZIPF_S})\n" + (
        "SELECT r.id, r.title, r.experience_years FROM resumes r "
        f"WHERE r.skills @> ARRAY[({_SKILL_ARRAY})[:sk]] ORDER BY r.created_at DESC LIMIT 20;\n")),
    # the ML service logs a prediction (tables no hot read joins)
    "insert_prediction": (500, "write", (
        f"\\set uid random(1, {SIZES['users']})\n\\set rid random(1, {SIZES['resumes']})\n"
        f"\\set jid random(1, {SIZES['jobs']})\n\\set score random(0, 1000)\n"
        "INSERT INTO predictions (user_id, resume_id, job_id, model_version, predicted_score) "
        "VALUES (:uid, :rid, :jid, 'v3', :score / 1000.0);\n")),
    # a login
    "user_login": (450, "write", (
        f"\\set uid random(1, {SIZES['users']})\n"
        "UPDATE users SET last_login = now() WHERE id = :uid;\n")),
    # the matcher re-scores a match: invalidates every cached read of matches (fixed-rate writer)
    "rescore_match": (0, "write", (
        f"\\set mid random(1, {SIZES['matches']})\n\\set score random(0, 1000)\n"
        "UPDATE matches SET match_score = :score / 1000.0 WHERE id = :mid;\n")),
    # a recruiter edits a job: invalidates every cached read of jobs (all hot reads join jobs;
    # fixed-rate writer)
    "edit_job": (0, "write", (
        f"\\set jid random(1, {SIZES['jobs']})\n\\set raise random(0, 20000)\n"
        "UPDATE jobs SET salary_max = salary_min + :raise, updated_at = now() WHERE id = :jid;\n")),
}
assert sum(w for w, _, _ in SCRIPTS.values()) == 9_950
INVALIDATING = ("rescore_match", "edit_job")  # the writes that evict cached reads ("hot edits")
DEFAULT_INVALIDATING = sum(SCRIPTS[n][0] for n in INVALIDATING)  # 0: none in the closed-loop mix
# Hot edits per second, from their own open-loop pgbench (-c 1 -R N) next to every run, rescore_match
# and edit_job with equal weights: a few recruiters editing jobs and a matcher re-scoring matches at
# human speed, whatever the read throughput. 0 = no writer.
DEFAULT_HOT_WRITE_RATE = 5.0


def set_invalidating_writes(weight: int) -> None:
    """Sensitivity runs only (``--invalidating-writes N``): put rescore_match and edit_job back
    into the closed-loop mix with weight N / 2 each, on top of the 9,950 of reads and cold writes
    (N = 50 is the original proportional model exactly: 0.5 % of 10,000, 9,000 reads, 950 cold
    writes)."""
    half = weight // 2
    for name in INVALIDATING:
        _w, kind, text = SCRIPTS[name]
        SCRIPTS[name] = (half, kind, text)


# --------------------------------------------------------------------------- database


SCHEMA_SQL = """
DROP TABLE IF EXISTS predictions, matches, resumes, jobs, companies, users, bench_info CASCADE;
CREATE TABLE bench_info (schema_version int NOT NULL, sizes jsonb NOT NULL, filled_at timestamptz NOT NULL);
CREATE TABLE users (
    id serial PRIMARY KEY, email text NOT NULL, name text NOT NULL,
    created_at timestamptz NOT NULL, last_login timestamptz);
CREATE TABLE companies (
    id serial PRIMARY KEY, name text NOT NULL, industry text NOT NULL, location text NOT NULL,
    created_at timestamptz NOT NULL);
CREATE TABLE jobs (
    id serial PRIMARY KEY, company_id int NOT NULL REFERENCES companies(id), title text NOT NULL,
    description text NOT NULL, location text NOT NULL, salary_min int NOT NULL, salary_max int NOT NULL,
    required_skills text[] NOT NULL, is_active boolean NOT NULL, created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL);
CREATE TABLE resumes (
    id serial PRIMARY KEY, user_id int NOT NULL REFERENCES users(id), title text NOT NULL,
    content text NOT NULL, skills text[] NOT NULL, experience_years int NOT NULL,
    created_at timestamptz NOT NULL);
CREATE TABLE matches (
    id serial PRIMARY KEY, resume_id int NOT NULL REFERENCES resumes(id),
    job_id int NOT NULL REFERENCES jobs(id), match_score real NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE predictions (
    id bigserial PRIMARY KEY, user_id int NOT NULL REFERENCES users(id),
    resume_id int NOT NULL REFERENCES resumes(id), job_id int NOT NULL REFERENCES jobs(id),
    model_version text NOT NULL, predicted_score real NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
"""

# Deterministic (setseed) fake data; skills are drawn skewed (a few skills in most resumes).
FILL_SQL = """
SELECT setseed(0.42);
INSERT INTO users (email, name, created_at, last_login)
SELECT 'user' || g || '@example.com', 'User ' || g, now() - random() * interval '730 days',
       now() - random() * interval '30 days'
FROM generate_series(1, {users}) AS g;
INSERT INTO companies (name, industry, location, created_at)
SELECT 'Company ' || g, (ARRAY['software','finance','health','retail','energy','media'])[1 + g % 6],
       (ARRAY['Berlin','London','Paris','Remote','New York','Madrid','Warsaw'])[1 + g % 7],
       now() - random() * interval '3650 days'
FROM generate_series(1, {companies}) AS g;
INSERT INTO jobs (company_id, title, description, location, salary_min, salary_max, required_skills,
                  is_active, created_at, updated_at)
SELECT 1 + floor(random() * {companies})::int,
       (ARRAY['Backend Engineer','Data Scientist','Frontend Developer','DevOps Engineer',
              'Product Manager','ML Engineer','QA Engineer','Data Engineer'])[1 + g % 8] || ' #' || g,
       'Job ' || g || ': ' || repeat(md5(g::text) || ' ', 20),
       (ARRAY['Berlin','London','Paris','Remote','New York','Madrid','Warsaw'])[1 + g % 7],
       40000 + (g % 50) * 1000, 60000 + (g % 50) * 1500,
       ARRAY(SELECT DISTINCT s.k[1 + floor({nskills} * random() ^ 2)::int]
             FROM (SELECT {skills} AS k) AS s, generate_series(1, 2 + g % 4) WHERE g > 0),
       random() < 0.8, now() - random() * interval '365 days', now() - random() * interval '30 days'
FROM generate_series(1, {jobs}) AS g;
INSERT INTO resumes (user_id, title, content, skills, experience_years, created_at)
SELECT 1 + floor(random() * {users})::int, 'Resume ' || g, repeat(md5(g::text) || ' ', 30),
       ARRAY(SELECT DISTINCT s.k[1 + floor({nskills} * random() ^ 2)::int]
             FROM (SELECT {skills} AS k) AS s, generate_series(1, 3 + g % 6) WHERE g > 0),
       g % 25, now() - random() * interval '730 days'
FROM generate_series(1, {resumes}) AS g;
INSERT INTO matches (resume_id, job_id, match_score, created_at)
SELECT 1 + floor(random() * {resumes})::int, 1 + floor(random() * {jobs})::int, random(),
       now() - random() * interval '365 days'
FROM generate_series(1, {matches}) AS g;
INSERT INTO predictions (user_id, resume_id, job_id, model_version, predicted_score, created_at)
SELECT 1 + floor(random() * {users})::int, 1 + floor(random() * {resumes})::int,
       1 + floor(random() * {jobs})::int, 'v2', random(), now() - random() * interval '90 days'
FROM generate_series(1, {predictions}) AS g;
"""

# the seed's indexes (5.3), plus what the workload's lookups by foreign key need
INDEX_SQL = """
CREATE INDEX idx_user_email ON users(email);
CREATE INDEX idx_user_created ON users(created_at DESC);
CREATE INDEX idx_resume_user_id ON resumes(user_id);
CREATE INDEX idx_resume_skills ON resumes USING GIN(skills);
CREATE INDEX idx_resume_created ON resumes(created_at DESC);
CREATE INDEX idx_job_company ON jobs(company_id);
CREATE INDEX idx_job_created ON jobs(created_at DESC);
CREATE INDEX idx_match_resume_job ON matches(resume_id, job_id);
CREATE INDEX idx_match_score ON matches(match_score DESC);
CREATE INDEX idx_prediction_user ON predictions(user_id);
"""


def prepare_database(up: Upstream, skip_init: bool, source_dir: Path,
                     trigger_tables: tuple[str, ...]) -> dict[str, Any]:
    """Create and fill CACHE_DB (unless --skip-init finds it filled by this schema version), trim
    predictions back to its initial rows, vacuum, install the cache's triggers on
    ``trigger_tables`` and remove them from the other TABLES (--trigger-tables)."""
    with psycopg.connect(up.dsn(up.admin_db), autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (CACHE_DB,)).fetchone()
        server_version = conn.execute("SHOW server_version").fetchone()[0]
        max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])
        if not exists:
            log(f"creating database {CACHE_DB}")
            conn.execute(f'CREATE DATABASE "{CACHE_DB}"')
    initialised = False
    with psycopg.connect(up.dsn(CACHE_DB), autocommit=True, connect_timeout=10) as conn:
        info = None
        try:
            info = conn.execute("SELECT schema_version, sizes FROM bench_info").fetchone()
        except psycopg.Error:
            pass
        if skip_init and info and info[0] == SCHEMA_VERSION and info[1] == SIZES:
            log(f"reusing the tables of {CACHE_DB} (--skip-init)")
        else:
            log(f"filling {CACHE_DB}: " + ", ".join(f"{k} {v:,}" for k, v in SIZES.items()))
            t0 = time.monotonic()
            with conn.transaction():
                conn.execute(SCHEMA_SQL)
                conn.execute(FILL_SQL.format(**SIZES, skills=_SKILL_ARRAY, nskills=len(SKILLS)))
                conn.execute(INDEX_SQL)
                conn.execute("INSERT INTO bench_info VALUES (%s, %s::jsonb, now())", (SCHEMA_VERSION, json.dumps(SIZES)))
            initialised = True
            log(f"filled in {time.monotonic() - t0:.1f}s")
        # every run starts from the same rows: predictions back to its initial size
        conn.execute("DELETE FROM predictions WHERE id > %s", (SIZES["predictions"],))
        conn.execute("VACUUM ANALYZE")
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]

    def cache_cli(command: str, tables: list[str]) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "cache", command, *tables, "--upstream", up.dsn(CACHE_DB)],
            cwd=source_dir, env=up.pg_env(), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"pgsidecar cache {command} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        log(done.stdout.strip())
        return done

    # --trigger-tables: the tables left out carry no trigger (their reads bypass the cache, their
    # writes NOTIFY nothing); the trigger every cached table needs (cache.require_triggers). Both
    # the way a user does it.
    left_out = [table for table in TABLES if table not in trigger_tables]
    if left_out:
        cache_cli("remove-triggers", left_out)
    proc = cache_cli("install-triggers", list(trigger_tables))
    return {"server_version": server_version, "max_connections": max_conn, "initialised": initialised,
            "rows": counts, "database_bytes": db_bytes, "triggers": proc.stdout.strip(),
            "trigger_tables": list(trigger_tables)}


# --------------------------------------------------------------------------- proxies


class PgSidecarCache(PgSidecar):
    """pgsidecar caching every cacheable SELECT (statistics on, as by default)."""

    name = "pgsidecar-cache"
    extra_env = {"PGSIDECAR_CACHE__MODE": "all"}


class PgSidecarNoCache(PgSidecar):
    """The same pgsidecar with the result cache off: what the proxy costs without it."""

    name = "pgsidecar-nocache"
    extra_env = {"PGSIDECAR_CACHE__MODE": "off"}


def freeze_source(dest: Path) -> Path:
    """Copy the checkout's Python packages to ``dest``: every pgsidecar of the run (and every
    restart) runs the code as it was at start, even if someone edits the checkout meanwhile."""
    for pkg in ("agent", "proxy", "config", "graphql_gateway"):
        if (REPO_ROOT / pkg).is_dir():
            shutil.copytree(REPO_ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


# --------------------------------------------------------------------------- cache counters

RE_METRIC = re.compile(r'^(pgsidecar_cache_[a-z_]+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$', re.M)
RE_LABEL = re.compile(r'(\w+)="([^"]*)"')
# /metrics family -> (key in the counters, label that names the part)
METRIC_BREAKDOWNS = {
    "pgsidecar_cache_bypasses_total": ("bypasses", "reason"),
    "pgsidecar_cache_invalidations_total": ("invalidations", "source"),
    "pgsidecar_cache_evictions_total": ("evictions", "reason"),
    "pgsidecar_cache_rejected_total": ("rejected", "reason"),
}


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def read_cache_counters(http_port: int) -> dict[str, Any] | None:
    """The cache's cumulative counters as the sidecar reports them: ``GET /api/cache`` (hit, miss,
    bypass, and the invalidation/eviction/bypass breakdowns), else ``pgsidecar_cache_requests_total``
    on ``/metrics``; None when the sidecar offers neither (then the hit ratio is "n/a")."""
    status, body = _http_get(f"http://127.0.0.1:{http_port}/api/cache?limit=1")
    if status == 200:
        try:
            doc = json.loads(body)
            req = doc["requests"]
            out: dict[str, Any] = {"source": "/api/cache", "hit": int(req["hit"]), "miss": int(req["miss"]),
                                   "bypass": int(req.get("bypass", 0))}
            for k in ("bypasses", "invalidations", "evictions", "rejected"):
                if isinstance(doc.get(k), dict):
                    out[k] = {str(n): int(v) for n, v in doc[k].items()}
            for k in ("entries", "bytes", "stores"):
                if isinstance(doc.get(k), int):
                    out[k] = doc[k]
            return out
        except (ValueError, KeyError, TypeError):
            pass  # not the shape we know: try the metrics
    status, body = _http_get(f"http://127.0.0.1:{http_port}/metrics")
    if status == 200:
        requests: dict[str, int] = {}
        parts: dict[str, dict[str, int]] = {}
        plain: dict[str, int] = {}
        for name, labels, value in RE_METRIC.findall(body.decode(errors="replace")):
            lab = dict(RE_LABEL.findall(labels or ""))
            if name == "pgsidecar_cache_requests_total" and "result" in lab:
                requests[lab["result"]] = requests.get(lab["result"], 0) + int(float(value))
            elif name in METRIC_BREAKDOWNS:
                key, label = METRIC_BREAKDOWNS[name]
                if label in lab:
                    d = parts.setdefault(key, {})
                    d[lab[label]] = d.get(lab[label], 0) + int(float(value))
            elif name in ("pgsidecar_cache_entries", "pgsidecar_cache_bytes", "pgsidecar_cache_stores_total"):
                k = name.removeprefix("pgsidecar_cache_").removesuffix("_total")
                plain[k] = plain.get(k, 0) + int(float(value))
        if "hit" in requests and "miss" in requests:
            return {"source": "/metrics", "hit": requests["hit"], "miss": requests["miss"],
                    "bypass": requests.get("bypass", 0), **parts, **plain}
    return None


def counter_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if not before or not after or before["source"] != after["source"]:
        return None
    out: dict[str, Any] = {"source": after["source"]}
    for k in ("hit", "miss", "bypass", "stores"):
        if k in after and k in before:
            out[k] = after[k] - before[k]
    for k in ("bypasses", "invalidations", "evictions", "rejected"):
        if k in after and k in before:
            d = {n: after[k][n] - before[k].get(n, 0) for n in after[k]}
            out[k] = {n: v for n, v in d.items() if v}
    for k in ("entries", "bytes"):
        if k in after:
            out[k + "_after"] = after[k]
    looked = out["hit"] + out["miss"]
    out["hit_ratio"] = round(out["hit"] / looked, 4) if looked else None
    out["hit_ratio_by_outcome"] = outcome_ratio(out)
    return out


def outcome_ratio(c: dict[str, Any]) -> float | None:
    """hits / (hits + stores + rejections): every cacheable miss that completes is either stored
    or rejected, so this counts each miss once even where the sidecar looks a statement up twice
    (then its ``miss`` counter runs ahead of its stores). None without those counters."""
    if "stores" not in c:
        return None
    done = c["hit"] + c["stores"] + sum((c.get("rejected") or {}).values())
    return round(c["hit"] / done, 4) if done else None


# --------------------------------------------------------------------------- runs


def write_scripts(workdir: Path) -> tuple[list[str], list[str]]:
    """The pgbench arguments of the closed-loop mix (``-M simple -f FILE@WEIGHT ...``, scripts of
    weight 0 left out) and of the hot-edit writer's scripts (INVALIDATING, equal weights)."""
    main = ["-M", "simple"]
    for name, (weight, _kind, text) in SCRIPTS.items():
        path = workdir / f"{name}.sql"
        path.write_text(text)
        path.chmod(0o644)
        if weight:
            main += ["-f", f"{path}@{weight}"]
    writer = ["-M", "simple"]
    for name in INVALIDATING:
        writer += ["-f", f"{workdir / f'{name}.sql'}@1"]
    return main, writer


RE_LAG = re.compile(r"^rate limit schedule lag: avg ([0-9.]+) \(max ([0-9.]+)\) ms", re.M)


class HotWriter:
    """The open-loop pgbench of the hot edits, run next to one main pgbench run: ``-c 1 -j 1 -R RATE
    -T DURATION -n -M simple`` over the writer scripts, against the same target (so a proxy sees the
    edits as the app's would pass through it). Output goes to files, not pipes (a failing writer's
    error lines must never block it)."""

    def __init__(self, up: Upstream, port: int, writer_args: list[str], rate: float, duration: int,
                 workdir: Path) -> None:
        self.rate = rate
        self.duration = duration
        self.cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", up.user, "-c", "1", "-j", "1",
                    "-R", f"{rate:g}", "-T", str(duration), "-n", *writer_args, CACHE_DB]
        self.out_path, self.err_path = workdir / "writer.out", workdir / "writer.err"
        self._out = self.out_path.open("w")
        self._err = self.err_path.open("w")
        self.proc = subprocess.Popen(self.cmd, env=up.pg_env(), stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    def finish(self) -> dict[str, Any]:
        """Wait for the writer (it stops by itself after DURATION s; killed at DURATION + 60) and
        parse what it did: its own TPS, latency, schedule lag, transactions, failures, errors."""
        timed_out = False
        try:
            rc = self.proc.wait(timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            rc = self.proc.wait(timeout=10)
        self._out.close()
        self._err.close()
        out = self.out_path.read_text(errors="replace")
        err = self.err_path.read_text(errors="replace")
        text = out + "\n" + err

        def grab(rx: re.Pattern[str], conv: Any) -> Any:
            m = rx.search(text)
            return conv(m.group(1)) if m else None

        tx, failed, aborted = grab(RE_TX, int), grab(RE_FAILED, int), RE_ABORTED.findall(text)
        tps = grab(RE_TPS, float)
        errors: list[str] = []
        if timed_out:
            errors.append(f"writer pgbench timed out after {self.duration + 60}s")
        elif rc != 0:
            errors.append(f"writer pgbench exit code {rc}")
        if aborted:
            errors.append("writer client aborted")
        if failed:
            errors.append(f"writer: {failed} failed transactions")
        if tps is None and not timed_out:
            errors.append("no tps line in the writer's pgbench output")
        lag = RE_LAG.search(text)
        res: dict[str, Any] = {
            "cmd": " ".join(self.cmd), "returncode": rc, "rate": self.rate, "tps": tps,
            "latency_ms": grab(RE_LAT, float), "transactions": tx, "failed_transactions": failed,
            "aborted_clients": len(aborted),
            "schedule_lag_ms": float(lag.group(1)) if lag else None,
            "schedule_lag_max_ms": float(lag.group(2)) if lag else None,
            "ok": not errors, "errors": errors, "per_script": parse_scripts(out),
        }
        if errors:
            res["pgbench_stderr"] = list(dict.fromkeys(re.sub(r"client \d+", "client N", ln)
                                                       for ln in err.splitlines() if ln.strip()))[:15]
        return res


def machine_cpu() -> tuple[float, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, sum(t)


def one_run(up: Upstream, port: int, workload: list[str], clients: int, duration: int,
            proxy: Proxy | None, writer_args: list[str], hot_write_rate: float, workdir: Path) -> dict[str, Any]:
    """One main pgbench run and, when ``hot_write_rate`` > 0, the hot-edit writer next to it (started
    just before, same duration, same target). TPS, latency and failures in the result are the main
    run's; the writer's are under ``writer``. CPU per 1,000 transactions counts both (the writer adds
    ``rate`` x ``duration`` transactions: 50 per 10 s run by default)."""
    counters0 = read_cache_counters(proxy.http_port) if isinstance(proxy, PgSidecarCache) else None
    busy0, total0 = machine_cpu()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # pgbench, once it is reaped
    pcpu0 = proxy.cpu_seconds() if proxy else None
    writer = HotWriter(up, port, writer_args, hot_write_rate, duration, workdir) if hot_write_rate > 0 else None
    try:
        r = run_pgbench(up, port, workload, clients, duration, proxy, database=CACHE_DB)
    finally:
        w = writer.finish() if writer else None
    pcpu1 = proxy.cpu_seconds() if proxy else None
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, total1 = machine_cpu()
    r["writer"] = w
    if w and not w["ok"]:
        # without its edits the run is not the workload (the hit ratio would be flattered): not ok
        r["errors"] = r["errors"] + w["errors"]
        r["ok"] = False
    r["machine_cpu_busy"] = round((busy1 - busy0) / (total1 - total0), 3) if total1 > total0 else None
    main_tx = r.get("transactions")
    tx = (main_tx or 0) + ((w or {}).get("transactions") or 0) if main_tx else None
    r["transactions_with_writer"] = tx
    # CPU seconds per 1,000 transactions (main + writer) of the proxy, of the whole machine (every
    # core, every process: also whatever else runs on the host) and of pgbench itself (both
    # processes); the rest of the machine's is mostly PostgreSQL
    if pcpu0 is not None and pcpu1 is not None:
        r["proxy_cpu_s"] = round(pcpu1 - pcpu0, 3)
        r["proxy_cpu_s_per_1k_tx"] = round((pcpu1 - pcpu0) / tx * 1000, 4) if tx else None
    r["machine_cpu_s_per_1k_tx"] = round((busy1 - busy0) / tx * 1000, 4) if tx else None
    pgbench_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    r["pgbench_cpu_s_per_1k_tx"] = round(pgbench_s / tx * 1000, 4) if tx else None
    # hot edits per second actually made: the writer's plus any the main mix made (sensitivity runs)
    main_hot = sum(s["tps"] for s in r.get("per_script") or [] if s["script"] in INVALIDATING and s.get("tps"))
    r["hot_edits_per_s"] = round(((w or {}).get("tps") or 0.0) + main_hot, 2) if main_tx else None
    r["cache"] = None
    if isinstance(proxy, PgSidecarCache):
        r["cache"] = counter_delta(counters0, read_cache_counters(proxy.http_port))
    return r


# --------------------------------------------------------------------------- summary / output


def mix_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mix pgbench actually ran (transactions per script, all runs together): of the main
    closed-loop runs, and of the hot-edit writers (counted apart)."""
    per: dict[str, int] = {}
    for r in runs:
        for s in r.get("per_script") or []:
            per[s["script"]] = per.get(s["script"], 0) + (s["transactions"] or 0)
    writer: dict[str, int] = {}
    for r in runs:
        for s in (r.get("writer") or {}).get("per_script") or []:
            writer[s["script"]] = writer.get(s["script"], 0) + (s["transactions"] or 0)
    total = sum(per.values())
    if not total:
        return {}
    reads = sum(v for k, v in per.items() if SCRIPTS.get(k, (0, ""))[1] == "read")
    wtotal = sum(writer.values())
    return {"transactions": total, "read_share": round(reads / total, 4),
            "per_script_share": {k: round(v / total, 4) for k, v in per.items()},
            "writer_transactions": wtotal, "writer_per_script": writer,
            "read_share_with_writer": round(reads / (total + wtotal), 4)}


def summarise(runs: list[dict[str, Any]], clients_list: list[int], targets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for c in clients_list:
        row: dict[str, Any] = {"clients": c, "targets": {}}
        for t in targets:
            rs = [r for r in runs if r["clients"] == c and r["target"] == t]
            if not rs:
                continue
            ok = [r for r in rs if r["ok"]]
            row["targets"][t] = {
                "runs": len(rs), "ok_runs": len(ok), "failed": len(ok) < len(rs),
                "tps_median": median_or_none([r["tps"] for r in ok]),
                "tps_rounds": [r["tps"] for r in rs],
                "latency_ms_median": median_or_none([r["latency_ms"] for r in ok]),
                "failed_transactions": sum(r["failed_transactions"] or 0 for r in rs),
                "aborted_clients": sum(r["aborted_clients"] for r in rs),
                "errors": sorted({e for r in rs for e in r["errors"]}),
                "stderr_sample": list(dict.fromkeys(ln for r in rs for ln in r.get("pgbench_stderr", [])[:3]))[:3],
                "cpu_s_per_1k_tx_median": median_or_none([r["proxy_cpu_s_per_1k_tx"] for r in ok]),
                "machine_cpu_busy_median": median_or_none([r.get("machine_cpu_busy") for r in rs]),
                "machine_cpu_s_per_1k_tx_median": median_or_none([r.get("machine_cpu_s_per_1k_tx") for r in ok]),
                "pgbench_cpu_s_per_1k_tx_median": median_or_none([r.get("pgbench_cpu_s_per_1k_tx") for r in ok]),
                "hot_edits_per_s_median": median_or_none([r.get("hot_edits_per_s") for r in rs]),
                "writer": summarise_writer([r.get("writer") for r in rs]),
            }
        tps = {t: s["tps_median"] for t, s in row["targets"].items() if not s["failed"] and s["tps_median"]}
        cached = tps.get("pgsidecar-cache")
        row["ratio_cache_vs_direct"] = round(cached / tps["direct"], 3) if cached and "direct" in tps else None
        row["ratio_cache_vs_nocache"] = (round(cached / tps["pgsidecar-nocache"], 3)
                                         if cached and "pgsidecar-nocache" in tps else None)
        row["ratio_cache_vs_pgbouncer"] = (round(cached / tps["pgbouncer"], 3)
                                           if cached and "pgbouncer" in tps else None)
        # hit ratio over all rounds: sum of hits / sum of (hits + misses), from the sidecar's counters
        deltas = [r["cache"] for r in runs if r["clients"] == c and r["target"] == "pgsidecar-cache"]
        row["cache"] = None
        if deltas and all(deltas):
            agg: dict[str, Any] = {"source": deltas[0]["source"]}
            for k in ("hit", "miss", "bypass", "stores"):
                if all(k in d for d in deltas):
                    agg[k] = sum(d[k] for d in deltas)
            for k in ("bypasses", "invalidations", "evictions", "rejected"):
                merged: dict[str, int] = {}
                for d in deltas:
                    for n, v in (d.get(k) or {}).items():
                        merged[n] = merged.get(n, 0) + v
                if merged:
                    agg[k] = merged
            looked = agg["hit"] + agg["miss"]
            agg["hit_ratio"] = round(agg["hit"] / looked, 4) if looked else None
            agg["hit_ratio_by_outcome"] = outcome_ratio(agg)
            agg["hit_ratio_rounds"] = [d["hit_ratio"] for d in deltas]
            agg["entries_after_last"] = deltas[-1].get("entries_after")
            row["cache"] = agg
        hr = row["cache"]["hit_ratio"] if row["cache"] else None
        ratio = row["ratio_cache_vs_direct"]
        row["target_hit_ratio_met"] = None if hr is None else hr >= TARGET_HIT_RATIO
        row["target_speedup_met"] = None if ratio is None else ratio >= TARGET_SPEEDUP
        rows.append(row)
    return rows


def summarise_writer(ws: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The hot-edit writers of one target's rounds: median TPS, latency and schedule lag; total
    transactions and failures (counted apart from the main run's)."""
    ws = [w for w in ws if w]
    if not ws:
        return None
    return {
        "runs": len(ws), "ok_runs": sum(w["ok"] for w in ws), "rate": ws[0]["rate"],
        "tps_median": median_or_none([w["tps"] for w in ws]),
        "latency_ms_median": median_or_none([w["latency_ms"] for w in ws]),
        "schedule_lag_ms_median": median_or_none([w["schedule_lag_ms"] for w in ws]),
        "transactions": sum(w["transactions"] or 0 for w in ws),
        "failed_transactions": sum(w["failed_transactions"] or 0 for w in ws),
        "aborted_clients": sum(w["aborted_clients"] for w in ws),
        "errors": sorted({e for w in ws for e in w["errors"]}),
        "stderr_sample": list(dict.fromkeys(ln for w in ws for ln in w.get("pgbench_stderr", [])[:3]))[:3],
    }


def verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("met" if v else "not met")


def pct_or_na(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.1f} %"


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], targets: list[str]) -> str:
    a = meta["args"]
    mix = meta.get("mix") or {}
    rate = float(a["hot_write_rate"])
    lines = [
        f"# Result cache: direct vs pgsidecar (cache / no cache) vs PgBouncer — {meta['started']}",
        "",
        f"Host: {meta['host']['cpus']} CPUs, {meta['host']['platform']}; PostgreSQL {meta['db']['server_version']}, "
        + (f"{meta['pgbouncer_version']}, " if meta.get("pgbouncer_version") else "")
        + f"pgsidecar @ {meta.get('git_commit', '?')}. Load average at start {meta['host']['loadavg_start'][0]:.2f}, "
        f"at end {meta['host'].get('loadavg_end', [float('nan')])[0]:.2f}.",
        f"{a['duration']} s per run, {a['rounds']} interleaved rounds (target order rotated), `-j 2`, `-M simple`, "
        f"pool size {a['pool_size']} (every proxy, transaction mode, no overflow); {a['warmup']} s unrecorded "
        "warm-up per target. pgbench, PostgreSQL and the proxies share the machine's cores.",
        f"Database `{CACHE_DB}`: " + ", ".join(f"{k} {v:,}" for k, v in meta["db"]["rows"].items())
        + f" rows ({meta['db']['database_bytes'] / 1e6:.0f} MB); cache triggers on "
        + ", ".join(meta["db"]["trigger_tables"])
        + " (they also fire, and NOTIFY, for the targets that do not cache).",
        "",
        "## Workload model",
        "",
        f"Two pgbench processes per run, against the same target. **Main** (closed loop, `-c CLIENTS -j 2 -T "
        f"{a['duration']}`): the reads and the *cold* writes (INSERT predictions, UPDATE users.last_login: tables "
        "no hot read joins), by weight; its TPS is the run's TPS. **Hot-edit writer** "
        + ((f"(open loop, `-c 1 -R {rate:g} -T {a['duration']} -M simple`): `rescore_match` and `edit_job` (equal "
            "weights), the writes to `matches` and `jobs`, which every hot read joins, at a fixed rate of "
            f"**{rate:g} edits per second**; its transactions are counted apart (table below), not in the main TPS.")
           if rate else "(`rescore_match` and `edit_job`, the writes to `matches` and `jobs`, which every hot read "
                        "joins, at a fixed rate): **none in this run** (`--hot-write-rate 0`)."),
        "",
        "Why: pgbench is a closed loop (each client sends its next transaction as soon as the last one "
        "returns), so a write that is a fixed share of the mix happens in proportion to throughput: 0.5 % of "
        "8,000 TPS is 40 edits per second, and the cache then invalidated per table, so each of them evicted every "
        "cached read of `jobs` or `matches`, i.e. most of the cache. In the app, edits do not scale with how "
        "fast the database answers reads: recruiters edit a job and the matcher re-scores a match at human "
        "speed, whatever the page-view rate. The cold writes stay proportional (a page view can log a "
        "prediction, a login updates users) and touch no table a hot read joins. The proportional model "
        "(`--hot-write-rate 0 --invalidating-writes 50`, this benchmark's first version) is kept as a sensitivity "
        "run: it measured 29-44 % hits and 0.9-1.1× direct at 0.5 % (≈ 16-52 edits/s), 46-61 % / 1.2-1.5× at "
        "0.1 % (≈ 6-7/s), 90-92 % / 1.2-2.0× with no hot edits (tests/bench/README.md).",
        "",
        "| script | kind | weight | share of the main mix run | keys |",
        "|---|---|---|---|---|",
    ]
    share = mix.get("per_script_share", {})
    wshare = mix.get("writer_per_script", {})
    total_w = sum(w for w, _, _ in SCRIPTS.values())
    for name, (weight, kind, text) in SCRIPTS.items():
        keys = "; ".join(ln[5:].strip() for ln in text.splitlines() if ln.startswith("\\set"))
        if name in INVALIDATING:
            where = (f"{weight / total_w:.2%} of the main mix (`--invalidating-writes`) + " if weight else "") + (
                f"writer, {rate / len(INVALIDATING):g}/s ({wshare.get(name, 0):,} tx run)" if rate else "no writer")
            lines.append(f"| {name} | hot write | {where} | {pct_or_na(share.get(name)) if weight else '–'} "
                         f"| `{keys}` |")
        else:
            lines.append(f"| {name} | {kind} | {weight} ({weight / total_w:.2%}) | {pct_or_na(share.get(name))} "
                         f"| `{keys}` |")
    lines += [
        "",
        f"Main mix: reads {pct_or_na(mix.get('read_share'))} of its transactions (with the writer's: "
        f"{pct_or_na(mix.get('read_share_with_writer'))}). Zipf s = {ZIPF_S} over each read key range (hot keys "
        "scattered by a fixed `permute`); write keys uniform. An edit of matches or jobs invalidates the cached "
        "reads of that table that reference a column it sets (`cache.column_invalidation`) and read a row it "
        "changed (`cache.row_invalidation`; both the default): rescore_match evicts the resume_matches of the "
        "match's resume, edit_job (salary_max, updated_at) the job_page of that job; company_open_jobs and "
        "skill_search read neither column."
        + ("" if a["invalidating_writes"] == DEFAULT_INVALIDATING and rate == DEFAULT_HOT_WRITE_RATE
           and not a.get("cache_setting") else
           " **Sensitivity run**: "
           + "; ".join(x for x in (
               ", ".join(f"`cache.{x}`" for x in a.get("cache_setting") or ()) + " for pgsidecar-cache"
               if a.get("cache_setting") else "",
               f"`--hot-write-rate {rate:g}` (the workload's is {DEFAULT_HOT_WRITE_RATE:g})"
               if rate != DEFAULT_HOT_WRITE_RATE else "",
               f"`--invalidating-writes {a['invalidating_writes']}` (hot edits also in the closed-loop mix, "
               f"weight {a['invalidating_writes']} next to 9,950: edits scale with throughput; the workload's "
               f"is {DEFAULT_INVALIDATING})" if a["invalidating_writes"] != DEFAULT_INVALIDATING else "") if x)
           + "; not the workload's figures."),
        "",
        "## Throughput",
        "",
        "TPS = median over rounds of pgbench's \"tps (without initial connection time)\"; latency = median of "
        "pgbench's average latency. Ratios are of median TPS. Hit ratio = hits / (hits + misses) over all "
        "rounds, read from the sidecar itself (`" + (rows[0]["cache"]["source"] if rows and rows[0].get("cache")
                                                     else "n/a") + "`); bypasses (writes, mostly) not counted.",
        "",
        "| clients | " + " | ".join(f"{t} TPS" for t in targets)
        + " | cache / direct | cache / nocache | cache / PgBouncer | hit ratio | "
        + " | ".join(f"{t} lat ms" for t in targets) + " | failures (fail tx / aborted) |",
        "|" + "---|" * (1 + len(targets) + 4 + len(targets) + 1),
    ]
    for row in rows:
        cells = [str(row["clients"])]
        for t in targets:
            s = row["targets"].get(t)
            cells.append("–" if not s else (f"FAIL ({s['runs'] - s['ok_runs']}/{s['runs']})" if s["failed"]
                                             else fmt(s["tps_median"], ".0f")))
        for k in ("ratio_cache_vs_direct", "ratio_cache_vs_nocache", "ratio_cache_vs_pgbouncer"):
            cells.append(fmt(row[k], ".2f"))
        cells.append(pct_or_na(row["cache"]["hit_ratio"] if row["cache"] else None))
        for t in targets:
            s = row["targets"].get(t)
            cells.append(fmt(s["latency_ms_median"], ".2f") if s else "–")
        fails = [f"{t}: {s['failed_transactions']}/{s['aborted_clients']}" for t, s in row["targets"].items()
                 if s["failed_transactions"] or s["aborted_clients"] or s["failed"]]
        cells.append("; ".join(fails) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| clients | " + " | ".join(f"{t} CPU s/1k tx" for t in PROXIES if t in targets)
        + " | CPU s/1k tx: machine / pgbench, per target | machine busy | cache: hits / misses / bypasses "
        "| stores / rejected "
        "| hits / (hits + stores + rejected) | invalidations | evictions |",
        "|" + "---|" * (1 + sum(t in targets for t in PROXIES) + 7),
    ]
    for row in rows:
        cells = [str(row["clients"])]
        for t in PROXIES:
            if t in targets:
                s = row["targets"].get(t)
                cells.append(fmt(s["cpu_s_per_1k_tx_median"], ".3f") if s else "–")
        cells.append(", ".join(f"{t} {fmt(s['machine_cpu_s_per_1k_tx_median'], '.3f')} / "
                               f"{fmt(s['pgbench_cpu_s_per_1k_tx_median'], '.3f')}" for t, s in row["targets"].items()))
        busy = [s["machine_cpu_busy_median"] for s in row["targets"].values() if s["machine_cpu_busy_median"]]
        cells.append(f"{min(busy) * 100:.0f}-{max(busy) * 100:.0f} %" if busy else "–")
        ch = row["cache"]
        if ch:
            cells.append(f"{ch['hit']:,} / {ch['miss']:,} / {ch.get('bypass', 0):,}")
            rejected = ch.get("rejected") or {}
            cells.append(f"{fmt(ch.get('stores'), ',')} / "
                         + (", ".join(f"{k} {v:,}" for k, v in rejected.items()) or "0"))
            cells.append(pct_or_na(ch.get("hit_ratio_by_outcome")))
            cells.append(", ".join(f"{k} {v:,}" for k, v in (ch.get("invalidations") or {}).items()) or "–")
            cells.append(", ".join(f"{k} {v:,}" for k, v in (ch.get("evictions") or {}).items()) or "–")
        else:
            cells += ["n/a"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "CPU = CPU seconds (user+system) per 1,000 transactions (of the main run and the hot-edit writer "
        "together): of the proxy process; of the whole machine "
        "(all cores, every process: pgbench, PostgreSQL, the proxy, and anything else running on the host) "
        "and of pgbench itself, per target; what is left of the machine's after pgbench and the proxy is "
        "mostly PostgreSQL. Machine busy = range over targets of the share of all cores not idle. "
        "hits / (hits + stores + rejected) counts each completed cacheable miss once (stored, or rejected "
        "e.g. as \"stale\": its read raced an invalidation); where it is above the hit ratio, the sidecar "
        "counted some lookups twice (misses > stores + rejected).",
        "",
        "## Hot-edit writer (counted apart from the main TPS)",
        "",
        (f"`pgbench -c 1 -j 1 -R {rate:g} -T {a['duration']} -M simple` over rescore_match and edit_job, next to "
         "every main run, against the same target." if rate else "No writer in this run (`--hot-write-rate 0`).")
        + " TPS, latency and schedule lag (how late pgbench sent an edit behind its Poisson schedule) are "
        "medians over rounds; with `-R` pgbench measures latency from the scheduled start, so it includes the "
        "lag. Transactions and failures are totals. Hot edits/s = the writer's TPS plus the main mix's "
        "rescore_match/edit_job TPS (non-zero only with `--invalidating-writes`), median over rounds.",
        "",
        "| clients | target | writer TPS | writer lat ms | schedule lag ms | writer tx | writer failures "
        "(fail tx / aborted) | hot edits/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for t, st in row["targets"].items():
            w = st.get("writer")
            if w:
                wcells = [fmt(w["tps_median"], ".2f"), fmt(w["latency_ms_median"], ".2f"),
                          fmt(w["schedule_lag_ms_median"], ".2f"), f"{w['transactions']:,}",
                          f"{w['failed_transactions']} / {w['aborted_clients']}"
                          + (f" ({'; '.join(w['errors'])})" if w["errors"] else "")]
            else:
                wcells = ["–"] * 5
            lines.append(f"| {row['clients']} | {t} | " + " | ".join(wcells)
                         + f" | {fmt(st.get('hot_edits_per_s_median'), '.2f')} |")
    behind = [(row["clients"], t, st["writer"]["tps_median"]) for row in rows for t, st in row["targets"].items()
              if st.get("writer") and st["writer"]["tps_median"] is not None
              and st["writer"]["tps_median"] < 0.8 * st["writer"]["rate"]]
    if behind:
        lines += ["", "**The writer fell behind its rate** (median TPS under 80 % of "
                  f"{rate:g}/s; the target could not take the edits that fast next to the main run, so those runs "
                  "had fewer hot edits than asked): "
                  + "; ".join(f"{c} clients {t}: {fmt(v, '.1f')}/s" for c, t, v in behind) + "."]
    lines += [
        "",
        "## Targets (issue 4)",
        "",
    ]
    for row in rows:
        hr = row["cache"]["hit_ratio"] if row["cache"] else None
        lines.append(f"- {row['clients']} clients: cache hit ratio {pct_or_na(hr)} (target ≥ {TARGET_HIT_RATIO:.0%}): "
                     f"**{verdict(row['target_hit_ratio_met'])}**; pgsidecar-cache / direct "
                     f"{fmt(row['ratio_cache_vs_direct'], '.2f')}× (target ≥ {TARGET_SPEEDUP:.0f}×): "
                     f"**{verdict(row['target_speedup_met'])}**")
    if not any(row["cache"] for row in rows):
        lines += ["", "The sidecar offered neither `GET /api/cache` nor `pgsidecar_cache_requests_total` on "
                      "`/metrics`: the hit ratio is not measured (n/a)."]
    errs = [(row["clients"], t, s) for row in rows for t, s in row["targets"].items() if s["errors"]]
    if errs:
        lines += ["", "Errors (pgbench stderr samples; full output and proxy stderr in the JSON):", ""]
        for c, t, s in errs:
            lines.append(f"- c={c} {t}: {'; '.join(s['errors'])}")
            lines += [f"  - `{ln[:200]}`" for ln in s["stderr_sample"]]
            lines += [f"  - writer: `{ln[:200]}`" for ln in (s.get("writer") or {}).get("stderr_sample") or []]
    events = meta.get("proxy_events") or []
    if events:
        lines += ["", "Proxy exits during the run (each was restarted unless noted; details in the JSON):", ""]
        lines += [f"- {e['time']} {e['proxy']} exit code {e['exit_code']}" + ("" if e.get("restarted") else
                                                                             " (not restarted)") for e in events]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", default=os.environ.get("PGSIDECAR_TEST_DSN", DEFAULT_DSN),
                   help="PostgreSQL admin DSN (127.0.0.1 only); default $PGSIDECAR_TEST_DSN or " + DEFAULT_DSN)
    p.add_argument("--duration", type=int, default=None, help="seconds per pgbench run (default 10; --quick 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unrecorded seconds per target before the first round (default 3; --quick 1; 0 = none)")
    p.add_argument("--clients", default="10,50", help="comma-separated pgbench -c values (default 10,50)")
    p.add_argument("--pool-size", type=int, default=20, help="server pool size of every proxy (default 20)")
    p.add_argument("--skip-init", action="store_true", help=f"reuse {CACHE_DB} if filled by this script version")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of: " + ", ".join(TARGETS))
    p.add_argument("--quick", action="store_true", help="short runs to check the script end to end (~1-2 min)")
    p.add_argument("--hot-write-rate", type=float, default=DEFAULT_HOT_WRITE_RATE, metavar="N",
                   help=f"edits of matches/jobs per second, from a second pgbench (-c 1 -R N) next to every run "
                        f"(default {DEFAULT_HOT_WRITE_RATE:g}: the workload; 0 = none; other values are sensitivity runs)")
    p.add_argument("--invalidating-writes", type=int, default=DEFAULT_INVALIDATING, metavar="N",
                   help=f"sensitivity runs: also put rescore_match and edit_job into the closed-loop mix, weight N/2 "
                        f"each next to the 9,950 of reads and cold writes, so their rate scales with throughput "
                        f"(default {DEFAULT_INVALIDATING}; 50 = the original proportional model, 0.5 %%)")
    p.add_argument("--trigger-tables", default=",".join(READ_TABLES), metavar="T1,T2",
                   help="the tables that carry the cache's triggers (default: the ones the mix reads, "
                        + ", ".join(READ_TABLES) + "); the others' writes NOTIFY nothing and their reads are not "
                        "cached. Sensitivity runs: " + ",".join(TABLES) + " (every table, as migration 0004 does)")
    p.add_argument("--cache-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="sensitivity runs: a cache.* setting of pgsidecar-cache (repeatable), e.g. "
                        "column_invalidation=false to measure per-table invalidation")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    for setting in a.cache_setting:
        key, eq, _ = setting.partition("=")
        if not eq or not re.fullmatch(r"[a-z_]+", key) or key == "mode":
            p.error(f"--cache-setting wants KEY=VALUE with a cache.* key other than mode, got {setting!r}")
    q = a.quick
    a.duration = a.duration if a.duration is not None else (3 if q else 10)
    a.rounds = a.rounds if a.rounds is not None else (1 if q else 3)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 3)
    a.clients_list = [int(x) for x in a.clients.split(",") if x.strip()]
    a.target_list = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in a.target_list if t not in TARGETS]
    if bad:
        p.error(f"unknown target: {', '.join(bad)}")
    if not (1 <= a.duration <= 3600 and 1 <= a.rounds <= 50 and 0 <= a.warmup <= 600
            and a.clients_list and a.pool_size >= 1):
        p.error("duration 1..3600, rounds 1..50, warmup 0..600, at least one client count, pool size >= 1")
    if any(c < 1 or c > 900 for c in a.clients_list):
        p.error("clients must be in 1..900")
    if not 0 <= a.invalidating_writes <= 1000 or a.invalidating_writes % 2:
        p.error("--invalidating-writes must be even, in 0..1000")
    if not 0 <= a.hot_write_rate <= 1000:
        p.error("--hot-write-rate must be in 0..1000 (edits per second)")
    a.trigger_table_list = tuple(t.strip() for t in a.trigger_tables.split(",") if t.strip())
    unknown = [t for t in a.trigger_table_list if t not in TABLES]
    if unknown:
        p.error(f"--trigger-tables: unknown table {', '.join(unknown)} (known: {', '.join(TABLES)})")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.invalidating_writes != DEFAULT_INVALIDATING:
        set_invalidating_writes(args.invalidating_writes)
    for tool in ("pgbench",) + (("pgbouncer",) if "pgbouncer" in args.target_list else ()):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            raise SystemExit(f"{tool} not found")
    up = Upstream.from_dsn(args.dsn)
    started = _dt.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "loadavg_start": os.getloadavg()},
        "git_commit": git_commit(),
        "pgbench_version": subprocess.run(["pgbench", "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.strip(),
        "workload": {name: {"weight": w, "kind": k, "script": text} for name, (w, k, text) in SCRIPTS.items()},
        "hot_writer": {"rate_per_s": args.hot_write_rate, "scripts": list(INVALIDATING),
                       "pgbench": f"-c 1 -j 1 -R {args.hot_write_rate:g} -T {args.duration} -n -M simple"},
        "sizes": SIZES,
        "zipf_s": ZIPF_S,
    }
    workdir = Path(tempfile.mkdtemp(prefix="pgsidecar-bench-cache-"))
    os.chmod(workdir, 0o755)
    proxies: dict[str, Proxy] = {}
    runs: list[dict[str, Any]] = []
    interrupted = False
    try:
        source = freeze_source(workdir / "src")
        meta["db"] = prepare_database(up, args.skip_init, source, args.trigger_table_list)
        n_proxies = sum(t in PROXIES for t in args.target_list)
        # direct clients (+ the hot-edit writer's) + every proxy's open pool + a LISTEN connection +
        # one admin connection
        needed = (("direct" in args.target_list) * (max(args.clients_list) + (args.hot_write_rate > 0))
                  + n_proxies * args.pool_size + 2)
        meta["db"]["connections_needed"] = needed
        if meta["db"]["max_connections"] < needed:
            log(f"warning: max_connections={meta['db']['max_connections']} < {needed} needed; "
                "direct runs may fail with 'too many clients'")
        workload, writer_args = write_scripts(workdir)
        if "pgbouncer" in args.target_list:
            (workdir / "pgbouncer").mkdir()
            b = PgBouncer(workdir / "pgbouncer", database=CACHE_DB)
            meta["pgbouncer_version"] = b.version()
            b.start(up, args.pool_size)
            proxies["pgbouncer"] = b
        for cls in (PgSidecarCache, PgSidecarNoCache):
            if cls.name in args.target_list:
                (workdir / cls.name).mkdir()
                s = cls(workdir / cls.name, database=CACHE_DB)
                if cls is PgSidecarCache:
                    s.extra_env = {**cls.extra_env, **{
                        f"PGSIDECAR_CACHE__{key.upper()}": value
                        for key, _, value in (x.partition("=") for x in args.cache_setting)}}
                s.source_dir = source
                s.start(up, args.pool_size)
                proxies[cls.name] = s
        targets = list(args.target_list)
        supervisor = Supervisor(proxies, up, args.pool_size)
        meta["proxy_events"] = supervisor.events

        def port_of(t: str) -> int:
            return up.port if t == "direct" else proxies[t].port

        if args.warmup:
            for t in targets:  # fills PostgreSQL's buffers, the pools and the cache; not recorded
                if not supervisor.ensure_running(t):
                    w = run_pgbench(up, port_of(t), workload, max(args.clients_list), args.warmup,
                                    proxies.get(t), database=CACHE_DB)
                    log(f"warm-up {t:17s} tps={fmt(w['tps'], '.0f')}"
                        + (f"  ERR: {'; '.join(w['errors'])}" if w["errors"] else ""))
        total = len(args.clients_list) * args.rounds * len(targets)
        eta = total * (args.duration + 1)
        log(f"{total} pgbench runs, about {eta // 60} min {eta % 60} s")
        n = 0
        for c in args.clients_list:
            for rnd in range(args.rounds):
                k = (rnd + args.clients_list.index(c)) % len(targets)
                for t in targets[k:] + targets[:k]:
                    n += 1
                    down = supervisor.ensure_running(t)
                    if down:
                        r: dict[str, Any] = {
                            "ok": False, "errors": [down], "tps": None, "latency_ms": None, "transactions": None,
                            "failed_transactions": None, "aborted_clients": 0, "proxy_cpu_s_per_1k_tx": None,
                            "cache": None, "writer": None}
                    else:
                        r = one_run(up, port_of(t), workload, c, args.duration, proxies.get(t),
                                    writer_args, args.hot_write_rate, workdir)
                    r.update(clients=c, round=rnd, target=t)
                    runs.append(r)
                    cpu = f" cpu/1k={r['proxy_cpu_s_per_1k_tx']}" if r.get("proxy_cpu_s_per_1k_tx") else ""
                    hit = (f" hit={r['cache']['hit_ratio']}" if r.get("cache") else
                           (" hit=n/a" if t == "pgsidecar-cache" else ""))
                    wr = (f" writer={fmt(r['writer']['tps'], '.1f')}tps/{fmt(r['writer']['latency_ms'], '.1f')}ms"
                          if r.get("writer") else "")
                    log(f"[{n}/{total}] c={c:<3d} r{rnd} {t:17s} tps={fmt(r['tps'], '.0f'):>6s} "
                        f"lat={fmt(r['latency_ms'], '.2f')}ms{cpu}{hit}{wr} busy={pct_or_na(r.get('machine_cpu_busy'))}"
                        + (f"  ERR: {'; '.join(r['errors'])}" if r["errors"] else ""))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; writing partial results")
    finally:
        for name, p in proxies.items():
            log(f"stopping {name} (pid {p.pid})")
            p.stop()
        meta["proxy_logs"] = {name: p.stderr_tail(60) for name, p in proxies.items()}
        bouncer_log = workdir / "pgbouncer" / "pgbouncer.log"
        if bouncer_log.exists():
            meta["pgbouncer_log_tail"] = bouncer_log.read_text(errors="replace")[-4000:]
        shutil.rmtree(workdir, ignore_errors=True)

    meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    meta["host"]["loadavg_end"] = os.getloadavg()
    meta["interrupted"] = interrupted
    meta["mix"] = mix_of(runs)
    if "db" not in meta:
        return 1
    rows = summarise(runs, args.clients_list, args.target_list)
    md = render_markdown(meta, rows, args.target_list)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / f"cache-{stamp}.json"
    json_path.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2))
    (args.output_dir / "cache-latest.md").write_text(md)
    print()
    print(md)
    log(f"wrote {json_path} and {args.output_dir / 'cache-latest.md'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
