"""The unsigned admin API under /sim/, which tests, `demo` and the benchmarks drive."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aiohttp import web

from service.simulator.errors import now_ms
from service.simulator.instruments import LOT_SIZE_FIELDS, Instrument
from service.simulator.keys import STATE_KEY
from service.simulator.state import (
    DEFAULT_BALANCE,
    MARGIN_MODES,
    PERMISSION_GROUPS,
    default_permissions,
)
from service.simulator.values import loose_decimal, price_string, scaled

INSTRUMENT_STATUSES = ("PreLaunch", "Trading", "Delivering", "Closed")
BATCH_MAX_ORDERS_RANGE = range(1, 101)


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise _bad("the body must be JSON") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    return data


def _decimal(data: dict[str, Any], name: str, *, positive: bool = False) -> Decimal:
    try:
        value = loose_decimal(data.get(name), name)
    except ValueError as error:
        raise _bad(str(error)) from None
    if value < 0 or (positive and value == 0):
        raise _bad(f"{name} must be {'positive' if positive else 'non-negative'}")
    return value


def _integer(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{name} must be a non-negative integer")
    return value


async def post_account(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json_object(request)
    key, secret = data.get("api_key"), data.get("api_secret")
    if not isinstance(key, str) or not isinstance(secret, str) or not key or not secret:
        raise _bad("api_key and api_secret are required strings")
    balance = _decimal(data, "balance") if "balance" in data else DEFAULT_BALANCE
    mode = data.get("position_mode", "one_way")
    if mode not in ("one_way", "hedge"):
        raise _bad("position_mode must be one_way or hedge")
    margin_mode = data.get("margin_mode", "REGULAR_MARGIN")
    if margin_mode not in MARGIN_MODES:
        raise _bad(f"margin_mode must be one of {', '.join(MARGIN_MODES)}")
    uid = data.get("uid")
    if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or uid <= 0):
        raise _bad("uid must be a positive integer (two keys of one account share it)")
    account = state.add_account(
        key,
        secret,
        balance,
        hedge_mode=mode == "hedge",
        margin_mode=margin_mode,
        uid=uid,
        key=_key_rights(data, default_permissions(), ["*"], False),
    )
    for field_name, hedge in (("hedge_symbols", True), ("one_way_symbols", False)):
        symbols = data.get(field_name, [])
        if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
            raise _bad(f"{field_name} must be a list of symbols")
        for symbol in symbols:
            account.hedge_symbols[symbol] = hedge
    return web.json_response({"api_key": key})


def _key_rights(
    data: dict[str, Any], permissions: dict[str, list[str]], ips: list[str], read_only: bool
) -> tuple[bool, dict[str, list[str]], list[str]]:
    """What query-api shows of a key: `read_only`, `permissions` (groups of query-api; a
    group not named has none) and `ips` from `data`, else as given."""
    if "read_only" in data:
        if not isinstance(data["read_only"], bool):
            raise _bad("read_only must be true or false")
        read_only = data["read_only"]
    if "permissions" in data:
        given = data["permissions"]
        if not isinstance(given, dict) or not all(
            group in PERMISSION_GROUPS
            and isinstance(granted, list)
            and all(isinstance(p, str) for p in granted)
            for group, granted in given.items()
        ):
            raise _bad(
                "permissions must map groups of query-api "
                f"({', '.join(PERMISSION_GROUPS)}) to lists of strings"
            )
        permissions = {group: list(given.get(group, [])) for group in PERMISSION_GROUPS}
    if "ips" in data:
        given_ips = data["ips"]
        if not isinstance(given_ips, list) or not all(isinstance(ip, str) for ip in given_ips):
            raise _bad('ips must be a list of addresses (["*"]: bound to none)')
        ips = list(given_ips)
    return read_only, permissions, ips


async def put_key(request: web.Request) -> web.Response:
    """Change what an account's key may do, as query-api shows it: `read_only`,
    `permissions`, `ips` (each optional; what is not given stays)."""
    state = request.app[STATE_KEY]
    account = state.accounts.get(request.match_info["api_key"])
    if account is None:
        raise web.HTTPNotFound(text="unknown api_key")
    data = await _json_object(request)
    account.read_only, account.permissions, account.ips = _key_rights(
        data, account.permissions, account.ips, account.read_only
    )
    return web.json_response(
        {"read_only": account.read_only, "permissions": account.permissions, "ips": account.ips}
    )


async def put_position_mode(request: web.Request) -> web.Response:
    """Switch one symbol of an account to `one_way` or `hedge` (as the user can on Bybit)."""
    state = request.app[STATE_KEY]
    account = state.accounts.get(request.match_info["api_key"])
    if account is None:
        raise web.HTTPNotFound(text="unknown api_key")
    data = await _json_object(request)
    symbol, mode = data.get("symbol"), data.get("mode")
    if symbol not in state.instruments or mode not in ("one_way", "hedge"):
        raise _bad("symbol must be a known symbol and mode one_way or hedge")
    account.hedge_symbols[str(symbol)] = mode == "hedge"
    return web.json_response({"symbol": symbol, "mode": mode})


async def post_position(request: web.Request) -> web.Response:
    """An existing position the user holds (opened outside the service): symbol, side,
    size, at `leverage` (default 10) and `price` (default the last price)."""
    state = request.app[STATE_KEY]
    data = await _json_object(request)
    account = state.accounts.get(str(data.get("api_key")))
    if account is None:
        raise web.HTTPNotFound(text="unknown api_key")
    instrument = state.instruments.get(str(data.get("symbol")))
    if instrument is None:
        raise _bad("unknown symbol")
    side = data.get("side")
    if side not in ("Buy", "Sell"):
        raise _bad("side must be Buy or Sell")
    size = _decimal(data, "size", positive=True)
    price = _decimal(data, "price", positive=True) if "price" in data else None
    leverage = _decimal(data, "leverage", positive=True) if "leverage" in data else None
    idx = (1 if side == "Buy" else 2) if account.is_hedge(instrument.symbol) else 0
    position = account.position(instrument.symbol, idx)
    position.size = size if side == "Buy" else -size
    position.avg_price = price or state.prices[instrument.symbol]
    if leverage is not None:
        account.leverage[instrument.symbol] = leverage
    position.initial_margin = size * position.avg_price / account.leverage_for(instrument.symbol)
    position.created_ms = position.updated_ms = now_ms()
    return web.json_response({"symbol": instrument.symbol, "positionIdx": idx})


async def get_positions(request: web.Request) -> web.Response:
    """Every non-empty position of an account, by symbol and positionIdx."""
    state = request.app[STATE_KEY]
    account = state.accounts.get(request.match_info["api_key"])
    if account is None:
        raise web.HTTPNotFound(text="unknown api_key")
    positions = [
        {
            "symbol": p.symbol,
            "positionIdx": p.idx,
            "side": p.side,
            "size": scaled(abs(p.size), state.instruments[p.symbol].qty_step),
            "avgPrice": price_string(p.avg_price),
        }
        for _, p in sorted(account.positions.items())
        if p.size
    ]
    return web.json_response({"positions": positions})


async def get_orders(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    key = request.query.get("api_key")
    orders = [o.record() for o in state.orders if key is None or o.api_key == key]
    return web.json_response({"orders": orders})


async def get_requests(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({"counts": dict(state.requests), "refusals": dict(state.refusals)})


async def get_calls(request: web.Request) -> web.Response:
    """The journal of /v5 calls as they arrived, filtered by `api_key` and `path`. A batch is
    listed once per order it carried, so orders are counted alike however they were sent."""
    key, path = request.query.get("api_key"), request.query.get("path")
    calls = [
        entry
        for c in request.app[STATE_KEY].journal
        if (key is None or c["api_key"] == key) and (path is None or c["path"] == path)
        for entry in _per_order(c)
    ]
    return web.json_response({"calls": calls})


def _per_order(call: dict[str, Any]) -> list[dict[str, Any]]:
    """A journal entry as /sim/calls lists it: a batch's entry (it keeps its items'
    orderLinkIds in `batch_links`) becomes one entry per item, with the batch's arrival."""
    links = call.get("batch_links")
    if not links:
        return [call]
    shared = {name: value for name, value in call.items() if name != "batch_links"}
    return [{**shared, "order_link_id": link} for link in links]


def _instrument(request: web.Request) -> Instrument:
    """The instrument named in the path, or 404."""
    instrument = request.app[STATE_KEY].instruments.get(request.match_info["symbol"])
    if instrument is None:
        raise web.HTTPNotFound(text="unknown symbol")
    return instrument


async def put_ticker(request: web.Request) -> web.Response:
    """Move the last price, the mark price, or both. The mark follows the last price until it
    is set on its own; `"markPrice": null` makes it follow again."""
    state = request.app[STATE_KEY]
    instrument = _instrument(request)
    data = await _json_object(request)
    unknown = set(data) - {"lastPrice", "markPrice"}
    if unknown:
        raise _bad(f"unknown fields: {', '.join(sorted(unknown))}")
    if not data:
        raise _bad("lastPrice or markPrice is required")
    last = _decimal(data, "lastPrice", positive=True) if "lastPrice" in data else None
    mark = None if data.get("markPrice") is None else _decimal(data, "markPrice", positive=True)
    if last is not None:
        state.prices[instrument.symbol] = instrument.price(last)
    if "markPrice" in data:
        if mark is None:
            state.marks.pop(instrument.symbol, None)
        else:
            state.marks[instrument.symbol] = instrument.price(mark)
    return web.json_response(
        instrument.ticker(
            state.prices[instrument.symbol], now_ms(), state.mark_price(instrument.symbol)
        )
    )


async def put_instrument(request: web.Request) -> web.Response:
    instrument = _instrument(request)
    data = await _json_object(request)
    unknown = set(data) - {"status", "maxLeverage", "bookDepth", "bookLevels", *LOT_SIZE_FIELDS}
    if unknown:
        raise _bad(f"unknown fields: {', '.join(sorted(unknown))}")
    if "status" in data:
        if data["status"] not in INSTRUMENT_STATUSES:
            raise _bad(f"status must be one of {', '.join(INSTRUMENT_STATUSES)}")
        instrument.status = data["status"]
    for name in LOT_SIZE_FIELDS:
        if name in data:
            instrument.set_lot_size(name, _decimal(data, name, positive=name != "minNotionalValue"))
    if "maxLeverage" in data:
        instrument.max_leverage = _decimal(data, "maxLeverage", positive=True)
    if "bookDepth" in data:
        # null: a deep book again.
        instrument.book_depth = None if data["bookDepth"] is None else _decimal(data, "bookDepth")
    if "bookLevels" in data:
        levels = _integer(data, "bookLevels")
        if levels < 1:
            raise _bad("bookLevels must be at least 1")
        instrument.book_levels = levels
    return web.json_response(instrument.payload())


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].config.payload())


async def put_config(request: web.Request) -> web.Response:
    config = request.app[STATE_KEY].config
    data = await _json_object(request)
    unknown = set(data) - {
        "latency_ms",
        "slippage_bps",
        "order_rate_limit",
        "batch_rate_limit",
        "batch_max_orders",
        "fill_ratio",
        "clock_offset_ms",
        "account_limits",
        "ip_limit",
        "ip_ban_ms",
        "max_in_flight",
        "order_visible_ms",
        "fill_delay_ms",
        "history_lag_ms",
        "avg_price_blank",
    }
    if unknown:
        raise _bad(f"unknown fields: {', '.join(sorted(unknown))}")
    if "fill_ratio" in data and _decimal(data, "fill_ratio") > 1:
        raise _bad("fill_ratio must be between 0 and 1")
    if "batch_max_orders" in data and (
        _integer(data, "batch_max_orders") not in BATCH_MAX_ORDERS_RANGE
    ):
        raise _bad("batch_max_orders must be between 1 and 100")
    if "latency_ms" in data:
        config.latency_ms = _integer(data, "latency_ms")
    for name in ("order_rate_limit", "batch_rate_limit", "batch_max_orders"):
        if name in data:
            setattr(config, name, _integer(data, name))
    if "slippage_bps" in data:
        config.slippage_bps = _decimal(data, "slippage_bps")
    if "fill_ratio" in data:
        config.fill_ratio = _decimal(data, "fill_ratio")
    if "clock_offset_ms" in data:
        offset = data["clock_offset_ms"]
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise _bad("clock_offset_ms must be an integer (milliseconds, may be negative)")
        config.clock_offset_ms = offset
    for flag in ("account_limits", "avg_price_blank"):
        if flag in data:
            if not isinstance(data[flag], bool):
                raise _bad(f"{flag} must be true or false")
            setattr(config, flag, data[flag])
    for name in (
        "ip_limit",
        "ip_ban_ms",
        "max_in_flight",
        "order_visible_ms",
        "fill_delay_ms",
        "history_lag_ms",
    ):
        if name in data:
            setattr(config, name, _integer(data, name))
    return web.json_response(config.payload())


async def post_fault(request: web.Request) -> web.Response:
    data = await _json_object(request)
    try:
        fault = request.app[STATE_KEY].faults.add(data)
    except ValueError as error:
        raise _bad(str(error)) from None
    return web.json_response({"id": fault.id})


async def get_faults(request: web.Request) -> web.Response:
    faults = request.app[STATE_KEY].faults.faults
    return web.json_response({"faults": [f.payload() for f in faults]})


async def delete_faults(request: web.Request) -> web.Response:
    request.app[STATE_KEY].faults.clear()
    return web.json_response({"faults": []})


async def delete_ban(request: web.Request) -> web.Response:
    """Lift an IP ban early (tests)."""
    state = request.app[STATE_KEY]
    state.banned_until_ms = 0
    state.ip_calls.clear()
    return web.json_response({"banned": False})


async def post_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/sim/accounts", post_account)
    app.router.add_post("/sim/positions", post_position)
    app.router.add_put("/sim/accounts/{api_key}/position-mode", put_position_mode)
    app.router.add_put("/sim/accounts/{api_key}/key", put_key)
    app.router.add_get("/sim/accounts/{api_key}/positions", get_positions)
    app.router.add_get("/sim/orders", get_orders)
    app.router.add_get("/sim/requests", get_requests)
    app.router.add_get("/sim/calls", get_calls)
    app.router.add_put("/sim/tickers/{symbol}", put_ticker)
    app.router.add_put("/sim/instruments/{symbol}", put_instrument)
    app.router.add_get("/sim/config", get_config)
    app.router.add_put("/sim/config", put_config)
    app.router.add_post("/sim/faults", post_fault)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_delete("/sim/faults", delete_faults)
    app.router.add_post("/sim/reset", post_reset)
    app.router.add_delete("/sim/ban", delete_ban)
