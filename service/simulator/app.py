"""The aiohttp application: routing of /v5 calls through latency, faults, authentication,
the rate limit and Bybit's envelope; the admin API; and `run`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from service.simulator import admin, market, orders, queries, trading
from service.simulator.auth import authenticate
from service.simulator.errors import BybitError, envelope, now_ms, params_error
from service.simulator.faults import Fault, client_gone, drop, pause, replacement
from service.simulator.keys import CLOSING_KEY, IN_FLIGHT_KEY, STATE_KEY, InFlight
from service.simulator.ratelimit import admit, admit_batch, ip_admit
from service.simulator.state import Account, SimulatorState

PublicHandler = Callable[[SimulatorState, dict[str, Any]], dict[str, Any]]
PrivateHandler = Callable[[SimulatorState, Account, dict[str, Any]], dict[str, Any]]

PUBLIC: dict[str, PublicHandler] = {
    "/v5/market/time": market.server_time,
    "/v5/market/instruments-info": market.instruments_info,
    "/v5/market/tickers": market.tickers,
}
# create-batch is private but answered on its own (`_answer_batch`): it counts orders, not
# requests, against its rate limit, and its reply carries a retExtInfo list.
BATCH = ("POST", orders.BATCH_CREATE)
PRIVATE: dict[tuple[str, str], PrivateHandler] = {
    ("POST", orders.ORDER_CREATE): orders.create_order,
    ("POST", "/v5/position/set-leverage"): trading.set_leverage,
    ("GET", "/v5/order/realtime"): queries.order_realtime,
    ("GET", "/v5/order/history"): queries.order_history,
    ("GET", "/v5/execution/list"): queries.execution_list,
    ("GET", "/v5/position/list"): queries.position_list,
    ("GET", "/v5/account/wallet-balance"): queries.wallet_balance,
    ("GET", "/v5/user/query-api"): queries.query_api,
    ("GET", "/v5/account/info"): queries.account_info,
}


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        body, headers=headers, dumps=lambda o: json.dumps(o, separators=(",", ":"))
    )


def _body_params(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise params_error("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise params_error("request body must be a JSON object")
    return body


async def v5(request: web.Request) -> web.StreamResponse:
    return await request.app[IN_FLIGHT_KEY].run(_v5(request))


async def _v5(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    closing = request.app[CLOSING_KEY]
    path = request.path
    state.requests[path] += 1
    arrived = now_ms()
    raw = await request.read()
    state.journal.append(_journal_entry(request, path, arrived, raw))
    if state.config.latency_ms:
        await pause(state.config.latency_ms / 1000, closing.is_set)
    if arrived < state.banned_until_ms or not ip_admit(
        state.ip_calls, state.config.ip_limit, arrived
    ):
        # The IP limit: banned, every key behind the address with it, until the ban ends.
        if arrived >= state.banned_until_ms:
            state.banned_until_ms = arrived + state.config.ip_ban_ms
        state.refusals["403"] += 1
        return web.Response(status=403, text="403 Forbidden: access too frequent")
    if request.method == "GET" and raw:
        return web.Response(status=403, text="403 Forbidden")  # Bybit refuses a GET with a body
    fault = state.faults.claim(path, request.headers.get("X-BAPI-API-KEY"))
    if fault is not None:
        early = await _early_fault(fault, request, closing)
        if early is not None:
            return early
    response = await _answer(request, state, path, raw)
    if fault is not None and fault.kind == "drop_after_fill":
        return drop(request)  # carried out and recorded; the reply is lost
    if fault is not None and fault.kind == "retcode_after_fill":
        # Carried out and recorded, then answered as a failure (Bybit's 10016 or 429 where
        # the order did land).
        return _json(envelope(code=fault.ret_code, msg=fault.ret_msg))
    return response


def _journal_entry(request: web.Request, path: str, arrived: int, raw: bytes) -> dict[str, Any]:
    """The call as it arrived; a POST's orderLinkId, and a batch's orderLinkIds (one per
    item, for /sim/calls to list each order)."""
    body = _json_or_none(raw) if request.method == "POST" else None
    entry: dict[str, Any] = {
        "method": request.method,
        "path": path,
        "api_key": request.headers.get("X-BAPI-API-KEY"),
        "arrived_ms": arrived,
        "order_link_id": _order_link_id(body),
    }
    items = body.get("request") if isinstance(body, dict) and path == orders.BATCH_CREATE else None
    if isinstance(items, list) and items:
        entry["batch_links"] = [_order_link_id(item) for item in items]
    return entry


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _order_link_id(body: Any) -> str | None:
    link = body.get("orderLinkId") if isinstance(body, dict) else None
    return link if isinstance(link, str) else None


async def _early_fault(
    fault: Fault, request: web.Request, closing: asyncio.Event
) -> web.StreamResponse | None:
    """Deliver a fault that replaces or holds the answer; None to go on and answer."""
    if fault.kind == "delay":
        # The call is carried out after the delay even if the client gave up meanwhile:
        # a request that timed out on the client can still land on the exchange.
        await pause(fault.delay_ms / 1000, closing.is_set)
        return None
    if fault.kind == "hang":
        await pause(fault.delay_ms / 1000, lambda: closing.is_set() or client_gone(request))
        return drop(request)
    return replacement(fault)


async def _answer(
    request: web.Request, state: SimulatorState, path: str, raw: bytes
) -> web.Response:
    public = PUBLIC.get(path)
    if public is not None:
        if request.method != "GET":
            return web.Response(status=404, text="404 page not found")
        try:
            return _json(envelope(public(state, dict(request.query))))
        except BybitError as error:
            return _json(envelope(code=error.code, msg=error.msg))
    handler = PRIVATE.get((request.method, path))
    if handler is None and (request.method, path) != BATCH:
        return web.Response(status=404, text="404 page not found")
    get = request.method == "GET"
    # The payload is what arrived: the raw query string, or the raw body.
    payload = request.rel_url.raw_query_string if get else raw.decode("utf-8", "replace")
    try:
        account = authenticate(state, request.headers, payload, server_ms=state.server_ms())
    except BybitError as error:
        return _json(envelope(code=error.code, msg=error.msg))
    if handler is None:
        return _answer_batch(request, state, account, raw)
    rate = admit(
        account,
        path,
        state.config.order_rate_limit,
        now_ms(),
        all_endpoints=state.config.account_limits,
    )
    headers = rate.headers()
    if rate.refused:
        state.refusals["10006"] += 1
        return _json(envelope(code=10006, msg="Too many visits!"), headers)
    overloaded = _overloaded(request, state, headers)
    if overloaded is not None:
        return overloaded
    try:
        params = dict(request.query) if get else _body_params(raw)
        return _json(envelope(handler(state, account, params)), headers)
    except BybitError as error:
        return _json(envelope(code=error.code, msg=error.msg), headers)


def _answer_batch(
    request: web.Request, state: SimulatorState, account: Account, raw: bytes
) -> web.Response:
    """create-batch, once authenticated: the rate limit counts its orders (the first ones
    within what is left go on, the rest fail one by one with 10006; with nothing left the
    whole request is 10006), then the load, then a batch that cannot be taken is 10001 as a
    whole; otherwise every order gets its own outcome under retCode 0."""
    refusal: BybitError | None = None
    batch: list[dict[str, Any]] = []
    try:
        batch = orders.batch_orders(_body_params(raw), state.config.batch_max_orders)
    except BybitError as error:
        refusal = error  # answered after the rate limit, which is checked first
    rate = admit_batch(account, state.config.batch_rate_limit, len(batch), now_ms())
    headers = rate.status.headers()
    if rate.status.refused:
        state.refusals["10006"] += 1
        return _json(envelope(code=10006, msg="Too many visits!"), headers)
    overloaded = _overloaded(request, state, headers)
    if overloaded is not None:
        return overloaded
    if refusal is not None:
        return _json(envelope(code=refusal.code, msg=refusal.msg), headers)
    # Each order the rate limit cut off counts as a refusal of its own.
    state.refusals["10006"] += len(batch) - rate.granted
    reply = orders.create_batch(state, account, batch, rate.granted)
    return _json(envelope(reply.result, ext=reply.ext), headers)


def _overloaded(
    request: web.Request, state: SimulatorState, headers: dict[str, str]
) -> web.Response | None:
    """retCode 429 "high server load" with more private requests in flight than allowed."""
    limit = state.config.max_in_flight
    if not limit or request.app[IN_FLIGHT_KEY].count <= limit:
        return None
    state.refusals["429"] += 1
    return _json(
        envelope(
            code=429, msg="The trading service is experiencing a high server load. Please retry."
        ),
        headers,
    )


def create_app(state: SimulatorState | None = None) -> web.Application:
    """The simulator as an aiohttp app; its state is `app[STATE_KEY]`."""
    app = web.Application()
    app[STATE_KEY] = state if state is not None else SimulatorState()
    app[CLOSING_KEY] = asyncio.Event()
    app[IN_FLIGHT_KEY] = InFlight()
    admin.add_routes(app)
    app.router.add_route("*", "/v5/{tail:.*}", v5)

    async def on_shutdown(app: web.Application) -> None:
        # Wake held requests (latency, delay, hang) so the server stops at once.
        app[CLOSING_KEY].set()

    async def on_cleanup(app: web.Application) -> None:
        await app[IN_FLIGHT_KEY].drain()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def run(host: str = "127.0.0.1", port: int = 8999, *, ip_limit: int | None = None) -> None:
    """Serve until interrupted; prints one line when ready. `ip_limit` replaces Bybit's 600
    requests per five seconds (0: no IP limit), for `reset` too."""

    def ready(_: str) -> None:
        print(f"simulator listening on http://{host}:{port}", flush=True)

    state = SimulatorState()
    if ip_limit is not None:
        state.defaults.ip_limit = state.config.ip_limit = ip_limit
    web.run_app(
        create_app(state), host=host, port=port, access_log=None, print=ready, shutdown_timeout=2
    )
