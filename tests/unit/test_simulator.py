"""The simulator applies Bybit's rules; requests are signed by pybit, never by our client."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from tests.unit.simulator_support import KEY, Simulator, order

pytestmark = pytest.mark.asyncio


async def test_signed_get_and_post_succeed(simulator: Simulator) -> None:
    status, headers, body = await simulator.signed(
        "GET", "/v5/account/wallet-balance", {"accountType": "UNIFIED"}
    )
    assert (status, body["retCode"]) == (200, 0)
    assert body["result"]["list"][0]["totalEquity"] == "100000"
    assert "X-Bapi-Limit-Status" in headers
    _, _, placed = await simulator.signed("POST", "/v5/order/create", order("a-1"))
    assert placed["retCode"] == 0
    assert placed["result"]["orderLinkId"] == "a-1"


async def test_wrong_secret_and_unknown_key(simulator: Simulator) -> None:
    _, _, wrong = await simulator.signed(
        "GET", "/v5/account/wallet-balance", {"accountType": "UNIFIED"}, secret="nope"
    )
    assert wrong["retCode"] == 10004
    _, _, unknown = await simulator.signed(
        "GET", "/v5/account/wallet-balance", {"accountType": "UNIFIED"}, key="NOBODY"
    )
    assert unknown["retCode"] == 10003


@pytest.mark.parametrize("offset_ms", [-6000, 1500])
async def test_timestamp_outside_the_window(simulator: Simulator, offset_ms: int) -> None:
    ts = time.time_ns() // 1_000_000 + offset_ms
    _, _, body = await simulator.signed(
        "GET", "/v5/account/wallet-balance", {"accountType": "UNIFIED"}, timestamp=ts
    )
    assert body["retCode"] == 10002


async def test_percent_encoded_query_is_checked_as_sent(simulator: Simulator) -> None:
    raw = "category=linear&cursor=132766%3A2%2C132766%3A2&orderLinkId=x"
    _, _, body = await simulator.signed("GET", "/v5/order/history", raw_query=raw)
    assert body["retCode"] == 0


async def test_duplicate_order_link_id_is_refused_and_recorded_once(simulator: Simulator) -> None:
    await simulator.signed("POST", "/v5/order/create", order("dup-1"))
    _, _, again = await simulator.signed("POST", "/v5/order/create", order("dup-1"))
    assert again["retCode"] == 110072
    orders = (await simulator.admin("GET", f"/sim/orders?api_key={KEY}"))["orders"]
    assert [o["orderLinkId"] for o in orders] == ["dup-1"]


@pytest.mark.parametrize(
    ("qty", "code"),
    [("0.0015", 10001), ("0.0001", 10001), ("100000", 10001), ("abc", 10001)],
)
async def test_quantity_filters(simulator: Simulator, qty: str, code: int) -> None:
    _, _, body = await simulator.signed("POST", "/v5/order/create", order("q", qty=qty))
    assert body["retCode"] == code
    assert (await simulator.admin("GET", "/sim/orders"))["orders"] == []


async def test_min_notional_and_balance(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "1000"})
    _, _, small = await simulator.signed("POST", "/v5/order/create", order("n", qty="0.001"))
    assert small["retCode"] == 110094
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "95000"})
    leverage = {"category": "linear", "symbol": "BTCUSDT", "buyLeverage": "1", "sellLeverage": "1"}
    await simulator.signed("POST", "/v5/position/set-leverage", leverage)
    # 2 BTC at 1x needs 190,000 USDT of margin; the account holds 100,000.
    _, _, rich = await simulator.signed("POST", "/v5/order/create", order("b1", qty="2"))
    assert rich["retCode"] == 110007
    assert rich["retMsg"].startswith("ab not enough")


async def test_leverage_unchanged_is_110043(simulator: Simulator) -> None:
    body = {"category": "linear", "symbol": "BTCUSDT", "buyLeverage": "1", "sellLeverage": "1"}
    _, _, first = await simulator.signed("POST", "/v5/position/set-leverage", body)
    _, _, second = await simulator.signed("POST", "/v5/position/set-leverage", body)
    assert (first["retCode"], second["retCode"]) == (0, 110043)


async def test_orders_and_fills_by_order_link_id(simulator: Simulator) -> None:
    _, _, placed = await simulator.signed("POST", "/v5/order/create", order("look-1", "0.002"))
    order_id = placed["result"]["orderId"]
    for path in ("/v5/order/realtime", "/v5/order/history"):
        _, _, found = await simulator.signed(
            "GET", path, {"category": "linear", "orderLinkId": "look-1"}
        )
        (item,) = found["result"]["list"]
        assert (item["orderId"], item["orderStatus"], item["cumExecQty"]) == (
            order_id,
            "Filled",
            "0.002",
        )
    _, _, fills = await simulator.signed(
        "GET", "/v5/execution/list", {"category": "linear", "orderId": order_id}
    )
    assert fills["result"]["list"][0]["execQty"] == "0.002"


async def test_rate_limit_answers_10006_with_headers(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"order_rate_limit": 2})
    codes = []
    headers = {}
    for n in range(3):
        _, headers, body = await simulator.signed("POST", "/v5/order/create", order(f"r{n}"))
        codes.append(body["retCode"])
    assert codes == [0, 0, 10006]
    assert headers["X-Bapi-Limit"] == "2"
    assert headers["X-Bapi-Limit-Status"] == "0"
    assert int(headers["X-Bapi-Limit-Reset-Timestamp"]) > time.time_ns() // 1_000_000 - 1000


async def test_partial_and_empty_fills(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"fill_ratio": "0.5"})
    await simulator.signed("POST", "/v5/order/create", order("p1", qty="0.005"))
    await simulator.admin("PUT", "/sim/config", {"fill_ratio": "0"})
    await simulator.signed("POST", "/v5/order/create", order("p2", qty="0.005"))
    orders = {o["orderLinkId"]: o for o in (await simulator.admin("GET", "/sim/orders"))["orders"]}
    assert (orders["p1"]["orderStatus"], Decimal(orders["p1"]["cumExecQty"])) == (
        "Cancelled",
        Decimal("0.002"),
    )
    assert (orders["p2"]["orderStatus"], Decimal(orders["p2"]["cumExecQty"])) == (
        "Cancelled",
        Decimal(0),
    )


async def test_halted_instrument_refuses_orders(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/instruments/ETHUSDT", {"status": "Closed"})
    _, _, body = await simulator.signed(
        "POST", "/v5/order/create", order("h", qty="0.01", symbol="ETHUSDT")
    )
    assert body["retCode"] != 0


async def test_faults_count_skip_and_times(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/faults",
        {"path": "/v5/market/tickers", "kind": "http_status", "status": 503, "skip": 1, "times": 2},
    )
    statuses = []
    for _ in range(4):
        async with simulator.http.get(
            f"{simulator.url}/v5/market/tickers?category=linear&symbol=BTCUSDT"
        ) as response:
            statuses.append(response.status)
    assert statuses == [200, 503, 503, 200]
    counts = (await simulator.admin("GET", "/sim/requests"))["counts"]
    assert counts["/v5/market/tickers"] == 4


async def test_instruments_are_paginated(simulator: Simulator) -> None:
    async with simulator.http.get(
        f"{simulator.url}/v5/market/instruments-info?category=linear&limit=7"
    ) as response:
        first = (await response.json())["result"]
    assert len(first["list"]) == 7
    assert first["nextPageCursor"]
