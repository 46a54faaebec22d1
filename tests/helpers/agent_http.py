"""Run the agent's aiohttp app on a RunningProxy's own event loop (as ``pgsidecar run`` does:
one loop for both) and talk to it over real HTTP from the test thread."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample

from agent.app import create_app
from tests.helpers.proxy_thread import RunningProxy


class RunningAgent:
    def __init__(self, proxy: RunningProxy) -> None:
        self.proxy = proxy

        async def start() -> tuple[web.AppRunner, int]:
            runner = web.AppRunner(create_app(proxy.settings, proxy.server), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server  # noqa: SLF001 - the only way to learn the bound port
            assert server is not None
            return runner, server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.runner, self.port = proxy.call(start())
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, headers, body = self.request(method, path, **kw)
        assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body[:200])
        return status, json.loads(body)

    def stop(self) -> None:
        self.proxy.call(self.runner.cleanup())


# ----------------------------------------------------------------------------- reading a scrape


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text-format scrape, parsed by prometheus_client."""
    return [s for family in parse_text(text) for s in family.samples]


def find_samples(found: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def sample_value(found: list[Sample], name: str, **labels: str) -> float:
    """The value of the one sample ``name{labels}`` (fails when there is not exactly one)."""
    matches = find_samples(found, name, **labels)
    assert len(matches) == 1, (name, labels, matches)
    return matches[0].value
