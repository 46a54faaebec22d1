"""proxy/_speedups.c and its Python twins: the relay's framing of both sides' reads and the memo
keys of statement texts. Each C function gives what its twin gives, on examples and on generated
input.

The test environment builds the extension (`pip install -e '.[test]'` with a C compiler and
Python's headers; `.ci/run` installs gcc): without it these tests fail rather than skip, since the
C code is what the proxy runs wherever it can be built."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import fingerprint, frames
from proxy.frames import answer_py, messages_py

try:
    from proxy import _speedups as speedups
except ImportError as exc:  # every test below that needs it fails with this
    speedups = None
    _MISSING = (f"proxy._speedups is not built ({exc}): install a C compiler and Python's headers, "
                "then `pip install -e '.[test]'` again")


def compiled(name: str):  # type: ignore[no-untyped-def]
    """The C function ``name`` of proxy._speedups; the test fails when the extension is missing."""
    if speedups is None:
        pytest.fail(_MISSING)
    return getattr(speedups, name)


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


ROW_DESCRIPTION = msg(b"T", b"\x00\x01abalance\x00" + b"\x00" * 6 + b"\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00")
READY = msg(b"Z", b"I")


def data_row(value: bytes) -> bytes:
    return msg(b"D", b"\x00\x01" + struct.pack("!I", len(value)) + value)


IMPLEMENTATIONS = [pytest.param(lambda: answer_py, id="python"), pytest.param(lambda: compiled("answer"), id="c")]
SPLITTERS = [pytest.param(lambda: messages_py, id="python"), pytest.param(lambda: compiled("messages"), id="c")]


def test_the_proxy_runs_the_compiled_functions() -> None:
    """Where the extension is built the proxy uses it, not the twins."""
    assert frames.answer is compiled("answer") and frames.messages is compiled("messages")
    assert fingerprint.shape_plain is compiled("shape_plain")
    assert fingerprint.shape_numbers is compiled("shape_numbers")
    assert fingerprint.shape_quoted is compiled("shape_quoted")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_select_answer_is_framed(implementation) -> None:  # type: ignore[no-untyped-def]
    answer = implementation()
    rows = data_row(b"1") + data_row(b"22") + data_row(b"")
    data = ROW_DESCRIPTION + rows + msg(b"C", b"SELECT 3\x00") + READY
    assert answer(data) == (3, b"SELECT 3")
    assert answer(msg(b"1") + msg(b"2") + msg(b"n") + READY) == (0, None)  # no CommandComplete
    assert answer(msg(b"C", b"\x00") + READY) == (0, b"")
    assert answer(msg(b"C") + READY) == (0, b"")  # an empty body: an empty tag, nothing read before it
    assert answer(bytearray(data)) == (3, b"SELECT 3")  # any buffer, not only bytes


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(ROW_DESCRIPTION, id="no ReadyForQuery"),
        pytest.param(msg(b"E", b"SERROR\x00C42P01\x00\x00") + READY, id="error"),
        pytest.param(msg(b"S", b"TimeZone\x00UTC\x00") + msg(b"C", b"SET\x00") + READY, id="parameter status"),
        pytest.param(msg(b"C", b"SELECT 1\x00") + msg(b"C", b"SELECT 1\x00") + READY, id="two statements"),
        pytest.param(READY + READY, id="two ReadyForQuery"),
        pytest.param(READY + ROW_DESCRIPTION, id="not ending with ReadyForQuery"),
        pytest.param(READY[:-1], id="last message cut"),
        pytest.param(READY + b"Z\x00\x00", id="a header cut"),
        pytest.param(b"D\x00\x00\x00\x02" + READY, id="length under 4"),
        pytest.param(b"D\xff\xff\xff\xff" + READY, id="length past the end"),
    ],
)
def test_reads_that_are_not_a_whole_uneventful_answer(implementation, data: bytes) -> None:  # type: ignore[no-untyped-def]
    assert implementation()(data) is None


_messages = st.tuples(
    st.sampled_from(b"TDCZESN12nAIst"),
    st.binary(max_size=12),
).map(lambda kb: msg(bytes([kb[0]]), kb[1]))


@settings(max_examples=600, deadline=None)
@given(
    parts=st.lists(_messages, max_size=8),
    cut=st.integers(min_value=0, max_value=200),
    junk=st.binary(max_size=6),
    corrupt=st.one_of(st.none(), st.tuples(st.integers(0, 200), st.integers(0, 255))),
)
def test_the_compiled_framing_agrees_with_the_python_twin(parts, cut, junk, corrupt) -> None:  # type: ignore[no-untyped-def]
    answer = compiled("answer")
    data = bytearray(b"".join(parts) + READY)
    data = data[: len(data) - cut % (len(data) + 1)] + junk if cut % 3 == 0 else data
    if corrupt is not None and data:
        data[corrupt[0] % len(data)] = corrupt[1]
    assert answer(bytes(data)) == answer_py(bytes(data))


# ----------------------------------------------------------------------------- a client's read

QUERY = msg(b"Q", b"select 1\x00")
SYNC = msg(b"S")


@pytest.mark.parametrize("implementation", SPLITTERS)
def test_a_read_is_split_into_its_whole_messages(implementation) -> None:  # type: ignore[no-untyped-def]
    messages = implementation()
    data = QUERY + SYNC + QUERY[:7]
    assert messages(data, 1 << 20) == ([(ord("Q"), 0, 14), (ord("S"), 14, 19)], 19, -1)
    assert messages(bytearray(data), 1 << 20) == messages(data, 1 << 20)  # the session's buffer
    assert messages(b"", 1 << 20) == ([], 0, -1)
    assert messages(QUERY[:4], 1 << 20) == ([], 0, -1)  # not even a header


@pytest.mark.parametrize("implementation", SPLITTERS)
def test_framing_stops_at_a_bad_length_and_names_it(implementation) -> None:  # type: ignore[no-untyped-def]
    messages = implementation()
    assert messages(SYNC + b"Q\x00\x00\x00\x03", 1 << 20) == ([(ord("S"), 0, 5)], 5, 3)
    too_long = b"Q" + struct.pack("!I", 1025) + b"x" * 10
    assert messages(SYNC + too_long, 1024) == ([(ord("S"), 0, 5)], 5, 1025)
    # At the limit is fine, even before the message has all arrived.
    assert messages(b"Q" + struct.pack("!I", 1024), 1024) == ([], 0, -1)
    assert messages(b"Q" + struct.pack("!I", 0xFFFFFFFF), 1 << 40) == ([], 0, -1)


@settings(max_examples=600, deadline=None)
@given(
    parts=st.lists(st.tuples(st.sampled_from(b"QPBEDSCHXFdcf"), st.binary(max_size=12))
                   .map(lambda kb: msg(bytes([kb[0]]), kb[1])), max_size=8),
    cut=st.integers(min_value=0, max_value=200),
    corrupt=st.one_of(st.none(), st.tuples(st.integers(0, 200), st.integers(0, 255))),
    max_message=st.sampled_from([4, 9, 16, 1 << 20]),
)
def test_the_compiled_splitting_agrees_with_the_python_twin(parts, cut, corrupt, max_message) -> None:  # type: ignore[no-untyped-def]
    messages = compiled("messages")
    data = bytearray(b"".join(parts))
    data = data[: len(data) - cut % (len(data) + 1)]
    if corrupt is not None and data:
        data[corrupt[0] % len(data)] = corrupt[1]
    assert messages(bytes(data), max_message) == messages_py(bytes(data), max_message)
    assert messages(data, max_message) == messages_py(data, max_message)


# ----------------------------------------------------------------------------- a text's shape

@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        (b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;", b"SELECT abalance FROM pgbench_accounts WHERE aid = ?;"),
        (b"select 1.5, 2e10, 3.25E+4, .5, 7.", b"select ?, ?, ?, .?, ?."),
        (b"x1 t2.c3 1x 1.5x 1.5e 1e5x 1.2.3 12,4", b"x1 t2.c3 1x ?.5x ?.5e 1e5x ?.? ?,?"),
        (b"WITH x12 AS (SELECT 1) SELECT * FROM x12", b"WITH x12 AS (SELECT ?) SELECT * FROM x12"),
        (b"in (1,2,3)\xc3\xa99 \xe99", b"in (?,?,?)\xc3\xa9? \xe9?"),  # a non-ASCII byte is no word byte
        (b"no numbers here", b"no numbers here"),
        (b"", b""),
        (b"where a = 'x' and b = 1", None),
        (b'select "col1" from t where 1', None),
        (b"select 1 -- comment", None),
        (b"select $1", None),
        (b"select 4/2", None),
        (b"select 0e-0", None),  # the '-' inside an exponent too
    ],
)
def test_a_plain_text_has_its_numbers_made_question_marks(sql: bytes, shape: bytes | None) -> None:
    assert fingerprint.shape_plain_py(sql) == shape
    assert compiled("shape_plain")(sql) == shape


@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        (b"UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 7;",
         b"UPDATE pgbench_accounts SET abalance = abalance + -? WHERE aid = ?;"),
        (b"select 4/2, 1e-5, a-1", b"select ?/?, ?, a-?"),
        (b"select 1 -- comment 2", None),
        (b"select 1 /* 2 */", None),
        (b"select 1e--5", None),
        (b"select '1'", None),
        (b"select $1", None),
        (b'select "c1"', None),
        (b"select 1 \\ 2", None),
    ],
)
def test_a_text_whose_literals_are_numbers_is_shaped_at_once(sql: bytes, shape: bytes | None) -> None:
    """text_shape's fast path: a lone '-' or '/' is an operator (the cache's plain texts still
    exclude them); comments, quotes, '$' and backslashes go to the regex path."""
    assert fingerprint.shape_numbers_py(sql) == shape
    assert compiled("shape_numbers")(sql) == shape
    assert fingerprint.text_shape(sql) == (shape if shape is not None else fingerprint._unplain_shape(sql))


@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        (b"SELECT * FROM jobs WHERE status = 'open' AND company_id = 12", b"SELECT * FROM jobs WHERE status = ? AND company_id = ?"),
        (b"select 'it''s', 'a', x.5, t1.c2, 1e-5, 'q'5", b"select ?, ?, x.5, t1.c2, ?, ??"),
        (b"select 'unterminated 12", b"select 'unterminated ?"),
        (b"select 'a''b", b"select ?'b"),  # where the regex backtracks to
        (b"select 4 - 'x'", b"select ? - ?"),
        (b"select 'x' -- c", None),
        (b"select 'x' /* c */", None),
        (b"select E'\\n'", None),
        (b"select $$x$$", None),
        (b'select "c" from t where a = \'x\'', None),
    ],
)
def test_a_text_with_quoted_strings_is_shaped_at_once(sql: bytes, shape: bytes | None) -> None:
    """_unplain_shape's fast path: strings and numbers made '?', as the regex does, for a text
    with no double quote, comment, '$' or backslash."""
    assert fingerprint.shape_quoted_py(sql) == shape
    assert compiled("shape_quoted")(sql) == shape
    if shape is not None:
        assert fingerprint.text_shape(sql) == shape


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"0", b"1", b"9", b"42", b".", b"e", b"E", b"+", b"x", b"_", b" ", b",", b"(",
                                 b")", b"a", b"\xc3", b"\xa9", b"\x00", b"-", b"'", b"$", b"/", b"\\", b'"',
                                 b"*", b"\n"]),
                max_size=24).map(b"".join))
def test_the_compiled_shapes_agree_with_the_regex(sql: bytes) -> None:
    assert compiled("shape_plain")(sql) == fingerprint.shape_plain_py(sql)
    assert compiled("shape_numbers")(sql) == fingerprint.shape_numbers_py(sql)
    assert compiled("shape_quoted")(sql) == fingerprint.shape_quoted_py(sql)
