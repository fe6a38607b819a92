"""The aiohttp application: Bybit's envelope, latency, fault injection, and the /sim/ admin API."""

from __future__ import annotations

import asyncio
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from service.simulator import exchange
from service.simulator.auth import authenticate
from service.simulator.errors import BybitReply
from service.simulator.state import Account, Fault, SimulatorState, now_ms

STATE_KEY = web.AppKey("state", SimulatorState)


def envelope(result: Any = None, code: int = 0, msg: str = "OK") -> dict[str, Any]:
    return {
        "retCode": code,
        "retMsg": msg,
        "result": result if result is not None else {},
        "retExtInfo": {},
        "time": now_ms(),
    }


async def _apply_fault(fault: Fault, request: web.Request) -> web.StreamResponse | None:
    """The reply a fault replaces the real one with; None to answer normally after it."""
    if fault.kind == "http_status":
        body = fault.body if fault.body is not None else "<html><body>502 Bad Gateway</body></html>"
        return web.Response(status=fault.status, text=body, content_type="text/html")
    if fault.kind == "retcode":
        return web.json_response(envelope(code=fault.ret_code, msg=fault.ret_msg))
    if fault.kind == "malformed":
        body = fault.body if fault.body is not None else '{"retCode":0,"retMsg":"OK","result":{'
        return web.Response(status=200, text=body, content_type="application/json")
    if fault.kind == "empty":
        return web.Response(status=200, body=b"", content_type="application/json")
    if fault.kind == "delay":
        await asyncio.sleep(fault.delay_ms / 1000)
        return None
    if fault.kind == "hang":
        await asyncio.sleep((fault.delay_ms or 60_000) / 1000)
        _drop(request)
        return web.Response(status=504)
    return None


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def _v5(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    path = request.path
    state.requests[path] += 1
    if state.config.latency_ms:
        await asyncio.sleep(state.config.latency_ms / 1000)
    raw_body = await request.read()
    if request.method == "GET" and raw_body:
        return web.Response(status=403, text="403 Forbidden")
    fault = state.fault_for(path, request.headers.get("X-BAPI-API-KEY"))
    if fault is not None and fault.kind != "drop_after_fill":
        replaced = await _apply_fault(fault, request)
        if replaced is not None:
            return replaced
    headers: dict[str, str] = {}
    try:
        if path in exchange.PUBLIC and request.method == "GET":
            result = exchange.PUBLIC[path](state, exchange.query_dict(request))
            return web.json_response(envelope(result))
        handlers = exchange.PRIVATE_GET if request.method == "GET" else exchange.PRIVATE_POST
        handler = handlers.get(path)
        if handler is None:
            return web.Response(status=404, text="404 page not found")
        payload = (
            request.rel_url.raw_query_string
            if request.method == "GET"
            else raw_body.decode(errors="replace")
        )
        account: Account = authenticate(state, request, payload)
        try:
            params = (
                exchange.query_dict(request)
                if request.method == "GET"
                else (exchange.parse_body(raw_body))
            )
            result = handler(state, account, params)
        finally:
            headers = exchange.rate_headers(state, account)
    except BybitReply as reply:
        return web.json_response(envelope(code=reply.code, msg=reply.msg), headers=headers)
    if fault is not None and fault.kind == "drop_after_fill":
        # The order is taken and recorded, then the reply is lost with the connection.
        _drop(request)
    return web.json_response(envelope(result), headers=headers)


# ---- admin -------------------------------------------------------------------------------


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


def _dec(value: object, name: str) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise web.HTTPBadRequest(text=f"{name} must be a decimal") from None


async def put_account(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json(request)
    key, secret = data.get("api_key"), data.get("api_secret")
    if not isinstance(key, str) or not isinstance(secret, str) or not key or not secret:
        raise web.HTTPBadRequest(text="api_key and api_secret are required strings")
    state.accounts[key] = Account(
        api_key=key, api_secret=secret, balance=_dec(data.get("balance", "100000"), "balance")
    )
    return web.json_response({"api_key": key})


async def get_orders(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    key = request.query.get("api_key")
    return web.json_response(
        {"orders": [o for o in state.orders if not key or o["api_key"] == key]}
    )


async def get_requests(request: web.Request) -> web.Response:
    return web.json_response({"counts": dict(request.app[STATE_KEY].requests)})


async def put_ticker(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    symbol = request.match_info["symbol"]
    if symbol not in state.instruments:
        raise web.HTTPNotFound(text=f"unknown symbol {symbol}")
    data = await _json(request)
    state.prices[symbol] = _dec(data.get("lastPrice"), "lastPrice")
    return web.json_response({"symbol": symbol, "lastPrice": str(state.prices[symbol])})


_INSTRUMENT_FIELDS = {
    "qtyStep": "qty_step",
    "minOrderQty": "min_order_qty",
    "maxOrderQty": "max_order_qty",
    "maxMktOrderQty": "max_mkt_order_qty",
    "minNotionalValue": "min_notional_value",
}


async def put_instrument(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    instrument = state.instruments.get(request.match_info["symbol"])
    if instrument is None:
        raise web.HTTPNotFound(text="unknown symbol")
    data = await _json(request)
    if "status" in data:
        instrument.status = str(data["status"])
    for name, attribute in _INSTRUMENT_FIELDS.items():
        if name in data:
            setattr(instrument, attribute, _dec(data[name], name))
    return web.json_response(instrument.payload())


async def put_config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json(request)
    config = state.config
    if "latency_ms" in data:
        config.latency_ms = int(data["latency_ms"])
    if "slippage_bps" in data:
        config.slippage_bps = _dec(data["slippage_bps"], "slippage_bps")
    if "order_rate_limit" in data:
        config.order_rate_limit = int(data["order_rate_limit"])
    if "fill_ratio" in data:
        config.fill_ratio = _dec(data["fill_ratio"], "fill_ratio")
    return web.json_response(
        {
            "latency_ms": config.latency_ms,
            "slippage_bps": str(config.slippage_bps),
            "order_rate_limit": config.order_rate_limit,
            "fill_ratio": str(config.fill_ratio),
        }
    )


_FAULT_KINDS = {"http_status", "retcode", "delay", "hang", "malformed", "empty", "drop_after_fill"}


async def post_fault(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json(request)
    kind, path = data.get("kind"), data.get("path")
    if kind not in _FAULT_KINDS or not isinstance(path, str):
        raise web.HTTPBadRequest(text=f"need path and kind in {sorted(_FAULT_KINDS)}")
    fault = Fault(
        id=state.next_fault_id,
        path=path,
        kind=kind,
        skip=int(data.get("skip", 0)),
        times=None if data.get("times", 1) is None else int(data.get("times", 1)),
        api_key=data.get("api_key"),
        status=int(data.get("status", 502)),
        body=data.get("body"),
        ret_code=int(data.get("retCode", 10016)),
        ret_msg=str(data.get("retMsg", "Internal server error")),
        delay_ms=int(data.get("delay_ms", 0)),
    )
    state.next_fault_id += 1
    state.faults.append(fault)
    return web.json_response({"id": fault.id})


async def delete_faults(request: web.Request) -> web.Response:
    request.app[STATE_KEY].faults.clear()
    return web.json_response({"faults": 0})


async def post_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


def create_app(state: SimulatorState | None = None) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state if state is not None else SimulatorState()
    app.router.add_post("/sim/accounts", put_account)
    app.router.add_get("/sim/orders", get_orders)
    app.router.add_get("/sim/requests", get_requests)
    app.router.add_put("/sim/tickers/{symbol}", put_ticker)
    app.router.add_put("/sim/instruments/{symbol}", put_instrument)
    app.router.add_put("/sim/config", put_config)
    app.router.add_post("/sim/faults", post_fault)
    app.router.add_delete("/sim/faults", delete_faults)
    app.router.add_post("/sim/reset", post_reset)
    app.router.add_route("*", "/v5/{tail:.*}", _v5)
    return app


def run(host: str = "127.0.0.1", port: int = 8999) -> None:
    def ready(_: str) -> None:
        print(f"simulator listening on http://{host}:{port}", flush=True)

    web.run_app(create_app(), host=host, port=port, access_log=None, print=ready)


__all__ = ["STATE_KEY", "SimulatorState", "create_app", "envelope", "run"]
