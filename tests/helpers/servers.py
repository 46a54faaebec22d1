"""Where the tests find PostgreSQL: the `PgServer` address book and the fixed test roles.

`PgServer` describes one server + database the tests may use (from ``PGSIDECAR_TEST_DSN`` or a
throwaway `Cluster`), and builds DSNs and keyword arguments for asyncpg and psycopg from it.
`AUTH_ROLES` is the table of roles and hba methods the `auth_cluster` fixture creates.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, replace
from typing import Any

from tests.helpers.cluster import Cluster

TEST_DATABASE = "pgsidecar_test"


@dataclass(frozen=True, slots=True)
class AuthRole:
    name: str
    password: str | None
    method: str  # pg_hba.conf method for host 127.0.0.1/32


AUTH_ROLES: dict[str, AuthRole] = {
    r.name: r
    for r in (
        AuthRole("scram_user", "scram_pw", "scram-sha-256"),
        AuthRole("md5_user", "md5_pw", "md5"),
        AuthRole("pw_user", "pw_pw", "password"),
        AuthRole("trust_user", None, "trust"),
    )
}


@dataclass(frozen=True, slots=True)
class PgServer:
    """A PostgreSQL server the tests may use, pointed at the test database.

    `host` is an IP/hostname or, for a DSN like ``postgresql:///db?host=/var/run/postgresql``,
    a Unix socket directory. `cluster` is the throwaway `Cluster` when the session made one,
    None when the server came from ``PGSIDECAR_TEST_DSN``.
    """

    host: str
    port: int
    user: str
    password: str | None
    database: str
    admin_database: str = "postgres"
    cluster: Cluster | None = None

    @property
    def dsn(self) -> str:
        return self.dsn_for()

    @property
    def admin_dsn(self) -> str:
        """DSN of the maintenance database the test database was created from."""
        return self.dsn_for(database=self.admin_database)

    def dsn_for(self, user: str | None = None, password: str | None = None,
                database: str | None = None) -> str:
        """DSN for another role or database on the same server (password: the server's
        password when the user is unchanged, none otherwise)."""
        if user is None:
            user, password = self.user, password if password is not None else self.password
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        db = urllib.parse.quote(database or self.database, safe="")
        if self.host.startswith("/"):
            query = urllib.parse.urlencode({"host": self.host, "port": self.port})
            return f"postgresql://{auth}@/{db}?{query}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    def connect_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``: host, port, user, password, database."""
        kw: dict[str, Any] = {"host": self.host, "port": self.port, "user": self.user,
                              "password": self.password, "database": self.database}
        kw.update(overrides)
        return kw

    def psycopg_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect`` / ``psycopg2.connect`` (dbname, not database)."""
        kw = self.connect_kwargs()
        kw["dbname"] = kw.pop("database")
        if kw["password"] is None:
            del kw["password"]
        kw.update(overrides)
        return kw

    def with_database(self, database: str) -> PgServer:
        return replace(self, database=database)


def parse_dsn(dsn: str) -> PgServer:
    """A `PgServer` from a postgresql:// URL (database: the maintenance database it names)."""
    url = urllib.parse.urlsplit(dsn)
    if url.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"PGSIDECAR_TEST_DSN must be a postgresql:// URL, got scheme {url.scheme!r}")
    query = dict(urllib.parse.parse_qsl(url.query))
    host = url.hostname or query.get("host") or "127.0.0.1"
    port = url.port or int(query.get("port", 5432))
    user = urllib.parse.unquote(url.username) if url.username else query.get("user", "postgres")
    password = urllib.parse.unquote(url.password) if url.password is not None else query.get("password")
    database = urllib.parse.unquote(url.path.lstrip("/")) or query.get("dbname") or user
    return PgServer(host=host, port=port, user=user, password=password,
                    database=database, admin_database=database)


def from_cluster(cluster: Cluster) -> PgServer:
    return PgServer(host=cluster.host, port=cluster.port, user=cluster.superuser, password=None,
                    database="postgres", admin_database="postgres", cluster=cluster)
