"""Scripted faults: which call gets which failure, and how each failure is delivered.

A fault with a `symbol` is a per-order fault: it never applies to a request as a whole, but
to each order for that symbol on its path (each item of order/create-batch, or an
order/create), counted order by order, and only as `retcode` or `retcode_after_fill`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from service.simulator.errors import envelope

KINDS = (
    "http_status",
    "retcode",
    "delay",
    "hang",
    "malformed",
    "empty",
    "drop_after_fill",
    "retcode_after_fill",
)
# What a per-order fault can do to one order: refuse it, or carry it out and report it failed
# (an ambiguous order). The others act on a connection, which a batch's orders share.
ORDER_KINDS = ("retcode", "retcode_after_fill")
ORDER_PATHS = ("/v5/order/create-batch", "/v5/order/create")
DEFAULT_HANG_MS = 60_000
DEFAULT_DELAY_MS = 1_000
POLL_SECONDS = 0.02
DEFAULT_ERROR_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)
DEFAULT_MALFORMED = '{"retCode":0,"retMsg":"OK","result":{"orderId":"'


@dataclass
class Fault:
    id: int
    path: str
    kind: str
    skip: int = 0
    times: int | None = 1  # None: for ever
    api_key: str | None = None
    symbol: str | None = None  # a per-order fault: the orders for this symbol
    status: int = 502
    body: str | None = None
    ret_code: int = 10016
    ret_msg: str = "Server error."
    delay_ms: int = 0
    seen: int = 0
    applied: int = 0

    @classmethod
    def from_json(cls, fault_id: int, data: dict[str, Any]) -> Fault:
        """Build a fault from the admin JSON; ValueError says what is wrong."""
        kind, path = data.get("kind"), data.get("path")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError("path must be a request path such as /v5/order/create")
        api_key = data.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise ValueError("api_key must be a string")
        symbol = _order_symbol(data, kind, path)
        body = data.get("body")
        if body is not None and not isinstance(body, str):
            raise ValueError("body must be a string")
        times = data.get("times", 1)
        default_delay = DEFAULT_HANG_MS if kind == "hang" else DEFAULT_DELAY_MS
        fault = cls(
            id=fault_id,
            path=path,
            kind=kind,
            skip=_count(data.get("skip", 0), "skip"),
            times=None if times is None else _count(times, "times"),
            api_key=api_key,
            symbol=symbol,
            status=_count(data.get("status", 502), "status"),
            body=body,
            ret_code=_integer(data.get("retCode", 10016), "retCode"),
            ret_msg=str(data.get("retMsg", "Server error.")),
            delay_ms=_count(data.get("delay_ms", default_delay), "delay_ms"),
        )
        if not 100 <= fault.status <= 599:
            raise ValueError("status must be an HTTP status code")
        return fault

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.applied >= self.times

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "kind": self.kind,
            "skip": self.skip,
            "times": self.times,
            "api_key": self.api_key,
            "symbol": self.symbol,
            "seen": self.seen,
            "applied": self.applied,
        }


def _order_symbol(data: dict[str, Any], kind: str, path: str) -> str | None:
    """The symbol of a per-order fault (None for a request fault); ValueError when the fault
    cannot act on single orders."""
    symbol = data.get("symbol")
    if symbol is None:
        return None
    if not isinstance(symbol, str) or not symbol:
        raise ValueError("symbol must be a symbol such as ETHUSDT")
    if kind not in ORDER_KINDS:
        raise ValueError(
            f"a fault with a symbol acts on single orders: kind must be {' or '.join(ORDER_KINDS)}"
        )
    if path not in ORDER_PATHS:
        raise ValueError(f"a fault with a symbol needs path {' or '.join(ORDER_PATHS)}")
    return symbol


def _integer(value: object, name: str) -> int:
    # Bybit's retCodes include negative ones (-1, -2015).
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value


@dataclass
class FaultBook:
    faults: list[Fault] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, data: dict[str, Any]) -> Fault:
        fault = Fault.from_json(next(self._ids), data)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    def claim(self, path: str, api_key: str | None) -> Fault | None:
        """Count this request against every matching request fault (per-order faults are
        skipped); the first one due applies."""
        return self._claim(path, api_key, None)

    def claim_order(self, path: str, api_key: str, symbol: str) -> Fault | None:
        """Count one order for `symbol` (a batch item, or an order/create) against the
        per-order faults for that symbol; the first one due applies."""
        return self._claim(path, api_key, symbol)

    def _claim(self, path: str, api_key: str | None, symbol: str | None) -> Fault | None:
        chosen: Fault | None = None
        for fault in self.faults:
            if fault.path != path or fault.symbol != symbol:
                continue
            if fault.api_key is not None and fault.api_key != api_key:
                continue
            fault.seen += 1
            due = fault.seen > fault.skip and not fault.exhausted
            if due and chosen is None:
                fault.applied += 1
                chosen = fault
        return chosen


# ---- delivery ---------------------------------------------------------------------------


async def pause(
    seconds: float, stop: Callable[[], bool] = lambda: False, *, poll: float = POLL_SECONDS
) -> None:
    """Sleep, waking early once stop() is true (the server is shutting down, or the client
    went away)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not stop():
        left = deadline - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(poll, left))


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def drop(request: web.Request) -> web.Response:
    """Close the connection without a reply: the client sees the server disconnect. The
    returned response is never written (aiohttp skips a closed transport)."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


def replacement(fault: Fault) -> web.Response | None:
    """The answer a fault gives instead of the real one; None for the kinds that delay, hang,
    drop or answer after carrying the request out, which the app delivers itself."""
    if fault.kind == "http_status":
        body = fault.body if fault.body is not None else DEFAULT_ERROR_PAGE
        return web.Response(status=fault.status, text=body, content_type="text/html")
    if fault.kind == "retcode":
        return web.json_response(envelope(code=fault.ret_code, msg=fault.ret_msg))
    if fault.kind == "malformed":
        body = fault.body if fault.body is not None else DEFAULT_MALFORMED
        return web.Response(status=200, text=body, content_type="application/json")
    if fault.kind == "empty":
        return web.Response(status=200, body=b"", content_type="application/json")
    return None
