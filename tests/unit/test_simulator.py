"""The Bybit V5 simulator applies Bybit's rules.

Every signed request here is signed by pybit's own `generate_signature`, an independent referee:
never by the simulator's code nor by the service's client.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from pybit._http_manager import generate_signature

from service.simulator import STATE_KEY, SimulatorState, create_app
from service.simulator.auth import sign
from tests.support import eventually
from tests.unit.simulator_support import (
    CREATE,
    KEY,
    OTHER_KEY,
    OTHER_SECRET,
    SECRET,
    Simulator,
    leverage_body,
    now_ms,
    order_body,
)

pytestmark = pytest.mark.asyncio

LEVERAGE = "/v5/position/set-leverage"
WALLET = "/v5/account/wallet-balance"


# ---- the verifier ------------------------------------------------------------------------


async def test_the_verifier_agrees_with_pybit_on_known_answers() -> None:
    """Bybit's known answers (shared/bybit-v5-notes.md), computed with pybit."""
    body = (
        '{"category": "linear", "symbol": "BTCUSDT", "side": "Buy", "orderType": "Market", '
        '"qty": "0.001", "orderLinkId": "idx1-leg0"}'
    )
    compact = body.replace(", ", ",").replace(": ", ":")
    query = "category=linear&orderLinkId=idx1-leg0&symbol=BTCUSDT"
    expected = {
        body: "9c8acea9e6bf7f2c423266e395e6f8ba98b965c4f717cd34a68943e9e9cc741f",
        compact: "85e6f8305afb842c42e1e6fbcbea1dc56eef04b53092bdbcfdf4ef2f09564606",
        query: "6ad6d55a1c7c57eb4e10f357d69fa897967f3b0229a1946d5c87218c6efd890e",
    }
    for payload, signature in expected.items():
        pybit = generate_signature(False, "testsecret", f"1658385579423XXXXXXXXXX5000{payload}")
        ours = sign("testsecret", "1658385579423", "XXXXXXXXXX", "5000", payload)
        assert pybit == ours == signature


async def test_signed_get_and_post_succeed(simulator: Simulator) -> None:
    wallet = await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"})
    assert (wallet.status, wallet.code, wallet.body["retMsg"]) == (200, 0, "OK")
    assert set(wallet.body) == {"retCode", "retMsg", "result", "retExtInfo", "time"}
    account = wallet.body["result"]["list"][0]
    assert (account["totalEquity"], account["totalAvailableBalance"]) == ("100000", "100000")
    for header in ("X-Bapi-Limit", "X-Bapi-Limit-Status", "X-Bapi-Limit-Reset-Timestamp"):
        assert header in wallet.headers
    placed = await simulator.order("a-1")
    assert placed.code == 0
    assert placed.body["result"]["orderLinkId"] == "a-1"
    assert len(placed.body["result"]["orderId"]) == 36
    # Compact JSON (Bybit's samples, ccxt) is verified over its own bytes and accepted too.
    compact = json.dumps(order_body("a-2"), separators=(",", ":"))
    assert (await simulator.signed("POST", CREATE, raw_body=compact)).code == 0
    # Signing one text and sending another is refused.
    mismatch = await simulator.signed("POST", CREATE, order_body("a-3"), signed_payload=compact)
    assert mismatch.code == 10004


async def test_wrong_secret_is_10004_and_unknown_key_10003(simulator: Simulator) -> None:
    wrong = await simulator.signed(
        "GET", WALLET, {"accountType": "UNIFIED"}, secret="not-the-secret"
    )
    assert wrong.code == 10004
    assert wrong.body["retMsg"].startswith("error sign!")
    unknown = await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"}, key="NOBODY")
    assert (unknown.code, unknown.body["retMsg"]) == (10003, "API key is invalid.")
    assert "X-Bapi-Limit" not in unknown.headers
    # The wrong account is not charged, the right one never sees the call.
    assert await simulator.orders() == []


@pytest.mark.parametrize(
    ("missing", "code"),
    [("X-BAPI-API-KEY", 10003), ("X-BAPI-SIGN", 10004), ("X-BAPI-TIMESTAMP", 10002)],
)
async def test_missing_headers(simulator: Simulator, missing: str, code: int) -> None:
    reply = await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"}, omit=(missing,))
    assert reply.code == code


@pytest.mark.parametrize("offset_ms", [-6000, 1500])
async def test_timestamp_outside_the_window_is_10002(simulator: Simulator, offset_ms: int) -> None:
    reply = await simulator.signed(
        "GET", WALLET, {"accountType": "UNIFIED"}, timestamp=now_ms() + offset_ms
    )
    assert reply.code == 10002
    assert "recv_window[5000]" in reply.body["retMsg"]
    assert "server_timestamp[" in reply.body["retMsg"]


async def test_the_window_is_the_clients_and_defaults_to_5000(simulator: Simulator) -> None:
    old = now_ms() - 6000
    assert (
        await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"}, timestamp=old)
    ).code == (10002)
    wide = await simulator.signed(
        "GET", WALLET, {"accountType": "UNIFIED"}, timestamp=old, window="10000"
    )
    assert wide.code == 0
    # No X-BAPI-RECV-WINDOW header: 5000 ms, and nothing for it in the signed string.
    absent = await simulator.signed(
        "GET", WALLET, {"accountType": "UNIFIED"}, timestamp=now_ms() - 4000, window=None
    )
    assert absent.code == 0
    # A timestamp just under one second ahead is still accepted.
    ahead = await simulator.signed(
        "GET", WALLET, {"accountType": "UNIFIED"}, timestamp=now_ms() + 500
    )
    assert ahead.code == 0


async def test_percent_encoded_query_is_verified_as_sent(simulator: Simulator) -> None:
    raw = "category=linear&cursor=132766%3A2%2C132766%3A2&symbol=BTCUSDT"
    accepted = await simulator.signed("GET", "/v5/execution/list", raw_query=raw)
    assert accepted.code == 0
    # Signing the decoded string but sending the encoded one is refused: Bybit checks bytes.
    refused = await simulator.signed(
        "GET", "/v5/execution/list", raw_query=raw, signed_payload=unquote(raw)
    )
    assert refused.code == 10004


async def test_a_get_with_a_body_is_403(simulator: Simulator) -> None:
    async with simulator.http.get(
        f"{simulator.url}/v5/market/time",
        data=b'{"x": 1}',
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 403


# ---- orders ------------------------------------------------------------------------------


async def test_duplicate_order_link_id_is_110072_and_placed_once(simulator: Simulator) -> None:
    assert (await simulator.order("dup-1")).code == 0
    again = await simulator.order("dup-1")
    assert (again.code, again.body["retMsg"]) == (110072, "OrderLinkedID is duplicate")
    assert [o["orderLinkId"] for o in await simulator.orders()] == ["dup-1"]
    # Unique per account: another account may use the same id.
    other = await simulator.signed(
        "POST", CREATE, order_body("dup-1"), key=OTHER_KEY, secret=OTHER_SECRET
    )
    assert other.code == 0


@pytest.mark.parametrize(
    ("qty", "code", "message"),
    [
        ("0.0015", 10001, "qtyStep"),
        ("0.002", 10001, "exceeds minimum limit allowed"),
        ("120", 10001, "exceeds maximum limit allowed"),
        ("abc", 10001, "qty invalid"),
        ("-1", 10001, "qty invalid"),
        ("0", 10001, "qty invalid"),
    ],
)
async def test_quantity_filters(simulator: Simulator, qty: str, code: int, message: str) -> None:
    await simulator.admin("PUT", "/sim/instruments/BTCUSDT", {"minOrderQty": "0.005"})
    reply = await simulator.order("q-1", qty=qty)
    assert reply.code == code
    assert message in reply.body["retMsg"]
    assert await simulator.orders() == []


async def test_order_parameters(simulator: Simulator) -> None:
    cases: list[tuple[dict[str, Any], int]] = [
        ({"category": "spot"}, 10001),
        ({"symbol": "NOPEUSDT"}, 10001),
        ({"side": "buy"}, 10001),
        ({"orderType": "Limit"}, 10001),
        ({"orderLinkId": "x" * 37}, 10001),
        ({"orderLinkId": "bad id!"}, 10001),
        ({"qty": 0.001}, 10001),
        ({"positionIdx": 1}, 10001),
    ]
    for n, (fields, code) in enumerate(cases):
        body = {**order_body(f"p-{n}"), **fields}
        assert (await simulator.signed("POST", CREATE, body)).code == code, fields
    ok = await simulator.order("x" * 36, reduceOnly=False, positionIdx=0, timeInForce="IOC")
    assert ok.code == 0
    assert len(await simulator.orders()) == 1


async def test_minimum_order_value_is_110094(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "1000"})
    reply = await simulator.order("n-1")
    assert reply.code == 110094
    assert await simulator.orders() == []


async def test_margin_at_the_accounts_leverage_or_110007(simulator: Simulator) -> None:
    # Bybit's default leverage is 10: 0.5 BTC at 95,000 takes 4,750 of margin.
    assert (await simulator.order("m-1", qty="0.5")).code == 0
    assert (await simulator.signed("POST", LEVERAGE, leverage_body("1"))).code == 0
    # At 1x the position takes 47,500 of margin; 1.2 BTC more would need 114,000 (plus fee).
    refused = await simulator.order("m-2", qty="1.2")
    assert (refused.code, refused.body["retMsg"]) == (110007, "ab not enough for new order")
    assert [o["orderLinkId"] for o in await simulator.orders()] == ["m-1"]
    wallet = (await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"})).body["result"]
    available = Decimal(wallet["list"][0]["totalAvailableBalance"])
    margin = Decimal("0.5") * Decimal(95000) / 1  # re-margined at 1x
    fee = Decimal("0.5") * Decimal(95000) * Decimal("0.00055")
    assert available == Decimal(100000) - margin - fee


async def test_leverage(simulator: Simulator) -> None:
    first = await simulator.signed("POST", LEVERAGE, leverage_body("1"))
    second = await simulator.signed("POST", LEVERAGE, leverage_body("1"))
    assert (first.code, second.code) == (0, 110043)
    assert second.body["retMsg"] == "Set leverage has not been modified."
    # Bybit's default is 10: setting 10 on a fresh symbol is "not modified".
    assert (await simulator.signed("POST", LEVERAGE, leverage_body("10", "ETHUSDT"))).code == 110043
    uneven = {**leverage_body("2"), "sellLeverage": "3"}
    assert (await simulator.signed("POST", LEVERAGE, uneven)).code == 10001
    assert (await simulator.signed("POST", LEVERAGE, leverage_body("101"))).code == 10001
    assert (await simulator.signed("POST", LEVERAGE, leverage_body("0.5"))).code == 10001


async def test_an_order_is_found_by_order_link_id(simulator: Simulator) -> None:
    placed = await simulator.order("look-1", qty="0.002")
    order_id = placed.body["result"]["orderId"]
    for path in ("/v5/order/realtime", "/v5/order/history"):
        found = await simulator.signed("GET", path, {"category": "linear", "orderLinkId": "look-1"})
        (item,) = found.body["result"]["list"]
        assert (item["orderId"], item["orderStatus"], item["cumExecQty"], item["qty"]) == (
            order_id,
            "Filled",
            "0.002",
            "0.002",
        )
        assert item["avgPrice"] == "95000.00"
        assert item["timeInForce"] == "IOC"
        assert Decimal(item["cumExecFee"]) == Decimal("0.002") * 95000 * Decimal("0.00055")
    fills = await simulator.signed(
        "GET", "/v5/execution/list", {"category": "linear", "orderLinkId": "look-1"}
    )
    (fill,) = fills.body["result"]["list"]
    assert (fill["orderId"], fill["execQty"], fill["execPrice"], fill["execType"]) == (
        order_id,
        "0.002",
        "95000.00",
        "Trade",
    )
    assert Decimal(fill["execValue"]) == Decimal(190)
    # Without an id or a symbol, a linear realtime query is refused; by symbol it lists
    # open orders only (a market order never stays open).
    assert (
        await simulator.signed("GET", "/v5/order/realtime", {"category": "linear"})
    ).code == 10001
    by_symbol = await simulator.signed(
        "GET", "/v5/order/realtime", {"category": "linear", "symbol": "BTCUSDT"}
    )
    assert by_symbol.body["result"]["list"] == []
    missing = await simulator.signed(
        "GET", "/v5/order/realtime", {"category": "linear", "orderLinkId": "never"}
    )
    assert (missing.code, missing.body["result"]["list"]) == (0, [])


async def test_history_pages_with_a_percent_encoded_cursor(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"order_rate_limit": 0})
    for n in range(5):
        assert (await simulator.order(f"h-{n}")).code == 0
    seen: list[str] = []
    cursor = ""
    while True:
        query = f"category=linear&limit=2&symbol=BTCUSDT{'&cursor=' + cursor if cursor else ''}"
        page = (await simulator.signed("GET", "/v5/order/history", raw_query=query)).body["result"]
        seen += [o["orderLinkId"] for o in page["list"]]
        cursor = page["nextPageCursor"]
        if not cursor:
            break
        assert "%3D" in cursor  # sent back exactly as received, still encoded
    assert seen == [f"h-{n}" for n in reversed(range(5))]  # newest first


async def test_positions_and_wallet_follow_the_fills(simulator: Simulator) -> None:
    assert (await simulator.signed("POST", LEVERAGE, leverage_body("1", "ETHUSDT"))).code == 0
    assert (await simulator.order("e-1", qty="1.00", symbol="ETHUSDT")).code == 0
    positions = await simulator.signed(
        "GET", "/v5/position/list", {"category": "linear", "symbol": "ETHUSDT"}
    )
    (position,) = positions.body["result"]["list"]
    assert (position["side"], position["size"], position["avgPrice"], position["leverage"]) == (
        "Buy",
        "1.00",
        "3500",
        "1",
    )
    assert (await simulator.order("e-2", qty="1.00", symbol="ETHUSDT", side="Sell")).code == 0
    flat = await simulator.signed(
        "GET", "/v5/position/list", {"category": "linear", "symbol": "ETHUSDT"}
    )
    assert (flat.body["result"]["list"][0]["side"], flat.body["result"]["list"][0]["size"]) == (
        "",
        "0.00",
    )
    open_ones = await simulator.signed(
        "GET", "/v5/position/list", {"category": "linear", "settleCoin": "USDT"}
    )
    assert open_ones.body["result"]["list"] == []
    assert (
        await simulator.signed("GET", "/v5/position/list", {"category": "linear"})
    ).code == 10001
    wallet = (await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"})).body["result"][
        "list"
    ][0]
    fees = 2 * Decimal(3500) * Decimal("0.00055")
    assert Decimal(wallet["totalWalletBalance"]) == Decimal(100000) - fees
    assert Decimal(wallet["totalAvailableBalance"]) == Decimal(100000) - fees
    assert (await simulator.signed("GET", WALLET, {"accountType": "SPOT"})).code == 10001


async def test_slippage_moves_fills_against_the_taker(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"slippage_bps": "10"})
    await simulator.order("s-buy", qty="0.010")
    await simulator.order("s-sell", qty="0.010", side="Sell")
    orders = {o["orderLinkId"]: o for o in await simulator.orders()}
    assert orders["s-buy"]["avgPrice"] == "95095.00"
    assert orders["s-sell"]["avgPrice"] == "94905.00"


async def test_partial_and_empty_fills_end_cancelled(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"fill_ratio": "0.5"})
    assert (await simulator.order("p-1", qty="0.005")).code == 0
    await simulator.admin("PUT", "/sim/config", {"fill_ratio": "0"})
    assert (await simulator.order("p-2", qty="0.005")).code == 0
    orders = {o["orderLinkId"]: o for o in await simulator.orders()}
    assert (orders["p-1"]["orderStatus"], orders["p-1"]["cumExecQty"]) == ("Cancelled", "0.002")
    assert orders["p-1"]["avgPrice"] == "95000.00"
    assert (orders["p-2"]["orderStatus"], orders["p-2"]["cumExecQty"]) == ("Cancelled", "0.000")
    assert orders["p-2"]["avgPrice"] == ""
    fills = await simulator.signed("GET", "/v5/execution/list", {"category": "linear"})
    assert [f["orderLinkId"] for f in fills.body["result"]["list"]] == ["p-1"]


async def _realtime(simulator: Simulator, link: str) -> list[dict[str, Any]]:
    reply = await simulator.signed(
        "GET", "/v5/order/realtime", {"category": "linear", "orderLinkId": link}
    )
    return list(reply.body["result"]["list"])


async def _history(simulator: Simulator, link: str) -> list[dict[str, Any]]:
    reply = await simulator.signed(
        "GET", "/v5/order/history", {"category": "linear", "orderLinkId": link}
    )
    return list(reply.body["result"]["list"])


async def test_an_order_is_listed_then_filled_then_in_history_after_delays(
    simulator: Simulator,
) -> None:
    await simulator.admin(
        "PUT",
        "/sim/config",
        {"order_visible_ms": 300, "fill_delay_ms": 600, "history_lag_ms": 900},
    )
    assert (await simulator.order("late-1")).code == 0
    assert await _realtime(simulator, "late-1") == []  # accepted, not listed yet
    assert await _history(simulator, "late-1") == []

    async def listed_new() -> list[dict[str, Any]] | None:
        return await _realtime(simulator, "late-1") or None

    new = (await eventually(listed_new, timeout=5, interval=0.05))[0]
    if new["orderStatus"] == "New":  # before the fill delay: nothing filled, no executions
        assert (new["cumExecQty"], new["avgPrice"], new["cumFeeDetail"]) == ("0.000", "", {})

    async def filled() -> dict[str, Any] | None:
        rows = await _realtime(simulator, "late-1")
        return rows[0] if rows and rows[0]["orderStatus"] == "Filled" else None

    done = await eventually(filled, timeout=5, interval=0.05)
    assert done["cumExecQty"] == "0.001"
    assert done["cumFeeDetail"] == {"USDT": done["cumExecFee"]}

    async def in_history() -> list[dict[str, Any]] | None:
        return await _history(simulator, "late-1") or None

    assert (await eventually(in_history, timeout=5, interval=0.05))[0]["orderStatus"] == "Filled"


async def test_a_thin_book_fills_part_over_several_executions(simulator: Simulator) -> None:
    await simulator.admin(
        "PUT", "/sim/instruments/BTCUSDT", {"bookDepth": "0.006", "bookLevels": 3}
    )
    assert (await simulator.order("thin-1", qty="0.010")).code == 0
    order = (await _realtime(simulator, "thin-1"))[0]
    assert (order["orderStatus"], order["cumExecQty"]) == ("Cancelled", "0.006")
    executions = (
        await simulator.signed(
            "GET", "/v5/execution/list", {"category": "linear", "orderId": order["orderId"]}
        )
    ).body["result"]["list"]
    assert sorted(e["execQty"] for e in executions) == ["0.002", "0.002", "0.002"]
    prices = sorted(Decimal(e["execPrice"]) for e in executions)
    assert prices[0] < prices[1] < prices[2]  # each level a tick worse for the buyer
    assert Decimal(order["avgPrice"]) == prices[1]


async def test_executions_are_paged(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/instruments/BTCUSDT", {"bookLevels": 150})
    assert (await simulator.order("many-1", qty="0.150")).code == 0
    order_id = (await _realtime(simulator, "many-1"))[0]["orderId"]
    first = (
        await simulator.signed(
            "GET",
            "/v5/execution/list",
            {"category": "linear", "orderId": order_id, "limit": "100"},
        )
    ).body["result"]
    assert len(first["list"]) == 100
    assert first["nextPageCursor"]


async def test_hedge_mode_takes_positionidx_1_and_2(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/accounts",
        {"api_key": KEY, "api_secret": SECRET, "balance": "100000", "position_mode": "hedge"},
    )
    assert (await simulator.order("h-0", positionIdx=0)).code == 10001
    assert (await simulator.order("h-1", positionIdx=1)).code == 0
    assert (await simulator.order("h-2", side="Sell", positionIdx=2)).code == 0
    rows = (
        await simulator.signed(
            "GET", "/v5/position/list", {"category": "linear", "symbol": "BTCUSDT"}
        )
    ).body["result"]["list"]
    assert [(r["positionIdx"], r["side"], r["size"]) for r in rows] == [
        (1, "Buy", "0.001"),
        (2, "Sell", "0.001"),
    ]


async def test_position_modes_are_per_symbol_and_can_be_switched(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/accounts",
        {"api_key": KEY, "api_secret": SECRET, "balance": "100000", "hedge_symbols": ["ETHUSDT"]},
    )
    assert (await simulator.order("m-btc", positionIdx=0)).code == 0
    assert (await simulator.order("m-eth0", qty="0.01", symbol="ETHUSDT")).code == 10001
    assert (await simulator.order("m-eth1", qty="0.01", symbol="ETHUSDT", positionIdx=1)).code == 0
    await simulator.admin(
        "PUT", f"/sim/accounts/{KEY}/position-mode", {"symbol": "SOLUSDT", "mode": "hedge"}
    )
    rows = (
        await simulator.signed(
            "GET", "/v5/position/list", {"category": "linear", "symbol": "SOLUSDT"}
        )
    ).body["result"]["list"]
    assert [r["positionIdx"] for r in rows] == [1, 2]


async def test_portfolio_margin_has_no_leverage_to_set(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/accounts",
        {
            "api_key": KEY,
            "api_secret": SECRET,
            "balance": "100000",
            "margin_mode": "PORTFOLIO_MARGIN",
        },
    )
    reply = await simulator.signed("POST", LEVERAGE, leverage_body("1"))
    assert reply.code == 110038


async def test_isolated_margin_leaves_account_wide_fields_empty(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/accounts",
        {
            "api_key": KEY,
            "api_secret": SECRET,
            "balance": "5000",
            "margin_mode": "ISOLATED_MARGIN",
        },
    )
    account = (await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"})).body["result"][
        "list"
    ][0]
    assert account["totalAvailableBalance"] == ""
    assert account["coin"][0]["walletBalance"] == "5000"
    info = await simulator.signed("GET", "/v5/account/info")
    assert info.body["result"]["marginMode"] == "ISOLATED_MARGIN"


async def test_a_held_position_can_be_seeded(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/positions",
        {"api_key": KEY, "symbol": "ETHUSDT", "side": "Sell", "size": "2", "leverage": "5"},
    )
    rows = (
        await simulator.signed(
            "GET", "/v5/position/list", {"category": "linear", "settleCoin": "USDT"}
        )
    ).body["result"]["list"]
    assert [(r["symbol"], r["side"], r["size"], r["leverage"]) for r in rows] == [
        ("ETHUSDT", "Sell", "2.00", "5")
    ]


async def test_a_halted_instrument_refuses_orders(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/instruments/ETHUSDT", {"status": "Closed"})
    reply = await simulator.order("h-1", qty="0.01", symbol="ETHUSDT")
    assert (reply.code, reply.body["retMsg"]) == (110074, "This contract is not live")
    listed = (await simulator.public("/v5/market/instruments-info?category=linear")).body["result"]
    assert "ETHUSDT" not in [i["symbol"] for i in listed["list"]]
    one = await simulator.public("/v5/market/instruments-info?category=linear&symbol=ETHUSDT")
    assert one.body["result"]["list"][0]["status"] == "Closed"


async def test_rate_limit_is_10006_with_bybits_headers(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"order_rate_limit": 2})
    replies = [await simulator.order(f"r-{n}") for n in range(3)]
    assert [r.code for r in replies] == [0, 0, 10006]
    assert replies[2].body["retMsg"] == "Too many visits!"
    assert [r.headers["X-Bapi-Limit-Status"] for r in replies] == ["1", "0", "0"]
    assert replies[2].headers["X-Bapi-Limit"] == "2"
    reset = int(replies[2].headers["X-Bapi-Limit-Reset-Timestamp"])
    assert now_ms() - 100 < reset <= now_ms() + 1000
    assert len(await simulator.orders()) == 2
    # Per account: the other account is not limited by this one's calls.
    other = await simulator.signed(
        "POST", CREATE, order_body("r-x"), key=OTHER_KEY, secret=OTHER_SECRET
    )
    assert other.code == 0
    await simulator.admin("PUT", "/sim/config", {"order_rate_limit": 0})
    assert [(await simulator.order(f"u-{n}")).code for n in range(4)] == [0, 0, 0, 0]


async def test_every_private_endpoint_has_its_account_limit(simulator: Simulator) -> None:
    # set-leverage: 10 a second per account, as Bybit documents.
    replies = [
        await simulator.signed("POST", "/v5/position/set-leverage", leverage_body(str(n + 2)))
        for n in range(11)
    ]
    assert [r.code for r in replies] == [0] * 10 + [10006]
    assert replies[-1].headers["X-Bapi-Limit"] == "10"
    await simulator.admin("PUT", "/sim/config", {"account_limits": False})
    reply = await simulator.signed("POST", "/v5/position/set-leverage", leverage_body("20"))
    assert reply.code == 0


async def test_the_ip_limit_bans_the_address_with_403(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"ip_limit": 5, "ip_ban_ms": 60_000})
    statuses = [(await simulator.public("/v5/market/time")).status for _ in range(6)]
    assert statuses == [200] * 5 + [403]
    # Banned: every request from the address, signed ones and other keys included.
    assert (await simulator.order("ip-1")).status == 403
    other = await simulator.signed(
        "POST", CREATE, order_body("ip-2"), key=OTHER_KEY, secret=OTHER_SECRET
    )
    assert other.status == 403
    await simulator.admin("DELETE", "/sim/ban")
    await simulator.admin("PUT", "/sim/config", {"ip_limit": 0})
    assert (await simulator.order("ip-3")).code == 0


async def test_injected_load_answers_429(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"max_in_flight": 1, "latency_ms": 200})
    replies = await asyncio.gather(*(simulator.order(f"load-{n}") for n in range(3)))
    assert [r.code for r in replies] == [429, 429, 429]
    assert "high server load" in replies[0].body["retMsg"]
    assert await simulator.orders() == []  # refused, not taken
    assert (await simulator.order("load-alone")).code == 0  # one at a time gets through


async def test_a_retcode_after_fill_lands_the_order(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/faults",
        {"path": CREATE, "kind": "retcode_after_fill", "retCode": 10016, "retMsg": "timeout"},
    )
    reply = await simulator.order("landed-1")
    assert reply.code == 10016
    assert [o["orderLinkId"] for o in await simulator.orders()] == ["landed-1"]


# ---- marks, positions, reduce-only ---------------------------------------------------------


async def test_the_mark_moves_alone_or_follows_the_last_price(simulator: Simulator) -> None:
    moved = await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"markPrice": "96000"})
    assert (moved["lastPrice"], moved["markPrice"]) == ("95000.00", "96000.00")
    ticker = await simulator.ticker()
    assert (ticker["lastPrice"], ticker["markPrice"], ticker["indexPrice"]) == (
        "95000.00",
        "96000.00",
        "95000.00",
    )
    # Once set on its own, the mark stays where it was put when the last price moves...
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "94000"})
    ticker = await simulator.ticker()
    assert (ticker["lastPrice"], ticker["markPrice"]) == ("94000.00", "96000.00")
    # ...until it is released (null): then it follows the last price again.
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"markPrice": None})
    assert (await simulator.ticker())["markPrice"] == "94000.00"
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "93000"})
    assert (await simulator.ticker())["markPrice"] == "93000.00"
    both = await simulator.admin(
        "PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "92000", "markPrice": "92500"}
    )
    assert (both["lastPrice"], both["markPrice"]) == ("92000.00", "92500.00")
    # Other symbols are untouched.
    assert (await simulator.ticker("ETHUSDT"))["markPrice"] == "3500.00"


async def test_positions_and_wallet_are_marked_to_the_mark(simulator: Simulator) -> None:
    assert (await simulator.order("mk-1", qty="1.00", symbol="ETHUSDT")).code == 0
    await simulator.admin("PUT", "/sim/tickers/ETHUSDT", {"markPrice": "3600"})
    (row,) = await simulator.position_rows("ETHUSDT")
    assert (row["avgPrice"], row["markPrice"], row["unrealisedPnl"]) == ("3500", "3600.00", "100")
    wallet = (await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"})).body["result"][
        "list"
    ][0]
    assert (wallet["totalPerpUPL"], wallet["coin"][0]["unrealisedPnl"]) == ("100", "100")
    fee = Decimal(3500) * Decimal("0.00055")
    assert Decimal(wallet["totalEquity"]) == Decimal(100000) - fee + 100
    # Orders still fill at the last price; the execution shows the mark it filled under.
    assert (await simulator.order("mk-2", qty="1.00", symbol="ETHUSDT")).code == 0
    fills = await simulator.signed(
        "GET", "/v5/execution/list", {"category": "linear", "orderLinkId": "mk-2"}
    )
    (fill,) = fills.body["result"]["list"]
    assert (fill["execPrice"], fill["markPrice"]) == ("3500.00", "3600.00")


async def test_the_admin_reads_an_accounts_positions(simulator: Simulator) -> None:
    assert await simulator.positions() == []
    assert (await simulator.order("ap-1", qty="0.002")).code == 0
    await simulator.admin(
        "POST",
        "/sim/positions",
        {"api_key": KEY, "symbol": "ETHUSDT", "side": "Sell", "size": "2", "price": "3400"},
    )
    assert await simulator.positions() == [
        {
            "symbol": "BTCUSDT",
            "positionIdx": 0,
            "side": "Buy",
            "size": "0.002",
            "avgPrice": "95000",
        },
        {"symbol": "ETHUSDT", "positionIdx": 0, "side": "Sell", "size": "2.00", "avgPrice": "3400"},
    ]
    assert await simulator.positions(OTHER_KEY) == []
    # A closed position is no longer listed.
    assert (await simulator.order("ap-2", qty="0.002", side="Sell", reduceOnly=True)).code == 0
    assert [p["symbol"] for p in await simulator.positions()] == ["ETHUSDT"]
    async with simulator.http.get(f"{simulator.url}/sim/accounts/NOBODY/positions") as response:
        assert response.status == 404


async def test_reduce_only_is_capped_at_the_position_and_realises_pnl(
    simulator: Simulator,
) -> None:
    assert (await simulator.order("ro-open", qty="0.005")).code == 0
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "96000"})
    assert (await simulator.order("ro-1", qty="0.010", side="Sell", reduceOnly=True)).code == 0
    for order in (await _realtime(simulator, "ro-1"))[0], (await _history(simulator, "ro-1"))[0]:
        assert (order["qty"], order["cumExecQty"], order["orderStatus"]) == (
            "0.005",
            "0.005",
            "Filled",
        )
        assert order["reduceOnly"] is True
    assert await simulator.positions() == []  # closed, never flipped short
    (row,) = await simulator.position_rows()
    assert (row["side"], row["size"], row["cumRealisedPnl"]) == ("", "0.000", "5")
    fills = await simulator.signed(
        "GET", "/v5/execution/list", {"category": "linear", "orderLinkId": "ro-1"}
    )
    assert fills.body["result"]["list"][0]["closedSize"] == "0.005"
    wallet = (await simulator.signed("GET", WALLET, {"accountType": "UNIFIED"})).body["result"]
    fees = Decimal("0.005") * (95000 + 96000) * Decimal("0.00055")
    assert Decimal(wallet["list"][0]["totalWalletBalance"]) == Decimal(100000) - fees + 5


async def test_reduce_only_above_the_maximum_qty_is_not_refused(simulator: Simulator) -> None:
    assert (await simulator.order("mx-open", qty="0.005")).code == 0
    await simulator.admin("PUT", "/sim/instruments/BTCUSDT", {"maxMktOrderQty": "0.003"})
    assert (await simulator.order("mx-1", qty="0.005", side="Sell")).code == 10001
    # Bybit splits a reduce-only order above the maximum instead of refusing it.
    assert (await simulator.order("mx-2", qty="0.005", side="Sell", reduceOnly=True)).code == 0
    assert await simulator.positions() == []


async def test_reduce_only_with_nothing_to_reduce_is_110017(simulator: Simulator) -> None:
    none = await simulator.order("rz-1", side="Sell", reduceOnly=True)
    assert (none.code, none.body["retMsg"]) == (
        110017,
        "current position is zero, cannot fix reduce-only order qty",
    )
    assert await simulator.orders() == []
    # One-way mode: a reduce-only order on the position's own side would increase it.
    assert (await simulator.order("rz-long", qty="0.002")).code == 0
    same = await simulator.order("rz-2", reduceOnly=True)
    assert (same.code, same.body["retMsg"]) == (
        110017,
        "reduce-only order has same side with current position",
    )
    await simulator.admin(
        "POST", "/sim/positions", {"api_key": KEY, "symbol": "ETHUSDT", "side": "Sell", "size": "1"}
    )
    short = await simulator.order(
        "rz-3", qty="0.10", symbol="ETHUSDT", side="Sell", reduceOnly=True
    )
    assert short.code == 110017
    assert [(p["symbol"], p["side"], p["size"]) for p in await simulator.positions()] == [
        ("BTCUSDT", "Buy", "0.002"),
        ("ETHUSDT", "Sell", "1.00"),
    ]
    assert [o["orderLinkId"] for o in await simulator.orders()] == ["rz-long"]


async def test_hedge_mode_reduce_only_reduces_the_opposite_side(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/accounts",
        {"api_key": KEY, "api_secret": SECRET, "balance": "100000", "position_mode": "hedge"},
    )
    assert (await simulator.order("hr-long", qty="0.003", positionIdx=1)).code == 0
    assert (await simulator.order("hr-short", qty="0.002", side="Sell", positionIdx=2)).code == 0
    # A reduce-only Sell reduces the long (1), a reduce-only Buy the short (2); not the other.
    wrong = await simulator.order("hr-0", side="Sell", reduceOnly=True, positionIdx=2)
    assert wrong.code == 10001
    assert (await simulator.order("hr-1", side="Buy", reduceOnly=True, positionIdx=1)).code == 10001
    sell = await simulator.order("hr-2", side="Sell", reduceOnly=True, positionIdx=1)
    assert sell.code == 0
    assert [(p["positionIdx"], p["side"], p["size"]) for p in await simulator.positions()] == [
        (1, "Buy", "0.002"),
        (2, "Sell", "0.002"),
    ]
    buy = await simulator.order("hr-3", qty="0.005", reduceOnly=True, positionIdx=2)
    assert buy.code == 0
    (order,) = await _realtime(simulator, "hr-3")
    assert (order["positionIdx"], order["qty"], order["reduceOnly"]) == (2, "0.002", True)
    assert [(p["positionIdx"], p["side"], p["size"]) for p in await simulator.positions()] == [
        (1, "Buy", "0.002")
    ]
    again = await simulator.order("hr-4", reduceOnly=True, positionIdx=2)
    assert again.code == 110017


async def test_a_partial_reduce_keeps_the_entry_price(simulator: Simulator) -> None:
    assert (await simulator.order("pr-1", qty="0.004")).code == 0
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "97000"})
    assert (await simulator.order("pr-2", qty="0.004")).code == 0  # average entry 96,000
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "99000"})
    assert (await simulator.order("pr-3", qty="0.003", side="Sell", reduceOnly=True)).code == 0
    (row,) = await simulator.position_rows()
    assert (row["size"], row["avgPrice"], row["cumRealisedPnl"], row["unrealisedPnl"]) == (
        "0.005",
        "96000",
        "9",  # 0.003 x (99,000 - 96,000)
        "15",  # 0.005 x (99,000 - 96,000)
    )
    (held,) = await simulator.positions()
    assert (held["size"], held["avgPrice"]) == ("0.005", "96000")


async def test_qty_zero_closes_the_position_with_close_on_trigger(simulator: Simulator) -> None:
    empty = await simulator.order(
        "cz-0", qty="0", side="Sell", reduceOnly=True, closeOnTrigger=True
    )
    assert empty.code == 110017
    assert (await simulator.order("cz-open", qty="0.004")).code == 0
    assert (await simulator.order("cz-1", qty="0", side="Sell", reduceOnly=True)).code == 10001
    close = await simulator.order(
        "cz-2", qty="0", side="Sell", reduceOnly=True, closeOnTrigger=True
    )
    assert close.code == 0
    assert (await _realtime(simulator, "cz-2"))[0]["qty"] == "0.004"
    assert await simulator.positions() == []


async def test_reduce_only_is_exempt_from_the_minimum_order_value_not_the_minimum_qty(
    simulator: Simulator,
) -> None:
    # Bybit's Derivatives Trading Rules: closing orders are exempt from the minimum order
    # value, not from the minimum quantity.
    assert (await simulator.order("mv-open", qty="0.004")).code == 0
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "1000"})
    opening = await simulator.order("mv-0", qty="0.004", side="Buy")
    assert opening.code == 110094  # 4 USDT opening more: refused
    closing = await simulator.order("mv-1", qty="0.002", side="Sell", reduceOnly=True)
    assert closing.code == 0  # 2 USDT closing part of it: accepted
    assert [p["size"] for p in await simulator.positions()] == ["0.002"]
    dust = await simulator.order("mv-2", qty="0.0005", side="Sell", reduceOnly=True)
    assert dust.code == 10001  # below minOrderQty 0.001 (and not a multiple of qtyStep)


# ---- faults ------------------------------------------------------------------------------


async def _fault(simulator: Simulator, **fault: Any) -> int:
    fault.setdefault("path", CREATE)
    return int((await simulator.admin("POST", "/sim/faults", fault))["id"])


async def test_http_status_fault_counts_skip_and_times(simulator: Simulator) -> None:
    await _fault(
        simulator, path="/v5/market/tickers", kind="http_status", status=503, skip=1, times=2
    )
    statuses = [
        (await simulator.public("/v5/market/tickers?category=linear&symbol=BTCUSDT")).status
        for _ in range(4)
    ]
    assert statuses == [200, 503, 503, 200]
    counts = (await simulator.admin("GET", "/sim/requests"))["counts"]
    assert counts["/v5/market/tickers"] == 4
    await _fault(simulator, kind="http_status", body="<html>oops</html>")
    page = await simulator.order("f-1")
    assert (page.status, page.text, page.headers["Content-Type"].split(";")[0]) == (
        502,
        "<html>oops</html>",
        "text/html",
    )
    assert await simulator.orders() == []


async def test_retcode_fault_is_a_bybit_envelope(simulator: Simulator) -> None:
    await _fault(simulator, kind="retcode", retCode=10016, retMsg="Request timeout")
    reply = await simulator.order("f-1")
    assert (reply.status, reply.code, reply.body["retMsg"]) == (200, 10016, "Request timeout")
    assert await simulator.orders() == []
    assert (await simulator.order("f-2")).code == 0  # times defaults to 1


async def test_malformed_and_empty_faults(simulator: Simulator) -> None:
    await _fault(simulator, kind="malformed")
    await _fault(simulator, kind="malformed", body="<html>gateway</html>")
    await _fault(simulator, kind="empty")
    texts = [(await simulator.order(f"f-{n}")).text for n in range(3)]
    with pytest.raises(json.JSONDecodeError):
        json.loads(texts[0])
    assert texts[1:] == ["<html>gateway</html>", ""]
    assert await simulator.orders() == []


async def test_delay_fault_answers_late_and_carries_the_call_out(simulator: Simulator) -> None:
    await _fault(simulator, kind="delay", delay_ms=300)
    started = time.monotonic()
    reply = await simulator.order("d-1")
    assert reply.code == 0
    assert time.monotonic() - started >= 0.3
    # A client that gives up first still gets its order placed.
    await _fault(simulator, kind="delay", delay_ms=400)
    with pytest.raises(asyncio.TimeoutError):
        await simulator.signed("POST", CREATE, order_body("d-2"), timeout=0.1)

    async def landed() -> bool:
        return any(o["orderLinkId"] == "d-2" for o in await simulator.orders())

    deadline = time.monotonic() + 5
    while not await landed():
        assert time.monotonic() < deadline, "the delayed order never landed"
        await asyncio.sleep(0.02)


async def test_hang_fault_never_answers_and_places_nothing(simulator: Simulator) -> None:
    await _fault(simulator, kind="hang")
    with pytest.raises(asyncio.TimeoutError):
        await simulator.signed("POST", CREATE, order_body("hang-1"), timeout=0.3)
    assert await simulator.orders() == []
    assert simulator.state.faults.faults[0].delay_ms == 60_000


async def test_drop_after_fill_places_the_order_and_loses_the_reply(simulator: Simulator) -> None:
    await _fault(simulator, kind="drop_after_fill")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await simulator.order("lost-1")
    (order,) = await simulator.orders()
    assert (order["orderLinkId"], order["orderStatus"]) == ("lost-1", "Filled")
    found = await simulator.signed(
        "GET", "/v5/order/realtime", {"category": "linear", "orderLinkId": "lost-1"}
    )
    assert found.body["result"]["list"][0]["orderId"] == order["orderId"]
    # Sending it again is refused: the first attempt landed.
    assert (await simulator.order("lost-1")).code == 110072
    assert len(await simulator.orders()) == 1


async def test_faults_filter_by_api_key_and_can_last_for_ever(simulator: Simulator) -> None:
    await _fault(simulator, kind="retcode", retCode=10016, times=None, api_key=OTHER_KEY)
    assert (await simulator.order("k-1")).code == 0
    for n in range(3):
        other = await simulator.signed(
            "POST", CREATE, order_body(f"o-{n}"), key=OTHER_KEY, secret=OTHER_SECRET
        )
        assert other.code == 10016
    faults = (await simulator.admin("GET", "/sim/faults"))["faults"]
    assert (faults[0]["seen"], faults[0]["applied"]) == (3, 3)
    await simulator.admin("DELETE", "/sim/faults")
    cleared = await simulator.signed(
        "POST", CREATE, order_body("o-9"), key=OTHER_KEY, secret=OTHER_SECRET
    )
    assert cleared.code == 0


async def test_bad_fault_scripts_are_refused(simulator: Simulator) -> None:
    for bad in (
        {"path": CREATE, "kind": "explode"},
        {"kind": "empty"},
        {"path": CREATE, "kind": "empty", "times": -1},
    ):
        async with simulator.http.post(f"{simulator.url}/sim/faults", json=bad) as response:
            assert response.status == 400


# ---- market data, knobs, reset -------------------------------------------------------------


async def test_market_data(simulator: Simulator) -> None:
    server_time = (await simulator.public("/v5/market/time")).body["result"]
    assert abs(int(server_time["timeSecond"]) - now_ms() // 1000) <= 2
    first = (await simulator.public("/v5/market/instruments-info?category=linear&limit=7")).body
    assert len(first["result"]["list"]) == 7
    symbols = [i["symbol"] for i in first["result"]["list"]]
    cursor = first["result"]["nextPageCursor"]
    while cursor:
        page = await simulator.public(
            f"/v5/market/instruments-info?category=linear&limit=7&cursor={cursor}"
        )
        symbols += [i["symbol"] for i in page.body["result"]["list"]]
        cursor = page.body["result"]["nextPageCursor"]
    assert len(symbols) == len(set(symbols)) == 20
    one_page = (await simulator.public("/v5/market/instruments-info?category=linear")).body[
        "result"
    ]
    assert (len(one_page["list"]), one_page["nextPageCursor"]) == (20, "")
    btc = next(i for i in one_page["list"] if i["symbol"] == "BTCUSDT")
    assert btc["lotSizeFilter"]["qtyStep"] == "0.001"
    assert btc["leverageFilter"]["maxLeverage"] == "100.00"
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "90000"})
    ticker = (await simulator.public("/v5/market/tickers?category=linear&symbol=BTCUSDT")).body
    (item,) = ticker["result"]["list"]
    assert (item["lastPrice"], item["markPrice"], item["bid1Price"], item["ask1Price"]) == (
        "90000.00",
        "90000.00",
        "89999.90",
        "90000.10",
    )
    assert (await simulator.public("/v5/market/tickers?category=linear&symbol=NOPE")).code == 10001
    assert (await simulator.public("/v5/market/tickers?category=spot")).code == 10001
    assert (await simulator.public("/v5/nothing-here")).status == 404


async def test_latency_is_added_to_every_v5_reply(simulator: Simulator) -> None:
    await simulator.admin("PUT", "/sim/config", {"latency_ms": 150})
    started = time.monotonic()
    assert (await simulator.public("/v5/market/time")).status == 200
    assert time.monotonic() - started >= 0.15
    config = await simulator.admin("GET", "/sim/config")
    assert config["latency_ms"] == 150


async def test_reset_restores_the_start(simulator: Simulator) -> None:
    await simulator.order("z-1")
    await simulator.admin("PUT", "/sim/instruments/BTCUSDT", {"status": "Closed"})
    await simulator.admin("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "1", "markPrice": "2"})
    await simulator.admin("PUT", "/sim/config", {"latency_ms": 5})
    await _fault(simulator, kind="empty")
    await simulator.admin("POST", "/sim/reset")
    state = simulator.state
    assert state.orders == []
    assert state.accounts == {}
    assert state.faults.faults == []
    assert state.instruments["BTCUSDT"].status == "Trading"
    assert state.prices["BTCUSDT"] == Decimal("95000.00")
    assert state.marks == {}
    assert state.mark_price("BTCUSDT") == Decimal("95000.00")
    assert state.config.latency_ms == 0
    assert (await simulator.order("z-2")).code == 10003  # accounts are gone too


async def test_admin_refuses_bad_input(simulator: Simulator) -> None:
    for method, path, body in [
        ("POST", "/sim/accounts", {"api_key": "k"}),
        ("PUT", "/sim/tickers/BTCUSDT", {"lastPrice": "-1"}),
        ("PUT", "/sim/tickers/BTCUSDT", {}),
        ("PUT", "/sim/tickers/BTCUSDT", {"markPrice": "0"}),
        ("PUT", "/sim/tickers/BTCUSDT", {"markPrice": "abc"}),
        ("PUT", "/sim/tickers/BTCUSDT", {"indexPrice": "1"}),
        ("PUT", "/sim/config", {"fill_ratio": "2"}),
        ("PUT", "/sim/config", {"nonsense": 1}),
        ("PUT", "/sim/instruments/BTCUSDT", {"status": "Sleeping"}),
    ]:
        async with simulator.http.request(method, f"{simulator.url}{path}", json=body) as response:
            assert response.status == 400, (path, body)
    async with simulator.http.put(
        f"{simulator.url}/sim/tickers/NOPE", json={"lastPrice": "1"}
    ) as response:
        assert response.status == 404


async def test_the_state_is_reachable_through_the_app_key() -> None:
    state = SimulatorState()
    assert create_app(state)[STATE_KEY] is state
    assert create_app()[STATE_KEY] is not state
