"""The simulator's state: instruments, prices, accounts, orders, fills, knobs and faults."""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

_DATA = Path(__file__).resolve().parent / "instruments.json"
DEFAULT_LEVERAGE = Decimal(10)  # Bybit's default until the account sets one
TAKER_FEE = Decimal("0.00055")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    max_leverage: Decimal

    def payload(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "contractType": "LinearPerpetual",
            "status": self.status,
            "baseCoin": self.symbol.removesuffix("USDT"),
            "quoteCoin": "USDT",
            "settleCoin": "USDT",
            "priceScale": str(max(0, -self.tick_size.as_tuple().exponent)),  # type: ignore[operator]
            "leverageFilter": {
                "minLeverage": "1",
                "maxLeverage": str(self.max_leverage),
                "leverageStep": "0.01",
            },
            "priceFilter": {
                "minPrice": str(self.tick_size),
                "maxPrice": "1999999.80",
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
        }


def load_market() -> tuple[dict[str, Instrument], dict[str, Decimal]]:
    data: dict[str, dict[str, str]] = json.loads(_DATA.read_text())
    instruments, prices = {}, {}
    for symbol, item in data.items():
        instruments[symbol] = Instrument(
            symbol=symbol,
            status="Trading",
            qty_step=Decimal(item["qtyStep"]),
            min_order_qty=Decimal(item["minOrderQty"]),
            max_order_qty=Decimal(item.get("maxOrderQty", item["maxMktOrderQty"])),
            max_mkt_order_qty=Decimal(item["maxMktOrderQty"]),
            min_notional_value=Decimal(item["minNotionalValue"]),
            tick_size=Decimal(item["tickSize"]),
            max_leverage=Decimal(item.get("maxLeverage", "50")),
        )
        prices[symbol] = Decimal(item["lastPrice"])
    return instruments, prices


@dataclass
class Account:
    api_key: str
    api_secret: str
    balance: Decimal
    leverage: dict[str, Decimal] = field(default_factory=dict)
    # Timestamps (ms) of recent order/create calls, for the rate limit.
    order_calls: deque[int] = field(default_factory=deque)


@dataclass
class Fault:
    id: int
    path: str
    kind: str
    skip: int = 0
    times: int | None = 1
    api_key: str | None = None
    status: int = 502
    body: str | None = None
    ret_code: int = 10016
    ret_msg: str = "Internal server error"
    delay_ms: int = 0
    seen: int = 0
    applied: int = 0

    def claim(self, path: str, api_key: str | None) -> bool:
        """Count a matching call; True when this call is one the fault applies to."""
        if path != self.path or (self.api_key is not None and api_key != self.api_key):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and self.applied >= self.times:
            return False
        self.applied += 1
        return True


@dataclass
class Config:
    latency_ms: int = 0
    slippage_bps: Decimal = Decimal(0)
    order_rate_limit: int = 10  # order/create calls per second per account; 0 = off
    fill_ratio: Decimal = Decimal(1)


@dataclass
class SimulatorState:
    instruments: dict[str, Instrument] = field(default_factory=dict)
    prices: dict[str, Decimal] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    config: Config = field(default_factory=Config)
    requests: Counter[str] = field(default_factory=Counter)
    next_fault_id: int = 1

    def __post_init__(self) -> None:
        if not self.instruments:
            self.instruments, self.prices = load_market()

    def reset(self) -> None:
        fresh = SimulatorState()
        self.__dict__.update(fresh.__dict__)

    def fault_for(self, path: str, api_key: str | None) -> Fault | None:
        for fault in self.faults:
            if fault.claim(path, api_key):
                return fault
        return None
