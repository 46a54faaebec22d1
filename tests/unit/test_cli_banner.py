"""agent.cli.reachable: the address the start-up banner tells clients to connect to."""
from __future__ import annotations

import socket

import pytest

from agent.cli import reachable


@pytest.mark.parametrize(("listen", "shown"), [
    ("0.0.0.0", "127.0.0.1"),  # the image's --listen 0.0.0.0:6432
    ("", "127.0.0.1"),
    ("::", "[::1]"),
    ("::1", "[::1]"),
    ("fe80::1", "[fe80::1]"),
    ("127.0.0.1", "127.0.0.1"),
    ("10.1.2.3", "10.1.2.3"),
    ("db-proxy.internal", "db-proxy.internal"),
])
def test_a_wildcard_is_shown_as_loopback_and_ipv6_in_brackets(listen: str, shown: str) -> None:
    assert reachable(listen) == shown


def test_the_address_shown_for_a_wildcard_listener_accepts_connections() -> None:
    with socket.create_server(("0.0.0.0", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection((reachable("0.0.0.0"), port), timeout=5):
            conn, _ = server.accept()
            conn.close()
