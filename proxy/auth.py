"""Authentication in both directions, as sans-I/O state machines.

Owns password checking and nothing else: no sockets, no settings. Callers read and write the
messages; these classes turn message bodies into the framed replies.

* ``ClientVerifier`` (we are the server, an application is the client): ``make_verifier``
  builds one for SCRAM-SHA-256, md5, password or trust. An unknown user runs the whole exchange
  with a mock salt and fails at the end with the same 28P01 a wrong password gets, as
  PostgreSQL does, so a client cannot probe which roles exist.
* ``ServerAuthenticator`` (we are the client of PostgreSQL): answers the server's
  Authentication requests (cleartext, md5, SCRAM-SHA-256) and checks the server's SCRAM
  signature.
* ``UserSecret``: one configured user's password, with the SCRAM keys derived once (PBKDF2 is
  slow) and cached.

Every failure is an ``AuthFailed`` carrying the ``ProxyError`` the client should see; hostile
or garbled input never escapes as another exception type.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass, field

from scramp import ScramClient, ScramException, ScramMechanism
from scramp.utils import ServerError, saslprep

from . import protocol as pq
from .errors import ProxyError, SqlState

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SCRAM_SALT_BYTES = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
METHODS = ("scram-sha-256", "md5", "password", "trust")

# Stateless (it only names the hash), so one instance serves every exchange.
_MECHANISM = ScramMechanism(SCRAM_SHA_256)
# Per-process secret behind the mock salts of unknown users (PostgreSQL's mock_auth_nonce):
# the same unknown name always gets the same salt, and nobody can tell it from a real one.
_MOCK_NONCE = secrets.token_bytes(32)
# PostgreSQL ignores the user name inside SCRAM (libpq sends "n=,"); scramp insists on one.
_ANY_NAME = "*"

_UNSUPPORTED_CODES = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}


class AuthFailed(Exception):
    """Authentication did not succeed; ``error`` is what the client is told."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(f"{error.sqlstate}: {error.message}")
        self.error = error


# --------------------------------------------------------------------------- secrets


def md5_password(password: str, user: str, salt: bytes) -> str:
    """PostgreSQL's md5 response: ``"md5" + md5(md5(password + user) + salt)``, hex."""
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


@dataclass(frozen=True, slots=True)
class ScramInfo:
    """What a SCRAM server stores for a user (PostgreSQL's SCRAM secret)."""

    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    iterations: int = SCRAM_ITERATIONS

    def as_tuple(self) -> tuple[bytes, bytes, bytes, int]:
        """The shape scramp's ``auth_fn`` returns."""
        return self.salt, self.stored_key, self.server_key, self.iterations


def derive_scram_info(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> ScramInfo:
    """Derive the SCRAM-SHA-256 keys from a password (RFC 5802 section 3).

    The password is SASLprepped; one that SASLprep rejects is used as is, as PostgreSQL does.
    """
    try:
        prepared = saslprep(password)
    except ScramException:
        prepared = password
    salted = hashlib.pbkdf2_hmac("sha256", prepared.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return ScramInfo(salt, hashlib.sha256(client_key).digest(), server_key, iterations)


def _mock_scram_info(user: str) -> ScramInfo:
    """A salt that is stable per unknown user, with keys no password can match."""
    salt = hmac.new(_MOCK_NONCE, user.encode(), hashlib.sha256).digest()[:SCRAM_SALT_BYTES]
    return ScramInfo(salt, secrets.token_bytes(32), secrets.token_bytes(32))


@dataclass(frozen=True, slots=True)
class UserSecret:
    """One configured user. Built once at start; SCRAM keys are derived on first use."""

    name: str
    password: str = field(repr=False)
    _scram: ScramInfo | None = field(default=None, init=False, repr=False, compare=False)

    def scram_info(self) -> ScramInfo:
        info = self._scram
        if info is None:
            info = derive_scram_info(self.password, os.urandom(SCRAM_SALT_BYTES))
            object.__setattr__(self, "_scram", info)  # a cache, not state: frozen for callers
        return info


# --------------------------------------------------------------------------- errors


def _malformed_scram(detail: str) -> AuthFailed:
    return AuthFailed(
        ProxyError(SqlState.PROTOCOL_VIOLATION, "malformed SCRAM message", detail=detail, fatal=True)
    )


def _client_protocol_violation(message: str) -> AuthFailed:
    return AuthFailed(ProxyError.protocol_violation(message))


def _server_protocol_violation(detail: str) -> AuthFailed:
    return AuthFailed(
        ProxyError(
            SqlState.PROTOCOL_VIOLATION,
            "invalid authentication request from server",
            detail=detail,
            fatal=True,
        )
    )


# --------------------------------------------------------------------------- we are the server


class ClientVerifier:
    """Checks one application client's credentials; the base class is ``trust``.

    ``first()`` gives the framed request to send after the startup packet (b"" for trust);
    ``step(body)`` takes the body of each 'p' message and returns ``(reply, done)``. With
    ``done`` the client is authenticated and ``reply`` holds what precedes AuthenticationOk.
    """

    __slots__ = ("method", "user", "secret")

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        self.method = method
        self.user = user
        self.secret = secret

    def first(self) -> bytes:
        return b""

    def step(self, body: bytes) -> tuple[bytes, bool]:
        raise _client_protocol_violation("unexpected password message")

    def _failed(self) -> AuthFailed:
        return AuthFailed(ProxyError.password_failed(self.user, self.method))


class _TrustVerifier(ClientVerifier):
    __slots__ = ()


class _PasswordVerifier(ClientVerifier):
    """Cleartext password ('password')."""

    __slots__ = ("_done",)

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        super().__init__(method, user, secret)
        self._done = False

    def first(self) -> bytes:
        return pq.auth_request(pq.AUTH_CLEARTEXT)

    def _response(self, body: bytes) -> bytes:
        if self._done:
            raise _client_protocol_violation("unexpected password message")
        self._done = True
        # A PasswordMessage is exactly one NUL-terminated string (PostgreSQL's check).
        if not body.endswith(b"\x00") or body.index(b"\x00") != len(body) - 1:
            raise _client_protocol_violation("invalid password packet size")
        return body[:-1]

    def _expected(self) -> bytes:
        assert self.secret is not None
        return self.secret.password.encode()

    def step(self, body: bytes) -> tuple[bytes, bool]:
        given = self._response(body)
        if self.secret is None or not given or not hmac.compare_digest(given, self._expected()):
            raise self._failed()
        return b"", True


class _Md5Verifier(_PasswordVerifier):
    __slots__ = ("salt",)

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        super().__init__(method, user, secret)
        self.salt = os.urandom(4)

    def first(self) -> bytes:
        return pq.auth_request(pq.AUTH_MD5, self.salt)

    def _expected(self) -> bytes:
        assert self.secret is not None
        return md5_password(self.secret.password, self.user, self.salt).encode()


class _ScramVerifier(ClientVerifier):
    """SCRAM-SHA-256 without channel binding, on scramp's server, the way PostgreSQL runs it.

    PostgreSQL takes the user from the startup packet and ignores the SCRAM ``n=`` attribute
    (libpq sends it empty, which scramp refuses), so scramp is shown a placeholder name and
    then given back the client-first-message-bare the client actually signed.
    """

    __slots__ = ("_server", "_stage")

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        super().__init__(method, user, secret)
        info = secret.scram_info() if secret is not None else _mock_scram_info(user)
        auth = info.as_tuple()
        self._server = _MECHANISM.make_server(lambda _name: auth)
        self._stage = 0

    def first(self) -> bytes:
        return pq.auth_sasl([SCRAM_SHA_256])

    def step(self, body: bytes) -> tuple[bytes, bool]:
        stage = self._stage
        self._stage += 1
        try:
            if stage == 0:
                return self._initial_response(body), False
            if stage == 1:
                return self._final_response(body), True
        except ScramException as exc:
            raise self._scram_failed(exc) from None
        except UnicodeDecodeError:
            raise _malformed_scram("The SCRAM message is not valid UTF-8.") from None
        except (ValueError, struct.error, pq.ProtocolViolation):  # a safety net: input is hostile
            raise _malformed_scram("The SCRAM message could not be parsed.") from None
        raise _client_protocol_violation("unexpected SASL response after SCRAM exchange completed")

    def _initial_response(self, body: bytes) -> bytes:
        end = body.find(b"\x00")
        if end < 0 or len(body) < end + 5:
            raise _client_protocol_violation("invalid SASLInitialResponse message")
        if body[:end] != SCRAM_SHA_256.encode():
            raise _client_protocol_violation("client selected an invalid SASL authentication mechanism")
        pos = end + 1
        (length,) = pq.INT32.unpack_from(body, pos)
        data = body[pos + 4 :]
        if length < 0 or length != len(data):
            raise _malformed_scram("The SASLInitialResponse length does not match its data.")
        text = data.decode()
        if text.startswith("p="):
            raise _malformed_scram(
                "The client selected SCRAM-SHA-256 without channel binding, "
                "but the SCRAM message includes channel binding data."
            )
        if text[:3] not in ("n,,", "y,,"):
            raise _malformed_scram(
                'Unexpected channel-binding flag or authorization identity; expected "n,," or "y,,".'
            )
        bare = text[3:]
        name, comma, rest = bare.partition(",")
        if not name.startswith("n=") or not comma:
            raise _malformed_scram('Expected attribute "n".')
        self._server.set_client_first(f"{text[:3]}n={_ANY_NAME},{rest}")
        self._server.client_first_bare = bare  # the proof signs what the client sent
        return pq.auth_request(pq.AUTH_SASL_CONTINUE, self._server.get_server_first().encode())

    def _final_response(self, body: bytes) -> bytes:
        self._server.set_client_final(body.decode())
        if self.secret is None:  # unreachable with random mock keys; never let it through
            raise self._failed()
        return pq.auth_request(pq.AUTH_SASL_FINAL, self._server.get_server_final().encode())

    def _scram_failed(self, exc: ScramException) -> AuthFailed:
        reason = exc.server_error
        if reason is ServerError.INVALID_PROOF:
            return self._failed()
        if reason is ServerError.CHANNEL_BINDINGS_DONT_MATCH:
            return AuthFailed(
                ProxyError(SqlState.PROTOCOL_VIOLATION, "SCRAM channel binding check failed", fatal=True)
            )
        return _malformed_scram(str(exc.args[0]) if exc.args else "invalid SCRAM message")


_VERIFIERS: dict[str, type[ClientVerifier]] = {
    "scram-sha-256": _ScramVerifier,
    "md5": _Md5Verifier,
    "password": _PasswordVerifier,
    "trust": _TrustVerifier,
}


def make_verifier(method: str, user: str, secret: UserSecret | None) -> ClientVerifier:
    """A verifier for ``method`` (one of ``METHODS``).

    With ``secret`` None (unknown user) the password exchange still runs to the end and then
    fails with the 28P01 a wrong password gets.
    """
    try:
        cls = _VERIFIERS[method]
    except KeyError:
        expected = ", ".join(METHODS)
        raise ValueError(f"unknown authentication method {method!r} (expected one of: {expected})") from None
    return cls(method, user, secret)


# --------------------------------------------------------------------------- we are the client


class ServerAuthenticator:
    """Answers PostgreSQL's Authentication requests for one server connection."""

    __slots__ = ("user", "_password", "_scram", "_scram_stage")

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self._password = password
        self._scram: ScramClient | None = None
        self._scram_stage = 0  # 1: initial response sent, 2: client-final sent, 3: verified

    def respond(self, code: int, payload: bytes) -> bytes | None:
        """The framed reply to an Authentication request, or None when nothing is sent.

        ``code`` is the int32 after 'R', ``payload`` the rest of the message.
        """
        if code == pq.AUTH_OK:
            if self._scram_stage in (1, 2):
                raise _server_protocol_violation(
                    "AuthenticationOk arrived before the SCRAM exchange finished"
                )
            return None
        if code == pq.AUTH_CLEARTEXT:
            return pq.password_message(self._require_password("password").encode() + b"\x00")
        if code == pq.AUTH_MD5:
            if len(payload) != 4:
                raise _server_protocol_violation(f"md5 salt of {len(payload)} bytes (expected 4)")
            answer = md5_password(self._require_password("md5"), self.user, payload)
            return pq.password_message(answer.encode() + b"\x00")
        if code == pq.AUTH_SASL:
            return self._sasl_start(payload)
        if code == pq.AUTH_SASL_CONTINUE:
            return self._sasl_continue(payload)
        if code == pq.AUTH_SASL_FINAL:
            self._sasl_final(payload)
            return None
        name = _UNSUPPORTED_CODES.get(code, "an unknown method")
        raise AuthFailed(
            ProxyError(
                SqlState.INVALID_AUTHORIZATION,
                "unsupported authentication method requested by server",
                detail=f"PostgreSQL asked for {name} (authentication request code {code}); "
                "pgsidecar can answer password, md5 and SCRAM-SHA-256",
                hint="use scram-sha-256 or md5 for this user in the server's pg_hba.conf",
                fatal=True,
            )
        )

    def _require_password(self, method: str) -> str:
        if not self._password:
            raise AuthFailed(
                ProxyError(
                    SqlState.INVALID_PASSWORD,
                    f'the server requires a password for user "{self.user}" and the upstream DSN has none',
                    detail=f"PostgreSQL asked for {method} authentication; upstream.dsn has no password",
                    hint="put the password in upstream.dsn, or list the user with a password in auth.users",
                    fatal=True,
                )
            )
        return self._password

    def _sasl_start(self, payload: bytes) -> bytes:
        if self._scram_stage:
            raise _server_protocol_violation("a second AuthenticationSASL during one login")
        offered = [m.decode(errors="replace") for m in payload.split(b"\x00") if m]
        if SCRAM_SHA_256 not in offered:
            raise AuthFailed(
                ProxyError(
                    SqlState.INVALID_AUTHORIZATION,
                    "unsupported authentication method requested by server",
                    detail=f"PostgreSQL offered SASL mechanisms {', '.join(offered) or '(none)'}; "
                    "pgsidecar can answer SCRAM-SHA-256 without channel binding",
                    fatal=True,
                )
            )
        password = self._require_password("SCRAM-SHA-256")
        try:
            try:
                client = ScramClient([SCRAM_SHA_256], self.user, password)
            except ScramException:
                # A name SASLprep rejects; PostgreSQL ignores the SCRAM name anyway.
                client = ScramClient([SCRAM_SHA_256], _ANY_NAME, password)
            first = client.get_client_first()
        except ScramException:
            raise AuthFailed(
                ProxyError(
                    SqlState.INVALID_PASSWORD,
                    "the upstream password cannot be used for SCRAM-SHA-256",
                    detail="SASLprep rejects the password in upstream.dsn",
                    fatal=True,
                )
            ) from None
        self._scram = client
        self._scram_stage = 1
        return pq.sasl_initial_response(SCRAM_SHA_256, first.encode())

    def _sasl_continue(self, payload: bytes) -> bytes:
        client = self._scram
        if client is None or self._scram_stage != 1:
            raise _server_protocol_violation("AuthenticationSASLContinue out of order")
        try:
            client.set_server_first(payload.decode())
            final = client.get_client_final()
        except (ScramException, UnicodeDecodeError) as exc:
            raise _server_protocol_violation(f"invalid SCRAM server-first-message: {_why(exc)}") from None
        self._scram_stage = 2
        return pq.password_message(final.encode())

    def _sasl_final(self, payload: bytes) -> None:
        client = self._scram
        if client is None or self._scram_stage != 2:
            raise _server_protocol_violation("AuthenticationSASLFinal out of order")
        try:
            client.set_server_final(payload.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(
                ProxyError(
                    SqlState.INVALID_AUTHORIZATION,
                    "could not verify the server's SCRAM signature",
                    detail=f'the server did not prove it knows the password of "{self.user}": {_why(exc)}',
                    fatal=True,
                )
            ) from None
        self._scram_stage = 3


def _why(exc: Exception) -> str:
    return str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
