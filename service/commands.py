"""What each `python -m service` command does. Settings are read here, at run time."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.config import STACK_ENV_FILE, Settings, get_settings
from service.logging import configure_logging


def _configure() -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


async def migrate(_: argparse.Namespace | None = None) -> int:
    from service.migrations import ensure_database, upgrade

    settings = get_settings()
    created = await ensure_database(settings.database_url)
    # Alembic's async env runs its own loop: keep it off ours.
    import asyncio

    await asyncio.to_thread(upgrade, settings.database_url)
    print(f"database migrated{' (created)' if created else ''}", flush=True)
    return 0


async def seed(_: argparse.Namespace | None = None) -> int:
    from service.db import create_engine, create_session_factory, scope_for
    from service.seed import seed_indices

    engine = create_engine(get_settings().database_url, pool_size=1)
    try:
        count = await seed_indices(scope_for(create_session_factory(engine)))
    finally:
        await engine.dispose()
    print(f"seeded {count} indices", flush=True)
    return 0


async def users(args: argparse.Namespace) -> int:
    from service.db import create_engine, create_session_factory, session_scope
    from service.errors import DomainError
    from service.users.service import create_user_with_token, revoke_user_tokens

    engine = create_engine(get_settings().database_url, pool_size=1)
    try:
        async with session_scope(create_session_factory(engine)) as session:
            if args.users_command == "revoke":
                revoked = await revoke_user_tokens(session, args.email)
                print(f"revoked {revoked} token(s) of {args.email}", flush=True)
                return 0
            issued = await create_user_with_token(session, args.email)
    except DomainError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()
    print(f"user {issued.user.email} ({issued.user.id}); bearer token:")
    # The token alone on the last line, for scripts: TOKEN=$(... | tail -n1)
    print(issued.token, flush=True)
    return 0


async def credentials(_: argparse.Namespace) -> int:
    from service.credentials.service import rotate_all
    from service.db import create_engine, create_session_factory, scope_for
    from service.security import CredentialCipher

    settings = get_settings()
    cipher = CredentialCipher(settings.credentials_keys.get_secret_value())
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        report = await rotate_all(scope_for(create_session_factory(engine)), cipher)
    finally:
        await engine.dispose()
    print(f"re-encrypted {report.rotated} credential(s) with the first key", flush=True)
    if report.unreadable:
        users = ", ".join(str(u) for u in report.unreadable)
        print(
            f"{len(report.unreadable)} credential(s) could not be decrypted with any key in "
            f"CREDENTIALS_KEYS and were left as they are (users {users}): their owners must "
            "store their keys again",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def simulator(args: argparse.Namespace) -> int:
    from service.simulator import run

    run(args.host, args.port, ip_limit=args.ip_limit)
    return 0


def api(args: argparse.Namespace) -> int:
    import uvicorn

    _configure()
    get_settings()  # fail fast on bad settings, before uvicorn starts
    uvicorn.run(
        args.app,
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )
    return 0


def _prepare_worker_metrics() -> None:
    """Pool processes share their metrics through files: the directory must be known before
    the metrics are created, that is before anything of ours is imported."""
    if not get_settings().worker_metrics_port or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="trader-metrics-")
    os.environ["TRADER_METRICS_DIR_OWNED"] = "1"


def worker(args: argparse.Namespace) -> int:
    _prepare_worker_metrics()
    from celery_app import app

    _configure()  # before Celery starts, so its early warnings are JSON lines too
    settings = get_settings()
    extra = list(args.celery_args)
    # --quiet: no ASCII banner on stdout, which would break the one-JSON-object-per-line rule.
    argv = ["--quiet", "worker", "--loglevel", settings.log_level, "-Q", settings.celery_queue]
    app.start(argv=[*argv, *extra])
    return 0


def beat(args: argparse.Namespace) -> int:
    from celery_app import app

    _configure()
    settings = get_settings()
    schedule = Path(tempfile.gettempdir()) / f"trader-beat-{os.getuid()}"
    argv = ["--quiet", "beat", "--loglevel", settings.log_level, "-s", str(schedule)]
    app.start(argv=[*argv, *args.celery_args])
    return 0


def _ensure_dev_credentials_key() -> None:
    """The dev stack's CREDENTIALS_KEYS: from the environment, else from .env, else a new
    key written to .env (kept, so stored credentials stay readable across restarts)."""
    if os.environ.get("CREDENTIALS_KEYS"):
        return
    env_file = Path(".env")
    if env_file.exists() and "CREDENTIALS_KEYS=" in env_file.read_text():
        return
    from service.security import generate_fernet_key

    with env_file.open("a") as handle:
        handle.write(f"CREDENTIALS_KEYS={generate_fernet_key()}\n")
    env_file.chmod(0o600)
    print("generated a development CREDENTIALS_KEYS in .env", flush=True)


def _configure_simulator(port: int, latency_ms: int) -> None:
    """Wait for the simulator, then give it a realistic exchange round trip."""
    import json
    import urllib.request

    url = f"http://127.0.0.1:{port}/sim/config"
    request = urllib.request.Request(  # a loopback URL we built
        url,
        data=json.dumps({"latency_ms": latency_ms}).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2):  # noqa: S310
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def up(args: argparse.Namespace) -> int:
    from service.devservices import provide

    _ensure_dev_credentials_key()
    # Given URLs (environment or .env, not an earlier stack's file) win; otherwise the
    # machine's servers when they answer, embedded ones when not (service/devservices.py),
    # stopped when the stack stops.
    given, defaults = Settings(_env_file=".env"), Settings.model_fields
    database_url = given.database_url
    explicit_database = database_url != defaults["database_url"].default
    explicit_redis = given.redis_url != defaults["redis_url"].default
    services = provide(
        "up",
        database_url=database_url if explicit_database else None,
        redis_url=given.redis_url if explicit_redis else None,
    )
    print(services.summary(), flush=True)
    stack_env = Path(STACK_ENV_FILE)
    try:
        # The stack's own simulator is the exchange for every process it starts.
        chosen = {"BYBIT_BASE_URL": f"http://127.0.0.1:{args.simulator_port}"}
        if not explicit_database:
            chosen["DATABASE_URL"] = services.database_url(database_url.rsplit("/", 1)[1])
        if not explicit_redis:
            chosen["REDIS_URL"] = services.redis_url(0)
        os.environ.update(chosen)
        stack_env.parent.mkdir(parents=True, exist_ok=True)
        stack_env.write_text("".join(f"{name}={value}\n" for name, value in chosen.items()))
        get_settings.cache_clear()
        return _run_stack(args)
    finally:
        stack_env.unlink(missing_ok=True)
        services.stop()


def _run_stack(args: argparse.Namespace) -> int:
    import asyncio

    asyncio.run(migrate())
    asyncio.run(seed())
    python = sys.executable
    roles = {
        "simulator": [python, "-m", "service", "simulator", "--port", str(args.simulator_port)],
        "api": [python, "-m", "service", "api", "--port", str(args.api_port)],
        "worker": [python, "-m", "service", "worker", "--concurrency", "2"],
        "beat": [python, "-m", "service", "beat"],
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for name, command in roles.items():
            processes[name] = subprocess.Popen(command)  # noqa: S603  # our own interpreter
            print(f"started {name} (pid {processes[name].pid})", flush=True)
            if name == "simulator":
                _configure_simulator(args.simulator_port, args.simulator_latency_ms)
        print(
            f"stack up: API http://127.0.0.1:{args.api_port}, simulator "
            f"http://127.0.0.1:{args.simulator_port}; Ctrl-C stops everything",
            flush=True,
        )
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}; stopping", flush=True)
                    stopping = True
            time.sleep(0.5)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


async def demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return await run_demo(
        api_url=args.api_url,
        index=args.index,
        size=args.size,
        direction=args.direction,
        wait_seconds=args.timeout,
    )
