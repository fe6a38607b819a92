"""The public market calls: server time, instruments-info and tickers (category linear)."""

from __future__ import annotations

from typing import Any

from service.simulator.errors import BybitError, now_ms
from service.simulator.queries import paginate
from service.simulator.state import SimulatorState
from service.simulator.trading import require_linear


def server_time(state: SimulatorState, params: dict[str, Any]) -> dict[str, Any]:
    now = state.server_ms()
    return {"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)}


def instruments_info(state: SimulatorState, params: dict[str, Any]) -> dict[str, Any]:
    """Without `symbol`, only `Trading` instruments unless a `status` is asked for (as Bybit
    does); with `symbol`, that instrument whatever its status (so a halt can be seen)."""
    require_linear(params)
    symbol, status = params.get("symbol"), params.get("status")
    items = sorted(state.instruments.values(), key=lambda i: i.symbol)
    if symbol:
        items = [i for i in items if i.symbol == symbol]
    if status:
        items = [i for i in items if i.status == status]
    elif not symbol:
        items = [i for i in items if i.status == "Trading"]
    if params.get("baseCoin"):
        items = [i for i in items if i.base_coin == params["baseCoin"]]
    page, cursor = paginate(items, params, lambda i: i.symbol, 500, 1000)
    return {"category": "linear", "list": [i.payload() for i in page], "nextPageCursor": cursor}


def tickers(state: SimulatorState, params: dict[str, Any]) -> dict[str, Any]:
    require_linear(params)
    symbol = params.get("symbol")
    if symbol and symbol not in state.instruments:
        raise BybitError(10001, "Not supported symbols")
    now = now_ms()
    items = [
        state.instruments[name].ticker(price, now, state.mark_price(name))
        for name, price in sorted(state.prices.items())
        if not symbol or name == symbol
    ]
    return {"category": "linear", "list": items}
