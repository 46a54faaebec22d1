"""GraphQL gateway benchmark (issue 8): requests per second and latency percentiles of a nested query
(resumes -> user, matches -> job) at 10 and 50 concurrent HTTP clients, and the SQL statements
each request cost, counted by the proxy's own statistics.

Owns one run end to end: it creates the database ``pgsidecar_bench_graphql`` (``pgsidecar
migrate`` + ``pgsidecar seed-demo --users N``; ``--skip-init`` reuses it), starts pgsidecar
(``python -m agent run``, the proxy with the agent and its gateway, as a subprocess on free
127.0.0.1 ports: ``bench_pgbench.PgSidecar``), and for each client count runs closed-loop HTTP
clients (one aiohttp session in this process, ``C`` concurrent workers, each sending its next POST
/graphql as soon as the last answer arrives) for ``--duration`` seconds after a short warm-up,
``--rounds`` times. Each request asks for a page of ``PAGE`` resumes starting after a random id, with
each resume's user and ``MATCHES`` matches and each match's job (``QUERY``).

Statements per request: before and after each run it reads ``GET /api/queries/top?by=calls`` and
sums the calls of the fingerprints run by application_name ``pgsidecar-graphql`` (the gateway's
sessions to the proxy); the difference divided by the requests answered. The gateway's own count
(``pgsidecar_graphql_operation_sql_statements`` on ``/metrics``) is reported beside it.

Writes ``tests/bench/results/graphql-<timestamp>.json`` and ``results/graphql-latest.md`` (also
printed). Asserts nothing about speed (CONVENTIONS habit 14). The load generator shares the
machine's cores with the sidecar and PostgreSQL: at 50 clients on 2 cores it competes with them,
so compare the two client counts within one run rather than across machines::

    python tests/bench/bench_graphql.py --quick     # ~30 s: checks the script end to end
    python tests/bench/bench_graphql.py             # full run: ~2 minutes
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench is not a package

from bench_pgbench import (
    DEFAULT_DSN,
    REPO_ROOT,
    RESULTS_DIR,
    PgSidecar,
    Upstream,
    git_commit,
    log,
)

sys.path.insert(0, str(REPO_ROOT))
from migrations import runner
from migrations.demo import seed_demo

BENCH_DB = "pgsidecar_bench_graphql"
APPLICATION_NAME = "pgsidecar-graphql"
PAGE = 20
MATCHES = 10
QUERY = f"""query Nested($after: ID) {{
  resumes(first: {PAGE}, after: $after) {{
    id title user {{ id full_name }}
    matches(first: {MATCHES}) {{ id match_score job {{ id title }} }}
  }}
}}"""


def prepare_database(up: Upstream, users: int, skip_init: bool) -> int:
    """Create, migrate and seed the database (unless reused); return the number of resumes."""
    with psycopg.connect(up.dsn(up.admin_db), autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone()
        if exists and not skip_init:
            conn.execute(f'DROP DATABASE "{BENCH_DB}" WITH (FORCE)')
        if not exists or not skip_init:
            log(f"creating {BENCH_DB}, migrating and seeding {users} demo users")
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
            runner.upgrade(runner.alembic_config(up.dsn(BENCH_DB)))
            seed_demo(up.dsn(BENCH_DB), users)
    with psycopg.connect(up.dsn(BENCH_DB), connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM resumes").fetchone()
    assert row is not None
    return int(row[0])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def gateway_calls(http_port: int) -> int:
    """Statements the proxy timed for the gateway's sessions so far (its own statistics)."""
    doc = _get_json(f"http://127.0.0.1:{http_port}/api/queries/top?by=calls&limit=1000")
    rows = doc["queries"] if isinstance(doc, dict) else doc
    return sum(r["calls"] for r in rows if APPLICATION_NAME in r["application_names"])


def gateway_statement_count(http_port: int) -> tuple[float, float]:
    """(sum, count) of the gateway's own statements-per-operation histogram for "Nested"."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith('pgsidecar_graphql_operation_sql_statements_sum{operation="Nested"}'):
            total = float(line.split()[-1])
        elif line.startswith('pgsidecar_graphql_operation_sql_statements_count{operation="Nested"}'):
            count = float(line.split()[-1])
    return total, count


async def load(url: str, clients: int, duration: float, resumes: int, seed: int) -> dict[str, Any]:
    """Closed-loop clients for ``duration`` seconds: latencies of the good answers, failures."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    rng = random.Random(seed)
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker() -> None:
            while time.monotonic() < deadline:
                after = rng.randint(0, max(resumes - PAGE, 0))
                body = {"query": QUERY, "variables": {"after": str(after) if after else None}}
                started = time.perf_counter()
                try:
                    async with http.post(url, json=body) as resp:
                        doc = await resp.json()
                        ok = resp.status == 200 and "errors" not in doc and len(doc["data"]["resumes"]) > 0
                        reason = (f"status {resp.status}" if resp.status != 200 else
                                  "graphql error: " + (doc.get("errors") or [{}])[0].get("message", "no rows")[:120])
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    ok, reason = False, type(exc).__name__
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[reason] = failures.get(reason, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return {"latencies": latencies, "failures": failures, "elapsed": elapsed}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def one_run(sidecar: PgSidecar, clients: int, duration: float, resumes: int, seed: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{sidecar.http_port}/graphql"
    calls_before = gateway_calls(sidecar.http_port)
    own_before = gateway_statement_count(sidecar.http_port)
    cpu_before = sidecar.cpu_seconds()
    result = asyncio.run(load(url, clients, duration, resumes, seed))
    cpu_after = sidecar.cpu_seconds()
    calls = gateway_calls(sidecar.http_port) - calls_before
    own_after = gateway_statement_count(sidecar.http_port)
    lat = sorted(result["latencies"])
    answered = len(lat) + sum(result["failures"].values())
    own_ops = own_after[1] - own_before[1]
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return {
        "clients": clients,
        "duration_s": result["elapsed"],
        "requests": len(lat),
        "failures": result["failures"],
        "rps": len(lat) / result["elapsed"],
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p95_ms": percentile(lat, 0.95) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
        "proxy_statements": calls,
        "sidecar_cpu_s": cpu,
        "cpu_ms_per_request": cpu * 1000 / answered if cpu is not None and answered else float("nan"),
        "statements_per_request": calls / answered if answered else float("nan"),
        "gateway_statements_per_request": (own_after[0] - own_before[0]) / own_ops if own_ops else float("nan"),
    }


def summarise(runs: list[dict[str, Any]], clients_list: list[int]) -> list[dict[str, Any]]:
    rows = []
    for clients in clients_list:
        mine = [r for r in runs if r["clients"] == clients]
        if not mine:
            continue
        rows.append({
            "clients": clients,
            "rps_median": statistics.median(r["rps"] for r in mine),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in mine),
            "p95_ms_median": statistics.median(r["p95_ms"] for r in mine),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in mine),
            "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in mine),
            "statements_per_request": statistics.median(r["statements_per_request"] for r in mine),
            "gateway_statements_per_request": statistics.median(r["gateway_statements_per_request"] for r in mine),
            "failures": sum(sum(r["failures"].values()) for r in mine),
            "rounds": len(mine),
        })
    return rows


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# GraphQL gateway benchmark ({meta['started_at']}, commit {meta['commit']})",
        "",
        (f"Nested query: {PAGE} resumes (random `after`) with user, {MATCHES} matches each and each match's job; "
        f"{meta['resumes']} resumes in the demo data ({meta['users']} users); {meta['rounds']} round(s) of "
        f"{meta['duration_s']:g} s per client count; medians over rounds. Statements per request from the proxy's "
        "statistics (application_name pgsidecar-graphql), the gateway's own count beside it."),
        "",
        ("| clients | requests/s | p50 ms | p95 ms | p99 ms | sidecar CPU ms / request | SQL statements / request (proxy) "
        "| (gateway) | failures |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['rps_median']:.1f} | {r['p50_ms_median']:.1f} | {r['p95_ms_median']:.1f} | "
                     f"{r['p99_ms_median']:.1f} | {r['cpu_ms_per_request']:.2f} | {r['statements_per_request']:.2f} | "
                     f"{r['gateway_statements_per_request']:.2f} | {r['failures']} |")
    lines += ["", (f"Machine: {meta['machine']['cpus']} CPUs, load average {meta['load_start']} at start, "
              f"{meta['load_end']} at end; Python {meta['machine']['python']}.")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default=os.environ.get("PGSIDECAR_TEST_DSN", DEFAULT_DSN), help="admin DSN (local)")
    p.add_argument("--users", type=int, default=2000, help="demo users (seed-demo --users)")
    p.add_argument("--clients", default="10,50", help="concurrent HTTP clients, comma-separated")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 10, --quick 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per client count (default 3, --quick 1)")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before the first run")
    p.add_argument("--skip-init", action="store_true", help="reuse the database if it exists")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="short everything, to check the script end to end")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.clients_list = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    up = Upstream.from_dsn(args.dsn)
    resumes = prepare_database(up, args.users, args.skip_init)
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    meta: dict[str, Any] = {
        "started_at": started, "commit": git_commit(), "users": args.users, "resumes": resumes,
        "duration_s": args.duration, "rounds": args.rounds, "clients": args.clients_list, "query": QUERY,
        "load_start": os.getloadavg(), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "platform": platform.platform()},
    }
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgsidecar-bench-graphql-") as tmp:
        sidecar = PgSidecar(Path(tmp), database=BENCH_DB)
        try:
            sidecar.start(up, pool_size=20)
            log(f"pgsidecar pid {sidecar.pid} (py-spy record --pid {sidecar.pid} ...); warm-up {args.warmup:g} s")
            asyncio.run(load(f"http://127.0.0.1:{sidecar.http_port}/graphql", 4, args.warmup, resumes, 0))
            for round_no in range(args.rounds):
                for clients in args.clients_list:
                    run = one_run(sidecar, clients, args.duration, resumes, seed=round_no * 1000 + clients)
                    run["round"] = round_no
                    runs.append(run)
                    log(f"round {round_no + 1}, {clients} clients: {run['rps']:.1f} req/s, p95 {run['p95_ms']:.1f} ms, "
                        f"sidecar CPU {run['cpu_ms_per_request']:.2f} ms/request, "
                        f"{run['statements_per_request']:.2f} statements/request, failures {run['failures']}")
        except KeyboardInterrupt:
            log("interrupted; writing partial results")
        finally:
            sidecar.stop()
    meta["load_end"] = os.getloadavg()
    rows = summarise(runs, args.clients_list)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    json_path = args.output_dir / f"graphql-{stamp}.json"
    json_path.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2))
    markdown = render_markdown(meta, rows)
    (args.output_dir / "graphql-latest.md").write_text(markdown)
    print(markdown)
    log(f"wrote {json_path} and {args.output_dir / 'graphql-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
