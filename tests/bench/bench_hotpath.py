"""In-process cost of the proxy's per-message path, without sockets or PostgreSQL.

One ClientSession and one pooled ServerConnection are wired to transports that only count
what is written; each iteration feeds the client's bytes for one transaction and the
server's recorded answer, exactly as the event loop would. It measures what our Python code
adds per transaction (the syscalls a real relay also pays are not in it), and can run
under cProfile (``--profile``). Not a test: it asserts nothing about speed.

    python tests/bench/bench_hotpath.py [--iterations N] [--repeats N] [--profile] [--opcodes]
    python tests/bench/bench_hotpath.py --tree /other/checkout   # the same, for another version
    OPCODES_TOP=30 python tests/bench/bench_hotpath.py --opcodes   # more functions than the top 8
    python tests/bench/bench_hotpath.py --instructions simple [--no-stats] [--tree DIR]

``--instructions WORKLOAD`` counts the CPU instructions of one transaction, C included (the regex
engine, the allocator, the extension): it runs this script twice under valgrind's callgrind, with
N and 2N iterations of that workload, and divides the difference by N. Unlike a time, the count
does not depend on how busy the machine is (about ±0.5 % run to run); it needs valgrind.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv else str(Path(__file__).resolve().parents[2])
sys.path.insert(0, _TREE)

from config.loader import load_settings, parse_dsn  # noqa: E402
from proxy.client import ClientSession  # noqa: E402
from proxy.listener import ProxyServer  # noqa: E402
from proxy.server import ServerConnection  # noqa: E402


class CountingTransport:
    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


WORKLOADS = ("simple", "extended", "prepared", "distinct-10k")


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def workloads() -> dict[str, tuple[bytes, bytes]]:
    """(client bytes, server answer) for one transaction of each pgbench -S protocol."""
    sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"
    row = _msg(b"T", b"\x00\x01abalance\x00" + b"\x00" * 6 + b"\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00")
    data = _msg(b"D", b"\x00\x01\x00\x00\x00\x010")
    done = _msg(b"C", b"SELECT 1\x00") + _msg(b"Z", b"I")
    simple = (_msg(b"Q", sql + b"\x00"), row + data + done)
    psql = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    parse = _msg(b"P", b"\x00" + psql + b"\x00\x00\x00")
    bind = _msg(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0548213\x00\x00")
    describe = _msg(b"D", b"P\x00")
    execute = _msg(b"E", b"\x00\x00\x00\x00\x00")
    sync = _msg(b"S", b"")
    extended = (
        parse + bind + describe + execute + sync,
        _msg(b"1", b"") + _msg(b"2", b"") + row + data + done,
    )
    nparse = _msg(b"P", b"P0_1\x00" + psql + b"\x00\x00\x00")
    nbind = _msg(b"B", b"\x00P0_1\x00\x00\x00\x00\x01\x00\x00\x00\x0548213\x00\x00")
    prepared = (nbind + describe + execute + sync, _msg(b"2", b"") + row + data + done)
    return {"simple": simple, "extended": extended, "prepared": prepared, "_prepare": (nparse + sync, b"")}


def count_opcodes(step: Callable[[], object], n: int) -> Counter[str]:
    """Python bytecodes executed by ``n`` calls of ``step``, per function: a count that does not
    depend on how busy the machine is (the Python-level analogue of callgrind's instructions).
    Runs the step ``n`` times first so that memos and specialisations are warm. Flushes of the
    statistics recorder fall within the ``n`` steps in proportion (every 256 statements). It
    does not weigh what one bytecode does in C (a regex, a substring search, a syscall): six
    ``in`` tests replaced by one ``bytes.translate`` saved ~2 µs and only 14 bytecodes."""
    for _ in range(n):
        step()
    counts: Counter[str] = Counter()

    def tracer(frame: FrameType, event: str, _arg: object) -> Callable[..., object]:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{Path(code.co_filename).stem}.{code.co_name}"] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            step()
    finally:
        sys.settrace(None)
    return counts


async def measure(iterations: int, profile: bool, repeats: int, stats: bool = True, opcodes: bool = False,
                  only: str | None = None) -> None:
    overrides = {"upstream.dsn": "postgresql://bench@127.0.0.1:1/bench", "stats.enabled": stats}
    settings = load_settings(None, env={}, overrides=overrides)
    listener = ProxyServer(settings, parse_dsn(settings.upstream.dsn))
    pool = listener.pool_for("bench", "bench")
    server = ServerConnection(pool.endpoint)
    server.connection_made(CountingTransport())  # type: ignore[arg-type]
    server._connected = True  # noqa: SLF001 - a connection past its startup
    pool.total = 1
    pool.defaults = {}
    pool.idle.append(server)
    client = ClientSession(listener)
    client_transport = CountingTransport()
    client.transport = client_transport  # type: ignore[assignment]
    client.pool = pool
    client.desired = pool.intern_settings({})
    client.database, client.user = "bench", "bench"
    if listener.stats is not None:
        client._scope = listener.stats.scope("bench", "bench")  # noqa: SLF001 - set at login normally
    server.applied = client.desired
    client.relay = True
    loads = workloads()
    # The named statement the prepared workload binds: prepared once, as pgbench does.
    client.data_received(loads["_prepare"][0])
    server.data_received(_msg(b"1", b"") + _msg(b"Z", b"I"))
    print(f"{'workload':12s} {'us/tx':>7s} {'client writes/tx':>17s}")
    # distinct-10k (bench_pgbench.py): 10,000 texts with distinct fingerprints, cycled; more than
    # stats.max_fingerprints, so half of them are never tracked.
    distinct = [_msg(b"Q", b"WITH x%d AS (SELECT abalance FROM pgbench_accounts WHERE aid = %d) SELECT * FROM x%d;\x00"
                     % (i, i * 7919 % 1_000_000, i)) for i in range(1, 10_001)]
    for name in WORKLOADS:
        if only is not None and name != only:
            continue
        requests = distinct if name == "distinct-10k" else [loads[name][0]]
        answer = loads["simple" if name == "distinct-10k" else name][1]
        for request in requests if len(requests) > 1 else ():  # each text fingerprinted once before
            client.data_received(request)
            server.data_received(answer)
        prof = cProfile.Profile() if profile else None
        writes0 = client_transport.writes
        best = float("inf")
        for _ in range(1 if profile else repeats):  # best of N: the machine is shared and noisy
            start = time.perf_counter()
            if prof:
                prof.enable()
            for i in range(iterations):
                client.data_received(requests[i % len(requests)])
                server.data_received(answer)
            if prof:
                prof.disable()
            best = min(best, time.perf_counter() - start)
            assert client.server is None and not server.pending, "transaction did not complete"
        per_tx = (client_transport.writes - writes0) / iterations / (1 if profile else repeats)
        print(f"{name:12s} {best / iterations * 1e6:7.2f} {per_tx:17.1f}")
        if opcodes:
            turn = iter(range(1 << 62))
            steps = 256 if len(requests) == 1 else 4096
            counts = count_opcodes(lambda: (client.data_received(requests[next(turn) % len(requests)]),
                                            server.data_received(answer)), steps)
            total = sum(counts.values())
            print(f"{'':12s} {total / steps:7.0f} bytecodes/tx: "
                  + ", ".join(f"{fn} {n / steps:.0f}" for fn, n in counts.most_common(int(os.environ.get("OPCODES_TOP", "8")))))
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def instructions(workload: str, iterations: int, extra: list[str]) -> int:
    """CPU instructions per transaction of ``workload``: callgrind's totals for 2N and N iterations."""
    totals = []
    for n in (iterations, 2 * iterations):
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
             "--only", workload, "--repeats", "1", "--iterations", str(n), *extra],
            capture_output=True, text=True, check=True,
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
        totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) // iterations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=30_000)
    p.add_argument("--repeats", type=int, default=7, help="report the best of this many runs")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-stats", action="store_true", help="stats.enabled: false (measurement off)")
    p.add_argument("--opcodes", action="store_true",
                   help="also count the Python bytecodes per transaction (repeatable on a noisy machine)")
    p.add_argument("--only", choices=WORKLOADS,
                   help="one workload (e.g. for callgrind: instructions per transaction, noise-free)")
    p.add_argument("--tree", help="measure the proxy code of another checkout (A/B comparisons)")
    p.add_argument("--instructions", choices=WORKLOADS,
                   help="CPU instructions per transaction of one workload, under callgrind (needs valgrind)")
    args = p.parse_args()
    if args.instructions:
        extra = (["--no-stats"] if args.no_stats else []) + (["--tree", args.tree] if args.tree else [])
        count = instructions(args.instructions, 4000, extra)
        print(f"{args.instructions}: {count} CPU instructions per transaction"
              f"{' (statistics off)' if args.no_stats else ''}")
        return
    asyncio.run(measure(args.iterations, args.profile, args.repeats, not args.no_stats, args.opcodes, args.only))


if __name__ == "__main__":
    main()
