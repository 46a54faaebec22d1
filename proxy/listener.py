"""ProxyServer: accepts application connections and owns their sessions and the pools.

Built from one ``Settings``; several can run in one process (no module-level state). The
agent reads it through ``snapshot()``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .auth import ClientVerifier, UserSecret, make_verifier
from .caching import CacheFront
from .client import ClientSession
from .errors import ProxyError
from .explain import Explainer
from .fingerprint import Fingerprinter
from .pool import Pool, PoolSnapshot
from .recorder import Recorder
from .server import Endpoint
from .stats import QueryStats

if TYPE_CHECKING:
    from config.loader import DsnParts
    from config.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientSnapshot:
    active: int  # attached to a server connection
    idle: int
    waiting: int  # waiting for a server connection
    pinned: int
    total: int
    accepted: int
    rejected: int


@dataclass(frozen=True, slots=True)
class ProxySnapshot:
    started_at: float
    mode: str
    clients: ClientSnapshot
    pools: tuple[PoolSnapshot, ...]


class ProxyServer:
    """The listening proxy."""

    def __init__(self, settings: Settings, upstream: DsnParts) -> None:
        self.settings = settings
        self.upstream = upstream
        self.pools: dict[tuple[str, str], Pool] = {}
        self.sessions: dict[int, ClientSession] = {}
        self.pending_sessions: set[ClientSession] = set()
        self._server: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._pids = itertools.count(1_000_000)
        self._secrets = self._load_users()
        self.ssl_context = self._ssl_context()
        self.started_at = time.time()
        self.accepted = 0
        self.rejected = 0
        self.peak_clients = 0  # most logged-in clients at once since start
        self.port = settings.proxy.port
        self.host = settings.proxy.host
        # Query observability (issue 3): one fingerprint memo and one statistics store per proxy.
        # The memo must hold an app's whole working set of statement shapes: when it is smaller,
        # halving it makes every other statement a pglast parse (~100 µs). 50,000 shapes cost
        # about 10 MB; ten per tracked fingerprint at least.
        self.fingerprinter = Fingerprinter(max_memo=max(50_000, 10 * settings.stats.max_fingerprints))
        # Result cache (issue 4): None when cache.mode is off (then no cost on any path).
        self.cache_front: CacheFront | None = None
        if settings.cache.mode != "off":
            self.cache_front = CacheFront(settings.cache, self.fingerprinter)
        self.stats: QueryStats | None = None
        self.recorder: Recorder | None = None
        self.explainer: Explainer | None = None
        if settings.stats.enabled:
            self.stats = QueryStats(
                max_fingerprints=settings.stats.max_fingerprints,
                slow_threshold_ms=settings.slow_query.threshold_ms,
                slow_ring=settings.slow_query.ring_size,
            )
            if settings.slow_query.explain:
                self.explainer = Explainer(
                    settings.slow_query.explain_interval_s, lambda db, user: self.pool_for(db, user).endpoint
                )
            self.recorder = Recorder(self.stats, self.fingerprinter, explainer=self.explainer)

    # ------------------------------------------------------------------ setup
    def _load_users(self) -> dict[str, UserSecret]:
        users = self.settings.auth.users
        if users:
            return {u.name: UserSecret(u.name, u.password) for u in users}
        up = self.upstream
        if up.user and up.password:
            return {up.user: UserSecret(up.user, up.password)}
        return {}

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if not tls.cert or not tls.key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert, tls.key)
        return ctx

    def verifier(self, user: str) -> ClientVerifier:
        method = self.settings.auth.method
        secret = self._secrets.get(user)
        if not self.settings.auth.users and not self.upstream.password:
            # The upstream DSN carries no password: the upstream trusts us, and we trust
            # clients that present its user (any other user is refused).
            if user == (self.upstream.user or user):
                return make_verifier("trust", user, None)
            raise ProxyError(
                "28000", f'role "{user}" is not allowed to connect through this proxy', fatal=True
            )
        if method == "trust" and secret is None:
            # Trust skips the password, not the user list (as PgBouncer does).
            raise ProxyError("28000", f'role "{user}" does not exist', fatal=True)
        return make_verifier(method, user, secret)

    def upstream_endpoint(self, database: str | None = None) -> Endpoint:
        """The upstream DSN's server, user and password (its database unless another is named):
        where the agent's own connections go (health probe, webhook emitter, view refresh)."""
        up = self.upstream
        user = up.user or "postgres"
        return Endpoint(up.host, up.port, user, up.password, database or up.database or user,
                        self.settings.upstream.connect_timeout)

    def pool_for(self, database: str, user: str) -> Pool:
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            up = self.upstream
            secret = self._secrets.get(user)
            password = secret.password if secret is not None else (up.password or None)
            endpoint = Endpoint(
                up.host, up.port, user, password, database, self.settings.upstream.connect_timeout
            )
            pool = self.pools[key] = Pool(endpoint, self.settings.pool)
        return pool

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_session,
            self.settings.proxy.host,
            self.settings.proxy.port,
            reuse_address=True,
            backlog=1024,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._reaper = loop.create_task(self._reap_forever())
        log.info(
            "proxy_listening",
            extra={"host": self.host, "port": self.port, "mode": self.settings.pool.mode},
        )

    def _new_session(self) -> ClientSession:
        self.accepted += 1
        limit = self.settings.proxy.max_client_connections
        reject = None
        if len(self.sessions) + len(self.pending_sessions) >= limit:
            self.rejected += 1
            reject = ProxyError.too_many_clients(limit)
        session = ClientSession(self, reject)
        if reject is None:
            self.pending_sessions.add(session)
        return session

    async def _reap_forever(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            front = self.cache_front
            if front is not None and ticks % 10 == 0 and len(front.cache):
                front.cache.purge_expired()  # expired results free their memory within ~10 s
            for pool in list(self.pools.values()):
                try:
                    pool.reap()
                except Exception:  # noqa: BLE001
                    log.exception("pool_reap_failed", extra={"pool": pool.name})

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, tell every client the proxy is going away, close the pools."""
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if grace > 0:
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(s.server is not None for s in self.sessions.values()):
                await asyncio.sleep(0.05)
        if self.explainer is not None:
            await self.explainer.close()
        if self.cache_front is not None:
            await self.cache_front.stop()
        err = ProxyError.shutting_down()
        for session in list(self.sessions.values()) + list(self.pending_sessions):
            session.fail(err)
        for pool in self.pools.values():
            await pool.close()
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        log.info("proxy_stopped", extra={"port": self.port})

    @property
    def accepting(self) -> bool:
        """The listening socket is open and serving new client connections."""
        return self._server is not None and self._server.is_serving()

    # ------------------------------------------------------------------ sessions
    def session_opened(self, session: ClientSession) -> int:
        self.pending_sessions.discard(session)
        pid = next(self._pids)
        self.sessions[pid] = session
        if len(self.sessions) > self.peak_clients:
            self.peak_clients = len(self.sessions)
        return pid

    def session_closed(self, session: ClientSession) -> None:
        self.pending_sessions.discard(session)
        if session.pid:
            self.sessions.pop(session.pid, None)

    async def cancel(self, pid: int, secret: int) -> None:
        """Honour a CancelRequest: only for the right key, only while that client's query runs."""
        session = self.sessions.get(pid)
        if session is None or session.secret != secret:
            return
        server = session.server
        if server is None:
            # Still waiting for a server connection: the statement never started, so it is
            # answered here (57014) and never sent, as PostgreSQL would have cancelled it.
            session.cancel_waiting()
            return
        if not server.pending:
            return
        # Checked again once the connection to PostgreSQL is open. What is left is the time the
        # request takes on that socket: the statement may finish meanwhile and the connection
        # start another client's (as with PgBouncer; with PostgreSQL, the same client's next).
        def still_wanted() -> bool:
            return session.server is server and bool(server.pending)

        try:
            await server.endpoint.cancel(server.pid, server.secret, still_wanted)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("cancel_failed", extra={"pool": server.endpoint.label, "error": str(exc)})

    # ------------------------------------------------------------------ observation
    def query_stats(self) -> QueryStats | None:
        """The query statistics with every finished statement recorded (None: stats disabled)."""
        if self.recorder is not None:
            self.recorder.flush()
        return self.stats

    def snapshot(self) -> ProxySnapshot:
        active = waiting = pinned = 0
        for s in self.sessions.values():
            if s.server is not None:
                active += 1
            elif s._acquiring is not None or s._queued:  # noqa: SLF001
                waiting += 1
            if s.pinned is not None:
                pinned += 1
        total = len(self.sessions)
        mode = self.settings.pool.mode
        return ProxySnapshot(
            started_at=self.started_at,
            mode=mode,
            clients=ClientSnapshot(
                active=active,
                idle=total - active - waiting,
                waiting=waiting,
                pinned=pinned,
                total=total,
                accepted=self.accepted,
                rejected=self.rejected,
            ),
            pools=tuple(p.snapshot(mode) for p in self.pools.values()),
        )
