"""GrafanaService: the few calls of Grafana's HTTP API an operator's tooling needs, over aiohttp.

- ``create_dashboard(name, panels)`` / ``save_dashboard(model)``: ``POST /api/dashboards/db``
  (answer 200 ``{id, uid, url, status: "success", version, slug}``; 412 ``{message, status}`` when
  the uid or title exists and ``overwrite`` is false, or the version changed meanwhile).
- ``create_alert_notification(name, type, settings)``: a contact point of Grafana alerting,
  ``POST /api/v1/provisioning/contact-points`` (body and 202 answer: EmbeddedContactPoint
  ``{uid, name, type, settings, disableResolveMessage, provenance}``; 400 ValidationError).
- ``test_datasource(uid)``: ``GET /api/datasources/uid/{uid}/health`` (200 ``{status: "OK",
  message}``; 400 ``{status: "ERROR", message}`` when the check fails, which is an answer here, not an
  exception; 404 when there is no such data source).

Authentication is a service-account token (``Authorization: Bearer``) or a user and password
(basic auth). Every call has a total timeout. Failures raise one of:

- `GrafanaAuthError` on 401 (bad credentials) and 403 (the role lacks a permission), with
  Grafana's message;
- `GrafanaTimeout` when no complete answer came within the timeout;
- `GrafanaUnavailable` when Grafana cannot be reached at all;
- `GrafanaNotFound` on 404 and `GrafanaAPIError` on any other non-2xx, with Grafana's message
  (``message``, or ``msg`` as the alerting API's ValidationError documents it) and, for 412, its
  ``status`` word.

No error message, repr or log line contains the token or password (the base URL is shown without
any credentials it may carry).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

#: Dashboard JSON schema version written by `create_dashboard` (Grafana 10.3+/11).
SCHEMA_VERSION = 39
#: How much of a non-JSON error body is quoted in an exception.
_BODY_QUOTE = 200


class GrafanaError(Exception):
    """Any failure of a GrafanaService call."""

    def __init__(self, message: str, *, status: int | None = None, grafana_message: str | None = None,
                 grafana_status: str | None = None) -> None:
        super().__init__(message)
        self.status = status                    # HTTP status, when there was an answer
        self.grafana_message = grafana_message  # Grafana's own message from the body
        self.grafana_status = grafana_status    # Grafana's status word (412: name-exists, version-mismatch, ...)


class GrafanaAuthError(GrafanaError):
    """401: the token or user/password was refused; 403: accepted, but the role lacks a permission."""


class GrafanaNotFound(GrafanaError):
    """404: no such object (data source, dashboard, ...)."""


class GrafanaAPIError(GrafanaError):
    """Any other non-2xx answer (400 validation, 412 precondition failed, 5xx, ...)."""


class GrafanaTimeout(GrafanaError):
    """No complete answer within the service's timeout."""


class GrafanaUnavailable(GrafanaError):
    """Grafana could not be reached (connection refused, DNS, TLS, connection reset)."""


@dataclass(frozen=True, slots=True)
class SavedDashboard:
    """Grafana's answer to ``POST /api/dashboards/db``."""

    id: int
    uid: str
    url: str
    version: int
    slug: str
    status: str


@dataclass(frozen=True, slots=True)
class ContactPoint:
    """An EmbeddedContactPoint as Grafana answered it (``settings`` may have secrets masked)."""

    uid: str
    name: str
    type: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    disable_resolve_message: bool = False
    provenance: str = ""


@dataclass(frozen=True, slots=True)
class DatasourceHealth:
    """The data source's own health check, run by Grafana: ``ok`` when its status is "OK"."""

    uid: str
    ok: bool
    status: str
    message: str


class GrafanaService:
    """Async client of one Grafana. ``auth`` is a token (Bearer) or a ``(user, password)`` pair.

    Use ``async with GrafanaService(...) as grafana:`` or call ``close()``; pass ``session`` to share
    an aiohttp ClientSession (it is then not closed here).
    """

    def __init__(self, base_url: str, auth: str | tuple[str, str], timeout: float = 10.0, *,
                 session: aiohttp.ClientSession | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        url = URL(base_url)
        if not url.is_absolute() or url.scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL, got {str(url.with_user(None))!r}")
        self._base = url.with_user(None).with_query(None).with_fragment(None)
        self._shown = str(self._base).rstrip("/")
        self._headers = {"Accept": "application/json"}
        if isinstance(auth, str):
            if not auth:
                raise ValueError("auth token is empty")
            self._auth_kind = "token"
            self._headers["Authorization"] = f"Bearer {auth}"
        else:
            user, password = auth
            if ":" in user:
                raise ValueError("basic auth user cannot contain ':'")
            self._auth_kind = "basic"
            pair = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {pair}"
        self.timeout = timeout
        self._session = session
        self._own_session = session is None

    def __repr__(self) -> str:
        return f"GrafanaService({self._shown!r}, auth=<{self._auth_kind}>, timeout={self.timeout})"

    async def __aenter__(self) -> GrafanaService:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    # --- the API ---------------------------------------------------------------------------------

    async def create_dashboard(self, name: str, panels: Sequence[Mapping[str, Any]], *,
                               uid: str | None = None, folder_uid: str | None = None,
                               tags: Sequence[str] = (), overwrite: bool = False,
                               message: str | None = None) -> SavedDashboard:
        """Create (or with ``overwrite`` replace) a dashboard titled ``name`` holding ``panels``.

        Panels without an ``id`` are numbered; those without a ``gridPos`` are laid out two per row.
        """
        if not name.strip():
            raise ValueError("dashboard name is empty")
        if uid is not None and len(uid) > 40:
            raise ValueError(f"dashboard uid is at most 40 characters, got {len(uid)}")
        laid_out = []
        used = {p["id"] for p in panels if isinstance(p.get("id"), int)}
        next_id = max(used, default=0) + 1
        for n, panel in enumerate(panels):
            panel = dict(panel)
            if not isinstance(panel.get("id"), int):
                panel["id"], next_id = next_id, next_id + 1
            panel.setdefault("gridPos", {"h": 8, "w": 12, "x": 12 * (n % 2), "y": 8 * (n // 2)})
            laid_out.append(panel)
        model = {"id": None, "uid": uid, "title": name, "tags": list(tags), "timezone": "browser",
                 "schemaVersion": SCHEMA_VERSION, "time": {"from": "now-1h", "to": "now"},
                 "panels": laid_out}
        return await self.save_dashboard(model, folder_uid=folder_uid, overwrite=overwrite, message=message)

    async def save_dashboard(self, model: Mapping[str, Any], *, folder_uid: str | None = None,
                             overwrite: bool = False, message: str | None = None) -> SavedDashboard:
        """``POST /api/dashboards/db`` with a complete dashboard model (e.g. dashboards/grafana-dashboard.json)."""
        body: dict[str, Any] = {"dashboard": dict(model), "overwrite": overwrite}
        if folder_uid is not None:
            body["folderUid"] = folder_uid
        if message is not None:
            body["message"] = message
        answer = await self._request("POST", "/api/dashboards/db", json_body=body)
        try:
            return SavedDashboard(id=int(answer["id"]), uid=str(answer["uid"]), url=str(answer["url"]),
                                  version=int(answer["version"]), slug=str(answer.get("slug", "")),
                                  status=str(answer.get("status", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise GrafanaAPIError(f"grafana: POST /api/dashboards/db answered 200 without {exc}: "
                                  f"{_quote(answer)}", status=200) from None

    async def create_alert_notification(self, name: str, type: str, settings: Mapping[str, Any] | None = None,
                                        *, uid: str | None = None, disable_resolve_message: bool = False,
                                        editable_in_ui: bool = False) -> ContactPoint:
        """Create a contact point (Grafana alerting's notification target): ``type`` is slack,
        pagerduty, email, webhook, ...; ``settings`` its fields (url, integrationKey, addresses, ...).

        ``editable_in_ui`` sends ``X-Disable-Provenance`` so the UI may edit it later.
        """
        if not name.strip():
            raise ValueError("contact point name is empty")
        if not type.strip():
            raise ValueError("contact point type is empty")
        body: dict[str, Any] = {"name": name, "type": type, "settings": dict(settings or {}),
                                "disableResolveMessage": disable_resolve_message}
        if uid is not None:
            body["uid"] = uid
        headers = {"X-Disable-Provenance": "true"} if editable_in_ui else None
        answer = await self._request("POST", "/api/v1/provisioning/contact-points", json_body=body,
                                     headers=headers)
        try:
            return ContactPoint(uid=str(answer["uid"]), name=str(answer.get("name", name)),
                                type=str(answer.get("type", type)), settings=dict(answer.get("settings") or {}),
                                disable_resolve_message=bool(answer.get("disableResolveMessage", False)),
                                provenance=str(answer.get("provenance") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise GrafanaAPIError(f"grafana: POST /api/v1/provisioning/contact-points answered without "
                                  f"{exc}: {_quote(answer)}") from None

    async def test_datasource(self, uid: str) -> DatasourceHealth:
        """Ask Grafana to run the data source's health check. A failed check is a `DatasourceHealth`
        with ``ok=False`` (Grafana answers 400 with status "ERROR"), not an exception."""
        if not uid:
            raise ValueError("data source uid is empty")
        path = f"/api/datasources/uid/{quote(uid, safe='')}/health"
        answer = await self._request("GET", path, failed_check_ok=True)
        status = str(answer.get("status", ""))
        return DatasourceHealth(uid=uid, ok=status.upper() == "OK", status=status,
                                message=str(answer.get("message", "")))

    # --- transport -------------------------------------------------------------------------------

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._own_session:
                raise GrafanaError("grafana: the shared aiohttp session is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       headers: Mapping[str, str] | None = None, failed_check_ok: bool = False) -> Any:
        what = f"{method} {path}"
        # Keeps a sub-path (Grafana served under /grafana/); path is already percent-encoded.
        url = self._base.with_path(self._base.path.rstrip("/") + path, encoded=True)
        send = dict(self._headers)
        if headers:
            send.update(headers)
        session = self._session_for_call()
        try:
            async with session.request(method, url, json=json_body, headers=send,
                                       timeout=aiohttp.ClientTimeout(total=self.timeout),
                                       allow_redirects=False) as resp:
                status = resp.status
                raw = await resp.read()
        except asyncio.TimeoutError:
            raise GrafanaTimeout(f"grafana: {what} on {self._shown}: no answer within {self.timeout:g} s "
                                 f"(GrafanaService timeout)") from None
        except aiohttp.ClientError as exc:
            raise GrafanaUnavailable(f"grafana: {what}: cannot reach {self._shown}: "
                                     f"{type(exc).__name__}: {exc}") from None
        log.debug("grafana_request", extra={"method": method, "path": path, "status": status})
        body = _decode(raw)
        if 200 <= status < 300:
            if not isinstance(body, (dict, list)):
                raise GrafanaAPIError(f"grafana: {what} answered {status} with a body that is not JSON: "
                                      f"{_quote(raw)}", status=status)
            return body
        if failed_check_ok and status == 400 and isinstance(body, dict) and "status" in body:
            return body  # a data source health check that ran and failed
        raise _error(what, status, body, raw, self._shown)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def _quote(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else json.dumps(value)[:_BODY_QUOTE * 2]
    text = " ".join(text.split())
    return text[:_BODY_QUOTE] + ("..." if len(text) > _BODY_QUOTE else "")


def _error(what: str, status: int, body: Any, raw: bytes, shown: str) -> GrafanaError:
    message = None
    word = None
    if isinstance(body, dict):
        for key in ("message", "msg", "error"):
            if isinstance(body.get(key), str) and body[key]:
                message = body[key]
                break
        if isinstance(body.get("status"), str):
            word = body["status"]
    said = message if message is not None else (_quote(raw) if raw else "(empty body)")
    kw: dict[str, Any] = {"status": status, "grafana_message": message, "grafana_status": word}
    if status == 401:
        return GrafanaAuthError(f"grafana: {what}: authentication failed (401): {said}; check the "
                                f"service-account token or the user and password", **kw)
    if status == 403:
        return GrafanaAuthError(f"grafana: {what}: permission denied (403): {said}; the token's or "
                                f"user's role lacks this permission", **kw)
    if status == 404:
        return GrafanaNotFound(f"grafana: {what}: not found (404): {said}", **kw)
    suffix = f" [{word}]" if word and status == 412 else ""
    return GrafanaAPIError(f"grafana: {what} on {shown} failed ({status}): {said}{suffix}", **kw)
