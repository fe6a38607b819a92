"""The commands of `python -m service` (see the README for each)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence

_PASS_THROUGH = frozenset({"worker", "beat"})
DESCRIPTION = "Synthetic index trader: API, workers, simulator and operations commands."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up",
        help="the whole dev stack in the foreground: migrate, seed, simulator, API, worker, beat",
    )
    up.add_argument("--api-port", type=int, default=8000)
    up.add_argument("--simulator-port", type=int, default=8999)
    up.add_argument(
        "--simulator-latency-ms",
        type=int,
        default=40,
        help="delay the simulator adds to each exchange call, like a real round trip",
    )
    commands.add_parser("migrate", help="create the database if needed and apply migrations")
    commands.add_parser("seed", help="load the index catalogue into the database")
    users = commands.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True, metavar="ACTION"
    )
    create = users.add_parser("create", help="create a user (or a new token for one)")
    create.add_argument("email")
    revoke = users.add_parser("revoke", help="revoke every token of a user")
    revoke.add_argument("email")
    revoke.add_argument(
        "--cancel-pending",
        action="store_true",
        help="also cancel every PENDING position of the user (what a stolen token queued)",
    )
    tokens = users.add_parser(
        "tokens", help="list a user's tokens: id, created, expires, revoked (never the token)"
    )
    tokens.add_argument("email")
    revoke_token = users.add_parser("revoke-token", help="revoke one token by its id")
    revoke_token.add_argument("token_id", type=uuid.UUID, metavar="TOKEN_ID")
    credentials = commands.add_parser("credentials", help="manage stored exchange credentials")
    credential_actions = credentials.add_subparsers(
        dest="credentials_command", required=True, metavar="ACTION"
    )
    credential_actions.add_parser(
        "keygen",
        help="print a new key pair: CREDENTIALS_PRIVATE_KEYS (workers), CREDENTIALS_PUBLIC_KEY "
        "(the API, last line)",
    )
    credential_actions.add_parser(
        "rotate",
        help="re-seal every stored credential for the first CREDENTIALS_PRIVATE_KEYS key "
        "(legacy Fernet rows too, opened with CREDENTIALS_KEYS)",
    )
    sim = commands.add_parser("simulator", help="the Bybit V5 simulator (aiohttp)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8999)
    sim.add_argument(
        "--ip-limit",
        type=int,
        default=None,
        help="requests per 5 s from one address before HTTP 403 (Bybit: 600; 0: none)",
    )
    api = commands.add_parser("api", help="the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.add_argument(
        "--app",
        default="service.api:create_app",
        help="the app factory to serve (benchmarks serve their baseline app the same way)",
    )
    # worker and beat pass every further argument to Celery (see main()).
    commands.add_parser("worker", help="a Celery worker; extra arguments go to Celery")
    commands.add_parser("beat", help="Celery Beat (the recovery sweep); extra args go to Celery")
    demo = commands.add_parser(
        "demo", help="create a demo user, place a trade on the running stack, print each status"
    )
    demo.add_argument("--api-url", default="http://127.0.0.1:8000")
    demo.add_argument("--index", default="BLUECHIP")
    demo.add_argument("--size", default="1000")
    demo.add_argument("--direction", default="long", choices=["long", "short"])
    demo.add_argument("--timeout", type=float, default=60.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if extra and args.command not in _PASS_THROUGH:
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
    args.celery_args = extra
    # Imports are per command: `--help` needs no settings, and each process loads only what
    # it runs.
    from service import commands

    handlers: dict[str, Callable[[argparse.Namespace], object]] = {
        "up": commands.up,
        "migrate": commands.migrate,
        "seed": commands.seed,
        "users": commands.users,
        "credentials": commands.credentials,
        "simulator": commands.simulator,
        "api": commands.api,
        "worker": commands.worker,
        "beat": commands.beat,
        "demo": commands.demo,
    }
    result = handlers[args.command](args)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
