"""Instrument filters and reference prices: from the shared snapshot when it is fresh enough,
else from the exchange (cached in-process).

Beat's refresh job writes a snapshot of every catalogue symbol's filters and prices to Redis
(service/market/snapshot.py) every MARKET_REFRESH_SECONDS. A worker planning a basket reads it
instead of asking the exchange once per symbol: Bybit counts every request against the
address's limit, and a ten-leg basket asking per symbol spent twenty of them on data the
snapshot already had. Missing data is an error, never a guess.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Generic, Protocol, TypeVar

from service.bybit.client import BybitClient
from service.bybit.types import Instrument

T = TypeVar("T")

FILTERS_TTL_SECONDS = 6 * 3600.0
PRICES_TTL_SECONDS = 5.0


class MarketDataUnavailableError(Exception):
    pass


class Snapshot(Protocol):
    """What the shared snapshot offers (service.market.snapshot.MarketSnapshot)."""

    @property
    def instruments(self) -> Mapping[str, Instrument]: ...
    @property
    def prices(self) -> Mapping[str, Decimal]: ...
    @property
    def fetched_at(self) -> float: ...  # epoch seconds


SnapshotSource = Callable[[], Awaitable[Snapshot | None]]


@dataclass(slots=True)
class _Entry(Generic[T]):
    value: T
    fetched_at: float


class MarketData:
    def __init__(
        self,
        client: BybitClient,
        *,
        snapshot: SnapshotSource | None = None,
        filters_ttl_seconds: float = FILTERS_TTL_SECONDS,
        prices_ttl_seconds: float = PRICES_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._snapshot = snapshot
        self._filters_ttl = filters_ttl_seconds
        self._prices_ttl = prices_ttl_seconds
        self._clock = clock
        self._instruments: dict[str, _Entry[Instrument]] = {}
        self._prices: dict[str, _Entry[Decimal]] = {}
        # Mark prices read with the last prices (the tickers carry both): what positions are
        # valued at (service/positions/valuation.py), published with the snapshot.
        self._marks: dict[str, Decimal] = {}

    async def instruments(
        self, symbols: Iterable[str], *, max_age: float | None = None
    ) -> dict[str, Instrument]:
        """Filters per symbol, no older than `max_age` seconds (default: hours; 0: read from
        the exchange now, as the refresh job does)."""
        wanted = list(dict.fromkeys(symbols))
        limit = self._filters_ttl if max_age is None else max_age
        shared = await self._shared(limit)
        if shared is not None and all(s in shared.instruments for s in wanted):
            return {s: shared.instruments[s] for s in wanted}
        now = self._clock()
        stale = [
            s
            for s in wanted
            if s not in self._instruments or now - self._instruments[s].fetched_at > limit
        ]
        if stale:
            fetched = await asyncio.gather(*(self._client.get_instruments(s) for s in stale))
            for symbol, found in zip(stale, fetched, strict=True):
                match = [i for i in found if i.symbol == symbol]
                if not match:
                    raise MarketDataUnavailableError(f"exchange does not list symbol {symbol}")
                self._instruments[symbol] = _Entry(match[0], self._clock())
        return {s: self._instruments[s].value for s in wanted}

    async def current(self, symbols: Iterable[str]) -> dict[str, Instrument]:
        """Filters and status of `symbols` as the exchange has them now, in one request: the
        list of every trading instrument (a halted one is not in it: it alone is then asked
        for, to say what its status is)."""
        wanted = list(dict.fromkeys(symbols))
        trading = {i.symbol: i for i in await self._client.get_instruments()}
        found: dict[str, Instrument] = {s: trading[s] for s in wanted if s in trading}
        for symbol in (s for s in wanted if s not in trading):
            match = [i for i in await self._client.get_instruments(symbol) if i.symbol == symbol]
            if not match:
                raise MarketDataUnavailableError(f"exchange does not list symbol {symbol}")
            found[symbol] = match[0]
        for symbol, instrument in found.items():
            self._instruments[symbol] = _Entry(instrument, self._clock())
        return found

    async def prices(
        self, symbols: Iterable[str], *, max_age: float | None = None
    ) -> dict[str, Decimal]:
        """Last prices per symbol, no older than `max_age` seconds (default: a few seconds;
        0: read from the exchange now)."""
        wanted = list(dict.fromkeys(symbols))
        limit = self._prices_ttl if max_age is None else max_age
        shared = await self._shared(limit)
        if shared is not None and all(s in shared.prices for s in wanted):
            return {s: shared.prices[s] for s in wanted}
        now = self._clock()
        stale = [
            s for s in wanted if s not in self._prices or now - self._prices[s].fetched_at > limit
        ]
        if stale:
            fetched = await asyncio.gather(*(self._client.get_tickers(s) for s in stale))
            for symbol, tickers in zip(stale, fetched, strict=True):
                match = [t for t in tickers if t.symbol == symbol]
                if not match:
                    raise MarketDataUnavailableError(f"exchange has no ticker for {symbol}")
                self._prices[symbol] = _Entry(match[0].last_price, self._clock())
                if match[0].mark_price is not None:
                    self._marks[symbol] = match[0].mark_price
                else:
                    self._marks.pop(symbol, None)
        return {s: self._prices[s].value for s in wanted}

    def marks(self, symbols: Iterable[str]) -> dict[str, Decimal]:
        """The mark prices read from the exchange with the last `prices` call that went to it
        (symbols Bybit gave none for are left out)."""
        return {s: self._marks[s] for s in symbols if s in self._marks}

    async def _shared(self, max_age: float) -> Snapshot | None:
        if self._snapshot is None or max_age <= 0:
            return None
        snapshot = await self._snapshot()
        if snapshot is None or time.time() - snapshot.fetched_at > max_age:
            return None
        return snapshot
