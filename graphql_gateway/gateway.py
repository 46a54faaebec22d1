"""``Gateway``: one GraphQL gateway's schema, settings, statistics and asyncpg pool to the proxy,
and the transport-independent steps of an operation: ``prepare`` (parse and validate, both cached
per query text; coerce the variables; check the limits with the coerced values), ``execute``
(with ``executor.RowExecutionContext``, within the query timeout, its statements cancelled when it
ends, timed and counted) and ``formatted`` (client-safe errors). ``app.py`` (HTTP) and ``ws.py``
(WebSocket) call them.

Its pool is the loopback design described in ``graphql_gateway.app``: client sessions to the
proxy's own listen address as the upstream DSN's user, ``application_name=pgsidecar-graphql``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import CoroutineType
from typing import Any

import asyncpg
from graphql import (
    DocumentNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    execute,
    get_operation_ast,
    parse,
    specified_rules,
    validate,
)
from graphql.execution.values import get_variable_values

from config.settings import GraphQLSettings
from proxy.listener import ProxyServer

from .data import RequestData
from .executor import RowExecutionContext
from .limits import check_limits
from .metrics import GatewayStats
from .resolvers import OperationContext
from .schema import build_schema

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgsidecar-graphql"

__all__ = ["APPLICATION_NAME", "BadRequest", "Gateway", "Outcome", "Prepared", "Rejected"]


class BadRequest(Exception):
    """Not a well-formed GraphQL-over-HTTP request: answered with ``status`` and one error."""

    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class Prepared:
    """A parsed and validated operation, ready to execute."""

    document: DocumentNode
    operation: OperationDefinitionNode
    variables: dict[str, Any]
    name: str | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """Request errors (syntax, validation, limits, variables): nothing was executed."""

    errors: list[GraphQLError]
    name: str | None  # the operation's name when the document could be parsed


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an operation produced: the response body, whether it was a request error, the result label."""

    body: dict[str, Any]
    request_error: bool
    result: str


def error_entry(message: str, **extensions: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"message": message}
    if extensions:
        out["extensions"] = extensions
    return out


def _loopback(host: str) -> str:
    """The address to reach a listener bound to ``host`` from this process."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _is_awaitable(value: Any) -> bool:
    """What our resolvers return that must be awaited: coroutines and the loaders' futures.

    graphql-core's default check handles any awaitable, at a cost paid for every field; ours only
    ever return these two (scalars come from dicts)."""
    return isinstance(value, (CoroutineType, asyncio.Future))


def expanded_selections(document: DocumentNode) -> int:
    """How many selections the document's operations have with their fragment spreads written out
    (each fragment counted once, then multiplied by its spreads: linear in the document's size)."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    sizes: dict[str, int] = {}

    def size(selection_set: SelectionSetNode | None) -> int:
        total = 0
        for selection in selection_set.selections if selection_set is not None else ():
            if isinstance(selection, FieldNode):
                total += 1 + size(selection.selection_set)
            elif isinstance(selection, InlineFragmentNode):
                total += size(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                if name not in sizes:
                    sizes[name] = 0  # while measured: a cycle counts nothing (NoFragmentCycles reports it)
                    fragment = fragments.get(name)
                    sizes[name] = size(fragment.selection_set) if fragment is not None else 0
                total += sizes[name]
        return total

    return sum(size(d.selection_set) for d in document.definitions if isinstance(d, OperationDefinitionNode))


def most_repeated_response_name(document: DocumentNode) -> int:
    """The most fields any one selection set has under one response name, counting those its inline
    fragments and (each once) its fragment spreads bring in: what graphql-core's
    OverlappingFieldsCanBeMerged compares pairwise."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    by_fragment: dict[str, Counter[str]] = {}
    worst = 0

    def names(selection_set: SelectionSetNode, spread: set[str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                counts[(selection.alias or selection.name).value] += 1
            elif isinstance(selection, InlineFragmentNode):
                counts.update(names(selection.selection_set, spread))
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in spread:
                name = selection.name.value
                spread.add(name)
                if name not in by_fragment:
                    by_fragment[name] = Counter()  # while counted: a cycle adds nothing
                    fragment = fragments.get(name)
                    if fragment is not None:
                        by_fragment[name] = names(fragment.selection_set, set())
                counts.update(by_fragment[name])
        return counts

    def check(selection_set: SelectionSetNode | None) -> None:
        nonlocal worst
        if selection_set is None:
            return
        counts = names(selection_set, set())
        if counts:
            worst = max(worst, max(counts.values()))
        for selection in selection_set.selections:
            if isinstance(selection, (FieldNode, InlineFragmentNode)):
                check(selection.selection_set)

    for definition in document.definitions:
        if isinstance(definition, (OperationDefinitionNode, FragmentDefinitionNode)):
            check(definition.selection_set)
    return worst


class DocumentCache:
    """Parsed documents and their errors under the specified validation rules, by query text (LRU).

    Clients send the same few query texts over and over; parsing and validating one costs about as
    much as running a small query. The limits rule depends on the variables, so it runs per request."""

    MAX_ENTRIES = 512
    MAX_QUERY_CHARS = 20_000  # longer texts are parsed every time rather than held
    # A document with more is refused by the parser (a syntax error). Parsing and validating a
    # distinct document of 20,000 tokens held the proxy's event loop for ~0.3 s; real queries are
    # far smaller (GraphiQL's full introspection query is under 1,000).
    MAX_TOKENS = 5_000
    # Selections with every fragment spread written out in full: graphql-core's validation rules
    # (MaxIntrospectionDepthRule among them) walk every spread, which is exponential in a chain of
    # fragments spreading the next twice. GraphiQL's introspection query has ~230.
    MAX_SELECTIONS = 10_000
    # Fields one selection set has under one response name (fragments included): OverlappingFields-
    # CanBeMerged compares them pairwise, so 1,000 ``users { id }`` in a row took 3 s to validate.
    MAX_SAME_NAME = 25

    def __init__(self, schema: GraphQLSchema, max_depth: int) -> None:
        self.schema = schema
        self.max_depth = max_depth
        self._entries: OrderedDict[str, tuple[DocumentNode, list[GraphQLError]] | GraphQLError] = OrderedDict()

    def get(self, query: str) -> tuple[DocumentNode, list[GraphQLError]] | GraphQLError:
        """(document, validation errors) of ``query``, or its syntax error."""
        entry = self._entries.get(query)
        if entry is not None:
            self._entries.move_to_end(query)
            return entry
        try:
            document = parse(query, max_tokens=self.MAX_TOKENS)
        except GraphQLError as exc:
            entry = exc
        except RecursionError:  # graphql-core's parser recurses once per nesting level
            entry = GraphQLError(f"Syntax Error: the document is nested too deeply to parse "
                                 f"(graphql.max_depth={self.max_depth} applies anyway)")
        else:
            expanded = expanded_selections(document)
            if expanded > self.MAX_SELECTIONS:
                entry = (document, [GraphQLError(
                    f"the document expands to {min(expanded, 10**12)}{'+' if expanded > 10**12 else ''} selections "
                    f"through its fragments, more than {self.MAX_SELECTIONS}", extensions={"code": "TOO_COMPLEX"})])
            elif (repeated := most_repeated_response_name(document)) > self.MAX_SAME_NAME:
                entry = (document, [GraphQLError(
                    f"a selection has {repeated} fields named alike (with its fragments), more than "
                    f"{self.MAX_SAME_NAME}", extensions={"code": "TOO_COMPLEX"})])
            else:
                entry = (document, validate(self.schema, document, specified_rules))
        if len(query) <= self.MAX_QUERY_CHARS:
            self._entries[query] = entry
            if len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        return entry


class Gateway:
    """One gateway: the schema, its settings, the asyncpg pool to the proxy and its statistics."""

    def __init__(self, settings: GraphQLSettings, proxy: ProxyServer, connect_timeout: float) -> None:
        self.settings = settings
        self.proxy = proxy
        self.connect_timeout = connect_timeout
        self.schema: GraphQLSchema = build_schema()
        self.stats = GatewayStats()
        self.documents = DocumentCache(self.schema, settings.max_depth)
        self.pool: asyncpg.Pool | None = None
        self.path = settings.path.rstrip("/") or "/graphql"
        # The webhook emitter's ChangeFeed (agent/webhooks/feed.py), looked up when a subscription
        # starts: the emitter may start after the gateway.
        self.find_feed: Callable[[], Any] = lambda: None

    # ------------------------------------------------------------------ the pool to the proxy
    async def start(self) -> None:
        """Create the pool (no session opens until the first statement: min_size 0)."""
        up = self.proxy.upstream
        user = up.user or "postgres"

        async def no_reset(_conn: asyncpg.Connection) -> None:
            # asyncpg's default reset (RESET ALL, UNLISTEN *, CLOSE ALL, ...) would be a statement
            # per release through the proxy; in transaction pooling there is no session state of
            # ours on the server to reset, and the gateway never sets any.
            return None

        self.pool = await asyncpg.create_pool(
            host=_loopback(self.proxy.host), port=self.proxy.port, user=user, password=up.password,
            database=up.database or user, ssl=False, min_size=0, max_size=self.settings.max_sessions,
            max_inactive_connection_lifetime=60.0, timeout=self.connect_timeout, reset=no_reset,
            server_settings={"application_name": APPLICATION_NAME})

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5.0)
            except (TimeoutError, OSError):
                pool.terminate()

    def context(self) -> OperationContext:
        pool = self.pool
        if pool is None:
            raise RuntimeError("the gateway's pool is not started")
        return OperationContext(self.settings, lambda: RequestData(pool, self.settings.max_page_size),
                                self.find_feed())

    # ------------------------------------------------------------------ operations
    def prepare(self, query: str, variables: Mapping[str, Any] | None, operation_name: str | None,
                allowed: tuple[OperationType, ...]) -> Prepared | Rejected:
        """Parse, validate (with the limits) and coerce the variables; errors are request errors.

        BadRequest (405) when the operation's type is not in ``allowed`` for this transport."""
        parsed = self.documents.get(query)
        if isinstance(parsed, GraphQLError):
            return Rejected([parsed], operation_name)
        document, errors = parsed
        operation = get_operation_ast(document, operation_name)
        name = operation.name.value if operation is not None and operation.name else operation_name
        if operation is not None and operation.operation not in allowed:
            if operation.operation == OperationType.MUTATION and OperationType.QUERY in allowed and len(allowed) == 1:
                raise BadRequest("GET only runs queries; use POST", 405, {"Allow": "POST"})
            if operation.operation == OperationType.SUBSCRIPTION:
                return Rejected([GraphQLError("subscriptions run over WebSocket (graphql-transport-ws) at this path",
                                              operation, extensions={"code": "SUBSCRIPTION_OVER_HTTP"})], name)
        if errors:
            return Rejected(errors, name)
        if operation is None:
            message = (f"unknown operation named {operation_name[:64]!r}" if operation_name
                       else "the document has several operations: name one with operationName")
            return Rejected([GraphQLError(message)], name)
        coerced = get_variable_values(self.schema, operation.variable_definitions or (), dict(variables or {}))
        if isinstance(coerced, list):
            return Rejected(coerced, name)
        # The limits see the coerced values, as the resolvers will (an Int variable sent as 500.0 is 500).
        errors = check_limits(self.schema, document, self.settings, coerced)
        if errors:
            return Rejected(errors, name)
        return Prepared(document, operation, coerced, name)

    async def run(self, prepared: Prepared, context: OperationContext) -> tuple[ExecutionResult | None, bool]:
        """Execute a query within the timeout: (result, timed_out)."""
        try:
            async with asyncio.timeout(self.settings.query_timeout_s):
                result = execute(self.schema, prepared.document, context_value=context,
                                 variable_values=prepared.variables, operation_name=prepared.name,
                                 is_awaitable=_is_awaitable, execution_context_class=RowExecutionContext)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
        except TimeoutError:
            return None, True
        finally:
            # A timeout cancels what execute() awaits, not the loaders' batch tasks; and a field error
            # that nulls a parent returns while its siblings' statements may still run.
            context.data.cancel()
        assert isinstance(result, ExecutionResult)
        return result, False

    def formatted(self, result: ExecutionResult) -> dict[str, Any]:
        """The response body: errors with client-safe messages (details logged), counted by kind."""
        body: dict[str, Any] = {"data": result.data}
        if result.errors:
            body["errors"] = [self._client_error(e) for e in result.errors]
        return body

    def _client_error(self, error: GraphQLError) -> dict[str, Any]:
        original = error.original_error
        kind = "argument"
        if original is None or isinstance(original, GraphQLError):
            out: dict[str, Any] = dict(error.formatted)
        else:
            if isinstance(original, asyncpg.PostgresError):
                kind = "database"
                message = f"database error {original.sqlstate}: {getattr(original, 'message', '')}"
            elif isinstance(original, (OSError, asyncpg.InterfaceError, ConnectionError)):
                kind = "connection"
                message = "database unavailable: the gateway could not reach the proxy"
            else:
                kind = "internal"
                message = "internal error in the GraphQL gateway (logged)"
            log.warning("graphql_resolver_failed", exc_info=original,
                        extra={"path": error.path, "error": f"{type(original).__name__}: {original}"[:500]})
            out = {"message": message, "extensions": {"code": kind.upper()}}
            if error.locations:
                out["locations"] = [loc._asdict() for loc in error.locations]
            if error.path:
                out["path"] = error.path
        self.stats.resolver_failed(kind)
        return out

    async def answer(self, query: str, variables: Mapping[str, Any] | None, operation_name: str | None,
                     allowed: tuple[OperationType, ...]) -> Outcome:
        """One GraphQL-over-HTTP operation, timed and counted."""
        started = time.perf_counter()
        try:
            prepared = self.prepare(query, variables, operation_name, allowed)
        except BadRequest:
            self.stats.operation_finished(operation_name, "rejected", time.perf_counter() - started, None)
            raise
        if isinstance(prepared, Rejected):
            self.stats.operation_finished(prepared.name, "rejected", time.perf_counter() - started, None)
            return Outcome({"errors": [e.formatted for e in prepared.errors]}, True, "rejected")
        return await self.execute(prepared, started)

    async def execute(self, prepared: Prepared, started: float) -> Outcome:
        """Execute a prepared query or mutation within the timeout, timed and counted."""
        if self.pool is None:
            await self.start()
        context = self.context()
        result, _ = await self.run(prepared, context)
        if result is None:
            limit = self.settings.query_timeout_s
            outcome = Outcome({"data": None, "errors": [error_entry(
                f"query timeout: the operation ran longer than graphql.query_timeout_s={limit:g} s "
                f"and was cancelled", code="QUERY_TIMEOUT", limit="query_timeout_s")]}, False, "timeout")
        else:
            outcome = Outcome(self.formatted(result), False, "error" if result.errors else "ok")
        self.stats.operation_finished(prepared.name, outcome.result, time.perf_counter() - started,
                                      context.data.statements)
        return outcome
