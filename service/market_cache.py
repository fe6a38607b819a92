"""The market snapshot shared through Redis: instrument filters and reference prices for
every catalogue symbol, written by a Beat job, read by the API to refuse untradeable sizes
without waiting on the exchange. A missing or stale snapshot is an error, never a guess.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.db import SessionScope
from service.indices.repository import component_symbols
from service.market_data import MarketData

CACHE_KEY = "trader:market:v1"


@dataclass(frozen=True, slots=True)
class CachedInstrument:
    symbol: str
    status: str
    qty_step: Decimal
    min_order_qty: Decimal
    max_mkt_order_qty: Decimal
    min_notional_value: Decimal


@dataclass(frozen=True, slots=True)
class MarketSnapshot:
    instruments: dict[str, CachedInstrument]
    prices: dict[str, Decimal]
    fetched_at: float  # epoch seconds

    def to_json(self) -> str:
        return json.dumps(
            {
                "fetched_at": self.fetched_at,
                "prices": {s: str(p) for s, p in self.prices.items()},
                "instruments": {
                    s: {k: str(v) for k, v in asdict(i).items()}
                    for s, i in self.instruments.items()
                },
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> MarketSnapshot:
        data: dict[str, Any] = json.loads(raw)
        instruments = {
            symbol: CachedInstrument(
                symbol=item["symbol"],
                status=item["status"],
                qty_step=Decimal(item["qty_step"]),
                min_order_qty=Decimal(item["min_order_qty"]),
                max_mkt_order_qty=Decimal(item["max_mkt_order_qty"]),
                min_notional_value=Decimal(item["min_notional_value"]),
            )
            for symbol, item in data["instruments"].items()
        }
        prices = {symbol: Decimal(price) for symbol, price in data["prices"].items()}
        return cls(instruments=instruments, prices=prices, fetched_at=float(data["fetched_at"]))


async def fetch_snapshot(market: MarketData, symbols: Iterable[str]) -> MarketSnapshot:
    """Read every symbol's filters and price from the exchange now (never from a snapshot:
    this is what makes the next one)."""
    wanted = sorted(set(symbols))
    instruments = await market.instruments(wanted, max_age=0)
    prices = await market.prices(wanted, max_age=0)
    return MarketSnapshot(
        instruments={
            s: CachedInstrument(
                symbol=i.symbol,
                status=i.status,
                qty_step=i.qty_step,
                min_order_qty=i.min_order_qty,
                max_mkt_order_qty=i.max_mkt_order_qty,
                min_notional_value=i.min_notional_value,
            )
            for s, i in instruments.items()
        },
        prices=prices,
        fetched_at=time.time(),
    )


class MarketCache:
    """Redis-backed, with the last good snapshot kept in memory: re-read from Redis at most
    every `reuse_seconds`, and still served (while younger than `max_age_seconds`) when
    Redis cannot be reached, so a broker outage does not stop the API from sizing."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_age_seconds: float,
        reuse_seconds: float = 2.0,
        key: str = CACHE_KEY,
    ) -> None:
        self._redis = redis
        self._max_age = max_age_seconds
        self._reuse = reuse_seconds
        self._key = key
        self._last: MarketSnapshot | None = None
        self._last_read = 0.0

    async def store(self, snapshot: MarketSnapshot) -> None:
        # Expires by itself: a dead refresher leaves no data to be mistaken for fresh.
        await self._redis.set(self._key, snapshot.to_json(), ex=int(self._max_age) + 1)
        self.remember(snapshot)

    def remember(self, snapshot: MarketSnapshot) -> None:
        self._last, self._last_read = snapshot, time.monotonic()

    def _fresh(self, snapshot: MarketSnapshot | None) -> MarketSnapshot | None:
        if snapshot is None or time.time() - snapshot.fetched_at > self._max_age:
            return None
        return snapshot

    async def load(self) -> MarketSnapshot | None:
        if self._last is not None and time.monotonic() - self._last_read < self._reuse:
            return self._fresh(self._last)
        try:
            raw = await self._redis.get(self._key)
        except RedisError:
            return self._fresh(self._last)
        if raw is None:
            # Gone from Redis: expired (then the copy in memory is too old as well), or
            # Redis restarted empty, when the copy in memory still serves until its max age.
            return self._fresh(self._last)
        try:
            snapshot = MarketSnapshot.from_json(raw)
        except (ValueError, KeyError, TypeError, ArithmeticError):
            return None
        self.remember(snapshot)
        return self._fresh(snapshot)


async def refresh_market_cache(
    sessions: SessionScope, market: MarketData, cache: MarketCache
) -> MarketSnapshot:
    """Fetch filters and prices for every symbol any index uses, and publish them."""
    async with sessions() as session:
        symbols = await component_symbols(session)
    snapshot = await fetch_snapshot(market, symbols)
    await cache.store(snapshot)
    return snapshot
