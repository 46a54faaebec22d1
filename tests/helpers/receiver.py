"""A real webhook receiver on loopback: an aiohttp server in its own thread that records every
request and answers as the test tells it (a status code, a delay, or no listener at all)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.helpers.cluster import free_port


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float  # time.monotonic() when it arrived

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """``status`` is what the next requests get; ``delay`` seconds before answering;
    ``stop_listening()`` / ``listen()`` close and reopen the port (connection refused between)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.status = 200
        self.delay = 0.0
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.listen()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.status
        with self._lock:
            self.received.append(Received({k.lower(): v for k, v in request.headers.items()}, body, status,
                                          time.monotonic()))
        return web.Response(status=status, text="ok" if status < 300 else "no")

    def listen(self) -> None:
        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
            return runner

        self._runner = self._call(start())

    def stop_listening(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def accepted(self) -> list[Received]:
        """Requests answered with a 2xx, in arrival order."""
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def all(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.stop_listening()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
