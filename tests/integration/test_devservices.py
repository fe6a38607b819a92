"""The embedded PostgreSQL and Redis of `scripts/dev test` and `scripts/dev up` (forced here
with DEV_SERVICES=embedded, beside the machine's own servers, which are never touched): they
serve, and nothing of them is left running once the run or the stack ends."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.devservices import answers
from tests.support import ROOT, free_port

pytestmark = pytest.mark.integration

STARTED = re.compile(r"embedded (PostgreSQL|Redis) on 127\.0\.0\.1:(\d+) \(data in (\S+)\)")


@pytest.fixture
def services_dir() -> Iterator[Path]:
    # Not pytest's tmp_path (0700): as root, the embedded PostgreSQL runs as its own account,
    # which must be able to enter the directory.
    directory = Path(tempfile.mkdtemp(prefix="trader-devservices-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _embedded_env(services_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            *("DATABASE_URL", "REDIS_URL", "BYBIT_BASE_URL"),
            *("TEST_PG_HOST", "TEST_PG_PORT", "TEST_REDIS_URL"),
        )
    }
    env.update({"DEV_SERVICES": "embedded", "DEV_SERVICES_DIR": str(services_dir)})
    return env


def _stopped(port: int, deadline_seconds: float = 20) -> bool:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if not answers("127.0.0.1", port, timeout=0.2):
            return True
        time.sleep(0.1)
    return False


def _test_run_on_embedded_servers(env: dict[str, str]) -> dict[str, tuple[int, Path]]:
    """A test run (a nested pytest) forced onto embedded servers: what it started, by kind,
    checked to be stopped and its throwaway data gone once the run ended."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"),
            "tests/unit/test_hot_path.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    started = {kind: (int(port), Path(data)) for kind, port, data in STARTED.findall(done.stdout)}
    # One line says which servers the run used.
    assert set(started) == {"PostgreSQL", "Redis"}, done.stdout
    for kind, (port, data) in started.items():
        assert _stopped(port), f"{kind} still answers on {port}"
        assert not data.exists(), f"{kind}'s throwaway data left in {data}"
    return started


def test_a_test_run_on_embedded_servers_stops_them_and_removes_their_data(
    services_dir: Path,
) -> None:
    _test_run_on_embedded_servers(_embedded_env(services_dir))
    assert list(services_dir.iterdir()) == []


def test_a_checkout_its_postgres_account_cannot_enter_uses_a_directory_it_can(
    services_dir: Path,
) -> None:
    """A checkout under a 0700 directory (as `mktemp -d` makes): as root, the embedded
    PostgreSQL runs as its own account, so its data goes where that account can go."""
    locked = services_dir / "locked"
    locked.mkdir(mode=0o700)
    env = {**_embedded_env(services_dir), "DEV_SERVICES_DIR": str(locked / ".dev" / "services")}
    started = _test_run_on_embedded_servers(env)
    if os.geteuid() == 0:
        assert not started["PostgreSQL"][1].is_relative_to(locked)


def test_up_on_embedded_servers_serves_and_ctrl_c_stops_everything(services_dir: Path) -> None:
    api_port, simulator_port = free_port(), free_port()
    # No credentials key given: `up` generates a pair into its directory's .env.
    env = {k: v for k, v in _embedded_env(services_dir).items() if not k.startswith("CREDENTIALS_")}
    log = services_dir / "up.log"
    with log.open("wb") as output:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "service", "up"),
                *("--api-port", str(api_port), "--simulator-port", str(simulator_port)),
            ],
            cwd=services_dir,  # nothing written to the checkout (.env)
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        try:
            deadline = time.monotonic() + 120
            ready = False
            while time.monotonic() < deadline and up.poll() is None:
                try:
                    ready = (
                        httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=2).status_code
                        == 200
                    )
                except httpx.HTTPError:
                    ready = False
                if ready:
                    break
                time.sleep(0.2)
            assert ready, log.read_text(errors="replace")[-3000:]
            # The API was started with the public key only; the worker holds the private one.
            pids = dict(re.findall(r"started (\w+) \(pid (\d+)\)", log.read_text()))
            dotenv = (services_dir / ".env").read_text()
            assert "CREDENTIALS_PRIVATE_KEYS=" in dotenv
            assert "CREDENTIALS_PUBLIC_KEY=" in dotenv
            raw = Path(f"/proc/{pids['api']}/environ").read_bytes().split(b"\0")
            api_env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
            # Emptied: the API child does not get the private key .env holds (the worker
            # reads it from there: the demo's trade below goes ACTIVE).
            assert api_env["CREDENTIALS_PRIVATE_KEYS"] == api_env["CREDENTIALS_KEYS"] == ""
            assert "CREDENTIALS_PUBLIC_KEY" not in api_env  # read from .env too
            # As a new user would, in another shell in the same directory: the demo reaches
            # the stack's own (embedded) database and simulator through its stack file.
            demo = subprocess.run(
                [
                    *(sys.executable, "-m", "service", "demo"),
                    *("--api-url", f"http://127.0.0.1:{api_port}"),
                ],
                cwd=services_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert demo.returncode == 0, demo.stdout + demo.stderr
            assert "status: ACTIVE" in demo.stdout
            # Ctrl-C: SIGINT to the terminal's foreground process group.
            os.killpg(up.pid, signal.SIGINT)
            assert up.wait(timeout=60) == 0
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(timeout=10)
    text = log.read_text(errors="replace")
    started = {kind: (int(port), Path(data)) for kind, port, data in STARTED.findall(text)}
    assert set(started) == {"PostgreSQL", "Redis"}, text[-3000:]
    for kind, (port, _) in started.items():
        assert _stopped(port), f"{kind} still answers on {port}"
    pg_data = started["PostgreSQL"][1]
    # Stopped cleanly, and the data kept for the next `up`.
    assert (pg_data / "PG_VERSION").exists()
    assert not (pg_data / "postmaster.pid").exists()
    for port in (api_port, simulator_port):
        assert _stopped(port)
    # The stack's addresses are gone with it: later commands fall back to the defaults.
    assert not (services_dir / ".dev" / "stack.env").exists()
