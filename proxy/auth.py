"""Authentication, both directions, as sans-I/O state machines.

``ClientVerifier`` (we are the server): SCRAM-SHA-256, md5, password or trust for an
application client. ``ServerAuthenticator`` (we are the client): answers PostgreSQL's
Authentication requests. Callers do the I/O; these only turn message bodies into replies.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field

from scramp import ScramClient, ScramException, ScramMechanism

from . import protocol as pq
from .errors import ProxyError, SqlState

_SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(_SCRAM)


class AuthFailed(Exception):
    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def md5_hex(password: str, user: str, salt: bytes) -> str:
    """PostgreSQL's md5 answer: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


@dataclass(slots=True)
class UserSecret:
    """A configured user; SCRAM keys are derived once, on first use (PBKDF2 is slow)."""

    name: str
    password: str = field(repr=False)
    _scram: tuple[bytes, bytes, bytes, int] | None = field(default=None, repr=False)

    def scram_info(self) -> tuple[bytes, bytes, bytes, int]:
        if self._scram is None:
            self._scram = _MECHANISM.make_auth_info(self.password, iteration_count=4096)
        return self._scram


_FAKE = UserSecret("\x00unknown", os.urandom(16).hex())


class ClientVerifier:
    """Verifies one client's credentials."""

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        self.method = method
        self.user = user
        self.secret = secret

    def _failed(self) -> AuthFailed:
        return AuthFailed(ProxyError.password_failed(self.user, self.method))

    def first(self) -> bytes:
        return b""

    def step(self, body: bytes) -> tuple[bytes, bool]:
        raise self._failed()


class _Trust(ClientVerifier):
    pass


class _Password(ClientVerifier):
    def first(self) -> bytes:
        return pq.auth_request(pq.AUTH_CLEARTEXT)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        given = body.rstrip(b"\x00")
        if self.secret is None or not hmac.compare_digest(given, self.secret.password.encode()):
            raise self._failed()
        return b"", True


class _Md5(ClientVerifier):
    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        super().__init__(method, user, secret)
        self.salt = os.urandom(4)

    def first(self) -> bytes:
        return pq.auth_request(pq.AUTH_MD5, self.salt)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        given = body.rstrip(b"\x00")
        if self.secret is None:
            raise self._failed()
        expected = md5_hex(self.secret.password, self.user, self.salt).encode()
        if not hmac.compare_digest(given, expected):
            raise self._failed()
        return b"", True


class _Scram(ClientVerifier):
    """SCRAM-SHA-256 without channel binding (RFC 5802/7677), as PostgreSQL runs it.

    Written out rather than delegated to scramp's server: libpq sends an empty user name
    (``n=,``) because PostgreSQL takes it from the startup packet, which scramp rejects.
    """

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        super().__init__(method, user, secret)
        self._salt, self._stored_key, self._server_key, self._iterations = (secret or _FAKE).scram_info()
        self._stage = 0
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def first(self) -> bytes:
        return pq.auth_sasl([_SCRAM])

    def step(self, body: bytes) -> tuple[bytes, bool]:
        try:
            if self._stage == 0:
                self._stage = 1
                return self._client_first(body), False
            return self._client_final(body), True
        except AuthFailed:
            raise
        except (ValueError, UnicodeDecodeError, pq.ProtocolViolation, IndexError, binascii.Error) as exc:
            raise self._failed() from exc

    def _client_first(self, body: bytes) -> bytes:
        mechanism, pos = pq.read_cstr(body, 0)
        if mechanism.decode() != _SCRAM:
            raise AuthFailed(
                ProxyError(
                    SqlState.PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                    fatal=True,
                )
            )
        (length,) = pq.INT32.unpack_from(body, pos)
        message = body[pos + 4 : pos + 4 + length].decode()
        cbind, _, rest = message.partition(",")
        if cbind not in ("n", "y"):
            raise ValueError("channel binding is not supported")
        authzid, _, bare = rest.partition(",")
        if authzid:
            raise ValueError("authorization identity is not supported")
        attrs = dict(part.split("=", 1) for part in bare.split(","))
        client_nonce = attrs["r"]
        if not client_nonce or "m" in attrs:
            raise ValueError("invalid client-first-message")
        self._client_first_bare = bare
        self._nonce = client_nonce + base64.b64encode(os.urandom(18)).decode()
        self._server_first = (
            f"r={self._nonce},s={base64.b64encode(self._salt).decode()},i={self._iterations}"
        )
        return pq.auth_request(pq.AUTH_SASL_CONTINUE, self._server_first.encode())

    def _client_final(self, body: bytes) -> bytes:
        message = body.decode()
        without_proof, sep, proof_b64 = message.rpartition(",p=")
        if not sep:
            raise ValueError("client-final-message without proof")
        attrs = dict(part.split("=", 1) for part in without_proof.split(","))
        if attrs.get("r") != self._nonce or attrs.get("c") not in ("biws", "eSws"):
            raise self._failed()
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        proof = base64.b64decode(proof_b64, validate=True)
        signature = hmac.new(self._stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise self._failed()
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if self.secret is None or not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key):
            raise self._failed()
        server_signature = hmac.new(self._server_key, auth_message, hashlib.sha256).digest()
        return pq.auth_request(pq.AUTH_SASL_FINAL, b"v=" + base64.b64encode(server_signature))


def make_verifier(method: str, user: str, secret: UserSecret | None) -> ClientVerifier:
    """A verifier for ``method``; with ``secret`` None the exchange runs and then fails (28P01)."""
    if method == "trust":
        return _Trust(method, user, secret)
    if method == "scram-sha-256":
        return _Scram(method, user, secret)
    if method == "md5":
        return _Md5(method, user, secret)
    if method == "password":
        return _Password(method, user, secret)
    raise ValueError(f"unknown authentication method {method!r}")


class ServerAuthenticator:
    """Answers PostgreSQL's Authentication requests for one server connection."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self._scram: ScramClient | None = None

    def _need_password(self) -> str:
        if not self.password:
            raise AuthFailed(
                ProxyError(
                    SqlState.INVALID_PASSWORD,
                    f'the server asked for a password for user "{self.user}" and none is configured',
                    detail="set the password in upstream.dsn or in auth.users",
                    fatal=True,
                )
            )
        return self.password

    def respond(self, code: int, payload: bytes) -> bytes | None:
        if code == pq.AUTH_OK:
            return None
        if code == pq.AUTH_CLEARTEXT:
            return pq.password_message(self._need_password().encode() + b"\x00")
        if code == pq.AUTH_MD5:
            return pq.password_message(md5_hex(self._need_password(), self.user, payload[:4]).encode() + b"\x00")
        try:
            if code == pq.AUTH_SASL:
                mechanisms = [m.decode() for m in payload.split(b"\x00") if m]
                if _SCRAM not in mechanisms:
                    raise AuthFailed(
                        ProxyError(
                            SqlState.INVALID_AUTHORIZATION,
                            "unsupported SASL mechanism requested by server",
                            detail=f"offered: {', '.join(mechanisms)}",
                            fatal=True,
                        )
                    )
                self._scram = ScramClient([_SCRAM], self.user, self._need_password())
                return pq.sasl_initial_response(_SCRAM, self._scram.get_client_first().encode())
            if code == pq.AUTH_SASL_CONTINUE and self._scram is not None:
                self._scram.set_server_first(payload.decode())
                return pq.password_message(self._scram.get_client_final().encode())
            if code == pq.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.set_server_final(payload.decode())
                return None
        except ScramException as exc:
            raise AuthFailed(
                ProxyError(SqlState.INVALID_PASSWORD, f"SCRAM exchange with the server failed: {exc}", fatal=True)
            ) from None
        raise AuthFailed(
            ProxyError(
                SqlState.INVALID_AUTHORIZATION,
                "unsupported authentication method requested by server",
                detail=f"authentication request code {code}",
                fatal=True,
            )
        )
