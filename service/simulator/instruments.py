"""Linear instruments (Bybit's filters) and their tickers, loaded from instruments.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from service.simulator.values import plain

DATA_FILE = Path(__file__).resolve().parent / "instruments.json"
MAX_PRICE_TICKS = Decimal(19_999_998)  # Bybit's maxPrice is tickSize x 19999998
FUNDING_INTERVAL_MS = 8 * 3_600_000

# The lot-size fields an admin call may change, by their Bybit names.
LOT_SIZE_FIELDS = ("qtyStep", "minOrderQty", "maxOrderQty", "maxMktOrderQty", "minNotionalValue")


@dataclass
class Instrument:
    symbol: str
    status: str
    qty_step: Decimal
    min_order_qty: Decimal
    max_order_qty: Decimal
    max_mkt_order_qty: Decimal
    min_notional_value: Decimal
    tick_size: Decimal
    min_price: Decimal
    max_price: Decimal
    max_leverage: Decimal
    launch_time: str
    # The book inside the price-protection band: at most this much of one market order fills
    # (the rest is cancelled, as Bybit's IOC market orders do); None: deep enough for anything.
    book_depth: Decimal | None = None
    # How many executions a fill is spread over, each a tick worse than the one before.
    book_levels: int = 1

    @property
    def base_coin(self) -> str:
        return self.symbol.removesuffix("USDT")

    @property
    def price_scale(self) -> int:
        exponent = self.tick_size.as_tuple().exponent
        return -exponent if isinstance(exponent, int) and exponent < 0 else 0

    def set_lot_size(self, name: str, value: Decimal) -> None:
        attribute = {
            "qtyStep": "qty_step",
            "minOrderQty": "min_order_qty",
            "maxOrderQty": "max_order_qty",
            "maxMktOrderQty": "max_mkt_order_qty",
            "minNotionalValue": "min_notional_value",
        }[name]
        setattr(self, attribute, value)

    def price(self, value: Decimal) -> Decimal:
        """A price written to this instrument's tick precision."""
        return value.quantize(self.tick_size, rounding=ROUND_HALF_EVEN)

    def payload(self) -> dict[str, Any]:
        """One entry of instruments-info (category=linear), Bybit's field names and order."""
        return {
            "symbol": self.symbol,
            "contractType": "LinearPerpetual",
            "status": self.status,
            "baseCoin": self.base_coin,
            "quoteCoin": "USDT",
            "launchTime": self.launch_time,
            "deliveryTime": "0",
            "deliveryFeeRate": "",
            "priceScale": str(self.price_scale),
            "leverageFilter": {
                "minLeverage": "1",
                "maxLeverage": str(self.max_leverage),
                "leverageStep": "0.01",
            },
            "priceFilter": {
                "minPrice": str(self.min_price),
                "maxPrice": str(self.max_price),
                "tickSize": str(self.tick_size),
            },
            "lotSizeFilter": {
                "maxOrderQty": str(self.max_order_qty),
                "minOrderQty": str(self.min_order_qty),
                "qtyStep": str(self.qty_step),
                "postOnlyMaxOrderQty": str(self.max_order_qty),
                "maxMktOrderQty": str(self.max_mkt_order_qty),
                "minNotionalValue": str(self.min_notional_value),
            },
            "unifiedMarginTrade": True,
            "fundingInterval": 480,
            "settleCoin": "USDT",
            "copyTrading": "both",
            "upperFundingRate": "0.005",
            "lowerFundingRate": "-0.005",
            "isPreListing": False,
            "preListingInfo": None,
            "riskParameters": {"priceLimitRatioX": "0.01", "priceLimitRatioY": "0.02"},
            "displayName": "",
        }

    def ticker(self, last: Decimal, now: int, mark: Decimal | None = None) -> dict[str, Any]:
        """One entry of tickers (category=linear): the index follows the last price, and so does
        the mark unless one is given; the best bid and ask sit one tick either side of it."""
        mark = last if mark is None else mark
        bid = last - self.tick_size if last > self.tick_size else last
        ask = last + self.tick_size
        depth = plain(self.max_mkt_order_qty)
        return {
            "symbol": self.symbol,
            "lastPrice": str(last),
            "indexPrice": str(last),
            "markPrice": str(mark),
            "prevPrice24h": str(last),
            "price24hPcnt": "0",
            "highPrice24h": str(last),
            "lowPrice24h": str(last),
            "prevPrice1h": str(last),
            "openInterest": "0",
            "openInterestValue": "0",
            "turnover24h": "0",
            "volume24h": "0",
            "fundingRate": "0.0001",
            "nextFundingTime": str((now // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS),
            "predictedDeliveryPrice": "",
            "basisRate": "",
            "deliveryFeeRate": "",
            "deliveryTime": "0",
            "ask1Size": depth,
            "bid1Price": str(self.price(bid)),
            "ask1Price": str(self.price(ask)),
            "bid1Size": depth,
        }


def load_market(path: Path = DATA_FILE) -> tuple[dict[str, Instrument], dict[str, Decimal]]:
    """The shipped instruments (all `Trading`) and their default last prices."""
    data: dict[str, dict[str, str]] = json.loads(path.read_text())["instruments"]
    instruments: dict[str, Instrument] = {}
    prices: dict[str, Decimal] = {}
    for symbol, item in data.items():
        tick = Decimal(item["tickSize"])
        instruments[symbol] = Instrument(
            symbol=symbol,
            status="Trading",
            qty_step=Decimal(item["qtyStep"]),
            min_order_qty=Decimal(item["minOrderQty"]),
            max_order_qty=Decimal(item["maxOrderQty"]),
            max_mkt_order_qty=Decimal(item["maxMktOrderQty"]),
            min_notional_value=Decimal(item["minNotionalValue"]),
            tick_size=tick,
            min_price=Decimal(item.get("minPrice", str(tick))),
            max_price=Decimal(item.get("maxPrice", str(tick * MAX_PRICE_TICKS))),
            max_leverage=Decimal(item["maxLeverage"]),
            launch_time=item.get("launchTime", "1640995200000"),
        )
        prices[symbol] = instruments[symbol].price(Decimal(item["lastPrice"]))
    return instruments, prices
