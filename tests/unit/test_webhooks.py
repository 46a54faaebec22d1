"""Pure parts of the webhook emitter (agent/webhooks/delivery.py): the retry schedule, the checks
the API applies to URLs, patterns, secrets and event types, and the Standard Webhooks signature.

(Whether ``delivery.matches`` agrees with pgsidecar_emit's SQL LIKE needs PostgreSQL: it is in
tests/integration/test_webhooks.py.)"""
from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from agent.webhooks.delivery import (
    MAX_URL_LENGTH,
    InvalidWebhook,
    backoff,
    body,
    check_event_type,
    check_patterns,
    check_secret,
    check_url,
    denied,
    message_id,
    networks,
    new_secret,
    signed_headers,
)
from config.settings import WebhookSettings

HOUR = 3600.0


class _NoJitter(random.Random):
    """uniform(a, b) -> the midpoint, so backoff() gives the un-jittered delay."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def test_default_backoff_spreads_eight_attempts_over_about_a_day() -> None:
    settings = WebhookSettings()
    assert settings.max_attempts == 8
    # Attempt n fails -> retry n waits backoff(n); the 8th failure is final, so 7 waits.
    delays = [backoff(n, settings, _NoJitter()) for n in range(1, settings.max_attempts)]
    assert delays == sorted(delays) and delays[0] == settings.backoff_base_s
    assert max(delays) == settings.backoff_max_s
    assert 12 * HOUR <= sum(delays) <= 36 * HOUR, sum(delays) / HOUR


@pytest.mark.parametrize("attempt", [1, 2, 5, 30])
def test_backoff_jitter_stays_within_a_quarter_and_under_the_cap(attempt: int) -> None:
    settings = WebhookSettings(backoff_base_s=2.0, backoff_max_s=100.0)
    plain = min(2.0 * 4 ** (attempt - 1), 100.0)
    rng = random.Random(attempt)
    seen = [backoff(attempt, settings, rng) for _ in range(200)]
    assert all(0.75 * plain <= d <= 1.25 * plain for d in seen)
    assert len(set(seen)) > 1  # jittered, so a fleet of failed deliveries does not retry in lockstep


@pytest.mark.parametrize("attempt", [100, 513, 600, 10**6])
def test_backoff_of_a_late_retry_is_the_cap_not_an_overflow(attempt: int) -> None:
    # webhooks.max_attempts may be set high (retry every backoff_max_s for a week): 4.0 ** 512
    # overflows a float, and an exception there left the attempt unrecorded and resent forever.
    settings = WebhookSettings(max_attempts=10**6, backoff_base_s=15.0, backoff_max_s=600.0)
    assert backoff(attempt, settings, _NoJitter()) == 600.0


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook",
    "https://hooks.example.com/a/b?c=d",
    "http://[::1]:9000/",
    "http://receiver",
    "https://example.com:65535/x",
])
def test_check_url_accepts_absolute_http_urls(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize("url, needle", [
    (None, "non-empty string"),
    ("", "non-empty string"),
    (42, "non-empty string"),
    ("ftp://example.com/x", "http or https"),
    ("example.com/hook", "http or https"),
    ("javascript:alert(1)", "http or https"),
    ("http:///path-only", "no host"),
    ("http://:8080/", "no host"),
    ("http://example.com:0/", "port 0"),
    ("http://example.com:99999/", "bad port"),
    ("http://example.com:abc/", "bad port"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com/a b", "whitespace"),
    ("http://example.com/\n", "whitespace"),
    ("http://example.com/" + "a" * MAX_URL_LENGTH, "characters long"),
])
def test_check_url_refuses_and_says_why(url: object, needle: str) -> None:
    with pytest.raises(InvalidWebhook, match=needle):
        check_url(url)


@pytest.mark.parametrize("events, expected", [
    (["resumes.*"], ("resumes.*",)),
    (["*"], ("*",)),
    (["users.insert", "matches.update", "users.insert"], ("users.insert", "matches.update")),
    (("user_signup", "a-b.c_d"), ("user_signup", "a-b.c_d")),
])
def test_check_patterns_accepts_and_deduplicates(events: object, expected: tuple[str, ...]) -> None:
    assert check_patterns(events) == expected


@pytest.mark.parametrize("events", [
    None, "resumes.*", [], {}, [1], [""], ["resumes.%"], ["res umes"], ["a\\b"], ["x" * 201],
    [["nested"]], ["*"] * 101, ["users.insert\n"], ["ok", None],
])
def test_check_patterns_refuses(events: object) -> None:
    with pytest.raises(InvalidWebhook, match="events"):
        check_patterns(events)


@pytest.mark.parametrize("event_type", ["user_signup", "resumes.insert", "a-b.C9"])
def test_check_event_type_accepts(event_type: str) -> None:
    assert check_event_type(event_type) == event_type


@pytest.mark.parametrize("event_type", [None, "", 7, "a*", "with space", "100%", "x" * 201, "user_signup\n"])
def test_check_event_type_refuses(event_type: object) -> None:
    with pytest.raises(InvalidWebhook, match="event_type"):
        check_event_type(event_type)


def test_check_secret_accepts_generated_and_minimal_secrets() -> None:
    generated = new_secret()
    assert check_secret(generated) == generated
    assert len(base64.b64decode(generated.removeprefix("whsec_"))) >= 24
    minimal = "whsec_" + base64.b64encode(b"k" * 24).decode()
    assert check_secret(minimal) == minimal


@pytest.mark.parametrize("secret, needle", [
    (None, "whsec_"),
    (123, "whsec_"),
    (base64.b64encode(b"k" * 32).decode(), "whsec_"),
    ("whsec_" + base64.b64encode(b"k" * 23).decode(), "fewer than 24"),
    ("whsec_not*base64!", "not valid base64"),
    ("whsec_", "fewer than 24"),
])
def test_check_secret_refuses(secret: object, needle: str) -> None:
    with pytest.raises(InvalidWebhook, match=needle):
        check_secret(secret)


@pytest.mark.parametrize("address, refused", [
    ("169.254.169.254", True), ("::ffff:169.254.169.254", True), ("fe80::1%eth0", True), ("100.100.100.200", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("::1", False), ("not-an-ip", False),
])
def test_default_deny_networks(address: str, refused: bool) -> None:
    assert denied(address, networks(WebhookSettings().deny_networks)) is refused


def test_signed_headers_verify_with_standardwebhooks() -> None:
    secret = new_secret()
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    payload = body(41, "resumes.insert", created, '{"new": {"id": 1}, "old": null}')
    headers = signed_headers(secret, message_id(41), payload)
    assert headers["webhook-id"] == "evt_41" and headers["webhook-signature"].startswith("v1,")
    verified = Webhook(secret).verify(payload.encode(), headers)
    assert verified == {"id": "evt_41", "type": "resumes.insert", "timestamp": "2026-01-02T03:04:05Z",
                        "data": {"new": {"id": 1}, "old": None}}
    assert json.loads(payload) == verified
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(payload.encode(), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(payload.replace("41", "42").encode(), headers)
