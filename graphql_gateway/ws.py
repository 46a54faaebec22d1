"""GraphQL over WebSocket at the gateway's path: the graphql-transport-ws protocol (the ``graphql-ws``
library's protocol, https://github.com/enisdenjo/graphql-ws/blob/master/PROTOCOL.md), server side.

One ``Session`` per socket: ``connection_init`` must come first (``CONNECTION_INIT_TIMEOUT``
seconds, else close 4408) and once (else 4429); ``subscribe`` before the ack closes 4401, a
duplicate id 4409, anything unparsable 4400, a subprotocol other than graphql-transport-ws 4406.
Each ``subscribe`` runs as a task: a query sends one ``next`` and ``complete``; a subscription
sends a ``next`` per event of the change feed until the client sends ``complete`` (or closes),
then unsubscribes from the feed. Request errors (syntax, validation, limits) are an ``error``
message. Mutations are refused like over HTTP (read-only).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web
from graphql import ExecutionResult, GraphQLError, OperationType, subscribe

from .gateway import Gateway, Rejected

log = logging.getLogger(__name__)

PROTOCOL = "graphql-transport-ws"
CONNECTION_INIT_TIMEOUT = 10.0
ALLOWED = (OperationType.QUERY, OperationType.MUTATION, OperationType.SUBSCRIPTION)

__all__ = ["PROTOCOL", "serve_websocket"]


class Session:
    """One graphql-transport-ws connection."""

    def __init__(self, ws: web.WebSocketResponse, gateway: Gateway) -> None:
        self.ws = ws
        self.gateway = gateway
        self.initialised = False
        self.acknowledged = False
        self.operations: dict[str, asyncio.Task[None]] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_str(json.dumps(message, default=str))
            except (ConnectionError, RuntimeError):
                pass  # the client went away; the receive loop ends the session

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode()[:120])

    async def handle(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # nested deeper than the parser recurses
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.close(4400, "Invalid message received")
            return
        kind = message["type"]
        if kind == "connection_init":
            if self.initialised:
                await self.close(4429, "Too many initialisation requests")
                return
            self.initialised = self.acknowledged = True
            await self.send({"type": "connection_ack"})
        elif kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "pong":
            pass
        elif kind == "subscribe":
            await self._subscribe(message)
        elif kind == "complete":
            task = self.operations.pop(str(message.get("id")), None)
            if task is not None:
                task.cancel()
        else:
            await self.close(4400, f"Unknown message type {kind[:40]!r}")

    async def _subscribe(self, message: dict[str, Any]) -> None:
        if not self.acknowledged:
            await self.close(4401, "Unauthorized")
            return
        op_id, payload = message.get("id"), message.get("payload")
        if not isinstance(op_id, str) or not op_id or not isinstance(payload, dict) \
                or not isinstance(payload.get("query"), str) \
                or not isinstance(payload.get("variables") or {}, dict) \
                or not isinstance(payload.get("operationName") or "", str):
            await self.close(4400, "Invalid subscribe message")
            return
        if op_id in self.operations:
            await self.close(4409, f"Subscriber for {op_id[:60]} already exists")
            return
        task = asyncio.create_task(self._operation(op_id, payload), name=f"graphql-ws-{op_id[:30]}")
        self.operations[op_id] = task

    async def _operation(self, op_id: str, payload: dict[str, Any]) -> None:
        gateway = self.gateway
        started = time.perf_counter()
        try:
            prepared = gateway.prepare(payload["query"], payload.get("variables"), payload.get("operationName"),
                                       ALLOWED)
            if isinstance(prepared, Rejected):
                gateway.stats.operation_finished(prepared.name, "rejected", time.perf_counter() - started, None)
                await self.send({"type": "error", "id": op_id, "payload": [e.formatted for e in prepared.errors]})
                return
            if prepared.operation.operation != OperationType.SUBSCRIPTION:
                outcome = await gateway.execute(prepared, started)
                await self.send({"type": "next", "id": op_id, "payload": outcome.body})
                await self.send({"type": "complete", "id": op_id})
                return
            await self._stream(op_id, prepared)
        except asyncio.CancelledError:
            raise  # the client completed it or went away: say nothing more
        except Exception as exc:
            log.warning("graphql_ws_operation_failed", exc_info=exc, extra={"operation_id": op_id[:60]})
            await self.send({"type": "error", "id": op_id, "payload": [
                {"message": "internal error in the GraphQL gateway (logged)"}]})
        finally:
            # Only this task's own entry: after a ``complete`` the client may reuse the id at once,
            # before this clean-up runs (a cancelled statement takes a round trip), and removing the
            # new operation's entry would leave it running and subscribed after the socket closes.
            if self.operations.get(op_id) is asyncio.current_task():
                del self.operations[op_id]

    async def _stream(self, op_id: str, prepared: Any) -> None:
        gateway = self.gateway
        if gateway.pool is None:
            await gateway.start()
        context = gateway.context()
        stream = await subscribe(gateway.schema, prepared.document, context_value=context,
                                 variable_values=prepared.variables, operation_name=prepared.name)
        if isinstance(stream, ExecutionResult):  # refused at subscribe time (a bad argument, no feed)
            await self.send({"type": "error", "id": op_id,
                             "payload": [e.formatted for e in stream.errors or [GraphQLError("subscribe failed")]]})
            return
        gateway.stats.subscriptions += 1
        try:
            try:
                async for result in stream:
                    await self.send({"type": "next", "id": op_id, "payload": gateway.formatted(result)})
            except Exception as exc:  # noqa: BLE001 - the feed closed us (overflow) or failed
                log.info("graphql_subscription_ended", extra={"operation_id": op_id[:60], "error": str(exc)[:200]})
                await self.send({"type": "error", "id": op_id, "payload": [
                    {"message": f"subscription ended by the change feed: {str(exc)[:200]}"}]})
                return
            await self.send({"type": "complete", "id": op_id})
        finally:
            gateway.stats.subscriptions -= 1
            context.data.cancel()  # an event's statements still running in the loaders' batch tasks
            await stream.aclose()  # type: ignore[attr-defined]

    def stop(self) -> None:
        for task in self.operations.values():
            task.cancel()
        self.operations.clear()


async def serve_websocket(request: web.Request, gateway: Gateway) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=(PROTOCOL,))
    await ws.prepare(request)
    if ws.ws_protocol != PROTOCOL:
        await ws.close(code=4406, message=b"Subprotocol not acceptable")
        return ws
    session = Session(ws, gateway)

    def init_timed_out() -> None:
        if not session.initialised:
            asyncio.ensure_future(session.close(4408, "Connection initialisation timeout"))

    timer = asyncio.get_running_loop().call_later(CONNECTION_INIT_TIMEOUT, init_timed_out)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.handle(msg.data)
            else:
                await session.close(4400, "Invalid message received")
    finally:
        timer.cancel()
        session.stop()
    return ws
