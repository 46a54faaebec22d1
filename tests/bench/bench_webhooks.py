"""Webhook emitter benchmark (issue 7): events per second from commit to the receiver's 2xx, and
delivery latency (commit -> receiver) at a paced insert rate, side by side for endpoint settings.

Not a test: run by hand (see README.md). For each configuration, sequentially and each on a fresh
database ``pgsidecar_bench_webhooks`` (dropped, created, migrated):

- ``no-triggers``: the webhook change trigger removed from ``users`` (insert cost baseline);
- ``no-endpoint``: the triggers in place, no endpoint registered (trigger + outbox + NOTIFY cost);
- ``ordered``: one endpoint, ``ordered: true`` (the default: commit order, one POST at a time);
- ``unordered``: one endpoint, ``ordered: false`` (up to 8 concurrent POSTs).

A real ``python -m agent run`` serves the database (proxy + emitter in one process); a real aiohttp
receiver in its own process answers 200 and records arrival time and body of every request;
asyncpg connections *through the proxy* insert single rows in autocommit at ``--rate`` rows/s for
``--seconds``. Latency = receiver arrival time - client-side commit time (both ``time.time()`` on
this machine). Nothing about speed is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as _dt
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench is not a package

from bench_pgbench import (  # noqa: E402
    DEFAULT_DSN,
    REPO_ROOT,
    RESULTS_DIR,
    PgSidecar,
    Upstream,
    free_port,
    git_commit,
    log,
    pct,
    wait_port,
)

BENCH_DB = "pgsidecar_bench_webhooks"
CONFIGS = ("no-triggers", "no-endpoint", "ordered", "unordered")
WEBHOOK_CONFIGS = {"ordered": True, "unordered": False}  # name -> the endpoint's ``ordered``
# The change triggers of agent.webhooks.sql (ROW_TRIGGER / TRUNCATE_TRIGGER), removed for no-triggers.
DROP_USERS_TRIGGERS = ("DROP TRIGGER IF EXISTS pgsidecar_webhook_capture ON public.users; "
                       "DROP TRIGGER IF EXISTS pgsidecar_webhook_truncate ON public.users")
INSERT_SQL = "INSERT INTO users (email, full_name) VALUES ($1, $2)"
SOURCE_PACKAGES = ("agent", "proxy", "config", "migrations", "graphql_gateway")


# --------------------------------------------------------------------------- receiver (own process)


def receiver_main(port: int) -> None:
    """A webhook receiver: records (arrival time, webhook-id, body) of every POST /hook, answers 200."""
    from aiohttp import web

    records: list[tuple[float, str | None, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        records.append((time.time(), request.headers.get("webhook-id"), raw))
        return web.Response(status=200)

    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"n": len(records)})

    async def dump(_request: web.Request) -> web.Response:
        out = []
        for t, wid, raw in records:
            try:
                email = json.loads(raw)["data"]["new"]["email"]
            except (ValueError, KeyError, TypeError):
                email = None
            out.append([t, wid, email])
        return web.json_response(out)

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/hook", hook)
    app.router.add_get("/_count", count)
    app.router.add_get("/_dump", dump)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: multiprocessing.process.BaseProcess | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=receiver_main, args=(self.port,), daemon=True, name="webhook-receiver")
        self.proc.start()
        if not wait_port(self.port, 20):
            raise RuntimeError("the webhook receiver did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def cpu_seconds(self) -> float | None:
        try:
            t = psutil.Process(self.proc.pid).cpu_times()  # type: ignore[union-attr]
            return t.user + t.system
        except (psutil.Error, AttributeError):
            return None

    def dump(self) -> list[list[Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_dump", timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


# --------------------------------------------------------------------------- setup helpers


def freeze_source(dest: Path, worktree: bool) -> str:
    """The code pgsidecar and the migrations run from: HEAD (default) or the working tree, copied
    at start so edits made by others during the run change nothing."""
    if worktree:
        for pkg in SOURCE_PACKAGES:
            if (REPO_ROOT / pkg).is_dir():
                shutil.copytree(REPO_ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        return git_commit()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "HEAD", *SOURCE_PACKAGES],
                             capture_output=True, check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def recreate_database(up: Upstream, source: Path, drop_triggers: bool) -> None:
    with psycopg.connect(up.dsn(up.admin_db), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    dsn = up.dsn(BENCH_DB)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from migrations import runner; "
                               "runner.upgrade(runner.alembic_config(sys.argv[1]))", dsn],
        cwd=source, env=up.pg_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"migrations failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if drop_triggers:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(DROP_USERS_TRIGGERS)


def http_json(url: str, data: dict[str, Any] | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"content-type": "application/json"} if data is not None else {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_emitter(http_port: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, doc = http_json(f"http://127.0.0.1:{http_port}/api/health/detailed")
            last = doc
            if isinstance(doc, dict) and (doc.get("webhooks") or {}).get("status") == "ok":
                return doc["webhooks"]
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the webhook emitter did not report ok within {timeout}s: {last}")


def postgres_cpu_seconds() -> float:
    """user+system of the live PostgreSQL processes (backends that exited in between are lost)."""
    total = 0.0
    for p in psutil.process_iter(["name", "cpu_times"]):
        try:
            if p.info["name"] in ("postgres", "postmaster") and p.info["cpu_times"] is not None:
                total += p.info["cpu_times"].user + p.info["cpu_times"].system
        except psutil.Error:
            pass
    return total


def xact_commits(up: Upstream) -> int | None:
    """Transactions committed in the bench database (every autocommit statement is one)."""
    try:
        with psycopg.connect(up.dsn(up.admin_db), autocommit=True, connect_timeout=10) as conn:
            return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (BENCH_DB,)).fetchone()[0]
    except (psycopg.Error, TypeError):
        return None


def parse_gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------- load


async def poll(stop: asyncio.Event, http_port: int, receiver: Receiver | None, samples: list[dict[str, Any]]) -> None:
    """Once a second: the sidecar's backlog gauge and the receiver's request count."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not stop.is_set():
            s: dict[str, Any] = {"t": time.time()}
            try:
                async with session.get(f"http://127.0.0.1:{http_port}/metrics") as r:
                    text = await r.text()
                s["pending"] = parse_gauge(text, "pgsidecar_webhook_pending_deliveries")
                s["oldest_age_s"] = parse_gauge(text, "pgsidecar_webhook_oldest_pending_age_seconds")
                s["loop_lag_s"] = parse_gauge(text, "pgsidecar_event_loop_lag_seconds")
                s["notifications"] = parse_gauge(text, "pgsidecar_webhook_notifications_total")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                s["metrics_error"] = type(exc).__name__
            if receiver is not None:
                try:
                    async with session.get(f"http://127.0.0.1:{receiver.port}/_count") as r:
                        s["received"] = (await r.json())["n"]
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    s["receiver_error"] = type(exc).__name__
            samples.append(s)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def run_load(up: Upstream, proxy_port: int, rate: float, seconds: float, connections: int,
                   warmup_rows: int) -> dict[str, Any]:
    import asyncpg

    conns = [await asyncpg.connect(host="127.0.0.1", port=proxy_port, user=up.user, password=up.password,
                                   database=BENCH_DB, timeout=10) for _ in range(connections)]
    for i in range(warmup_rows):  # prepares the statement on every connection, warms the path
        await conns[i % connections].execute(INSERT_SQL, f"w{i}@bench", "warm up")
    total = int(rate * seconds)
    commits: dict[str, float] = {}
    insert_ms: list[float] = []
    lag_ms: list[float] = []
    errors: list[str] = []
    t0 = time.time() + 0.2

    async def worker(k: int) -> None:
        conn = conns[k]
        for seq in range(k, total, connections):
            due = t0 + seq / rate
            now = time.time()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.time()
            lag_ms.append((now - due) * 1000)
            email = f"b{seq}@bench"
            try:
                await conn.execute(INSERT_SQL, email, f"Bench User {seq}")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            done = time.time()
            commits[email] = done
            insert_ms.append((done - now) * 1000)

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(k) for k in range(connections)))
    t_end = time.time()
    cpu1 = time.process_time()
    for c in conns:
        await c.close()
    return {"t_start": t0, "t_end": t_end, "total": total, "commits": commits, "insert_ms": insert_ms,
            "lag_ms": lag_ms, "errors": errors, "loadgen_cpu_s": cpu1 - cpu0}


async def load_and_drain(up: Upstream, sidecar: PgSidecar, receiver: Receiver | None, args: argparse.Namespace,
                         warmup_rows: int) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll(stop, sidecar.http_port, receiver, samples))
    load = await run_load(up, sidecar.port, args.rate, args.seconds, args.connections, warmup_rows)
    drained_at = None
    cpu_at_load_end = {"pgsidecar": sidecar.cpu_seconds(), "postgres": postgres_cpu_seconds(),
                       "receiver": receiver.cpu_seconds() if receiver else None}
    if receiver is not None:
        want = warmup_rows + len(load["commits"])
        deadline = time.monotonic() + args.drain_timeout
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                async with session.get(f"http://127.0.0.1:{receiver.port}/_count") as r:
                    n = (await r.json())["n"]
                if n >= want:
                    drained_at = time.time()
                    break
                await asyncio.sleep(0.1)
    stop.set()
    await poller
    load.update(samples=samples, drained_at=drained_at, cpu_at_load_end=cpu_at_load_end)
    return load


# --------------------------------------------------------------------------- one configuration


def run_config(name: str, up: Upstream, source: Path, workdir: Path, args: argparse.Namespace,
               out_prefix: Path) -> dict[str, Any]:
    log(f"== {name}: fresh database {BENCH_DB}")
    recreate_database(up, source, drop_triggers=(name == "no-triggers"))
    cdir = workdir / name
    cdir.mkdir(parents=True)
    sidecar = PgSidecar(cdir, database=BENCH_DB)
    sidecar.source_dir = source
    sidecar.extra_env = {"PGSIDECAR_LOGGING__LEVEL": "warning"}
    receiver: Receiver | None = None
    profiler: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"configuration": name, "offered_rate": args.rate, "seconds": args.seconds}
    try:
        sidecar.start(up, pool_size=args.pool_size)
        result["emitter_at_start"] = wait_emitter(sidecar.http_port)
        endpoint = None
        if name in WEBHOOK_CONFIGS:
            receiver = Receiver()
            receiver.start()
            status, doc = http_json(f"http://127.0.0.1:{sidecar.http_port}/api/webhooks/register",
                                    {"url": receiver.url, "events": ["users.insert"],
                                     "ordered": WEBHOOK_CONFIGS[name]})
            if status != 201:
                raise RuntimeError(f"registration failed: {status} {doc}")
            endpoint = {k: v for k, v in doc.items() if k != "secret"}
        result["endpoint"] = endpoint
        warmup_rows = args.connections * 5
        time.sleep(1.0)  # backends report their counters to pg_stat_database when idle, at most once a second
        xact0 = xact_commits(up)
        cpu0 = {"pgsidecar": sidecar.cpu_seconds(), "postgres": postgres_cpu_seconds(),
                "receiver": receiver.cpu_seconds() if receiver else None}
        if args.profile_seconds and name in WEBHOOK_CONFIGS and shutil.which("py-spy"):
            raw_path = out_prefix.with_name(out_prefix.name + f"-{name}-{cdir.parent.name}.pyspy.txt")
            delay = max(1.0, args.seconds / 3)
            log(f"py-spy record of pgsidecar (pid {sidecar.pid}) for {args.profile_seconds}s after {delay:.0f}s of load")
            profiler = subprocess.Popen(
                ["sh", "-c", f"sleep {delay}; exec py-spy record -d {args.profile_seconds} -r 50 -f raw "
                             f"-o {raw_path} --pid {sidecar.pid}"],
                stdout=subprocess.DEVNULL, stderr=open(cdir / "py-spy.stderr", "wb"))
            result["profile_raw"] = str(raw_path)
        log(f"{name}: {args.rate:g} rows/s for {args.seconds:g}s over {args.connections} connections through the proxy")
        load = asyncio.run(load_and_drain(up, sidecar, receiver, args, warmup_rows))
        cpu2 = {"pgsidecar": sidecar.cpu_seconds(), "postgres": postgres_cpu_seconds(),
                "receiver": receiver.cpu_seconds() if receiver else None}
        arrivals = receiver.dump() if receiver else None
        time.sleep(1.5)
        xact1 = xact_commits(up)
        if profiler is not None:
            profiler.wait(timeout=args.profile_seconds + 60)
            result["profile_top"] = summarise_profile(Path(result["profile_raw"]))
        result.update(summarise(load, arrivals, warmup_rows, cpu0, cpu2))
        if xact0 is not None and xact1 is not None and result["rows_committed"]:
            # the inserts' own transactions included: 1.0 would be the inserts alone
            result["server_xacts"] = xact1 - xact0
            result["server_xacts_per_row"] = round((xact1 - xact0) / result["rows_committed"], 2)
        result["sidecar_alive"] = sidecar.alive()
        if not sidecar.alive():
            result["sidecar_stderr"] = sidecar.stderr_tail()
        log(f"{name}: " + one_line(result))
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
        if receiver is not None:
            receiver.stop()
        sidecar.stop()
    return result


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks: top frames by own samples and by inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        try:
            count = int(n)
        except ValueError:
            continue
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    pcts = lambda c: [[f, round(100 * n / total, 1)] for f, n in c.most_common(top)]  # noqa: E731
    return {"samples": total, "own_pct": pcts(own), "inclusive_pct": pcts(incl)}


# --------------------------------------------------------------------------- statistics


def ms_stats(vals: list[float]) -> dict[str, Any]:
    if not vals:
        return {"n": 0}
    s = sorted(vals)
    return {"n": len(s), "p50": round(pct(s, 0.50), 2), "p95": round(pct(s, 0.95), 2),
            "p99": round(pct(s, 0.99), 2), "max": round(s[-1], 2)}


def summarise(load: dict[str, Any], arrivals: list[list[Any]] | None, warmup_rows: int,
              cpu0: dict[str, Any], cpu2: dict[str, Any]) -> dict[str, Any]:
    commits: dict[str, float] = load["commits"]
    t_start, t_end = load["t_start"], load["t_end"]
    window = t_end - t_start
    committed = len(commits)
    res: dict[str, Any] = {
        "rows_scheduled": load["total"],
        "rows_committed": committed,
        "insert_errors": len(load["errors"]),
        "insert_error_samples": load["errors"][:5],
        "load_window_s": round(window, 3),
        "achieved_insert_rate": round(committed / window, 1) if window > 0 else None,
        "insert_ms": ms_stats(load["insert_ms"]),
        "schedule_lag_ms": ms_stats(load["lag_ms"]),
        "loadgen_cpu_s": round(load["loadgen_cpu_s"], 2),
    }
    cpu1 = load["cpu_at_load_end"]

    def delta(a: dict[str, Any], b: dict[str, Any], k: str) -> float | None:
        return round(b[k] - a[k], 2) if a.get(k) is not None and b.get(k) is not None else None

    res["cpu_s_load"] = {k: delta(cpu0, cpu1, k) for k in cpu0}
    res["cpu_s_total"] = {k: delta(cpu0, cpu2, k) for k in cpu0}
    pend = [s["pending"] for s in load["samples"] if s.get("pending") is not None]
    res["metric_pending_max"] = int(max(pend)) if pend else None
    lags = [s["loop_lag_s"] for s in load["samples"] if s.get("loop_lag_s") is not None]
    res["event_loop_lag_ms"] = {"max": round(max(lags) * 1000, 1), "median": round(sorted(lags)[len(lags) // 2] * 1000, 1)} \
        if lags else None
    res["samples"] = load["samples"]
    if arrivals is None:
        return res
    ids = Counter(wid for _, wid, _ in arrivals)
    first: dict[str, float] = {}
    unknown = 0
    for t, _wid, email in sorted(arrivals):
        if email is None or not email.startswith("b"):
            if email is None or not email.startswith("w"):
                unknown += 1
            continue
        first.setdefault(email, t)
    lat = [(first[e] - commits[e]) * 1000 for e in first if e in commits]
    missing = [e for e in commits if e not in first]
    arr_times = sorted(first.values())
    commit_times = sorted(commits.values())
    in_window = bisect.bisect_right(arr_times, t_end) - bisect.bisect_left(arr_times, t_start)
    # exact backlog: rows committed but not yet arrived, at every commit instant
    backlog_max = 0
    for i, tc in enumerate(commit_times):
        backlog_max = max(backlog_max, i + 1 - bisect.bisect_right(arr_times, tc))
    last_arrival = arr_times[-1] if arr_times else None
    overall = (len(first) / (last_arrival - commit_times[0])) if arr_times and commit_times and \
        last_arrival > commit_times[0] else None
    # latency by 10 s slice of commit time (does it grow during the run?)
    slices: dict[int, list[float]] = {}
    for e, ta in first.items():
        if e in commits:
            slices.setdefault(int((commits[e] - t_start) // 10), []).append((ta - commits[e]) * 1000)
    res.update({
        "requests_received": len(arrivals),
        "warmup_rows": warmup_rows,
        "delivered_unique": len(first),
        "duplicates": sum(n - 1 for wid, n in ids.items() if n > 1),
        "missing": len(missing),
        "missing_samples": missing[:5],
        "unknown_arrivals": unknown,
        "delivered_per_s_load_window": round(in_window / window, 1) if window > 0 else None,
        "delivered_per_s_overall": round(overall, 1) if overall else None,
        "drain_s": round(last_arrival - t_end, 2) if last_arrival else None,
        "drained": load["drained_at"] is not None,
        "latency_ms": ms_stats(lat),
        "latency_ms_by_10s": {f"{k * 10}-{k * 10 + 10}s": ms_stats(v) for k, v in sorted(slices.items())},
        "backlog_max": backlog_max,
    })
    return res


def one_line(r: dict[str, Any]) -> str:
    s = (f"insert {r.get('achieved_insert_rate')}/s (p50 {r['insert_ms'].get('p50')} ms, "
         f"p99 {r['insert_ms'].get('p99')} ms), errors {r.get('insert_errors')}")
    if "latency_ms" in r:
        lat = r["latency_ms"]
        s += (f"; delivered {r['delivered_per_s_load_window']}/s in the load window, {r['delivered_per_s_overall']}/s "
              f"overall, latency p50 {lat.get('p50')} p95 {lat.get('p95')} p99 {lat.get('p99')} max {lat.get('max')} ms, "
              f"dup {r['duplicates']}, missing {r['missing']}, backlog max {r['backlog_max']}, drain {r['drain_s']} s")
    return s + f"; pgsidecar CPU {r['cpu_s_total'].get('pgsidecar')} s"


# --------------------------------------------------------------------------- output


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def label(r: dict[str, Any]) -> str:
    return r["configuration"] + (f" (round {r['round']})" if r.get("round") and r.get("rounds", 1) > 1 else "")


def render_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        f"# Webhook emitter benchmark — {meta['started_at']}",
        "",
        f"commit `{meta['git_commit']}` (pgsidecar ran from {meta['source']}), PostgreSQL {meta['server_version']}, "
        f"Python {meta['python']}, {meta['cpus']} CPUs, load average {meta['loadavg_start']} at start and "
        f"{meta['loadavg_end']} at end. Offered {meta['rate']:g} inserts/s for {meta['seconds']:g} s over "
        f"{meta['connections']} asyncpg connections through the proxy (server pool {meta['pool_size']}); "
        f"configurations run one after the other ({', '.join(meta['configurations'])}; {meta['rounds']} round(s), "
        f"the order rotated per round), each on a freshly created and migrated database.",
        "",
        "| configuration | offered/s | inserts/s | insert p50/p99 ms | delivered/s (load) | delivered/s (overall) "
        "| latency p50 ms | p95 ms | p99 ms | max ms | dup | missing | max backlog (exact / metric) | drain s "
        "| pgsidecar CPU s | PostgreSQL CPU s | server xacts/row | loop lag max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {label(r)} | FAILED: {r['error'][:200]} |" + " |" * 16)
            continue
        lat = r.get("latency_ms", {})
        ins = r["insert_ms"]
        wh = "latency_ms" in r
        lines.append("| " + " | ".join([
            label(r), fmt(r["offered_rate"]), fmt(r["achieved_insert_rate"]),
            f"{fmt(ins.get('p50'))} / {fmt(ins.get('p99'))}",
            fmt(r.get("delivered_per_s_load_window")), fmt(r.get("delivered_per_s_overall")),
            fmt(lat.get("p50")), fmt(lat.get("p95")), fmt(lat.get("p99")), fmt(lat.get("max")),
            fmt(r.get("duplicates")), fmt(r.get("missing")),
            f"{fmt(r.get('backlog_max'))} / {fmt(r.get('metric_pending_max'))}" if wh else "–",
            (fmt(r.get("drain_s")) + ("" if r.get("drained") else " (timeout)")) if wh else "–",
            fmt(r["cpu_s_total"].get("pgsidecar")), fmt(r["cpu_s_total"].get("postgres")),
            fmt(r.get("server_xacts_per_row")), fmt((r.get("event_loop_lag_ms") or {}).get("max")),
        ]) + " |")
    lines += [
        "",
        "*inserts/s*: rows committed / (last commit − first scheduled insert). *delivered/s (load)*: distinct rows "
        "that reached the receiver during the load window / its length; *(overall)*: distinct rows / (first commit "
        "→ last arrival). *latency*: receiver arrival (body read, before its 200) − the client's time right after "
        "the INSERT returned, first arrival per row. *dup*: extra requests with an already-seen `webhook-id`. "
        "*max backlog exact*: most rows committed and not yet arrived at any commit instant; *metric*: highest "
        "`pgsidecar_webhook_pending_deliveries` polled once a second (the emitter refreshes it every ~5 s). "
        "*drain*: last arrival − end of load. CPU: user+system during load and drain (PostgreSQL: its live "
        "processes). *server xacts/row*: transactions committed in the bench database (pg_stat_database) during "
        "load and drain / rows inserted: 1.0 is the inserts alone, the rest is the emitter's queries. *loop lag*: "
        "the agent's `pgsidecar_event_loop_lag_seconds` polled once a second (proxy and emitter share that loop). "
        "Nothing is asserted; everything shares the machine's cores.",
        "",
    ]
    for r in results:
        by = r.get("latency_ms_by_10s")
        if by:
            lines.append(f"- {label(r)} latency p50/p99 ms by 10 s of commit time: " + ", ".join(
                f"{k}: {fmt(v.get('p50'))}/{fmt(v.get('p99'))}" for k, v in by.items()))
    for r in results:
        prof = r.get("profile_top")
        if prof and prof.get("samples"):
            lines.append(f"- {label(r)} py-spy ({prof['samples']} samples) top own time: " + "; ".join(
                f"{f} {p}%" for f, p in prof["own_pct"][:6]))
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=None, help="inserts per second (default 1000; --quick 200)")
    p.add_argument("--seconds", type=float, default=None, help="load duration (default 60; --quick 10)")
    p.add_argument("--connections", type=int, default=16, help="asyncpg connections through the proxy (enough "
                   "that the paced load stays open-loop when an insert takes 10+ ms)")
    p.add_argument("--pool-size", type=int, default=10, help="pgsidecar's server pool (transaction mode)")
    p.add_argument("--rounds", type=int, default=1, help="runs of every configuration; the order rotates per round")
    p.add_argument("--drain-timeout", type=float, default=None, help="seconds to wait for the backlog after the load "
                   "(default 300; --quick 30)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--profile-seconds", type=int, default=0, help="py-spy record pgsidecar this long during each "
                   "webhook configuration (adds CPU load; off by default)")
    p.add_argument("--worktree", action="store_true", help="run pgsidecar from the working tree (default: HEAD)")
    p.add_argument("--dsn", default=os.environ.get("PGSIDECAR_TEST_DSN", DEFAULT_DSN))
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="200 rows/s for 10 s: checks the script end to end")
    a = p.parse_args(argv)
    a.rate = a.rate if a.rate is not None else (200.0 if a.quick else 1000.0)
    a.seconds = a.seconds if a.seconds is not None else (10.0 if a.quick else 60.0)
    a.drain_timeout = a.drain_timeout if a.drain_timeout is not None else (30.0 if a.quick else 300.0)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configuration(s) {bad}; choose from {CONFIGS}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    up = Upstream.from_dsn(args.dsn)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_prefix = args.output_dir / f"webhooks-{stamp}"
    with psycopg.connect(up.dsn(up.admin_db), autocommit=True, connect_timeout=10) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    source = workdir / "src"
    source.mkdir()
    commit = freeze_source(source, args.worktree)
    meta = {
        "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit, "source": "the working tree (copied)" if args.worktree else "HEAD (git archive)",
        "bench_checkout": git_commit(), "server_version": server_version,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "rate": args.rate, "seconds": args.seconds, "connections": args.connections,
        "pool_size": args.pool_size, "rounds": args.rounds,
        "drain_timeout": args.drain_timeout, "configurations": args.configs, "quick": args.quick,
        "order": "sequential, fresh database per run; with --rounds the order rotates from round to round",
    }
    log(f"pgsidecar from {meta['source']} at {commit}; work dir {workdir}")
    results: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            shift = rnd % len(args.configs)
            for name in args.configs[shift:] + args.configs[:shift]:
                tag = {"round": rnd + 1, "rounds": args.rounds}
                try:
                    results.append(run_config(name, up, source, workdir / f"r{rnd + 1}", args, out_prefix) | tag)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported, the other configurations still run
                    log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                    results.append({"configuration": name, "offered_rate": args.rate,
                                    "error": f"{type(exc).__name__}: {exc}"[:2000]} | tag)
    except KeyboardInterrupt:
        log("interrupted: writing partial results")
    finally:
        meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        meta["finished_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        json_path = out_prefix.with_suffix(".json")
        json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        md = render_markdown(meta, results)
        (args.output_dir / "webhooks-latest.md").write_text(md)
        print(md)
        log(f"wrote {json_path} and {args.output_dir / 'webhooks-latest.md'}")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
