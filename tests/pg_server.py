"""A throwaway PostgreSQL server for tests: its own data folder, 127.0.0.1 only, stopped afterwards.

Local (socket) connections are trusted, for setting up roles; TCP connections
need a password (scram-sha-256), so a client that connects has really used the
one it was given. As root the server runs as the ``postgres`` user (it refuses
root). ``restart()``, ``stop()`` and ``start()`` run its own ``pg_ctl`` as that
user, for tests of clients that outlive a restart. Without PostgreSQL's binaries
the tests that need it are skipped, unless ``PIPELINE_REQUIRE_POSTGRES=1`` (set
by ``.ci/run``), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


@dataclass
class Server:
    port: int
    folder: Path
    bindir: Path

    def url(self, user: str, password: str | None, database: str) -> str:
        """A URL on 127.0.0.1, the password percent-encoded as URLs need."""
        auth = f"{user}:{quote(password, safe='')}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser over the local socket."""
        proc = _run([str(self.bindir / "psql"), "-h", str(self.folder), "-p", str(self.port), "-U", "postgres",
                     "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", statement])
        return proc.stdout

    def add_role(self, user: str, password: str, database: str) -> None:
        self.sql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        self.sql(f"CREATE DATABASE {database} OWNER {user}")

    def stop(self) -> None:
        """Stop the server as a restart does (``-m fast``: clients are disconnected, open transactions
        rolled back)."""
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop"])

    def start(self) -> None:
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w",
              "-o", _options(self.port, self.folder), "start"])

    def restart(self) -> None:
        """``pg_ctl restart``: every connection of every client dies, the data stays."""
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"),
              "-m", "fast", "-w", "-o", _options(self.port, self.folder), "restart"])

    def is_up(self) -> bool:
        return subprocess.run(_as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"),
                                               "status"]), capture_output=True, timeout=30).returncode == 0


def bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _options(port: int, folder: Path) -> str:
    return f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running() -> Iterator[Server]:
    bins = bindir()
    if bins is None:
        raise FileNotFoundError("PostgreSQL's initdb is not installed")
    folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()
    _run([str(bins / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
          "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"])
    _run([str(bins / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o", _options(port, folder),
          "start"])
    try:
        yield Server(port, folder, bins)
    finally:
        subprocess.run(_as_server_user([str(bins / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
