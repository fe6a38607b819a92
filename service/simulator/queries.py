"""The read-only private calls: orders, fills, positions, wallet, and the two account calls
ccxt makes before its first order. Lists are newest first and paginated with a cursor."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from service.simulator.errors import now_ms, params_error
from service.simulator.state import Account, Execution, Order, Position, SimulatorState
from service.simulator.trading import require_linear
from service.simulator.values import PRICE_PLACES, plain, price_string, scaled

T = TypeVar("T")


class _Listed(Protocol):
    order_id: str
    order_link_id: str
    symbol: str


L = TypeVar("L", bound=_Listed)
REALTIME_CLOSED_KEPT = 500  # order/realtime shows the 500 most recent closed orders


def page_limit(params: dict[str, Any], default: int, maximum: int) -> int:
    raw = params.get("limit")
    if raw in (None, ""):
        return default
    if not isinstance(raw, str) or not raw.isdigit():
        raise params_error("limit invalid")
    return min(max(int(raw), 1), maximum)


def paginate(
    items: Sequence[T], params: dict[str, Any], key: Callable[[T], str], default: int, maximum: int
) -> tuple[list[T], str]:
    """A page of `items` and the next cursor. The cursor has Bybit's shape, already
    percent-encoded (`page_args%3D<key>%26`); the client sends it back as it got it."""
    limit = page_limit(params, default, maximum)
    start = 0
    cursor = params.get("cursor")
    if cursor:
        after = str(cursor).removeprefix("page_args=").split("&", 1)[0]
        keys = [key(item) for item in items]
        # An unknown cursor reads as past the end, as for a page that no longer exists.
        start = keys.index(after) + 1 if after in keys else len(items)
    page = list(items[start : start + limit])
    more = start + limit < len(items)
    next_cursor = quote(f"page_args={key(page[-1])}&", safe="") if more and page else ""
    return page, next_cursor


def _by_ids(items: list[L], params: dict[str, Any]) -> list[L]:
    """Filters by orderId > orderLinkId > symbol, the priority Bybit gives them."""
    if params.get("orderId"):
        return [i for i in items if i.order_id == params["orderId"]]
    if params.get("orderLinkId"):
        return [i for i in items if i.order_link_id == params["orderLinkId"]]
    if params.get("symbol"):
        return [i for i in items if i.symbol == params["symbol"]]
    return items


def _orders_of(state: SimulatorState, account: Account) -> list[Order]:
    return [o for o in reversed(state.orders) if o.api_key == account.api_key]


def order_realtime(
    state: SimulatorState, account: Account, params: dict[str, Any]
) -> dict[str, Any]:
    require_linear(params)
    by_id = bool(params.get("orderId") or params.get("orderLinkId"))
    if not by_id and not (
        params.get("symbol") or params.get("baseCoin") or params.get("settleCoin")
    ):
        raise params_error("symbol, baseCoin or settleCoin is required for linear")
    now = now_ms()
    orders = [o for o in _orders_of(state, account) if o.visible_ms <= now]
    open_orders = [o for o in orders if o.is_open(now)]
    recent_closed = [o for o in orders if not o.is_open(now)][:REALTIME_CLOSED_KEPT]
    if by_id:
        visible = sorted(open_orders + recent_closed, key=lambda o: -o.created_ms)
    elif params.get("openOnly") in ("1", "2"):
        visible = recent_closed
    else:
        visible = open_orders
    if params.get("baseCoin"):
        visible = [o for o in visible if o.symbol == f"{params['baseCoin']}USDT"]
    page, cursor = paginate(_by_ids(visible, params), params, lambda o: o.order_id, 20, 50)
    return {
        "list": [_order_payload(state, o, now) for o in page],
        "nextPageCursor": cursor,
        "category": "linear",
    }


def _order_payload(state: SimulatorState, order: Order, now: int) -> dict[str, Any]:
    payload = order.payload(now)
    if state.config.avg_price_blank:
        payload["avgPrice"] = ""
    return payload


def order_history(
    state: SimulatorState, account: Account, params: dict[str, Any]
) -> dict[str, Any]:
    require_linear(params)
    now = now_ms()
    # The history lags behind: a fresh order is not in it yet.
    listed = [o for o in _orders_of(state, account) if o.history_ms <= now]
    orders = _by_ids(listed, params)
    if params.get("orderStatus"):
        orders = [o for o in orders if o.status_at(now) == params["orderStatus"]]
    page, cursor = paginate(orders, params, lambda o: o.order_id, 20, 50)
    return {
        "list": [_order_payload(state, o, now) for o in page],
        "nextPageCursor": cursor,
        "category": "linear",
    }


def execution_list(
    state: SimulatorState, account: Account, params: dict[str, Any]
) -> dict[str, Any]:
    require_linear(params)
    now = now_ms()
    mine: list[Execution] = [
        e for e in reversed(state.executions) if e.api_key == account.api_key and e.exec_ms <= now
    ]
    page, cursor = paginate(_by_ids(mine, params), params, lambda e: e.exec_id, 50, 100)
    return {"list": [e.payload() for e in page], "nextPageCursor": cursor, "category": "linear"}


def _position_payload(
    state: SimulatorState, account: Account, position: Position
) -> dict[str, Any]:
    instrument = state.instruments[position.symbol]
    mark = state.mark_price(position.symbol)
    size = abs(position.size)
    pnl = position.size * (mark - position.avg_price)
    return {
        "positionIdx": position.idx,
        "riskId": 1,
        "riskLimitValue": plain(instrument.max_order_qty * mark),
        "symbol": position.symbol,
        "side": position.side,
        "size": scaled(size, instrument.qty_step),
        "avgPrice": price_string(position.avg_price),
        "positionValue": plain((size * position.avg_price).quantize(PRICE_PLACES)),
        "tradeMode": 0,
        "positionStatus": "Normal",
        "autoAddMargin": 0,
        "adlRankIndicator": 2 if size else 0,
        "leverage": plain(account.leverage_for(position.symbol)),
        "positionBalance": plain(position.initial_margin.quantize(PRICE_PLACES)),
        "markPrice": str(mark),
        "liqPrice": "",
        "bustPrice": "",
        "positionMM": "0",
        "positionIM": plain(position.initial_margin.quantize(PRICE_PLACES)),
        "tpslMode": "Full",
        "takeProfit": "",
        "stopLoss": "",
        "trailingStop": "0",
        "unrealisedPnl": plain(pnl.quantize(PRICE_PLACES)),
        "curRealisedPnl": plain(position.cum_realised_pnl.quantize(PRICE_PLACES)),
        "cumRealisedPnl": plain(position.cum_realised_pnl.quantize(PRICE_PLACES)),
        "isReduceOnly": False,
        "mmrSysUpdatedTime": "",
        "leverageSysUpdatedTime": "",
        "createdTime": str(position.created_ms or now_ms()),
        "updatedTime": str(position.updated_ms or now_ms()),
        "seq": position.seq,
    }


def position_list(
    state: SimulatorState, account: Account, params: dict[str, Any]
) -> dict[str, Any]:
    """With `symbol`, its position(s) whether open or not (one per side in hedge mode); with
    `settleCoin`, the open ones."""
    require_linear(params)
    symbol = params.get("symbol")
    if symbol:
        if symbol not in state.instruments:
            raise params_error("symbol invalid")
        positions = account.positions_of(symbol)
    elif params.get("settleCoin"):
        positions = [p for _, p in sorted(account.positions.items()) if p.size]
        if params["settleCoin"] != "USDT":
            positions = []
    else:
        raise params_error("symbol or settleCoin is required for linear")
    page, cursor = paginate(positions, params, lambda p: f"{p.symbol}:{p.idx}", 20, 200)
    return {
        "list": [_position_payload(state, account, p) for p in page],
        "nextPageCursor": cursor,
        "category": "linear",
    }


def wallet_balance(
    state: SimulatorState, account: Account, params: dict[str, Any]
) -> dict[str, Any]:
    if params.get("accountType") != "UNIFIED":
        raise params_error("accountType only support UNIFIED")
    coins = str(params.get("coin") or "USDT").split(",")
    # Unrealised PnL is marked to the mark price, as Bybit does.
    pnl = sum(
        (p.size * (state.mark_price(p.symbol) - p.avg_price) for p in account.positions.values()),
        Decimal(0),
    )
    wallet = account.wallet_balance
    equity = wallet + pnl
    margin = account.position_margin
    available = equity - margin
    # Bybit: account-wide fields do not apply to isolated margin (empty strings); portfolio
    # margin leaves the coin's IM/MM fields empty.
    isolated = account.margin_mode == "ISOLATED_MARGIN"
    portfolio = account.margin_mode == "PORTFOLIO_MARGIN"
    usdt = {
        "coin": "USDT",
        "equity": plain(equity),
        "usdValue": plain(equity),
        "walletBalance": plain(wallet),
        "free": "",
        "locked": "0",
        "spotHedgingQty": "0",
        "borrowAmount": "0",
        "availableToWithdraw": "",
        "availableToBorrow": "",
        "accruedInterest": "0",
        "totalOrderIM": "" if portfolio else "0",
        "totalPositionIM": "" if portfolio else plain(margin),
        "totalPositionMM": "" if portfolio else "0",
        "unrealisedPnl": plain(pnl),
        "cumRealisedPnl": plain(
            sum((p.cum_realised_pnl for p in account.positions.values()), Decimal(0))
        ),
        "bonus": "0",
        "marginCollateral": True,
        "collateralSwitch": True,
    }
    return {
        "list": [
            {
                "accountType": "UNIFIED",
                "accountLTV": "0",
                "accountIMRate": ""
                if isolated
                else (plain(margin / equity) if equity > 0 else "0"),
                "accountMMRate": "" if isolated else "0",
                "totalEquity": plain(equity),
                "totalWalletBalance": plain(wallet),
                "totalMarginBalance": "" if isolated else plain(equity),
                "totalAvailableBalance": "" if isolated else plain(available),
                "totalPerpUPL": plain(pnl),
                "totalInitialMargin": "" if isolated else plain(margin),
                "totalMaintenanceMargin": "" if isolated else "0",
                "coin": [usdt] if "USDT" in coins else [],
            }
        ]
    }


def query_api(state: SimulatorState, account: Account, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(zlib.crc32(account.api_key.encode())),
        "note": "simulator",
        "apiKey": account.api_key,
        "readOnly": 1 if account.read_only else 0,
        "secret": "",
        "permissions": {group: list(granted) for group, granted in account.permissions.items()},
        "ips": list(account.ips),
        "type": 1,
        "deadlineDay": 90,
        "expiredAt": "",
        "createdAt": "",
        "unified": 0,
        "uta": 1,
        "userID": account.user_id,
        "inviterID": 0,
        "vipLevel": "No VIP",
        "mktMakerLevel": "0",
        "affiliateID": 0,
        "rsaPublicKey": "",
        "isMaster": True,
        "parentUid": "0",
        "kycLevel": "LEVEL_DEFAULT",
        "kycRegion": "",
    }


def account_info(state: SimulatorState, account: Account, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "unifiedMarginStatus": 6,
        "marginMode": account.margin_mode,
        "isMasterTrader": False,
        "spotHedgingStatus": "OFF",
        "updatedTime": str(now_ms()),
        "dcpStatus": "OFF",
        "timeWindow": 10,
        "smpGroup": 0,
    }
