"""The settings tree: frozen dataclasses with their defaults, and nothing else.

No I/O here: ``config.loader`` reads files, the environment and flags, and builds a
``Settings`` from them. Every key is documented in ``config/sidecar.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 6432
    # Largest message a client may send after startup; larger ones get FATAL 08P01.
    max_message_bytes: int = 256 * 1024 * 1024
    # Largest startup packet (PostgreSQL itself allows 10000 bytes).
    max_startup_bytes: int = 10000
    # A client must finish startup + authentication within this many seconds.
    client_login_timeout: float = 15.0
    # Most client connections at once; more are refused with FATAL 53300.
    max_client_connections: int = 1000
    # Use uvloop's event loop when it is installed.
    use_uvloop: bool = True


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    # postgres://user:password@host:port/database ; None = embedded PostgreSQL.
    dsn: str | None = None
    connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class UserSettings:
    name: str
    password: str


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # How clients authenticate to the proxy: scram-sha-256, md5 or trust.
    method: str = "scram-sha-256"
    # Users clients may log in as. Empty: the user and password of the upstream DSN.
    users: tuple[UserSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class PoolSettings:
    mode: str = "transaction"  # transaction | session
    size: int = 20
    max_overflow: int = 40
    overflow_idle_timeout: float = 30.0
    checkout_timeout: float = 5.0
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    # An idle server connection unused for this long is checked before it is handed out.
    server_check_delay: float = 30.0
    # Seconds allowed for the reset/check query and for the rollback of an abandoned transaction.
    server_reset_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AgentSettings:
    host: str = "127.0.0.1"
    port: int = 9930
    admin_token: str | None = None


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str = "info"
    format: str = "text"  # text | json


@dataclass(frozen=True, slots=True)
class StatsSettings:
    enabled: bool = True
    max_fingerprints: int = 5000
    # Export the N fingerprints with the most total time as labelled Prometheus series (0 = off:
    # fingerprints as labels make series come and go, so it is opt-in and capped).
    prometheus_top_n: int = 0


@dataclass(frozen=True, slots=True)
class SlowQuerySettings:
    threshold_ms: float = 500.0
    ring_size: int = 200
    explain: bool = False
    explain_interval_s: float = 300.0  # at most one EXPLAIN per fingerprint in this many seconds


@dataclass(frozen=True, slots=True)
class CacheSettings:
    # off | all (every cacheable SELECT) | hinted (only statements with /* pgsidecar:cache */).
    mode: str = "hinted"
    ttl_s: float = 60.0
    max_bytes: int = 64 * 1024 * 1024
    max_result_bytes: int = 1024 * 1024
    # Cache only results whose tables carry pgsidecar's invalidation trigger, so writes that
    # bypass the proxy are seen too (false: trust that every write goes through the proxy).
    require_triggers: bool = True
    # How often the list of tables with triggers and of user-defined functions is reloaded.
    catalog_refresh_s: float = 30.0


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    # Data directory of the embedded PostgreSQL; None = a folder under the user's cache dir.
    data_dir: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    proxy: ProxySettings = field(default_factory=ProxySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    slow_query: SlowQuerySettings = field(default_factory=SlowQuerySettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
