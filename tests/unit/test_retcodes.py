"""Every row of the retCode table, through the client against the simulator: the simulator
answers the code, the client raises what the row says (one test per row)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
import pytest_asyncio

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient, create_http_session
from service.bybit.errors import (
    BybitAuthError,
    BybitClockError,
    BybitError,
    BybitInsufficientBalanceError,
    BybitIpBanError,
    BybitRateLimitError,
    DuplicateOrderLinkIdError,
    PermanentBybitError,
    TransientBybitError,
    UnknownRetCodeError,
)
from service.bybit.retcodes import RETCODES, Cause, Handling, RetCode
from tests.unit.simulator_support import KEY, SECRET, Simulator

pytestmark = pytest.mark.asyncio
CREDENTIALS = ApiCredentials(api_key=KEY, api_secret=SECRET)
BAN_SECONDS = 42.0


@pytest_asyncio.fixture
async def client(simulator: Simulator) -> AsyncIterator[BybitClient]:
    async with create_http_session(connect_timeout=1, read_timeout=1) as http:
        yield BybitClient(http, simulator.url, ip_ban_seconds=BAN_SECONDS)


async def _order(client: BybitClient) -> object:
    return await client.create_market_order(
        CREDENTIALS,
        symbol="BTCUSDT",
        side="Buy",
        qty=Decimal("0.001"),
        order_link_id=f"rc-{secrets.token_hex(6)}",
    )


async def _answer(simulator: Simulator, path: str, code: int, times: int | None = 1) -> None:
    await simulator.admin(
        "POST",
        "/sim/faults",
        {
            "path": path,
            "kind": "retcode",
            "retCode": code,
            "retMsg": f"code {code}",
            "times": times,
        },
    )


def _expected_class(row: RetCode) -> type[BybitError]:
    if row.handling is Handling.PERMANENT or row.handling is Handling.NOT_MODIFIED:
        return {Cause.AUTH: BybitAuthError, Cause.BALANCE: BybitInsufficientBalanceError}.get(
            row.cause, PermanentBybitError
        )
    return {
        Handling.TRANSIENT: TransientBybitError,
        Handling.AMBIGUOUS: TransientBybitError,
        Handling.RATE_LIMITED: BybitRateLimitError,
        Handling.IP_BANNED: BybitIpBanError,
        Handling.DUPLICATE: DuplicateOrderLinkIdError,
    }[row.handling]


@pytest.mark.parametrize("row", list(RETCODES.values()), ids=lambda row: str(row.code))
async def test_each_documented_retcode(
    simulator: Simulator, client: BybitClient, row: RetCode
) -> None:
    if row.handling is Handling.CLOCK:
        # Refused once: the client measures the clock again, signs anew and gets through.
        await _answer(simulator, "/v5/order/create", row.code)
        await _order(client)
        assert len(await simulator.orders()) == 1
        return
    if row.handling is Handling.NOT_MODIFIED:
        # Success for set-leverage ("already so"); a refusal anywhere else.
        await _answer(simulator, "/v5/position/set-leverage", row.code)
        assert await client.set_leverage(CREDENTIALS, "BTCUSDT") is False
    await _answer(simulator, "/v5/order/create", row.code)
    with pytest.raises(BybitError) as raised:
        await _order(client)
    error = raised.value
    assert type(error) is _expected_class(row), (row, error)
    assert error.retcode == row.code
    assert error.transient is (
        row.handling in (Handling.TRANSIENT, Handling.AMBIGUOUS, Handling.RATE_LIMITED)
        or row.handling is Handling.IP_BANNED
    )
    # Only where an order may have been taken is it looked up before anything is re-sent.
    assert error.ambiguous is (row.handling is Handling.AMBIGUOUS)
    if row.handling is Handling.IP_BANNED:
        assert error.retry_after == BAN_SECONDS
    assert await simulator.orders() == []


async def test_an_undocumented_retcode_is_never_success(
    simulator: Simulator, client: BybitClient
) -> None:
    await _answer(simulator, "/v5/order/create", 123456)
    with pytest.raises(UnknownRetCodeError) as raised:
        await _order(client)
    assert not raised.value.transient
    assert raised.value.ambiguous  # looked up first: it may have been taken
    assert "123456" in str(raised.value)


async def test_http_401_is_the_key_refused(simulator: Simulator, client: BybitClient) -> None:
    await simulator.admin(
        "POST", "/sim/faults", {"path": "/v5/order/create", "kind": "http_status", "status": 401}
    )
    with pytest.raises(BybitAuthError, match="refused the API key"):
        await _order(client)


async def test_http_403_is_an_ip_ban(simulator: Simulator, client: BybitClient) -> None:
    await simulator.admin(
        "POST", "/sim/faults", {"path": "/v5/order/create", "kind": "http_status", "status": 403}
    )
    with pytest.raises(BybitIpBanError) as raised:
        await _order(client)
    assert raised.value.retry_after == BAN_SECONDS


async def test_a_host_clock_ahead_is_corrected_before_the_first_signed_call(
    simulator: Simulator, client: BybitClient
) -> None:
    # The exchange's clock is 3 s behind this host's: signed with the host's clock, every
    # request would be refused (more than 1 s ahead), whatever the recv window.
    await simulator.admin("PUT", "/sim/config", {"clock_offset_ms": -3000})
    await _order(client)
    offset = client.clock_offset_ms
    assert offset is not None
    assert -3200 < offset < -2800
    counts = (await simulator.admin("GET", "/sim/requests"))["counts"]
    assert counts.get("/v5/market/time") == 1


async def test_a_clock_that_drifts_is_measured_again_on_10002(
    simulator: Simulator, client: BybitClient
) -> None:
    await _order(client)  # measured once, in step
    await simulator.admin("PUT", "/sim/config", {"clock_offset_ms": -4000})
    await _order(client)  # refused with 10002 once, measured again, sent again
    assert len(await simulator.orders()) == 2
    counts = (await simulator.admin("GET", "/sim/requests"))["counts"]
    assert counts["/v5/market/time"] == 2
    assert counts["/v5/order/create"] == 3


async def test_a_clock_that_cannot_be_corrected_fails_transiently(
    simulator: Simulator, client: BybitClient
) -> None:
    await _answer(simulator, "/v5/order/create", 10002, times=None)
    with pytest.raises(BybitClockError):
        await _order(client)
    assert await simulator.orders() == []
