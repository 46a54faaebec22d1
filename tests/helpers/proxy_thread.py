"""Run a real ProxyServer on a free port in a background thread with its own event loop.

A thread (not the test's loop) so that blocking clients (psycopg2, psql, pgbench in a
subprocess) and asyncio clients in the test's own loop can all talk to it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from config.loader import load_settings, parse_dsn
from config.settings import Settings
from proxy.listener import ProxyServer

T = TypeVar("T")


class RunningProxy:
    """A ProxyServer serving on 127.0.0.1:<port> from its own thread."""

    def __init__(self, upstream_dsn: str, overrides: dict[str, Any] | None = None) -> None:
        merged = {"proxy.host": "127.0.0.1", "proxy.port": 0, "upstream.dsn": upstream_dsn}
        merged.update(overrides or {})
        self.settings: Settings = load_settings(None, env={}, overrides=merged)
        self.upstream = parse_dsn(upstream_dsn)
        self.loop = asyncio.new_event_loop()
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            pass
        self.server = ProxyServer(self.settings, self.upstream)
        self._thread = threading.Thread(target=self.loop.run_forever, name="pgsidecar-proxy", daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self.port = self.server.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the proxy's loop (to read its state safely)."""

        async def _call() -> Any:
            return fn(*args)

        return self.call(_call())

    def snapshot(self) -> Any:
        return self.run(self.server.snapshot)

    def dsn(self, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
        user = user if user is not None else (self.upstream.user or "postgres")
        password = password if password is not None else self.upstream.password
        database = database if database is not None else (self.upstream.database or user)
        auth = user + (f":{password}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        """psycopg-style keyword arguments for a connection through the proxy."""
        out: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.upstream.user or "postgres",
            "dbname": self.upstream.database or "postgres",
        }
        if self.upstream.password:
            out["password"] = self.upstream.password
        out.update(overrides)
        return out

    @property
    def user(self) -> str:
        return self.upstream.user or "postgres"

    @property
    def database(self) -> str:
        return self.upstream.database or "postgres"

    def asyncpg_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """asyncpg.connect keyword arguments for a connection through the proxy."""
        kw = self.kwargs()
        kw["database"] = kw.pop("dbname")
        kw.update(ssl=False, timeout=10)
        kw.update(overrides)
        return kw

    def stop(self) -> None:
        try:
            self.call(self.server.stop(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def replace_settings(settings: Settings, **sections: Any) -> Settings:
    return dataclasses.replace(settings, **sections)
