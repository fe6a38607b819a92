"""Our Bybit client against the simulator, over loopback."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient, create_http_session
from service.bybit.errors import BybitAuthError
from tests.support import ApiUser

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_wrong_secret_gets_the_signature_error(
    simulator_url: str, funded_user: ApiUser
) -> None:
    async with create_http_session(connect_timeout=2, read_timeout=5) as http:
        client = BybitClient(http, simulator_url)
        wrong = ApiCredentials(api_key=funded_user.api_key, api_secret="not-the-secret")
        with pytest.raises(BybitAuthError) as caught:
            await client.get_wallet_balance(wrong)
    assert caught.value.retcode == 10004
    assert caught.value.path == "/v5/account/wallet-balance"
    assert "not-the-secret" not in str(caught.value)
    # Bybit's retMsg echoes the signed string, the API key in it: not kept in the error
    # (workers log str(error)); the rest of the message is.
    assert funded_user.api_key not in str(caught.value)
    assert funded_user.api_key not in caught.value.message
    assert caught.value.message.startswith("error sign!")
    assert "retCode=10004" in str(caught.value)


async def test_signed_calls_succeed_with_the_right_secret(
    simulator_url: str, funded_user: ApiUser
) -> None:
    credentials = ApiCredentials(api_key=funded_user.api_key, api_secret=funded_user.api_secret)
    async with create_http_session(connect_timeout=2, read_timeout=5) as http:
        client = BybitClient(http, simulator_url)
        balance = await client.get_wallet_balance(credentials)
        assert balance.total_equity == Decimal("1000000")
        assert await client.set_leverage(credentials, "BTCUSDT") is True
        assert await client.set_leverage(credentials, "BTCUSDT") is False  # 110043 is success
        ack = await client.create_market_order(
            credentials, symbol="BTCUSDT", side="Buy", qty=Decimal("0.002"), order_link_id="t-1"
        )
        order = await client.get_order(credentials, symbol="BTCUSDT", order_link_id="t-1")
        assert order is not None
        assert order.order_id == ack.order_id
        assert order.cum_exec_qty == Decimal("0.002")
        assert order.is_final
        executions = await client.get_executions(
            credentials, symbol="BTCUSDT", order_id=ack.order_id
        )
        assert sum(e.exec_qty for e in executions) == Decimal("0.002")
        assert await client.get_order(credentials, symbol="BTCUSDT", order_link_id="nope") is None
