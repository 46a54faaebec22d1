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
    # An UPDATE evicts only the cached results that reference a column it sets (proxy.columns),
    # on tables whose triggers name columns; false: every write evicts per table.
    column_invalidation: bool = True
    # A write evicts only the cached results that read rows it changed (a WHERE on an integer
    # column: jobs.id = 5), on tables whose triggers name the rows; false: every row.
    row_invalidation: bool = True
    # How often the list of tables with triggers and of user-defined functions is reloaded.
    catalog_refresh_s: float = 30.0


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    # Deliver webhooks (the emitter idles, saying why, until the webhook tables exist). False: no
    # deliveries (events still queue; the change feed for GraphQL subscriptions still listens).
    enabled: bool = True
    # Database whose webhook tables the emitter serves; None = the upstream DSN's database.
    database: str | None = None
    # Attempts per delivery before it is marked dead (about a day with the default backoff).
    max_attempts: int = 8
    # Seconds allowed per HTTP attempt (connect + response).
    timeout_s: float = 10.0
    # Retry n waits backoff_base_s * 4**(n-1) seconds (capped at backoff_max_s), with +-25 % jitter.
    backoff_base_s: float = 15.0
    backoff_max_s: float = 43200.0
    # Look for due deliveries at least this often, even without a NOTIFY wake-up.
    sweep_interval_s: float = 5.0
    # An emitter owns an endpoint's queue for this long (renewed while it delivers); a crashed
    # emitter's endpoints are taken over by another one after it expires.
    lease_s: float = 30.0
    # Endpoints delivered to at once by this emitter.
    concurrency: int = 16
    # Deliveries fetched per endpoint per round.
    batch_size: int = 100
    # Events older than this many days whose deliveries are all finished (delivered or dead) are
    # deleted, with their delivery and attempt records; pending ones are never. 0 = keep forever.
    retention_days: float = 7.0
    # Largest payload POST /api/webhooks/trigger accepts, in bytes.
    max_payload_bytes: int = 262144
    # Webhook targets that resolve into these networks are refused (link-local and cloud metadata).
    deny_networks: tuple[str, ...] = ("169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128")


@dataclass(frozen=True, slots=True)
class GraphQLSettings:
    # Serve the GraphQL gateway on the agent's HTTP port.
    enabled: bool = True
    path: str = "/graphql"
    # Deepest selection set a query may have.
    max_depth: int = 8
    # Largest estimated cost (rows a query may load, from page sizes) a query may have.
    max_cost: int = 50000
    default_page_size: int = 50
    max_page_size: int = 500
    # Seconds an operation may run before it is cancelled with an error.
    query_timeout_s: float = 10.0
    # Client sessions the gateway keeps to the proxy (they hold no server connection while idle).
    max_sessions: int = 10


@dataclass(frozen=True, slots=True)
class ViewsSettings:
    # Seconds between REFRESH MATERIALIZED VIEW CONCURRENTLY of each view below; 0 = never.
    refresh_interval_s: float = 0.0
    names: tuple[str, ...] = ("resume_job_matches", "user_statistics")
    # Longest a single refresh may run before it is cancelled.
    refresh_timeout_s: float = 600.0


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
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    graphql: GraphQLSettings = field(default_factory=GraphQLSettings)
    views: ViewsSettings = field(default_factory=ViewsSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
