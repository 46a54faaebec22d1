"""Pool: the server connections of one (database, user) pair.

``acquire()`` hands out an idle connection (checked first when it sat idle for longer than
``pool.server_check_delay``), opens a new one while fewer than ``size + max_overflow`` exist,
or queues the caller until one is released or ``pool.checkout_timeout`` passes (then
ERROR 53300 naming the limits). ``release()`` gives a clean connection to the longest waiter or
back to the idle stack. A reaper closes idle overflow connections after
``pool.overflow_idle_timeout``, idle ones after ``pool.server_idle_timeout`` and any after
``pool.server_lifetime``. Statistics are plain counters read by ``snapshot()``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import protocol as pq
from .errors import ProxyError
from .server import READ_ONLY_PARAMS, Endpoint, ServerConnection

if TYPE_CHECKING:
    from config.settings import PoolSettings

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the checkout-wait histogram buckets.
CHECKOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    name: str
    database: str
    user: str
    mode: str
    size: int
    max_overflow: int
    active: int
    idle: int
    overflow: int
    pinned: int
    connecting: int
    waiting: int
    checkouts: int
    checkout_timeouts: int
    checkout_wait_buckets: tuple[int, ...]  # cumulative counts per CHECKOUT_BUCKETS, then +Inf
    checkout_wait_sum: float
    servers_opened: int
    servers_closed: int
    server_errors: int
    pinned_total: int
    pin_reasons: dict[str, int]


class Pool:
    """Server connections for one (database, user)."""

    def __init__(self, endpoint: Endpoint, settings: PoolSettings) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.name = endpoint.label
        self.idle: list[ServerConnection] = []
        self.total = 0  # open + being opened
        self.connecting = 0
        self.active: set[ServerConnection] = set()
        self.pinned = 0
        self._waiters: deque[asyncio.Future[ServerConnection | None]] = deque()
        # Clients queued without a task (the common case under load): handed a server
        # synchronously by ``release``. See ClientSession.grant.
        self._queue: deque[Any] = deque()
        # One timer for the whole queue, due when its head's checkout_timeout runs out (the
        # queue is in arrival order): a timer per queued client cost a timer handle created
        # and cancelled per transaction under load (~8 % of the proxy's Python time at 50
        # clients on a pool of 20).
        self._queue_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._login_cache: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self._interned: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self.defaults: dict[str, str] = {}  # reported parameters of a fresh server connection
        # statistics
        self.checkouts = 0
        self.checkout_timeouts = 0
        self.wait_buckets = [0] * (len(CHECKOUT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.servers_opened = 0
        self.servers_closed = 0
        self.server_errors = 0
        self.pinned_total = 0
        self.pin_reasons: dict[str, int] = {}
        # prepared statements: Parse body (after the name) -> server-side statement name
        # Parse body (text + parameter types) -> the pool-wide server-side statement name.
        self.statement_names: dict[bytes, bytes] = {}
        self._statement_seq = 0

    # ------------------------------------------------------------------ checkout
    async def acquire(self) -> ServerConnection:
        start = time.monotonic()
        server = await self._acquire(start)
        self.checkout_waited(time.monotonic() - start)
        self.active.add(server)
        return server

    def new_statement_name(self, body: bytes) -> bytes:
        self._statement_seq += 1
        name = self.statement_names[body] = b"pgsc_%d" % self._statement_seq
        return name

    def forget_statement(self, name: bytes) -> None:
        """A server statement that can no longer run (its result type changed): the next
        Parse of its text gets a new name, so it is prepared again everywhere."""
        for body, sname in self.statement_names.items():
            if sname == name:
                del self.statement_names[body]
                return

    def full(self) -> bool:
        return self.total >= self.settings.size + self.settings.max_overflow

    def enqueue(self, session: Any) -> None:
        """Queue ``session`` (its ``queued_at`` set): ``release`` grants it a server, or its
        ``queue_timeout`` is called once it has waited ``checkout_timeout``."""
        self._queue.append(session)
        if self._queue_timer is None:
            self._queue_timer = asyncio.get_running_loop().call_later(
                self.settings.checkout_timeout, self._expire_queue
            )

    def _expire_queue(self) -> None:
        """Time out the queued clients whose wait is over; re-arm for the next one."""
        self._queue_timer = None
        queue = self._queue
        timeout = self.settings.checkout_timeout
        now = time.monotonic()
        while queue:
            due = queue[0].queued_at + timeout - now
            if due > 0:
                if self._queue_timer is not None:  # a client timed out above queued again: armed
                    self._queue_timer.cancel()  # for its own deadline, later than the head's
                self._queue_timer = asyncio.get_running_loop().call_later(due, self._expire_queue)
                return
            queue.popleft().queue_timeout()

    def dequeue(self, session: Any) -> None:
        try:
            self._queue.remove(session)
        except ValueError:
            pass

    def checkout_waited(self, waited: float) -> None:
        self.checkouts += 1
        self.wait_sum += waited
        self.wait_buckets[bisect_left(CHECKOUT_BUCKETS, waited)] += 1

    def try_acquire(self) -> ServerConnection | None:
        """Synchronous fast path: a recently used idle connection, or None (then ``acquire``)."""
        idle = self.idle
        while idle:
            server = idle[-1]
            if server.closed or server.broken:
                idle.pop()
                self._forget(server)
                continue
            if time.monotonic() - server.last_used > self.settings.server_check_delay:
                return None  # needs a check first: the async path does it
            idle.pop()
            self.checkouts += 1
            self.wait_buckets[0] += 1
            self.active.add(server)
            return server
        return None

    def intern_settings(self, settings: dict[str, str]) -> dict[str, str]:
        """One shared dict per distinct combination of client settings, so that checking
        whether a server connection already runs with a client's settings is an identity test.
        The returned dict must not be mutated."""
        key = tuple(sorted(settings.items()))
        shared = self._interned.get(key)
        if shared is None:
            if len(self._interned) > 10000:
                self._interned.clear()
            shared = self._interned[key] = dict(settings)
        return shared

    async def _acquire(self, start: float) -> ServerConnection:
        settings = self.settings
        deadline = start + settings.checkout_timeout
        while True:
            if self._closed:
                raise ProxyError.shutting_down()
            while self.idle:
                server = self.idle.pop()
                if server.closed or server.broken:
                    self._forget(server)
                    continue
                if time.monotonic() - server.last_used > settings.server_check_delay:
                    try:
                        usable = await self._check(server)
                    except BaseException:
                        self._discard(server)
                        raise
                    if not usable:
                        continue
                return server
            if self.total < settings.size + settings.max_overflow:
                return await self._open()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.checkout_timeouts += 1
                raise ProxyError.checkout_timeout(
                    self.name, (time.monotonic() - start) * 1000, settings.size, settings.max_overflow
                )
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[ServerConnection | None] = loop.create_future()
            self._waiters.append(fut)
            timer = loop.call_later(remaining, _expire, fut)
            try:
                server_or_none = await fut
            except asyncio.CancelledError:
                # The waiting client went away; a server handed over meanwhile goes back.
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    handed = fut.result()
                    if handed is not None:
                        self.release(handed)
                raise
            finally:
                timer.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if server_or_none is not None:
                return server_or_none
            # None: woken to retry (a slot freed up, or the deadline passed)

    async def _open(self) -> ServerConnection:
        self.total += 1
        self.connecting += 1
        server = ServerConnection(self.endpoint)
        try:
            await server.connect()
        except BaseException:
            server.close()
            self.total -= 1
            self.server_errors += 1
            self._wake_one()
            raise
        finally:
            self.connecting -= 1
        self.servers_opened += 1
        server.overflow = self.total > self.settings.size
        if not self.defaults:
            self.defaults = dict(server.params)
        if self._closed:
            self._discard(server)
            raise ProxyError.shutting_down()
        return server

    async def _check(self, server: ServerConnection) -> bool:
        """Run an empty query on a connection that sat idle; drop it when it fails."""
        try:
            err = await asyncio.wait_for(server.run_internal(""), self.settings.server_reset_timeout)
        except asyncio.TimeoutError:
            err = {"M": "timeout"}
        if err is not None or server.closed or server.txn != ord("I"):
            log.info("server_check_failed", extra={"pool": self.name, "pid": server.pid})
            self._discard(server)
            return False
        return True

    # ------------------------------------------------------------------ checkin
    def release(self, server: ServerConnection) -> None:
        """Take back a clean, idle connection (no request outstanding, no transaction)."""
        self.active.discard(server)
        server.client = None
        if server.closed or server.broken or server.pending or server.txn != ord("I"):
            self._discard(server)
            return
        now = time.monotonic()
        if self._closed or now - server.created_at > self.settings.server_lifetime:
            self._discard(server)
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.active.add(server)
                fut.set_result(server)
                return
        while self._queue:
            session = self._queue.popleft()
            self.active.add(server)
            if session.grant(server, now):
                return
            self.active.discard(server)
        server.last_used = now
        self.idle.append(server)

    def discard(self, server: ServerConnection) -> None:
        """Close a connection that cannot be reused."""
        self.active.discard(server)
        server.client = None
        self._discard(server)

    def _discard(self, server: ServerConnection) -> None:
        server.close()
        self._forget(server)

    def _forget(self, server: ServerConnection) -> None:
        if server.forgotten:
            return
        server.forgotten = True
        self.total -= 1
        self.servers_closed += 1
        self._wake_one()

    def _wake_one(self) -> None:
        """Capacity freed up: let one waiter open a connection."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        while self._queue:
            if self._queue.popleft().retry():
                return

    def pin(self, reason: str) -> None:
        self.pinned += 1
        self.pinned_total += 1
        self.pin_reasons[reason] = self.pin_reasons.get(reason, 0) + 1

    def unpin(self) -> None:
        self.pinned -= 1

    # ------------------------------------------------------------------ login
    async def login_parameters(self, settings: dict[str, str]) -> dict[str, str]:
        """ParameterStatus values a client with these startup settings must be sent.

        The first client with a given combination costs one round trip on a server connection
        (which also proves the database exists and the settings are valid); later ones are
        answered from memory.
        """
        key = tuple(sorted(settings.items()))
        cached = self._login_cache.get(key)
        if cached is not None:
            return cached
        server = await self.acquire()
        # Start from a fresh connection's values, not from whatever the last client left.
        desired = {k: v for k, v in self.defaults.items() if k not in READ_ONLY_PARAMS}
        desired.update(settings)
        try:
            err = await self.apply(server, desired, wait=True)
        except BaseException:
            self.discard(server)
            raise
        if err is not None:
            self.release(server)
            raise ProxyError.from_server({**err, "S": "FATAL", "V": "FATAL"})
        params = dict(server.params)
        self.release(server)
        if len(self._login_cache) > 1000:
            self._login_cache.clear()
        self._login_cache[key] = params
        return params

    def apply(self, server: ServerConnection, desired: dict[str, str], *, wait: bool = False):  # type: ignore[no-untyped-def]
        """Bring the server's session settings in line with a client's: SET what differs,
        RESET what the proxy set for an earlier client and this one did not ask for.

        Returns a future of the error fields (or None) when ``wait``; otherwise queues the
        statements as requests injected for the client (responses swallowed) and returns None.
        """
        from .server import K_QUERY, SKIP, Request

        statements = []
        params = server.params
        extra = server.extra_settings
        for key, value in desired.items():
            current = params.get(key, extra.get(key))
            if current != value:
                statements.append(f"SET {pq.quote_ident(key)} TO {pq.quote_literal(value)}")
                if key not in params:
                    extra[key] = value
        for key in [k for k in extra if k not in desired]:
            statements.append(f"RESET {pq.quote_ident(key)}")
            del extra[key]
        server.applied = desired
        if not statements:
            if wait:
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(None)
                return fut
            return None
        sql = ";".join(statements)
        if wait:
            return server.run_internal(sql)
        server.plain = False
        server.pending.append(Request(K_QUERY, SKIP))
        server.send(pq.query(sql))
        return None

    # ------------------------------------------------------------------ maintenance
    def reap(self) -> None:
        """Close idle connections that overstayed (called periodically by the listener)."""
        now = time.monotonic()
        s = self.settings
        keep: list[ServerConnection] = []
        # idle is a LIFO stack: the oldest-idle are at the front
        for server in self.idle:
            idle_for = now - server.last_used
            too_old = now - server.created_at > s.server_lifetime
            overflow_idle = self.total > s.size and idle_for > s.overflow_idle_timeout
            if server.closed or server.broken or too_old or overflow_idle or idle_for > s.server_idle_timeout:
                self._discard(server)
            else:
                keep.append(server)
        self.idle = keep

    async def close(self) -> None:
        self._closed = True
        self._queue.clear()
        if self._queue_timer is not None:
            self._queue_timer.cancel()
            self._queue_timer = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ProxyError.shutting_down())
        for server in self.idle:
            self._discard(server)
        self.idle = []
        for server in list(self.active):
            server.close()

    def snapshot(self, mode: str) -> PoolSnapshot:
        cumulative = []
        total = 0
        for count in self.wait_buckets:
            total += count
            cumulative.append(total)
        open_servers = self.total - self.connecting
        return PoolSnapshot(
            name=self.name,
            database=self.endpoint.database,
            user=self.endpoint.user,
            mode=mode,
            size=self.settings.size,
            max_overflow=self.settings.max_overflow,
            active=len(self.active),
            idle=len(self.idle),
            overflow=max(0, open_servers - self.settings.size),
            pinned=self.pinned,
            connecting=self.connecting,
            waiting=sum(1 for f in self._waiters if not f.done()) + len(self._queue),
            checkouts=self.checkouts,
            checkout_timeouts=self.checkout_timeouts,
            checkout_wait_buckets=tuple(cumulative),
            checkout_wait_sum=self.wait_sum,
            servers_opened=self.servers_opened,
            servers_closed=self.servers_closed,
            server_errors=self.server_errors,
            pinned_total=self.pinned_total,
            pin_reasons=dict(self.pin_reasons),
        )


def _expire(fut: asyncio.Future[ServerConnection | None]) -> None:
    if not fut.done():
        fut.set_result(None)


def settable(name: str) -> bool:
    return name not in READ_ONLY_PARAMS
