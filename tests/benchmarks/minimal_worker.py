"""The batch benchmark's baseline on the worker's side: a separate, minimal program that does
only what no basket executor of this shape can leave out, so that POST to ACTIVE through it
is the least an HTTP API, a queue, a worker and a database add to the exchange's round trips
on this machine.

It takes what `tests/benchmarks/minimal_app.py` pushes (a plain BRPOP: cheaper than any Celery
worker, so a lower bound), claims the row (one UPDATE), makes the basket's round trips with our
client exactly as the floor run does (one concurrent pre-flight read, one create-batch request,
every order read side by side), and writes the fills and ACTIVE in one statement. None of the
service's locks, plan, checks, marks before sending, retries or audit lines.

Environment: DATABASE_URL, REDIS_URL, CELERY_QUEUE (the list minimal_app pushes onto, with its
suffix), BYBIT_BASE_URL, BENCH_API_KEY and BENCH_API_SECRET (the account it trades) and
MINIMAL_LEGS (`SYMBOL:QTY,...`, the basket).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import uuid
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient, MarketOrder, create_http_session
from tests.benchmarks.minimal_app import MINIMAL_QUEUE_SUFFIX

_CLAIM = (
    "UPDATE synthetic_positions SET status = 'EXECUTING', attempts = attempts + 1"
    " WHERE id = $1 AND status = 'PENDING' RETURNING id"
)
# The fills and ACTIVE, one statement (updated_at: when ACTIVE was written, as the service's).
_FINISH = """
WITH fills AS (
    INSERT INTO trades (id, position_id, leg, symbol, side, bybit_order_id, order_link_id,
                        price, quantity, order_status, phase, executed_at)
    SELECT gen_random_uuid(), $1, t.leg, t.symbol, 'Buy', t.order_id, t.link, t.price, t.qty,
           'Filled', 'open', now()
    FROM unnest($2::int[], $3::text[], $4::text[], $5::text[], $6::numeric[], $7::numeric[])
        AS t(leg, symbol, order_id, link, price, qty)
    RETURNING 1
)
UPDATE synthetic_positions SET status = 'ACTIVE', updated_at = clock_timestamp()
WHERE id = $1 AND EXISTS (SELECT 1 FROM fills)
"""


async def _run(
    pool: asyncpg.Pool,
    client: BybitClient,
    credentials: ApiCredentials,
    legs: list[tuple[str, Decimal]],
    position_id: uuid.UUID,
) -> None:
    if await pool.fetchval(_CLAIM, position_id) is None:
        return
    symbol = legs[0][0]
    await asyncio.gather(
        client.get_instruments(symbol),
        client.get_tickers(symbol),
        client.get_wallet_balance(credentials),
    )
    orders = [
        MarketOrder(s, "Buy", qty, f"min-{secrets.token_hex(12)}-{leg}")
        for leg, (s, qty) in enumerate(legs)
    ]
    await client.create_market_orders(credentials, orders)
    read = await asyncio.gather(
        *(
            client.get_order(credentials, symbol=o.symbol, order_link_id=o.order_link_id)
            for o in orders
        )
    )
    filled = [(leg, o) for leg, o in enumerate(read) if o is not None]
    await pool.execute(
        _FINISH,
        position_id,
        [leg for leg, _ in filled],
        [o.symbol for _, o in filled],
        [o.order_id for _, o in filled],
        [o.order_link_id for _, o in filled],
        [o.avg_price or Decimal(0) for _, o in filled],
        [o.cum_exec_qty for _, o in filled],
    )


async def main() -> None:
    legs = [
        (symbol, Decimal(qty))
        for symbol, qty in (pair.split(":") for pair in os.environ["MINIMAL_LEGS"].split(","))
    ]
    credentials = ApiCredentials(
        api_key=os.environ["BENCH_API_KEY"], api_secret=os.environ["BENCH_API_SECRET"]
    )
    dsn = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    redis = aioredis.from_url(os.environ["REDIS_URL"])
    queue = os.environ["CELERY_QUEUE"] + MINIMAL_QUEUE_SUFFIX
    try:
        async with create_http_session(connect_timeout=5, read_timeout=10) as http:
            client = BybitClient(http, os.environ["BYBIT_BASE_URL"])
            await client.get_wallet_balance(credentials)  # connection and clock, set up first
            print("minimal worker ready", flush=True)
            while True:
                _, raw = await redis.brpop([queue])
                await _run(pool, client, credentials, legs, uuid.UUID(json.loads(raw)["id"]))
    finally:
        await redis.aclose()
        await pool.close()


if __name__ == "__main__":  # pragma: no cover - started by the benchmark
    asyncio.run(main())
