"""The official SDK against the simulator: its verifier agrees with pybit, not only with our
own client. The simulator runs on its own event loop in a thread (pybit is synchronous)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator

import pytest
from aiohttp import web
from pybit.exceptions import InvalidRequestError
from pybit.unified_trading import HTTP

from service.simulator import create_app
from tests.support import free_port

KEY, SECRET = "PYBITSIMKEY00001", "pybit-sim-secret-0001"


def _admin(url: str, method: str, path: str, body: object) -> object:
    request = urllib.request.Request(  # noqa: S310 - loopback only
        f"{url}{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.load(response)


@pytest.fixture
def simulator_url() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(), access_log=None)
    port = free_port()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="simulator", daemon=True)
    thread.start()
    assert started.wait(10), "the simulator did not start"
    url = f"http://127.0.0.1:{port}"
    try:
        _admin(url, "POST", "/sim/accounts", {"api_key": KEY, "api_secret": SECRET})
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _session(url: str, secret: str = SECRET) -> HTTP:
    session = HTTP(api_key=KEY, api_secret=secret, max_retries=1)
    session.endpoint = url
    return session


def test_pybit_places_an_order_and_reads_it_back(simulator_url: str) -> None:
    session = _session(simulator_url)
    placed = session.place_order(
        category="linear",
        symbol="BTCUSDT",
        side="Buy",
        orderType="Market",
        qty="0.001",
        orderLinkId="pybit-1",
    )
    assert placed["retCode"] == 0
    assert placed["result"]["orderLinkId"] == "pybit-1"
    found = session.get_open_orders(category="linear", orderLinkId="pybit-1")
    (order,) = found["result"]["list"]
    assert (order["orderId"], order["orderStatus"], order["cumExecQty"]) == (
        placed["result"]["orderId"],
        "Filled",
        "0.001",
    )
    fills = session.get_executions(category="linear", orderLinkId="pybit-1")
    assert fills["result"]["list"][0]["execQty"] == "0.001"


def test_pybit_sets_leverage_and_reads_the_wallet(simulator_url: str) -> None:
    session = _session(simulator_url)
    assert (
        session.set_leverage(
            category="linear", symbol="ETHUSDT", buyLeverage="1", sellLeverage="1"
        )["retCode"]
        == 0
    )
    with pytest.raises(InvalidRequestError) as unchanged:
        session.set_leverage(category="linear", symbol="ETHUSDT", buyLeverage="1", sellLeverage="1")
    assert unchanged.value.status_code == 110043
    balance = session.get_wallet_balance(accountType="UNIFIED")
    assert balance["retCode"] == 0
    assert balance["result"]["list"][0]["totalEquity"] == "100000"
    positions = session.get_positions(category="linear", symbol="ETHUSDT")
    assert positions["result"]["list"][0]["leverage"] == "1"


def test_pybit_with_the_wrong_secret_is_refused(simulator_url: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        _session(simulator_url, secret="not-the-secret").get_wallet_balance(accountType="UNIFIED")
    assert refused.value.status_code == 10004


def test_pybit_reads_public_market_data(simulator_url: str) -> None:
    session = _session(simulator_url)
    instruments = session.get_instruments_info(category="linear", symbol="SOLUSDT")
    assert instruments["result"]["list"][0]["lotSizeFilter"]["qtyStep"] == "0.1"
    ticker = session.get_tickers(category="linear", symbol="SOLUSDT")
    assert ticker["result"]["list"][0]["lastPrice"] == "180.000"
    assert int(session.get_server_time()["result"]["timeSecond"]) > 0
