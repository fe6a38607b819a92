"""Instrument filters and reference prices from the exchange, cached in-process.

Filters change rarely (cached for hours); prices are only a sizing reference (seconds).
Missing data is an error, never a guess.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Generic, TypeVar

from service.bybit.client import BybitClient
from service.bybit.types import Instrument

T = TypeVar("T")


class MarketDataUnavailableError(Exception):
    pass


@dataclass(slots=True)
class _Entry(Generic[T]):
    value: T
    fetched_at: float


class MarketData:
    def __init__(
        self,
        client: BybitClient,
        *,
        filters_ttl_seconds: float = 6 * 3600,
        prices_ttl_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._filters_ttl = filters_ttl_seconds
        self._prices_ttl = prices_ttl_seconds
        self._clock = clock
        self._instruments: dict[str, _Entry[Instrument]] = {}
        self._prices: dict[str, _Entry[Decimal]] = {}

    async def instruments(
        self, symbols: Iterable[str], *, fresh: bool = False
    ) -> dict[str, Instrument]:
        """Filters per symbol; `fresh` re-reads them (a halt must be seen before trading)."""
        wanted = list(dict.fromkeys(symbols))
        now = self._clock()
        stale = [
            s
            for s in wanted
            if fresh
            or s not in self._instruments
            or now - self._instruments[s].fetched_at > self._filters_ttl
        ]
        if stale:
            fetched = await asyncio.gather(*(self._client.get_instruments(s) for s in stale))
            for symbol, found in zip(stale, fetched, strict=True):
                match = [i for i in found if i.symbol == symbol]
                if not match:
                    raise MarketDataUnavailableError(f"exchange does not list symbol {symbol}")
                self._instruments[symbol] = _Entry(match[0], self._clock())
        return {s: self._instruments[s].value for s in wanted}

    async def prices(self, symbols: Iterable[str]) -> dict[str, Decimal]:
        wanted = list(dict.fromkeys(symbols))
        now = self._clock()
        stale = [
            s
            for s in wanted
            if s not in self._prices or now - self._prices[s].fetched_at > self._prices_ttl
        ]
        if stale:
            fetched = await asyncio.gather(*(self._client.get_tickers(s) for s in stale))
            for symbol, tickers in zip(stale, fetched, strict=True):
                match = [t for t in tickers if t.symbol == symbol]
                if not match:
                    raise MarketDataUnavailableError(f"exchange has no ticker for {symbol}")
                self._prices[symbol] = _Entry(match[0].last_price, self._clock())
        return {s: self._prices[s].value for s in wanted}
