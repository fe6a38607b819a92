"""Helpers shared by the tests: processes we start, polling with a deadline, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from service.bybit.types import Instrument
    from service.security import CredentialOpener, CredentialSealer

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ApiUser:
    """A user as the API sees it: the bearer token, and the Bybit key stored for it."""

    email: str
    token: str
    api_key: str
    api_secret: str
    user_id: uuid.UUID | None = None  # when the caller needs it (the benchmarks do)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout}s (last: {last!r})")


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


# The credentials settings that open stored keys, and what each role is denied of them, as
# the deployment does (README, Credentials at rest): the API seals and holds nothing that
# opens; Beat and the simulator need no key at all. An empty value counts as unset (and wins
# over a `.env` in the checkout).
DECRYPTION_KEYS = ("CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_KEYS")
# The workers' alone too: the key that authenticates the market snapshot they size with.
_SNAPSHOT_KEY = "MARKET_SNAPSHOT_KEY"
_ALL_KEYS = (*DECRYPTION_KEYS, "CREDENTIALS_PUBLIC_KEY", _SNAPSHOT_KEY)
_DENIED_KEYS = {
    "api": (*DECRYPTION_KEYS, _SNAPSHOT_KEY),
    **dict.fromkeys(("beat", "simulator", "migrate", "seed", "users"), _ALL_KEYS),
}


def role_env(role: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with the credentials keys `role` must not hold emptied."""
    return {**env, **dict.fromkeys(_DENIED_KEYS.get(role, ()), "")}


def worker_opener() -> CredentialOpener:
    """What a worker opens stored credentials with: this process holds the test run's private
    key (tests/conftest.py), as a worker does. It seals too, for the current key."""
    from service.config import get_settings
    from service.security import opener_from_settings

    return opener_from_settings(get_settings())


def foreign_sealer() -> CredentialSealer:
    """Seals for a new key pair that no process of the run holds."""
    from service.security import PublicKeySealer, generate_key_pair, parse_public_key

    return PublicKeySealer(parse_public_key(generate_key_pair().public_key))


class ServiceProcess:
    """A `python -m service ...` child process (or another `module`'s) with its output in a
    file. The service's roles get only the credentials keys their job needs (`role_env`);
    `all_keys=True` passes `env` as it is (a test of a misconfigured or legacy process)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        module: str = "service",
        all_keys: bool = False,
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        if module == "service" and args and not all_keys:
            env = role_env(args[0], env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopping it stops its pool children too
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole group, as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def terminate_main(self, timeout: float = 30.0) -> int:
        """SIGTERM to the main process only, as Kubernetes or systemd send it; wait for exit."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self._log.closed:
            return
        if self.process.poll() is None:
            # SIGTERM to the main process only, as an orchestrator does: a Celery worker then
            # shuts its pool down warmly (a signal to every child would kill running tasks).
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Nothing of ours may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


async def prepare_database(url: str) -> None:
    """Create the database if missing, apply the real migrations and load the catalogue."""
    from service.db import create_engine, create_session_factory, scope_for
    from service.migrations import ensure_database, upgrade
    from service.seed import seed_indices

    await ensure_database(url)
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url, pool_size=1)
    try:
        await seed_indices(scope_for(create_session_factory(engine)))
    finally:
        await engine.dispose()


def run_command(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m service ARGS` to completion, failing on a non-zero exit (with only the
    credentials keys the command needs: `role_env`)."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=role_env(args[0], env) if args else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def forget_unacked(client: object, queue: str) -> None:
    """Drop this run's messages from kombu's shared `unacked` hash and `unacked_index` (those
    a killed worker held). Left there, a worker of a later run restores them, once they are
    older than the visibility timeout, onto this run's queue: a key this run would leave
    behind after all."""
    import json

    for tag, raw in client.hscan_iter("unacked"):  # type: ignore[attr-defined]
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key == queue:
            client.hdel("unacked", tag)  # type: ignore[attr-defined]
            client.zrem("unacked_index", tag)  # type: ignore[attr-defined]


async def register_key(api_key: str, api_secret: str, **rights: object) -> None:
    """Make a Bybit key known to the simulator the tests' processes trade on (PUT
    /api/credentials asks it what the key may do): a funded account whose key trades only,
    unless `rights` (`read_only`, `permissions`, `ips`, `balance`) say otherwise."""
    import httpx

    from service.config import get_settings

    async with httpx.AsyncClient(base_url=get_settings().bybit_base_url, timeout=10) as sim:
        response = await sim.post(
            "/sim/accounts",
            json={"api_key": api_key, "api_secret": api_secret, "balance": "1000000", **rights},
        )
        response.raise_for_status()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus scrape's samples: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def k8s_container_env() -> dict[str, set[str]]:
    """Every container of deploy/k8s ("deployment/container") and the environment variable
    names it is given: its own `env` entries and whatever its Secrets and ConfigMaps hold."""
    import yaml

    documents = [
        document
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]
    holds = {
        d["metadata"]["name"]: set(d.get("stringData") or d.get("data") or {})
        for d in documents
        if d["kind"] in ("Secret", "ConfigMap")
    }
    given: dict[str, set[str]] = {}
    for document in documents:
        pod = document.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            names = {entry["name"] for entry in container.get("env", [])}
            for source in container.get("envFrom", []):
                ref = source.get("secretRef") or source.get("configMapRef")
                names |= holds[ref["name"]]
            given[f"{document['metadata']['name']}/{container['name']}"] = names
    return given


def btc_instrument() -> Instrument:
    """BTCUSDT's filters as Bybit lists them, for snapshots made by hand."""
    from decimal import Decimal

    from service.bybit.types import Instrument

    return Instrument(
        symbol="BTCUSDT",
        status="Trading",
        qty_step=Decimal("0.001"),
        min_order_qty=Decimal("0.001"),
        max_order_qty=Decimal("1190"),
        max_mkt_order_qty=Decimal("100"),
        min_notional_value=Decimal("5"),
        tick_size=Decimal("0.1"),
    )
