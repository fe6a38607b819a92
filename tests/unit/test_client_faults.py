"""Each fault the simulator injects, and how our client classifies it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient, MarketOrder, create_http_session
from service.bybit.errors import (
    BybitAuthError,
    BybitError,
    BybitInsufficientBalanceError,
    BybitNetworkError,
    BybitRateLimitError,
    BybitServerError,
    DuplicateOrderLinkIdError,
    PermanentBybitError,
    TransientBybitError,
)
from tests.unit.simulator_support import KEY, SECRET, Simulator

pytestmark = pytest.mark.asyncio
CREDENTIALS = ApiCredentials(api_key=KEY, api_secret=SECRET)
ORDER = "/v5/order/create"


@pytest_asyncio.fixture
async def client(simulator: Simulator) -> AsyncIterator[BybitClient]:
    async with create_http_session(connect_timeout=1, read_timeout=0.5) as http:
        yield BybitClient(http, simulator.url)


async def _place(client: BybitClient, link: str = "f-1") -> Any:
    return await client.create_market_order(
        CREDENTIALS, symbol="BTCUSDT", side="Buy", qty=Decimal("0.001"), order_link_id=link
    )


async def _fault(simulator: Simulator, **fault: object) -> None:
    await simulator.admin("POST", "/sim/faults", {"path": ORDER, **fault})


@pytest.mark.parametrize(
    ("fault", "error_type", "ambiguous"),
    [
        ({"kind": "http_status", "status": 502}, BybitServerError, True),
        ({"kind": "http_status", "status": 503, "body": ""}, BybitServerError, True),
        ({"kind": "http_status", "status": 429}, BybitServerError, True),
        ({"kind": "http_status", "status": 403}, BybitRateLimitError, False),
        (
            {"kind": "retcode", "retCode": 10016, "retMsg": "Request timeout"},
            TransientBybitError,
            True,
        ),
        (
            {"kind": "retcode", "retCode": 10000, "retMsg": "Server Timeout"},
            TransientBybitError,
            True,
        ),
        ({"kind": "malformed"}, BybitServerError, True),
        ({"kind": "malformed", "body": "<html>oops</html>"}, BybitServerError, True),
        ({"kind": "empty"}, BybitServerError, True),
        ({"kind": "delay", "delay_ms": 1500}, BybitNetworkError, True),
        ({"kind": "hang", "delay_ms": 3000}, BybitNetworkError, True),
    ],
)
async def test_transient_faults_are_classified_transient(
    simulator: Simulator,
    client: BybitClient,
    fault: dict[str, object],
    error_type: type[BybitError],
    ambiguous: bool,
) -> None:
    await _fault(simulator, **fault)
    with pytest.raises(error_type) as caught:
        await _place(client)
    error = caught.value
    assert error.transient
    assert error.ambiguous is ambiguous
    assert error.path == ORDER
    assert SECRET not in str(error)
    if error_type is BybitRateLimitError:
        assert error.retry_after is not None


@pytest.mark.parametrize(
    ("retcode", "error_type"),
    [
        (10001, PermanentBybitError),
        (10003, BybitAuthError),
        (10004, BybitAuthError),
        (10005, BybitAuthError),
        (110007, BybitInsufficientBalanceError),
        (110094, PermanentBybitError),
        (170131, BybitInsufficientBalanceError),
        (12345, PermanentBybitError),
    ],
)
async def test_permanent_retcodes_are_permanent(
    simulator: Simulator, client: BybitClient, retcode: int, error_type: type[BybitError]
) -> None:
    await _fault(simulator, kind="retcode", retCode=retcode, retMsg="refused")
    with pytest.raises(error_type) as caught:
        await _place(client)
    assert not caught.value.transient
    assert caught.value.retcode == retcode
    assert "refused" in str(caught.value)


async def test_a_bad_signature_error_carries_no_api_key(simulator: Simulator) -> None:
    """Bybit's 10004 retMsg echoes the string it signed (timestamp, API key, recvWindow,
    body): the error keeps the retCode and 'error sign!', never the key or the body."""
    wrong = ApiCredentials(api_key=KEY, api_secret="not-the-secret")
    async with create_http_session(connect_timeout=1, read_timeout=2) as http:
        client = BybitClient(http, simulator.url)
        with pytest.raises(BybitAuthError) as caught:
            await client.create_market_order(
                wrong, symbol="BTCUSDT", side="Buy", qty=Decimal("0.001"), order_link_id="sig-1"
            )
        with pytest.raises(BybitAuthError) as batch:
            await client.create_market_orders(
                wrong, [MarketOrder("BTCUSDT", "Buy", Decimal("0.001"), "sig-2")]
            )
    for error in (caught.value, batch.value):
        assert error.retcode == 10004
        assert error.message.startswith("error sign!")
        for said in (str(error), error.message, repr(error.args)):
            assert KEY not in said
            assert "not-the-secret" not in said
            assert "orderLinkId" not in said  # nor the body that was signed


async def test_an_echoed_request_is_cut_from_any_message(
    simulator: Simulator, client: BybitClient
) -> None:
    body = '{"category":"linear","list":[{"symbol":"BTCUSDT"}]}'
    await _fault(
        simulator,
        kind="retcode",
        retCode=10004,
        retMsg=f"error sign! origin_string[1700000000000{KEY}5000{body}] try again",
    )
    with pytest.raises(BybitAuthError) as caught:
        await _place(client)
    assert KEY not in str(caught.value)
    assert "BTCUSDT" not in caught.value.message
    assert caught.value.message == "error sign! origin_string[redacted]"
    # Whatever else a message may echo, its length is bounded.
    await _fault(simulator, kind="retcode", retCode=10001, retMsg="params error: " + "x" * 5000)
    with pytest.raises(PermanentBybitError) as long:
        await _place(client, link="f-2")
    assert long.value.message.startswith("params error: ")
    assert len(long.value.message) <= 310


async def test_a_dropped_reply_after_the_fill_is_ambiguous_and_the_order_exists(
    simulator: Simulator, client: BybitClient
) -> None:
    await _fault(simulator, kind="drop_after_fill")
    with pytest.raises(BybitNetworkError) as caught:
        await _place(client, "lost-1")
    assert caught.value.ambiguous
    found = await client.get_order(CREDENTIALS, symbol="BTCUSDT", order_link_id="lost-1")
    assert found is not None
    assert found.order_status == "Filled"
    # Re-sending the same orderLinkId is refused: the first attempt landed.
    with pytest.raises(DuplicateOrderLinkIdError):
        await _place(client, "lost-1")
    orders = (await simulator.admin("GET", "/sim/orders"))["orders"]
    assert len(orders) == 1


async def test_rate_limit_says_when_to_try_again(simulator: Simulator, client: BybitClient) -> None:
    await simulator.admin("PUT", "/sim/config", {"order_rate_limit": 1})
    await _place(client, "rl-1")
    with pytest.raises(BybitRateLimitError) as caught:
        await _place(client, "rl-2")
    assert caught.value.retcode == 10006
    assert caught.value.retry_after is not None
    assert 0 <= caught.value.retry_after <= 1.0


async def test_unreachable_exchange_is_not_ambiguous() -> None:
    from tests.support import free_port

    async with create_http_session(connect_timeout=1, read_timeout=1) as http:
        client = BybitClient(http, f"http://127.0.0.1:{free_port()}")
        with pytest.raises(BybitNetworkError) as caught:
            await _place(client)
    # Nothing reached the exchange: safe to send again.
    assert not caught.value.ambiguous


async def test_unknown_path_without_envelope_is_permanent(simulator: Simulator) -> None:
    async with create_http_session(connect_timeout=1, read_timeout=1) as http:
        client = BybitClient(http, simulator.url + "/nope")
        with pytest.raises(PermanentBybitError) as caught:
            await client.get_wallet_balance(CREDENTIALS)
    assert caught.value.http_status == 404


@pytest.mark.parametrize(
    "body",
    [
        # An envelope that says OK but answers fewer orders than were sent.
        '{"retCode":0,"retMsg":"OK","result":{"list":[]},"retExtInfo":{"list":[]},"time":1}',
        # The per-order codes missing.
        '{"retCode":0,"retMsg":"OK","result":{"list":[{"orderId":"1","orderLinkId":"b-1"}]},'
        '"retExtInfo":{},"time":1}',
        # An answer for another order than the one sent in that place.
        '{"retCode":0,"retMsg":"OK","result":{"list":[{"orderId":"1","orderLinkId":"x"}]},'
        '"retExtInfo":{"list":[{"code":0,"msg":"OK"}]},"time":1}',
    ],
)
async def test_a_batch_reply_that_does_not_match_the_request_is_ambiguous(
    simulator: Simulator, client: BybitClient, body: str
) -> None:
    # The orders may have landed: an unreadable answer must be looked up, never taken as
    # "nothing placed".
    await simulator.admin(
        "POST",
        "/sim/faults",
        {"path": "/v5/order/create-batch", "kind": "malformed", "body": body},
    )
    with pytest.raises(BybitServerError) as caught:
        await client.create_market_orders(
            CREDENTIALS, [MarketOrder("BTCUSDT", "Buy", Decimal("0.001"), "b-1")]
        )
    assert caught.value.ambiguous
    assert caught.value.transient


async def test_a_batch_answers_each_order_on_its_own(
    simulator: Simulator, client: BybitClient
) -> None:
    items = await client.create_market_orders(
        CREDENTIALS,
        [
            MarketOrder("BTCUSDT", "Buy", Decimal("0.001"), "b-ok"),
            MarketOrder("BTCUSDT", "Buy", Decimal("0.0001"), "b-small"),  # under minOrderQty
            MarketOrder("BTCUSDT", "Buy", Decimal("0.001"), "b-ok"),  # a duplicate link
        ],
    )
    assert [i.order_link_id for i in items] == ["b-ok", "b-small", "b-ok"]
    assert items[0].ack is not None
    assert items[0].error is None
    assert items[1].ack is None
    assert isinstance(items[1].error, PermanentBybitError)
    assert isinstance(items[2].error, DuplicateOrderLinkIdError)
