"""ServerConnection: one connection to PostgreSQL, where the proxy is the client.

It owns the startup/authentication exchange with the server and, afterwards, the response
path: every message from the server is matched against the queue of requests that were
sent (``pending``), so the proxy knows when a request is complete, which responses belong
to requests the proxy injected itself (swallowed), where synthetic responses must be slotted
in (a ParseComplete for a statement already prepared on this server), and when the server
is idle again (ReadyForQuery with nothing outstanding). Bytes the client must see are
forwarded untouched, in contiguous runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from . import protocol as pq
from .auth import AuthFailed, ServerAuthenticator
from .errors import ProxyError
from .frames import answer as frame_answer

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

_LEN = pq.UINT32
# Request actions.
FORWARD = 0  # the client's own request: responses go to the client
SKIP = 1  # injected for a client (Parse, SET): responses swallowed, errors still reach the client
INTERNAL = 2  # the proxy's own (reset, check): everything swallowed, result on a future
SYNTH = 3  # no server request: ``data`` is sent to the client when this reaches the head

# Request kinds (first byte of the frontend message, as int).
K_QUERY = ord("Q")
K_SYNC = ord("S")
K_FUNC = ord("F")
K_PARSE = ord("P")
K_BIND = ord("B")
K_DESCRIBE = ord("D")
K_EXECUTE = ord("E")
K_CLOSE = ord("C")

_Z = ord("Z")
_E = ord("E")
_S = ord("S")
_A = ord("A")
_N = ord("N")
_D = ord("D")
_T = ord("T")
_C = ord("C")
_I = ord("I")
_s = ord("s")
_n = ord("n")
_1 = ord("1")
_2 = ord("2")
_3 = ord("3")
_ENDS_WITH_Z = frozenset((K_QUERY, K_SYNC, K_FUNC))
_EXTENDED = frozenset((K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE))

# Reported parameters that describe the server and cannot be SET by a client.
READ_ONLY_PARAMS = frozenset(
    {
        "server_version",
        "server_encoding",
        "is_superuser",
        "session_authorization",
        "integer_datetimes",
        "in_hot_standby",
        "scram_iterations",
    }
)


_IDLE = ord("I")


def tag_rows(buf: bytes | bytearray, pos: int, end: int) -> int:
    """Rows in the CommandComplete message at ``buf[pos:end]`` ("SELECT 5", "INSERT 0 3", ...)."""
    return pq.rows_in_tag(buf[pos + 5 : end - 1])


class Request:
    """One request sent to the server (or a synthetic response waiting for its turn)."""

    __slots__ = ("kind", "action", "data", "fut", "error")

    def __init__(
        self,
        kind: int,
        action: int,
        data: bytes | None = None,
        fut: asyncio.Future[Any] | None = None,
    ) -> None:
        self.kind = kind
        self.action = action
        self.data = data
        self.fut = fut
        self.error: dict[str, str] | None = None


# Shared requests for the client's own messages that need no per-request state (the common
# case): no allocation per message on the hot path. Never mutated.
FORWARD_QUERY = Request(K_QUERY, FORWARD)
FORWARD_SYNC = Request(K_SYNC, FORWARD)
FORWARD_FUNC = Request(K_FUNC, FORWARD)
FORWARD_PARSE = Request(K_PARSE, FORWARD)
FORWARD_BIND = Request(K_BIND, FORWARD)
FORWARD_DESCRIBE = Request(K_DESCRIBE, FORWARD)
FORWARD_EXECUTE = Request(K_EXECUTE, FORWARD)
FORWARD_CLOSE = Request(K_CLOSE, FORWARD)


class Attached(Protocol):
    """What a ServerConnection needs from the client it serves (a ClientSession)."""

    def write(self, data: bytes) -> None: ...
    def server_error(self, fields: dict[str, str]) -> None: ...
    def server_ready(self, status: int, idle_seen: bool = False) -> None: ...
    def server_param(self, name: str, value: str) -> None: ...
    def server_lost(self) -> None: ...
    def statement_stale(self, name: bytes) -> None: ...
    def statement_done(self, rows: int | bytes) -> None: ...

    measure: bool  # wants statement_done for each of its ReadyForQuery
    def pause_input(self) -> None: ...
    def resume_input(self) -> None: ...


class Endpoint:
    """Where and as whom to connect (built by the listener from the upstream DSN)."""

    __slots__ = ("host", "port", "user", "password", "database", "connect_timeout", "label")

    def __init__(
        self, host: str, port: int, user: str, password: str | None, database: str, connect_timeout: float
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.database = database
        self.connect_timeout = connect_timeout
        self.label = f"{database}/{user}"

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def connect_args(self, application_name: str, **server_settings: str) -> dict[str, Any]:
        """asyncpg.connect / create_pool keyword arguments for a connection of pgsidecar's own
        (LISTEN, EXPLAIN, health, webhooks, view refresh): straight to the server, no TLS."""
        return {
            "host": self.host, "port": self.port, "user": self.user, "password": self.password,
            "database": self.database, "timeout": self.connect_timeout, "ssl": False,
            "server_settings": {"application_name": application_name, **server_settings},
        }

    async def open(self, factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, Any]:
        loop = asyncio.get_running_loop()
        if self.is_unix:
            path = os.path.join(self.host, f".s.PGSQL.{self.port}")
            return await loop.create_unix_connection(factory, path)  # type: ignore[return-value]
        return await loop.create_connection(factory, self.host, self.port)  # type: ignore[return-value]

    async def cancel(self, pid: int, secret: int, still_wanted: Callable[[], bool] | None = None) -> None:
        """Send a CancelRequest for backend ``pid`` on a fresh connection.

        ``still_wanted`` is asked again once the connection is open, right before the request
        is written, so a cancel is not sent to a backend that has meanwhile moved on.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        class _Cancel(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if still_wanted is None or still_wanted():
                    transport.write(pq.cancel_request(pid, secret))  # type: ignore[attr-defined]
                else:
                    transport.close()

            def connection_lost(self, exc: Exception | None) -> None:
                if not done.done():
                    done.set_result(None)

        transport, _ = await asyncio.wait_for(self.open(_Cancel), self.connect_timeout)
        try:
            await asyncio.wait_for(done, self.connect_timeout)
        finally:
            transport.close()


class ServerConnection(asyncio.Protocol):
    """One PostgreSQL backend connection, pooled."""

    __slots__ = (
        "endpoint",
        "transport",
        "buf",
        "pending",
        "client",
        "params",
        "extra_settings",
        "applied",
        "prepared",
        "pid",
        "secret",
        "txn",
        "skipping",
        "closed",
        "broken",
        "created_at",
        "last_used",
        "overflow",
        "_waiter",
        "_connected",
        "_paused",
        "forgotten",
        "_authenticated",
        "plain",
        "rows",
        "tags",
        "data_rows",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: deque[Request] = deque()
        self.client: Attached | None = None
        self.params: dict[str, str] = {}  # reported parameters, as the server last said
        self.extra_settings: dict[str, str] = {}  # unreported settings the proxy SET
        self.applied: dict[str, str] | None = None  # the client settings last applied
        self.prepared: set[bytes] = set()  # statement names prepared on this server
        self.pid = 0
        self.secret = 0
        self.txn = ord("I")
        self.skipping = False
        self.closed = False
        self.broken = False
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.overflow = False
        self._waiter: asyncio.Future[None] | None = None
        self._connected = False
        self._paused = False
        self.forgotten = False  # the pool no longer counts it
        self._authenticated = False
        # Everything pending is the client's own (FORWARD): no injected, internal or synthetic
        # request since the connection was last idle. Enables the fast path of data_received.
        self.plain = True
        # What the client's current statement returned or changed (measured clients only): the
        # CommandComplete counts when there were any, else the DataRows (a suspended portal).
        self.rows = 0
        self.tags = 0
        self.data_rows = 0

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.plain and not self.buf and self._connected and self._complete(data):
            return
        self.buf += data
        if self._connected:
            self._process()
        else:
            self._wake()

    def _complete(self, data: bytes) -> bool:
        """Fast path: ``data`` is the whole answer to everything pending, ending with the one
        ReadyForQuery expected, with no error and no ParameterStatus in it. Then nothing in
        it needs a decision: it goes to the client as it came. False: take the full path."""
        client = self.client
        pending = self.pending
        n = len(data)
        if client is None or n < 6 or data[n - 6] != _Z or not pending:
            return False
        last = pending[-1]
        if last is not FORWARD_SYNC and last is not FORWARD_QUERY:
            return False
        framed = frame_answer(data)
        if framed is None:
            return False
        if len(pending) > 1 and (
            pending.count(FORWARD_SYNC) + pending.count(FORWARD_QUERY) + pending.count(FORWARD_FUNC) != 1
        ):
            return False
        pending.clear()
        self.txn = data[n - 1]
        self.skipping = False
        self.last_used = time.monotonic()
        client.write(data)
        if client.measure:
            data_rows, tag = framed
            if tag is not None and not self.tags:  # the usual case: the tag goes as it is, read later
                client.statement_done(tag)
            else:
                if tag is not None:
                    self.rows += pq.rows_in_tag(tag)
                    self.tags += 1
                client.statement_done(self.rows if self.tags else self.data_rows + data_rows)
            self.rows = self.tags = self.data_rows = 0
        if self.client is client:
            client.server_ready(self.txn)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.broken = True
        self._wake()
        err = {"C": "08006", "M": "server connection lost"}
        for req in self.pending:
            if req.fut is not None and not req.fut.done():
                req.fut.set_result(err)
        self.pending.clear()
        client = self.client
        if client is not None:
            self.client = None
            client.server_lost()

    def pause_writing(self) -> None:
        # The server reads slower than the client sends (a big COPY): stop reading the client.
        self._paused = True
        if self.client is not None:
            self.client.pause_input()

    def resume_writing(self) -> None:
        self._paused = False
        if self.client is not None:
            self.client.resume_input()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------------ startup
    async def connect(self) -> None:
        """Open the connection and authenticate; raise ProxyError on failure."""
        ep = self.endpoint
        try:
            await asyncio.wait_for(self._connect(), ep.connect_timeout)
        except ProxyError:
            self.close()
            raise
        except AuthFailed as exc:
            self.close()
            raise exc.error from None
        except asyncio.TimeoutError:
            self.close()
            raise ProxyError.server_unavailable(
                ep.label, f"no answer within upstream.connect_timeout={ep.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            self.close()
            raise ProxyError.server_unavailable(ep.label, exc.strerror or str(exc)) from None

    async def _connect(self) -> None:
        ep = self.endpoint
        await ep.open(lambda: self)
        assert self.transport is not None
        self.transport.write(pq.startup_message({"user": ep.user, "database": ep.database}))
        auth = ServerAuthenticator(ep.user, ep.password)
        while True:
            kind, body = await self._read()
            if kind == pq.AUTHENTICATION:
                (code,) = pq.INT32.unpack_from(body, 0)
                if code == pq.AUTH_OK:
                    self._authenticated = True
                reply = auth.respond(code, body[4:])
                if reply:
                    self.transport.write(reply)
            elif kind == pq.PARAMETER_STATUS:
                name, pos = pq.read_cstr(body, 0)
                value, _ = pq.read_cstr(body, pos)
                self.params[name.decode()] = value.decode()
            elif kind == pq.BACKEND_KEY_DATA:
                self.pid, self.secret = pq.TWO_INT32.unpack_from(body, 0)
            elif kind == pq.READY_FOR_QUERY:
                self.txn = body[0]
                break
            elif kind == pq.ERROR_RESPONSE:
                err = ProxyError.from_server(pq.error_fields(body))
                if err.sqlstate in ("28P01", "28000") and not self._authenticated:
                    # The client's own login succeeded; it is the proxy's login that failed.
                    err.detail = (
                        f'pgsidecar could not log in to PostgreSQL at {ep.host}:{ep.port} as "{ep.user}"'
                    )
                    err.hint = "check the password in upstream.dsn or auth.users"
                raise err
            elif kind in (pq.NOTICE_RESPONSE, pq.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise ProxyError.server_unavailable(ep.label, f"unexpected message {kind!r} during startup")
        self._connected = True
        if self.buf:
            self._process()

    async def _read(self) -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        while True:
            buf = self.buf
            if len(buf) >= 5:
                kind, length = pq.HEADER.unpack_from(buf, 0)
                if length < 4 or length > 1 << 30:
                    raise ProxyError.server_unavailable(self.endpoint.label, "invalid message from server")
                if len(buf) >= length + 1:
                    body = bytes(buf[5 : length + 1])
                    del buf[: length + 1]
                    return kind, body
            if self.closed:
                raise ProxyError.server_unavailable(self.endpoint.label, "server closed the connection")
            self._waiter = loop.create_future()
            await self._waiter
            self._waiter = None

    # ------------------------------------------------------------------ requests
    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def run_internal(self, sql: str) -> asyncio.Future[dict[str, str] | None]:
        """Run a query whose results nobody sees; the future gets its error fields or None."""
        fut: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()
        self.plain = False
        self.pending.append(Request(K_QUERY, INTERNAL, None, fut))
        self.send(pq.query(sql))
        return fut

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                try:
                    self.transport.write(pq.TERMINATE_MSG)
                except Exception:  # noqa: BLE001 - transport already failing
                    pass
                self.transport.close()

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ response path
    def _process(self) -> None:  # noqa: C901 - the hot loop, kept in one piece on purpose
        buf = self.buf
        n = len(buf)
        pos = 0
        pending = self.pending
        client = self.client
        out: list[bytes] = []
        run = -1  # start of the current run of bytes to forward to the client
        ready = False
        idle_seen = False  # a ReadyForQuery of the client's said 'I' (pipelined: not the last one)
        unpack = _LEN.unpack_from
        head = pending[0] if pending else None
        forward = client is not None and (head is None or head.action == FORWARD)
        measure = client is not None and client.measure
        while n - pos >= 5:
            end = pos + 1 + unpack(buf, pos + 1)[0]
            if end > n:
                break
            t = buf[pos]
            done = False
            fwd = forward
            if t == _D:
                if measure:
                    self.data_rows += 1
            elif t == _Z:
                self.txn = buf[pos + 5]
                self.skipping = False
                done = True
            elif t == _C or t == _I:
                done = head is not None and head.kind == K_EXECUTE
                if measure and fwd and t == _C:
                    self.rows += tag_rows(buf, pos, end)
                    self.tags += 1
            elif t == _T:
                done = head is not None and head.kind == K_DESCRIBE
            elif t == _1 or t == _2 or t == _3 or t == _n or t == _s:
                done = True
            elif t == _E:
                fields = pq.error_fields(buf[pos + 5 : end])
                if head is None:
                    if fields.get("S") in ("FATAL", "PANIC"):
                        self.broken = True
                else:
                    if (head.action != FORWARD or head.data is not None) and head.error is None:
                        head.error = fields  # the shared FORWARD requests carry no state
                    if client is not None and head.action == SKIP:
                        fwd = True  # injected for the client: it must see why it failed
                    if fwd:
                        client.server_error(fields)  # type: ignore[union-attr]
                    if fwd and head.action == FORWARD:
                        if head.kind == K_BIND and head.data is not None and fields.get("C") == "0A000":
                            # "cached plan must not change result type": the statement is
                            # useless now; the client's re-Parse must really prepare again.
                            client.statement_stale(head.data)  # type: ignore[union-attr]
                    if head.kind in _EXTENDED:
                        # The server now skips everything up to the next Sync: so do we.
                        if fwd:
                            if run < 0:
                                run = pos
                        elif run >= 0:
                            out.append(bytes(buf[run:pos]))
                            run = -1
                        pos = end
                        self._fail_extended(head, fields)
                        head = pending[0] if pending else None
                        forward = client is not None and (head is None or head.action == FORWARD)
                        continue
            elif t == _S:
                name, p2 = pq.read_cstr(buf, pos + 5)
                value, _ = pq.read_cstr(buf, p2)
                key = name.decode()
                val = value.decode()
                self.params[key] = val
                self.applied = None  # no longer known to match any client's settings
                if fwd:
                    client.server_param(key, val)  # type: ignore[union-attr]
            # ---- forward this message, or swallow it
            if fwd:
                if run < 0:
                    run = pos
            elif run >= 0:
                out.append(bytes(buf[run:pos]))
                run = -1
            pos = end
            if done and head is not None:
                pending.popleft()
                if head.action != FORWARD or head.data is not None:
                    if head.fut is not None and not head.fut.done():
                        head.fut.set_result(head.error)
                    if head.error is not None and head.kind == K_PARSE and head.data:
                        self.prepared.discard(head.data)
                elif t == _Z:
                    ready = True
                    idle_seen = idle_seen or self.txn == _IDLE
                    if measure:
                        rows = self.rows if self.tags else self.data_rows
                        self.rows = self.tags = self.data_rows = 0
                        client.statement_done(rows)  # type: ignore[union-attr]
                if pending and pending[0].action == SYNTH:
                    if run >= 0:
                        out.append(bytes(buf[run:pos]))
                        run = -1
                    while pending and pending[0].action == SYNTH:
                        data = pending.popleft().data
                        if data and client is not None:
                            out.append(data)
                head = pending[0] if pending else None
                forward = client is not None and (head is None or head.action == FORWARD)
        if run >= 0:
            out.append(bytes(buf[run:pos]))
        if pos:
            del buf[:pos]
        if client is not None and self.client is client:
            if out:
                client.write(out[0] if len(out) == 1 else b"".join(out))
            if ready:
                client.server_ready(self.txn, idle_seen)
        if not pending:
            self.last_used = time.monotonic()
            self.plain = True

    def _fail_extended(self, head: Request, fields: dict[str, str]) -> None:
        """An extended-protocol request failed: drop every request up to the next Sync."""
        pending = self.pending
        pending.popleft()
        if head.fut is not None and not head.fut.done():
            head.fut.set_result(head.error or fields)
        if head.kind == K_PARSE and head.data:
            self.prepared.discard(head.data)
        while pending and pending[0].kind != K_SYNC:
            req = pending.popleft()
            if req.kind == K_PARSE and req.data and req.action != SYNTH:
                self.prepared.discard(req.data)
            if req.fut is not None and not req.fut.done():
                req.fut.set_result(fields)
        self.skipping = True

    def discarding(self) -> bool:
        """The server ignores extended-protocol messages now: an error happened and the
        client has not sent the Sync that ends it yet."""
        if not self.skipping:
            return False
        return not any(req.kind == K_SYNC for req in self.pending)

    def add_synthetic(self, data: bytes) -> bytes | None:
        """Queue a synthetic response; return it when it is due right now (nothing pending)."""
        if not self.pending:
            return data
        self.plain = False
        self.pending.append(Request(0, SYNTH, data))
        return None

