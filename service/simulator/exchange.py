"""The Bybit V5 endpoints the service (and pybit, and ccxt) call, category linear only."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from decimal import ROUND_DOWN, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from service.simulator.errors import BybitReply
from service.simulator.state import (
    DEFAULT_LEVERAGE,
    TAKER_FEE,
    Account,
    SimulatorState,
    now_ms,
)

PAGE_LIMIT = 500
RATE_WINDOW_MS = 1000
_LINK_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _category(params: dict[str, Any]) -> None:
    if params.get("category") != "linear":
        raise BybitReply(10001, "params error: category only supports linear here")


def _decimal(raw: object, name: str) -> Decimal:
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise BybitReply(10001, f"params error: {name} invalid") from None
    if not value.is_finite():
        raise BybitReply(10001, f"params error: {name} invalid")
    return value


# ---- public ------------------------------------------------------------------------------


def market_time(state: SimulatorState, query: dict[str, str]) -> dict[str, Any]:
    now = now_ms()
    return {"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)}


def instruments_info(state: SimulatorState, query: dict[str, str]) -> dict[str, Any]:
    _category(query)
    symbol = query.get("symbol")
    items = [i.payload() for s, i in sorted(state.instruments.items()) if not symbol or s == symbol]
    try:
        limit = min(int(query.get("limit") or PAGE_LIMIT), 1000)
        start = int(query.get("cursor") or 0)
    except ValueError:
        raise BybitReply(10001, "params error: limit or cursor invalid") from None
    page = items[start : start + limit]
    more = start + limit < len(items)
    return {
        "category": "linear",
        "list": page,
        "nextPageCursor": str(start + limit) if more else "",
    }


def tickers(state: SimulatorState, query: dict[str, str]) -> dict[str, Any]:
    _category(query)
    symbol = query.get("symbol")
    if symbol and symbol not in state.prices:
        raise BybitReply(10001, "params error: symbol invalid")
    items = []
    for name, price in sorted(state.prices.items()):
        if symbol and name != symbol:
            continue
        tick = state.instruments[name].tick_size
        items.append(
            {
                "symbol": name,
                "lastPrice": str(price),
                "markPrice": str(price),
                "indexPrice": str(price),
                "bid1Price": str(price - tick),
                "ask1Price": str(price + tick),
                "bid1Size": "1",
                "ask1Size": "1",
            }
        )
    return {"category": "linear", "list": items}


# ---- private -----------------------------------------------------------------------------

PrivateHandler = Callable[[SimulatorState, Account, dict[str, Any]], dict[str, Any]]


def set_leverage(state: SimulatorState, account: Account, body: dict[str, Any]) -> dict[str, Any]:
    _category(body)
    instrument = state.instruments.get(str(body.get("symbol")))
    if instrument is None:
        raise BybitReply(10001, "params error: symbol invalid")
    buy = _decimal(body.get("buyLeverage"), "buyLeverage")
    sell = _decimal(body.get("sellLeverage"), "sellLeverage")
    if buy != sell:
        raise BybitReply(10001, "params error: buy leverage must equal sell leverage (one-way)")
    if not Decimal(1) <= buy <= instrument.max_leverage:
        raise BybitReply(10001, f"leverage invalid: must be within [1, {instrument.max_leverage}]")
    if account.leverage.get(instrument.symbol, DEFAULT_LEVERAGE) == buy:
        raise BybitReply(110043, "Set leverage has not been modified.")
    account.leverage[instrument.symbol] = buy
    return {}


def _check_rate(state: SimulatorState, account: Account) -> None:
    limit = state.config.order_rate_limit
    if limit <= 0:
        return
    now = now_ms()
    while account.order_calls and account.order_calls[0] <= now - RATE_WINDOW_MS:
        account.order_calls.popleft()
    if len(account.order_calls) >= limit:
        raise BybitReply(10006, "Too many visits. Exceeded the API Rate Limit.")
    account.order_calls.append(now)


def rate_headers(state: SimulatorState, account: Account) -> dict[str, str]:
    limit = state.config.order_rate_limit
    used = len(account.order_calls)
    reset = (account.order_calls[0] + RATE_WINDOW_MS) if account.order_calls else now_ms()
    return {
        "X-Bapi-Limit": str(limit),
        "X-Bapi-Limit-Status": str(max(limit - used, 0)),
        "X-Bapi-Limit-Reset-Timestamp": str(reset),
    }


def create_order(state: SimulatorState, account: Account, body: dict[str, Any]) -> dict[str, Any]:
    _check_rate(state, account)
    _category(body)
    instrument = state.instruments.get(str(body.get("symbol")))
    if instrument is None:
        raise BybitReply(10001, "params error: symbol invalid")
    if instrument.status != "Trading":
        raise BybitReply(110074, f"{instrument.symbol} is not open for trading")
    side = body.get("side")
    if side not in ("Buy", "Sell"):
        raise BybitReply(10001, "params error: side invalid")
    if body.get("orderType") != "Market":
        raise BybitReply(10001, "params error: the simulator takes Market orders only")
    if not isinstance(body.get("qty"), str):
        raise BybitReply(10001, "params error: qty must be a string")
    qty = _decimal(body["qty"], "qty")
    link = body.get("orderLinkId") or ""
    if not isinstance(link, str) or len(link) > 36 or not set(link) <= _LINK_ID_CHARS:
        raise BybitReply(10001, "params error: orderLinkId invalid")
    if qty <= 0 or (qty / instrument.qty_step) % 1 != 0:
        raise BybitReply(10001, "Qty invalid: not a multiple of qtyStep")
    if qty < instrument.min_order_qty:
        raise BybitReply(10001, "The number of contracts exceeds minimum limit allowed")
    if qty > instrument.max_mkt_order_qty:
        raise BybitReply(10001, "The number of contracts exceeds maximum limit allowed")
    price = state.prices[instrument.symbol]
    if qty * price < instrument.min_notional_value:
        raise BybitReply(
            110094, f"Order does not meet minimum order value {instrument.min_notional_value}USDT"
        )
    if link and any(o["orderLinkId"] == link for o in _orders_of(state, account)):
        raise BybitReply(110072, "OrderLinkedID is duplicate")
    slip = price * state.config.slippage_bps / Decimal(10_000)
    fill_price = (price + slip if side == "Buy" else price - slip).quantize(
        instrument.tick_size, rounding=ROUND_DOWN
    )
    filled = (qty * state.config.fill_ratio / instrument.qty_step).to_integral_value(
        rounding=ROUND_FLOOR
    ) * instrument.qty_step
    leverage = account.leverage.get(instrument.symbol, DEFAULT_LEVERAGE)
    fee = (filled * fill_price * TAKER_FEE).quantize(Decimal("0.00000001"))
    margin = filled * fill_price / leverage + fee
    if qty * fill_price / leverage + fee > account.balance:
        raise BybitReply(110007, "ab not enough for new order")
    account.balance -= margin
    order_id = str(uuid.uuid4())
    now = str(now_ms())
    status = "Filled" if filled == qty else "Cancelled"
    order = {
        "api_key": account.api_key,
        "orderId": order_id,
        "orderLinkId": link,
        "symbol": instrument.symbol,
        "side": side,
        "orderType": "Market",
        "timeInForce": "IOC",
        "qty": format(qty, "f"),
        "cumExecQty": format(filled.normalize() if filled else Decimal(0), "f"),
        "cumExecValue": format(filled * fill_price, "f"),
        "cumExecFee": format(fee, "f"),
        "avgPrice": str(fill_price) if filled else "",
        "leavesQty": "0",
        "orderStatus": status,
        "cancelType": "" if status == "Filled" else "CancelByCannotFillAtAll",
        "positionIdx": 0,
        "createdTime": now,
        "updatedTime": now,
    }
    state.orders.append(order)
    if filled:
        state.executions.append(
            {
                "api_key": account.api_key,
                "symbol": instrument.symbol,
                "orderId": order_id,
                "orderLinkId": link,
                "side": side,
                "orderType": "Market",
                "execId": str(uuid.uuid4()),
                "execPrice": str(fill_price),
                "execQty": format(filled, "f"),
                "execValue": format(filled * fill_price, "f"),
                "execFee": format(fee, "f"),
                "feeRate": str(TAKER_FEE),
                "execType": "Trade",
                "execTime": now,
                "isMaker": False,
            }
        )
    return {"orderId": order_id, "orderLinkId": link}


def _orders_of(state: SimulatorState, account: Account) -> list[dict[str, Any]]:
    return [o for o in state.orders if o["api_key"] == account.api_key]


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "api_key"}


def _select(items: list[dict[str, Any]], query: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("symbol", "orderId", "orderLinkId"):
        if query.get(key):
            items = [i for i in items if i.get(key) == query[key]]
    return items


def order_realtime(
    state: SimulatorState, account: Account, query: dict[str, Any]
) -> dict[str, Any]:
    _category(query)
    items = _select(_orders_of(state, account), query)
    if not query.get("orderId") and not query.get("orderLinkId"):
        # Without an id, realtime lists open orders only (ours fill or cancel at once).
        items = [o for o in items if o["orderStatus"] in ("New", "PartiallyFilled")]
    newest_first = list(reversed(items))[:50]
    return {"category": "linear", "list": [_public(o) for o in newest_first], "nextPageCursor": ""}


def order_history(state: SimulatorState, account: Account, query: dict[str, Any]) -> dict[str, Any]:
    _category(query)
    items = [o for o in _select(_orders_of(state, account), query)]
    newest_first = list(reversed(items))[:50]
    return {"category": "linear", "list": [_public(o) for o in newest_first], "nextPageCursor": ""}


def execution_list(
    state: SimulatorState, account: Account, query: dict[str, Any]
) -> dict[str, Any]:
    _category(query)
    mine = [e for e in state.executions if e["api_key"] == account.api_key]
    items = list(reversed(_select(mine, query)))[:100]
    return {"category": "linear", "list": [_public(e) for e in items], "nextPageCursor": ""}


def wallet_balance(
    state: SimulatorState, account: Account, query: dict[str, Any]
) -> dict[str, Any]:
    if query.get("accountType") not in ("UNIFIED", "CONTRACT"):
        raise BybitReply(10001, "params error: accountType invalid")
    balance = format(account.balance, "f")
    return {
        "list": [
            {
                "accountType": "UNIFIED",
                "totalEquity": balance,
                "totalWalletBalance": balance,
                "totalAvailableBalance": balance,
                "totalMarginBalance": balance,
                "coin": [
                    {
                        "coin": "USDT",
                        "equity": balance,
                        "walletBalance": balance,
                        "availableToWithdraw": balance,
                    }
                ],
            }
        ]
    }


def position_list(state: SimulatorState, account: Account, query: dict[str, Any]) -> dict[str, Any]:
    _category(query)
    sizes: dict[str, Decimal] = {}
    for execution in state.executions:
        if execution["api_key"] != account.api_key:
            continue
        if query.get("symbol") and execution["symbol"] != query["symbol"]:
            continue
        signed = Decimal(execution["execQty"]) * (1 if execution["side"] == "Buy" else -1)
        sizes[execution["symbol"]] = sizes.get(execution["symbol"], Decimal(0)) + signed
    items = [
        {
            "symbol": symbol,
            "side": "Buy" if size > 0 else "Sell" if size < 0 else "",
            "size": format(abs(size), "f"),
            "leverage": str(account.leverage.get(symbol, DEFAULT_LEVERAGE)),
            "positionIdx": 0,
        }
        for symbol, size in sorted(sizes.items())
    ]
    return {"category": "linear", "list": items, "nextPageCursor": ""}


def query_api(state: SimulatorState, account: Account, query: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "1",
        "apiKey": account.api_key,
        "readOnly": 0,
        "permissions": {"ContractTrade": ["Order", "Position"], "Wallet": ["AccountTransfer"]},
        "unified": 1,
        "uta": 1,
        "isMaster": True,
    }


def account_info(state: SimulatorState, account: Account, query: dict[str, Any]) -> dict[str, Any]:
    return {
        "unifiedMarginStatus": 5,
        "marginMode": "REGULAR_MARGIN",
        "isMasterTrader": False,
        "spotHedgingStatus": "OFF",
        "updatedTime": str(now_ms()),
    }


PUBLIC: dict[str, Callable[[SimulatorState, dict[str, str]], dict[str, Any]]] = {
    "/v5/market/time": market_time,
    "/v5/market/instruments-info": instruments_info,
    "/v5/market/tickers": tickers,
}
PRIVATE_POST: dict[str, PrivateHandler] = {
    "/v5/position/set-leverage": set_leverage,
    "/v5/order/create": create_order,
}
PRIVATE_GET: dict[str, PrivateHandler] = {
    "/v5/order/realtime": order_realtime,
    "/v5/order/history": order_history,
    "/v5/execution/list": execution_list,
    "/v5/account/wallet-balance": wallet_balance,
    "/v5/position/list": position_list,
    "/v5/user/query-api": query_api,
    "/v5/account/info": account_info,
}


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        raise BybitReply(10001, "params error: body is not JSON") from None
    if not isinstance(body, dict):
        raise BybitReply(10001, "params error: body must be a JSON object")
    return body


def query_dict(request: web.Request) -> dict[str, Any]:
    return dict(request.query)
