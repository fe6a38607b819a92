"""The API cannot decrypt: the running API process holds only the public key, and nothing in
its environment opens what it stored, while a worker's private key does. An existing database
of legacy Fernet rows is moved to sealed boxes in place, with the system running."""

from __future__ import annotations

import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from service.config import Settings
from service.models import ExchangeCredential
from service.security import (
    CredentialDecryptionError,
    CredentialsKeyError,
    opener_from_settings,
)
from tests.conftest import CREDENTIALS_PAIR
from tests.integration.conftest import new_user, start_worker
from tests.support import (
    ROOT,
    ApiUser,
    ServiceProcess,
    eventually,
    free_port,
    wait_for_port,
    worker_opener,
)

pytestmark = [pytest.mark.integration]

TOP10 = {"index": "TOP10", "size": "5000", "direction": "long"}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    entries = (entry.decode(errors="replace") for entry in raw.split(b"\0") if entry)
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _opens_with(value: str, ciphertext: str) -> bool:
    """Whether `value`, taken as any kind of key this service knows (private keys, legacy
    Fernet keys), opens `ciphertext`."""
    for setting in ("credentials_private_keys", "credentials_keys"):
        try:
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                **{
                    "credentials_private_keys": None,
                    "credentials_keys": None,
                    "credentials_public_key": None,
                    setting: value,
                },
            )
            opener_from_settings(settings).open(ciphertext)
        except (CredentialsKeyError, CredentialDecryptionError, ValueError):
            continue
        return True
    return False


async def _stored_row(sessions: object, user_id: uuid.UUID) -> ExchangeCredential:
    async with sessions() as session:  # type: ignore[operator]
        row = await session.get(ExchangeCredential, user_id)
    assert row is not None
    return row


async def _user_id(sessions: object, email: str) -> uuid.UUID:
    from service.users.repository import get_user_by_email

    async with sessions() as session:  # type: ignore[operator]
        user = await get_user_by_email(session, email)
    assert user is not None
    return user.id


async def _trader(sessions: object, sim: httpx.AsyncClient) -> ApiUser:
    email, token = await new_user(sessions)
    user = ApiUser(
        email=email,
        token=token,
        api_key=f"AR{secrets.token_hex(8).upper()}",
        api_secret=secrets.token_hex(16),
    )
    account = {"api_key": user.api_key, "api_secret": user.api_secret, "balance": "1000000"}
    (await sim.post("/sim/accounts", json=account)).raise_for_status()
    user.user_id = await _user_id(sessions, email)
    return user


async def _store(http: httpx.AsyncClient, user: ApiUser) -> None:
    stored = await http.put(
        "/api/credentials",
        json={"api_key": user.api_key, "api_secret": user.api_secret},
        headers=user.headers,
    )
    assert stored.status_code == 200, stored.text


async def _trade_until_final(http: httpx.AsyncClient, user: ApiUser) -> dict[str, object]:
    created = await http.post("/api/positions", json=TOP10, headers=user.headers)
    assert created.status_code == 202, created.text

    async def final() -> dict[str, object] | None:
        body = (await http.get(created.headers["Location"], headers=user.headers)).json()
        return body if body["status"] in ("ACTIVE", "FAILED") else None

    result: dict[str, object] = await eventually(final, timeout=60, message="a final status")
    return result


@pytest.mark.asyncio
async def test_the_running_api_cannot_decrypt_a_stored_credential(
    service_env: dict[str, str], sessions: object, sim: httpx.AsyncClient, tmp_path: Path
) -> None:
    port = free_port()
    # Started as every test starts the API (tests/support.py, role_env): given the run's
    # environment, which holds the private key, the API child gets the public key only.
    assert service_env["CREDENTIALS_PRIVATE_KEYS"] == CREDENTIALS_PAIR.private_key
    api = ServiceProcess(["api", "--port", str(port)], service_env, tmp_path / "api.log")
    worker = start_worker(service_env, tmp_path)
    try:
        wait_for_port(port, api.process)
        user = await _trader(sessions, sim)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await _store(http, user)
            assert user.user_id is not None
            row = await _stored_row(sessions, user.user_id)
            assert row.api_secret_encrypted.startswith(f"nacl1:{CREDENTIALS_PAIR.key_id}:")

            # What the API process holds: no private key, no Fernet key, and nothing in its
            # environment that opens the row it just wrote.
            environ = _environ(api.pid)
            assert environ["CREDENTIALS_PUBLIC_KEY"] == CREDENTIALS_PAIR.public_key
            assert environ.get("CREDENTIALS_PRIVATE_KEYS", "") == ""
            assert environ.get("CREDENTIALS_KEYS", "") == ""
            assert not any(CREDENTIALS_PAIR.private_key in value for value in environ.values())
            # Nor does a `.env` the API would read (its working directory is the checkout).
            dotenv = ROOT / ".env"
            assert not dotenv.exists() or CREDENTIALS_PAIR.private_key not in dotenv.read_text()
            openers = [
                name
                for name, value in environ.items()
                for ciphertext in (row.api_key_encrypted, row.api_secret_encrypted)
                if _opens_with(value, ciphertext)
            ]
            assert openers == []

            # The worker's private key opens it, and the worker trades with it.
            assert worker_opener().open(row.api_secret_encrypted) == user.api_secret
            assert worker_opener().open(row.api_key_encrypted) == user.api_key
            body = await _trade_until_final(http, user)
            assert body["status"] == "ACTIVE", body
        assert user.api_secret not in api.output()
    finally:
        worker.stop()
        api.stop()


@pytest.mark.asyncio
async def test_a_legacy_fernet_database_moves_to_sealed_boxes_in_place(
    service_env: dict[str, str], sessions: object, sim: httpx.AsyncClient, tmp_path: Path
) -> None:
    legacy_key = Fernet.generate_key().decode()
    # Before the move: the contract's original set-up, CREDENTIALS_KEYS alone everywhere (the
    # API then encrypts with Fernet, and says once that it holds a key that decrypts).
    legacy_env = {
        **service_env,
        "CREDENTIALS_KEYS": legacy_key,
        "CREDENTIALS_PUBLIC_KEY": "",
        "CREDENTIALS_PRIVATE_KEYS": "",
    }
    port = free_port()
    legacy_api = ServiceProcess(
        ["api", "--port", str(port)], legacy_env, tmp_path / "legacy-api.log", all_keys=True
    )
    processes = [legacy_api, start_worker(legacy_env, tmp_path)]
    try:
        wait_for_port(port, legacy_api.process)
        users = [await _trader(sessions, sim) for _ in range(3)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for user in users:
                await _store(http, user)
            first = await _trade_until_final(http, users[0])
            assert first["status"] == "ACTIVE", first
        assert "credentials.api_holds_decryption_key" in legacy_api.output()
        legacy_api.stop()
        for user in users:
            assert user.user_id is not None
            row = await _stored_row(sessions, user.user_id)
            assert not row.api_secret_encrypted.startswith("nacl1:")  # a Fernet token
        # A row no listed key opens: reported and left as it is.
        lost = await _trader(sessions, sim)
        assert lost.user_id is not None
        foreign = Fernet(Fernet.generate_key())
        async with sessions() as session:  # type: ignore[operator]
            session.add(
                ExchangeCredential(
                    user_id=lost.user_id,
                    api_key_encrypted=foreign.encrypt(b"LOSTKEY0001").decode(),
                    api_secret_encrypted=foreign.encrypt(b"lost-secret").decode(),
                    api_key_hint="LOST…0001",
                )
            )

        # The move, with the system running: the workers get the private key beside the
        # legacy one, then `credentials rotate` re-seals every row, one per transaction.
        moving_env = {**service_env, "CREDENTIALS_KEYS": legacy_key}
        processes.append(start_worker(moving_env, tmp_path))
        processes[1].stop(timeout=60)
        rotated = subprocess.run(
            [sys.executable, "-m", "service", "credentials", "rotate"],
            cwd=ROOT,
            env=moving_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # Other tests of the run may have left rows no key of the run opens: not ours.
        assert str(lost.user_id) in rotated.stderr, rotated.stdout + rotated.stderr
        assert f"sealed for key {CREDENTIALS_PAIR.key_id}" in rotated.stdout
        for user in users:
            assert str(user.user_id) not in rotated.stderr
            assert user.user_id is not None
            row = await _stored_row(sessions, user.user_id)
            assert row.api_key_encrypted.startswith(f"nacl1:{CREDENTIALS_PAIR.key_id}:")
            assert row.api_secret_encrypted.startswith(f"nacl1:{CREDENTIALS_PAIR.key_id}:")
        assert not (await _stored_row(sessions, lost.user_id)).api_secret_encrypted.startswith(
            "nacl1:"
        )

        # After: CREDENTIALS_KEYS dropped. A worker with the private key alone trades for the
        # migrated users (service_env: CREDENTIALS_KEYS empty), through an API with the public
        # key alone.
        processes.append(start_worker(service_env, tmp_path))
        processes[2].stop(timeout=60)
        port = free_port()
        api = ServiceProcess(["api", "--port", str(port)], service_env, tmp_path / "api.log")
        processes.append(api)
        wait_for_port(port, api.process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for user in users:
                body = await _trade_until_final(http, user)
                assert body["status"] == "ACTIVE", body
    finally:
        for process in processes:
            process.stop()


@pytest.mark.asyncio
async def test_processes_that_need_no_key_run_without_any(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """Beat, the migration, the seed, `users create`, and Celery's app as Flower loads it,
    with no credentials key at all (the simulator of every test already runs so:
    tests/support.py, role_env)."""
    keyless = {
        **service_env,
        "CREDENTIALS_KEYS": "",
        "CREDENTIALS_PUBLIC_KEY": "",
        "CREDENTIALS_PRIVATE_KEYS": "",
        # Beat's sends go to a queue of their own that nothing consumes (removed with the
        # run's keys: tests/conftest.py, _clean_redis).
        "CELERY_QUEUE": f"{service_env['CELERY_QUEUE']}-keyless",
    }
    for command in (
        ["migrate"],
        ["seed"],
        ["users", "create", f"keyless-{secrets.token_hex(4)}@example.com"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "service", *command],
            cwd=ROOT,
            env=keyless,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (command, done.stdout + done.stderr)
    flower_app = subprocess.run(
        [sys.executable, "-c", "import celery_app, workers.trade_executor, workers.maintenance"],
        cwd=ROOT,
        env=keyless,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert flower_app.returncode == 0, flower_app.stderr
    schedule = tmp_path / "beat-schedule"
    beat = ServiceProcess(
        ["beat", "-s", str(schedule)], keyless, tmp_path / "beat.log", all_keys=True
    )
    try:

        async def scheduling() -> bool:
            assert beat.process.poll() is None, beat.output()
            return "Sending due task" in beat.output()

        await eventually(scheduling, timeout=30, message="Beat sending its jobs")
    finally:
        beat.stop()
    # And the API and a worker without a key refuse to start, saying what they lack.
    port = str(free_port())
    api = ServiceProcess(["api", "--port", port], keyless, tmp_path / "api.log", all_keys=True)
    worker = ServiceProcess(["worker"], keyless, tmp_path / "worker.log", all_keys=True)
    try:
        assert api.process.wait(timeout=60) != 0
        assert worker.process.wait(timeout=60) == 2
    finally:
        api.stop()
        worker.stop()
    assert "CREDENTIALS_PUBLIC_KEY" in api.output()
    assert "CREDENTIALS_PRIVATE_KEYS" in worker.output()
