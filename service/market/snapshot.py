"""The market snapshot shared through Redis: instrument filters and reference prices for
every catalogue symbol, written by a Beat job (`service.market.refresh`), read by the API to
refuse untradeable sizes without waiting on the exchange, and by the workers to plan without
a call per symbol. A missing or stale snapshot is an error, never a guess.

The API's side of the market: it imports no exchange client.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.bybit.types import Instrument

CACHE_KEY = "trader:market:v1"


@dataclass(frozen=True, slots=True)
class MarketSnapshot:
    instruments: dict[str, Instrument]
    prices: dict[str, Decimal]
    fetched_at: float  # epoch seconds
    # Mark prices (what positions are valued at); a snapshot written before they were kept
    # (a rolling deploy) has none, and positions show no value until the next refresh.
    marks: dict[str, Decimal] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "fetched_at": self.fetched_at,
                "prices": {s: str(p) for s, p in self.prices.items()},
                "marks": {s: str(p) for s, p in self.marks.items()},
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
            symbol: Instrument(
                symbol=item["symbol"],
                status=item["status"],
                qty_step=Decimal(item["qty_step"]),
                min_order_qty=Decimal(item["min_order_qty"]),
                # A snapshot written before these two were kept (a rolling deploy) lacks
                # them; nothing that reads a snapshot uses them.
                max_order_qty=Decimal(item.get("max_order_qty", item["max_mkt_order_qty"])),
                max_mkt_order_qty=Decimal(item["max_mkt_order_qty"]),
                min_notional_value=Decimal(item["min_notional_value"]),
                tick_size=Decimal(item.get("tick_size", "0")),
            )
            for symbol, item in data["instruments"].items()
        }
        prices = {symbol: Decimal(price) for symbol, price in data["prices"].items()}
        marks = {symbol: Decimal(price) for symbol, price in data.get("marks", {}).items()}
        return cls(
            instruments=instruments,
            prices=prices,
            fetched_at=float(data["fetched_at"]),
            marks=marks,
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
