"""One HTTP attempt: the Standard Webhooks request, where it may go, and when to try again.

- The body is ``{"id", "type", "timestamp", "data"}`` (Standard Webhooks' recommended shape) and
  the headers ``webhook-id`` (``evt_<event id>``: the same on every retry and for every endpoint,
  so receivers deduplicate on it), ``webhook-timestamp`` (the attempt's time) and
  ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, made by the
  ``standardwebhooks`` library with the endpoint's ``whsec_`` secret).
- Any 2xx is success. Redirects are not followed (a 3xx is a failed attempt). 410 Gone disables
  the endpoint. Everything else, a timeout or a connection error is retried with exponential
  backoff and jitter.
- Targets are checked at registration and again at every connection (names are resolved by a
  resolver that drops addresses in ``webhooks.deny_networks``), so DNS that later points at the
  cloud metadata service does not make the sidecar POST there.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import json
import random
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from standardwebhooks.webhooks import Webhook

from config.settings import WebhookSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_PATTERN = re.compile(r"^[A-Za-z0-9_.*-]+$")
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_URL_LENGTH = 2048
MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 200
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
MAX_ERROR_LENGTH = 300
USER_AGENT = "pgsidecar-webhooks/1"


class InvalidWebhook(ValueError):
    """A registration or event the API refuses; ``str()`` says what and why, for a 400."""


def networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def denied(address: str, deny: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in deny)


def check_url(url: object) -> str:
    """The URL as given when it is an absolute http(s) URL with a host; else InvalidWebhook."""
    if not isinstance(url, str) or not url:
        raise InvalidWebhook("url must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhook(f"url is {len(url)} characters long, more than {MAX_URL_LENGTH}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhook(f"url must use http or https, not {parts.scheme or 'no scheme'!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise InvalidWebhook(f"url has a bad port: {exc}") from None
    if not host:
        raise InvalidWebhook("url has no host")
    if port == 0:
        raise InvalidWebhook("url has port 0")
    if any(ch.isspace() for ch in url):
        raise InvalidWebhook("url contains whitespace")
    return url


async def check_target(url: str, deny: Sequence[Network]) -> None:
    """Refuse a URL whose host is, or resolves to, an address in ``deny`` (or does not resolve)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidWebhook(f"url host {host!r} does not resolve ({exc.strerror})") from None
    for info in infos:
        address = str(info[4][0])
        if denied(address, deny):
            raise InvalidWebhook(f"url host {host!r} resolves to {address}, which is in webhooks.deny_networks")


def check_patterns(events: object) -> tuple[str, ...]:
    if not isinstance(events, (list, tuple)) or not events:
        raise InvalidWebhook("events must be a non-empty list of event types or patterns such as 'resumes.*' or '*'")
    if len(events) > MAX_PATTERNS:
        raise InvalidWebhook(f"events has {len(events)} patterns, more than {MAX_PATTERNS}")
    out: list[str] = []
    for item in events:
        if not isinstance(item, str) or not item or len(item) > MAX_PATTERN_LENGTH or not _PATTERN.fullmatch(item):
            raise InvalidWebhook(
                f"events: {str(item)[:60]!r} is not an event pattern (letters, digits, '_', '-' and '.', "
                f"with '*' for any run of characters, e.g. 'resumes.insert', 'resumes.*', '*')"
            )
        if item not in out:
            out.append(item)
    return tuple(out)


def check_event_type(event_type: object) -> str:
    if not isinstance(event_type, str) or not event_type or len(event_type) > MAX_PATTERN_LENGTH \
            or not _EVENT_TYPE.fullmatch(event_type):
        raise InvalidWebhook(
            f"event_type: {str(event_type)[:60]!r} is not an event type (letters, digits, '_', '-' and '.', "
            f"at most {MAX_PATTERN_LENGTH} characters, e.g. 'user_signup')"
        )
    return event_type


def new_secret() -> str:
    import secrets

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: object) -> str:
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise InvalidWebhook(f"secret must be a Standard Webhooks secret: '{SECRET_PREFIX}' + base64 of at least "
                             f"{MIN_SECRET_BYTES} random bytes (omit it to have one generated)")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        raise InvalidWebhook(f"secret: the part after '{SECRET_PREFIX}' is not valid base64") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise InvalidWebhook(f"secret holds {len(raw)} bytes, fewer than {MIN_SECRET_BYTES}")
    return secret


def matches(event_type: str, patterns: Iterable[str]) -> bool:
    """The Python twin of pgsidecar_emit's LIKE match ('*' = any run of characters)."""
    for pattern in patterns:
        regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
        if re.fullmatch(regex, event_type, re.DOTALL):  # LIKE's % matches newlines too
            return True
    return False


def backoff(attempts: int, settings: WebhookSettings, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``attempts`` (1 = the first retry): base * 4^(n-1), capped, +-25 %."""
    # The exponent is capped so that a large webhooks.max_attempts cannot overflow the float.
    delay = min(settings.backoff_base_s * 4.0 ** min(max(attempts - 1, 0), 64), settings.backoff_max_s)
    return delay * (rng or random).uniform(0.75, 1.25)


def message_id(event_id: int) -> str:
    return f"evt_{event_id}"


def body(event_id: int, event_type: str, created_at: datetime, data_json: str) -> str:
    """The request body; ``data_json`` is the event's payload as JSON text (jsonb's output)."""
    stamp = created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return (f'{{"id":"{message_id(event_id)}","type":{json.dumps(event_type)},'
            f'"timestamp":"{stamp}","data":{data_json}}}')


def signed_headers(secret: str, msg_id: str, payload: str, now: datetime | None = None) -> dict[str, str]:
    stamp = now or datetime.now(UTC)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, stamp, payload),
    }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt got: ``status`` (None when no HTTP answer), ``error`` text, latency."""

    status: int | None
    error: str | None
    latency_ms: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


class DenyingResolver(AbstractResolver):
    """aiohttp resolver that drops addresses in the deny list (and fails when none is left)."""

    def __init__(self, deny: Sequence[Network]) -> None:
        self.deny = tuple(deny)
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not denied(r["host"], self.deny)]
        if not allowed:
            # With an errno, so aiohttp's ClientConnectorError shows the text (else "[None]").
            raise OSError(errno.EHOSTUNREACH, f"{host} resolves only to addresses in webhooks.deny_networks")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class Sender:
    """The emitter's HTTP client: one aiohttp session, keep-alive, a timeout per attempt."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.deny = networks(settings.deny_networks)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=8, resolver=DenyingResolver(self.deny))
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                auto_decompress=False,
            )
        return self._session

    async def post(self, url: str, secret: str, msg_id: str, payload: str) -> Outcome:
        start = time.perf_counter()
        host = urlsplit(url).hostname or ""
        if denied(host, self.deny):  # an IP literal never reaches the resolver
            return Outcome(None, f"{host} is in webhooks.deny_networks", 0.0)
        try:
            async with self._client().post(url, data=payload.encode(), headers=signed_headers(secret, msg_id, payload),
                                           allow_redirects=False) as response:
                await response.content.read(65536)
                status = response.status
        except TimeoutError:
            return Outcome(None, f"no answer within {self.settings.timeout_s:g} s (webhooks.timeout_s)",
                           (time.perf_counter() - start) * 1000)
        except (aiohttp.ClientError, OSError) as exc:
            text = f"{type(exc).__name__}: {exc}"
            return Outcome(None, text[:MAX_ERROR_LENGTH], (time.perf_counter() - start) * 1000)
        latency = (time.perf_counter() - start) * 1000
        return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}", latency)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
