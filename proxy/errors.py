"""ProxyError and SqlState: every failure a client can see, with its SQLSTATE.

One named constructor per situation. The message is short and lowercase like PostgreSQL's,
the detail names the setting and its value. ``protocol.error_response`` is the only place
that turns these into bytes.
"""
from __future__ import annotations


class SqlState:
    PROTOCOL_VIOLATION = "08P01"
    CONNECTION_FAILURE = "08006"
    CONNECTION_EXCEPTION = "08000"
    SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
    INVALID_PASSWORD = "28P01"
    INVALID_AUTHORIZATION = "28000"
    INVALID_CATALOG_NAME = "3D000"
    TOO_MANY_CONNECTIONS = "53300"
    FEATURE_NOT_SUPPORTED = "0A000"
    ADMIN_SHUTDOWN = "57P01"
    CANNOT_CONNECT_NOW = "57P03"
    QUERY_CANCELED = "57014"
    INTERNAL_ERROR = "XX000"
    INVALID_PARAMETER_VALUE = "22023"


class ProxyError(Exception):
    """An error the proxy reports to a client as an ErrorResponse."""

    __slots__ = ("sqlstate", "message", "detail", "hint", "severity")

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.severity = "FATAL" if fatal else "ERROR"

    @property
    def fatal(self) -> bool:
        return self.severity == "FATAL"

    # ---- protocol and startup -------------------------------------------------------
    @classmethod
    def protocol_violation(cls, message: str) -> ProxyError:
        return cls(SqlState.PROTOCOL_VIOLATION, message, fatal=True)

    @classmethod
    def message_too_large(cls, size: int, limit: int) -> ProxyError:
        return cls(
            SqlState.PROTOCOL_VIOLATION,
            "message too large",
            detail=f"message of {size} bytes exceeds proxy.max_message_bytes={limit}",
            fatal=True,
        )

    @classmethod
    def startup_too_large(cls, size: int, limit: int) -> ProxyError:
        return cls(
            SqlState.PROTOCOL_VIOLATION,
            "invalid length of startup packet",
            detail=f"startup packet of {size} bytes exceeds proxy.max_startup_bytes={limit}",
            fatal=True,
        )

    @classmethod
    def unsupported_protocol(cls, major: int, minor: int) -> ProxyError:
        return cls(
            SqlState.FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            fatal=True,
        )

    @classmethod
    def login_timeout(cls, seconds: float) -> ProxyError:
        return cls(
            SqlState.PROTOCOL_VIOLATION,
            "client did not complete startup in time",
            detail=f"proxy.client_login_timeout={seconds:g}",
            fatal=True,
        )

    @classmethod
    def too_many_clients(cls, limit: int) -> ProxyError:
        return cls(
            SqlState.TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
            detail=f"proxy.max_client_connections={limit}",
            fatal=True,
        )

    @classmethod
    def no_user(cls) -> ProxyError:
        return cls(
            SqlState.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet", fatal=True
        )

    # ---- authentication -------------------------------------------------------------
    @classmethod
    def password_failed(cls, user: str, method: str) -> ProxyError:
        kind = "password" if method in ("md5", "password") else method
        label = {"scram-sha-256": "password", "md5": "password"}.get(method, kind)
        return cls(
            SqlState.INVALID_PASSWORD, f'{label} authentication failed for user "{user}"', fatal=True
        )

    @classmethod
    def unknown_user(cls, user: str, method: str) -> ProxyError:
        # PostgreSQL does not reveal whether the role exists: same message as a bad password.
        return cls.password_failed(user, method)

    @classmethod
    def unknown_database(cls, database: str) -> ProxyError:
        return cls(SqlState.INVALID_CATALOG_NAME, f'database "{database}" does not exist', fatal=True)

    # ---- pool and servers -----------------------------------------------------------
    @classmethod
    def checkout_timeout(cls, pool: str, waited_ms: float, size: int, max_overflow: int) -> ProxyError:
        return cls(
            SqlState.TOO_MANY_CONNECTIONS,
            "no server connection available",
            detail=(
                f"pool {pool}: waited {waited_ms:.0f} ms for a server connection "
                f"(pool.size={size}, pool.max_overflow={max_overflow})"
            ),
            hint="raise pool.size or pool.max_overflow, or shorten transactions",
        )

    @classmethod
    def server_unavailable(cls, pool: str, reason: str) -> ProxyError:
        return cls(
            SqlState.CONNECTION_FAILURE,
            "could not connect to the server",
            detail=f"pool {pool}: {reason}",
        )

    @classmethod
    def server_lost(cls, pool: str) -> ProxyError:
        return cls(
            SqlState.CONNECTION_FAILURE,
            "server connection lost",
            detail=f"pool {pool}: the PostgreSQL backend closed the connection; the transaction is lost",
            fatal=True,
        )

    @classmethod
    def query_canceled(cls) -> ProxyError:
        return cls(
            SqlState.QUERY_CANCELED,
            "canceling statement due to user request",
            detail="the statement was still waiting for a server connection and never ran",
        )

    @classmethod
    def shutting_down(cls) -> ProxyError:
        return cls(SqlState.ADMIN_SHUTDOWN, "terminating connection: pgsidecar is shutting down", fatal=True)

    @classmethod
    def internal(cls, what: str) -> ProxyError:
        return cls(SqlState.INTERNAL_ERROR, f"internal proxy error: {what}", fatal=True)

    @classmethod
    def from_server(cls, fields: dict[str, str]) -> ProxyError:
        """Wrap an ErrorResponse received from PostgreSQL so it can be passed on to a client."""
        severity = fields.get("V") or fields.get("S") or "ERROR"
        err = cls(
            fields.get("C", SqlState.INTERNAL_ERROR),
            fields.get("M", "server error"),
            detail=fields.get("D"),
            hint=fields.get("H"),
            fatal=severity in ("FATAL", "PANIC"),
        )
        return err
