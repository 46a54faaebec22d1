"""Unit tests for config.loader: precedence, conversion, validation, redaction, parse_dsn."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from config.loader import (
    _RULES,
    _SCHEMA,
    ConfigError,
    DsnParts,
    load_settings,
    parse_dsn,
    redact_dsn,
    redacted,
)
from config.settings import Settings, UserSettings

SIDECAR_YAML = Path(__file__).resolve().parents[2] / "config" / "sidecar.yaml"


@pytest.fixture
def write_yaml(tmp_path: Path) -> typing.Callable[[object], str]:
    def write(data: object) -> str:
        path = tmp_path / "sidecar.yaml"
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return str(path)

    return write


def load(**kwargs: typing.Any) -> Settings:
    kwargs.setdefault("env", {})
    return load_settings(**kwargs)


def error(**kwargs: typing.Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- defaults & file


def test_defaults() -> None:
    settings = load()
    assert settings == Settings()
    assert settings.pool.size == 20 and settings.pool.max_overflow == 40
    assert settings.upstream.dsn is None and settings.auth.users == ()


def test_sidecar_yaml_equals_defaults() -> None:
    assert load(path=str(SIDECAR_YAML)) == Settings()


def test_sidecar_yaml_documents_every_key() -> None:
    text = SIDECAR_YAML.read_text()
    data = yaml.safe_load(text)
    assert {s: set(body) for s, body in data.items()} == {s: set(keys) for s, (_, keys) in _SCHEMA.items()}
    for line in text.splitlines():
        if line.startswith("  ") and ":" in line:
            assert "#" in line, f"undocumented key: {line.strip()}"


def test_empty_file_gives_defaults(write_yaml: typing.Callable[[object], str]) -> None:
    assert load(path=write_yaml("")) == Settings()
    assert load(path=write_yaml({"pool": None})) == Settings()


def test_config_path_from_env(write_yaml: typing.Callable[[object], str]) -> None:
    path = write_yaml({"pool": {"size": 7}})
    assert load(env={"PGSIDECAR_CONFIG": path}).pool.size == 7


def test_explicit_path_beats_config_env(write_yaml: typing.Callable[[object], str], tmp_path: Path) -> None:
    path = write_yaml({"pool": {"size": 7}})
    assert load(path=path, env={"PGSIDECAR_CONFIG": str(tmp_path / "missing.yaml")}).pool.size == 7


def test_missing_file(tmp_path: Path) -> None:
    assert "cannot read config file" in error(path=str(tmp_path / "nope.yaml"))


def test_invalid_yaml(write_yaml: typing.Callable[[object], str]) -> None:
    message = error(path=write_yaml("pool:\n  size: [1\n"))
    assert "invalid YAML" in message


def test_top_level_must_be_mapping(write_yaml: typing.Callable[[object], str]) -> None:
    assert "top level must be a mapping" in error(path=write_yaml("- a\n- b\n"))


def test_section_must_be_mapping(write_yaml: typing.Callable[[object], str]) -> None:
    assert error(path=write_yaml({"pool": 5})).startswith("pool: 5 is not a mapping")


# --------------------------------------------------------------------------- precedence


def test_yaml_then_env_then_overrides(write_yaml: typing.Callable[[object], str]) -> None:
    path = write_yaml({"pool": {"size": 3, "max_overflow": 4, "checkout_timeout": 1.5}, "proxy": {"port": 7001}})
    env = {"PGSIDECAR_POOL__SIZE": "5", "PGSIDECAR_PROXY__PORT": "7002"}
    settings = load(path=path, env=env, overrides={"proxy.port": 7003})
    assert settings.pool.max_overflow == 4  # file only
    assert settings.pool.checkout_timeout == 1.5
    assert settings.pool.size == 5  # env beats file
    assert settings.proxy.port == 7003  # overrides beat env


def test_none_override_means_not_given() -> None:
    settings = load(env={"PGSIDECAR_PROXY__PORT": "7002"}, overrides={"proxy.port": None})
    assert settings.proxy.port == 7002


def test_env_section_with_underscore() -> None:
    settings = load(env={"PGSIDECAR_SLOW_QUERY__THRESHOLD_MS": "12.5", "PGSIDECAR_SLOW_QUERY__EXPLAIN": "yes"})
    assert settings.slow_query.threshold_ms == 12.5 and settings.slow_query.explain is True


def test_unrelated_env_ignored() -> None:
    env = {"PATH": "/bin", "PGSIDECAR_TEST_DSN": "postgres://x@y/z", "PGSIDECAR_CONFIG": ""}
    assert load(env=env) == Settings()


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSIDECAR_POOL__SIZE", "9")
    monkeypatch.delenv("PGSIDECAR_CONFIG", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert load_settings().pool.size == 9


@pytest.mark.parametrize(
    ("file_dsn", "database_url", "env_dsn", "override", "expected"),
    [
        ("postgres://f@h/db", None, None, None, "postgres://f@h/db"),
        ("postgres://f@h/db", "postgres://d@h/db", None, None, "postgres://d@h/db"),
        ("postgres://f@h/db", "postgres://d@h/db", "postgres://e@h/db", None, "postgres://e@h/db"),
        (None, "postgres://d@h/db", "postgres://e@h/db", "postgres://o@h/db", "postgres://o@h/db"),
        (None, "", None, None, None),
    ],
)
def test_dsn_precedence(
    write_yaml: typing.Callable[[object], str],
    file_dsn: str | None,
    database_url: str | None,
    env_dsn: str | None,
    override: str | None,
    expected: str | None,
) -> None:
    path = write_yaml({"upstream": {"dsn": file_dsn}})
    env = {}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if env_dsn is not None:
        env["PGSIDECAR_UPSTREAM__DSN"] = env_dsn
    assert load(path=path, env=env, overrides={"upstream.dsn": override}).upstream.dsn == expected


def test_database_url_only_sets_dsn() -> None:
    settings = load(env={"DATABASE_URL": "postgresql://u:pw@db:5433/app"})
    assert settings.upstream.dsn == "postgresql://u:pw@db:5433/app"
    assert dataclasses.replace(settings, upstream=Settings().upstream) == Settings()


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("YES", True), ("on", True), ("1", True),
     ("false", False), ("No", False), ("off", False), ("0", False)],
)
def test_bool_parsing(text: str, expected: bool) -> None:
    assert load(env={"PGSIDECAR_PROXY__USE_UVLOOP": text}).proxy.use_uvloop is expected


def test_bool_from_yaml(write_yaml: typing.Callable[[object], str]) -> None:
    assert load(path=write_yaml({"stats": {"enabled": False}})).stats.enabled is False
    assert load(path=write_yaml("stats:\n  enabled: off\n")).stats.enabled is False


def test_bad_bool() -> None:
    message = error(env={"PGSIDECAR_STATS__ENABLED": "maybe"})
    assert message.startswith("stats.enabled: 'maybe' is not a boolean (expected true/false")
    assert "PGSIDECAR_STATS__ENABLED" in message


def test_int_and_float_from_strings() -> None:
    settings = load(env={"PGSIDECAR_POOL__SIZE": " 5 ", "PGSIDECAR_POOL__CHECKOUT_TIMEOUT": "2"})
    assert settings.pool.size == 5
    assert settings.pool.checkout_timeout == 2.0 and isinstance(settings.pool.checkout_timeout, float)


def test_int_rejects_float_and_bool(write_yaml: typing.Callable[[object], str]) -> None:
    assert error(path=write_yaml({"pool": {"size": 2.5}})).startswith("pool.size: 2.5 is not an integer")
    assert error(path=write_yaml({"pool": {"size": True}})).startswith("pool.size: True is not an integer")


def test_float_rejects_nan() -> None:
    assert error(env={"PGSIDECAR_POOL__CHECKOUT_TIMEOUT": "nan"}).startswith(
        "pool.checkout_timeout: 'nan' is not a number (expected a number > 0)"
    )


@pytest.mark.parametrize("text", ["", "null"])
def test_optional_str_none(text: str) -> None:
    env = {"PGSIDECAR_EMBEDDED__DATA_DIR": text, "DATABASE_URL": "postgres://h/db", "PGSIDECAR_UPSTREAM__DSN": text}
    settings = load(env=env)
    assert settings.embedded.data_dir is None
    assert settings.upstream.dsn is None  # an empty PGSIDECAR_UPSTREAM__DSN clears DATABASE_URL


def test_str_accepts_yaml_int(write_yaml: typing.Callable[[object], str]) -> None:
    assert load(path=write_yaml({"agent": {"admin_token": 12345}})).agent.admin_token == "12345"


# --------------------------------------------------------------------------- users


def test_users_from_env() -> None:
    settings = load(env={"PGSIDECAR_AUTH__USERS": "alice:secret,bob:p:w2"})
    assert settings.auth.users == (UserSettings("alice", "secret"), UserSettings("bob", "p:w2"))


def test_users_from_yaml(write_yaml: typing.Callable[[object], str]) -> None:
    path = write_yaml({"auth": {"users": [{"name": "alice", "password": "secret"}]}})
    assert load(path=path).auth.users == (UserSettings("alice", "secret"),)


def test_users_from_override() -> None:
    users = (UserSettings("carol", "pw"),)
    assert load(overrides={"auth.users": users}).auth.users == users


def test_users_empty_env() -> None:
    assert load(env={"PGSIDECAR_AUTH__USERS": ""}).auth.users == ()


@pytest.mark.parametrize(
    ("users", "fragment"),
    [
        ("alice-hunter2", "entry 1 is not name:password"),
        ([{"name": "alice", "pasword": "hunter2"}], "unknown key 'pasword'"),
        ([{"name": "alice"}], "needs string 'name' and 'password'"),
        ([{"name": "", "password": "hunter2"}], "empty name"),
        ("a:hunter2,a:hunter2", "listed twice"),
        (5, "a list of users"),
    ],
)
def test_bad_users_never_echo_password(
    write_yaml: typing.Callable[[object], str], users: object, fragment: str
) -> None:
    message = error(path=write_yaml({"auth": {"users": users}}))
    assert message.startswith("auth.users: ") and fragment in message
    assert "hunter2" not in message


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("proxy.port", "70000", "70000 is out of range (expected an integer from 0 to 65535)"),
        ("agent.port", "-1", "-1 is out of range (expected an integer from 0 to 65535)"),
        ("pool.mode", "statement", "'statement' is not allowed (expected one of: transaction, session)"),
        ("auth.method", "password", "'password' is not allowed (expected one of: scram-sha-256, md5, trust)"),
        ("logging.level", "verbose", "'verbose' is not allowed (expected one of: debug, info, warning, error)"),
        ("logging.format", "xml", "'xml' is not allowed (expected one of: text, json)"),
        ("pool.size", "0", "0 is out of range (expected an integer >= 1)"),
        ("pool.size", "abc", "'abc' is not an integer (expected an integer >= 1)"),
        ("pool.max_overflow", "-1", "-1 is out of range (expected an integer >= 0)"),
        ("pool.checkout_timeout", "0", "0.0 is out of range (expected a number > 0)"),
        ("upstream.connect_timeout", "-5", "-5.0 is out of range (expected a number > 0)"),
        ("proxy.max_message_bytes", "1000", "1000 is out of range (expected an integer >= 1024)"),
        ("stats.max_fingerprints", "0", "0 is out of range (expected an integer >= 1)"),
        ("slow_query.threshold_ms", "-1", "-1.0 is out of range (expected a number >= 0)"),
        ("slow_query.ring_size", "0", "0 is out of range (expected an integer >= 1)"),
    ],
)
def test_validation_names_key_and_value(key: str, value: str, expected: str) -> None:
    section, _, name = key.partition(".")
    env_name = f"PGSIDECAR_{section.upper()}__{name.upper()}"
    message = error(env={env_name: value})
    assert message == f"{key}: {expected} [from {env_name}]"
    # the same message (with another source) for overrides
    assert error(overrides={key: value}).startswith(f"{key}: {expected}")


def test_zero_allowed_where_documented() -> None:
    settings = load(overrides={"proxy.port": 0, "pool.max_overflow": 0, "slow_query.threshold_ms": 0})
    assert settings.proxy.port == 0 and settings.pool.max_overflow == 0


def test_every_number_has_a_rule() -> None:
    numeric = {
        f"{section}.{key}"
        for section, (_, keys) in _SCHEMA.items()
        for key, tp in keys.items()
        if tp in (int, float)
    }
    assert numeric - set(_RULES) == set()


def test_tls_pair() -> None:
    assert error(overrides={"tls.cert": "/c.pem"}).startswith("tls.key: None while tls.cert is set")
    assert error(overrides={"tls.key": "/k.pem"}).startswith("tls.cert: None while tls.key is set")
    settings = load(overrides={"tls.cert": "/c.pem", "tls.key": "/k.pem"})
    assert (settings.tls.cert, settings.tls.key) == ("/c.pem", "/k.pem")


@pytest.mark.parametrize(
    "dsn", ["mysql://u:hunter2@h/db", "host=h password=hunter2", "postgres://u:hunter2@h:notaport/db"]
)
def test_bad_dsn_is_redacted(dsn: str) -> None:
    message = error(env={"DATABASE_URL": dsn})
    assert message.startswith("upstream.dsn: ") and "[from DATABASE_URL]" in message
    assert "hunter2" not in message


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_yaml(write_yaml: typing.Callable[[object], str]) -> None:
    message = error(path=write_yaml({"pool": {"sise": 5}}))
    assert message.startswith("pool.sise: unknown key (valid keys in pool: checkout_timeout, max_overflow,")


def test_unknown_section_in_yaml(write_yaml: typing.Callable[[object], str]) -> None:
    message = error(path=write_yaml({"pooling": {"size": 5}}))
    assert message.startswith("pooling: unknown section (valid sections: agent, auth, cache, embedded,")


def test_unknown_env_key() -> None:
    message = error(env={"PGSIDECAR_POOL__SIZ": "5"})
    assert message.startswith("pool.siz: unknown key (valid keys in pool:")
    assert message.endswith("[from PGSIDECAR_POOL__SIZ]")


def test_unknown_env_section() -> None:
    assert error(env={"PGSIDECAR_POOLS__SIZE": "5"}).startswith("pools: unknown section")


def test_unknown_override() -> None:
    assert error(overrides={"proxy.prot": 1}).startswith("proxy.prot: unknown key")
    assert "dotted" in error(overrides={"port": 1})


# --------------------------------------------------------------------------- redaction


def test_redacted_hides_every_secret() -> None:
    settings = load(
        env={
            "DATABASE_URL": "postgresql://app:hunter2@db:5432/app?sslmode=require&password=hunter3",
            "PGSIDECAR_AUTH__USERS": "alice:hunter4",
            "PGSIDECAR_AGENT__ADMIN_TOKEN": "hunter5",
        }
    )
    out = redacted(settings)
    text = json.dumps(out)
    for secret in ("hunter2", "hunter3", "hunter4", "hunter5"):
        assert secret not in text
    assert out["upstream"]["dsn"] == "postgresql://app:***@db:5432/app?sslmode=require&password=***"
    assert out["auth"]["users"] == [{"name": "alice", "password": "***"}]
    assert out["agent"]["admin_token"] == "***"
    assert out["pool"]["size"] == 20
    assert set(out) == set(_SCHEMA)


def test_redacted_defaults_keep_none() -> None:
    out = redacted(Settings())
    assert out["upstream"]["dsn"] is None and out["agent"]["admin_token"] is None and out["auth"]["users"] == []


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgres://u:p%40ss@h/db", "postgres://u:***@h/db"),
        ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("postgres://h/db", "postgres://h/db"),
        ("host=h password='a b' user=u", "host=h password=*** user=u"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_dsn_parts_repr_hides_password() -> None:
    assert "hunter2" not in repr(parse_dsn("postgres://u:hunter2@h/db"))


# --------------------------------------------------------------------------- parse_dsn


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgres://h", DsnParts(host="h")),
        ("postgresql://localhost/", DsnParts()),
        ("postgresql://u:pw@db.example:5433/app", DsnParts("db.example", 5433, "u", "pw", "app")),
        ("postgres://us%40er:p%3A%2Fw@h/my%20db", DsnParts("h", 5432, "us@er", "p:/w", "my db")),
        ("postgresql://u:pw@/db?host=/tmp/sock", DsnParts("/tmp/sock", 5432, "u", "pw", "db")),
        ("postgresql://%2Fvar%2Frun%2FPostgres:5433/db", DsnParts("/var/run/Postgres", 5433, None, None, "db")),
        ("postgresql://u@[::1]:5433/db", DsnParts("::1", 5433, "u", None, "db")),
        ("postgresql://[2001:db8::1]/db", DsnParts("2001:db8::1", 5432, None, None, "db")),
        (
            "postgresql://h/db?sslmode=require&application_name=a+b%20c&port=6000&user=x&dbname=other",
            DsnParts("h", 6000, "x", None, "other", {"sslmode": "require", "application_name": "a+b c"}),
        ),
        ("postgresql://u:@h/db", DsnParts("h", 5432, "u", "", "db")),
    ],
)
def test_parse_dsn(dsn: str, expected: DsnParts) -> None:
    parts = parse_dsn(dsn)
    assert parts == expected
    assert parts.password == expected.password


def test_unix_socket_path() -> None:
    assert parse_dsn("postgresql:///db?host=/tmp&port=5499").unix_socket == "/tmp/.s.PGSQL.5499"
    assert parse_dsn("postgresql://h/db").unix_socket is None


@pytest.mark.parametrize(
    ("dsn", "fragment"),
    [
        ("mysql://h/db", "postgres:// or postgresql://"),
        ("h:5432/db", "postgres:// or postgresql://"),
        ("postgres://h:abc/db", "port 'abc'"),
        ("postgres://h:70000/db", "port '70000'"),
        ("postgres://h1,h2/db", "multiple hosts"),
        ("postgres://[::1/db", "IPv6"),
    ],
)
def test_parse_dsn_errors(dsn: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_dsn(dsn)
    assert fragment in str(info.value)
