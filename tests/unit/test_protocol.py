"""The wire codec and the session-state screen: pure functions, no sockets."""
from __future__ import annotations

import pytest

from proxy import protocol as pq
from proxy import client as client_module
from proxy.client import parse_options, parsed_state, session_state
from proxy.errors import ProxyError


def test_startup_packet_round_trip() -> None:
    raw = pq.startup_message({"user": "app", "database": "db", "application_name": "x"})
    msg = pq.parse_startup_packet(raw[4:])
    assert isinstance(msg, pq.StartupMessage)
    assert msg.protocol == pq.PROTOCOL_3_0
    assert msg.params == {"user": "app", "database": "db", "application_name": "x"}


def test_cancel_and_encryption_requests() -> None:
    raw = pq.cancel_request(1234, -5)
    msg = pq.parse_startup_packet(raw[4:])
    assert msg == pq.CancelRequest(1234, -5)
    assert pq.parse_startup_packet(pq.INT32.pack(pq.SSL_REQUEST)) == pq.EncryptionRequest(pq.SSL_REQUEST)
    assert pq.parse_startup_packet(pq.INT32.pack(pq.GSSENC_REQUEST)) == pq.EncryptionRequest(pq.GSSENC_REQUEST)


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00",  # too short
        pq.INT32.pack(pq.PROTOCOL_3_0) + b"user\x00app",  # not NUL-terminated
        pq.INT32.pack(pq.PROTOCOL_3_0) + b"user\x00\x00",  # key without value
        pq.INT32.pack(pq.CANCEL_REQUEST) + b"\x00" * 4,  # cancel too short
        pq.INT32.pack(pq.PROTOCOL_3_0) + b"us\xffer\x00x\x00\x00",  # not UTF-8
    ],
)
def test_bad_startup_packets_are_protocol_violations(packet: bytes) -> None:
    with pytest.raises(pq.ProtocolViolation):
        pq.parse_startup_packet(packet)


def test_error_response_carries_sqlstate_and_detail() -> None:
    err = ProxyError.checkout_timeout("db/app", 5000, 20, 40)
    raw = pq.error_response(err)
    assert raw[:1] == b"E"
    assert pq.UINT32.unpack_from(raw, 1)[0] == len(raw) - 1
    fields = pq.error_fields(raw[5:])
    assert fields["C"] == "53300"
    assert fields["S"] == "ERROR"
    assert "pool.size=20" in fields["D"] and "pool.max_overflow=40" in fields["D"]


def test_fatal_errors_say_fatal() -> None:
    fields = pq.error_fields(pq.error_response(ProxyError.message_too_large(10, 5))[5:])
    assert fields["S"] == "FATAL" and fields["C"] == "08P01"
    assert "proxy.max_message_bytes=5" in fields["D"]


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (b"SELECT 1", None),
        (b"UPDATE t SET a = 1", None),
        (b"SET LOCAL statement_timeout = 5", None),
        (b"SET application_name = 'x'", None),
        (b"set TimeZone to 'UTC'", None),
        (b"SET TIME ZONE 'UTC'", None),
        (b"RESET ALL", None),
        (b"select pg_advisory_xact_lock(1)", None),
        (b"SET search_path = app", "set"),
        (b"/* hint */ SET statement_timeout = 5", "set"),
        (b"BEGIN; SET work_mem = '1MB'", "set"),
        (b"SET SESSION AUTHORIZATION bob", "set"),
        (b"LISTEN jobs", "listen"),
        (b"CREATE TEMP TABLE x (a int)", "temp_table"),
        (b"create temporary table x (a int)", "temp_table"),
        (b"SELECT pg_advisory_lock(42)", "advisory_lock"),
        (b"select pg_try_advisory_lock_shared(42)", "advisory_lock"),
        (b"PREPARE p AS SELECT 1", "prepare"),
        (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", "with_hold_cursor"),
        (b"SELECT set_config('search_path', 'x', false)", "set_config"),
    ],
)
def test_session_state_pins_what_cannot_move(sql: bytes, reason: str | None) -> None:
    assert session_state(sql)[0] == reason
    # A Parse's text gets the same answer from the memo, the first time and the next.
    assert parsed_state(sql) == session_state(sql)
    assert parsed_state(sql) == session_state(sql)


def test_parsed_state_memo_is_bounded() -> None:
    for i in range(client_module._STATE_MEMO + 1000):  # noqa: SLF001
        assert parsed_state(b"SELECT $1 + %d" % i) == (None, False)
    assert len(client_module._state_memo) <= client_module._STATE_MEMO  # noqa: SLF001
    assert parsed_state(b"LISTEN x") == ("listen", False)


def test_query_texts_differing_only_in_digits_share_a_memo_entry_and_answer_alike() -> None:
    client_module._query_memo.clear()  # noqa: SLF001
    texts = [
        b"SELECT abalance FROM pgbench_accounts WHERE aid = %d",
        b"SET search_path = s%d",
        b"SET application_name = 'app%d'",
        b"SELECT pg_advisory_lock(%d)",
        b"select pg_advisory_xact_lock(%d)",
        b"LISTEN ch%d",
        b"PREPARE p%d AS SELECT 1",
        b"DEALLOCATE p%d",
        b"UPDATE t SET a = %d",
    ]
    for text in texts:
        for value in (10, 27, 93, 58):  # as many digits each: one key
            sql = text % value
            assert session_state(sql) == parsed_state(sql), sql
    # One entry per text, whatever its (two-digit) numbers.
    assert len(client_module._query_memo) == len(texts)  # noqa: SLF001


def test_query_memo_is_bounded_and_skips_long_texts() -> None:
    client_module._query_memo.clear()  # noqa: SLF001
    for i in range(client_module._QUERY_MEMO + 100):  # noqa: SLF001
        name = "".join("abcdefghij"[int(d)] for d in str(i))  # distinct keys (digits all read 0)
        assert session_state(b"SELECT %s FROM t" % name.encode()) == (None, False)
    assert len(client_module._query_memo) <= client_module._QUERY_MEMO  # noqa: SLF001
    long = b"SET search_path = x /* " + b"." * client_module._QUERY_MEMO_TEXT + b" */"  # noqa: SLF001
    client_module._query_memo.clear()  # noqa: SLF001
    assert session_state(long) == ("set", False)
    assert not client_module._query_memo  # noqa: SLF001


def test_deallocate_and_discard_drop_prepared_statements() -> None:
    assert session_state(b"DEALLOCATE ALL")[1] is True
    assert session_state(b"DISCARD ALL")[1] is True
    assert session_state(b"SELECT 1")[1] is False


def test_startup_options() -> None:
    assert parse_options("-c search_path=app -c statement_timeout=5s") == {
        "search_path": "app",
        "statement_timeout": "5s",
    }
    assert parse_options("--work-mem=4MB") == {"work_mem": "4MB"}
    assert parse_options(r"-c application_name=a\ b") == {"application_name": "a b"}
    with pytest.raises(ProxyError) as info:
        parse_options("bogus")
    assert info.value.fatal
