"""Throwaway PostgreSQL clusters for the integration tests.

This module owns `Cluster`: initdb into a directory, a private port and socket directory, a
pg_hba.conf built from the caller's lines, roles with passwords, start/stop/restart, and removal.
It is test infrastructure only; nothing in the shipped packages imports it.

Binaries are found in this order: ``$PGSIDECAR_PG_BIN``, the binaries bundled inside the
``pgserver`` wheel (so a machine with no PostgreSQL installed can still run the suite), then the
newest ``/usr/lib/postgresql/*/bin``.

PostgreSQL refuses to run as root. When the tests run as root the cluster's files are owned by,
and every server process runs as, an unprivileged system user (``pgsidecar``, created with
``useradd`` on first use); the commands are started with ``subprocess``'s ``user=``/``group=``
arguments, so no ``su`` or login shell is involved.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
RUN_AS_USER = "pgsidecar"
HOST = "127.0.0.1"
# A Unix socket path must fit in sun_path (108 bytes on Linux, including the NUL).
_MAX_SOCKET_PATH = 100

# Clusters started in this process and not yet stopped: stopped at interpreter exit so that a
# crashed or interrupted test run leaves no postmaster behind. Test infrastructure only.
_LIVE: set[Cluster] = set()


class ClusterError(RuntimeError):
    """A cluster command failed; the message carries the command's output and the server log."""


@dataclass(frozen=True, slots=True)
class _RunAs:
    uid: int
    gid: int
    name: str


def find_bin_dir() -> Path:
    """Directory holding initdb, pg_ctl and postgres."""
    env = os.environ.get("PGSIDECAR_PG_BIN")
    if env:
        path = Path(env)
        if not (path / "pg_ctl").exists():
            raise ClusterError(f"PGSIDECAR_PG_BIN={env!r} has no pg_ctl")
        return path
    # Locate pgserver without importing it: its package import touches platformdirs and
    # warns about XDG_RUNTIME_DIR when run as root.
    spec = importlib.util.find_spec("pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()]
    if candidates:
        return max(candidates, key=lambda p: _version_key(p.parent.name))
    raise ClusterError(
        "no PostgreSQL binaries: set PGSIDECAR_PG_BIN, pip install pgserver, or install postgresql"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name)) or (0,)


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run_as() -> _RunAs | None:
    """The unprivileged user to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(RUN_AS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", RUN_AS_USER],
            check=True, capture_output=True, text=True,
        )
        entry = pwd.getpwnam(RUN_AS_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid, RUN_AS_USER)


def _grant_search(path: Path) -> None:
    """Let other users traverse every ancestor of `path` (adds o+x only where it is missing).

    Needed when root's temp or install directories are 0700 and the server runs as another user.
    """
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("cluster.grant_search path=%s", parent)
            parent.chmod(mode | stat.S_IXOTH)


def _chown_tree(path: Path, run_as: _RunAs) -> None:
    os.chown(path, run_as.uid, run_as.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), run_as.uid, run_as.gid)


def _child_env(home: Path) -> dict[str, str]:
    # Drop libpq/PG* variables so a developer's PGPORT or PGDATA cannot steer the tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", HOME=str(home), TZ="UTC")
    return env


def _parse_hba_md5_roles(lines: Iterable[str]) -> set[str]:
    """Roles named in an hba line whose method is md5: their password must be stored as md5,
    otherwise the server silently upgrades the exchange to SCRAM."""
    roles: set[str] = set()
    for line in lines:
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        method_at = 3 if tokens[0] == "local" else 4
        if len(tokens) > method_at and tokens[method_at] == "md5":
            roles.update(r.strip('"') for r in tokens[2].split(","))
    return roles


class Cluster:
    """One PostgreSQL cluster in `base_dir`: data/, sock/ (or a short temp dir), postgres.log."""

    def __init__(self, base_dir: Path, bin_dir: Path, port: int, socket_dir: Path,
                 run_as: _RunAs | None, owns_socket_dir: bool) -> None:
        self.base_dir = base_dir
        self.bin_dir = bin_dir
        self._port = port
        self.socket_dir = socket_dir
        self._run_as = run_as
        self._owns_socket_dir = owns_socket_dir
        self.superuser = SUPERUSER
        self.log_path = base_dir / "postgres.log"

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        base_dir: str | os.PathLike[str],
        *,
        hba_lines: list[str] | None = None,
        users: dict[str, str | None] | None = None,
        password_encryption: str = "scram-sha-256",
        settings: dict[str, str] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
    ) -> Cluster:
        """initdb, configure, start and add roles. `base_dir` is created if needed and must be
        empty or absent. `users` maps role -> password (None: no password); every role is
        LOGIN SUPERUSER. A role named in an `md5` hba line gets its password stored as md5,
        all others use `password_encryption`. `settings` are extra postgresql.conf entries
        (values are written verbatim, so quote strings)."""
        base = Path(base_dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
        if any(base.iterdir()):
            raise ClusterError(f"cluster base_dir {base} is not empty")
        bins = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        run_as = _run_as()

        sock = base / "sock"
        owns_sock = False
        if len(str(sock / ".s.PGSQL.65535")) > _MAX_SOCKET_PATH:
            sock = Path(tempfile.mkdtemp(prefix="pgsc-"))
            owns_sock = True
        sock.mkdir(exist_ok=True)
        if run_as is not None:
            _grant_search(bins)
            _grant_search(base)
            _grant_search(sock)
            _chown_tree(base, run_as)
            os.chown(sock, run_as.uid, run_as.gid)

        cluster = cls(base, bins, free_port(), sock, run_as, owns_sock)
        try:
            cluster._initdb()
            cluster._write_config(password_encryption, settings or {})
            cluster._write_hba(hba_lines or [])
            cluster._first_start()
            cluster._create_roles(users or {}, password_encryption,
                                  _parse_hba_md5_roles(hba_lines or []))
        except BaseException:
            cluster.cleanup()
            raise
        return cluster

    def _initdb(self) -> None:
        self._run([
            str(self.bin_dir / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ])

    def _write_config(self, password_encryption: str, extra: dict[str, str]) -> None:
        conf = {
            "listen_addresses": f"'{HOST}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "32MB",
            "max_wal_size": "1GB",
            "password_encryption": f"'{password_encryption}'",
            "timezone": "'UTC'",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            **extra,
        }
        self._write_owned(self.datadir / "pgsidecar.conf",
                          "".join(f"{k} = {v}\n" for k, v in conf.items()))
        self._write_port()
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# added by tests/helpers/cluster.py\ninclude 'pgsidecar.conf'\n"
                    "include 'pgsidecar_port.conf'\n")

    def _write_port(self) -> None:
        self._write_owned(self.datadir / "pgsidecar_port.conf", f"port = {self._port}\n")

    def _write_hba(self, lines: list[str]) -> None:
        body = [
            "# written by tests/helpers/cluster.py: caller's lines first, then trust for the rest",
            *lines,
            f"host all all {HOST}/32 trust",
            "local all all trust",
        ]
        self._write_owned(self.datadir / "pg_hba.conf", "\n".join(body) + "\n")

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _first_start(self) -> None:
        # The port was free when picked but another process may take it before the postmaster
        # binds; pick again a few times rather than fail the session.
        for attempt in range(5):
            try:
                self.start()
                return
            except ClusterError:
                if attempt == 4 or "already in use" not in self.log_text():
                    raise
                self._port = free_port()
                self._write_port()

    def _create_roles(self, users: dict[str, str | None], default_enc: str,
                      md5_roles: set[str]) -> None:
        if not users:
            return
        import psycopg  # noqa: PLC0415 (test dependency, only needed when roles are asked for)
        from psycopg import sql  # noqa: PLC0415

        with psycopg.connect(host=str(self.socket_dir), port=self._port, user=self.superuser,
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            for role, password in users.items():
                enc = "md5" if role in md5_roles else default_enc
                conn.execute(sql.SQL("SET password_encryption = {}").format(sql.Literal(enc)))
                if password is None:
                    stmt = sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role))
                else:
                    stmt = sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password))
                conn.execute(stmt)
            conn.execute("RESET password_encryption")

    # -- properties ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def datadir(self) -> Path:
        return self.base_dir / "data"

    @property
    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def dsn(self, user: str = SUPERUSER, password: str | None = None,
            database: str = "postgres") -> str:
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        return f"postgresql://{auth}@{HOST}:{self._port}/{urllib.parse.quote(database, safe='')}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"Cluster(port={self._port}, datadir={str(self.datadir)!r})"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: int = 60) -> None:
        self._pg_ctl("start", "-w", "-t", str(timeout), "-l", str(self.log_path))
        _LIVE.add(self)

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        if not self.running:
            _LIVE.discard(self)
            return
        try:
            self._pg_ctl("stop", "-w", "-t", str(timeout), "-m", mode)
        except ClusterError:
            # pg_ctl gave up (timeout) or could not run: make sure the postmaster is gone.
            self._kill()
        _LIVE.discard(self)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port (clients keep their DSN)."""
        self.stop(mode)
        self.start()

    def reload(self) -> None:
        self._pg_ctl("reload")

    def cleanup(self) -> None:
        """Stop the server (if running) and remove every file the cluster made."""
        try:
            self.stop("immediate")
        finally:
            _LIVE.discard(self)
            shutil.rmtree(self.base_dir, ignore_errors=True)
            if self._owns_socket_dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- internals -----------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's (we are not root)
            pass
        return pid

    def _kill(self, wait: float = 30.0) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown; children follow the postmaster
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self._postmaster_pid() == pid:
            time.sleep(0.05)
        if self._postmaster_pid() == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _pg_ctl(self, *args: str) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.datadir), *args])

    def _run(self, cmd: list[str], timeout: float = 120) -> str:
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
        # Output goes to files, not pipes: the postmaster started by `pg_ctl start` can inherit
        # a pipe and keep it open, which would make run() wait for the server to exit.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=self.base_dir, env=_child_env(self.base_dir), timeout=timeout,
                    text=True, check=False, **kwargs,  # type: ignore[call-overload]
                )
            except subprocess.TimeoutExpired as exc:
                raise ClusterError(f"{Path(cmd[0]).name} timed out after {timeout} s") from exc
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            tail = "\n".join(self.log_text().splitlines()[-20:])
            raise ClusterError(
                f"{Path(cmd[0]).name} {' '.join(cmd[1:])} "
                f"exited {proc.returncode}\n{output}\n--- server log tail ---\n{tail}"
            )
        return output


def live_clusters() -> Iterator[Cluster]:
    """Clusters this process started and has not stopped (for leak checks)."""
    return iter(list(_LIVE))


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.stop("immediate")
