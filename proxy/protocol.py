"""PostgreSQL v3 wire codec: framing, message encoding and decoding. No policy.

Everything that turns Python values into protocol bytes (or back) lives here, including
ErrorResponse/NoticeResponse encoding of ``ProxyError``. The hot path uses ``HEADER`` (the
5-byte type + length) and forwards bytes untouched; only the messages the proxy must see are
decoded, by the small helpers below.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import ProxyError

HEADER = struct.Struct("!cI")  # type byte, length (includes itself, not the type byte)
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
INT16 = struct.Struct("!h")
TWO_INT32 = struct.Struct("!ii")

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# Client (frontend) message types.
QUERY = b"Q"
PARSE = b"P"
BIND = b"B"
DESCRIBE = b"D"
EXECUTE = b"E"
CLOSE = b"C"
SYNC = b"S"
FLUSH = b"H"
TERMINATE = b"X"
COPY_DATA = b"d"
COPY_DONE = b"c"
COPY_FAIL = b"f"
FUNCTION_CALL = b"F"
PASSWORD = b"p"  # PasswordMessage, SASLInitialResponse, SASLResponse

# Server (backend) message types.
AUTHENTICATION = b"R"
BACKEND_KEY_DATA = b"K"
PARAMETER_STATUS = b"S"
READY_FOR_QUERY = b"Z"
ERROR_RESPONSE = b"E"
NOTICE_RESPONSE = b"N"
NOTIFICATION_RESPONSE = b"A"
ROW_DESCRIPTION = b"T"
DATA_ROW = b"D"
COMMAND_COMPLETE = b"C"
EMPTY_QUERY = b"I"
PARSE_COMPLETE = b"1"
BIND_COMPLETE = b"2"
CLOSE_COMPLETE = b"3"
NO_DATA = b"n"
PARAMETER_DESCRIPTION = b"t"
PORTAL_SUSPENDED = b"s"
COPY_IN_RESPONSE = b"G"
COPY_OUT_RESPONSE = b"H"
COPY_BOTH_RESPONSE = b"W"
FUNCTION_CALL_RESPONSE = b"V"
NEGOTIATE_PROTOCOL_VERSION = b"v"

# Authentication request codes.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

PARSE_COMPLETE_MSG = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE_MSG = b"3\x00\x00\x00\x04"
SSL_NO = b"N"


class ProtocolViolation(Exception):
    """Bytes that cannot be a valid message; the caller answers with FATAL 08P01."""


def message(kind: bytes, body: bytes = b"") -> bytes:
    """Frame one message: type byte, length, body."""
    return kind + UINT32.pack(len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def read_cstr(data: bytes | bytearray | memoryview, offset: int) -> tuple[bytes, int]:
    """Return the NUL-terminated string at offset (without NUL) and the offset after it."""
    buf = bytes(data) if isinstance(data, memoryview) else data
    end = buf.find(b"\x00", offset)
    if end < 0:
        raise ProtocolViolation("unterminated string in message")
    return bytes(buf[offset:end]), end + 1


# --------------------------------------------------------------------------- startup


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class EncryptionRequest:
    code: int  # SSL_REQUEST or GSSENC_REQUEST


def parse_startup_packet(packet: bytes) -> StartupMessage | CancelRequest | EncryptionRequest:
    """Decode an untyped startup-phase packet (length prefix already stripped)."""
    if len(packet) < 4:
        raise ProtocolViolation("startup packet too short")
    (code,) = INT32.unpack_from(packet, 0)
    if code == CANCEL_REQUEST:
        if len(packet) != 12:
            raise ProtocolViolation("invalid cancel request length")
        pid, secret = TWO_INT32.unpack_from(packet, 4)
        return CancelRequest(pid, secret)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(packet) != 4:
            raise ProtocolViolation("invalid encryption request length")
        return EncryptionRequest(code)
    params: dict[str, str] = {}
    rest = packet[4:]
    if not rest.endswith(b"\x00"):
        raise ProtocolViolation("startup packet is not NUL-terminated")
    parts = rest[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: parameter without value")
    try:
        for i in range(0, len(parts), 2):
            params[parts[i].decode()] = parts[i + 1].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid startup packet: parameter is not valid UTF-8") from None
    return StartupMessage(code, params)


def startup_message(params: dict[str, str]) -> bytes:
    body = INT32.pack(PROTOCOL_3_0)
    for key, value in params.items():
        body += cstr(key) + cstr(value)
    body += b"\x00"
    return UINT32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return UINT32.pack(16) + INT32.pack(CANCEL_REQUEST) + TWO_INT32.pack(pid, secret)


# --------------------------------------------------------------------------- backend messages


def auth_request(code: int, payload: bytes = b"") -> bytes:
    return message(AUTHENTICATION, INT32.pack(code) + payload)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(BACKEND_KEY_DATA, TWO_INT32.pack(pid, secret))


def ready_for_query(status: bytes) -> bytes:
    return message(READY_FOR_QUERY, status)


def negotiate_protocol_version(minor: int, unsupported: list[str]) -> bytes:
    body = INT32.pack(minor) + INT32.pack(len(unsupported)) + b"".join(cstr(u) for u in unsupported)
    return message(NEGOTIATE_PROTOCOL_VERSION, body)


def error_fields(body: bytes | bytearray | memoryview) -> dict[str, str]:
    """Decode the fields of an ErrorResponse/NoticeResponse body into {code: value}."""
    fields: dict[str, str] = {}
    raw = bytes(body)
    pos = 0
    while pos < len(raw) and raw[pos] != 0:
        code = chr(raw[pos])
        end = raw.find(b"\x00", pos + 1)
        if end < 0:
            break
        fields[code] = raw[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def error_response(err: ProxyError, *, notice: bool = False) -> bytes:
    """Encode a ProxyError as ErrorResponse (or NoticeResponse)."""
    parts = [
        b"S" + cstr(err.severity),
        b"V" + cstr(err.severity),
        b"C" + cstr(err.sqlstate),
        b"M" + cstr(err.message),
    ]
    if err.detail:
        parts.append(b"D" + cstr(err.detail))
    if err.hint:
        parts.append(b"H" + cstr(err.hint))
    return message(NOTICE_RESPONSE if notice else ERROR_RESPONSE, b"".join(parts) + b"\x00")


# --------------------------------------------------------------------------- frontend messages


def query(sql: str) -> bytes:
    return message(QUERY, cstr(sql))


def password_message(payload: bytes) -> bytes:
    return message(PASSWORD, payload)


def sasl_initial_response(mechanism: str, payload: bytes) -> bytes:
    return message(PASSWORD, cstr(mechanism) + INT32.pack(len(payload)) + payload)


TERMINATE_MSG = message(TERMINATE)
SYNC_MSG = message(SYNC)
FLUSH_MSG = message(FLUSH)


def parse_message(name: bytes, rest: bytes) -> bytes:
    """Build a Parse message from a statement name and the body that follows the name."""
    return message(PARSE, name + b"\x00" + rest)


def close_statement(name: bytes) -> bytes:
    return message(CLOSE, b"S" + name + b"\x00")


def rows_in_tag(tag: bytes | bytearray) -> int:
    """Rows in a CommandComplete tag without its NUL ("SELECT 5", "INSERT 0 3"): the number
    after the last space, else 0 ("CREATE TABLE")."""
    digits = tag[tag.rfind(b" ") + 1 :]
    return int(digits) if digits.isdigit() else 0


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted (for statements the proxy writes itself)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal (standard_conforming_strings on, as on every supported server)."""
    return "'" + value.replace("'", "''") + "'"
