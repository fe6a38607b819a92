"""PUT /api/credentials asks the exchange what the key may do before storing it.

A real API process, the simulator as the exchange (each key's permissions and IP binding set
through its admin API), PostgreSQL: a key that trades only is stored; one that can withdraw,
a read-only one, one without the contract permissions (Derivatives: DerivativesTrade alone
included) and one Bybit does not know are refused with
a 422 and nothing stored; one bound to no address is stored with a warning; the exchange
failing or unreachable is a 503 with Retry-After and nothing stored.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.config import get_settings
from tests.integration.conftest import api_client, new_user
from tests.support import free_port

pytestmark = pytest.mark.integration

TRADE_ONLY = {"ContractTrade": ["Order", "Position"]}


@pytest_asyncio.fixture
async def client(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as http:
        yield http


async def _key(sim: httpx.AsyncClient, **rights: Any) -> tuple[str, str]:
    api_key, api_secret = f"KC{secrets.token_hex(8).upper()}", secrets.token_hex(16)
    created = await sim.post(
        "/sim/accounts",
        json={"api_key": api_key, "api_secret": api_secret, "balance": "1000", **rights},
    )
    created.raise_for_status()
    return api_key, api_secret


async def _headers(sessions: object) -> dict[str, str]:
    _, token = await new_user(sessions)
    return {"Authorization": f"Bearer {token}"}


async def _put(
    client: httpx.AsyncClient, headers: dict[str, str], api_key: str, api_secret: str
) -> httpx.Response:
    return await client.put(
        "/api/credentials", json={"api_key": api_key, "api_secret": api_secret}, headers=headers
    )


async def _nothing_stored(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    stored = await client.get("/api/credentials", headers=headers)
    assert stored.status_code == 404, stored.text


@pytest.mark.asyncio
async def test_a_trade_only_key_bound_to_addresses_is_stored_without_warnings(
    client: httpx.AsyncClient, sim: httpx.AsyncClient, sessions: object
) -> None:
    headers = await _headers(sessions)
    api_key, api_secret = await _key(sim, permissions=TRADE_ONLY, ips=["203.0.113.7"])
    stored = await _put(client, headers, api_key, api_secret)
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["warnings"] == []
    assert api_key not in stored.text
    assert api_secret not in stored.text
    # GET is unchanged: the masked key and when it was stored.
    shown = await client.get("/api/credentials", headers=headers)
    assert set(shown.json()) == {"api_key", "updated_at"}
    assert shown.json()["api_key"] == body["api_key"]


@pytest.mark.asyncio
async def test_a_key_bound_to_no_address_is_stored_with_a_warning(
    client: httpx.AsyncClient, sim: httpx.AsyncClient, sessions: object
) -> None:
    for ips in (["*"], []):
        headers = await _headers(sessions)
        api_key, api_secret = await _key(sim, ips=ips)
        stored = await _put(client, headers, api_key, api_secret)
        assert stored.status_code == 200, stored.text
        (warning,) = stored.json()["warnings"]
        assert "not bound to any IP address" in warning
        assert (await client.get("/api/credentials", headers=headers)).status_code == 200


@pytest.mark.asyncio
async def test_the_unified_derivatives_permission_with_the_contract_ones_is_accepted(
    client: httpx.AsyncClient, sim: httpx.AsyncClient, sessions: object
) -> None:
    headers = await _headers(sessions)
    api_key, api_secret = await _key(
        sim,
        permissions={**TRADE_ONLY, "Derivatives": ["DerivativesTrade"]},
        ips=["203.0.113.7"],
    )
    stored = await _put(client, headers, api_key, api_secret)
    assert stored.status_code == 200, stored.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("rights", "said"),
    [
        ({"permissions": {**TRADE_ONLY, "Wallet": ["AccountTransfer", "Withdraw"]}}, "withdraw"),
        ({"read_only": True}, "read-only"),
        ({"permissions": {"Spot": ["SpotTrade"]}}, "cannot trade linear contracts"),
        ({"permissions": {"ContractTrade": ["Order"]}}, "cannot trade linear contracts"),
        # Bybit adds it by account type: it grants no contract trading by itself.
        (
            {"permissions": {"Derivatives": ["DerivativesTrade"]}},
            "cannot trade linear contracts",
        ),
    ],
    ids=[
        "can-withdraw",
        "read-only",
        "spot-only",
        "orders-without-positions",
        "derivatives-only",
    ],
)
async def test_a_key_that_may_do_too_much_or_too_little_is_refused_and_not_stored(
    client: httpx.AsyncClient,
    sim: httpx.AsyncClient,
    sessions: object,
    rights: dict[str, Any],
    said: str,
) -> None:
    headers = await _headers(sessions)
    api_key, api_secret = await _key(sim, **rights)
    refused = await _put(client, headers, api_key, api_secret)
    assert refused.status_code == 422, refused.text
    assert said in refused.json()["detail"]
    assert api_key not in refused.text
    assert api_secret not in refused.text
    await _nothing_stored(client, headers)


@pytest.mark.asyncio
async def test_a_key_the_exchange_refuses_is_a_422_and_not_stored(
    client: httpx.AsyncClient, sim: httpx.AsyncClient, sessions: object
) -> None:
    headers = await _headers(sessions)
    unknown = await _put(client, headers, f"NOPE{secrets.token_hex(6)}", secrets.token_hex(16))
    assert unknown.status_code == 422, unknown.text
    assert "Bybit refused this API key" in unknown.json()["detail"]
    assert "10003" in unknown.json()["detail"]
    # A known key with the wrong secret: a bad signature (Bybit's message echoes the key).
    api_key, _ = await _key(sim)
    wrong = await _put(client, headers, api_key, secrets.token_hex(16))
    assert wrong.status_code == 422, wrong.text
    assert "10004" in wrong.json()["detail"]
    assert api_key not in wrong.text
    await _nothing_stored(client, headers)


@pytest.mark.asyncio
async def test_the_exchange_failing_is_a_503_with_retry_after_and_nothing_stored(
    client: httpx.AsyncClient, sim: httpx.AsyncClient, sessions: object
) -> None:
    headers = await _headers(sessions)
    api_key, api_secret = await _key(sim)
    fault = {"path": "/v5/user/query-api", "kind": "http_status", "status": 502}
    await sim.post("/sim/faults", json={**fault, "api_key": api_key})
    try:
        busy = await _put(client, headers, api_key, api_secret)
    finally:
        await sim.delete("/sim/faults")
    assert busy.status_code == 503, busy.text
    assert int(busy.headers["Retry-After"]) >= 1
    await _nothing_stored(client, headers)
    # Once the exchange answers, the same key is stored.
    assert (await _put(client, headers, api_key, api_secret)).status_code == 200


@pytest.mark.asyncio
async def test_the_exchange_unreachable_is_a_503_and_nothing_stored(
    sim: httpx.AsyncClient, sessions: object
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = get_settings().model_copy(update={"bybit_base_url": closed})
    async with api_client(settings) as client:
        headers = await _headers(sessions)
        api_key, api_secret = await _key(sim)
        down = await _put(client, headers, api_key, api_secret)
        assert down.status_code == 503, down.text
        assert int(down.headers["Retry-After"]) >= 1
        await _nothing_stored(client, headers)


@pytest.mark.asyncio
async def test_on_demo_trading_a_key_query_api_refuses_is_stored_with_a_warning(
    sim: httpx.AsyncClient, sessions: object
) -> None:
    """Bybit's Demo Trading does not serve query-api (modelled by retCode 10005 for it): the
    key is stored unchecked, saying so; a key refused as such (10003) is still refused."""
    from service.bybit.auth import ApiCredentials
    from service.bybit.client import BybitClient, create_http_session
    from service.credentials.key_check import KeyRefusedError, check_key

    api_key, api_secret = await _key(sim)
    fault = {"path": "/v5/user/query-api", "kind": "retcode", "retCode": 10005, "times": None}
    await sim.post("/sim/faults", json={**fault, "api_key": api_key})
    try:
        async with create_http_session(connect_timeout=2, read_timeout=5) as http:
            exchange = BybitClient(http, str(sim.base_url))
            credentials = ApiCredentials(api_key=api_key, api_secret=api_secret)
            verdict = await check_key(exchange, credentials, demo=True)
            assert "stored unchecked" in verdict.warnings[0]
            with pytest.raises(KeyRefusedError, match="10005"):
                await check_key(exchange, credentials, demo=False)
            unknown = ApiCredentials(api_key="NOPE" + secrets.token_hex(6), api_secret="x" * 16)
            with pytest.raises(KeyRefusedError, match="10003"):
                await check_key(exchange, unknown, demo=True)
    finally:
        await sim.delete("/sim/faults")
