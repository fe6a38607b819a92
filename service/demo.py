"""`python -m service demo`: a demo user places one trade on the running stack and watches it."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from urllib.parse import urlparse

import aiohttp

from service.config import get_settings
from service.db import create_engine, create_session_factory, session_scope
from service.users.service import create_user_with_token


def _is_simulator(base_url: str) -> bool:
    """Loopback, or a single-label name such as a compose service (`simulator`): never a
    public exchange host, which always has dots. The simulator's admin endpoint must also
    answer (checked in _demo)."""
    host = urlparse(base_url).hostname or ""
    return host in {"127.0.0.1", "localhost", "::1"} or (bool(host) and "." not in host)


async def run_demo(
    *, api_url: str, index: str, size: str, direction: str, wait_seconds: float
) -> int:
    try:
        return await _demo(
            api_url=api_url, index=index, size=size, direction=direction, wait_seconds=wait_seconds
        )
    except aiohttp.ClientError as error:
        print(f"demo failed: {error}. Is the stack up (scripts/dev up)?")
        return 1


async def _demo(*, api_url: str, index: str, size: str, direction: str, wait_seconds: float) -> int:
    settings = get_settings()
    if not _is_simulator(settings.bybit_base_url):
        print("demo refuses to trade on a real exchange: BYBIT_BASE_URL is not the simulator")
        return 2
    async with (
        aiohttp.ClientSession() as probe,
        probe.get(f"{settings.bybit_base_url}/sim/config") as answer,
    ):
        if answer.status != 200:
            print("demo refuses to trade: BYBIT_BASE_URL does not answer as the simulator")
            return 2
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with session_scope(create_session_factory(engine)) as session:
            issued = await create_user_with_token(
                session, f"demo-{secrets.token_hex(4)}@example.com"
            )
    finally:
        await engine.dispose()
    print(f"demo user {issued.user.email}")
    api_key, api_secret = f"DEMO{secrets.token_hex(8).upper()}", secrets.token_hex(18)
    auth = {"Authorization": f"Bearer {issued.token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(
            f"{settings.bybit_base_url}/sim/accounts",
            json={"api_key": api_key, "api_secret": api_secret, "balance": "100000"},
        ) as response:
            response.raise_for_status()
        async with http.put(
            f"{api_url}/api/credentials",
            json={"api_key": api_key, "api_secret": api_secret},
            headers=auth,
        ) as response:
            response.raise_for_status()
        deadline = time.monotonic() + wait_seconds
        # Idempotency-Key: a POST repeated after a 503 opens one position, not two.
        auth_once = {**auth, "Idempotency-Key": f"demo-{uuid.uuid4()}"}
        while True:
            async with http.post(
                f"{api_url}/api/positions",
                json={"index": index, "size": size, "direction": direction},
                headers=auth_once,
            ) as response:
                body = await response.json()
                retry_after = float(response.headers.get("Retry-After", "1"))
            if response.status == 202:
                break
            # A stack just started has no market snapshot until Beat's first refresh.
            if response.status != 503 or time.monotonic() + retry_after > deadline:
                print(f"POST /api/positions answered {response.status}: {body}")
                return 1
            # The stack is on this machine: a second is plenty, whatever Retry-After says.
            print(f"{body['detail']} (503): trying again in a second", flush=True)
            await asyncio.sleep(1.0)
        position_id = body["id"]
        print(f"position {position_id}: {direction} {size} USDT of {index}")
        print(f"status: {body['status']}", flush=True)
        last = body["status"]
        while last not in ("ACTIVE", "FAILED"):
            if time.monotonic() > deadline:
                print(f"still {last} after {wait_seconds}s")
                return 1
            await asyncio.sleep(0.05)
            async with http.get(f"{api_url}/api/positions/{position_id}", headers=auth) as response:
                body = await response.json()
            if body["status"] != last:
                last = body["status"]
                print(f"status: {last}", flush=True)
    if last == "FAILED":
        print(f"error: {body['error']}")
        return 1
    for trade in body["trades"]:
        print(
            f"fill: leg {trade['leg']} {trade['side']} {trade['quantity']} {trade['symbol']} "
            f"@ {trade['price']} (order {trade['bybit_order_id']})"
        )
    return 0
