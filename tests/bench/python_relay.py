"""The floor for any PostgreSQL proxy written in Python: a uvloop relay that frames messages.

Each client gets its own upstream connection (no pooling, no authentication of its own: the
startup and authentication exchange passes through). Both directions are framed: every chunk
read is walked message by message over the 5-byte headers, and only complete messages are
forwarded, in one write per chunk, as a pooler must do to find the ReadyForQuery that ends a
transaction. Nothing else: no statement tracking, no statistics, no cache.

bench_pgbench.py runs it as the ``python-relay`` target beside pgsidecar and PgBouncer, so the
results show, on the same machine in the same run, how much of pgsidecar's distance to PgBouncer
any Python relay pays (the event loop's per-callback cost) and how much is pgsidecar's own work.

    python tests/bench/python_relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""
from __future__ import annotations

import asyncio
import struct
import sys

try:
    import uvloop
except ImportError:  # the same fallback as pgsidecar's
    uvloop = None

_LEN = struct.Struct("!I")
_ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: no TLS here


class _Framing(asyncio.Protocol):
    """Buffers what arrives and forwards the complete messages to ``peer``."""

    def __init__(self, startup: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Framing | None = None
        self.buf = bytearray()
        self.startup = startup  # the client's first message has no type byte
        self.early: list[bytes] = []  # what arrived before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        while self.startup:  # untyped: SSLRequest / GSSENCRequest (answered 'N' here), then startup
            if n < 8 or n < _LEN.unpack_from(buf, 0)[0]:
                return
            length = _LEN.unpack_from(buf, 0)[0]
            if length == 8 and _LEN.unpack_from(buf, 4)[0] in _ENCRYPTION_REQUESTS:
                del buf[:8]
                n -= 8
                self.transport.write(b"N")  # type: ignore[union-attr]
                continue
            pos = length
            self.startup = False
        unpack = _LEN.unpack_from
        while n - pos >= 5:
            end = pos + 1 + unpack(buf, pos + 1)[0]
            if end > n:
                break
            pos = end
        if not pos:
            return
        chunk = bytes(buf[:pos])
        del buf[:pos]
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(chunk)
        else:
            peer.transport.write(chunk)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


async def _connect_upstream(client: _Framing, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    try:
        _, upstream = await loop.create_connection(lambda: _Framing(startup=False), host, port)
    except OSError:
        if client.transport is not None:
            client.transport.close()
        return
    upstream.peer = client
    client.peer = upstream
    for chunk in client.early:
        upstream.transport.write(chunk)  # type: ignore[union-attr]
    client.early.clear()


async def main(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()

    def accept() -> _Framing:
        client = _Framing(startup=True)
        loop.create_task(_connect_upstream(client, host, port))
        return client

    server = await loop.create_server(accept, "127.0.0.1", listen_port)
    print("relay listening", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    args = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    if uvloop is not None:
        uvloop.run(main(*args))
    else:
        asyncio.run(main(*args))
