"""The GraphQL gateway's routes on the agent's aiohttp app: ``setup_graphql(app)``.

Design: **loopback through the proxy.** The gateway is a *client of the proxy*: it keeps an
asyncpg pool of at most ``graphql.max_sessions`` client sessions connected to the proxy's own
listen address, as the upstream DSN's user, with ``application_name=pgsidecar-graphql``. So every
statement the gateway sends goes through the proxy's one backend pool (no second pool to
PostgreSQL: the seed's "sits on the same pooled connections"), is timed in the proxy's query
statistics and slow-query log like the app's, and may use the result cache. In transaction
pooling mode an idle gateway session holds no server connection. The cost is one extra local hop
per statement, paid once per relation per level thanks to the batch loaders (``data.py``).
(With ``auth.users`` set, the upstream DSN's user must be one of them for the gateway to log in.)

Routes at ``graphql.path`` (default ``/graphql``), GraphQL over HTTP:

- ``POST`` with a JSON body ``{query, variables, operationName, extensions}``; ``GET`` with the
  same as query-string parameters (``variables`` as JSON text; queries only, a mutation gets 405).
- The answer is ``application/graphql-response+json`` when the client accepts it, else
  ``application/json``. A request that is not well-formed (bad JSON, no query, variables not an
  object, wrong content type) gets 400 (415 for the content type). A request error (syntax,
  validation, a limit, variables that do not fit) gets 400 with ``application/graphql-response+json``
  and 200 with ``application/json``, as the spec says; an executed operation always 200. The
  server never answers 500: an unexpected failure in a resolver becomes a GraphQL error whose
  message says only what kind of failure it was (the details go to the log).
- ``GET`` from a browser (Accept: text/html, no ``query``): the GraphiQL playground, its assets
  served from ``<path>/static/`` (``graphql_gateway/static``), no other host referenced.
- ``GET`` with ``Upgrade: websocket``: subscriptions, graphql-transport-ws (``ws.py``).

Limits: depth, cost and page size by a validation rule before any SQL (``limits.py``); the query
timeout (``graphql.query_timeout_s``) around execution: the operation's statements are cancelled
(asyncpg sends a CancelRequest, which the proxy forwards) and the answer is a GraphQL error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from graphql import (
    DocumentNode,
    ExecutionResult,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    OperationType,
    execute,
    get_operation_ast,
    parse,
    specified_rules,
    validate,
)
from graphql.execution.values import get_variable_values

from agent import keys
from config.settings import GraphQLSettings
from proxy.listener import ProxyServer

from .data import RequestData
from .limits import limits_rule
from .metrics import GatewayCollector, GatewayStats
from .resolvers import OperationContext
from .schema import build_schema

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgsidecar-graphql"
STATIC_DIR = Path(__file__).with_name("static")
GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"

__all__ = ["APPLICATION_NAME", "Gateway", "setup_graphql"]


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
class Outcome:
    """What an operation produced: the response body, whether it was a request error, the result label."""

    body: dict[str, Any]
    request_error: bool
    result: str


def _error(message: str, **extensions: Any) -> dict[str, Any]:
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


class Gateway:
    """One gateway: the schema, its settings, the asyncpg pool to the proxy and its statistics."""

    def __init__(self, settings: GraphQLSettings, proxy: ProxyServer, connect_timeout: float) -> None:
        self.settings = settings
        self.proxy = proxy
        self.connect_timeout = connect_timeout
        self.schema: GraphQLSchema = build_schema()
        self.stats = GatewayStats()
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
                allowed: tuple[OperationType, ...]) -> Prepared | list[GraphQLError]:
        """Parse, validate (with the limits) and coerce the variables; errors are request errors.

        BadRequest (405) when the operation's type is not in ``allowed`` for this transport."""
        try:
            document = parse(query)
        except GraphQLError as exc:
            return [exc]
        operation = get_operation_ast(document, operation_name)
        if operation is not None and operation.operation not in allowed:
            if operation.operation == OperationType.MUTATION and OperationType.QUERY in allowed and len(allowed) == 1:
                raise BadRequest("GET only runs queries; use POST", 405, {"Allow": "POST"})
            if operation.operation == OperationType.SUBSCRIPTION:
                return [GraphQLError("subscriptions run over WebSocket (graphql-transport-ws) at this path",
                                     operation, extensions={"code": "SUBSCRIPTION_OVER_HTTP"})]
        errors = validate(self.schema, document, [*specified_rules, limits_rule(self.settings, variables)])
        if errors:
            return errors
        if operation is None:
            message = (f"unknown operation named {operation_name[:64]!r}" if operation_name
                       else "the document has several operations: name one with operationName")
            return [GraphQLError(message)]
        coerced = get_variable_values(self.schema, operation.variable_definitions or (), dict(variables or {}))
        if isinstance(coerced, list):
            return coerced
        name = operation.name.value if operation.name else None
        return Prepared(document, operation, coerced, name)

    async def run(self, prepared: Prepared, context: OperationContext) -> tuple[ExecutionResult | None, bool]:
        """Execute a query within the timeout: (result, timed_out)."""
        try:
            async with asyncio.timeout(self.settings.query_timeout_s):
                result = execute(self.schema, prepared.document, context_value=context,
                                 variable_values=prepared.variables, operation_name=prepared.name)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
        except TimeoutError:
            return None, True
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
        if isinstance(prepared, list):
            self.stats.operation_finished(operation_name, "rejected", time.perf_counter() - started, None)
            return Outcome({"errors": [e.formatted for e in prepared]}, True, "rejected")
        return await self.execute(prepared, started)

    async def execute(self, prepared: Prepared, started: float) -> Outcome:
        """Execute a prepared query or mutation within the timeout, timed and counted."""
        if self.pool is None:
            await self.start()
        context = self.context()
        result, _ = await self.run(prepared, context)
        if result is None:
            limit = self.settings.query_timeout_s
            outcome = Outcome({"data": None, "errors": [_error(
                f"query timeout: the operation ran longer than graphql.query_timeout_s={limit:g} s "
                f"and was cancelled", code="QUERY_TIMEOUT", limit="query_timeout_s")]}, False, "timeout")
        else:
            outcome = Outcome(self.formatted(result), False, "error" if result.errors else "ok")
        self.stats.operation_finished(prepared.name, outcome.result, time.perf_counter() - started,
                                      context.data.statements)
        return outcome


# ----------------------------------------------------------------------------- HTTP
def _media_type(request: web.Request) -> str:
    return GRAPHQL_RESPONSE if GRAPHQL_RESPONSE in request.headers.get("Accept", "") else JSON


def _respond(request: web.Request, body: dict[str, Any], status: int,
             headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, default=str), content_type=_media_type(request),
                        charset="utf-8", headers=headers)


def _json_param(raw: Any, name: str, kind: type) -> Any:
    """A parameter that must be ``kind`` (or null); GET parameters arrive as JSON text."""
    if isinstance(raw, str) and kind is dict:
        try:
            raw = json.loads(raw) if raw else None
        except ValueError:
            raise BadRequest(f"{name} is not valid JSON") from None
    if raw is not None and not isinstance(raw, kind):
        raise BadRequest(f"{name} must be {'an object' if kind is dict else 'a string'}")
    return raw


def _params(source: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    query = source.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("no query: send {\"query\": \"...\"} (a non-empty string)")
    variables = _json_param(source.get("variables"), "variables", dict)
    operation_name = _json_param(source.get("operationName"), "operationName", str) or None
    _json_param(source.get("extensions"), "extensions", dict)
    return query, variables, operation_name


def _wants_html(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "query" not in request.query


PLAYGROUND = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pgsidecar GraphQL</title>
<link rel="stylesheet" href="{static}/graphiql.min.css">
<style>body {{ margin: 0; height: 100vh; }} #graphiql {{ height: 100vh; }}</style>
<script src="{static}/react.production.min.js"></script>
<script src="{static}/react-dom.production.min.js"></script>
<script src="{static}/graphiql.min.js"></script>
</head>
<body>
<div id="graphiql">Loading GraphiQL…</div>
<script>
const fetcher = GraphiQL.createFetcher({{ url: {endpoint} }});
ReactDOM.createRoot(document.getElementById("graphiql")).render(
  React.createElement(GraphiQL, {{ fetcher: fetcher, defaultQuery: {default_query} }}));
</script>
</body>
</html>
"""
DEFAULT_QUERY = """# pgsidecar GraphQL gateway: read-only queries over the recruiter tables.
{
  resumes(first: 5) {
    id
    title
    user { full_name }
    matches(first: 3, order: MATCH_SCORE_DESC) { match_score job { title } }
  }
}
"""
# Only this host's own assets; inline scripts/styles are the page's own (above).
PLAYGROUND_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                  "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                  "form-action 'none'")


def _playground(path: str) -> web.Response:
    html = PLAYGROUND.format(static=f"{path}/static", endpoint=json.dumps(path),
                             default_query=json.dumps(DEFAULT_QUERY))
    return web.Response(text=html, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": PLAYGROUND_CSP, "Cache-Control": "no-cache"})


GATEWAY: web.AppKey[Gateway] = keys.GRAPHQL


async def _http(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    try:
        if request.method == "GET":
            if request.headers.get("Upgrade", "").lower() == "websocket":
                from .ws import serve_websocket

                return await serve_websocket(request, gateway)
            if _wants_html(request):
                return _playground(gateway.path)
            query, variables, operation_name = _params(request.query)
            allowed: tuple[OperationType, ...] = (OperationType.QUERY,)
        else:
            content_type = request.content_type
            if content_type != JSON:
                raise BadRequest(f"POST needs Content-Type: application/json, got {content_type or 'none'!r}", 415)
            try:
                payload = await request.json()
            except ValueError:
                raise BadRequest("the body is not valid JSON") from None
            if isinstance(payload, list):
                raise BadRequest("batched requests (a JSON array) are not supported: send one object")
            if not isinstance(payload, dict):
                raise BadRequest("the body must be a JSON object")
            query, variables, operation_name = _params(payload)
            allowed = (OperationType.QUERY, OperationType.MUTATION)  # mutations: a GraphQL error (read-only)
        outcome = await gateway.answer(query, variables, operation_name, allowed)
    except BadRequest as exc:
        return _respond(request, {"errors": [_error(str(exc))]}, exc.status, exc.headers)
    status = 400 if outcome.request_error and _media_type(request) == GRAPHQL_RESPONSE else 200
    return _respond(request, outcome.body, status)


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.start()
    yield
    await gateway.close()


def setup_graphql(app: web.Application) -> None:
    """Serve the gateway at ``graphql.path``; its pool to the proxy lives as long as the app."""
    settings = app[keys.SETTINGS]
    gateway = app[GATEWAY] = Gateway(settings.graphql, app[keys.PROXY], settings.upstream.connect_timeout)
    path = gateway.path
    gateway.find_feed = lambda: app.get(keys.CHANGE_FEED)  # set by the webhook emitter when it runs
    app.router.add_route("GET", path, _http)
    app.router.add_route("POST", path, _http)
    app.router.add_static(f"{path}/static", STATIC_DIR, append_version=False)
    app[keys.REGISTRY].register(GatewayCollector(gateway.stats))
    app.cleanup_ctx.append(_gateway_ctx)
