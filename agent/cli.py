"""The ``pgsidecar`` command line: ``run``, ``check-config``, ``cache install-triggers|remove-triggers``
and ``migrate`` (the recruiter database's Alembic migrations)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from config.loader import ConfigError, load_settings, parse_dsn, redacted
from config.settings import Settings

log = logging.getLogger(__name__)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgsidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML settings file (see config/sidecar.yaml)")
        p.add_argument("--upstream", help="PostgreSQL DSN to proxy to (default: DATABASE_URL)")
        p.add_argument("--listen", type=_host_port, help="proxy address HOST:PORT (default 127.0.0.1:6432)")
        p.add_argument("--http", type=_host_port, help="agent HTTP address HOST:PORT (default 127.0.0.1:9930)")

    common(sub.add_parser("run", help="run the proxy and the agent"))
    common(sub.add_parser("check-config", help="validate the settings and print them (secrets redacted)"))
    cache = sub.add_parser("cache", help="result cache administration")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    install = cache_sub.add_parser(
        "install-triggers",
        help="put the cache's invalidation trigger on tables (every table of the database when none is named)")
    install.add_argument("tables", nargs="*", metavar="TABLE", help="table names, optionally schema-qualified")
    remove = cache_sub.add_parser(
        "remove-triggers",
        help="drop the cache's invalidation trigger from tables (every trigger, its functions and the DDL event "
             "triggers when none is named)")
    remove.add_argument("tables", nargs="*", metavar="TABLE", help="table names, optionally schema-qualified")
    for p in (install, remove):
        common(p)
        p.add_argument("--database", help="database to work in (default: the upstream DSN's)")
    hooks = sub.add_parser("webhooks", help="webhook emitter administration")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    hooks_install = hooks_sub.add_parser(
        "install", help="create the webhook tables and functions (what `migrate` does, for a database of your own)")
    watch = hooks_sub.add_parser("watch", help="emit <table>.insert|update|delete|truncate events for these tables")
    unwatch = hooks_sub.add_parser("unwatch", help="stop emitting events for these tables")
    for p in (watch, unwatch):
        p.add_argument("tables", nargs="+", metavar="TABLE", help="table names, optionally schema-qualified")
    hooks_list = hooks_sub.add_parser("list", help="print the watched tables and the registered endpoints")
    for p in (hooks_install, watch, unwatch, hooks_list):
        common(p)
        p.add_argument("--database", help="database to work in (default: webhooks.database, else the upstream DSN's)")
    migrate = sub.add_parser("migrate", help="apply the database migrations (default: upgrade to head)")
    common(migrate)
    where = migrate.add_mutually_exclusive_group()
    where.add_argument("--to", metavar="REV", help="upgrade to REV instead of head")
    where.add_argument("--down", metavar="REV", help="downgrade to REV ('base': remove everything)")
    where.add_argument("--status", action="store_true", help="print the current revision and the pending ones")
    migrate.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    seed = sub.add_parser("seed-demo", help="fill the migrated recruiter schema with synthetic data")
    common(seed)
    seed.add_argument("--users", type=int, default=10_000, help="number of users (default 10000)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.upstream:
        out["upstream.dsn"] = args.upstream
    if args.listen:
        out["proxy.host"], out["proxy.port"] = args.listen
    if args.http:
        out["agent.host"], out["agent.port"] = args.http
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"pgsidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import json

        print(json.dumps(redacted(settings), indent=2))
        return 0
    if args.command == "cache":
        return asyncio.run(_cache_command(settings, args))
    if args.command == "webhooks":
        return asyncio.run(_webhooks_command(settings, args))
    if args.command == "migrate":
        return _migrate_command(settings, args)
    if args.command == "seed-demo":
        return _seed_demo_command(settings, args)
    from .logs import setup_logging

    setup_logging(settings.logging)
    if settings.proxy.use_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    try:
        return asyncio.run(_run(settings))
    except KeyboardInterrupt:
        return 0


def reachable(host: str) -> str:
    """A listening address as a client on this host writes it in a URL: a wildcard address
    ("0.0.0.0", "::", "") as this host's loopback, an IPv6 address in brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _run(settings: Settings) -> int:
    from aiohttp import web

    from proxy.listener import ProxyServer

    from .app import create_app

    embedded = None
    dsn: str | None = settings.upstream.dsn
    if not dsn:
        from .embedded import start_embedded

        dsn, embedded = await asyncio.to_thread(start_embedded, settings.embedded.data_dir)
    log.info("settings", extra={"settings": redacted(settings)})
    assert dsn, "start_embedded returns the embedded server's DSN"
    upstream = parse_dsn(dsn)
    proxy = ProxyServer(settings, upstream)
    try:
        await proxy.start()
    except OSError as exc:
        print(f"pgsidecar: cannot listen on {settings.proxy.host}:{settings.proxy.port}: {exc.strerror}", file=sys.stderr)
        return 1
    runner = web.AppRunner(create_app(settings, proxy), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.agent.host, settings.agent.port)
    try:
        await site.start()
    except OSError as exc:
        await proxy.stop()
        print(f"pgsidecar: cannot listen on {settings.agent.host}:{settings.agent.port}: {exc.strerror}", file=sys.stderr)
        return 1
    user = upstream.user or "postgres"
    database = upstream.database or user
    print(
        f"pgsidecar: proxy listening; connect with postgresql://{user}@{reachable(proxy.host)}:{proxy.port}/{database}\n"
        f"pgsidecar: agent on http://{reachable(settings.agent.host)}:{settings.agent.port}/healthz",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting_down")
    # The agent first: the GraphQL gateway's sessions to the proxy, the webhook emitter and the
    # view refresher close cleanly while the proxy still serves; then the proxy drains its clients.
    await runner.cleanup()
    await proxy.stop(grace=5.0)
    if embedded is not None:
        await asyncio.to_thread(embedded.cleanup)
    return 0


async def _cache_command(settings: Settings, args: argparse.Namespace) -> int:
    """``pgsidecar cache install-triggers [TABLE ...]`` / ``remove-triggers [TABLE ...]`` on the upstream."""
    import asyncpg

    from proxy.invalidation import install_event_triggers, install_triggers, remove_triggers

    conn, database = await _connect_upstream(settings, args.database, "cache")
    if conn is None:
        return 2 if database is None else 1
    try:
        events = None
        if args.cache_command == "install-triggers":
            done = await install_triggers(conn, list(args.tables) or None)
            events = await install_event_triggers(conn)
            verb = "installed on"
        else:
            done = await remove_triggers(conn, list(args.tables) or None)
            verb = "removed from"
    except (ValueError, asyncpg.PostgresError) as exc:
        print(f"pgsidecar: cache: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    print(f"pgsidecar: cache invalidation trigger {verb} {len(done)} table(s) in {database}"
          + (": " + ", ".join(done) if done else ""))
    if events is True:
        print("pgsidecar: DDL event triggers installed: ALTER/DROP run straight on the server evict too")
    elif events is False:
        print("pgsidecar: note: not a superuser, so no DDL event triggers: DDL run straight on the server "
              "(not through the proxy) is seen only when the cached entries expire (cache.ttl_s)")
    return 0


async def _connect_upstream(settings: Settings, database: str | None, what: str) -> tuple[Any, str | None]:
    """(asyncpg connection, database) for an admin command; (None, None) without an upstream,
    (None, database) when it cannot connect (both already told the user)."""
    import asyncpg

    if not settings.upstream.dsn:
        print(f"pgsidecar: {what}: no upstream: set DATABASE_URL, --upstream or upstream.dsn", file=sys.stderr)
        return None, None
    up = parse_dsn(settings.upstream.dsn)
    database = database or up.database or up.user or "postgres"
    try:
        conn = await asyncpg.connect(
            host=up.host, port=up.port, user=up.user, password=up.password,
            database=database, timeout=settings.upstream.connect_timeout, ssl=False)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"pgsidecar: {what}: cannot connect to {up.host}:{up.port}/{database}: {exc}", file=sys.stderr)
        return None, database
    return conn, database


async def _webhooks_command(settings: Settings, args: argparse.Namespace) -> int:
    """``pgsidecar webhooks install | watch TABLE... | unwatch TABLE... | list`` on the upstream."""
    import asyncpg

    from .webhooks.sql import SCHEMA_SQL, TABLES, TABLES_PRESENT_SQL, WATCHED_SQL, unwatch_sql, watch_sql

    conn, database = await _connect_upstream(settings, args.database or settings.webhooks.database, "webhooks")
    if conn is None:
        return 2 if database is None else 1
    command = args.webhooks_command
    try:
        if command == "install":
            await conn.execute(SCHEMA_SQL)
            print(f"pgsidecar: webhook tables and functions installed in {database}")
            return 0
        if not await conn.fetchval(TABLES_PRESENT_SQL, list(TABLES)):
            print(f"pgsidecar: webhooks: the webhook tables do not exist in {database}: run `pgsidecar migrate` "
                  "or `pgsidecar webhooks install` first", file=sys.stderr)
            return 1
        if command in ("watch", "unwatch"):
            make = watch_sql if command == "watch" else unwatch_sql
            async with conn.transaction():
                for table in args.tables:
                    await conn.execute(make(table))
            verb = "now emit" if command == "watch" else "no longer emit"
            print(f"pgsidecar: {', '.join(args.tables)} {verb} webhook events in {database}")
            return 0
        watched = [r["name"] for r in await conn.fetch(WATCHED_SQL)]
        endpoints = await conn.fetch("SELECT id, url, events, active FROM public.webhook_endpoints ORDER BY id")
        print(f"watched tables in {database}: {', '.join(watched) or 'none'}")
        for e in endpoints:
            state = "active" if e["active"] else "disabled"
            print(f"endpoint {e['id']}: {e['url']} events={','.join(e['events'])} {state}")
        if not endpoints:
            print("no endpoints registered (POST /api/webhooks/register)")
        return 0
    except (ValueError, asyncpg.PostgresError) as exc:
        print(f"pgsidecar: webhooks: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()


def _migrate_command(settings: Settings, args: argparse.Namespace) -> int:
    """``pgsidecar migrate [--to REV | --down REV | --status] [--sql]`` on the upstream."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from migrations import runner

    if not settings.upstream.dsn:
        print("pgsidecar: migrate: no database: set DATABASE_URL, --upstream or upstream.dsn", file=sys.stderr)
        return 2
    dsn = settings.upstream.dsn
    up = parse_dsn(dsn)
    where = f"{up.host}:{up.port}/{up.database or up.user or 'postgres'}"

    def progress(step: runner.Applied) -> None:
        verb = "applied" if step.direction == "up" else "reverted"
        print(f"pgsidecar: migrate: {verb} {step.revision}: {step.doc}", flush=True)

    try:
        if args.status:
            cfg = runner.alembic_config(dsn)
            cur = runner.current(dsn)
            todo = runner.pending(dsn)
            print(f"pgsidecar: migrate: {where} at {cur or 'base'} (head {', '.join(runner.heads(cfg))})")
            print("pgsidecar: migrate: pending: " + (", ".join(todo) if todo else "none"))
            return 0
        cfg = runner.alembic_config(dsn, on_apply=None if args.sql else progress, output=sys.stdout)
        cfg.attributes["on_wait"] = lambda: print(
            "pgsidecar: migrate: another migration run holds the lock; waiting", flush=True)
        if args.down:
            target = args.down
            if args.sql:  # offline: from the database's revision (Alembic needs it spelled out)
                target = f"{runner.current(dsn) or 'base'}:{target}"
            runner.downgrade(cfg, target, sql=args.sql)
        else:
            target = args.to or "head"
            if args.sql:
                cur = runner.current(dsn)
                target = f"{cur}:{target}" if cur else target
            runner.upgrade(cfg, target, sql=args.sql)
    except CommandError as exc:
        print(f"pgsidecar: migrate: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        # Names the statement and the server's message; revisions already applied stay stamped.
        orig = getattr(exc, "orig", None) or exc
        statement = getattr(exc, "statement", None)
        revision = ""
        if not args.status and not args.sql:
            # Each revision commits on its own: the failed one is the next after (upgrade) or
            # the one at (downgrade) the revision the database is stamped with now.
            try:
                todo = [] if args.down else runner.pending(dsn)
                failed = todo[0] if todo else (runner.current(dsn) if args.down else None)
            except SQLAlchemyError:
                failed = None
            revision = f" revision {failed}" if failed else ""
        print(f"pgsidecar: migrate:{revision} failed on {where}: {str(orig).strip()}"
              + (f"\n  statement: {statement.strip()[:500]}" if statement else ""), file=sys.stderr)
        return 1
    if not args.sql:
        print(f"pgsidecar: migrate: {where} now at {runner.current(dsn) or 'base'}")
    return 0


def _seed_demo_command(settings: Settings, args: argparse.Namespace) -> int:
    """``pgsidecar seed-demo --users N``: synthetic rows in the migrated recruiter schema."""
    from sqlalchemy.exc import SQLAlchemyError

    from migrations.demo import seed_demo

    if not settings.upstream.dsn:
        print("pgsidecar: seed-demo: no database: set DATABASE_URL, --upstream or upstream.dsn", file=sys.stderr)
        return 2
    try:
        counts = seed_demo(settings.upstream.dsn, args.users,
                           lambda table, n: print(f"pgsidecar: seed-demo: {table}: {n} rows", flush=True))
    except ValueError as exc:
        print(f"pgsidecar: seed-demo: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        print(f"pgsidecar: seed-demo: failed (run `pgsidecar migrate` first?): {str(orig).strip()}", file=sys.stderr)
        return 1
    print(f"pgsidecar: seed-demo: {sum(counts.values())} rows inserted")
    return 0
