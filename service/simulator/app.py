"""A minimal Bybit V5 simulator (stand-in until the full one lands)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from aiohttp import web

# Lot-size filters and a default last price per symbol (see docs/simulator.md).
INSTRUMENTS: dict[str, dict[str, str]] = json.loads(
    (Path(__file__).resolve().parent / "instruments.json").read_text()
)

RECV_WINDOW_DEFAULT = 5000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _envelope(result: Any = None, code: int = 0, msg: str = "OK") -> dict[str, Any]:
    return {
        "retCode": code,
        "retMsg": msg,
        "result": result if result is not None else {},
        "retExtInfo": {},
        "time": _now_ms(),
    }


@dataclass
class Account:
    api_key: str
    api_secret: str
    balance: Decimal
    leverage: dict[str, Decimal] = field(default_factory=dict)


@dataclass
class SimulatorState:
    accounts: dict[str, Account] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    prices: dict[str, Decimal] = field(
        default_factory=lambda: {s: Decimal(i["lastPrice"]) for s, i in INSTRUMENTS.items()}
    )
    latency_ms: int = 0


STATE_KEY = web.AppKey("state", SimulatorState)


class BybitReply(Exception):
    def __init__(self, code: int, msg: str) -> None:
        self.code, self.msg = code, msg
        super().__init__(msg)


def _check_auth(state: SimulatorState, request: web.Request, payload: str) -> Account:
    key = request.headers.get("X-BAPI-API-KEY")
    ts = request.headers.get("X-BAPI-TIMESTAMP")
    sign = request.headers.get("X-BAPI-SIGN")
    window = int(request.headers.get("X-BAPI-RECV-WINDOW") or RECV_WINDOW_DEFAULT)
    if not key or key not in state.accounts:
        raise BybitReply(10003, "API key is invalid.")
    if not ts or not sign:
        raise BybitReply(10004, "error sign! missing signature headers")
    server = _now_ms()
    if not (server - window <= int(ts) < server + 1000):
        raise BybitReply(
            10002,
            f"invalid request, please check your server timestamp or recv_window param. "
            f"req_timestamp[{ts}],server_timestamp[{server}],recv_window[{window}]",
        )
    account = state.accounts[key]
    expected = hmac.new(
        account.api_secret.encode(), f"{ts}{key}{window}{payload}".encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, sign):
        raise BybitReply(10004, "error sign! origin_string[...]")
    return account


def _order_view(order: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in order.items() if k != "api_key"}


async def _v5(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.latency_ms:
        await asyncio.sleep(state.latency_ms / 1000)
    path = request.path
    raw_body = await request.read()
    if request.method == "GET" and raw_body:
        return web.Response(status=403, text="Forbidden")
    try:
        if path == "/v5/market/time":
            now = _now_ms()
            return web.json_response(
                _envelope({"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)})
            )
        if path == "/v5/market/instruments-info":
            return web.json_response(_envelope(_instruments(request)))
        if path == "/v5/market/tickers":
            return web.json_response(_envelope(_tickers(state, request)))
        payload = request.rel_url.raw_query_string if request.method == "GET" else raw_body.decode()
        account = _check_auth(state, request, payload)
        body: dict[str, Any] = json.loads(raw_body) if raw_body else {}
        handlers = {
            "/v5/position/set-leverage": _set_leverage,
            "/v5/order/create": _create_order,
            "/v5/order/realtime": _query_orders,
            "/v5/order/history": _query_orders,
            "/v5/execution/list": _executions,
            "/v5/account/wallet-balance": _wallet,
        }
        handler = handlers.get(path)
        if handler is None:
            return web.Response(status=404, text="Not Found")
        return web.json_response(_envelope(handler(state, account, body, request)))
    except BybitReply as reply:
        return web.json_response(_envelope(code=reply.code, msg=reply.msg))


def _instruments(request: web.Request) -> dict[str, Any]:
    symbol = request.query.get("symbol")
    items = []
    for name, data in INSTRUMENTS.items():
        if symbol and name != symbol:
            continue
        items.append(
            {
                "symbol": name,
                "contractType": "LinearPerpetual",
                "status": "Trading",
                "baseCoin": name.removesuffix("USDT"),
                "quoteCoin": "USDT",
                "priceFilter": {"tickSize": data["tickSize"]},
                "lotSizeFilter": {
                    "maxOrderQty": data["maxMktOrderQty"],
                    "maxMktOrderQty": data["maxMktOrderQty"],
                    "minOrderQty": data["minOrderQty"],
                    "qtyStep": data["qtyStep"],
                    "minNotionalValue": data["minNotionalValue"],
                },
                "leverageFilter": {"minLeverage": "1", "maxLeverage": "50", "leverageStep": "0.01"},
            }
        )
    return {"category": "linear", "list": items, "nextPageCursor": ""}


def _tickers(state: SimulatorState, request: web.Request) -> dict[str, Any]:
    symbol = request.query.get("symbol")
    items = [
        {"symbol": s, "lastPrice": str(p), "markPrice": str(p), "indexPrice": str(p)}
        for s, p in state.prices.items()
        if not symbol or s == symbol
    ]
    return {"category": "linear", "list": items}


def _set_leverage(
    state: SimulatorState, account: Account, body: dict[str, Any], _: web.Request
) -> dict[str, Any]:
    symbol = body.get("symbol")
    if symbol not in INSTRUMENTS:
        raise BybitReply(10001, "params error: symbol invalid")
    leverage = Decimal(str(body.get("buyLeverage")))
    if account.leverage.get(symbol, Decimal(10)) == leverage:
        raise BybitReply(110043, "Set leverage has not been modified")
    account.leverage[symbol] = leverage
    return {}


def _create_order(
    state: SimulatorState, account: Account, body: dict[str, Any], _: web.Request
) -> dict[str, Any]:
    symbol = body.get("symbol")
    if body.get("category") != "linear" or symbol not in INSTRUMENTS:
        raise BybitReply(10001, "params error: symbol invalid")
    spec = INSTRUMENTS[symbol]
    try:
        qty = Decimal(str(body.get("qty")))
    except InvalidOperation:
        raise BybitReply(10001, "Qty invalid") from None
    step = Decimal(spec["qtyStep"])
    if qty <= 0 or (qty / step).to_integral_value(ROUND_FLOOR) * step != qty:
        raise BybitReply(10001, "Qty invalid")
    if qty < Decimal(spec["minOrderQty"]) or qty > Decimal(spec["maxMktOrderQty"]):
        raise BybitReply(10001, "The number of contracts exceeds minimum limit allowed")
    price = state.prices[symbol]
    if qty * price < Decimal(spec["minNotionalValue"]):
        raise BybitReply(110094, "Order does not meet minimum order value 5USDT")
    link = body.get("orderLinkId") or ""
    mine = (o for o in state.orders if o["api_key"] == account.api_key)
    if link and any(o["orderLinkId"] == link for o in mine):
        raise BybitReply(110072, "OrderLinkedID is duplicate")
    margin = qty * price / account.leverage.get(symbol, Decimal(10))
    if margin > account.balance:
        raise BybitReply(110007, "ab not enough for new order")
    account.balance -= margin
    order_id = str(uuid.uuid4())
    now = str(_now_ms())
    fee = (qty * price * Decimal("0.00055")).quantize(Decimal("0.00000001"))
    order = {
        "api_key": account.api_key,
        "orderId": order_id,
        "orderLinkId": link,
        "symbol": symbol,
        "side": body.get("side"),
        "orderType": "Market",
        "qty": format(qty, "f"),
        "cumExecQty": format(qty, "f"),
        "avgPrice": str(price),
        "cumExecFee": str(fee),
        "orderStatus": "Filled",
        "createdTime": now,
        "updatedTime": now,
    }
    state.orders.append(order)
    state.executions.append(
        {
            "api_key": account.api_key,
            "symbol": symbol,
            "orderId": order_id,
            "orderLinkId": link,
            "side": body.get("side"),
            "execId": str(uuid.uuid4()),
            "execPrice": str(price),
            "execQty": format(qty, "f"),
            "execValue": format(qty * price, "f"),
            "execFee": str(fee),
            "execTime": now,
        }
    )
    return {"orderId": order_id, "orderLinkId": link}


def _query_orders(
    state: SimulatorState, account: Account, _: dict[str, Any], request: web.Request
) -> dict[str, Any]:
    link, order_id = request.query.get("orderLinkId"), request.query.get("orderId")
    items = [
        _order_view(o)
        for o in state.orders
        if o["api_key"] == account.api_key
        and (not link or o["orderLinkId"] == link)
        and (not order_id or o["orderId"] == order_id)
    ]
    return {"category": "linear", "list": items, "nextPageCursor": ""}


def _executions(
    state: SimulatorState, account: Account, _: dict[str, Any], request: web.Request
) -> dict[str, Any]:
    order_id = request.query.get("orderId")
    items = [
        _order_view(e)
        for e in state.executions
        if e["api_key"] == account.api_key and (not order_id or e["orderId"] == order_id)
    ]
    return {"category": "linear", "list": items, "nextPageCursor": ""}


def _wallet(
    state: SimulatorState, account: Account, _: dict[str, Any], __: web.Request
) -> dict[str, Any]:
    balance = str(account.balance)
    return {
        "list": [
            {
                "accountType": "UNIFIED",
                "totalEquity": balance,
                "totalAvailableBalance": balance,
                "coin": [{"coin": "USDT", "equity": balance, "walletBalance": balance}],
            }
        ]
    }


async def _sim_accounts(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await request.json()
    state.accounts[data["api_key"]] = Account(
        api_key=data["api_key"], api_secret=data["api_secret"], balance=Decimal(data["balance"])
    )
    return web.json_response({"api_key": data["api_key"]})


async def _sim_orders(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    key = request.query.get("api_key")
    return web.json_response(
        {"orders": [o for o in state.orders if not key or o["api_key"] == key]}
    )


async def _sim_config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await request.json()
    if "latency_ms" in data:
        state.latency_ms = int(data["latency_ms"])
    return web.json_response({"latency_ms": state.latency_ms})


def create_app(state: SimulatorState | None = None) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state or SimulatorState()
    app.router.add_post("/sim/accounts", _sim_accounts)
    app.router.add_get("/sim/orders", _sim_orders)
    app.router.add_put("/sim/config", _sim_config)
    app.router.add_route("*", "/v5/{tail:.*}", _v5)
    return app


def run(host: str = "127.0.0.1", port: int = 8999) -> None:
    web.run_app(
        create_app(),
        host=host,
        port=port,
        access_log=None,
        print=lambda _: print(f"simulator listening on http://{host}:{port}", flush=True),
    )
