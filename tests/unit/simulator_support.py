"""The simulator in-process on a loopback port, its admin API, and requests signed by pybit's
own `generate_signature` (an independent referee: never the simulator's code nor the
service's client). One client for every unit test that talks to the simulator."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp.test_utils import TestServer
from pybit._http_manager import generate_signature

from service.simulator import SimulatorState, create_app

KEY, SECRET = "SIMKEY0000000001", "sim-secret-0000000001"
OTHER_KEY, OTHER_SECRET = "SIMKEY0000000002", "sim-secret-0000000002"
CREATE = "/v5/order/create"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def body(self) -> Any:
        return json.loads(self.text)

    @property
    def code(self) -> int:
        return int(self.body["retCode"])


@dataclass
class Simulator:
    """The simulator on a loopback port, its admin API, and requests signed by pybit."""

    url: str
    http: aiohttp.ClientSession
    state: SimulatorState

    async def admin(self, method: str, path: str, body: object = None) -> Any:
        async with self.http.request(method, f"{self.url}{path}", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def orders(self, key: str | None = KEY) -> list[dict[str, Any]]:
        query = f"?api_key={key}" if key else ""
        return list((await self.admin("GET", f"/sim/orders{query}"))["orders"])

    async def positions(self, key: str = KEY) -> list[dict[str, Any]]:
        """The account's non-empty positions, by the admin read (`GET /sim/accounts/…`)."""
        return list((await self.admin("GET", f"/sim/accounts/{key}/positions"))["positions"])

    async def position_rows(self, symbol: str = "BTCUSDT") -> list[dict[str, Any]]:
        """position/list for one symbol, signed, as the account sees it."""
        reply = await self.signed(
            "GET", "/v5/position/list", {"category": "linear", "symbol": symbol}
        )
        return list(reply.body["result"]["list"])

    async def ticker(self, symbol: str = "BTCUSDT") -> dict[str, Any]:
        reply = await self.public(f"/v5/market/tickers?category=linear&symbol={symbol}")
        return dict(reply.body["result"]["list"][0])

    async def signed(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        key: str = KEY,
        secret: str = SECRET,
        timestamp: int | None = None,
        window: str | None = "5000",
        raw_query: str | None = None,
        raw_body: str | None = None,
        signed_payload: str | None = None,
        omit: tuple[str, ...] = (),
        timeout: float | None = None,
    ) -> Reply:
        """Sign with pybit's function and send exactly the bytes that were signed."""
        ts = str(timestamp if timestamp is not None else now_ms())
        data: bytes | None = None
        if method == "GET":
            payload = (
                raw_query
                if raw_query is not None
                else "&".join(f"{k}={v}" for k, v in sorted((params or {}).items()))
            )
            url = yarl.URL(
                f"{self.url}{path}?{payload}" if payload else f"{self.url}{path}", encoded=True
            )
        else:
            payload = raw_body if raw_body is not None else json.dumps(params or {})
            url = yarl.URL(f"{self.url}{path}", encoded=True)
            data = payload.encode()
        to_sign = signed_payload if signed_payload is not None else payload
        signature = generate_signature(False, secret, f"{ts}{key}{window or ''}{to_sign}")
        headers = {
            "X-BAPI-API-KEY": key,
            "X-BAPI-TIMESTAMP": ts,
            "X-BAPI-SIGN": signature,
            "X-BAPI-SIGN-TYPE": "2",
            "Content-Type": "application/json",
        }
        if window is not None:
            headers["X-BAPI-RECV-WINDOW"] = window
        for name in omit:
            headers.pop(name)
        client_timeout = aiohttp.ClientTimeout(total=timeout) if timeout else None
        async with self.http.request(
            method, url, data=data, headers=headers, timeout=client_timeout
        ) as response:
            return Reply(response.status, dict(response.headers), await response.text())

    async def public(self, path_and_query: str) -> Reply:
        url = yarl.URL(f"{self.url}{path_and_query}", encoded=True)
        async with self.http.get(url) as response:
            return Reply(response.status, dict(response.headers), await response.text())

    async def order(self, link: str, qty: str = "0.001", **fields: Any) -> Reply:
        return await self.signed("POST", CREATE, order_body(link, qty, **fields))


def order_body(link: str, qty: str = "0.001", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "category": "linear",
        "symbol": "BTCUSDT",
        "side": "Buy",
        "orderType": "Market",
        "qty": qty,
        "orderLinkId": link,
    }
    body.update(fields)
    return body


def leverage_body(value: str, symbol: str = "BTCUSDT") -> dict[str, str]:
    return {"category": "linear", "symbol": symbol, "buyLeverage": value, "sellLeverage": value}


@asynccontextmanager
async def running_simulator() -> AsyncIterator[Simulator]:
    """A fresh simulator with two funded accounts (KEY and OTHER_KEY)."""
    state = SimulatorState()
    server = TestServer(create_app(state), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            simulator = Simulator(str(server.make_url("")).rstrip("/"), http, state)
            for key, secret in ((KEY, SECRET), (OTHER_KEY, OTHER_SECRET)):
                await simulator.admin(
                    "POST",
                    "/sim/accounts",
                    {"api_key": key, "api_secret": secret, "balance": "100000"},
                )
            yield simulator
    finally:
        await server.close()
