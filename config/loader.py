"""Build one validated ``Settings`` from defaults, a YAML file, the environment and overrides.

This is the only module that reads ``os.environ``. Precedence, lowest first:

1. the dataclass defaults in ``config.settings``;
2. the YAML file (``path``, else ``$PGSIDECAR_CONFIG``), shaped like ``config/sidecar.yaml``;
3. ``DATABASE_URL`` (for ``upstream.dsn`` only);
4. ``PGSIDECAR_<SECTION>__<KEY>`` variables, e.g. ``PGSIDECAR_POOL__SIZE=5``;
5. ``overrides`` with dotted keys (``{"proxy.port": 7000}``), used by CLI flags.

Keys and types come from the dataclasses themselves, so a new field needs no loader change
unless it wants a range rule in ``_RULES``. Every failure is a one-line ``ConfigError`` naming
the dotted key, the bad value (never a secret) and what is allowed.

Also here: ``parse_dsn`` (libpq-style URL -> ``DsnParts``), ``redact_dsn`` and ``redacted``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from config.settings import Settings, UserSettings

__all__ = [
    "ConfigError",
    "DsnParts",
    "load_settings",
    "parse_dsn",
    "redact_dsn",
    "redacted",
]

ENV_PREFIX = "PGSIDECAR_"
CONFIG_ENV = "PGSIDECAR_CONFIG"
DATABASE_URL_ENV = "DATABASE_URL"
REDACTED = "***"


class ConfigError(Exception):
    """A setting is unknown, malformed or out of range; ``str()`` is one line for the user."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- schema

_UserTuple = tuple[UserSettings, ...]
_StrTuple = tuple[str, ...]


def _build_schema() -> dict[str, tuple[type, dict[str, Any]]]:
    """section name -> (section dataclass, {key: resolved type hint})."""
    schema: dict[str, tuple[type, dict[str, Any]]] = {}
    for section, section_type in typing.get_type_hints(Settings).items():
        hints = typing.get_type_hints(section_type)
        schema[section] = (section_type, {f.name: hints[f.name] for f in dataclasses.fields(section_type)})
    return schema


_SCHEMA = _build_schema()


@dataclass(frozen=True, slots=True)
class _Rule:
    expected: str
    ok: Callable[[Any], bool]
    problem: str = "is out of range"


def _int_at_least(low: int) -> _Rule:
    return _Rule(f"an integer >= {low}", lambda v: v >= low)


def _number_at_least(low: float) -> _Rule:
    return _Rule(f"a number >= {low:g}", lambda v: v >= low)


def _positive_number() -> _Rule:
    return _Rule("a number > 0", lambda v: v > 0)


def _port() -> _Rule:
    return _Rule("an integer from 0 to 65535", lambda v: 0 <= v <= 65535)


def _networks_ok(values: tuple[str, ...]) -> bool:
    import ipaddress

    try:
        for value in values:
            ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _networks() -> _Rule:
    return _Rule("a list of IP networks such as 169.254.0.0/16", _networks_ok, "is not a list of IP networks")


def _one_of(*choices: str) -> _Rule:
    return _Rule("one of: " + ", ".join(choices), lambda v: v in choices, "is not allowed")


# Range/choice rules by dotted key. Every int and float setting has one (a unit test checks).
_RULES: dict[str, _Rule] = {
    "proxy.port": _port(),
    "proxy.max_message_bytes": _int_at_least(1024),
    "proxy.max_startup_bytes": _int_at_least(1024),
    "proxy.client_login_timeout": _positive_number(),
    "proxy.max_client_connections": _int_at_least(1),
    "upstream.connect_timeout": _positive_number(),
    "auth.method": _one_of("scram-sha-256", "md5", "trust"),
    "pool.mode": _one_of("transaction", "session"),
    "pool.size": _int_at_least(1),
    "pool.max_overflow": _int_at_least(0),
    "pool.overflow_idle_timeout": _positive_number(),
    "pool.checkout_timeout": _positive_number(),
    "pool.server_lifetime": _positive_number(),
    "pool.server_idle_timeout": _positive_number(),
    "pool.server_check_delay": _number_at_least(0),
    "pool.server_reset_timeout": _positive_number(),
    "agent.port": _port(),
    "logging.level": _one_of("debug", "info", "warning", "error"),
    "logging.format": _one_of("text", "json"),
    "stats.max_fingerprints": _int_at_least(1),
    "stats.prometheus_top_n": _int_at_least(0),
    "slow_query.threshold_ms": _number_at_least(0),
    "slow_query.ring_size": _int_at_least(1),
    "slow_query.explain_interval_s": _positive_number(),
    "cache.mode": _one_of("off", "all", "hinted"),
    "cache.ttl_s": _positive_number(),
    "cache.max_bytes": _int_at_least(1024),
    "cache.max_result_bytes": _int_at_least(0),
    "cache.catalog_refresh_s": _positive_number(),
    "webhooks.max_attempts": _int_at_least(1),
    "webhooks.timeout_s": _positive_number(),
    "webhooks.backoff_base_s": _positive_number(),
    "webhooks.backoff_max_s": _positive_number(),
    "webhooks.sweep_interval_s": _positive_number(),
    "webhooks.lease_s": _positive_number(),
    "webhooks.concurrency": _int_at_least(1),
    "webhooks.batch_size": _int_at_least(1),
    "webhooks.max_payload_bytes": _int_at_least(1024),
    "webhooks.retention_days": _number_at_least(0),
    "webhooks.deny_networks": _networks(),
    "graphql.max_depth": _int_at_least(1),
    "graphql.max_cost": _int_at_least(1),
    "graphql.default_page_size": _int_at_least(1),
    "graphql.max_page_size": _int_at_least(1),
    "graphql.query_timeout_s": _positive_number(),
    "graphql.max_sessions": _int_at_least(1),
    "views.refresh_interval_s": _number_at_least(0),
    "views.refresh_timeout_s": _positive_number(),
}


# --------------------------------------------------------------------------- conversion

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class _Invalid(Exception):
    """Raised by converters; the caller turns it into a ConfigError with key and source."""


def _to_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise _Invalid("an integer")


def _to_float(raw: object) -> float:
    value: float | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            pass
    if value is None or not math.isfinite(value):
        raise _Invalid("a number")
    return value


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Invalid("a boolean")


def _to_str(raw: object) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool):  # YAML `admin_token: 12345`
        return str(raw)
    raise _Invalid("a string")


def _to_optional_str(raw: object) -> str | None:
    if raw is None or (isinstance(raw, str) and raw.strip() in ("", "null")):
        return None
    return _to_str(raw)


def _to_strs(raw: object) -> _StrTuple:
    """YAML list of strings, or ``"a,b,c"`` (environment variables)."""
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if raw is None:
        return ()
    if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        return tuple(raw)
    raise _Invalid("a list of strings")


def _to_users(raw: object) -> _UserTuple:
    """YAML list of {name, password}, or ``"alice:secret,bob:pw2"``. Never echoes a password."""
    if isinstance(raw, str):
        items: list[object] = [part for part in raw.split(",") if part.strip()]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    elif raw is None:
        items = []
    else:
        raise _Invalid("a list of users")
    users: list[UserSettings] = []
    for i, item in enumerate(items):
        if isinstance(item, UserSettings):
            user = item
        elif isinstance(item, str):
            name, colon, password = item.strip().partition(":")
            if not colon:
                raise _Invalid(f"entry {i + 1} is not name:password")
            user = UserSettings(name=name, password=password)
        elif isinstance(item, Mapping):
            extra = sorted(str(k) for k in item if k not in ("name", "password"))
            if extra:
                raise _Invalid(f"entry {i + 1} has unknown key {extra[0]!r} (valid keys: name, password)")
            item_name, item_password = item.get("name"), item.get("password")
            if not isinstance(item_name, str) or not isinstance(item_password, str):
                raise _Invalid(f"entry {i + 1} needs string 'name' and 'password'")
            user = UserSettings(name=item_name, password=item_password)
        else:
            raise _Invalid(f"entry {i + 1} is not a {{name, password}} mapping")
        if not user.name:
            raise _Invalid(f"entry {i + 1} has an empty name")
        if any(u.name == user.name for u in users):
            raise _Invalid(f"user {user.name!r} is listed twice")
        users.append(user)
    return tuple(users)


def _converter(tp: Any) -> tuple[Callable[[object], Any], str]:
    """(converter, default 'expected ...' text) for a resolved type hint."""
    if tp is int:
        return _to_int, "an integer"
    if tp is float:
        return _to_float, "a number"
    if tp is bool:
        return _to_bool, "true/false, yes/no, on/off or 1/0"
    if tp is str:
        return _to_str, "a string"
    if isinstance(tp, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}:
        return _to_optional_str, "a string, or empty/null for none"
    if tp == _StrTuple:
        return _to_strs, "a list of strings, or 'a,b,...'"
    if tp == _UserTuple:
        return _to_users, "a list of {name, password} mappings, or 'name:password,...'"
    raise TypeError(f"config.loader has no converter for settings type {tp!r}")


def _convert(key: str, tp: Any, raw: object, source: str) -> Any:
    convert, expected = _converter(tp)
    rule = _RULES.get(key)
    if rule is not None:
        expected = rule.expected
    try:
        return convert(raw)
    except _Invalid as exc:
        what = str(exc)
        if tp == _UserTuple:  # the value may hold passwords: describe, never show it
            raise ConfigError(f"{key}: {what} (expected {expected}){source}", key) from None
        raise ConfigError(f"{key}: {_show(key, raw)} is not {what} (expected {expected}){source}", key) from None


def _show(key: str, value: object) -> str:
    if key == "upstream.dsn" and isinstance(value, str):
        return repr(redact_dsn(value))
    if key == "agent.admin_token" and value is not None:
        return repr(REDACTED)
    return repr(value)


# --------------------------------------------------------------------------- sources

# dotted key -> (raw value, " [from ...]" suffix for error messages)
_Layer = dict[str, tuple[object, str]]


def _section_schema(section: str, source: str) -> dict[str, Any]:
    try:
        return _SCHEMA[section][1]
    except KeyError:
        valid = ", ".join(sorted(_SCHEMA))
        raise ConfigError(f"{section}: unknown section (valid sections: {valid}){source}", section) from None


def _check_key(section: str, key: str, source: str) -> str:
    keys = _section_schema(section, source)
    dotted = f"{section}.{key}"
    if key not in keys:
        valid = ", ".join(sorted(keys))
        raise ConfigError(f"{dotted}: unknown key (valid keys in {section}: {valid}){source}", dotted)
    return dotted


def _file_layer(path: str) -> _Layer:
    source = f" [from {path}]"
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, not {type(data).__name__}")
    layer: _Layer = {}
    for section, body in data.items():
        _section_schema(str(section), source)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: {body!r} is not a mapping (expected keys of {section}){source}", section)
        for key, raw in body.items():
            layer[_check_key(str(section), str(key), source)] = (raw, source)
    return layer


def _env_layer(env: Mapping[str, str]) -> _Layer:
    """``PGSIDECAR_<SECTION>__<KEY>`` only; other PGSIDECAR_ names (no ``__``) are not settings."""
    layer: _Layer = {}
    url = env.get(DATABASE_URL_ENV)
    if url:
        layer["upstream.dsn"] = (url, f" [from {DATABASE_URL_ENV}]")
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        source = f" [from {name}]"
        layer[_check_key(section, key, source)] = (env[name], source)
    return layer


def _override_layer(overrides: Mapping[str, object]) -> _Layer:
    """Dotted keys; a None value means "not given" (an unset CLI flag) and is skipped."""
    layer: _Layer = {}
    source = " [from overrides]"
    for dotted, raw in overrides.items():
        if raw is None:
            continue
        section, dot, key = dotted.partition(".")
        if not dot:
            raise ConfigError(f"{dotted}: override keys are dotted, like 'pool.size'{source}", dotted)
        layer[_check_key(section, key, source)] = (raw, source)
    return layer


# --------------------------------------------------------------------------- load

def load_settings(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Merge defaults < YAML < DATABASE_URL < PGSIDECAR_* < overrides, convert and validate."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    merged: _Layer = {}
    if path is not None:
        merged.update(_file_layer(path))
    merged.update(_env_layer(env))
    merged.update(_override_layer(overrides or {}))

    sections: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for section, (section_type, keys) in _SCHEMA.items():
        values: dict[str, Any] = {}
        for key, tp in keys.items():
            dotted = f"{section}.{key}"
            if dotted in merged:
                raw, source = merged[dotted]
                values[key] = _convert(dotted, tp, raw, source)
                sources[dotted] = source
        sections[section] = section_type(**values)
    settings = Settings(**sections)
    _validate(settings, sources)
    return settings


def _validate(settings: Settings, sources: Mapping[str, str]) -> None:
    for dotted, rule in _RULES.items():
        section, _, key = dotted.partition(".")
        value = getattr(getattr(settings, section), key)
        if not rule.ok(value):
            raise ConfigError(f"{dotted}: {value!r} {rule.problem} (expected {rule.expected}){sources.get(dotted, '')}", dotted)

    tls = settings.tls
    if (tls.cert is None) != (tls.key is None):
        missing, given = ("tls.key", "tls.cert") if tls.key is None else ("tls.cert", "tls.key")
        raise ConfigError(
            f"{missing}: None while {given} is set (expected tls.cert and tls.key both set or both unset)"
            f"{sources.get(given, '')}",
            missing,
        )

    graphql = settings.graphql
    if graphql.default_page_size > graphql.max_page_size:
        raise ConfigError(
            f"graphql.default_page_size: {graphql.default_page_size} is larger than graphql.max_page_size "
            f"({graphql.max_page_size}) (expected a default page size no larger than the maximum)"
            f"{sources.get('graphql.default_page_size', '')}",
            "graphql.default_page_size",
        )
    if not graphql.path.startswith("/"):
        raise ConfigError(f"graphql.path: {graphql.path!r} does not start with / (expected a URL path such as "
                          f"/graphql){sources.get('graphql.path', '')}", "graphql.path")

    dsn = settings.upstream.dsn
    if dsn is not None:
        try:
            parse_dsn(dsn)
        except ValueError as exc:
            raise ConfigError(
                f"upstream.dsn: {_show('upstream.dsn', dsn)} is not a valid PostgreSQL URL ({exc})"
                f"{sources.get('upstream.dsn', '')}",
                "upstream.dsn",
            ) from None


# --------------------------------------------------------------------------- redaction

_PASSWORD_PARAM = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s#]*)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """Hide the password of a URL or keyword DSN, even a malformed one; errs towards hiding more."""
    head, at, tail = dsn.rpartition("@")
    if at and "://" in head:
        scheme, _, userinfo = head.partition("://")
        user, colon, _ = userinfo.partition(":")
        dsn = f"{scheme}://{user}{':' + REDACTED if colon else ''}@{tail}"
    return _PASSWORD_PARAM.sub(lambda m: m.group(1) + REDACTED, dsn)


def redacted(settings: Settings) -> dict[str, dict[str, Any]]:
    """The effective settings as nested plain data, safe to log: no password or token survives."""
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(settings):
        section = getattr(settings, f.name)
        out[f.name] = {g.name: getattr(section, g.name) for g in dataclasses.fields(section)}
    if settings.upstream.dsn is not None:
        out["upstream"]["dsn"] = redact_dsn(settings.upstream.dsn)
    out["auth"]["users"] = [{"name": u.name, "password": REDACTED} for u in settings.auth.users]
    if settings.agent.admin_token is not None:
        out["agent"]["admin_token"] = REDACTED
    return out


# --------------------------------------------------------------------------- DSN

_DSN_SCHEMES = ("postgres", "postgresql")


@dataclass(frozen=True, slots=True)
class DsnParts:
    """A parsed ``postgres://`` URL. ``host`` starting with "/" is a unix socket directory."""

    host: str = "localhost"
    port: int = 5432
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def unix_socket(self) -> str | None:
        """Socket file path as libpq builds it, or None for TCP."""
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


def parse_dsn(dsn: str) -> DsnParts:
    """Parse a libpq-style URL; raise ValueError saying what is wrong (without the password).

    Handles percent-encoding, ``[::1]``, a percent-encoded socket directory as host, and the
    ``host``, ``port``, ``user``, ``password`` and ``dbname`` query parameters, which win over
    the URL parts as in libpq. Other query parameters land in ``params``.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if parts.scheme.lower() not in _DSN_SCHEMES:
        raise ValueError("expected a postgres:// or postgresql:// URL")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user) or None
        password = unquote(raw_password) if colon else None
    if "," in hostport:
        raise ValueError("multiple hosts are not supported")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in IPv6 host")
        host, rest = hostport[1:end], hostport[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("unexpected text after IPv6 host")
        port_text = rest[1:]
    else:
        raw_host, _, port_text = hostport.partition(":")
        host = unquote(raw_host)

    params: dict[str, str] = {}
    for pair in parts.query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            params[unquote(name)] = unquote(value)
    host = params.pop("host", "") or host or "localhost"
    port_text = params.pop("port", "") or port_text
    user = params.pop("user", "") or user
    password = params.pop("password", "") or password
    database = params.pop("dbname", "") or unquote(parts.path[1:]) or None

    port = 5432
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port {port_text!r} is not an integer from 1 to 65535")
        port = int(port_text)
    return DsnParts(host=host, port=port, user=user, password=password, database=database, params=params)
