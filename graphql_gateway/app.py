"""The GraphQL gateway's routes on the agent's aiohttp app: ``setup_graphql(app)``.

Design: **loopback through the proxy.** The gateway is a *client of the proxy*: it keeps an
asyncpg pool of at most ``graphql.max_sessions`` client sessions connected to the proxy's own
listen address, as the upstream DSN's user, with ``application_name=pgsidecar-graphql``. So every
statement the gateway sends goes through the proxy's one backend pool (no second pool to
PostgreSQL: the seed's "sits on the same pooled connections"), is timed in the proxy's query
statistics and slow-query log like the app's, and its reads carry the result cache's hint
(``data.CACHE_HINT``). In transaction pooling mode an idle gateway session holds no server
connection. The cost is one extra local hop
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

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from graphql import OperationType

from agent import keys

from .gateway import APPLICATION_NAME, BadRequest, Gateway, error_entry
from .metrics import GatewayCollector
from .ws import serve_websocket

STATIC_DIR = Path(__file__).with_name("static")
GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"

__all__ = ["APPLICATION_NAME", "setup_graphql"]


# ----------------------------------------------------------------------------- HTTP
def _media_type(request: web.Request) -> str:
    return GRAPHQL_RESPONSE if GRAPHQL_RESPONSE in request.headers.get("Accept", "") else JSON


def _respond(request: web.Request, body: dict[str, Any], status: int,
             headers: Mapping[str, str] | None = None) -> web.Response:
    # Compact separators: a nested answer is mostly punctuation, and the default ", " / ": " cost
    # ~10 % more bytes and encoding time.
    text = json.dumps(body, default=str, separators=(",", ":"))
    return web.Response(status=status, text=text, content_type=_media_type(request), charset="utf-8", headers=headers)


def _json_param(raw: Any, name: str, kind: type) -> Any:
    """A parameter that must be ``kind`` (or null); GET parameters arrive as JSON text."""
    if isinstance(raw, str) and kind is dict:
        try:
            raw = json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # nested deeper than the parser recurses
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
<link rel="icon" href="data:,">
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





async def _http(request: web.Request) -> web.StreamResponse:
    gateway = request.app[keys.GRAPHQL]
    try:
        if request.method == "GET":
            if request.headers.get("Upgrade", "").lower() == "websocket":
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
            except (ValueError, RecursionError):  # nested deeper than the parser recurses
                raise BadRequest("the body is not valid JSON") from None
            if isinstance(payload, list):
                raise BadRequest("batched requests (a JSON array) are not supported: send one object")
            if not isinstance(payload, dict):
                raise BadRequest("the body must be a JSON object")
            query, variables, operation_name = _params(payload)
            allowed = (OperationType.QUERY, OperationType.MUTATION)  # mutations: a GraphQL error (read-only)
        outcome = await gateway.answer(query, variables, operation_name, allowed)
    except BadRequest as exc:
        return _respond(request, {"errors": [error_entry(str(exc))]}, exc.status, exc.headers)
    status = 400 if outcome.request_error and _media_type(request) == GRAPHQL_RESPONSE else 200
    return _respond(request, outcome.body, status)


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    gateway = app[keys.GRAPHQL]
    await gateway.start()
    yield
    await gateway.close()


def setup_graphql(app: web.Application) -> None:
    """Serve the gateway at ``graphql.path``; its pool to the proxy lives as long as the app."""
    settings = app[keys.SETTINGS]
    gateway = app[keys.GRAPHQL] = Gateway(settings.graphql, app[keys.PROXY], settings.upstream.connect_timeout)
    path = gateway.path
    gateway.find_feed = lambda: app.get(keys.CHANGE_FEED)  # set by the webhook emitter when it runs
    app.router.add_route("GET", path, _http)
    app.router.add_route("POST", path, _http)
    app.router.add_static(f"{path}/static", STATIC_DIR, append_version=False)
    app[keys.REGISTRY].register(GatewayCollector(gateway.stats))
    app.cleanup_ctx.append(_gateway_ctx)
