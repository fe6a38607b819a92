"""The worker's side of the market snapshot: read every catalogue symbol's filters and price
from the exchange and publish them (the Beat job `refresh_market_cache`)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from service.db import SessionScope
from service.indices.repository import component_symbols
from service.market.data import MarketData
from service.market.snapshot import MarketCache, MarketSnapshot


async def fetch_snapshot(market: MarketData, symbols: Iterable[str]) -> MarketSnapshot:
    """Read every symbol's filters and price from the exchange now (never from a snapshot:
    this is what makes the next one)."""
    wanted = sorted(set(symbols))
    instruments = await market.instruments(wanted, max_age=0)
    prices = await market.prices(wanted, max_age=0)
    return MarketSnapshot(
        instruments=dict(instruments),
        prices=prices,
        fetched_at=time.time(),
        marks=market.marks(wanted),
    )


async def refresh_market_cache(
    sessions: SessionScope, market: MarketData, cache: MarketCache
) -> MarketSnapshot:
    """Fetch filters and prices for every symbol any index uses, and publish them."""
    async with sessions() as session:
        symbols = await component_symbols(session)
    snapshot = await fetch_snapshot(market, symbols)
    await cache.store(snapshot)
    return snapshot
