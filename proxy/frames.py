"""The relay's framing of the reads of both sides, compiled when it can be.

``messages(buf, max_message)`` frames a client's read into its whole messages, for the relay's
loop over them (``ClientSession._forward``). ``answer(data)`` frames the backend messages of
one read from a server connection and says whether it is a whole, uneventful answer that goes
to the client as it came (the relay's fast path, ``ServerConnection._complete``). These are
the loops Python runs most in the proxy: for ``pgbench -S`` they were about a sixth to a quarter
of the bytecodes of a transaction. ``proxy/_speedups.c`` holds the same functions in C, built by
``setup.py`` when a C compiler is there; ``answer_py`` and ``messages_py`` below are the
reference and the fallback, and ``tests/unit/test_frames.py`` holds both to the same results.
"""
from __future__ import annotations

from .protocol import UINT32

_D, _E, _S, _Z, _C = b"DESZC"


def answer_py(data: bytes | bytearray) -> tuple[int, bytes | None] | None:
    """``(data_rows, tag)`` when ``data`` holds only whole messages, each of length >= 4, ending
    with the only ReadyForQuery in it, with no ErrorResponse, no ParameterStatus and at most one
    CommandComplete; ``tag`` is that CommandComplete's tag without its NUL, or None. Else None."""
    unpack = UINT32.unpack_from
    n = len(data)
    pos = 0
    t = 0
    zs = 0
    last_c = -1
    data_rows = 0
    while n - pos >= 5:
        t = data[pos]
        length = unpack(data, pos + 1)[0]
        if length < 4:
            return None
        if t == _D:
            data_rows += 1
        elif t == _E or t == _S:
            return None
        elif t == _Z:
            zs += 1
        elif t == _C:
            if last_c >= 0:
                return None  # several statements: counted on the full path
            last_c = pos
        pos += 1 + length
    if pos != n or t != _Z or zs != 1:
        return None
    if last_c < 0:
        return data_rows, None
    return data_rows, bytes(data[last_c + 5 : last_c + unpack(data, last_c + 1)[0]])


def messages_py(buf: bytes | bytearray, max_message: int) -> tuple[list[tuple[int, int, int]], int, int]:
    """The whole frontend messages at the start of ``buf``: ``(frames, stop, bad_length)`` where
    ``frames`` lists ``(type, start, end)`` for each, ``stop`` is where framing stopped (the end of
    the last whole message, or the start of the first one with a bad length) and ``bad_length`` is
    that bad length (under 4 or over ``max_message``), else -1."""
    unpack = UINT32.unpack_from
    n = len(buf)
    pos = 0
    found: list[tuple[int, int, int]] = []
    while n - pos >= 5:
        length = unpack(buf, pos + 1)[0]
        if length < 4 or length > max_message:
            return found, pos, length
        end = pos + 1 + length
        if end > n:
            break
        found.append((buf[pos], pos, end))
        pos = end
    return found, pos, -1


try:
    from ._speedups import answer, messages
except ImportError:  # no C compiler when the package was installed: the same loops in Python
    answer, messages = answer_py, messages_py
