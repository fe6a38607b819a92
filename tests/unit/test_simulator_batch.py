"""The simulator's POST /v5/order/create-batch, as unkind as Bybit's.

Every request is signed by pybit's own `generate_signature` (simulator_support), never by the
simulator's code.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from tests.unit.simulator_support import (
    CREATE,
    KEY,
    OTHER_KEY,
    OTHER_SECRET,
    SECRET,
    Reply,
    Simulator,
    now_ms,
)

pytestmark = pytest.mark.asyncio

BATCH = "/v5/order/create-batch"
HEADERS = ("X-Bapi-Limit", "X-Bapi-Limit-Status", "X-Bapi-Limit-Reset-Timestamp")


def item(link: str, qty: str = "0.001", **fields: Any) -> dict[str, Any]:
    """One order of a batch: order/create's fields, without the category (the batch's)."""
    body = {"symbol": "BTCUSDT", "side": "Buy", "orderType": "Market", "qty": qty}
    body.update(orderLinkId=link, **fields)
    return body


async def batch(simulator: Simulator, *orders: dict[str, Any], **kwargs: Any) -> Reply:
    return await simulator.signed(
        "POST", BATCH, {"category": "linear", "request": list(orders)}, **kwargs
    )


def codes(reply: Reply) -> list[int]:
    return [entry["code"] for entry in reply.body["retExtInfo"]["list"]]


def results(reply: Reply) -> list[dict[str, str]]:
    return list(reply.body["result"]["list"])


async def links(simulator: Simulator, key: str = KEY) -> list[str]:
    return [order["orderLinkId"] for order in await simulator.orders(key)]


async def realtime(simulator: Simulator, link: str) -> list[dict[str, Any]]:
    reply = await simulator.signed(
        "GET", "/v5/order/realtime", {"category": "linear", "orderLinkId": link}
    )
    return list(reply.body["result"]["list"])


async def fault(simulator: Simulator, **script: Any) -> int:
    script.setdefault("path", BATCH)
    return int((await simulator.admin("POST", "/sim/faults", script))["id"])


# ---- success and per-order outcomes ----------------------------------------------------------


async def test_a_batch_places_each_order_and_answers_two_lists(simulator: Simulator) -> None:
    started = now_ms()
    reply = await batch(
        simulator,
        item("b-btc", qty="0.002"),
        item("b-eth", qty="0.50", symbol="ETHUSDT", side="Sell"),
        item("b-sol", qty="1.0", symbol="SOLUSDT", positionIdx=0),
    )
    assert (reply.status, reply.code, reply.body["retMsg"]) == (200, 0, "OK")
    assert set(reply.body) == {"retCode", "retMsg", "result", "retExtInfo", "time"}
    assert reply.body["retExtInfo"]["list"] == [{"code": 0, "msg": "OK"}] * 3
    placed = results(reply)
    assert [(r["category"], r["symbol"], r["orderLinkId"]) for r in placed] == [
        ("linear", "BTCUSDT", "b-btc"),
        ("linear", "ETHUSDT", "b-eth"),
        ("linear", "SOLUSDT", "b-sol"),
    ]
    for result in placed:
        assert set(result) == {"category", "symbol", "orderId", "orderLinkId", "createAt"}
        assert len(result["orderId"]) == 36
        assert started <= int(result["createAt"]) <= now_ms()
        (order,) = await realtime(simulator, result["orderLinkId"])
        assert (order["orderId"], order["orderStatus"]) == (result["orderId"], "Filled")
    assert [(p["symbol"], p["side"], p["size"]) for p in await simulator.positions()] == [
        ("BTCUSDT", "Buy", "0.002"),
        ("ETHUSDT", "Sell", "0.50"),
        ("SOLUSDT", "Buy", "1.0"),
    ]
    # Listed by the admin like single orders, in the order sent.
    assert await links(simulator) == ["b-btc", "b-eth", "b-sol"]


async def test_refused_orders_fail_alone_and_a_later_one_sees_the_earlier_margin(
    simulator: Simulator,
) -> None:
    await simulator.admin(
        "POST", "/sim/accounts", {"api_key": KEY, "api_secret": SECRET, "balance": "10000"}
    )
    # At the default 10x, 0.5 BTC at 95,000 takes 4,750; 0.6 more would need 5,700 of the
    # ~5,224 left. Alone, the second order would pass.
    reply = await batch(
        simulator,
        item("m-1", qty="0.5"),
        item("m-2", qty="0.6"),
        item("m-3", qty="0.0015"),  # not a multiple of qtyStep
        item("m-4", qty="0.10", symbol="ETHUSDT"),
    )
    assert reply.code == 0
    assert codes(reply) == [0, 110007, 10001, 0]
    ext = reply.body["retExtInfo"]["list"]
    assert ext[1]["msg"] == "ab not enough for new order"
    assert "qtyStep" in ext[2]["msg"]
    refused = results(reply)[1:3]
    assert [(r["symbol"], r["orderLinkId"], r["orderId"], r["createAt"]) for r in refused] == [
        ("BTCUSDT", "m-2", "", ""),
        ("BTCUSDT", "m-3", "", ""),
    ]
    assert await links(simulator) == ["m-1", "m-4"]
    assert await realtime(simulator, "m-2") == []


async def test_reduce_only_in_a_batch_reduces_what_an_earlier_order_opened(
    simulator: Simulator,
) -> None:
    reply = await batch(
        simulator,
        item("r-sell", side="Sell", reduceOnly=True),  # nothing to reduce yet
        item("r-open", qty="0.002"),
        item("r-close", qty="0.005", side="Sell", reduceOnly=True),
    )
    assert codes(reply) == [110017, 0, 0]
    (closing,) = await realtime(simulator, "r-close")
    assert (closing["qty"], closing["reduceOnly"]) == ("0.002", True)  # cut to the position
    assert await simulator.positions() == []


async def test_a_duplicate_order_link_id_is_110072_in_and_across_batches(
    simulator: Simulator,
) -> None:
    assert (await simulator.order("d-single")).code == 0
    reply = await batch(
        simulator,
        item("d-1"),
        item("d-1"),
        item("d-single"),
        item("d-2", qty="0.10", symbol="ETHUSDT"),
    )
    assert codes(reply) == [0, 110072, 110072, 0]
    assert reply.body["retExtInfo"]["list"][1]["msg"] == "OrderLinkedID is duplicate"
    assert [r["orderId"] == "" for r in results(reply)] == [False, True, True, False]
    assert [r["orderLinkId"] for r in results(reply)] == ["d-1", "d-1", "d-single", "d-2"]
    assert await links(simulator) == ["d-single", "d-1", "d-2"]
    # And a single order after the batch meets the batch's ids.
    assert (await simulator.order("d-2", symbol="ETHUSDT", qty="0.01")).code == 110072


# ---- whole-request refusals ----------------------------------------------------------------


async def test_a_batch_that_cannot_be_taken_is_10001_and_places_nothing(
    simulator: Simulator,
) -> None:
    bodies: list[dict[str, Any]] = [
        {"category": "linear", "request": [item(f"t-{n}") for n in range(21)]},
        {"category": "linear", "request": []},
        {"category": "linear", "request": item("t-x")},
        {"category": "linear"},
        {"category": "linear", "request": [item("t-y"), "t-z"]},
        {"category": "spot", "request": [item("t-s")]},
    ]
    for body in bodies:
        reply = await simulator.signed("POST", BATCH, body)
        assert (reply.code, reply.body["retMsg"][:14]) == (10001, "params error: "), body
        assert (reply.body["result"], reply.body["retExtInfo"]) == ({}, {})
        # Refused before any order was counted: the quota is untouched.
        assert reply.headers["X-Bapi-Limit-Status"] == "10"
    assert "too many orders: 21 > 20" in (await simulator.signed("POST", BATCH, bodies[0])).text
    await simulator.admin("PUT", "/sim/config", {"batch_max_orders": 2})
    assert (await batch(simulator, item("t-1"), item("t-2"), item("t-3"))).code == 10001
    assert await simulator.orders() == []
    assert codes(await batch(simulator, item("t-1"), item("t-2"))) == [0, 0]


async def test_the_batch_is_signed_over_its_raw_body(simulator: Simulator) -> None:
    body = {"category": "linear", "request": [item("s-1")]}
    wrong = await simulator.signed("POST", BATCH, body, secret="not-the-secret")
    assert wrong.code == 10004
    assert "X-Bapi-Limit" not in wrong.headers
    compact = '{"category":"linear","request":[{"symbol":"BTCUSDT","side":"Buy","orderType":"Market","qty":"0.001","orderLinkId":"s-2"}]}'  # noqa: E501
    assert codes(await simulator.signed("POST", BATCH, raw_body=compact)) == [0]
    assert await links(simulator) == ["s-2"]
    # Only POST: there is no GET create-batch.
    assert (await simulator.signed("GET", BATCH, {"category": "linear"})).status == 404


# ---- the rate limit ------------------------------------------------------------------------


async def test_the_batch_limit_counts_orders_and_cuts_a_batch_short(simulator: Simulator) -> None:
    first = await batch(simulator, *(item(f"q-{n}") for n in range(5)))
    assert codes(first) == [0] * 5
    assert (first.headers["X-Bapi-Limit"], first.headers["X-Bapi-Limit-Status"]) == ("10", "5")
    assert abs(int(first.headers["X-Bapi-Limit-Reset-Timestamp"]) - now_ms()) < 1000
    # 5 left, 8 sent: the first 5 go on, the last 3 fail with 10006 and are not carried out.
    cut = await batch(simulator, *(item(f"c-{n}") for n in range(8)))
    assert cut.code == 0
    assert codes(cut) == [0] * 5 + [10006] * 3
    assert {e["msg"] for e in cut.body["retExtInfo"]["list"][5:]} == {"Too many visits!"}
    assert [(r["orderLinkId"], r["orderId"]) for r in results(cut)[5:]] == [
        ("c-5", ""),
        ("c-6", ""),
        ("c-7", ""),
    ]
    assert cut.headers["X-Bapi-Limit-Status"] == "0"
    reset = int(cut.headers["X-Bapi-Limit-Reset-Timestamp"])
    assert now_ms() - 100 < reset <= now_ms() + 1000  # when the oldest order leaves the window
    assert await links(simulator) == [f"q-{n}" for n in range(5)] + [f"c-{n}" for n in range(5)]
    # Nothing left: the whole request is 10006, as order/create over its limit.
    over = await batch(simulator, item("o-1"))
    assert (over.code, over.body["retMsg"]) == (10006, "Too many visits!")
    assert (over.body["result"], over.body["retExtInfo"]) == ({}, {})
    assert over.headers["X-Bapi-Limit-Status"] == "0"
    assert int(over.headers["X-Bapi-Limit-Reset-Timestamp"]) == reset
    assert len(await simulator.orders()) == 10
    refusals = (await simulator.admin("GET", "/sim/requests"))["refusals"]
    assert refusals["10006"] == 4  # three orders cut off, one request refused
    # order/create's limit is its own, and so is each account's.
    assert (await simulator.order("o-single")).code == 0
    other = await batch(simulator, item("o-other"), key=OTHER_KEY, secret=OTHER_SECRET)
    assert codes(other) == [0]


async def test_the_batch_limit_is_a_knob(simulator: Simulator) -> None:
    config = await simulator.admin("GET", "/sim/config")
    assert (config["batch_rate_limit"], config["batch_max_orders"]) == (10, 20)
    await simulator.admin("PUT", "/sim/config", {"batch_rate_limit": 3})
    assert codes(await batch(simulator, *(item(f"k-{n}") for n in range(4)))) == [0, 0, 0, 10006]
    await simulator.admin("PUT", "/sim/config", {"batch_rate_limit": 0})
    free = await batch(simulator, *(item(f"f-{n}") for n in range(20)))
    assert codes(free) == [0] * 20
    assert not any(header in free.headers for header in HEADERS)
    for bad in ({"batch_max_orders": 0}, {"batch_max_orders": 101}, {"batch_rate_limit": -1}):
        async with simulator.http.put(f"{simulator.url}/sim/config", json=bad) as response:
            assert response.status == 400, bad
    assert (await simulator.admin("PUT", "/sim/config", {"batch_max_orders": 100}))[
        "batch_max_orders"
    ] == 100


# ---- request faults ------------------------------------------------------------------------


async def test_drop_after_fill_carries_the_batch_out_and_loses_the_reply(
    simulator: Simulator,
) -> None:
    await fault(simulator, kind="drop_after_fill")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await batch(simulator, item("x-1"), item("x-2", symbol="ETHUSDT", qty="0.10"))
    assert await links(simulator) == ["x-1", "x-2"]
    assert (await realtime(simulator, "x-2"))[0]["orderStatus"] == "Filled"
    # Sent again, the batch meets its own orders.
    assert codes(await batch(simulator, item("x-1"), item("x-2"))) == [110072, 110072]


async def test_request_retcode_faults_on_a_batch(simulator: Simulator) -> None:
    await fault(simulator, kind="retcode", retCode=10016, retMsg="Request timeout")
    refused = await batch(simulator, item("rc-1"), item("rc-2"))
    assert (refused.code, refused.body["retMsg"], refused.body["retExtInfo"]) == (
        10016,
        "Request timeout",
        {},
    )
    assert await simulator.orders() == []
    await fault(simulator, kind="retcode_after_fill", retCode=10016)
    landed = await batch(simulator, item("rc-3"), item("rc-4"))
    assert landed.code == 10016
    assert await links(simulator) == ["rc-3", "rc-4"]


# ---- per-order faults ----------------------------------------------------------------------


async def test_a_per_order_retcode_fails_only_that_symbols_items(simulator: Simulator) -> None:
    fault_id = await fault(
        simulator, kind="retcode", symbol="ETHUSDT", retCode=10016, retMsg="Server error.", skip=1
    )
    reply = await batch(
        simulator,
        item("p-eth-0", qty="0.10", symbol="ETHUSDT"),
        item("p-btc"),
        item("p-eth-1", qty="0.10", symbol="ETHUSDT"),
        item("p-eth-2", qty="0.10", symbol="ETHUSDT"),
    )
    assert reply.code == 0  # the request as a whole succeeded
    assert codes(reply) == [0, 0, 10016, 0]  # skip 1, times 1: the second ETH order only
    assert reply.body["retExtInfo"]["list"][2]["msg"] == "Server error."
    assert (results(reply)[2]["orderId"], results(reply)[2]["orderLinkId"]) == ("", "p-eth-1")
    assert await links(simulator) == ["p-eth-0", "p-btc", "p-eth-2"]
    (script,) = (await simulator.admin("GET", "/sim/faults"))["faults"]
    assert (script["id"], script["symbol"], script["seen"], script["applied"]) == (
        fault_id,
        "ETHUSDT",
        3,
        1,
    )


async def test_a_per_order_retcode_after_fill_is_an_ambiguous_item(simulator: Simulator) -> None:
    await fault(
        simulator,
        kind="retcode_after_fill",
        symbol="ETHUSDT",
        retCode=10016,
        retMsg="Request timeout",
        times=None,
    )
    reply = await batch(simulator, item("a-btc"), item("a-eth", qty="0.10", symbol="ETHUSDT"))
    assert codes(reply) == [0, 10016]
    assert (results(reply)[1]["orderId"], results(reply)[1]["createAt"]) == ("", "")
    # Reported failed, yet recorded and filled: the client must look it up.
    (order,) = await realtime(simulator, "a-eth")
    assert (order["orderStatus"], order["cumExecQty"]) == ("Filled", "0.10")
    assert [p["symbol"] for p in await simulator.positions()] == ["BTCUSDT", "ETHUSDT"]
    # For ever (times null), whatever happens: a resend meets the first (110072), unseen.
    again = await batch(simulator, item("a-eth", qty="0.10", symbol="ETHUSDT"))
    assert codes(again) == [10016]
    assert len(await simulator.orders()) == 2


async def test_a_per_order_fault_is_never_a_request_fault(simulator: Simulator) -> None:
    await fault(simulator, kind="retcode", symbol="ETHUSDT", times=None)
    # Not the request: a batch without ETHUSDT, and order/create, are untouched.
    assert codes(await batch(simulator, item("n-1"))) == [0]
    assert (await simulator.order("n-2")).code == 0
    assert (await simulator.order("n-3", qty="0.10", symbol="ETHUSDT")).code == 0
    # On path order/create it applies to that symbol's single orders.
    await fault(simulator, path=CREATE, kind="retcode_after_fill", symbol="SOLUSDT", retCode=10016)
    assert (await simulator.order("n-4")).code == 0
    sol = await simulator.order("n-5", qty="1.0", symbol="SOLUSDT")
    assert sol.code == 10016
    assert await links(simulator) == ["n-1", "n-2", "n-3", "n-4", "n-5"]


async def test_bad_per_order_faults_are_refused(simulator: Simulator) -> None:
    for bad, message in (
        ({"path": BATCH, "kind": "drop_after_fill", "symbol": "ETHUSDT"}, "kind must be"),
        ({"path": BATCH, "kind": "hang", "symbol": "ETHUSDT"}, "kind must be"),
        ({"path": "/v5/market/tickers", "kind": "retcode", "symbol": "ETHUSDT"}, "path"),
        ({"path": BATCH, "kind": "retcode", "symbol": 7}, "symbol must be"),
    ):
        async with simulator.http.post(f"{simulator.url}/sim/faults", json=bad) as response:
            assert response.status == 400, bad
            assert message in await response.text()


# ---- the journal ---------------------------------------------------------------------------


async def test_the_calls_list_each_order_of_a_batch(simulator: Simulator) -> None:
    assert (await simulator.order("j-single")).code == 0
    await batch(simulator, item("j-1"), item("j-2", symbol="ETHUSDT", qty="0.10"))
    calls = (await simulator.admin("GET", f"/sim/calls?api_key={KEY}"))["calls"]
    assert [(c["path"], c["order_link_id"]) for c in calls] == [
        (CREATE, "j-single"),
        (BATCH, "j-1"),
        (BATCH, "j-2"),
    ]
    assert calls[1]["arrived_ms"] == calls[2]["arrived_ms"]
    assert set(calls[1]) == {"method", "path", "api_key", "arrived_ms", "order_link_id"}
    only = (await simulator.admin("GET", f"/sim/calls?path={BATCH}"))["calls"]
    assert [c["order_link_id"] for c in only] == ["j-1", "j-2"]
    # A batch refused as a whole still arrived with its orders; an unreadable one arrives once.
    await batch(simulator, *(item(f"j-x{n}") for n in range(21)))
    await simulator.signed("POST", BATCH, {"category": "linear", "request": []})
    only = (await simulator.admin("GET", f"/sim/calls?path={BATCH}"))["calls"]
    assert len(only) == 2 + 21 + 1
    assert only[-1]["order_link_id"] is None
    counts = (await simulator.admin("GET", "/sim/requests"))["counts"]
    assert counts[BATCH] == 3


async def test_the_orders_are_money_exact(simulator: Simulator) -> None:
    """Fees and margin stay Decimal through a batch: the wallet is exact to the cent."""
    await batch(simulator, item("w-1", qty="0.002"), item("w-2", qty="1.00", symbol="ETHUSDT"))
    wallet = (
        await simulator.signed("GET", "/v5/account/wallet-balance", {"accountType": "UNIFIED"})
    ).body["result"]["list"][0]
    fees = (Decimal("0.002") * 95000 + Decimal(3500)) * Decimal("0.00055")
    assert Decimal(wallet["totalWalletBalance"]) == Decimal(100000) - fees
    assert [o["orderLinkId"] for o in await simulator.orders(OTHER_KEY)] == []
