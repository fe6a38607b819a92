"""The official SDK against the simulator: its verifier agrees with pybit, not only with us."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from pybit.exceptions import InvalidRequestError
from pybit.unified_trading import HTTP

from service.simulator import SimulatorState, create_app
from tests.support import free_port

KEY, SECRET = "PYBITKEY00000001", "pybit-secret-0001"


@pytest.fixture
def simulator_url() -> Iterator[str]:
    """The simulator on its own loop in a thread (pybit is synchronous)."""
    state = SimulatorState()
    loop = asyncio.new_event_loop()
    port = free_port()
    runner = web.AppRunner(create_app(state), access_log=None)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    from decimal import Decimal

    from service.simulator.state import Account

    state.accounts[KEY] = Account(api_key=KEY, api_secret=SECRET, balance=Decimal("100000"))
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_pybit_places_and_reads_an_order(simulator_url: str) -> None:
    session = HTTP(api_key=KEY, api_secret=SECRET, max_retries=1)
    session.endpoint = simulator_url
    placed = session.place_order(
        category="linear",
        symbol="BTCUSDT",
        side="Buy",
        orderType="Market",
        qty="0.001",
        orderLinkId="pybit-1",
    )
    assert placed["retCode"] == 0
    found = session.get_open_orders(category="linear", orderLinkId="pybit-1")
    (order,) = found["result"]["list"]
    assert order["orderId"] == placed["result"]["orderId"]
    assert order["orderStatus"] == "Filled"
    balance = session.get_wallet_balance(accountType="UNIFIED")
    assert balance["retCode"] == 0


def test_pybit_sees_bybit_error_codes(simulator_url: str) -> None:
    session = HTTP(api_key=KEY, api_secret=SECRET, max_retries=1)
    session.endpoint = simulator_url
    session.set_leverage(category="linear", symbol="ETHUSDT", buyLeverage="1", sellLeverage="1")
    with pytest.raises(InvalidRequestError) as caught:
        session.set_leverage(category="linear", symbol="ETHUSDT", buyLeverage="1", sellLeverage="1")
    assert caught.value.status_code == 110043
    wrong = HTTP(api_key=KEY, api_secret="wrong", max_retries=1)
    wrong.endpoint = simulator_url
    with pytest.raises(InvalidRequestError) as refused:
        wrong.get_wallet_balance(accountType="UNIFIED")
    assert refused.value.status_code == 10004
