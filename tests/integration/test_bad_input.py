"""Bad bytes from clients, seen on the wire: every broken startup or message gets one FATAL
ErrorResponse with the right SQLSTATE and the connection closes; the proxy forgets the client,
keeps serving others and does not grow. Also the TLS and GSS negotiation answers, and TLS itself.
"""
from __future__ import annotations

import gc
import random
import socket
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import psycopg
import pytest

from config.settings import UserSettings
from tests.helpers.servers import TEST_DATABASE
from tests.helpers.wire import (
    PROTOCOL_3_0,
    RawClient,
    gssenc_request,
    message,
    query,
    ssl_request,
    startup_packet,
    wait_until,
)

MIB = 1024 * 1024
GOOD_STARTUP = {"user": "postgres", "database": TEST_DATABASE}


def _fatal(port: int, data: bytes) -> dict[str, str]:
    """Send ``data`` on a fresh connection; the proxy must answer FATAL and close."""
    with RawClient(port) as raw:
        raw.send(data)
        return raw.expect_fatal()


def _settled(proxy: Any) -> None:
    """Every session the proxy had is gone, logged in or not."""
    wait_until(
        lambda: proxy.run(lambda: (len(proxy.server.sessions), len(proxy.server.pending_sessions))) == (0, 0),
        timeout=10,
        message="proxy.server.sessions and pending_sessions to be empty",
    )


def _good_client_works(proxy: Any) -> None:
    with psycopg.connect(**proxy.kwargs(), connect_timeout=10) as conn:
        assert conn.execute("select 'fine'").fetchone() == ("fine",)


# ----------------------------------------------------------------------------- startup packets

BAD_STARTUPS = [
    # id, bytes, SQLSTATE, message
    ("length_huge", b"\x7f\xff\xff\xff" + b"x" * 16, "08P01", "invalid length of startup packet"),
    ("length_over_max_startup_bytes", struct.pack("!I", 20000) + b"\x00" * 16, "08P01",
     "invalid length of startup packet"),
    ("length_4", struct.pack("!I", 4) + b"\x00" * 8, "08P01", "invalid length of startup packet"),
    ("length_7", struct.pack("!I", 7) + b"\x00" * 8, "08P01", "invalid length of startup packet"),
    ("password_before_startup", message(b"p", b"secret\x00"), "08P01", "invalid length of startup packet"),
    ("not_nul_terminated", struct.pack("!II", 8 + 13, PROTOCOL_3_0) + b"user\x00postgres", "08P01", None),
    ("parameter_without_value", struct.pack("!II", 8 + 6, PROTOCOL_3_0) + b"user\x00\x00", "08P01", None),
    ("protocol_2_0", startup_packet(GOOD_STARTUP, 2 << 16), "0A000",
     "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"),
    ("protocol_4_0", startup_packet(GOOD_STARTUP, 4 << 16), "0A000",
     "unsupported frontend protocol 4.0: server supports 3.0 to 3.0"),
    ("no_user", startup_packet({"database": TEST_DATABASE}), "28000",
     "no PostgreSQL user name specified in startup packet"),
]


@pytest.mark.parametrize(("data", "sqlstate", "text"), [c[1:] for c in BAD_STARTUPS], ids=[c[0] for c in BAD_STARTUPS])
def test_bad_startup_packet_is_fatal_and_closes(proxy_factory, data, sqlstate, text) -> None:
    proxy = proxy_factory()
    fields = _fatal(proxy.port, data)
    assert fields["C"] == sqlstate, fields
    if text is not None:
        assert fields["M"] == text
    _good_client_works(proxy)
    _settled(proxy)


def test_startup_over_max_startup_bytes_names_the_setting(proxy_factory) -> None:
    proxy = proxy_factory()
    fields = _fatal(proxy.port, struct.pack("!I", 20000) + b"\x00" * 16)
    assert "proxy.max_startup_bytes=10000" in fields.get("D", "")


def test_random_startup_packets_are_fatal(proxy_factory) -> None:
    proxy = proxy_factory()
    rng = random.Random(20240611)
    for _ in range(60):
        length = rng.randint(8, 2000)
        body = bytes(rng.getrandbits(8) for _ in range(length - 4))
        if body[:4] in (struct.pack("!I", c) for c in (80877102, 80877103, 80877104)):
            continue
        fields = _fatal(proxy.port, struct.pack("!I", length) + body)
        assert fields["C"] in ("08P01", "0A000"), fields
    _good_client_works(proxy)
    _settled(proxy)


def _negotiation(port: int, host: str = "127.0.0.1") -> list[Any]:
    """Startup with protocol 3.99 and an unknown _pq_ option; messages up to ReadyForQuery."""
    with RawClient(port, host) as raw:
        raw.send(startup_packet({**GOOD_STARTUP, "_pq_.pgsc_test": "on"}, (3 << 16) | 99))
        messages = raw.read_until(b"Z")
        assert RawClient.rows(raw.simple_query("select 7")) == [("7",)]
    return messages


def test_protocol_3_99_is_negotiated_down_like_postgresql(proxy_factory, pg_server) -> None:
    # PostgreSQL sends NegotiateProtocolVersion with the full version it falls back to
    # (3 << 16 | 0, which libpq reads as major.minor) and the options it did not recognise,
    # then carries on with authentication.
    expected = struct.pack("!ii", 3 << 16, 1) + b"_pq_.pgsc_test\x00"
    if not pg_server.host.startswith("/"):
        direct_first = _negotiation(pg_server.port, pg_server.host)[0]
        assert (direct_first.kind, direct_first.body) == (b"v", expected)
    proxy = proxy_factory()
    messages = _negotiation(proxy.port)
    assert [m.kind for m in messages].count(b"v") == 1
    assert messages[1].kind == b"R" and messages[1].body == struct.pack("!i", 0)
    assert (messages[0].kind, messages[0].body) == (b"v", expected)


def test_libpq_asking_for_protocol_3_2_is_served_with_3_0(proxy_factory) -> None:
    # libpq 18 is the first to ask for 3.2; the test extras require psycopg-binary >= 3.3.9, which bundles it.
    assert psycopg.pq.version() >= 180000, f"libpq {psycopg.pq.version()} cannot ask for protocol 3.2"
    proxy = proxy_factory()
    with psycopg.connect(**proxy.kwargs(max_protocol_version="3.2", sslmode="disable"), connect_timeout=10) as conn:
        assert conn.pgconn.protocol_version == 3
        assert conn.execute("select 'negotiated'").fetchone() == ("negotiated",)
    _settled(proxy)


def test_ssl_and_gss_requests_are_answered_N_without_tls(proxy_factory) -> None:
    proxy = proxy_factory()
    with RawClient(proxy.port) as raw:
        raw.send(gssenc_request())
        assert raw.recv_exact(1) == b"N"
        raw.send(ssl_request())
        assert raw.recv_exact(1) == b"N"
        raw.login("postgres", TEST_DATABASE)
        assert RawClient.rows(raw.simple_query("select 1 + 1")) == [("2",)]
    with RawClient(proxy.port) as raw:
        raw.send(ssl_request())
        assert raw.recv_exact(1) == b"N"
        raw.login("postgres", TEST_DATABASE)
        assert RawClient.rows(raw.simple_query("select current_user")) == [("postgres",)]
    _settled(proxy)


# ----------------------------------------------------------------------------- after login


def _logged_in(proxy: Any, timeout: float = 5.0) -> RawClient:
    raw = RawClient(proxy.port, timeout=timeout)
    raw.login("postgres", TEST_DATABASE)
    return raw


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in_transaction"])
def test_message_over_max_message_bytes_is_fatal_08P01(proxy_factory, direct, in_transaction) -> None:
    proxy = proxy_factory(proxy__max_message_bytes=MIB, pool__size=1, pool__max_overflow=0)
    d = direct()
    raw = _logged_in(proxy)
    backend = None
    if in_transaction:
        assert raw.simple_query("begin")[-1].body == b"T"
        backend = int(RawClient.rows(raw.simple_query("select pg_backend_pid()"))[0][0])
    raw.send(b"Q" + struct.pack("!I", 2 * MIB) + b"select 1")  # header announces 2 MiB
    fields = raw.expect_fatal()
    raw.close()
    assert fields["C"] == "08P01"
    assert fields["M"] == "message too large"
    assert f"proxy.max_message_bytes={MIB}" in fields["D"]
    assert str(2 * MIB) in fields["D"]
    if backend is not None:  # the abandoned transaction was rolled back on the server
        wait_until(lambda: (d.execute("select state from pg_stat_activity where pid = %s", (backend,)).fetchone()
                            or ("gone",))[0] in ("idle", "gone"), timeout=5, message="rollback")
    _good_client_works(proxy)
    _settled(proxy)


def test_message_just_under_max_message_bytes_is_served(proxy_factory) -> None:
    proxy = proxy_factory(proxy__max_message_bytes=MIB)
    with _logged_in(proxy) as raw:
        big = "x" * (MIB - 100)
        assert RawClient.rows(raw.simple_query(f"select length('{big}')")) == [(str(MIB - 100),)]


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in_transaction"])
@pytest.mark.parametrize("kind", [b"?", b"p", b"\x00"], ids=["question_mark", "password", "nul"])
def test_invalid_frontend_message_type_is_fatal_08P01(proxy_factory, kind, in_transaction) -> None:
    proxy = proxy_factory()
    raw = _logged_in(proxy)
    if in_transaction:
        assert raw.simple_query("begin")[-1].body == b"T"
    raw.send(message(kind, b"abc\x00"))
    fields = raw.expect_fatal()
    raw.close()
    assert fields["C"] == "08P01"
    assert fields["M"] == f"invalid frontend message type {kind[0]}"
    _good_client_works(proxy)
    _settled(proxy)


MALFORMED = [
    ("parse_without_nul", message(b"P", b"noterminator")),
    ("parse_without_query_nul", message(b"P", b"stmt\x00select 1")),
    ("bind_without_nul", message(b"B", b"abc")),
]


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in_transaction"])
@pytest.mark.parametrize("data", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_extended_message_is_fatal_08P01(proxy_factory, data, in_transaction) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0)
    raw = _logged_in(proxy, timeout=2)
    if in_transaction:
        assert raw.simple_query("begin")[-1].body == b"T"
    raw.send(data + message(b"S"))
    fields = raw.expect_fatal()  # socket.timeout when the proxy never answers
    raw.close()
    assert (fields["C"], fields["M"]) == ("08P01", "invalid message format")
    _good_client_works(proxy)
    _settled(proxy)
    assert proxy.snapshot().pools[0].active == 0


def test_message_length_below_4_is_fatal_08P01(proxy_factory) -> None:
    proxy = proxy_factory()
    with _logged_in(proxy) as raw:
        raw.send(b"Q" + struct.pack("!I", 3))
        assert raw.expect_fatal()["C"] == "08P01"
    _settled(proxy)


# ----------------------------------------------------------------------------- slow and silent clients


@pytest.mark.parametrize("sends", [b"", startup_packet(GOOD_STARTUP)[:7]], ids=["nothing", "half_a_startup"])
def test_silent_client_is_closed_after_the_login_timeout(proxy_factory, sends) -> None:
    proxy = proxy_factory(proxy__client_login_timeout=0.3)
    with RawClient(proxy.port, timeout=5) as raw:
        raw.send(sends)
        messages = raw.read_to_eof()  # socket.timeout (test failure) if the proxy never closes
    assert raw.eof
    assert [m.kind for m in messages] in ([], [b"E"])
    if messages:
        assert messages[0].fields["S"] == "FATAL" and messages[0].fields["C"] == "08P01"
        assert "proxy.client_login_timeout=0.3" in messages[0].fields.get("D", "")
    _settled(proxy)


def test_client_stalling_in_scram_is_closed_after_the_login_timeout(proxy_factory) -> None:
    proxy = proxy_factory(proxy__client_login_timeout=0.3, auth__users=(UserSettings("postgres", "pw"),))
    with RawClient(proxy.port, timeout=5) as raw:
        raw.send(startup_packet(GOOD_STARTUP))
        first = raw.read_message()
        assert first is not None and first.kind == b"R" and struct.unpack("!i", first.body[:4])[0] == 10
        fields = raw.expect_fatal()
    assert fields["C"] == "08P01"
    _settled(proxy)


@pytest.mark.parametrize(
    "data",
    [query("select 1"), b"p" + struct.pack("!I", 50000), message(b"X")],
    ids=["query", "huge_length", "terminate"],
)
def test_non_password_message_during_authentication_is_fatal(proxy_factory, data) -> None:
    proxy = proxy_factory(auth__users=(UserSettings("postgres", "pw"),))
    with RawClient(proxy.port) as raw:
        raw.send(startup_packet(GOOD_STARTUP))
        first = raw.read_message()
        assert first is not None and first.kind == b"R"
        raw.send(data)
        fields = raw.expect_fatal()
    assert fields["C"] == "08P01", fields
    _settled(proxy)


@pytest.mark.parametrize(
    "response",
    [
        b"SCRAM-SHA-256\x00" + struct.pack("!i", 5) + b"junk!",
        b"SCRAM-SHA-256\x00" + struct.pack("!i", 9999) + b"short",
        b"NOT-A-MECHANISM\x00" + struct.pack("!i", 4) + b"n,,x",
        b"\xff\xfe\x00",
        b"",
    ],
    ids=["junk_client_first", "bad_length", "unknown_mechanism", "binary", "empty"],
)
def test_garbage_sasl_response_is_fatal(proxy_factory, response) -> None:
    proxy = proxy_factory(auth__users=(UserSettings("postgres", "pw"),))
    with RawClient(proxy.port) as raw:
        raw.send(startup_packet(GOOD_STARTUP))
        first = raw.read_message()
        assert first is not None and first.kind == b"R"
        raw.send(message(b"p", response))
        fields = raw.expect_fatal()
    assert fields["C"] in ("28P01", "08P01"), fields
    _settled(proxy)


# ----------------------------------------------------------------------------- many bad clients


def _bad_connection(port: int, n: int) -> None:
    """One misbehaving client of kind ``n % 9``; returns once the proxy has closed it (or
    right after the client itself went away abruptly)."""
    kind = n % 9
    raw = RawClient(port, timeout=5)
    try:
        if kind == 0:
            raw.send(b"\x7f\xff\xff\xff" + b"garbage")
        elif kind == 1:
            raw.send(struct.pack("!I", 4))
        elif kind == 2:
            raw.send(startup_packet(GOOD_STARTUP, 2 << 16))
        elif kind == 3:
            raw.send(ssl_request())
            assert raw.recv_exact(1) == b"N"
            raw.kill()
            return
        elif kind == 4:
            raw.kill()  # connect, then vanish
            return
        elif kind == 5:
            raw.send(startup_packet(GOOD_STARTUP)[:10])
            raw.kill()
            return
        elif kind == 6:
            raw.login("postgres", TEST_DATABASE)
            raw.send(message(b"?"))
        elif kind == 7:
            raw.login("postgres", TEST_DATABASE)
            raw.send(b"Q" + struct.pack("!I", 2 * MIB))
        else:
            raw.login("postgres", TEST_DATABASE)
            raw.send(query("begin; select 1"))
            raw.kill()
            return
        raw.expect_fatal()
    finally:
        raw.close()


def test_hundreds_of_bad_connections_leave_nothing_behind(proxy_factory) -> None:
    proxy = proxy_factory(proxy__max_message_bytes=MIB, pool__size=2, pool__max_overflow=0, pool__checkout_timeout=5)
    for n in range(360):
        _bad_connection(proxy.port, n)
    _good_client_works(proxy)
    _settled(proxy)
    snap = proxy.snapshot()
    assert snap.clients.accepted >= 361
    pool = snap.pools[0]
    assert pool.active == 0 and pool.idle + pool.connecting <= 2
    assert snap.clients.total == 0


def test_memory_stays_bounded_over_2000_bad_connections(proxy_factory) -> None:
    proxy = proxy_factory(proxy__max_message_bytes=MIB, pool__size=2, pool__max_overflow=0, pool__checkout_timeout=5)
    process = psutil.Process()
    for n in range(300):  # warm-up: caches, pools, allocator arenas
        _bad_connection(proxy.port, n)
    _settled(proxy)
    gc.collect()
    before = process.memory_info().rss
    for n in range(2000):
        _bad_connection(proxy.port, n)
    _settled(proxy)
    gc.collect()
    grown = process.memory_info().rss - before
    assert grown < 50 * MIB, f"RSS grew by {grown / MIB:.1f} MiB over 2000 bad connections"
    _good_client_works(proxy)


# ----------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return str(cert), str(key)


def test_tls_sslmode_require_and_disable(proxy_factory, tls_files) -> None:
    cert, key = tls_files
    proxy = proxy_factory(tls__cert=cert, tls__key=key)
    with psycopg.connect(**proxy.kwargs(sslmode="require"), connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 'over tls'").fetchone() == ("over tls",)
    with psycopg.connect(**proxy.kwargs(sslmode="verify-full", sslrootcert=cert), connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use  # the proxy serves the configured certificate
        assert conn.execute("select 1").fetchone() == (1,)
    with psycopg.connect(**proxy.kwargs(sslmode="disable"), connect_timeout=10) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 'plain'").fetchone() == ("plain",)
    _settled(proxy)


async def test_tls_with_asyncpg(proxy_factory, tls_files) -> None:
    cert, key = tls_files
    proxy = proxy_factory(tls__cert=cert, tls__key=key)
    ctx = ssl.create_default_context(cafile=cert)
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database=TEST_DATABASE,
                                 ssl=ctx, timeout=10)
    try:
        assert await conn.fetchval("select $1::text", "secure") == "secure"
        assert conn._transport.get_extra_info("sslcontext") is not None  # noqa: SLF001
    finally:
        await conn.close()


def test_tls_request_is_answered_S(proxy_factory, tls_files) -> None:
    cert, key = tls_files
    proxy = proxy_factory(tls__cert=cert, tls__key=key)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(ssl_request())
        assert sock.recv(1) == b"S"
        ctx = ssl.create_default_context(cafile=cert)
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(startup_packet(GOOD_STARTUP))
            head = tls.recv(9)
            assert head[:1] == b"R" and struct.unpack("!i", head[5:9])[0] == 0


def test_plaintext_piggybacked_on_ssl_request_is_refused(proxy_factory, tls_files) -> None:
    """CVE-2021-23214: bytes sent after SSLRequest before the handshake must not be trusted."""
    cert, key = tls_files
    proxy = proxy_factory(tls__cert=cert, tls__key=key)
    with RawClient(proxy.port) as raw:
        raw.send(ssl_request() + startup_packet(GOOD_STARTUP))
        fields = raw.expect_fatal()
    assert fields["C"] == "08P01"
    assert fields["M"] == "received unencrypted data after SSL request"
    _settled(proxy)
