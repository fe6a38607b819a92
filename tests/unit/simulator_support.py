"""An in-process simulator on a loopback port, and requests signed by pybit (the referee)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from pybit._http_manager import generate_signature

from service.simulator import SimulatorState

KEY, SECRET = "SIMKEY0000000001", "sim-secret-0000000001"


@dataclass
class Simulator:
    state: SimulatorState
    url: str
    http: aiohttp.ClientSession

    async def admin(self, method: str, path: str, body: object = None) -> Any:
        async with self.http.request(method, f"{self.url}{path}", json=body) as response:
            response.raise_for_status()
            return await response.json()

    async def signed(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        key: str = KEY,
        secret: str = SECRET,
        timestamp: int | None = None,
        raw_query: str | None = None,
        window: int = 5000,
    ) -> tuple[int, dict[str, str], Any]:
        """Sign with pybit's own function, send the exact bytes signed."""
        params = params or {}
        ts = timestamp if timestamp is not None else time.time_ns() // 1_000_000
        if method == "GET":
            payload = (
                raw_query
                if raw_query is not None
                else "&".join(f"{k}={v}" for k, v in sorted(params.items()))
            )
            url = yarl.URL(f"{self.url}{path}?{payload}", encoded=True)
            data = None
        else:
            payload = json.dumps(params)
            url = yarl.URL(f"{self.url}{path}", encoded=True)
            data = payload.encode()
        signature = generate_signature(False, secret, f"{ts}{key}{window}{payload}")
        headers = {
            "X-BAPI-API-KEY": key,
            "X-BAPI-TIMESTAMP": str(ts),
            "X-BAPI-RECV-WINDOW": str(window),
            "X-BAPI-SIGN": signature,
            "Content-Type": "application/json",
        }
        async with self.http.request(method, url, data=data, headers=headers) as response:
            text = await response.text()
            body = json.loads(text) if text else None
            return response.status, dict(response.headers), body


def order(
    link: str, qty: str = "0.001", symbol: str = "BTCUSDT", side: str = "Buy"
) -> dict[str, Any]:
    return {
        "category": "linear",
        "symbol": symbol,
        "side": side,
        "orderType": "Market",
        "qty": qty,
        "orderLinkId": link,
    }
