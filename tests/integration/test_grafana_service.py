"""GrafanaService against a real local HTTP server that speaks Grafana's documented API shapes.

`FakeGrafana` is an aiohttp app implementing, as Grafana's HTTP API documentation describes them:

- ``POST /api/dashboards/db`` (docs/sources/developers/http_api/dashboard.md): body
  ``{dashboard: {id: null, uid, title, ...}, folderUid, overwrite, message}``; 200
  ``{id, uid, url, status: "success", version, slug}``; 400 for a missing title; 412
  ``{message, status: "name-exists"}`` for an existing uid without overwrite.
- ``POST /api/v1/provisioning/contact-points`` (alerting_provisioning.md): body
  EmbeddedContactPoint ``{uid?, name, type, settings, disableResolveMessage}``; 202 with the
  EmbeddedContactPoint (uid assigned, provenance "api", or "" with ``X-Disable-Provenance``);
  400 for a missing type/settings.
- ``GET /api/datasources/uid/:uid/health`` (data_source.md): 200 ``{status: "OK", message}``;
  400 ``{status: "ERROR", message}`` when the check fails; 404 ``{message: "Data source not found"}``.
- Authentication: ``Authorization: Bearer <token>`` or basic auth; 401 ``{message: "invalid API key"}``
  / ``{message: "Unauthorized"}``, 403 ``{message: "You'll need additional permissions...",
  accessErrorId, title: "Access denied"}`` for a Viewer token.

Each test asserts what the client returned or raised and what the server received.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from typing import Any

import pytest
from aiohttp import web

from agent.grafana import (
    ContactPoint,
    DatasourceHealth,
    GrafanaAPIError,
    GrafanaAuthError,
    GrafanaNotFound,
    GrafanaService,
    GrafanaTimeout,
    GrafanaUnavailable,
    SavedDashboard,
)

ADMIN_TOKEN = "glsa_admin_0123456789abcdef"
VIEWER_TOKEN = "glsa_viewer_0123456789abcdef"
BASIC = ("admin", "s3cret-pw")
CONTACT_POINT_TYPES = {"alertmanager", "dingding", "discord", "email", "googlechat", "kafka", "line", "opsgenie",
                       "pagerduty", "pushover", "sensugo", "slack", "teams", "telegram", "threema", "victorops",
                       "webhook", "wecom"}


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


class FakeGrafana:
    """Grafana's documented request/response shapes for the three endpoints, with its auth rules."""

    def __init__(self) -> None:
        self.url = ""  # set once served
        self.received: list[dict[str, Any]] = []
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.contact_points: dict[str, dict[str, Any]] = {}
        self.delay = 0.0
        self.next_id = 1
        self.app = web.Application(middlewares=[self.auth])
        self.app.router.add_post("/api/dashboards/db", self.post_dashboard)
        self.app.router.add_post("/api/v1/provisioning/contact-points", self.post_contact_point)
        self.app.router.add_get("/api/datasources/uid/{uid}/health", self.datasource_health)
        self.app.router.add_get("/api/boom", self.boom)

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.received.append({"method": request.method, "path": request.raw_path,
                              "headers": dict(request.headers), "body": json.loads(raw) if raw else None})
        if self.delay:
            await asyncio.sleep(self.delay)
        header = request.headers.get("Authorization", "")
        if header == f"Bearer {VIEWER_TOKEN}" and request.method != "GET":
            return web.json_response(
                {"accessErrorId": "ACE0123456789", "title": "Access denied",
                 "message": "You'll need additional permissions to perform this action. "
                            "Permissions needed: dashboards:create"}, status=403)
        if header.startswith("Bearer "):
            if header[7:] not in (ADMIN_TOKEN, VIEWER_TOKEN):
                return web.json_response({"message": "invalid API key"}, status=401)
        elif header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (user, password) != BASIC:
                return web.json_response({"message": "Invalid username or password"}, status=401)
        else:
            return web.json_response({"message": "Unauthorized"}, status=401)
        return await handler(request)

    async def post_dashboard(self, request: web.Request) -> web.Response:
        body = await request.json()
        dashboard = body.get("dashboard")
        if not isinstance(dashboard, dict) or not str(dashboard.get("title") or "").strip():
            return web.json_response({"message": "Dashboard title cannot be empty", "status": "empty-name"},
                                     status=400)
        uid = dashboard.get("uid") or uuid.uuid4().hex[:14]
        if len(uid) > 40:
            return web.json_response({"message": "Dashboard UID too long", "status": "error"}, status=400)
        existing = self.dashboards.get(uid)
        if existing is not None and not body.get("overwrite"):
            return web.json_response({"message": "A dashboard with the same uid already exists",
                                      "status": "name-exists"}, status=412)
        version = existing["version"] + 1 if existing else 1
        dash_id = existing["id"] if existing else self.next_id
        self.next_id += existing is None
        self.dashboards[uid] = {"id": dash_id, "version": version, "model": dashboard,
                                "folderUid": body.get("folderUid")}
        slug = _slug(dashboard["title"])
        return web.json_response({"id": dash_id, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success",
                                  "version": version, "slug": slug})

    async def post_contact_point(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("type") not in CONTACT_POINT_TYPES:
            return web.json_response({"message": f"invalid object specification: notifier type "
                                                 f"{body.get('type')!r} is not supported"}, status=400)
        if not isinstance(body.get("settings"), dict):
            return web.json_response({"message": "invalid object specification: settings should not be empty"},
                                     status=400)
        if body["type"] == "slack" and not (body["settings"].get("url") or body["settings"].get("token")):
            return web.json_response({"message": "failed to validate integration \"slack\": token or url "
                                                 "must be specified"}, status=400)
        uid = body.get("uid") or uuid.uuid4().hex[:14]
        settings = dict(body["settings"])
        if "url" in settings and body["type"] == "slack":
            settings["url"] = "[REDACTED]"  # Grafana masks secure settings in its answers
        point = {"uid": uid, "name": body.get("name", ""), "type": body["type"], "settings": settings,
                 "disableResolveMessage": bool(body.get("disableResolveMessage", False)),
                 "provenance": "" if request.headers.get("X-Disable-Provenance") else "api"}
        self.contact_points[uid] = point
        return web.json_response(point, status=202)

    async def datasource_health(self, request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        if uid == "prometheus":
            return web.json_response({"status": "OK", "message": "Successfully queried the Prometheus API."})
        if uid == "prom-down":
            return web.json_response({"status": "ERROR", "message": 'Post "http://prometheus:9090/api/v1/query": '
                                                                    "dial tcp: connection refused"}, status=400)
        return web.json_response({"message": "Data source not found"}, status=404)

    async def boom(self, request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")


@pytest.fixture
async def grafana(aiohttp_server: Any) -> Any:
    fake = FakeGrafana()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/"))
    return fake


async def test_create_dashboard_posts_the_documented_body_and_reads_the_answer(grafana: FakeGrafana) -> None:
    panels: list[dict[str, Any]] = [{"type": "timeseries", "title": "Request rate",
               "targets": [{"refId": "A", "expr": "sum(rate(pgsidecar_queries_total[5m]))"}]},
              {"type": "text", "title": "Notes", "options": {"content": "hello"}}]
    async with GrafanaService(grafana.url, ADMIN_TOKEN, timeout=5) as service:
        saved = await service.create_dashboard("pgsidecar Overview", panels, uid="pgsidecar-test",
                                               folder_uid="ops", tags=["pgsidecar"], message="from the test")
    assert saved == SavedDashboard(id=1, uid="pgsidecar-test", url="/d/pgsidecar-test/pgsidecar-overview",
                                   version=1, slug="pgsidecar-overview", status="success")
    (req,) = grafana.received
    assert (req["method"], req["path"]) == ("POST", "/api/dashboards/db")
    assert req["headers"]["Authorization"] == f"Bearer {ADMIN_TOKEN}"
    assert req["headers"]["Content-Type"].startswith("application/json")
    assert req["headers"]["Accept"] == "application/json"
    body = req["body"]
    assert body["folderUid"] == "ops" and body["overwrite"] is False and body["message"] == "from the test"
    dash = body["dashboard"]
    assert dash["id"] is None and dash["uid"] == "pgsidecar-test" and dash["title"] == "pgsidecar Overview"
    assert dash["schemaVersion"] == 39 and dash["tags"] == ["pgsidecar"]
    assert [p["id"] for p in dash["panels"]] == [1, 2]
    assert [p["title"] for p in dash["panels"]] == ["Request rate", "Notes"]
    assert all(set(p["gridPos"]) == {"h", "w", "x", "y"} for p in dash["panels"])


async def test_dashboard_that_exists_is_412_unless_overwrite(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, BASIC, timeout=5) as service:
        await service.create_dashboard("One", [], uid="same")
        with pytest.raises(GrafanaAPIError) as err:
            await service.create_dashboard("One again", [], uid="same")
        again = await service.create_dashboard("One again", [], uid="same", overwrite=True)
    assert err.value.status == 412 and err.value.grafana_status == "name-exists"
    assert "A dashboard with the same uid already exists" in str(err.value) and "[name-exists]" in str(err.value)
    assert again.version == 2 and again.id == 1
    assert grafana.received[0]["headers"]["Authorization"].startswith("Basic ")


async def test_the_shipped_dashboard_json_is_accepted(grafana: FakeGrafana) -> None:
    from pathlib import Path

    model = json.loads((Path(__file__).parents[2] / "dashboards" / "grafana-dashboard.json").read_text())
    async with GrafanaService(grafana.url, ADMIN_TOKEN) as service:
        saved = await service.save_dashboard(model, overwrite=True)
    assert saved.uid == model["uid"] and saved.status == "success"
    assert grafana.received[0]["body"]["dashboard"]["panels"] == model["panels"]


async def test_validation_error_carries_grafanas_message(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, ADMIN_TOKEN) as service:
        with pytest.raises(GrafanaAPIError) as err:
            await service.save_dashboard({"title": ""})
    assert err.value.status == 400 and err.value.grafana_message == "Dashboard title cannot be empty"
    assert "failed (400): Dashboard title cannot be empty" in str(err.value)


async def test_create_contact_point(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, ADMIN_TOKEN) as service:
        point = await service.create_alert_notification(
            "pgsidecar-pagerduty", "pagerduty", {"integrationKey": "abc123", "severity": "critical"},
            uid="pgsidecar-pd", disable_resolve_message=True)
        slack = await service.create_alert_notification(
            "pgsidecar-slack", "slack", {"url": "https://hooks.example.invalid/T0/B0/x", "recipient": "#alerts"},
            editable_in_ui=True)
    assert point == ContactPoint(uid="pgsidecar-pd", name="pgsidecar-pagerduty", type="pagerduty",
                                 settings={"integrationKey": "abc123", "severity": "critical"},
                                 disable_resolve_message=True, provenance="api")
    assert slack.uid and slack.type == "slack" and slack.provenance == "" and slack.settings["url"] == "[REDACTED]"
    first, second = grafana.received
    assert (first["method"], first["path"]) == ("POST", "/api/v1/provisioning/contact-points")
    assert first["body"] == {"uid": "pgsidecar-pd", "name": "pgsidecar-pagerduty", "type": "pagerduty",
                             "settings": {"integrationKey": "abc123", "severity": "critical"},
                             "disableResolveMessage": True}
    assert "X-Disable-Provenance" not in first["headers"]
    assert second["headers"]["X-Disable-Provenance"] == "true" and "uid" not in second["body"]


async def test_contact_point_validation_error(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, ADMIN_TOKEN) as service:
        with pytest.raises(GrafanaAPIError) as err:
            await service.create_alert_notification("x", "carrier-pigeon", {})
        with pytest.raises(GrafanaAPIError) as slack:
            await service.create_alert_notification("y", "slack", {})
    assert err.value.status == 400 and "'carrier-pigeon' is not supported" in str(err.value)
    assert "token or url must be specified" in str(slack.value)


async def test_datasource_health_ok_failed_and_missing(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, ADMIN_TOKEN) as service:
        ok = await service.test_datasource("prometheus")
        down = await service.test_datasource("prom-down")
        with pytest.raises(GrafanaNotFound) as missing:
            await service.test_datasource("no/such uid")
    assert ok == DatasourceHealth(uid="prometheus", ok=True, status="OK",
                                  message="Successfully queried the Prometheus API.")
    assert down.ok is False and down.status == "ERROR" and "connection refused" in down.message
    assert missing.value.status == 404 and "Data source not found" in str(missing.value)
    assert [r["path"] for r in grafana.received] == ["/api/datasources/uid/prometheus/health",
                                                      "/api/datasources/uid/prom-down/health",
                                                      "/api/datasources/uid/no%2Fsuch%20uid/health"]
    assert all(r["method"] == "GET" and r["body"] is None for r in grafana.received)


@pytest.mark.parametrize("auth", ["glsa_wrong", ("admin", "wrong")], ids=["token", "basic"])
async def test_bad_credentials_are_an_auth_error_that_leaks_nothing(grafana: FakeGrafana, auth: Any) -> None:
    url = grafana.url.replace("http://", "http://someone:url-password@")
    async with GrafanaService(url, auth) as service:
        with pytest.raises(GrafanaAuthError) as err:
            await service.test_datasource("prometheus")
    text = f"{err.value} {service!r}"
    assert err.value.status == 401 and "authentication failed (401)" in str(err.value)
    assert err.value.grafana_message in ("invalid API key", "Invalid username or password")
    for secret in ("glsa_wrong", "wrong", "url-password", "someone"):
        assert secret not in text, secret
    # credentials in the base URL are dropped, not sent
    assert grafana.received[0]["headers"].get("Authorization", "").split(" ")[0] in ("Bearer", "Basic")
    if isinstance(auth, tuple):
        assert base64.b64decode(grafana.received[0]["headers"]["Authorization"][6:]) == b"admin:wrong"


async def test_missing_permission_is_403_with_grafanas_explanation(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, VIEWER_TOKEN) as service:
        with pytest.raises(GrafanaAuthError) as err:
            await service.create_dashboard("x", [])
    assert err.value.status == 403 and "permission denied (403)" in str(err.value)
    assert "Permissions needed: dashboards:create" in str(err.value)


async def test_timeout(grafana: FakeGrafana) -> None:
    grafana.delay = 2.0
    async with GrafanaService(grafana.url, ADMIN_TOKEN, timeout=0.3) as service:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GrafanaTimeout) as err:
            await service.test_datasource("prometheus")
        waited = loop.time() - started
    assert waited < 1.5, waited
    assert "no answer within 0.3 s" in str(err.value) and "GET /api/datasources/uid/prometheus/health" in str(err.value)


async def test_non_json_error_body_is_quoted(grafana: FakeGrafana) -> None:
    async with GrafanaService(grafana.url, ADMIN_TOKEN) as service:
        with pytest.raises(GrafanaAPIError) as err:
            await service._request("GET", "/api/boom")  # noqa: SLF001 - a proxy's HTML error page
    assert err.value.status == 502 and err.value.grafana_message is None
    assert "502 Bad Gateway" in str(err.value)


async def test_unreachable_grafana(unused_tcp_port: int) -> None:
    async with GrafanaService(f"http://127.0.0.1:{unused_tcp_port}", ADMIN_TOKEN, timeout=2) as service:
        with pytest.raises(GrafanaUnavailable) as err:
            await service.test_datasource("prometheus")
    assert f"cannot reach http://127.0.0.1:{unused_tcp_port}" in str(err.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        GrafanaService("grafana:3000", ADMIN_TOKEN)
    with pytest.raises(ValueError):
        GrafanaService("http://grafana:3000", "")
    with pytest.raises(ValueError):
        GrafanaService("http://grafana:3000", ADMIN_TOKEN, timeout=0)
    assert ADMIN_TOKEN not in repr(GrafanaService("http://grafana:3000", ADMIN_TOKEN))
