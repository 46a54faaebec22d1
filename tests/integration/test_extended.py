"""Extended query protocol edge cases, spoken byte by byte (what drivers do in pipelines).

PostgreSQL's rules the proxy must mirror: after an error in extended protocol the server
ignores every message until the client's Sync; a CancelRequest for a statement that never
started still answers it with 57014.
"""
from __future__ import annotations

import socket
from typing import Any

import psycopg

from tests.helpers.servers import TEST_DATABASE
from tests.helpers.wire import RawClient, cancel_request, message, query, wait_until


def _parse(name: bytes, sql: bytes) -> bytes:
    return message(b"P", name + b"\0" + sql + b"\0" + b"\0\0")


def _bind(statement: bytes) -> bytes:
    # unnamed portal, no parameter formats, no parameters, no result formats
    return message(b"B", b"\0" + statement + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")


def _execute() -> bytes:
    return message(b"E", b"\0" + b"\0\0\0\0")


SYNC = message(b"S")
FLUSH = message(b"H")


def _pool(proxy: Any) -> Any:
    snap = proxy.snapshot()
    assert len(snap.pools) == 1
    return snap.pools[0]


def _kinds(messages: list[Any]) -> bytes:
    return b"".join(m.kind for m in messages)


def test_messages_after_an_error_are_ignored_until_sync(proxy_factory) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0)
    with RawClient(proxy.port) as raw:
        raw.login("postgres", TEST_DATABASE)
        raw.send(_parse(b"", b"select 1/0") + _bind(b"") + _execute() + FLUSH)
        err = raw.read_until(b"E")  # 1/0 is folded when planning: the Bind fails
        assert _kinds(err) == b"1E" and err[-1].fields["C"] == "22012"
        # The server now ignores everything up to Sync, including a named Parse: no responses,
        # and the statement must not exist afterwards.
        raw.send(_parse(b"later", b"select 2") + _bind(b"later") + _execute() + FLUSH)
        raw.send(query("select 3") + SYNC)
        reply = raw.read_until(b"Z")
        assert _kinds(reply) == b"Z", reply
        assert _pool(proxy).active == 0  # nothing left outstanding: the server went back
        raw.send(_bind(b"later") + _execute() + SYNC)
        reply = raw.read_until(b"Z")
        assert _kinds(reply) == b"EZ" and reply[0].fields["C"] == "26000", reply
        assert raw.rows(raw.simple_query("select 'usable'")) == [("usable",)]
        raw.send(_parse(b"later", b"select 2") + _bind(b"later") + _execute() + SYNC)
        assert raw.rows(raw.read_until(b"Z")) == [("2",)]


def test_named_statement_after_error_and_sync_in_one_batch(proxy_factory) -> None:
    """Sync already sent when the error arrives: what follows it is a new segment."""
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0)
    with RawClient(proxy.port) as raw:
        raw.login("postgres", TEST_DATABASE)
        raw.send(_parse(b"x", b"select 'x'") + SYNC)
        assert _kinds(raw.read_until(b"Z")) == b"1Z"
        raw.send(
            _parse(b"", b"select 1/0") + _bind(b"") + _execute() + SYNC
            + _parse(b"y", b"select 'x'") + _bind(b"y") + _execute() + _bind(b"x") + _execute() + SYNC
        )
        first = raw.read_until(b"Z")
        assert _kinds(first) == b"1EZ" and first[1].fields["C"] == "22012"
        second = raw.read_until(b"Z")
        assert _kinds(second) == b"12DC2DCZ", second
        assert raw.rows(second) == [("x",), ("x",)]


def test_cancel_of_a_queued_statement_answers_57014_and_it_never_runs(proxy_factory, direct) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=30.0)
    holder = psycopg.connect(**proxy.kwargs())
    holder.execute("select 1")  # holds the only server connection in its transaction
    d = direct()
    try:
        with RawClient(proxy.port) as raw:
            raw.login("postgres", TEST_DATABASE)
            raw.send(query("create table never_ran_57014 (id int)") + query("select 'after'"))
            wait_until(lambda: _pool(proxy).waiting == 1, timeout=5, message="the statement to queue")
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(cancel_request(raw.backend_pid, raw.backend_secret))
                assert s.recv(1) == b""  # the proxy closes the cancel connection
            reply = raw.read_until(b"Z")
            assert _kinds(reply) == b"EZ", reply
            assert reply[0].fields["C"] == "57014"
            assert reply[0].fields["S"] == "ERROR"
            # The statement after it still waits its turn and runs once a server is free.
            wait_until(lambda: _pool(proxy).waiting == 1, timeout=5, message="the next statement to queue")
            holder.commit()
            assert raw.rows(raw.read_until(b"Z")) == [("after",)]
        assert d.execute("select to_regclass('never_ran_57014')").fetchone() == (None,)
    finally:
        holder.close()


def test_cancel_with_a_wrong_secret_does_nothing(proxy_factory) -> None:
    proxy = proxy_factory(pool__size=1, pool__max_overflow=0, pool__checkout_timeout=30.0)
    holder = psycopg.connect(**proxy.kwargs())
    holder.execute("select 1")
    try:
        with RawClient(proxy.port) as raw:
            raw.login("postgres", TEST_DATABASE)
            raw.send(query("select 'waited'"))
            wait_until(lambda: _pool(proxy).waiting == 1, timeout=5, message="the statement to queue")
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(cancel_request(raw.backend_pid, raw.backend_secret ^ 1))
                assert s.recv(1) == b""
            assert _pool(proxy).waiting == 1
            holder.commit()
            assert raw.rows(raw.read_until(b"Z")) == [("waited",)]
    finally:
        holder.close()
