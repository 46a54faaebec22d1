"""A raw-socket PostgreSQL v3 client for tests that must see the exact bytes on the wire.

Test infrastructure only: builds startup-phase packets and frontend messages by hand (so a test
can also build broken ones), reads backend messages one by one, and can drop the connection
abruptly (RST) the way a killed process does. Deliberately independent of ``proxy.protocol``:
a codec bug must not be able to hide itself by being on both ends.
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", version)
    for key, value in params.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!II", 8, GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!IIii", 16, CANCEL_REQUEST_CODE, pid, secret)


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def error_fields(body: bytes) -> dict[str, str]:
    """{field code: value} of an ErrorResponse / NoticeResponse body."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(b"\x00", pos + 1)
        fields[chr(body[pos])] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


@dataclass(frozen=True)
class Message:
    kind: bytes
    body: bytes

    @property
    def fields(self) -> dict[str, str]:
        return error_fields(self.body)


class RawClient:
    """One TCP connection to the proxy; every read has a timeout (socket.timeout on expiry)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.eof = False
        self.backend_pid = 0
        self.backend_secret = 0

    # -- output -----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- input ------------------------------------------------------------------------
    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    def recv_exact(self, n: int) -> bytes | None:
        """n bytes, or None at EOF before n bytes arrived."""
        while len(self._buf) < n:
            if not self._fill():
                return None
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_message(self) -> Message | None:
        """The next backend message, or None at EOF."""
        head = self.recv_exact(5)
        if head is None:
            return None
        kind, length = struct.unpack("!cI", head)
        body = self.recv_exact(length - 4)
        if body is None:
            return None
        return Message(kind, body)

    def read_until(self, kind: bytes) -> list[Message]:
        """Messages up to and including the first of ``kind``; AssertionError at EOF."""
        out: list[Message] = []
        while True:
            msg = self.read_message()
            assert msg is not None, f"connection closed before {kind!r}; got {out!r}"
            out.append(msg)
            if msg.kind == kind:
                return out

    def read_to_eof(self) -> list[Message]:
        """Every message until the peer closes the connection."""
        out: list[Message] = []
        while True:
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)

    def expect_fatal(self) -> dict[str, str]:
        """Read to EOF; exactly one ErrorResponse with severity FATAL must be the last message.

        Returns its fields. Fails when the peer does not close the connection within the
        socket timeout.
        """
        messages = self.read_to_eof()
        assert self.eof
        assert messages, "connection closed without an ErrorResponse"
        last = messages[-1]
        assert last.kind == b"E", f"last message before close is {last.kind!r}, not ErrorResponse: {messages!r}"
        fields = last.fields
        assert fields.get("S") == "FATAL", fields
        return fields

    # -- conversations ----------------------------------------------------------------
    def login(self, user: str, database: str, **params: str) -> list[Message]:
        """Startup for a trust login (AuthenticationOk straight away); returns messages up
        to ReadyForQuery and remembers BackendKeyData."""
        self.send(startup_packet({"user": user, "database": database, **params}))
        messages = self.read_until(b"Z")
        auth = messages[0]
        assert auth.kind == b"R" and struct.unpack("!i", auth.body[:4])[0] == 0, messages
        for msg in messages:
            if msg.kind == b"K":
                self.backend_pid, self.backend_secret = struct.unpack("!ii", msg.body[:8])
        return messages

    def simple_query(self, sql: str) -> list[Message]:
        """Send a Query and return every message up to ReadyForQuery."""
        self.send(query(sql))
        return self.read_until(b"Z")

    @staticmethod
    def rows(messages: list[Message]) -> list[tuple[str | None, ...]]:
        """DataRow values (text format) from a list of messages."""
        out: list[tuple[str | None, ...]] = []
        for msg in messages:
            if msg.kind != b"D":
                continue
            (count,) = struct.unpack("!h", msg.body[:2])
            pos = 2
            values: list[str | None] = []
            for _ in range(count):
                (n,) = struct.unpack("!i", msg.body[pos : pos + 4])
                pos += 4
                if n < 0:
                    values.append(None)
                else:
                    values.append(msg.body[pos : pos + n].decode())
                    pos += n
            out.append(tuple(values))
        return out

    # -- ending -----------------------------------------------------------------------
    def kill(self) -> None:
        """Drop the connection the way a killed process does: RST, no Terminate."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = ""):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes
    (AssertionError naming ``message`` and the last value)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message or predicate}: last={last!r}")
        time.sleep(interval)


def wait_for(what: str, probe, timeout: float = 20.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """``wait_until`` with the thing waited for named first: ``wait_for("the NOTIFY", lambda: ...)``."""
    return wait_until(probe, timeout, interval, message=what)
