"""Side-by-side pgbench benchmark: direct PostgreSQL vs pgsidecar vs PgBouncer.

Owns one benchmark run end to end: it creates a dedicated database and fills it with
``pgbench -i``, starts PgBouncer, pgsidecar and pgsidecar with query statistics off
("pgsidecar-nostats", to show what query observability costs: issue 3) and a bare Python relay
("python-relay", tests/bench/python_relay.py: the floor any Python proxy stands on) as
subprocesses on free 127.0.0.1 ports (transaction pooling, same pool size; the relay does not
pool), runs pgbench against the targets
*interleaved* (target order rotated every round, so drift in the machine hits all alike),
measures the proxies' CPU seconds per 1,000 transactions with psutil, measures
single-connection ``SELECT 1`` latency through each target with psycopg, and writes
``tests/bench/results/pgbench-<timestamp>.json`` and ``tests/bench/results/pgbench-latest.md``.

This is a benchmark, not a test (CONVENTIONS habit 14): pytest never collects it and it
asserts nothing about speed. Run it by hand::

    python tests/bench/bench_pgbench.py --quick          # ~2 minutes, checks it works
    python tests/bench/bench_pgbench.py                  # full run (about 21-22 minutes)

It only talks to 127.0.0.1 and stops by itself: every loop is bounded and every subprocess
has a timeout; all proxies are stopped in ``finally`` (also on Ctrl-C).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "pgsidecar_bench"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PGBOUNCER_USER = "pgsidecar"
MAX_RESTARTS = 3  # per proxy and run, if it goes away mid-benchmark

# name -> extra pgbench arguments; a workload with a script in CUSTOM_SCRIPTS also gets
# ``-f FILE -D scale=SCALE`` (see workload_args)
WORKLOADS: dict[str, list[str]] = {
    "select-simple": ["-S", "-M", "simple"],
    "select-extended": ["-S", "-M", "extended"],
    "select-prepared": ["-S", "-M", "prepared"],
    "tpcb-simple": ["-M", "simple"],
    "distinct-10k": ["-M", "simple"],
}
# name -> pgbench custom script, written to the run's temp dir at start. pgbench substitutes
# ``:n`` textually, so the CTE is named x1 ... x10000: 10,000 statements with distinct
# fingerprints (the aid literal is normalised away), a miss-heavy load for query statistics.
# pgbench sets ``:scale`` only for its built-in scripts (it is 1 with -f), hence ``-D scale=N``.
CUSTOM_SCRIPTS: dict[str, str] = {
    "distinct-10k": (
        "\\set n random(1, 10000)\n"
        "\\set aid random(1, 100000 * :scale)\n"
        "WITH x:n AS (SELECT abalance FROM pgbench_accounts WHERE aid = :aid) SELECT * FROM x:n;\n"
    ),
}
TARGETS = ("direct", "pgsidecar", "pgsidecar-nostats", "pgbouncer", "python-relay")
PROXIES = ("pgsidecar", "pgsidecar-nostats", "pgbouncer", "python-relay")
PROXY_LABELS = {"pgsidecar": "pgsidecar", "pgsidecar-nostats": "pgsidecar-nostats", "pgbouncer": "PgBouncer",
                "python-relay": "python-relay"}
# Not pooling: each of its clients holds its own server connection (see PythonRelay).
UNPOOLED = ("python-relay",)


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@dataclasses.dataclass(frozen=True)
class Upstream:
    """The PostgreSQL server under test, always reached at 127.0.0.1."""

    host: str
    port: int
    user: str
    password: str | None
    admin_db: str

    @classmethod
    def from_dsn(cls, dsn: str) -> Upstream:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql"):
            raise SystemExit(f"--dsn must be a postgresql:// URL, got {dsn!r}")
        host = parts.hostname or "127.0.0.1"
        if host not in LOCAL_HOSTS:
            raise SystemExit(f"refusing to benchmark a non-local server ({host!r}); use 127.0.0.1")
        return cls(
            host="127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            admin_db=(parts.path or "/").lstrip("/") or "postgres",
        )

    def dsn(self, db: str, port: int | None = None) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        return urlunsplit(("postgresql", f"{auth}@127.0.0.1:{port or self.port}", f"/{db}", "", ""))

    def pg_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in [k for k in env if k.startswith("PG")]:
            del env[k]  # no stray PGHOST/PGSERVICE etc. steering pgbench elsewhere
        env["PGCONNECT_TIMEOUT"] = "10"
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


# --------------------------------------------------------------------------- database setup


def prepare_database(up: Upstream, scale: int, skip_init: bool) -> dict[str, Any]:
    with psycopg.connect(up.dsn(up.admin_db), autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone()
        server_version = conn.execute("SHOW server_version").fetchone()[0]
        max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])
        if not exists:
            log(f"creating database {BENCH_DB}")
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    current_scale = None
    try:
        with psycopg.connect(up.dsn(BENCH_DB), autocommit=True, connect_timeout=10) as conn:
            current_scale = conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()[0]
    except psycopg.Error:
        pass
    initialised = False
    if skip_init and current_scale == scale:
        log(f"reusing pgbench tables at scale {scale} (--skip-init)")
    else:
        log(f"pgbench -i -s {scale} {BENCH_DB}")
        t0 = time.monotonic()
        proc = subprocess.run(
            ["pgbench", "-i", "-s", str(scale), "-q", "-h", "127.0.0.1", "-p", str(up.port), "-U", up.user, BENCH_DB],
            env=up.pg_env(), capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            raise SystemExit(f"pgbench -i failed ({proc.returncode}):\n{proc.stderr}")
        initialised = True
        log(f"pgbench -i done in {time.monotonic() - t0:.1f}s")
    return {"server_version": server_version, "max_connections": max_conn, "scale": scale, "initialised": initialised}


def reset_tpcb_tables(up: Upstream) -> None:
    """What pgbench does before a run unless -n: done here, directly, so every target gets the same."""
    with psycopg.connect(up.dsn(BENCH_DB), autocommit=True, connect_timeout=10) as conn:
        conn.execute("VACUUM pgbench_branches")
        conn.execute("VACUUM pgbench_tellers")
        conn.execute("TRUNCATE pgbench_history")


# --------------------------------------------------------------------------- proxies


class Proxy:
    name = "proxy"

    def __init__(self, workdir: Path, database: str = BENCH_DB) -> None:
        self.workdir = workdir
        self.database = database  # the one database it serves
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = workdir / f"{self.name}.stderr"
        self.stdout_path = workdir / f"{self.name}.stdout"

    def start(self, up: Upstream, pool_size: int, timeout: float = 30.0) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """user+system seconds of the process, its reaped children and its live children."""
        split = self.cpu_split()
        return None if split is None else split[0] + split[1]

    def cpu_split(self) -> tuple[float, float] | None:
        """(user, system) seconds of the process, its reaped children and its live children: user is
        what the proxy's own code costs (for pgsidecar, mostly CPython), system what its syscalls do."""
        if not self.alive():
            return None
        try:
            p = psutil.Process(self.proc.pid)  # type: ignore[union-attr]
            t = p.cpu_times()
            user, system = t.user + t.children_user, t.system + t.children_system
            for child in p.children(recursive=True):
                try:
                    ct = child.cpu_times()
                    user += ct.user
                    system += ct.system
                except psutil.Error:
                    pass
            return user, system
        except psutil.Error:
            return None

    def stderr_tail(self, n: int = 40) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass


class PgSidecar(Proxy):
    name = "pgsidecar"
    stats_enabled = True  # query observability (issue 3): the default, set explicitly
    extra_env: dict[str, str] = {}  # more PGSIDECAR_* settings of a variant (e.g. the result cache)
    source_dir = REPO_ROOT  # where ``python -m agent`` runs from (a frozen copy of the code, if set so)
    http_port = 0  # the agent's HTTP port (/healthz, /metrics, /api/...)

    def start(self, up: Upstream, pool_size: int, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.http_port = http_port = free_port()
        env = up.pg_env()
        env.update(
            PGSIDECAR_POOL__SIZE=str(pool_size),
            PGSIDECAR_POOL__MAX_OVERFLOW="0",
            PGSIDECAR_POOL__MODE="transaction",
            PGSIDECAR_LOGGING__LEVEL="warning",
            PGSIDECAR_STATS__ENABLED="true" if self.stats_enabled else "false",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        env.pop("DATABASE_URL", None)
        env.pop("PGSIDECAR_CONFIG", None)
        cmd = [
            sys.executable, "-m", "agent", "run",
            "--upstream", up.dsn(self.database),
            "--listen", f"127.0.0.1:{self.port}",
            "--http", f"127.0.0.1:{http_port}",
        ]
        log(f"starting {self.name} on 127.0.0.1:{self.port} (http {http_port}, pool {pool_size}, "
            f"stats {'on' if self.stats_enabled else 'off'}"
            + "".join(f", {k}={v}" for k, v in self.extra_env.items()) + ")")
        self.proc = subprocess.Popen(
            cmd, cwd=self.source_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"), start_new_session=True,
        )
        ready = threading.Event()
        out = open(self.stdout_path, "wb")

        def pump() -> None:  # keeps the stdout pipe drained for the whole run
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if b"proxy listening" in line:
                    ready.set()
            out.close()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready.is_set() and self.alive():
            ready.wait(0.2)
        health = False
        while time.monotonic() < deadline and ready.is_set() and self.alive():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        health = True
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        if not (ready.is_set() and health):
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready (ready={ready.is_set()}, healthz={health}):\n"
                               f"{self.stderr_tail()}")


class PgSidecarNoStats(PgSidecar):
    """pgsidecar exactly as above but with ``PGSIDECAR_STATS__ENABLED=false``: no timing,
    fingerprinting or statistics per statement, so the difference is what observability costs."""

    name = "pgsidecar-nostats"
    stats_enabled = False


class PythonRelay(Proxy):
    """``python_relay.py``: a bare uvloop relay that frames messages, one server connection per
    client (no pooling, no statement tracking). The floor any Python proxy stands on: what of
    pgsidecar's distance to PgBouncer the event loop costs, and what is pgsidecar's own."""

    name = "python-relay"

    def start(self, up: Upstream, pool_size: int, timeout: float = 20.0) -> None:
        self.port = free_port()
        log(f"starting python-relay on 127.0.0.1:{self.port} (no pooling)")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("python_relay.py")), str(self.port), "127.0.0.1",
             str(up.port)],
            stdin=subprocess.DEVNULL, stdout=open(self.stdout_path, "wb"), stderr=open(self.stderr_path, "wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            if b"relay listening" in self.stdout_path.read_bytes():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"python-relay did not start:\n{self.stderr_tail()}")


class PgBouncer(Proxy):
    name = "pgbouncer"

    def start(self, up: Upstream, pool_size: int, timeout: float = 20.0) -> None:
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.port = free_port()
        run_as: str | None = None
        if os.geteuid() == 0:  # pgbouncer refuses to run as root without -u
            run_as = ensure_system_user(PGBOUNCER_USER)
        auth_file = self.workdir / "userlist.txt"
        auth_file.write_text(f'"{up.user}" "{up.password or ""}"\n')
        ini = self.workdir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.database} = host=127.0.0.1 port={up.port} dbname={self.database} user={up.user}"
            + (f" password={up.password}" if up.password else "") + "\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {auth_file}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 1000\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.workdir / 'pgbouncer.log'}\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "log_pooler_errors = 1\n"
        )
        if run_as:
            pw = pwd.getpwnam(run_as)
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            for f in self.workdir.iterdir():
                os.chown(f, pw.pw_uid, pw.pw_gid)
        cmd = [exe] + (["-u", run_as] if run_as else []) + [str(ini)]
        log(f"starting pgbouncer on 127.0.0.1:{self.port} (pool {pool_size}{', as ' + run_as if run_as else ''})")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=up.pg_env(), stdin=subprocess.DEVNULL,
            stdout=open(self.stdout_path, "wb"), stderr=open(self.stderr_path, "wb"), start_new_session=True,
        )
        if not wait_port(self.port, timeout) or not self.alive():
            self.stop()
            logtail = ""
            try:
                logtail = (self.workdir / "pgbouncer.log").read_text(errors="replace")[-3000:]
            except OSError:
                pass
            raise RuntimeError(f"pgbouncer did not start:\n{self.stderr_tail()}\n{logtail}")

    def version(self) -> str:
        try:
            out = subprocess.run([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"],
                                 capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"


class Supervisor:
    """Restarts a proxy that went away mid-run (at most ``MAX_RESTARTS`` times each) and keeps a
    record of every exit (``events``, for the results file)."""

    def __init__(self, proxies: dict[str, Proxy], up: Upstream, pool_size: int) -> None:
        self.proxies = proxies
        self.up = up
        self.pool_size = pool_size
        self.restarts: dict[str, int] = {name: 0 for name in proxies}
        self.events: list[dict[str, Any]] = []

    def ensure_running(self, t: str) -> str | None:
        """None when ``t`` is direct or running (again); else why it is still down."""
        proxy = self.proxies.get(t)
        if proxy is None or proxy.alive():
            return None
        code = proxy.proc.returncode if proxy.proc else None
        event = {"time": _dt.datetime.now().isoformat(timespec="seconds"), "proxy": t, "exit_code": code,
                 "stderr_tail": proxy.stderr_tail(40)}
        self.events.append(event)
        log(f"{t} is not running (exit code {code}); stderr tail:\n{event['stderr_tail'] or '(empty)'}")
        if self.restarts[t] >= MAX_RESTARTS:
            return f"{t} not running (exit code {code}; restart limit {MAX_RESTARTS} reached)"
        self.restarts[t] += 1
        try:
            proxy.start(self.up, self.pool_size)
            event["restarted"] = True
            log(f"restarted {t} on port {proxy.port}")
            return None
        except RuntimeError as exc:
            event["restart_error"] = str(exc)
            return f"{t} not running (exit code {code}; restart failed)"


def ensure_system_user(name: str) -> str:
    try:
        pwd.getpwnam(name)
    except KeyError:
        log(f"creating system user {name} for pgbouncer")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, timeout=30)
    return name


# --------------------------------------------------------------------------- pgbench runs

RE_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
RE_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
RE_TX = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
RE_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
RE_ABORTED = re.compile(r"client \d+ (?:script \d+ )?aborted.*$", re.M)
RE_CONN = re.compile(r"^initial connection time = ([0-9.]+) ms", re.M)
# one block per script, printed by pgbench when several -f/-b are given
RE_SCRIPT_HEAD = re.compile(r"^SQL script \d+: (\S+)$", re.M)
RE_SCRIPT_TX = re.compile(r"^ - (\d+) transactions \(.*tps = ([0-9.]+)\)", re.M)
RE_SCRIPT_LAT = re.compile(r"^ - latency average = ([0-9.]+) ms", re.M)
RE_SCRIPT_FAILED = re.compile(r"^ - number of failed transactions: (\d+)", re.M)


def parse_scripts(out: str) -> list[dict[str, Any]]:
    """pgbench's per-script blocks: name (file stem), transactions, tps, failures, latency."""
    heads = list(RE_SCRIPT_HEAD.finditer(out))
    scripts = []
    for i, head in enumerate(heads):
        block = out[head.end(): heads[i + 1].start() if i + 1 < len(heads) else len(out)]
        tx, lat, failed = RE_SCRIPT_TX.search(block), RE_SCRIPT_LAT.search(block), RE_SCRIPT_FAILED.search(block)
        scripts.append({"script": Path(head.group(1)).stem,
                        "transactions": int(tx.group(1)) if tx else None,
                        "tps": float(tx.group(2)) if tx else None,
                        "failed_transactions": int(failed.group(1)) if failed else None,
                        "latency_ms": float(lat.group(1)) if lat else None})
    return scripts


def write_custom_scripts(workdir: Path, workloads: list[str]) -> dict[str, Path]:
    paths = {}
    for wl in workloads:
        if wl in CUSTOM_SCRIPTS:
            path = workdir / f"{wl}.pgbench"
            path.write_text(CUSTOM_SCRIPTS[wl])
            path.chmod(0o644)
            paths[wl] = path
    return paths


def workload_args(workload: str, scripts: dict[str, Path], scale: int) -> list[str]:
    args = list(WORKLOADS[workload])
    if workload in CUSTOM_SCRIPTS:
        args += ["-f", str(scripts[workload]), "-D", f"scale={scale}"]
    return args


def run_pgbench(up: Upstream, port: int, workload: list[str], clients: int, duration: int,
                proxy: Proxy | None, database: str = BENCH_DB) -> dict[str, Any]:
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", up.user,
           "-c", str(clients), "-j", str(min(2, clients)), "-T", str(duration), "-n",
           *workload, database]
    cpu0 = proxy.cpu_split() if proxy else None
    t0 = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.run(cmd, env=up.pg_env(), capture_output=True, text=True,
                              timeout=duration + 60, start_new_session=True)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        timed_out = True
        rc = -1
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    wall = time.monotonic() - t0
    cpu1 = proxy.cpu_split() if proxy else None
    text = out + "\n" + err

    def grab(rx: re.Pattern[str], conv: Any) -> Any:
        m = rx.search(text)
        return conv(m.group(1)) if m else None

    tps = grab(RE_TPS, float)
    tx = grab(RE_TX, int)
    failed = grab(RE_FAILED, int)
    aborted = RE_ABORTED.findall(text)
    errors: list[str] = []
    if timed_out:
        errors.append(f"pgbench timed out after {duration + 60}s")
    if rc not in (0,) and not timed_out:
        errors.append(f"pgbench exit code {rc}")
    if aborted:
        errors.append(f"{len(aborted)} client(s) aborted")
    if failed:
        errors.append(f"{failed} failed transactions")
    if tps is None and not timed_out:
        errors.append("no tps line in pgbench output")
    if "Run was aborted" in text:
        errors.append("run was aborted")
    if proxy is not None and not proxy.alive():
        errors.append(f"{proxy.name} process died (exit {proxy.proc.returncode if proxy.proc else '?'})")
    user = sys_ = cpu = None
    if cpu0 is not None and cpu1 is not None:
        user, sys_ = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        cpu = user + sys_
    scripts = parse_scripts(out)
    result: dict[str, Any] = {
        "cmd": " ".join(cmd),
        "returncode": rc,
        "wall_s": round(wall, 3),
        "tps": tps,
        "latency_ms": grab(RE_LAT, float),
        "initial_connection_ms": grab(RE_CONN, float),
        "transactions": tx,
        "failed_transactions": failed,
        "aborted_clients": len(aborted),
        "ok": not errors,
        "errors": errors,
        "proxy_cpu_s": round(cpu, 3) if cpu is not None else None,
        "proxy_cpu_s_per_1k_tx": round(cpu / tx * 1000, 4) if (cpu is not None and tx) else None,
        # the same split: microseconds of user and of system CPU per transaction
        "proxy_user_us_per_tx": round(user / tx * 1e6, 1) if (user is not None and tx) else None,
        "proxy_system_us_per_tx": round(sys_ / tx * 1e6, 1) if (sys_ is not None and tx) else None,
    }
    if scripts:
        result["per_script"] = scripts
    if errors:
        # keep the evidence: distinct error lines from pgbench (first few) and the proxy's stderr
        lines = [ln for ln in err.splitlines() if ln.strip()]
        seen: list[str] = []
        for ln in lines:
            key = re.sub(r"client \d+", "client N", ln)
            if key not in seen:
                seen.append(key)
        result["pgbench_stderr"] = seen[:15]
        if proxy is not None:
            result["proxy_stderr_tail"] = proxy.stderr_tail(30)
    return result


# --------------------------------------------------------------------------- single-connection latency

LATENCY_QUERIES = {
    # no parameters -> psycopg uses the simple query protocol (Query message)
    "simple": ("SELECT 1", None),
    # parameters -> extended protocol with the unnamed statement (Parse/Bind/Describe/Execute/Sync)
    "extended": ("SELECT %s::int", (1,)),
}


def latency_block(dsn: str, protocol: str, iterations: int, warmup: int) -> dict[str, Any]:
    sql, params = LATENCY_QUERIES[protocol]
    samples: list[int] = []
    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
            cur = conn.cursor()
            for _ in range(warmup):
                cur.execute(sql, params)
                cur.fetchone()
            pc = time.perf_counter_ns
            for _ in range(iterations):
                t = pc()
                cur.execute(sql, params)
                cur.fetchone()
                samples.append(pc() - t)
    except psycopg.Error as exc:
        return {"samples_ns": samples, "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
    return {"samples_ns": samples, "error": None}


def pct(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    idx = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return float(sorted_vals[idx])


def summarise_latency(samples_ns: list[int]) -> dict[str, Any]:
    if not samples_ns:
        return {"n": 0}
    s = sorted(samples_ns)
    return {
        "n": len(s),
        "mean_us": round(statistics.fmean(s) / 1000, 1),
        "p50_us": round(pct(s, 0.50) / 1000, 1),
        "p99_us": round(pct(s, 0.99) / 1000, 1),
        "max_us": round(s[-1] / 1000, 1),
    }


# --------------------------------------------------------------------------- summary / output


def median_or_none(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(runs: list[dict[str, Any]], workloads: list[str], clients_list: list[int],
              targets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for wl in workloads:
        for c in clients_list:
            row: dict[str, Any] = {"workload": wl, "clients": c, "targets": {}}
            for t in targets:
                rs = [r for r in runs if r["workload"] == wl and r["clients"] == c and r["target"] == t]
                if not rs:
                    continue
                ok = [r for r in rs if r["ok"]]
                row["targets"][t] = {
                    "runs": len(rs),
                    "ok_runs": len(ok),
                    "failed": len(ok) < len(rs),
                    "tps_median": median_or_none([r["tps"] for r in ok]),
                    "tps_median_all_runs": median_or_none([r["tps"] for r in rs]),
                    "latency_ms_median": median_or_none([r["latency_ms"] for r in ok]),
                    "failed_transactions": sum(r["failed_transactions"] or 0 for r in rs),
                    "aborted_clients": sum(r["aborted_clients"] for r in rs),
                    "errors": sorted({e for r in rs for e in r["errors"]}),
                    "stderr_sample": list(dict.fromkeys(
                        ln for r in rs for ln in r.get("pgbench_stderr", [])[:3]))[:3],
                    "cpu_s_per_1k_tx_median": median_or_none([r["proxy_cpu_s_per_1k_tx"] for r in ok]),
                    "user_us_per_tx_median": median_or_none([r.get("proxy_user_us_per_tx") for r in ok]),
                    "system_us_per_tx_median": median_or_none([r.get("proxy_system_us_per_tx") for r in ok]),
                }
            side = row["targets"].get("pgsidecar")
            ref_name = None
            bouncer = row["targets"].get("pgbouncer")
            direct = row["targets"].get("direct")
            if bouncer and not bouncer["failed"] and bouncer["tps_median"]:
                ref_name = "pgbouncer"
            elif direct and not direct["failed"] and direct["tps_median"]:
                ref_name = "direct"
            row["reference"] = ref_name
            if side and ref_name and side["tps_median"] and not side["failed"]:
                row["ratio"] = round(side["tps_median"] / row["targets"][ref_name]["tps_median"], 3)
            else:
                row["ratio"] = None
            relay = row["targets"].get("python-relay")
            if relay and bouncer and relay["tps_median"] and bouncer["tps_median"] and not relay["failed"] \
                    and not bouncer["failed"]:
                row["relay_ratio"] = round(relay["tps_median"] / bouncer["tps_median"], 3)
            else:
                row["relay_ratio"] = None
            if side and direct and side["tps_median"] and direct["tps_median"] and not side["failed"]:
                row["ratio_vs_direct"] = round(side["tps_median"] / direct["tps_median"], 3)
            else:
                row["ratio_vs_direct"] = None
            # what query statistics cost: 1 - pgsidecar TPS / pgsidecar-nostats TPS (0.05 = 5 % fewer tx/s)
            nostats = row["targets"].get("pgsidecar-nostats")
            if (side and nostats and side["tps_median"] and nostats["tps_median"]
                    and not side["failed"] and not nostats["failed"]):
                row["stats_cost"] = round(1 - side["tps_median"] / nostats["tps_median"], 4)
            else:
                row["stats_cost"] = None
            # The same, round by round (the two ran next to each other in each round), median over the
            # rounds both succeeded: less sensitive than the medians' ratio to a round the machine
            # was busier for one of them only.
            pairs = {}
            for r in runs:
                if r["workload"] == wl and r["clients"] == c and r["ok"] and r["tps"] and \
                        r["target"] in ("pgsidecar", "pgsidecar-nostats"):
                    pairs.setdefault(r["round"], {})[r["target"]] = r["tps"]
            paired = [1 - p["pgsidecar"] / p["pgsidecar-nostats"] for p in pairs.values() if len(p) == 2]
            row["stats_cost_paired"] = round(median_or_none(paired), 4) if paired else None
            rows.append(row)
    return rows


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec)


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], latency: dict[str, Any],
                    targets: list[str]) -> str:
    a = meta["args"]
    lines = [
        f"# pgbench: direct vs pgsidecar vs PgBouncer — {meta['started']}",
        "",
        f"Host: {meta['host']['cpus']} CPUs, {meta['host']['platform']}; PostgreSQL {meta['db']['server_version']}, "
        + (f"{meta['pgbouncer_version']}, " if meta.get("pgbouncer_version") else "")
        + f"pgsidecar @ {meta.get('git_commit', '?')}.",
        f"pgbench scale {a['scale']}, {a['duration']} s per run, {a['rounds']} interleaved rounds, `-j 2`, "
        f"pool size {a['pool_size']} (every proxy, transaction mode, no overflow). "
        "pgbench, PostgreSQL and the proxy share the same machine.",
        "",
        "TPS = median over rounds of pgbench's \"tps (without initial connection time)\"; latency = median of "
        "pgbench's average latency. Ratio = pgsidecar / PgBouncer TPS, or / direct (marked `d`) where PgBouncer "
        "failed. python-relay ratio = python-relay / PgBouncer TPS (python-relay: a bare uvloop relay that "
        "frames messages, one server connection per client: the floor for a proxy in Python). "
        "Stats cost = 1 - pgsidecar TPS / pgsidecar-nostats TPS (pgsidecar-nostats: the same proxy "
        "with `PGSIDECAR_STATS__ENABLED=false`); paired: the median over rounds of the same, each round's two runs "
        "side by side. CPU = proxy process CPU seconds (user+system) per 1,000 "
        "transactions, and in brackets µs of user / system CPU per transaction (user: the proxy's own "
        "code; system: its syscalls).",
        "",
    ]
    db = meta["db"]
    if db.get("connections_needed", 0) > db["max_connections"]:
        lines += [
            f"**Warning:** PostgreSQL max_connections = {db['max_connections']}, but the biggest direct run "
            f"next to every proxy's open server pool needs {db['connections_needed']}: direct runs at "
            f"{max(a['clients_list'])} clients can fail with \"too many clients\".",
            "",
        ]
    lines += [
        "| workload | clients | " + " | ".join(f"{t} TPS" for t in targets)
        + " | ratio | python-relay ratio | stats cost | stats cost, paired | "
        + " | ".join(f"{t} lat ms" for t in targets)
        + " | failures (fail tx / aborted) | "
        + " | ".join(f"{PROXY_LABELS[t]} CPU s/1k tx" for t in PROXIES) + " |",
        "|" + "---|" * (2 + len(targets) + 4 + len(targets) + 1 + len(PROXIES)),
    ]
    for row in rows:
        cells = [row["workload"], str(row["clients"])]
        for t in targets:
            s = row["targets"].get(t)
            if not s:
                cells.append("–")
            elif s["failed"]:
                cells.append(f"FAIL ({s['runs'] - s['ok_runs']}/{s['runs']})")
            else:
                cells.append(fmt(s["tps_median"], ".0f"))
        if row["ratio"] is None:
            cells.append("–")
        else:
            cells.append(f"{row['ratio']:.2f}" + (" d" if row["reference"] == "direct" else ""))
        cells.append(fmt(row.get("relay_ratio"), ".2f"))
        cells.append("–" if row.get("stats_cost") is None else f"{row['stats_cost'] * 100:.1f} %")
        cells.append("–" if row.get("stats_cost_paired") is None else f"{row['stats_cost_paired'] * 100:.1f} %")
        for t in targets:
            s = row["targets"].get(t)
            cells.append(fmt(s["latency_ms_median"], ".2f") if s else "–")
        fails = []
        for t in targets:
            s = row["targets"].get(t)
            if s and (s["failed_transactions"] or s["aborted_clients"] or s["failed"]):
                fails.append(f"{t}: {s['failed_transactions']}/{s['aborted_clients']}")
        cells.append("; ".join(fails) or "none")
        for t in PROXIES:
            s = row["targets"].get(t)
            if not s:
                cells.append("–")
                continue
            split = ""
            if s.get("user_us_per_tx_median") is not None and s.get("system_us_per_tx_median") is not None:
                split = f" ({s['user_us_per_tx_median']:.0f} / {s['system_us_per_tx_median']:.0f})"
            cells.append(fmt(s["cpu_s_per_1k_tx_median"], ".3f") + split)
        lines.append("| " + " | ".join(cells) + " |")

    errs = [(row["workload"], row["clients"], t, s) for row in rows
            for t, s in row["targets"].items() if s["errors"]]
    if errs:
        lines += ["", "Errors (pgbench stderr samples; full output and proxy stderr in the JSON):", ""]
        for wl, c, t, s in errs:
            lines.append(f"- {wl} c={c} {t}: {'; '.join(s['errors'])}")
            for ln in s["stderr_sample"]:
                lines.append(f"  - `{ln[:200]}`")

    if latency:
        lines += [
            "",
            f"## Single-connection latency ({meta['args']['latency_iterations']} sequential queries per target "
            f"per round, {meta['args']['rounds']} rounds interleaved, psycopg 3, autocommit)",
            "",
            "| protocol | target | mean µs | p50 µs | p99 µs | overhead mean µs | overhead p50 µs | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for proto, per_target in latency.items():
            d = per_target.get("direct", {}).get("summary", {})
            for t in targets:
                entry = per_target.get(t)
                if not entry:
                    continue
                s = entry["summary"]
                om = round(s["mean_us"] - d["mean_us"], 1) if s.get("n") and d.get("n") and t != "direct" else None
                op = round(s["p50_us"] - d["p50_us"], 1) if s.get("n") and d.get("n") and t != "direct" else None
                lines.append(f"| {proto} | {t} | {fmt(s.get('mean_us'))} | {fmt(s.get('p50_us'))} | "
                             f"{fmt(s.get('p99_us'))} | {fmt(om)} | {fmt(op)} | {'; '.join(dict.fromkeys(entry['errors'])) or 'none'} |")
    events = meta.get("proxy_events") or []
    if events:
        lines += ["", "Proxy exits during the run (each was restarted unless noted; details in the JSON):", ""]
        for e in events:
            lines.append(f"- {e['time']} {e['proxy']} exit code {e['exit_code']}"
                         + ("" if e.get("restarted") else " (not restarted)"))
    lines.append("")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", default=os.environ.get("PGSIDECAR_TEST_DSN", DEFAULT_DSN),
                   help="PostgreSQL admin DSN (127.0.0.1 only); default $PGSIDECAR_TEST_DSN or " + DEFAULT_DSN)
    p.add_argument("--duration", type=int, default=None, help="seconds per pgbench run (default 8; --quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--clients", default="10,50", help="comma-separated pgbench -c values (default 10,50)")
    p.add_argument("--pool-size", type=int, default=20, help="server pool size of every proxy (default 20)")
    p.add_argument("--scale", type=int, default=None, help="pgbench -i -s (default 10; --quick 1)")
    p.add_argument("--skip-init", action="store_true", help="reuse existing pgbench tables if the scale matches")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of: " + ", ".join(WORKLOADS))
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of: " + ", ".join(TARGETS))
    p.add_argument("--latency-iterations", type=int, default=None,
                   help="sequential queries per target per round for the latency test (default 5000; --quick 500; 0 = skip)")
    p.add_argument("--quick", action="store_true", help="short runs to check the script end to end (~1-2 min)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration if a.duration is not None else (2 if q else 8)
    a.rounds = a.rounds if a.rounds is not None else (1 if q else 3)
    a.scale = a.scale if a.scale is not None else (1 if q else 10)
    a.latency_iterations = a.latency_iterations if a.latency_iterations is not None else (500 if q else 5000)
    a.clients_list = [int(x) for x in a.clients.split(",") if x.strip()]
    a.workload_list = [w.strip() for w in a.workloads.split(",") if w.strip()]
    a.target_list = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [w for w in a.workload_list if w not in WORKLOADS] + [t for t in a.target_list if t not in TARGETS]
    if bad:
        p.error(f"unknown workload/target: {', '.join(bad)}")
    if not (1 <= a.duration <= 3600 and 1 <= a.rounds <= 50 and a.clients_list and a.pool_size >= 1):
        p.error("duration 1..3600, rounds 1..50, at least one client count, pool size >= 1")
    if any(c < 1 or c > 900 for c in a.clients_list):
        p.error("clients must be in 1..900")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    }
    meta["db"] = prepare_database(up, args.scale, args.skip_init)
    # every proxy keeps its server pool open between runs (idle timeouts of 600 s), so a direct run
    # needs room for its clients next to all the proxies' pools, plus one admin connection
    n_proxies = sum(t in PROXIES and t not in UNPOOLED for t in args.target_list)
    # (direct and python-relay runs never overlap: room for one of them)
    unpooled = "direct" in args.target_list or any(t in UNPOOLED for t in args.target_list)
    needed = unpooled * max(args.clients_list) + n_proxies * args.pool_size + 1
    meta["db"]["connections_needed"] = needed
    if meta["db"]["max_connections"] < needed:
        log(f"warning: max_connections={meta['db']['max_connections']} may be too low: "
            f"{max(args.clients_list)} direct clients + {n_proxies} proxies x pool {args.pool_size} "
            f"+ 1 need {needed}; direct runs may fail with 'too many clients' (raise max_connections, or "
            f"lower --pool-size/--clients, or leave a proxy out of --targets)")

    workdir = Path(tempfile.mkdtemp(prefix="pgsidecar-bench-"))
    os.chmod(workdir, 0o755)
    scripts = write_custom_scripts(workdir, args.workload_list)
    proxies: dict[str, Proxy] = {}
    runs: list[dict[str, Any]] = []
    latency: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        if "pgbouncer" in args.target_list:
            bdir = workdir / "pgbouncer"
            bdir.mkdir()
            b = PgBouncer(bdir)
            meta["pgbouncer_version"] = b.version()
            b.start(up, args.pool_size)
            proxies["pgbouncer"] = b
        for cls in (PgSidecar, PgSidecarNoStats, PythonRelay):
            if cls.name in args.target_list:
                sdir = workdir / cls.name
                sdir.mkdir()
                s = cls(sdir)
                s.start(up, args.pool_size)
                proxies[cls.name] = s
        targets = list(args.target_list)
        supervisor = Supervisor(proxies, up, args.pool_size)
        ensure_running = supervisor.ensure_running
        meta["proxy_events"] = supervisor.events

        def port_of(t: str) -> int:
            return up.port if t == "direct" else proxies[t].port

        total = len(args.workload_list) * len(args.clients_list) * args.rounds * len(targets)
        eta = total * (args.duration + 1)
        log(f"{total} pgbench runs, about {eta // 60} min {eta % 60} s")
        n = 0
        for wl in args.workload_list:
            for c in args.clients_list:
                for rnd in range(args.rounds):
                    k = (rnd + args.clients_list.index(c)) % len(targets)
                    order = targets[k:] + targets[:k]
                    for t in order:
                        n += 1
                        proxy = proxies.get(t)
                        down = ensure_running(t)
                        if down:
                            r = {"ok": False, "errors": [down], "tps": None, "latency_ms": None,
                                 "transactions": None, "failed_transactions": None, "aborted_clients": 0,
                                 "proxy_cpu_s_per_1k_tx": None}
                        else:
                            if wl.startswith("tpcb"):
                                reset_tpcb_tables(up)
                            r = run_pgbench(up, port_of(t), workload_args(wl, scripts, meta["db"]["scale"]),
                                            c, args.duration, proxy)
                        r.update(workload=wl, clients=c, round=rnd, target=t)
                        runs.append(r)
                        cpu = f" cpu/1k={r['proxy_cpu_s_per_1k_tx']}" if r.get("proxy_cpu_s_per_1k_tx") else ""
                        log(f"[{n}/{total}] {wl:16s} c={c:<3d} r{rnd} {t:17s} tps={fmt(r['tps'], '.0f'):>6s} "
                            f"lat={fmt(r['latency_ms'], '.2f')}ms{cpu}"
                            + (f"  ERR: {'; '.join(r['errors'])}" if r["errors"] else ""))

        if args.latency_iterations > 0:
            warmup = min(200, args.latency_iterations)
            for proto in LATENCY_QUERIES:
                acc: dict[str, dict[str, Any]] = {t: {"samples": [], "errors": []} for t in targets}
                for rnd in range(args.rounds):
                    k = rnd % len(targets)
                    for t in targets[k:] + targets[:k]:
                        down = ensure_running(t)
                        if down:
                            acc[t]["errors"].append(down)
                            continue
                        res = latency_block(up.dsn(BENCH_DB, port_of(t)), proto, args.latency_iterations, warmup)
                        acc[t]["samples"].extend(res["samples_ns"])
                        if res["error"]:
                            acc[t]["errors"].append(res["error"])
                latency[proto] = {t: {"summary": summarise_latency(v["samples"]), "errors": v["errors"]}
                                  for t, v in acc.items()}
                d = latency[proto].get("direct", {}).get("summary", {})
                for t in targets:
                    s = latency[proto][t]["summary"]
                    extra = f" (+{s['mean_us'] - d['mean_us']:.1f} µs mean vs direct)" if t != "direct" and s.get("n") and d.get("n") else ""
                    log(f"latency {proto:8s} {t:17s} mean={s.get('mean_us')} p50={s.get('p50_us')} "
                        f"p99={s.get('p99_us')} µs{extra}")
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
    rows = summarise(runs, args.workload_list, args.clients_list, args.target_list)
    md = render_markdown(meta, rows, latency, args.target_list)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / f"pgbench-{stamp}.json"
    json_path.write_text(json.dumps({"meta": meta, "summary": rows, "latency": {
        proto: {t: v for t, v in per.items()} for proto, per in latency.items()}, "runs": runs}, indent=2))
    (args.output_dir / "pgbench-latest.md").write_text(md)
    print()
    print(md)
    log(f"wrote {json_path} and {args.output_dir / 'pgbench-latest.md'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
