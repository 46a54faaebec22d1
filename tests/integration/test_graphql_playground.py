"""The GraphiQL playground in a real browser: Debian's headless chromium, driven over the DevTools
protocol (a websocket, through aiohttp), loads ``GET /graphql``, types a query, runs it and shows
the result, while every request the page makes is recorded: all of them must go to the sidecar
on loopback (the assets are served by the sidecar; a cluster without internet must work). The
browser is also given a dead proxy for anything but loopback, so a request elsewhere would fail."""
from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from migrations import runner
from migrations.demo import seed_demo
from tests.helpers.agent_http import RunningAgent
from tests.helpers.tools import tool
from tests.helpers.wire import wait_for

ASSETS = ("graphiql.min.css", "react.production.min.js", "react-dom.production.min.js", "graphiql.min.js")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A headless chromium with remote debugging; yields its browser-level DevTools websocket URL."""
    profile = tmp_path / "profile"
    proc = subprocess.Popen([
        tool("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={profile}",
        "--proxy-server=http://127.0.0.1:9",  # a dead proxy for all but loopback (bypassed implicitly)
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        wait_for("chromium's DevToolsActivePort file", lambda: proc.poll() is None and active.exists()
                 and len(active.read_text().split()) == 2, timeout=60)
        port, path = active.read_text().split()
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class DevTools:
    """A minimal Chrome DevTools Protocol client: calls by id, events collected."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self.pending.pop(data["id"])
                if "error" in data:
                    future.set_exception(AssertionError(f"DevTools error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            else:
                self.events.append(data)

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        call_id = next(self.ids)
        future = self.pending[call_id] = asyncio.get_running_loop().create_future()
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, 30)

    def seen(self, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.events if e.get("method") == method]


async def _drive(browser: str, page_url: str) -> tuple[str, DevTools]:
    """Open the playground, run a query in it, return the result pane's text."""
    loop = asyncio.get_running_loop()

    async with aiohttp.ClientSession() as http, http.ws_connect(browser, max_msg_size=0) as ws:
        devtools = DevTools(ws)
        target = await devtools.call("Target.createTarget", url="about:blank")
        session = (await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))["sessionId"]
        for domain in ("Network", "Page", "Runtime"):
            await devtools.call(f"{domain}.enable", session)

        async def evaluate(expression: str) -> Any:
            result = await devtools.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
            return result["result"].get("value")

        def sync(coro: Coroutine[Any, Any, Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

        async def until(what: str, probe: Callable[[], Any]) -> Any:
            return await asyncio.to_thread(wait_for, what, probe, 60)

        await devtools.call("Page.navigate", session, url=page_url)
        editor = "document.querySelector('.graphiql-query-editor .CodeMirror')"
        await until("GraphiQL's query editor", lambda: sync(evaluate(f"!!{editor}")))
        await evaluate(f"{editor}.CodeMirror.setValue('{{ job(id: 3) {{ id title company {{ name }} }} }}')")
        await evaluate("document.querySelector('.graphiql-execute-button').click()")
        response = "(document.querySelector('.graphiql-response .CodeMirror')?.CodeMirror.getValue() || '')"
        text = await until("the query's result in GraphiQL", lambda: sync(evaluate(response)) or None)
        await ws.close()
        devtools.reader.cancel()
        return text, devtools


def test_playground_runs_a_query_in_headless_chromium_with_only_loopback_requests(
        chromium: str, proxy_factory: Any, fresh_db: Any) -> None:
    dsn, _ = fresh_db
    runner.upgrade(runner.alembic_config(dsn))
    seed_demo(dsn, 50)
    agent = RunningAgent(proxy_factory(upstream_dsn=dsn))
    try:
        status, headers, html = agent.request("GET", "/graphql", headers={"Accept": "text/html"})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"http://" not in html and b"https://" not in html and b"//cdn" not in html

        text, devtools = asyncio.run(_drive(chromium, agent.url + "/graphql"))
        shown = json.loads(text)
        direct = json.loads(agent.request("POST", "/graphql", headers={"Content-Type": "application/json"},
                                          body=b'{"query": "{ job(id: 3) { id title company { name } } }"}')[2])
        assert shown == direct and shown["data"]["job"]["id"] == "3"

        urls = [p["request"]["url"] for p in devtools.seen("Network.requestWillBeSent")]
        elsewhere = [u for u in urls if not u.startswith((agent.url + "/", "data:", "about:", "blob:"))]
        assert not elsewhere, f"the playground asked hosts other than the sidecar: {elsewhere}"
        loaded = {p["response"]["url"].rsplit("/", 1)[-1]: p["response"]["status"]
                  for p in devtools.seen("Network.responseReceived")}
        assert all(loaded.get(asset) == 200 for asset in ASSETS), loaded
        assert any(u == agent.url + "/graphql" for u in urls[1:]), "GraphiQL did not POST to the gateway"
        assert not devtools.seen("Runtime.exceptionThrown"), devtools.seen("Runtime.exceptionThrown")
    finally:
        agent.stop()
