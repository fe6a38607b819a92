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
from typing import TYPE_CHECKING

from service.config import STACK_ENV_FILE, Settings, get_settings
from service.logging import configure_logging

if TYPE_CHECKING:
    from service.db import SessionScope


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
    from service.db import create_engine, create_session_factory, scope_for
    from service.errors import DomainError

    engine = create_engine(get_settings().database_url, pool_size=1)
    try:
        return await _users(args, scope_for(create_session_factory(engine)))
    except DomainError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()


async def _users(args: argparse.Namespace, sessions: SessionScope) -> int:
    """`users create|tokens|revoke|revoke-token`: what each prints, never a token's hash (and
    the token itself only once, when it is issued)."""
    from service.positions.service import cancel_all_pending
    from service.users import service as users_service

    if args.users_command == "revoke":
        user, revoked = await users_service.revoke_user(sessions, args.email)
        print(f"revoked {revoked} token(s) of {args.email}", flush=True)
        if args.cancel_pending:
            cancelled = await cancel_all_pending(sessions, user.id)
            print(f"cancelled {len(cancelled)} PENDING position(s)", flush=True)
            for position_id in cancelled:
                print(f"  {position_id}", flush=True)
        return 0
    if args.users_command == "revoke-token":
        async with sessions() as session:
            revoked_at = await users_service.revoke_token(session, args.token_id)
        print(f"token {args.token_id} revoked at {revoked_at.isoformat()}", flush=True)
        return 0
    if args.users_command == "tokens":
        async with sessions() as session:
            tokens = await users_service.list_user_tokens(session, args.email)
        print("id  created  expires  revoked")
        for token in tokens:
            revoked_text = token.revoked_at.isoformat() if token.revoked_at else "-"
            print(
                f"{token.id}  {token.created_at.isoformat()}  {token.expires_at.isoformat()}  "
                f"{revoked_text}",
                flush=True,
            )
        return 0
    async with sessions() as session:
        issued = await users_service.create_user_with_token(session, args.email)
    print(
        f"user {issued.user.email} ({issued.user.id}); token {issued.token_id} expires "
        f"{issued.expires_at.isoformat()}; bearer token:"
    )
    # The token alone on the last line, for scripts: TOKEN=$(... | tail -n1)
    print(issued.token, flush=True)
    return 0


async def credentials(args: argparse.Namespace) -> int:
    if args.credentials_command == "keygen":
        return credentials_keygen()
    return await credentials_rotate()


def credentials_keygen() -> int:
    """A new sealed-box key pair, as KEY=VALUE lines (the public key last: `| tail -n1`)."""
    from service.security import generate_key_pair

    pair = generate_key_pair()
    print(f"# credentials key pair {pair.key_id} (service/security.py)")
    print("# PRIVATE: the workers only (first in their comma-separated list); keep it secret")
    print(f"CREDENTIALS_PRIVATE_KEYS={pair.private_key}")
    print("# PUBLIC: the API (it seals with it and cannot open anything)")
    print(f"CREDENTIALS_PUBLIC_KEY={pair.public_key}", flush=True)
    return 0


async def credentials_rotate() -> int:
    from service.credentials.service import rotate_all
    from service.db import create_engine, create_session_factory, scope_for
    from service.security import CredentialsKeyError, opener_from_settings

    settings = get_settings()
    try:
        opener = opener_from_settings(settings)
    except CredentialsKeyError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        report = await rotate_all(scope_for(create_session_factory(engine)), opener)
    finally:
        await engine.dispose()
    target = (
        f"sealed for key {opener.key_ids[0]} (the first CREDENTIALS_PRIVATE_KEYS key)"
        if opener.key_ids
        else "re-encrypted with the first CREDENTIALS_KEYS key (legacy scheme)"
    )
    print(f"{report.rotated} credential(s) {target}", flush=True)
    if report.unreadable:
        users = ", ".join(str(u) for u in report.unreadable)
        print(
            f"{len(report.unreadable)} credential(s) could not be opened with any key in "
            "CREDENTIALS_PRIVATE_KEYS or CREDENTIALS_KEYS and were left as they are "
            f"(users {users}): their owners must store their keys again",
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

    from service.http_edge import EdgeHttpProtocol

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
        # httptools with the request head bounded (MAX_REQUEST_HEADER_BYTES, 431 past it).
        http=EdgeHttpProtocol,
        server_header=False,  # no `server: uvicorn` banner
    )
    return 0


def _prepare_worker_metrics() -> None:
    """Pool processes share their metrics through files: the directory must be known before
    the metrics are created, that is before anything of ours is imported."""
    if not get_settings().worker_metrics_port or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="trader-metrics-")
    os.environ["TRADER_METRICS_DIR_OWNED"] = "1"


def _can_open_credentials(settings: Settings) -> bool:
    """A worker refuses to start without a key that opens stored credentials (its pool would
    only fail every basket): CREDENTIALS_PRIVATE_KEYS, or the legacy CREDENTIALS_KEYS."""
    import structlog

    from service.security import CredentialsKeyError, opener_from_settings

    try:
        opener_from_settings(settings)
    except CredentialsKeyError as error:
        logger = structlog.stdlib.get_logger("service.worker")
        logger.error("worker.credentials_keys_unusable", error=str(error))
        return False
    return True


def _snapshot_key_usable(settings: Settings) -> bool:
    """A worker refuses to start with a guessable MARKET_SNAPSHOT_KEY (short, or the manifests'
    placeholder: whoever can write to Redis could sign a forged snapshot with it), and warns
    without one (the legacy set-up: snapshots trusted unsigned). Checked here, not by the
    settings, whose validation errors would print the value."""
    import structlog

    logger = structlog.stdlib.get_logger("service.worker")
    key = settings.market_snapshot_key
    if key is None:
        logger.warning(
            "worker.market_snapshot_unauthenticated",
            detail="MARKET_SNAPSHOT_KEY is not set: market snapshots are trusted unsigned",
        )
        return True
    secret = key.get_secret_value()
    if len(secret) < 32 or secret.strip().upper() == "CHANGE-ME":
        logger.error(
            "worker.market_snapshot_key_unusable",
            error="MARKET_SNAPSHOT_KEY must be a random secret of at least 32 characters "
            "(e.g. `openssl rand -hex 32`), not a placeholder",
        )
        return False
    return True


def worker(args: argparse.Namespace) -> int:
    _prepare_worker_metrics()
    from celery_app import app

    _configure()  # before Celery starts, so its early warnings are JSON lines too
    settings = get_settings()
    if not _can_open_credentials(settings):
        return 2
    if not _snapshot_key_usable(settings):
        return 2
    extra = list(args.celery_args)
    # --quiet: no ASCII banner on stdout, which would break the one-JSON-object-per-line rule.
    argv = ["--quiet", "worker", "--loglevel", settings.log_level, "-Q", settings.celery_queue]
    # No mingle: it would take revoked task ids from whoever answers its hello (remote
    # control is off: celery_app.py). Gossip and heartbeats stay on, and must: gossip's
    # consumer of the events exchange is what lets the worker notice a broker that went away
    # while every pool slot was busy (no BRPOP pending). Without it the worker never
    # reconnects and stops consuming for good (tests/reliability/test_infrastructure.py fails
    # every time so). What it reads can at most make this worker send a task, which whoever
    # can write to the broker can do anyway.
    argv += ["--without-mingle"]
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


_PRIVATE, _PUBLIC = "CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_PUBLIC_KEY"
_LEGACY = "CREDENTIALS_KEYS"
# The workers' market snapshot key: the worker both writes the snapshot and sizes with it.
_SNAPSHOT = "MARKET_SNAPSHOT_KEY"
# What each process of the dev stack is denied (an empty value counts as unset and wins over
# `.env`): the API seals and holds nothing that opens; Beat and the simulator need no key.
_STACK_DENIED_KEYS = {
    "api": (_PRIVATE, _LEGACY, _SNAPSHOT),
    "beat": (_PRIVATE, _PUBLIC, _LEGACY, _SNAPSHOT),
    "simulator": (_PRIVATE, _PUBLIC, _LEGACY, _SNAPSHOT),
}


def _ensure_dev_credentials_keys() -> None:
    """The dev stack's credentials key pair: from the environment or .env, else a new pair
    written to .env (kept, so stored credentials stay openable across restarts)."""
    from service.security import generate_key_pair, public_key_of

    given = Settings(_env_file=".env")
    private = given.credentials_private_keys
    if private is not None:
        if not given.credentials_public_key:
            # The API's key is the current (first) private key's public key.
            first = private.get_secret_value().split(",")[0]
            os.environ[_PUBLIC] = public_key_of(first)
        return
    if given.credentials_public_key:
        raise SystemExit(
            f"{_PUBLIC} is set without {_PRIVATE}: the stack's worker could not open what the "
            "API seals (set both, or neither and a pair is generated into .env)"
        )
    pair = generate_key_pair()
    _append_to_env_file({_PRIVATE: pair.private_key, _PUBLIC: pair.public_key})
    print(f"generated a development credentials key pair ({pair.key_id}) in .env", flush=True)
    if given.credentials_keys is not None:
        print(
            f"{_LEGACY} (legacy) stays for the worker: `python -m service credentials rotate` "
            f"re-seals the stored keys, then {_LEGACY} can go",
            flush=True,
        )


def _ensure_dev_snapshot_key() -> None:
    """The dev stack's MARKET_SNAPSHOT_KEY: from the environment or .env, else a new one
    written to .env (its worker then sizes only from snapshots it wrote itself)."""
    import secrets

    if Settings(_env_file=".env").market_snapshot_key is not None:
        return
    _append_to_env_file({_SNAPSHOT: secrets.token_hex(32)})
    print(f"generated a development {_SNAPSHOT} in .env", flush=True)


def _append_to_env_file(values: dict[str, str]) -> None:
    """Add `NAME=value` lines to the working directory's .env (kept: the dev stack's keys
    must outlive a restart), readable by its owner only: it holds secrets."""
    env_file = Path(".env")
    existing = env_file.read_text() if env_file.exists() else ""
    unterminated = bool(existing) and not existing.endswith("\n")
    with env_file.open("a") as handle:
        handle.write("\n" if unterminated else "")
        handle.write("".join(f"{name}={value}\n" for name, value in values.items()))
    env_file.chmod(0o600)


def _stack_env(role: str) -> dict[str, str]:
    return {**os.environ, **dict.fromkeys(_STACK_DENIED_KEYS.get(role, ()), "")}


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

    _ensure_dev_credentials_keys()
    _ensure_dev_snapshot_key()
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
            processes[name] = subprocess.Popen(  # noqa: S603  # our own interpreter
                command, env=_stack_env(name)
            )
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
