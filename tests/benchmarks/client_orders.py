"""Per-order cost of our aiohttp client versus pybit's HTTP, on the simulator with no added
latency: the same market orders, one at a time, each client with its own keep-alive session."""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient, create_http_session
from tests.support import ServiceProcess, free_port, wait_for_port


def _summary(name: str, seconds: list[float]) -> tuple[str, float]:
    ordered = sorted(seconds)
    mean = statistics.fmean(ordered) * 1000
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    row = f"| {name} | {len(ordered)} | {mean:.3f} | {p50:.3f} | {p99:.3f} |"
    return row, mean


async def _ours(url: str, key: str, secret: str, orders: int) -> list[float]:
    credentials = ApiCredentials(api_key=key, api_secret=secret)
    async with create_http_session(connect_timeout=5, read_timeout=10) as http:
        client = BybitClient(http, url)
        await client.create_market_order(  # warm-up: connection set up outside the timing
            credentials, symbol="BTCUSDT", side="Buy", qty=Decimal("0.001"), order_link_id="w-o"
        )
        times = []
        for n in range(orders):
            started = time.perf_counter()
            await client.create_market_order(
                credentials,
                symbol="BTCUSDT",
                side="Buy",
                qty=Decimal("0.001"),
                order_link_id=f"o-{n}",
            )
            times.append(time.perf_counter() - started)
        return times


def _pybit(url: str, key: str, secret: str, orders: int) -> list[float]:
    from pybit.unified_trading import HTTP

    session = HTTP(api_key=key, api_secret=secret, max_retries=1)
    session.endpoint = url
    session.place_order(
        category="linear",
        symbol="BTCUSDT",
        side="Buy",
        orderType="Market",
        qty="0.001",
        orderLinkId="w-p",
    )
    times = []
    for n in range(orders):
        started = time.perf_counter()
        session.place_order(
            category="linear",
            symbol="BTCUSDT",
            side="Buy",
            orderType="Market",
            qty="0.001",
            orderLinkId=f"p-{n}",
        )
        times.append(time.perf_counter() - started)
    return times


async def _ccxt(url: str, key: str, secret: str, orders: int) -> list[float]:
    import ccxt.async_support as ccxt

    exchange = ccxt.bybit(
        {
            "apiKey": key,
            "secret": secret,
            "enableRateLimit": False,
            "urls": {"api": {k: url for k in ("spot", "futures", "v2", "public", "private")}},
            "options": {"fetchMarkets": {"types": ["linear"]}, "defaultType": "swap"},
        }
    )
    exchange.has["fetchCurrencies"] = False  # a private wallet call the simulator lacks
    try:
        await exchange.load_markets()  # outside the timing, like our pre-loaded filters
        await exchange.create_order(
            "BTC/USDT:USDT", "market", "buy", 0.001, params={"orderLinkId": "w-c"}
        )
        times = []
        for n in range(orders):
            started = time.perf_counter()
            await exchange.create_order(
                "BTC/USDT:USDT", "market", "buy", 0.001, params={"orderLinkId": f"c-{n}"}
            )
            times.append(time.perf_counter() - started)
        return times
    finally:
        await exchange.close()


def run(*, orders: int) -> str:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"bench-simulator-{port}.log"
    # Thousands of orders in seconds from three clients that share no limiter: no IP limit.
    simulator = ServiceProcess(
        ["simulator", "--port", str(port), "--ip-limit", "0"], dict(os.environ), log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, simulator.process)
        httpx.put(
            f"{url}/sim/config", json={"order_rate_limit": 0, "latency_ms": 0}
        ).raise_for_status()
        rows, means = [], {}
        for name in ("ours (aiohttp)", "pybit HTTP", "ccxt async bybit"):
            key, secret = f"B{secrets.token_hex(8).upper()}", secrets.token_hex(16)
            httpx.post(
                f"{url}/sim/accounts",
                json={"api_key": key, "api_secret": secret, "balance": "100000000"},
            ).raise_for_status()
            if name.startswith("ours"):
                times = asyncio.run(_ours(url, key, secret, orders))
            elif name.startswith("ccxt"):
                times = asyncio.run(_ccxt(url, key, secret, orders))
            else:
                times = _pybit(url, key, secret, orders)
            row, mean = _summary(name, times)
            rows.append(row)
            means[name] = mean
    finally:
        simulator.stop()
        log.unlink(missing_ok=True)
    ratio = means["ours (aiohttp)"] / means["pybit HTTP"]
    versus_ccxt = means["ours (aiohttp)"] / means["ccxt async bybit"]
    return "\n".join(
        [
            "## Client: per-order cost on the simulator (no added latency)",
            "",
            f"`POST /v5/order/create` for a market order, {orders} orders one after another, "
            "each client on its own keep-alive connection, simulator in its own process "
            f"(`{Path(sys.executable).name} -m service simulator`). The time includes the "
            "simulator's own work, the same for every client.",
            "",
            "| client | orders | mean ms | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Ours costs **{ratio:.2f}x** pybit's per order (goal: at most 0.5x: "
            f"{'met' if ratio <= 0.5 else 'not met'}) and **{versus_ccxt:.2f}x** ccxt's (goal: "
            f"no worse than ccxt: {'met' if versus_ccxt <= 1 else 'not met'}). ccxt is pointed "
            "at the simulator through its `urls`, with its markets loaded before the timing. "
            "Every figure includes the simulator's own share, the same for all three, so the "
            "client-side difference is larger than these ratios show.",
            "",
        ]
    )
