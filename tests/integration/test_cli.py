"""The pgsidecar command as a newcomer and an operator use it: a real subprocess."""
from __future__ import annotations

import os
import socket
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PGSIDECAR_")}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


class Sidecar:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.port = _free_port()
        self.http = _free_port()
        cmd = [sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{self.port}",
               "--http", f"127.0.0.1:{self.http}", *args]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.banner = ""
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.banner += line
            if "/healthz" in line:
                return
        self.stop()
        raise AssertionError(f"pgsidecar did not start: {self.banner}{self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def sidecars() -> Iterator[list[Sidecar]]:
    started: list[Sidecar] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def test_run_with_database_url_proxies_and_answers_healthz(pg_server: Any, sidecars: list[Sidecar]) -> None:
    sidecar = Sidecar([], _env(DATABASE_URL=pg_server.dsn, PGSIDECAR_POOL__SIZE="2"))
    sidecars.append(sidecar)
    assert f"127.0.0.1:{sidecar.port}" in sidecar.banner
    with psycopg.connect(host="127.0.0.1", port=sidecar.port, user=pg_server.user, dbname=pg_server.database,
                         **({"password": pg_server.password} if pg_server.password else {})) as conn:
        assert conn.execute("select current_database()").fetchone() == (pg_server.database,)
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.http}/healthz", timeout=5) as resp:
        assert resp.status == 200
    err = sidecar.stop()
    assert sidecar.proc.returncode == 0, err
    assert "secret" not in err


def test_run_without_upstream_starts_embedded_postgres(tmp_path: Path, sidecars: list[Sidecar]) -> None:
    data_dir = tmp_path / "pgdata"
    tmp_path.chmod(0o755)
    sidecar = Sidecar([], _env(PGSIDECAR_EMBEDDED__DATA_DIR=str(data_dir)))
    sidecars.append(sidecar)
    dsn_line = next(line for line in sidecar.banner.splitlines() if "connect with" in line)
    dsn = dsn_line.split("connect with ", 1)[1].strip()
    with psycopg.connect(dsn) as conn:
        version = conn.execute("show server_version").fetchone()
        assert version is not None and version[0].split(".")[0].isdigit()
    assert (data_dir / "PG_VERSION").exists()
    sidecar.stop()
    assert sidecar.proc.returncode == 0


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PGSIDECAR_POOL__SIZE": "abc"}, "pool.size: 'abc'"),
        ({"PGSIDECAR_POOL__MODE": "statement"}, "pool.mode: 'statement'"),
        ({"PGSIDECAR_POOL__SIZEE": "3"}, "pool.sizee"),
    ],
)
def test_bad_settings_stop_startup_with_one_line_naming_the_key(env: dict[str, str], needle: str) -> None:
    for command in ("check-config", "run"):
        proc = subprocess.run([sys.executable, "-m", "agent", command], env=_env(**env), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_check_config_redacts_secrets() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", "--upstream",
                           "postgresql://app:hunter2@db.internal:5432/app"],
                          env=_env(PGSIDECAR_AGENT__ADMIN_TOKEN="tok3n"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "tok3n" not in proc.stdout
    assert "db.internal" in proc.stdout


def _cache_cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "cache", *args, "--upstream", dsn], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def _triggered_tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE t.tgname = 'pgsidecar_cache_invalidate'").fetchall()
    return {r[0] for r in rows}


def test_cache_install_triggers_named_all_and_remove(pg_server: Any, direct: Any) -> None:
    # A database of its own: "every table" and "remove" must not touch other tests' tables.
    admin = direct()
    admin.execute("DROP DATABASE IF EXISTS cli_cache WITH (FORCE)")
    admin.execute("CREATE DATABASE cli_cache")
    dsn = pg_server.with_database("cli_cache").dsn
    conn = direct(dbname="cli_cache")
    conn.execute("CREATE SCHEMA s")
    conn.execute("CREATE TABLE s.a (id int)")
    conn.execute("CREATE TABLE s.b (id int)")
    conn.execute("CREATE VIEW s.v AS SELECT * FROM s.a")
    try:
        done = _cache_cli("install-triggers", "s.a", dsn=dsn)
        assert done.returncode == 0, done.stderr
        assert "installed on 1 table(s) in cli_cache: s.a" in done.stdout
        assert "DDL event triggers installed" in done.stdout  # the test cluster's user is a superuser
        assert _triggered_tables(conn) == {"a"}
        assert conn.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgsidecar_cache%'"
                            ).fetchone() == (2,)

        # The trigger notifies the table's name when a write commits, and nothing on rollback.
        listener = direct(dbname="cli_cache")
        listener.execute("LISTEN pgsidecar_cache")
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO s.a VALUES (1)")
        conn.execute("INSERT INTO s.a VALUES (2)")
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
        assert notes == [{"tables": ["a"], "columns": None, "keys": {"id": [2]}}]

        unknown = _cache_cli("install-triggers", "s.nope", dsn=dsn)
        assert unknown.returncode == 1 and "does not exist" in unknown.stderr
        view = _cache_cli("install-triggers", "s.v", dsn=dsn)
        assert view.returncode == 1 and "is not a table" in view.stderr

        everything = _cache_cli("install-triggers", dsn=dsn)
        assert everything.returncode == 0, everything.stderr
        assert _triggered_tables(conn) == {"a", "b"}
        # One UPDATE OF trigger per column, beside the table's (column-level invalidation).
        conn.execute("ALTER TABLE s.b ADD COLUMN note text")
        again = _cache_cli("install-triggers", "s.b", dsn=dsn)
        assert again.returncode == 0, again.stderr
        column_triggers = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgsidecar_cache_col_%'"
        assert conn.execute(column_triggers).fetchone() == (3,)  # s.a: id; s.b: id, note
        # Per table: s.b loses its triggers (the table's and its column triggers), s.a keeps its own
        # and the functions stay; a running sidecar hears of it on the DDL channel at once.
        ddl_listener = direct(dbname="cli_cache")
        ddl_listener.execute("LISTEN pgsidecar_cache_ddl")
        one = _cache_cli("remove-triggers", "s.b", dsn=dsn)
        assert one.returncode == 0, one.stderr
        assert "removed from 1 table(s) in cli_cache: s.b" in one.stdout
        assert _triggered_tables(conn) == {"a"}
        assert conn.execute(column_triggers).fetchone() == (1,)  # s.a: id
        assert conn.execute("SELECT to_regproc('public.pgsidecar_cache_notify_rows')").fetchone() != (None,)
        heard = []
        for note in ddl_listener.notifies(timeout=5):
            heard.append(json.loads(note.payload))
            if heard[-1] == ["b"]:
                break
        assert heard[-1:] == [["b"]], heard
        missing = _cache_cli("remove-triggers", "s.nope", dsn=dsn)
        assert missing.returncode == 1 and "does not exist" in missing.stderr
        assert _triggered_tables(conn) == {"a"}
        ddl_listener.close()
        back = _cache_cli("install-triggers", "s.b", dsn=dsn)
        assert back.returncode == 0, back.stderr
        conn.execute("DROP TRIGGER pgsidecar_cache_invalidate ON s.b")  # only its column triggers left

        removed = _cache_cli("remove-triggers", dsn=dsn)
        assert removed.returncode == 0, removed.stderr
        assert _triggered_tables(conn) == set()
        assert conn.execute(column_triggers).fetchone() == (0,)
        for function in ("pgsidecar_cache_notify", "pgsidecar_cache_mark_column", "pgsidecar_cache_notify_rows"):
            assert conn.execute(f"SELECT to_regproc('public.{function}')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)
    finally:
        conn.close()
        admin.execute("DROP DATABASE cli_cache WITH (FORCE)")


def test_cache_command_without_upstream_names_what_is_missing() -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "cache", "install-triggers"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "DATABASE_URL" in done.stderr


def _webhooks_cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "webhooks", *args, "--upstream", dsn], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_webhooks_install_watch_list_unwatch_on_a_database_of_ones_own(fresh_db: Any) -> None:
    dsn, connect = fresh_db
    conn = connect()
    conn.execute("CREATE SCHEMA shop")
    conn.execute("CREATE TABLE shop.orders (id int PRIMARY KEY, total numeric)")

    missing = _webhooks_cli("watch", "shop.orders", dsn=dsn)
    assert missing.returncode == 1 and "pgsidecar migrate" in missing.stderr  # says what to do first

    done = _webhooks_cli("install", dsn=dsn)
    assert done.returncode == 0, done.stderr
    done = _webhooks_cli("watch", "shop.orders", dsn=dsn)
    assert done.returncode == 0 and "shop.orders now emit" in done.stdout, done.stderr
    listed = _webhooks_cli("list", dsn=dsn)
    assert "watched tables" in listed.stdout and "shop.orders" in listed.stdout
    assert "no endpoints registered" in listed.stdout

    # A committed change writes its event (with the row) in the same transaction; a rolled-back one nothing.
    with conn.transaction(force_rollback=True):
        conn.execute("INSERT INTO shop.orders VALUES (1, 9.5)")
    conn.execute("INSERT INTO shop.orders VALUES (2, 12)")
    conn.execute("TRUNCATE shop.orders")
    events = conn.execute("SELECT event_type, payload->'new'->>'id' FROM webhook_events ORDER BY id").fetchall()
    assert events == [("orders.insert", "2"), ("orders.truncate", None)]

    unknown = _webhooks_cli("watch", "shop.nope", dsn=dsn)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
    done = _webhooks_cli("unwatch", "shop.orders", dsn=dsn)
    assert done.returncode == 0, done.stderr
    conn.execute("INSERT INTO shop.orders VALUES (3, 1)")
    assert conn.execute("SELECT count(*) FROM webhook_events").fetchone() == (2,)
    assert "none" in _webhooks_cli("list", dsn=dsn).stdout
