"""Run the migrations from code: the Alembic ``Config`` built without an alembic.ini, the DSN
turned into a SQLAlchemy URL (psycopg 3 driver), and the commands ``pgsidecar migrate`` offers.

The advisory lock (``LOCK_KEY``) is taken in ``env.py`` on the migration connection, so every
runner (this module, the ``alembic`` command, two operators at once) waits for the other and
then sees the revisions it applied.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from config.loader import parse_dsn

HERE = Path(__file__).resolve().parent
# pg_advisory_lock key of a migration run: "pgsidecar" "migrate" in ASCII, fits a bigint.
LOCK_KEY = 0x7067736964656D69
APPLICATION_NAME = "pgsidecar-migrate"


def sqlalchemy_url(dsn: str) -> URL:
    """A libpq-style DSN as a SQLAlchemy URL for psycopg 3 (socket directories as ``host=``)."""
    up = parse_dsn(dsn)
    query: dict[str, str] = {}
    host: str | None = up.host
    if host and host.startswith("/"):
        query["host"] = host
        host = None
    query.setdefault("application_name", APPLICATION_NAME)
    return URL.create("postgresql+psycopg", username=up.user, password=up.password, host=host,
                      port=up.port, database=up.database or up.user or "postgres", query=query)


@dataclass(frozen=True, slots=True)
class Applied:
    """One revision applied or reverted, as the progress callback sees it."""

    revision: str
    direction: str  # "up" | "down"
    doc: str


def alembic_config(dsn: str | None = None, on_apply: Callable[[Applied], None] | None = None,
                   output: Any = None) -> Config:
    """Config pointing at this package; ``dsn`` None means env.py loads the proxy's settings."""
    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", str(HERE))
    if dsn is not None:
        cfg.attributes["url"] = sqlalchemy_url(dsn)
    if on_apply is not None:
        cfg.attributes["on_apply"] = on_apply
    return cfg


def heads(cfg: Config) -> list[str]:
    return list(ScriptDirectory.from_config(cfg).get_heads())


def current(dsn: str) -> str | None:
    """The revision stamped in the database (None: nothing applied)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(sqlalchemy_url(dsn))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def pending(dsn: str) -> list[str]:
    """Revisions between the database's and head, oldest first."""
    cfg = alembic_config(dsn)
    script = ScriptDirectory.from_config(cfg)
    cur = current(dsn)
    revs = list(script.iterate_revisions("heads", cur or "base"))
    return [r.revision for r in reversed(revs) if r.revision != cur]


def upgrade(cfg: Config, target: str = "head", sql: bool = False) -> None:
    command.upgrade(cfg, target, sql=sql)


def downgrade(cfg: Config, target: str, sql: bool = False) -> None:
    command.downgrade(cfg, target, sql=sql)
