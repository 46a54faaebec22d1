"""ClientSession: one application connection, where the proxy is the server.

Startup (SSL/GSS negotiation, CancelRequest, protocol version, authentication) runs as a
coroutine; after ReadyForQuery the session switches to the relay path, which parses only the
5-byte header of each client message plus the few messages it must understand:

- Query / Parse text, to pin the client to its server connection when a statement creates
  session state that cannot move between connections (LISTEN, session SET, temp tables, ...);
- named Parse / Bind / Describe / Close, which are renamed to pool-wide statement names and
  prepared on whichever server connection runs the next transaction (as PgBouncer 1.21 does);
- Terminate.

In transaction mode a server connection is checked out at the first message of a
transaction and returned at the ReadyForQuery that leaves nothing outstanding and no
transaction open. Everything else is forwarded byte for byte.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
import re
import secrets
import ssl
import time
from typing import TYPE_CHECKING

from . import protocol as pq
from .auth import AuthFailed
from .cache import HINT_MARK, WriteMarks
from .caching import CHAIN, FLUSH, READ, ROLLBACK, WRITE, Bind, Fill, volatile_params
from .errors import ProxyError
from .frames import messages as frame_messages
from .invalidation import Watch
from .stats import Scope
from .server import (
    FORWARD,
    FORWARD_BIND,
    FORWARD_CLOSE,
    FORWARD_DESCRIBE,
    FORWARD_EXECUTE,
    FORWARD_FUNC,
    FORWARD_PARSE,
    FORWARD_QUERY,
    FORWARD_SYNC,
    K_BIND,
    K_PARSE,
    READ_ONLY_PARAMS,
    SKIP,
    Request,
    ServerConnection,
)

if TYPE_CHECKING:
    from .cache import CachedResult
    from .fingerprint import Fingerprint
    from .listener import ProxyServer
    from .pool import Pool

log = logging.getLogger(__name__)

_LEN = pq.UINT32
_Q = ord("Q")
_P = ord("P")
_B = ord("B")
_D = ord("D")
_E = ord("E")
_S = ord("S")
_H = ord("H")
_C = ord("C")
_X = ord("X")
_F = ord("F")
_COPY = frozenset((ord("d"), ord("c"), ord("f")))
_IDLE = ord("I")
_KNOWN = frozenset(b"QPBDESCHXFdcf")
_PAUSE_BUFFER = 256 * 1024
_SYNC_MSG = b"S\x00\x00\x00\x04"

# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})

# Reported parameters whose changes the proxy tracks (ParameterStatus) instead of pinning.
_TRACKED_SET_NAMES = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "intervalstyle",
        "timezone",
        "standard_conforming_strings",
        "default_transaction_read_only",
        "time",  # SET TIME ZONE
        "names",  # SET NAMES
        "all",  # RESET ALL: only reported settings can differ from the defaults here
    }
)
_LEADING = rb"(?:\s+|/\*.*?\*/|--[^\n]*\n)*"
_SET_RE = re.compile(rb"(?:^|;)" + _LEADING + rb"(set|reset)\s+(?:session\s+)?(\w+)", re.I | re.S)
_STATE_RE = re.compile(
    rb"\b(?:(listen)\s|create\s+(?:global\s+|local\s+)?(temp)(?:orary)?\s|(prepare)\s+(?!transaction\b)\w"
    rb"|(declare)\b[^;]*\bwith\s+hold\b|pg_(?:try_)?(advisory)_lock(?:_shared)?\s*\("
    rb"|(set_config)\s*\(|(load)\s)",
    re.I | re.S,
)
_STATE_REASONS = ("listen", "temp_table", "prepare", "with_hold_cursor", "advisory_lock", "set_config", "load")
# Triggers do not fire under it: a transaction that names it is never fenced (see _end_writes).
_REPLICA_ROLE = re.compile(rb"session_replication_role", re.I)
_DEALLOCATE_RE = re.compile(rb"\b(?:deallocate|discard\s+(?:all|plans))\b", re.I)
_NO_STATE = (None, False)
# Each alternative starts with a distinct byte, so the engine skips most positions by that byte.
_SCREEN = re.compile(rb"s(?:et)|l(?:isten|oad)|t(?:emp)|p(?:repare)|h(?:old)|a(?:dvisory)|d(?:ealloc|iscard)")
_state_memo: dict[bytes, tuple[str | None, bool]] = {}
_STATE_MEMO = 20000  # entries; cleared when full
# A Query's text with every digit made 0: the same key for a statement run with new numbers.
# Sound because no pattern above tells one digit from another (all are \w, none is in a
# keyword, and no tracked setting's name holds one), and no multibyte character of a client
# encoding PostgreSQL accepts has an ASCII digit byte in it.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
assert not any(c.isdigit() for name in _TRACKED_SET_NAMES for c in name)
_query_memo: dict[bytes, tuple[str | None, bool]] = {}
_QUERY_MEMO = 4096  # entries (cleared when full) of at most _QUERY_MEMO_TEXT bytes: ~8 MiB at most
_QUERY_MEMO_TEXT = 2048


def session_state(sql: bytes) -> tuple[str | None, bool]:
    """(pin reason or None, whether it drops prepared statements) for a Query's text.

    Memoised by the text with its digits made 0: an app that puts its ids in the text sends
    one such key again and again (pgbench -S: ~0.15 µs against ~0.8 µs for the screen here).
    Other texts pay the screen: almost every statement contains none of the words it looks for.
    """
    key = sql.translate(_DIGITS_TO_ZERO) if len(sql) <= _QUERY_MEMO_TEXT else None
    found = None if key is None else _query_memo.get(key)
    if found is None:
        found = _NO_STATE if _SCREEN.search(sql.lower()) is None else _state_of(sql)
        if key is not None:
            if len(_query_memo) >= _QUERY_MEMO:
                _query_memo.clear()
            _query_memo[key] = found
    return found


def parsed_state(sql: bytes) -> tuple[str | None, bool]:
    """``session_state`` memoised by exact text before any screening: for a Parse message's text,
    which an extended-protocol client sends again and again (~0.1 µs here against ~0.9 µs for
    the screen)."""
    found = _state_memo.get(sql)
    if found is None:
        found = _state_of(sql)
        if len(_state_memo) >= _STATE_MEMO:
            _state_memo.clear()
        _state_memo[sql] = found
    return found


def _state_of(sql: bytes) -> tuple[str | None, bool]:
    """``session_state`` computed, with no screen and no memo."""
    reason: str | None = None
    m = _STATE_RE.search(sql)
    if m is not None:
        reason = _STATE_REASONS[m.lastindex - 1] if m.lastindex else "session_state"
    else:
        for sm in _SET_RE.finditer(sql):
            name = sm.group(2).lower()
            if name in (b"local", b"transaction", b"constraints"):
                continue
            if name.decode() not in _TRACKED_SET_NAMES:
                reason = "set"
                break
    result = (reason, _DEALLOCATE_RE.search(sql) is not None)
    return _NO_STATE if result == _NO_STATE else result


def parse_options(options: str) -> dict[str, str]:
    """Settings from the startup ``options`` parameter (``-c key=value`` / ``--key=value``)."""
    settings: dict[str, str] = {}
    tokens = re.findall(r"(?:\\.|\S)+", options)
    tokens = [re.sub(r"\\(.)", r"\1", t) for t in tokens]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            tok = tokens[i + 1]
            i += 1
        elif tok.startswith("-c"):
            tok = tok[2:]
        elif tok.startswith("--"):
            tok = tok[2:]
        else:
            raise ProxyError(
                "42704", f"invalid command-line argument in startup options: {tok}", fatal=True
            )
        key, sep, value = tok.partition("=")
        if not sep:
            raise ProxyError("42704", f"invalid startup option {tok!r}: expected key=value", fatal=True)
        settings[key.replace("-", "_")] = value
        i += 1
    return settings


class ClientSession(asyncio.Protocol):
    """One application connection."""

    def __init__(self, listener: ProxyServer, reject: ProxyError | None = None) -> None:
        self.listener = listener
        self.reject = reject
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.relay = False
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.peer = ""
        self.desired: dict[str, str] = {}
        # client name -> (server name, Parse body after the name, statement text)
        self.statements: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        self.pinned: str | None = None
        self.session_mode = listener.settings.pool.mode == "session"
        self.max_message = listener.settings.proxy.max_message_bytes
        self.pid = 0
        self.secret = secrets.randbits(31)
        self.connected_at = time.monotonic()
        self.transactions = 0
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._acquiring: asyncio.Task[None] | None = None
        self._queued = False  # waiting in the pool's queue (see Pool.enqueue)
        self.queued_at = 0.0
        self._held = False  # reading paused while a long input waits for a server
        self._server_paused = False
        # ---- statement measurement (issue 3): one entry per request that ends in ReadyForQuery
        self.stats = listener.stats
        self._recorder = listener.recorder
        self.measure = self._recorder is not None
        self._inflight: deque[tuple[bytes, float, float, bool] | None] = deque()
        self._segment: bytes | None = None  # text of the extended-protocol segment being sent
        self._segment_start = 0.0
        self._executed = False
        self._unnamed_sql = b""  # text of the unnamed statement, for a Bind without its Parse
        self._unnamed_parse: bytes | None = None  # ... and its Parse after the name (cache only)
        self._waited = 0.0  # seconds the next statement waited for a server connection
        self._sqlstate: str | None = None
        self._scope: Scope | None = None  # this session's (database, user) counters
        self._app = ""  # application_name and client_encoding now, as the session set them
        self._encoding = "utf-8"
        # ---- result cache (issue 4)
        self._front = listener.cache_front
        self._fill: Fill | None = None  # a cacheable miss whose response is being collected
        self._cache_settings = ""  # the session settings that shape results, for the cache key
        self._stateful = False  # ran a statement creating session state: never use the cache
        # cache.mode hinted, and this session has parsed no statement carrying a hint: an
        # extended-protocol segment without the hint in its own bytes can Bind none, so bypasses.
        self._unhinted = self._front is not None and self._front.mode == "hinted"
        # The tables (match keys) the open transaction wrote, as marked in the cache, with the
        # columns its UPDATEs set (ResultCache.begin_write).
        self._written = WriteMarks()
        self._watch: Watch | None = None  # the notifications of the server backend it writes through
        self._flush = False  # the open transaction may have written anything
        self._ddl = False  # ... or changed triggers or functions
        self._unfenced = False  # ... or named session_replication_role (see _end_writes)
        self._unnoted = False  # statements went unclassified while no read had ever been cached
        self._chained = False  # a COMMIT AND CHAIN committed writes that are not evicted yet
        self._looked_up = False  # the first buffered message was already looked up in the cache

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self.reject is not None:
            self.fail(self.reject)
            return
        self._task = asyncio.get_running_loop().create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self.relay and not self.buf and self._acquiring is None and not self._queued:
            # Fast path: nothing buffered, and the first message is complete (a server is
            # never held for a message still arriving): relay straight from ``data``.
            n = len(data)
            if self._front is not None and n >= 5 and data[0] == _Q:
                # Queries answered from the result cache, in order, while nothing is outstanding.
                while n >= 5 and data[0] == _Q:
                    end = 1 + _LEN.unpack_from(data, 1)[0]
                    if end > n or not self._idle():
                        break
                    if not self._from_cache(data, end, n):
                        self._looked_up = True  # if it waits for a server, not looked up again
                        break
                    data = data[end:]
                    n -= end
                if not n:
                    return
            elif (self._front is not None and (data[0] == _P or data[0] == _B) and data.endswith(_SYNC_MSG)
                    and self._idle() and self._segment_from_cache(data, n)):
                return  # an extended-protocol segment answered from the cache
            if n >= 5 and data[0] != _X and 1 + _LEN.unpack_from(data, 1)[0] <= n:
                server = self.server
                if server is None:
                    server = self.pool.try_acquire()  # type: ignore[union-attr]
                    if server is not None:
                        self._bind(server)
                if server is not None:
                    try:
                        self._forward(data)
                    except (ValueError, IndexError):  # a missing NUL terminator inside a message
                        self.buf.clear()
                        self.fail(ProxyError.protocol_violation("invalid message format"))
                    return
        self.buf += data
        if self.relay:
            self._pump()
        else:
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)

    def _pump(self) -> None:
        try:
            if self.server is not None:
                self._forward()
            else:
                self._idle_input()
        except (ValueError, IndexError):  # a missing NUL terminator inside a message
            self.buf.clear()
            self.fail(ProxyError.protocol_violation("invalid message format"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._acquiring is not None and not self._acquiring.done():
            self._acquiring.cancel()
        if self._queued:
            self._queued = False
            if self.pool is not None:
                self.pool.dequeue(self)
        server = self.server
        self.server = None
        self._fill = None
        if server is not None:
            if self._front is not None and (self._written or self._flush or self._unnoted):
                self._commit(True)  # a COMMIT may be running: it may still commit
            self._return_server(server, abandoned=True)
        if self.pinned is not None and self.pool is not None:
            self.pool.unpin()
            self.pinned = None
        self.listener.session_closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading from the server.
        if self.server is not None:
            self._server_paused = True
            self.server.pause_reading()

    def resume_writing(self) -> None:
        if self._server_paused:
            self._server_paused = False
            if self.server is not None:
                self.server.resume_reading()

    def pause_input(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_input(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ output
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)
            if self._fill is not None:
                self._fill.add(data)

    def fail(self, err: ProxyError) -> None:
        """Send an ErrorResponse; after a FATAL one, close the connection."""
        if err.fatal:
            log.info(
                "client_fatal",
                extra={"sqlstate": err.sqlstate, "error": err.message, "client": self.peer, "user": self.user},
            )
        self.write(pq.error_response(err))
        if err.fatal:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ startup
    async def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.closed:
                raise ConnectionResetError
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_startup(self) -> pq.StartupMessage | pq.CancelRequest | pq.EncryptionRequest:
        limit = self.listener.settings.proxy.max_startup_bytes
        (length,) = pq.UINT32.unpack(await self._read(4))
        if length < 8 or length > limit:
            if length < 8:
                raise ProxyError.protocol_violation("invalid length of startup packet")
            raise ProxyError.startup_too_large(length, limit)
        try:
            return pq.parse_startup_packet(await self._read(length - 4))
        except pq.ProtocolViolation as exc:
            raise ProxyError.protocol_violation(str(exc)) from None

    async def _read_message(self) -> tuple[bytes, bytes]:
        kind, length = pq.HEADER.unpack(await self._read(5))
        if length < 4 or length > self.listener.settings.proxy.max_startup_bytes:
            raise ProxyError.protocol_violation(f"invalid message length {length} during authentication")
        return kind, await self._read(length - 4)

    async def _login(self) -> None:
        timeout = self.listener.settings.proxy.client_login_timeout
        try:
            await asyncio.wait_for(self._startup(), timeout)
        except ProxyError as err:
            self.fail(err)
            self.close()
        except AuthFailed as exc:
            self.fail(exc.error)
            self.close()
        except asyncio.TimeoutError:
            self.fail(ProxyError.login_timeout(timeout))
            self.close()
        except (ConnectionError, asyncio.CancelledError):
            self.close()
        except Exception:  # noqa: BLE001 - one client's bug must not take down the proxy
            log.exception("client_login_crashed", extra={"client": self.peer})
            self.fail(ProxyError.internal("login failed"))
            self.close()

    async def _startup(self) -> None:
        listener = self.listener
        while True:
            msg = await self._read_startup()
            if isinstance(msg, pq.CancelRequest):
                await listener.cancel(msg.pid, msg.secret)
                self.close()
                return
            if isinstance(msg, pq.EncryptionRequest):
                if msg.code == pq.SSL_REQUEST and listener.ssl_context is not None and not self._is_tls():
                    if self.buf:
                        raise ProxyError.protocol_violation("received unencrypted data after SSL request")
                    self.write(b"S")
                    await self._start_tls(listener.ssl_context)
                else:
                    self.write(pq.SSL_NO)
                continue
            break
        major, minor = msg.protocol >> 16, msg.protocol & 0xFFFF
        if major != 3:
            raise ProxyError.unsupported_protocol(major, minor)
        params = msg.params
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if minor > 0 or unsupported:
            self.write(pq.negotiate_protocol_version(pq.PROTOCOL_3_0, unsupported))
        if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
            raise ProxyError(
                "0A000", "replication connections are not supported by pgsidecar", fatal=True
            )
        user = params.get("user")
        if not user:
            raise ProxyError.no_user()
        self.user = user
        self.database = params.get("database") or user
        self.application_name = params.get("application_name", "")
        settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("_pq_.")}
        if params.get("options"):
            settings.update(parse_options(params["options"]))
        for key in settings:
            if key in READ_ONLY_PARAMS:
                raise ProxyError("55P02", f'parameter "{key}" cannot be changed now', fatal=True)

        # ---- authentication
        verifier = listener.verifier(user)
        first = verifier.first()
        if first:
            self.write(first)
            done = False
            while not done:
                kind, body = await self._read_message()
                if kind != pq.PASSWORD:
                    raise ProxyError.protocol_violation(
                        f"expected password response, got message type {kind.decode(errors='replace')!r}"
                    )
                reply, done = verifier.step(body)
                if reply:
                    self.write(reply)
        self.write(pq.auth_request(pq.AUTH_OK))

        # ---- the pool, and the parameters this client must be told
        pool = listener.pool_for(self.database, user)
        self.pool = pool
        try:
            reported = await pool.login_parameters(settings)
        except ProxyError as err:
            err.severity = "FATAL"  # a session that cannot reach its database cannot start
            raise
        desired = {k: v for k, v in reported.items() if k not in READ_ONLY_PARAMS}
        for key, value in settings.items():
            if key not in reported:
                desired[key] = value
        self.desired = pool.intern_settings(desired)
        self._track_settings()
        if self.stats is not None:
            self._scope = self.stats.scope(self.database, user)
        self.pid = listener.session_opened(self)
        out = [pq.parameter_status(k, v) for k, v in reported.items()]
        out.append(pq.backend_key_data(self.pid, self.secret))
        out.append(pq.ready_for_query(b"I"))
        self.write(b"".join(out))
        self.relay = True
        if self.buf:
            self._idle_input()

    def _is_tls(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is not None

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        transport = await loop.start_tls(self.transport, self, context, server_side=True)
        if transport is None:
            raise ConnectionResetError
        self.transport = transport  # type: ignore[assignment]

    # ------------------------------------------------------------------ relay
    def _idle_input(self) -> None:
        """Client data while no server connection is attached."""
        buf = self.buf
        while True:
            if len(buf) < 5:
                return
            kind, length = pq.HEADER.unpack_from(buf, 0)
            if length < 4 or length > self.max_message:
                self._violation(length)
                return
            if kind == b"X":
                self.close()
                return
            if len(buf) < length + 1:
                return
            if self._looked_up:
                self._looked_up = False
            elif (kind == b"Q" and self._front is not None and self._acquiring is None and not self._queued
                    and not self.closed and self._from_cache(buf, length + 1, len(buf))):
                del buf[: length + 1]  # answered from the cache: on to the next message
                continue
            break
        if self._acquiring is None and not self._queued:
            pool = self.pool
            assert pool is not None
            server = pool.try_acquire()
            if server is not None:
                self._attached(server)
                return
            if len(buf) > _PAUSE_BUFFER and self.transport is not None:
                self._held = True
                self.transport.pause_reading()
            if pool.full() and not pool.idle:
                # Wait in the pool's queue: release() hands a server over synchronously.
                self.queued_at = time.monotonic()
                self._queued = True
                pool.enqueue(self)
                return
            self._acquiring = asyncio.get_running_loop().create_task(self._attach())

    def grant(self, server: ServerConnection, now: float) -> bool:
        """Called by Pool.release, at ``now``, for a queued client: take this server (False: no
        longer wanted)."""
        if not self._queued or self.closed:
            return False
        self._queued = False
        self._waited = waited = now - self.queued_at
        self.pool.checkout_waited(waited)  # type: ignore[union-attr]
        if self._held:
            self._resume_held()
        self._attached(server)
        return True

    def _resume_held(self) -> None:
        self._held = False
        if self.transport is not None:
            self.transport.resume_reading()

    def retry(self) -> bool:
        """Called by the pool when capacity freed up: open a connection on the async path."""
        if not self._queued or self.closed:
            return False
        self._queued = False
        self._acquiring = asyncio.get_running_loop().create_task(self._attach())
        return True

    def queue_timeout(self) -> None:
        """Called by the pool, which took this client off its queue: it waited too long."""
        pool = self.pool
        assert pool is not None
        self._queued = False
        pool.checkout_timeouts += 1
        self._waited = time.monotonic() - self.queued_at
        waited_ms = self._waited * 1000
        s = pool.settings
        self._reject_pending_input(ProxyError.checkout_timeout(pool.name, waited_ms, s.size, s.max_overflow))

    async def _attach(self) -> None:
        pool = self.pool
        assert pool is not None
        started = time.monotonic()
        try:
            server = await pool.acquire()
            self._waited = time.monotonic() - started
        except ProxyError as err:
            self._waited = time.monotonic() - started
            self._acquiring = None
            self._reject_pending_input(err)
            return
        except asyncio.CancelledError:
            self._acquiring = None
            return
        self._acquiring = None
        if self.closed:
            pool.release(server)
            return
        self._resume_held()
        self._attached(server)

    def _attached(self, server: ServerConnection) -> None:
        self._bind(server)
        self._pump()

    def _bind(self, server: ServerConnection) -> None:
        server.client = self
        self.server = server
        if server.applied is not self.desired:
            self.pool.apply(server, self.desired)  # type: ignore[union-attr]

    def cancel_waiting(self) -> bool:
        """A CancelRequest for a statement still waiting for a server connection.

        The wait ends, the statement (up to its Sync) is answered with 57014 without ever
        running, and whatever the client sent after it waits for a server again.
        """
        if self._queued:
            self._queued = False
            self.pool.dequeue(self)  # type: ignore[union-attr]
        elif self._acquiring is not None and not self._acquiring.done():
            self._acquiring.cancel()
            self._acquiring = None
        else:
            return False
        self._reject_pending_input(ProxyError.query_canceled(), one=True)
        if self.buf and not self.closed:
            self._idle_input()
        return True

    def _reject_pending_input(self, err: ProxyError, *, one: bool = False) -> None:
        """No server: answer the buffered messages with the error, keep the session usable.

        Like PostgreSQL after an error in extended protocol, everything up to and including
        the next Sync (or the Query) is consumed, then ReadyForQuery follows. With ``one``,
        only the first such statement is answered.
        """
        self._fill = None  # the statement it was collecting for never ran
        buf = self.buf
        pos = 0
        n = len(buf)
        replied = False
        measure = self.measure
        started = time.monotonic() - self._waited
        text = b""
        while n - pos >= 5:
            kind = buf[pos]
            start = pos
            end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
            if end > n:
                break
            pos = end
            if kind == _X:
                del buf[:pos]
                self.close()
                return
            if measure:
                if kind == _Q:
                    text = bytes(buf[start + 5 : end - 1])
                elif kind == _P:
                    nul = buf.index(0, start + 5, end)
                    text = bytes(buf[nul + 1 : buf.index(0, nul + 1, end)])
            if kind == _Q or kind == _S or kind == _F:
                if measure:  # it never ran, and the client got an error: counted as one
                    self._record(text, started, self._waited, 0, err.sqlstate)
                    text = b""
                if not replied:
                    self.write(pq.error_response(err))
                replied = False
                self.write(pq.ready_for_query(b"I"))
                if one:
                    break
            elif kind in (_P, _B, _D, _E, _C) and not replied:
                self.write(pq.error_response(err))
                replied = True
        del buf[:pos]
        self._waited = 0.0
        self._resume_held()
        if err.fatal:
            self.fail(err)

    def _violation(self, length: int) -> None:
        if length > self.max_message:
            self.fail(ProxyError.message_too_large(length, self.max_message))
        else:
            self.fail(ProxyError.protocol_violation(f"invalid message length {length}"))
        self.buf.clear()
        self.close()

    def _forward(self, data: bytes | None = None) -> None:  # noqa: C901 - the hot loop, in one piece on purpose
        """Relay the complete messages in ``self.buf``, or in ``data`` when nothing was
        buffered (what is left of ``data`` is then buffered)."""
        server = self.server
        assert server is not None
        buf: bytes | bytearray = self.buf if data is None else data
        n = len(buf)
        run = 0  # start of the run of client bytes forwarded untouched
        out: list[bytes] = []
        pending = server.pending
        # After an error in extended protocol the server ignores everything up to the Sync the
        # client has not sent yet: so do we (no request expected, no statement prepared).
        dropping = server.skipping and server.discarding()
        measure = self.measure
        front = self._front
        self._looked_up = False
        if front is not None and self._fill is not None and any(r.action == FORWARD for r in pending):
            # Pipelined behind a cacheable miss: its response is not stored. (Only the client's
            # own requests count: the SETs that bring a fresh server in line with the client's
            # settings are answered to nobody.)
            self._fill = None
            front.cache.record_rejected("pipelined")
        if measure:
            # When this batch arrived: it may have waited for a server connection meanwhile.
            now = time.monotonic() - self._waited
            waited = self._waited
            self._waited = 0.0
            inflight = self._inflight
        found, stop, bad_length = frame_messages(buf, self.max_message)
        for t, pos, end in found:
            if dropping and t != _S and t != _X:
                if t not in _KNOWN:
                    self.fail(ProxyError.protocol_violation(f"invalid frontend message type {t}"))
                    return
                continue
            if t == _Q:
                pending.append(FORWARD_QUERY)
                sql = bytes(buf[pos + 5 : end - 1])
                self._inspect(session_state(sql), server)
                if front is not None:
                    if server.txn != _IDLE:
                        front.cache.record_bypass("in_transaction")  # never looked up, counted
                    if self._fill is None:  # else it is the cacheable SELECT being collected
                        if front.fills:
                            self._classify(sql, len(pending) > 1)
                        else:  # nothing cached yet (see _classify)
                            self._unnoted = True
                if measure:
                    inflight.append((sql, now, waited, True))
                    waited = 0.0
            elif t == _B:
                p1 = buf.index(0, pos + 5, end)
                p2 = buf.index(0, p1 + 1, end)
                target = None
                if measure or front is not None:
                    text = self._statement_text(bytes(buf[p1 + 1 : p2]))
                    if measure:
                        if not self._segment_start:
                            self._segment_start = now
                        if self._segment is None:
                            self._segment = text
                    if front is not None:
                        if server.txn != _IDLE:
                            front.cache.record_bypass("in_transaction")
                        if self._fill is None:
                            if front.fills:
                                if p2 > p1 + 1:
                                    known = self.statements.get(bytes(buf[p1 + 1 : p2]))
                                    parse = known[1] if known else None
                                else:
                                    parse = self._unnamed_parse
                                # (the live buffer: read at once, by the classification)
                                self._classify(text, bool(pending), Bind(buf, p2 + 1, parse))
                            else:  # nothing cached yet (see _classify)
                                self._unnoted = True
                if p2 > p1 + 1:
                    target = self._server_statement(bytes(buf[p1 + 1 : p2]), server, out, buf, run, pos)
                    if target is not None:
                        body = bytes(buf[pos + 5 : p1 + 1]) + target + bytes(buf[p2 + 1 : end])
                        out.append(pq.message(pq.BIND, body))
                        run = end
                        target = target[:-1]
                pending.append(FORWARD_BIND if target is None else Request(K_BIND, FORWARD, target))
            elif t == _E:
                pending.append(FORWARD_EXECUTE)
                self._executed = True
            elif t == _S:
                pending.append(FORWARD_SYNC)
                dropping = False
                if measure:
                    inflight.append(
                        (self._segment or b"", self._segment_start or now, waited, self._executed)
                    )
                    waited = 0.0
                    self._segment = None
                    self._segment_start = 0.0
                    self._executed = False
            elif t == _P:
                nul = buf.index(0, pos + 5, end)
                qend = buf.index(0, nul + 1, end)
                sql = bytes(buf[nul + 1 : qend])
                self._inspect(parsed_state(sql), server)
                if measure:
                    self._segment = sql
                if self._unhinted and HINT_MARK in sql:
                    self._unhinted = False
                if nul == pos + 5:
                    self._unnamed_sql = sql  # what a later Bind of the unnamed statement runs
                    if front is not None and front.fills:  # its parameter types, once the cache is used
                        self._unnamed_parse = bytes(buf[nul + 1 : end])
                if nul > pos + 5:
                    name = bytes(buf[pos + 5 : nul])
                    rest = bytes(buf[nul + 1 : end])
                    sname = self.pool.statement_names.get(rest)  # type: ignore[union-attr]
                    if sname is None:
                        sname = self.pool.new_statement_name(rest)  # type: ignore[union-attr]
                    self.statements[name] = (sname, rest, sql)
                    if run < pos:
                        out.append(bytes(buf[run:pos]))
                    run = end
                    if sname in server.prepared:
                        self._synthetic(server, pq.PARSE_COMPLETE_MSG, out)
                    else:
                        server.prepared.add(sname)
                        out.append(pq.parse_message(sname, rest))
                        pending.append(Request(K_PARSE, FORWARD, sname))
                else:
                    pending.append(FORWARD_PARSE)
            elif t == _D:
                if buf[pos + 5] == _S and end - pos > 7:
                    target = self._server_statement(bytes(buf[pos + 6 : end - 1]), server, out, buf, run, pos)
                    if target is not None:
                        out.append(pq.message(pq.DESCRIBE, b"S" + target))
                        run = end
                pending.append(FORWARD_DESCRIBE)
            elif t == _C:
                if buf[pos + 5] == _S and end - pos > 7:
                    self.statements.pop(bytes(buf[pos + 6 : end - 1]), None)
                    if run < pos:
                        out.append(bytes(buf[run:pos]))
                    run = end
                    self._synthetic(server, pq.CLOSE_COMPLETE_MSG, out)
                else:
                    pending.append(FORWARD_CLOSE)
            elif t == _H or t in _COPY:
                pass
            elif t == _F:
                pending.append(FORWARD_FUNC)
                if front is not None:
                    self._write_anything()  # a function call by OID: it may write anything
                if measure:
                    inflight.append(None)
            elif t == _X:
                if run < pos:
                    out.append(bytes(buf[run:pos]))
                if data is None:
                    del self.buf[:end]
                if out:
                    server.send(b"".join(out))
                self.close()
                return
            else:
                self.fail(ProxyError.protocol_violation(f"invalid frontend message type {t}"))
                return
        if bad_length >= 0:
            self._violation(bad_length)
            return
        pos = stop
        if data is not None:
            if pos < n:
                self.buf += data[pos:]
            if run < pos:
                out.append(data if run == 0 and pos == n else data[run:pos])
        elif pos:
            if run < pos:
                out.append(bytes(buf[run:pos]) if run or pos < n else bytes(buf))
            del self.buf[:pos]
        if out:
            server.send(out[0] if len(out) == 1 else b"".join(out))

    def _synthetic(self, server: ServerConnection, data: bytes, out: list[bytes]) -> None:
        """A response the proxy makes itself, in its place among the server's responses."""
        # Requests already in ``out`` are in ``pending`` too: the answer waits its turn.
        due = server.add_synthetic(data)
        if due is not None:
            self.write(due)

    def _server_statement(
        self, name: bytes, server: ServerConnection, out: list[bytes], buf: bytes | bytearray, run: int, pos: int
    ) -> bytes | None:
        """Server-side name for a client's named statement, preparing it there if needed.

        Returns None when the statement is unknown (the server will report the error).
        Flushes the untouched run before the message being rewritten.
        """
        entry = self.statements.get(name)
        if entry is None:
            return None
        sname, rest, _ = entry
        if run < pos:
            out.append(bytes(buf[run:pos]))
        if sname not in server.prepared:
            server.prepared.add(sname)
            out.append(pq.parse_message(sname, rest))
            server.plain = False
            server.pending.append(Request(K_PARSE, SKIP, sname))
        return sname + b"\x00"

    def _inspect(self, state: tuple[str | None, bool], server: ServerConnection) -> None:
        """Act on a statement's ``session_state``: pin the session, forget prepared statements."""
        reason, drops_statements = state
        if drops_statements:
            server.prepared.clear()
        if reason is not None:
            self._stateful = True
        if reason is not None and self.pinned is None and not self.session_mode:
            self.pinned = reason
            self.pool.pin(reason)  # type: ignore[union-attr]
            log.debug("client_pinned", extra={"reason": reason, "client": self.peer, "user": self.user})

    # ------------------------------------------------------------------ called by ServerConnection
    def server_ready(self, status: int, idle_seen: bool = False) -> None:
        """The server answered up to a ReadyForQuery with ``status``. ``idle_seen``: an earlier
        ReadyForQuery in the same read said 'I' (a pipelined autocommit statement committed ahead
        of a BEGIN whose transaction is still open): its writes are committed too."""
        server = self.server
        if self._front is not None:
            fill = self._fill
            if fill is not None:
                self._fill = None
                self._front.finish(fill, status)
            if status == _IDLE or idle_seen:
                if self._written.tables or self._flush or self._ddl or (self._unnoted and self._front.fills):
                    # Final only when no transaction stays open and nothing is outstanding:
                    # otherwise evict now and keep the marks until the transaction ends.
                    self._commit(status == _IDLE and (server is None or not server.pending))
                elif status == _IDLE:
                    self._unnoted = False  # nothing was ever cached meanwhile: nothing to invalidate
        if server is None or server.pending:
            return
        self.transactions += status == _IDLE
        if status == _IDLE and self.pinned is None and not self.session_mode:
            self.server = None
            if self._server_paused:
                self._server_paused = False
                server.resume_reading()
            if server._paused:  # noqa: SLF001
                self.resume_input()
            self.pool.release(server)  # type: ignore[union-attr]
            if self.buf:
                self._idle_input()

    def server_error(self, fields: dict[str, str]) -> None:
        if self._sqlstate is None:
            self._sqlstate = fields.get("C") or "XX000"

    def _statement_text(self, name: bytes) -> bytes:
        """The text a Bind runs: its named statement's, or the unnamed one's."""
        if not name:
            return self._unnamed_sql
        entry = self.statements.get(name)
        return b"" if entry is None else entry[2]

    def statement_done(self, rows: int | bytes) -> None:
        """The server answered one Query or one Sync of this client: record the statement.

        ``rows`` is a count, or the CommandComplete tag to read it from (off the relay path)."""
        inflight = self._inflight
        sqlstate = self._sqlstate
        self._sqlstate = None
        if not inflight:
            return
        entry = inflight.popleft()
        if entry is None:
            return
        sql, start, waited, executed = entry
        if executed or sqlstate is not None:  # else a Parse/Describe-only segment: nothing ran
            self._record(sql, start, waited, rows, sqlstate)

    def _record(self, sql: bytes | Fingerprint, start: float, waited: float, rows: int | bytes,
                sqlstate: str | None) -> None:
        """Hand a finished statement to the recorder: appended to its batch here (once per
        statement, no call into the recorder but to arm its timer or flush a full batch)."""
        recorder = self._recorder
        pending = recorder.pending  # type: ignore[union-attr]  # measure is off without one
        pending.append((sql, self._encoding, self._scope, self._app, self.peer,  # type: ignore[arg-type]
                        time.monotonic() - start, waited, rows, sqlstate))
        if len(pending) == 1 or len(pending) >= recorder.max_batch:  # type: ignore[union-attr]
            recorder.added()  # type: ignore[union-attr]

    def statement_stale(self, name: bytes) -> None:
        self.pool.forget_statement(name)  # type: ignore[union-attr]

    def server_param(self, name: str, value: str) -> None:
        if name not in READ_ONLY_PARAMS and self.desired.get(name) != value:
            changed = dict(self.desired)
            changed[name] = value
            self.desired = self.pool.intern_settings(changed)  # type: ignore[union-attr]
            self._track_settings()

    def _track_settings(self) -> None:
        desired = self.desired
        self._app = desired.get("application_name", "")
        self._encoding = desired.get("client_encoding", "utf-8")
        self._cache_settings = "\n".join(
            f"{k}={v}" for k, v in sorted(desired.items()) if k != "application_name")

    # ------------------------------------------------------------------ result cache
    def _idle(self) -> bool:
        """No transaction open and nothing outstanding: a Query may be answered from the cache."""
        server = self.server
        return server is None or (not server.pending and server.txn == _IDLE)

    def _from_cache(self, buf: bytes | bytearray, end: int, n: int) -> bool:
        """The Query at ``buf[:end]``, sent while idle: answer it from the cache (True), or
        start collecting its response when it may be stored (False: forward it)."""
        front = self._front
        assert front is not None
        self._fill = None  # idle: whatever was collected before is over
        if front.mode == "hinted" and buf.find(HINT_MARK, 5, end) < 0:
            front.cache.not_hinted += 1  # the default mode's usual case: no copy, no call
            return False
        if self._stateful:
            front.cache.record_bypass("session_state")
            return False
        sql = bytes(buf[5 : end - 1])
        start = time.monotonic()
        found = front.lookup(sql, self.database, self.user, self._cache_settings, self._encoding,
                             self.pool.endpoint)  # type: ignore[union-attr]
        if found is None:
            return False
        if isinstance(found, Fill):
            if end == n:  # nothing pipelined behind it
                self._fill = found
            return False
        self._replay(found, sql, start)
        return True

    def _replay(self, found: CachedResult, sql: bytes, start: float) -> None:
        """Send a cache hit (8 bytes of row count, then the server's response) and count it."""
        if self.closed or self.transport is None:
            return
        response = found.response
        self.transport.write(memoryview(response)[8:])
        self.transactions += 1
        if self.measure:
            # The entry's fingerprint: the statistics need not shape and look up the text again.
            self._record(found.fingerprint or sql, start, 0.0, int.from_bytes(response[:8], "big"), None)

    def _segment_from_cache(self, data: bytes, n: int) -> bool:
        """``data`` is exactly one extended-protocol segment (Parse?, Bind, Describe?, Execute,
        Sync), sent while idle: answer it from the cache (True), or start collecting its response
        when it may be stored (False: forward it). Anything else in it (Close, Flush, several
        Executes, an unknown statement) bypasses."""
        front = self._front
        assert front is not None
        self._fill = None
        if self._unhinted:
            if data.find(HINT_MARK) < 0:
                # The default mode's usual case: no statement this session can Bind is hinted.
                front.cache.not_hinted += 1
                return False
            self._unhinted = False  # (a Parse here may be served from the cache, unseen by _forward)
        if self._stateful:
            front.cache.record_bypass("session_state")
            return False
        statements = self.statements
        parsed: dict[bytes, bytes] = {}  # names parsed in this segment -> text
        parses: list[tuple[bytes, bytes, bytes]] = []  # (name, body after the name, text)
        parts: list[bytes] = []
        text = b""
        binds = executes = 0
        bind = None
        pos = 0
        try:
            while pos < n:
                t = data[pos]
                end = pos + 1 + _LEN.unpack_from(data, pos + 1)[0]
                if end > n:
                    return False
                if t == _P:
                    nul = data.index(0, pos + 5, end)
                    qend = data.index(0, nul + 1, end)
                    name = bytes(data[pos + 5 : nul])
                    rest = bytes(data[nul + 1 : end])
                    sql = bytes(data[nul + 1 : qend])
                    parsed[name] = sql
                    parses.append((name, rest, sql))
                    parts.append(b"P" + rest)
                elif t == _B:
                    p1 = data.index(0, pos + 5, end)
                    p2 = data.index(0, p1 + 1, end)
                    sql = self._text_of(bytes(data[p1 + 1 : p2]), parsed)
                    if not sql:
                        return False
                    if volatile_params(data, p2 + 1):
                        front.cache.record_bypass("volatile_literal")
                        return False
                    text = sql
                    parts.append(b"B" + bytes(data[pos + 5 : p1 + 1]) + sql + bytes(data[p2:end]))
                    binds += 1
                    name = bytes(data[p1 + 1 : p2])
                    known = statements.get(name)
                    earlier = known[1] if known else (self._unnamed_parse if not name else None)
                    bind = Bind(bytes(data[pos:end]), p2 + 1 - pos,
                                next((r for n_, r, _ in reversed(parses) if n_ == name), earlier))
                elif t == _D:
                    if data[pos + 5] == _S:
                        parts.append(b"DS" + self._text_of(bytes(data[pos + 6 : end - 1]), parsed))
                    else:
                        parts.append(bytes(data[pos:end]))
                elif t == _E:
                    parts.append(bytes(data[pos:end]))
                    executes += 1
                elif t != _S or end != n:
                    return False
                pos = end
        except (ValueError, IndexError):
            return False  # malformed: the normal path reports it
        if binds != 1 or executes != 1:
            return False
        start = time.monotonic()
        found = front.lookup(text, self.database, self.user, self._cache_settings, self._encoding,
                             self.pool.endpoint, b"E" + b"".join(parts), bind)  # type: ignore[union-attr]
        if found is None:
            return False
        if isinstance(found, Fill):
            self._fill = found
            return False
        # A hit: the statements the segment parsed exist for this client from now on, as if
        # the server had prepared them (the server names are prepared on demand later).
        pool = self.pool
        assert pool is not None
        for name, rest, sql in parses:
            if name:
                sname = pool.statement_names.get(rest)
                if sname is None:
                    sname = pool.new_statement_name(rest)
                statements[name] = (sname, rest, sql)
            else:
                self._unnamed_sql = sql
        self._replay(found, text, start)
        return True

    def _text_of(self, name: bytes, parsed: dict[bytes, bytes]) -> bytes:
        """The text of statement ``name``: parsed in the segment at hand, or earlier (b"": unknown)."""
        sql = parsed.get(name)
        return self._statement_text(name) if sql is None else sql

    def _classify(self, sql: bytes, behind: bool, bind: Bind | None = None) -> None:
        """Note what a statement of the open transaction writes, for invalidation at commit.

        ``behind``: requests sent before this one are still unanswered (pipelined). ``bind``:
        the Bind message that runs it (extended protocol).

        Called by the relay only once the cache has collected a read (``front.fills``). Before,
        there is nothing to invalidate: the relay only sets ``_unnoted``, and if a read is
        collected by the time the transaction commits, the commit flushes (see _commit)."""
        front = self._front
        assert front is not None
        action, keys, ddl, columns, rows = front.classify(sql, self._encoding, front.monitors.get(self.database),
                                                          bind)
        if ddl:
            self._ddl = True
        if _REPLICA_ROLE.search(sql) is not None:
            self._unfenced = True
        if action == READ:
            return
        if action == WRITE:
            # What reads these columns is neither served nor stored until this transaction ends.
            front.cache.begin_write(keys, columns, self._written, rows)
            if self._watch is None and self.server is not None and self.server.pid:
                monitor = front.monitors.get(self.database)
                if monitor is not None and monitor.ready:
                    self._watch = monitor.watch(self.server.pid)
        elif action == FLUSH:
            self._write_anything()
        elif action == CHAIN:
            self._chained = True  # committed: evicted at the ReadyForQuery 'I' that ends the chain
        elif action == ROLLBACK:
            # Nothing this transaction wrote will be seen, unless part of it committed already
            # (a COMMIT AND CHAIN) or writes sent before it in the same batch may have committed
            # (pipelined autocommit statements): then the marks stay, and the ReadyForQuery that
            # ends it all evicts, at worst once too often.
            if not self._chained and not behind:
                self._end_writes(committed=False)

    def _write_anything(self) -> None:
        if not self._flush:
            self._flush = True
            self._front.cache.begin_write_all()  # type: ignore[union-attr]

    def _end_writes(self, committed: bool) -> None:
        """The open transaction ended: release its marks; when it committed, evict again."""
        front = self._front
        assert front is not None
        cache = front.cache
        watch, self._watch = self._watch, None
        monitor = front.monitors.get(self.database) if watch is not None else None
        if self._written:
            # Fenced: the rows the triggers name decide what is evicted. Not after DDL (no trigger
            # notifies it), nor in a session with state (SET session_replication_role = replica
            # there would silence the triggers).
            if (committed and monitor is not None and not self._flush and not self._ddl and not self._unfenced
                    and not self._stateful and monitor.commit_fenced(self._written, watch)):  # type: ignore[arg-type]
                self._written = WriteMarks()  # the monitor releases those marks after the fence
                watch = None  # ... and ends the watch
            else:
                cache.end_write(self._written, committed)
        if watch is not None and monitor is not None:
            monitor.unwatch(watch)
        if self._flush:
            cache.end_write_all(committed)
            self._flush = False
        if committed and self._ddl:
            monitor = front.monitors.get(self.database)
            if monitor is not None:
                monitor.refresh_soon()
        self._ddl = self._chained = self._unfenced = False

    def _commit(self, final: bool) -> None:
        """ReadyForQuery with no transaction open: what was written is committed; evict it.

        With requests still outstanding (pipelined) the writes noted may include theirs, not yet
        committed: evicted now, and the marks kept until the final ReadyForQuery."""
        front = self._front
        assert front is not None
        if self._unnoted and front.fills:
            front.cache.flush("proxy")  # statements of this transaction went unclassified
        if final:
            self._unnoted = False
            self._end_writes(committed=True)
        else:
            if self._written:
                front.cache.invalidate(self._written.tables, "proxy", self._written.columns())
            if self._flush:
                front.cache.flush("proxy")

    def server_lost(self) -> None:
        server = self.server
        self.server = None
        self._fill = None
        if self._front is not None and (self._written or self._flush or self._unnoted):
            self._commit(True)  # a COMMIT may have reached the server before it died
        if server is not None and self.pool is not None:
            self.pool.discard(server)
        self.fail(ProxyError.server_lost(self.pool.name if self.pool else "?"))

    # ------------------------------------------------------------------ cleanup
    def _return_server(self, server: ServerConnection, *, abandoned: bool) -> None:
        """Give a server back after the client left: clean it, or close it."""
        pool = self.pool
        assert pool is not None
        server.client = None
        if self._server_paused:
            server.resume_reading()
        if server.closed:
            pool.discard(server)
            return
        if server.pending:
            # A request is still running: cancel it and drop the connection, so no lock and
            # no half-read result can reach the next client.
            pool.discard(server)
            asyncio.get_running_loop().create_task(_cancel_quietly(server))
            return
        statements = []
        if server.txn != _IDLE:
            statements.append("ROLLBACK")
        if self.pinned is not None or self.session_mode:
            statements.append("DISCARD ALL")
        if not statements:
            pool.release(server)
            return
        asyncio.get_running_loop().create_task(self._reset(server, statements))

    async def _reset(self, server: ServerConnection, statements: list[str]) -> None:
        pool = self.pool
        assert pool is not None
        timeout = self.listener.settings.pool.server_reset_timeout
        try:
            for sql in statements:
                err = await asyncio.wait_for(server.run_internal(sql), timeout)
                if err is not None:
                    raise ProxyError.from_server(err)
                if sql == "DISCARD ALL":
                    server.prepared.clear()
                    server.extra_settings.clear()
                    server.applied = None
        except (ProxyError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("server_reset_failed", extra={"pool": pool.name, "error": str(exc)})
            pool.discard(server)
            return
        pool.release(server)


async def _cancel_quietly(server: ServerConnection) -> None:
    try:
        await server.endpoint.cancel(server.pid, server.secret)
    except (OSError, asyncio.TimeoutError):
        pass
