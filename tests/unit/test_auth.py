"""proxy.auth without sockets: our ClientVerifier against our ServerAuthenticator, and each
against an independent peer (scramp's client and server, a libpq-style SCRAM client written out
here from RFC 5802, PostgreSQL's md5 formula), plus malformed and hostile input."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import random
import struct

import pytest
from scramp import ScramClient, ScramMechanism

from proxy import protocol as pq
from proxy.auth import (
    AuthFailed,
    ClientVerifier,
    ServerAuthenticator,
    UserSecret,
    derive_scram_info,
    make_verifier,
    md5_password,
)

USER = "alice"
PASSWORD = "s3cret pw"
PASSWORD_METHODS = ["scram-sha-256", "md5", "password"]
FIRST_CODE = {"scram-sha-256": pq.AUTH_SASL, "md5": pq.AUTH_MD5, "password": pq.AUTH_CLEARTEXT}


# --------------------------------------------------------------------------- helpers


def split(framed: bytes) -> list[tuple[bytes, bytes]]:
    """Framed messages -> [(type, body)]; asserts the framing is exact."""
    out = []
    pos = 0
    while pos < len(framed):
        kind, length = pq.HEADER.unpack_from(framed, pos)
        out.append((kind, framed[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    assert pos == len(framed)
    return out


def auth_message(framed: bytes) -> tuple[int, bytes]:
    """The single Authentication message in ``framed`` as (code, payload)."""
    [(kind, body)] = split(framed)
    assert kind == pq.AUTHENTICATION
    return pq.INT32.unpack_from(body)[0], body[4:]


def password_body(framed: bytes) -> bytes:
    [(kind, body)] = split(framed)
    assert kind == pq.PASSWORD
    return body


def run(
    verifier: ClientVerifier, authenticator: ServerAuthenticator, seen: list[int] | None = None
) -> list[int]:
    """Drive a full login the way client.py and server.py do; return the codes the client saw."""
    seen = [] if seen is None else seen
    outgoing = verifier.first() + (b"" if verifier.method != "trust" else pq.auth_request(pq.AUTH_OK))
    done = verifier.method == "trust"
    while True:
        reply = None
        for kind, body in split(outgoing):
            assert kind == pq.AUTHENTICATION
            code = pq.INT32.unpack_from(body)[0]
            seen.append(code)
            reply = authenticator.respond(code, body[4:])
        if done:
            assert reply is None
            return seen
        assert reply is not None
        outgoing, done = verifier.step(password_body(reply))
        if done:
            outgoing += pq.auth_request(pq.AUTH_OK)


def secret() -> UserSecret:
    return UserSecret(USER, PASSWORD)


def scram_verifier(user: str = USER, known: bool = True) -> ClientVerifier:
    return make_verifier("scram-sha-256", user, UserSecret(user, PASSWORD) if known else None)


def sasl_initial(data: bytes, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    return mechanism + b"\x00" + struct.pack("!i", len(data)) + data


def libpq_client_final(
    password: str, client_first_bare: str, server_first: str, gs2: str
) -> tuple[str, bytes]:
    """What libpq computes (RFC 5802 section 3), written out independently of proxy and scramp.

    Returns the client-final-message and the ServerSignature the server must answer with."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salt = base64.b64decode(attrs["s"])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    server_signature = hmac.new(server_key, message, hashlib.sha256).digest()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_signature


def libpq_login(verifier: ClientVerifier, password: str, gs2: str = "n,,", name: str = "") -> bytes:
    """A libpq-style SCRAM login (empty user name by default); returns the SASLFinal payload."""
    code, payload = auth_message(verifier.first())
    assert code == pq.AUTH_SASL and payload == b"SCRAM-SHA-256\x00\x00"
    bare = f"n={name},r=fyko+d2lbbFgONRv9qkxdawL"
    reply, done = verifier.step(sasl_initial(f"{gs2}{bare}".encode()))
    assert not done
    code, server_first = auth_message(reply)
    assert code == pq.AUTH_SASL_CONTINUE
    final, server_signature = libpq_client_final(password, bare, server_first.decode(), gs2)
    reply, done = verifier.step(final.encode())
    assert done
    code, server_final = auth_message(reply)
    assert code == pq.AUTH_SASL_FINAL
    assert server_final == b"v=" + base64.b64encode(server_signature)
    return server_final


def assert_password_failed(caught: pytest.ExceptionInfo[AuthFailed], user: str = USER) -> None:
    err = caught.value.error
    assert err.sqlstate == "28P01"
    assert err.message == f'password authentication failed for user "{user}"'
    assert err.fatal


# --------------------------------------------------------------------------- our two halves together


@pytest.mark.parametrize("method", PASSWORD_METHODS)
def test_right_password_logs_in(method: str) -> None:
    codes = run(make_verifier(method, USER, secret()), ServerAuthenticator(USER, PASSWORD))
    expected = {
        "scram-sha-256": [pq.AUTH_SASL, pq.AUTH_SASL_CONTINUE, pq.AUTH_SASL_FINAL, pq.AUTH_OK],
        "md5": [pq.AUTH_MD5, pq.AUTH_OK],
        "password": [pq.AUTH_CLEARTEXT, pq.AUTH_OK],
    }[method]
    assert codes == expected


@pytest.mark.parametrize("method", PASSWORD_METHODS)
def test_wrong_password_is_28P01(method: str) -> None:
    with pytest.raises(AuthFailed) as caught:
        run(make_verifier(method, USER, secret()), ServerAuthenticator(USER, "not-the-password"))
    assert_password_failed(caught)


@pytest.mark.parametrize("method", PASSWORD_METHODS)
def test_unknown_user_runs_the_whole_exchange_then_gets_the_wrong_password_answer(method: str) -> None:
    verifier = make_verifier(method, "ghost", None)
    assert auth_message(verifier.first())[0] == FIRST_CODE[method]
    codes: list[int] = []
    with pytest.raises(AuthFailed) as caught:
        run(verifier, ServerAuthenticator("ghost", PASSWORD), codes)
    assert_password_failed(caught, "ghost")
    # Failed only on the client's last message, like PostgreSQL.
    assert codes == {"scram-sha-256": [pq.AUTH_SASL, pq.AUTH_SASL_CONTINUE]}.get(method, [FIRST_CODE[method]])


def test_trust_asks_for_nothing() -> None:
    verifier = make_verifier("trust", USER, None)
    assert verifier.first() == b""
    assert run(verifier, ServerAuthenticator(USER, None)) == [pq.AUTH_OK]
    with pytest.raises(AuthFailed) as caught:
        verifier.step(b"pw\x00")
    assert caught.value.error.sqlstate == "08P01"


def test_unknown_method_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'ldap'"):
        make_verifier("ldap", USER, secret())


def test_md5_salt_is_random_per_verifier() -> None:
    salts = {auth_message(make_verifier("md5", USER, secret()).first())[1] for _ in range(20)}
    assert len(salts) == 20 and all(len(s) == 4 for s in salts)


# --------------------------------------------------------------------------- SCRAM: independent peers


def test_scram_libpq_style_client_with_empty_user_name() -> None:
    libpq_login(scram_verifier(), PASSWORD)


def test_scram_client_that_supports_channel_binding_but_saw_none() -> None:
    libpq_login(scram_verifier(), PASSWORD, gs2="y,,")


def test_scram_user_name_inside_scram_is_ignored_like_postgresql() -> None:
    libpq_login(scram_verifier(), PASSWORD, name="someone=2Celse")


def test_scram_libpq_style_client_with_wrong_password() -> None:
    with pytest.raises(AuthFailed) as caught:
        libpq_login(scram_verifier(), "wrong")
    assert_password_failed(caught)


@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
def test_scramps_own_client_against_our_verifier(password: str) -> None:
    verifier = scram_verifier()
    verifier.first()
    client = ScramClient(["SCRAM-SHA-256"], USER, password)
    reply, done = verifier.step(sasl_initial(client.get_client_first().encode()))
    client.set_server_first(auth_message(reply)[1].decode())
    if password != PASSWORD:
        with pytest.raises(AuthFailed) as caught:
            verifier.step(client.get_client_final().encode())
        assert_password_failed(caught)
        return
    reply, done = verifier.step(client.get_client_final().encode())
    assert done
    code, payload = auth_message(reply)
    assert code == pq.AUTH_SASL_FINAL
    client.set_server_final(payload.decode())  # raises if our signature were wrong


@pytest.mark.parametrize("password", [PASSWORD, "wrong"])
def test_our_authenticator_against_scramps_server(password: str) -> None:
    info = derive_scram_info(PASSWORD, b"0123456789abcdef")
    server = ScramMechanism().make_server(lambda _name: info.as_tuple())
    authenticator = ServerAuthenticator(USER, password)
    framed = authenticator.respond(pq.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    assert framed is not None
    body = password_body(framed)
    mechanism, pos = pq.read_cstr(body, 0)
    assert mechanism == b"SCRAM-SHA-256"
    (length,) = pq.INT32.unpack_from(body, pos)
    assert length == len(body) - pos - 4
    server.set_client_first(body[pos + 4 :].decode())
    framed = authenticator.respond(pq.AUTH_SASL_CONTINUE, server.get_server_first().encode())
    assert framed is not None
    if password != PASSWORD:
        with pytest.raises(Exception, match="client keys don't match"):
            server.set_client_final(password_body(framed).decode())
        return
    server.set_client_final(password_body(framed).decode())
    assert authenticator.respond(pq.AUTH_SASL_FINAL, server.get_server_final().encode()) is None
    assert authenticator.respond(pq.AUTH_OK, b"") is None


def test_scram_keys_match_rfc7677_test_vector() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    info = derive_scram_info("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    message = f"{bare},{server_first},{final}".encode()
    signature = hmac.new(info.server_key, message, hashlib.sha256).digest()
    assert base64.b64encode(signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client_proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(info.stored_key, message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(client_proof, client_signature))
    assert hashlib.sha256(client_key).digest() == info.stored_key


def test_scram_keys_agree_with_scramp() -> None:
    info = UserSecret(USER, PASSWORD).scram_info()
    salt, stored, server, iterations = ScramMechanism().make_auth_info(PASSWORD, salt=info.salt)
    assert (salt, stored, server, iterations) == info.as_tuple()
    assert len(info.salt) == 16 and iterations == 4096


def test_password_sasl_prep_rejects_is_used_raw_like_postgresql() -> None:
    # U+0007 is prohibited by SASLprep; PostgreSQL then hashes the raw password, as libpq does.
    odd = "bell\x07pw"
    libpq_login(make_verifier("scram-sha-256", USER, UserSecret(USER, odd)), odd)


def test_unknown_users_get_a_stable_mock_salt_like_postgresql() -> None:
    def server_first(user: str, known: bool) -> dict[str, str]:
        verifier = scram_verifier(user, known)
        verifier.first()
        reply, _ = verifier.step(sasl_initial(b"n,,n=,r=abc"))
        return dict(p.split("=", 1) for p in auth_message(reply)[1].decode().split(","))

    ghost1, ghost2 = server_first("ghost", False), server_first("ghost", False)
    other = server_first("nobody", False)
    real = server_first(USER, True)
    assert ghost1["s"] == ghost2["s"] != other["s"]
    assert len(base64.b64decode(ghost1["s"])) == len(base64.b64decode(real["s"])) == 16
    assert ghost1["i"] == real["i"] == "4096"
    assert ghost1["r"].startswith("abc") and ghost1["r"] != ghost2["r"]


# --------------------------------------------------------------------------- malformed client input

BAD_INITIAL = [
    b"",
    b"SCRAM-SHA-256",  # no NUL
    b"SCRAM-SHA-256\x00",  # no length
    b"SCRAM-SHA-256\x00\x00\x00",  # short length
    b"SCRAM-SHA-256\x00\xff\xff\xff\xff",  # -1: no data
    b"SCRAM-SHA-256\x00" + struct.pack("!i", 50) + b"n,,n=,r=abc",  # length beyond the data
    b"SCRAM-SHA-256\x00" + struct.pack("!i", 2) + b"n,,n=,r=abc",  # length short of the data
    sasl_initial(b"p=tls-server-end-point,,n=,r=abc"),
    sasl_initial(b"x,,n=,r=abc"),
    sasl_initial(b"n,a=bob,n=,r=abc"),
    sasl_initial(b"n,,"),
    sasl_initial(b"n,,r=abc"),
    sasl_initial(b"n,,n="),
    sasl_initial(b"n,,n=,r="),
    sasl_initial(b"n,,n=,r=a,b"),
    sasl_initial(b"n,,n=,r=abc,r=def"),
    sasl_initial(b"n,,m=ext,n=,r=abc"),
    sasl_initial(b"n,,n=,m=ext,r=abc"),
    sasl_initial(b"n,,n=,r=ab\x01c"),
    sasl_initial(b"n,,n=,r=\xff\xfe"),
    sasl_initial(b"\x00\x00\x00"),
]


@pytest.mark.parametrize("body", BAD_INITIAL, ids=range(len(BAD_INITIAL)))
@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown"])
def test_garbage_sasl_initial_response_is_auth_failed(body: bytes, known: bool) -> None:
    verifier = scram_verifier(known=known)
    verifier.first()
    with pytest.raises(AuthFailed) as caught:
        verifier.step(body)
    assert caught.value.error.sqlstate in ("08P01", "28P01") and caught.value.error.fatal


def test_channel_binding_request_is_refused_with_postgresqls_words() -> None:
    verifier = scram_verifier()
    with pytest.raises(AuthFailed) as caught:
        verifier.step(sasl_initial(b"p=tls-server-end-point,,n=,r=abc"))
    assert caught.value.error.sqlstate == "08P01"
    assert caught.value.error.message == "malformed SCRAM message"
    assert "includes channel binding data" in (caught.value.error.detail or "")


@pytest.mark.parametrize("mechanism", [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-1", b"PLAIN", b""])
def test_other_sasl_mechanisms_are_refused(mechanism: bytes) -> None:
    with pytest.raises(AuthFailed) as caught:
        scram_verifier().step(sasl_initial(b"n,,n=,r=abc", mechanism))
    assert caught.value.error.sqlstate == "08P01"
    assert caught.value.error.message == "client selected an invalid SASL authentication mechanism"


def _after_first(known: bool = True) -> tuple[ClientVerifier, str]:
    verifier = scram_verifier(known=known)
    verifier.first()
    reply, _ = verifier.step(sasl_initial(b"n,,n=,r=abc"))
    return verifier, auth_message(reply)[1].decode()


def _bad_finals(server_first: str) -> list[bytes]:
    nonce = dict(p.split("=", 1) for p in server_first.split(","))["r"]
    good, _ = libpq_client_final(PASSWORD, "n=,r=abc", server_first, "n,,")
    proof = good.rsplit(",p=", 1)[1]
    return [
        b"",
        b"\xff\xfe",
        b"garbage",
        b"c=biws",
        f"c=biws,r={nonce}".encode(),  # no proof
        f"c=biws,r={nonce}x,p={proof}".encode(),  # nonce mismatch
        f"c=biws,r=abc,p={proof}".encode(),  # client nonce only
        f"c=eSws,r={nonce},p={proof}".encode(),  # gs2 header differs from the first message
        f"c=cD10bHMtdW5pcXVlLCxBQUFB,r={nonce},p={proof}".encode(),  # channel binding data
        f"c=!!!,r={nonce},p={proof}".encode(),  # bad base64
        f"c=biws,r={nonce},p=!!!".encode(),
        f"c=biws,r={nonce},p=AAAA".encode(),  # proof of the wrong length
        f"c=biws,r={nonce},p=".encode(),
        f"r={nonce},c=biws,p={proof}".encode(),  # attributes out of order
        (good + ",x=1").encode(),
        good.encode() + b"\x00",
    ]


@pytest.mark.parametrize("index", range(16))
@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown"])
def test_garbage_sasl_response_is_auth_failed(index: int, known: bool) -> None:
    verifier, server_first = _after_first(known)
    body = _bad_finals(server_first)[index]
    with pytest.raises(AuthFailed) as caught:
        verifier.step(body)
    assert caught.value.error.sqlstate in ("08P01", "28P01") and caught.value.error.fatal


def test_random_bytes_never_raise_anything_but_auth_failed() -> None:
    rng = random.Random(20240531)
    alphabet = b"nyp=,rcsiSCRAM-SHA-256\x00\xff biws" + bytes(range(0, 256, 7))
    for _ in range(1500):
        size = rng.randrange(0, 80)
        junk = bytes(rng.choice(alphabet) for _ in range(size))
        for body in (junk, sasl_initial(junk), sasl_initial(b"n,,n=,r=" + junk)):
            verifier = scram_verifier(known=rng.random() < 0.5)
            try:
                reply, done = verifier.step(body)
            except AuthFailed:
                continue
            assert not done and auth_message(reply)[0] == pq.AUTH_SASL_CONTINUE
            with pytest.raises(AuthFailed):
                verifier.step(junk)


def test_step_after_scram_completed_is_a_protocol_violation() -> None:
    verifier = scram_verifier()
    libpq_login(verifier, PASSWORD)
    with pytest.raises(AuthFailed) as caught:
        verifier.step(b"c=biws")
    assert caught.value.error.sqlstate == "08P01"


@pytest.mark.parametrize("method", ["md5", "password"])
@pytest.mark.parametrize("body", [b"", b"no-terminator", b"two\x00parts\x00", b"\x00\x00"])
def test_malformed_password_message_is_08P01(method: str, body: bytes) -> None:
    verifier = make_verifier(method, USER, secret())
    verifier.first()
    with pytest.raises(AuthFailed) as caught:
        verifier.step(body)
    assert caught.value.error.sqlstate == "08P01"
    assert caught.value.error.message == "invalid password packet size"


@pytest.mark.parametrize("method", ["md5", "password"])
def test_empty_password_is_refused(method: str) -> None:
    verifier = make_verifier(method, USER, UserSecret(USER, ""))
    verifier.first()
    with pytest.raises(AuthFailed) as caught:
        verifier.step(b"\x00")
    assert_password_failed(caught)


@pytest.mark.parametrize("method", ["md5", "password"])
def test_second_password_message_is_refused(method: str) -> None:
    verifier = make_verifier(method, USER, secret())
    salt = auth_message(verifier.first())[1]
    answer = md5_password(PASSWORD, USER, salt) if method == "md5" else PASSWORD
    assert verifier.step(answer.encode() + b"\x00") == (b"", True)
    with pytest.raises(AuthFailed):
        verifier.step(answer.encode() + b"\x00")


def test_md5_client_sending_the_cleartext_password_is_refused() -> None:
    verifier = make_verifier("md5", USER, secret())
    verifier.first()
    with pytest.raises(AuthFailed) as caught:
        verifier.step(PASSWORD.encode() + b"\x00")
    assert_password_failed(caught)


# --------------------------------------------------------------------------- md5 formula


def test_md5_matches_postgresqls_stored_hash() -> None:
    # pg_authid.rolpassword for role "postgres" with password "postgres" (PostgreSQL < 14 default).
    stored = "md53175bce1d3201d16594cebf9d7eb3f9d"
    salt = b"\x01\x02\x03\x04"
    expected = "md5" + hashlib.md5(stored[3:].encode() + salt).hexdigest()
    assert md5_password("postgres", "postgres", salt) == expected


def test_md5_verifier_accepts_what_libpq_sends() -> None:
    verifier = make_verifier("md5", "postgres", UserSecret("postgres", "postgres"))
    code, salt = auth_message(verifier.first())
    assert code == pq.AUTH_MD5
    libpq_answer = "md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt).hexdigest()
    assert verifier.step(libpq_answer.encode() + b"\x00") == (b"", True)


# --------------------------------------------------------------------------- UserSecret


def test_user_secret_is_frozen_caches_its_keys_and_hides_the_password() -> None:
    s = UserSecret(USER, PASSWORD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.password = "x"  # type: ignore[misc]
    first = s.scram_info()
    assert s.scram_info() is first
    assert PASSWORD not in repr(s) and first.stored_key.hex() not in repr(first)
    assert s == UserSecret(USER, PASSWORD) and hash(s) == hash(UserSecret(USER, PASSWORD))


# --------------------------------------------------------------------------- ServerAuthenticator


def test_authenticator_answers_cleartext_and_md5() -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    assert auth.respond(pq.AUTH_CLEARTEXT, b"") == pq.password_message(PASSWORD.encode() + b"\x00")
    salt = b"abcd"
    expected = pq.password_message(md5_password(PASSWORD, USER, salt).encode() + b"\x00")
    assert auth.respond(pq.AUTH_MD5, salt) == expected
    assert auth.respond(pq.AUTH_OK, b"") is None


def test_authenticator_md5_with_a_bad_salt() -> None:
    with pytest.raises(AuthFailed) as caught:
        ServerAuthenticator(USER, PASSWORD).respond(pq.AUTH_MD5, b"ab")
    assert caught.value.error.sqlstate == "08P01"


@pytest.mark.parametrize(
    "offered",
    [b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00", b"SCRAM-SHA-256\x00SCRAM-SHA-256-PLUS\x00\x00"],
)
def test_authenticator_picks_plain_scram_when_plus_is_offered_too(offered: bytes) -> None:
    framed = ServerAuthenticator(USER, PASSWORD).respond(pq.AUTH_SASL, offered)
    assert framed is not None
    body = password_body(framed)
    assert body.startswith(b"SCRAM-SHA-256\x00")
    assert body[len(b"SCRAM-SHA-256\x00") + 4 :].startswith(b"n,,")


@pytest.mark.parametrize("offered", [b"SCRAM-SHA-256-PLUS\x00\x00", b"\x00", b"OAUTHBEARER\x00\x00"])
def test_authenticator_refuses_sasl_without_plain_scram(offered: bytes) -> None:
    with pytest.raises(AuthFailed) as caught:
        ServerAuthenticator(USER, PASSWORD).respond(pq.AUTH_SASL, offered)
    assert caught.value.error.sqlstate == "28000"
    assert caught.value.error.message == "unsupported authentication method requested by server"


@pytest.mark.parametrize("password", [None, ""])
@pytest.mark.parametrize(
    "code,payload",
    [(pq.AUTH_CLEARTEXT, b""), (pq.AUTH_MD5, b"abcd"), (pq.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")],
)
def test_authenticator_without_password_names_upstream_dsn(
    password: str | None, code: int, payload: bytes
) -> None:
    with pytest.raises(AuthFailed) as caught:
        ServerAuthenticator(USER, password).respond(code, payload)
    err = caught.value.error
    assert err.sqlstate == "28P01" and err.fatal
    assert "upstream DSN has no" in err.message and "upstream.dsn" in (err.detail or "")


def test_authenticator_without_password_is_fine_for_trust() -> None:
    assert ServerAuthenticator(USER, None).respond(pq.AUTH_OK, b"") is None


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 4, 13, 99])
def test_authenticator_refuses_unsupported_methods(code: int) -> None:
    with pytest.raises(AuthFailed) as caught:
        ServerAuthenticator(USER, PASSWORD).respond(code, b"")
    err = caught.value.error
    assert err.sqlstate == "28000" and err.fatal
    assert err.message == "unsupported authentication method requested by server"
    assert str(code) in (err.detail or "")


def _authenticator_at_final() -> tuple[ServerAuthenticator, ClientVerifier, bytes]:
    verifier = scram_verifier()
    auth = ServerAuthenticator(USER, PASSWORD)
    code, payload = auth_message(verifier.first())
    framed = auth.respond(code, payload)
    assert framed is not None
    reply, _ = verifier.step(password_body(framed))
    framed = auth.respond(*auth_message(reply))
    assert framed is not None
    reply, done = verifier.step(password_body(framed))
    assert done
    code, server_final = auth_message(reply)
    assert code == pq.AUTH_SASL_FINAL
    return auth, verifier, server_final


@pytest.mark.parametrize(
    "tamper",
    [
        lambda good: b"v=" + base64.b64encode(bytes(32)),
        lambda good: good[:-4] + b"AAA=",
        lambda good: b"v=!!!",
        lambda good: b"e=invalid-proof",
        lambda good: b"",
        lambda good: b"\xff",
    ],
)
def test_authenticator_rejects_a_wrong_server_signature(tamper) -> None:  # type: ignore[no-untyped-def]
    auth, _, good = _authenticator_at_final()
    with pytest.raises(AuthFailed) as caught:
        auth.respond(pq.AUTH_SASL_FINAL, tamper(good))
    assert caught.value.error.sqlstate == "28000"


def test_authenticator_refuses_auth_ok_before_the_server_proved_itself() -> None:
    auth, _, _ = _authenticator_at_final()
    with pytest.raises(AuthFailed) as caught:
        auth.respond(pq.AUTH_OK, b"")
    assert caught.value.error.sqlstate == "08P01"


@pytest.mark.parametrize("code", [pq.AUTH_SASL_CONTINUE, pq.AUTH_SASL_FINAL])
def test_authenticator_refuses_sasl_messages_out_of_order(code: int) -> None:
    with pytest.raises(AuthFailed) as caught:
        ServerAuthenticator(USER, PASSWORD).respond(code, b"r=abc,s=c2FsdA==,i=4096")
    assert caught.value.error.sqlstate == "08P01"


@pytest.mark.parametrize(
    "server_first",
    [b"", b"\xff", b"garbage", b"r=other,s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096", b"e=other-error"],
)
def test_authenticator_rejects_a_bad_server_first_message(server_first: bytes) -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    auth.respond(pq.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(AuthFailed) as caught:
        auth.respond(pq.AUTH_SASL_CONTINUE, server_first)
    assert caught.value.error.sqlstate == "08P01"


def test_authenticator_user_name_saslprep_rejects_still_logs_in() -> None:
    user = "bell\x07user"
    run(make_verifier("scram-sha-256", user, UserSecret(user, PASSWORD)), ServerAuthenticator(user, PASSWORD))
