"""A throwaway PostgreSQL server for tests and examples, in a temporary folder, on loopback.

``PostgresServer(folder).start()`` runs ``initdb`` and ``pg_ctl start`` on a free port of
127.0.0.1 (no Unix socket outside the folder, trust authentication for loopback only), as an
unprivileged user when the tests run as root (``postgres`` refuses to run as root), and
``stop()`` stops it (``pg_ctl stop -m immediate``). Never a server we did not start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BINARIES", "PostgresServer", "missing_binaries"]

BINARIES = ("initdb", "pg_ctl", "postgres")
#: The unprivileged user the server runs as when the tests run as root.
_USER = "nobody"


def missing_binaries() -> list[str]:
    """The PostgreSQL server programs not on PATH (empty when they all are)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server of our own, in a new temporary folder (removed by ``stop``).

    Mutable state: ``port`` and ``running``.
    """

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its folders are private to root, and the server's user
        # must reach its own.
        self.folder = Path(tempfile.mkdtemp(prefix="pachyderm-pg-"))
        self.data = self.folder / "data"
        self.port = 0
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() != 0:
            return list(args)
        user = pwd.getpwnam(_USER)
        return [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            *args,
        ]

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(  # noqa: S603 - our own programs, arguments we made
            self._as_owner(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}")

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            os.chmod(self.folder, 0o755)  # noqa: S103 - the server's user must enter it
            user = pwd.getpwnam(_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.port = _free_port()
        self._start()
        return self

    def _start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            "-c fsync=on -c max_connections=100 -c shared_buffers=64MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.running = True

    def restart(self) -> None:
        """Stop (``-m fast``: connections are dropped) and start again, on the same port.

        (Not ``pg_ctl restart``, which replays the saved command line and loses the quoting of
        the empty socket folder.)
        """
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False
        self._start()

    def stop(self) -> None:
        """Stop the server (if it runs) and remove its folder."""
        try:
            if self.running:
                self.running = False
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""
