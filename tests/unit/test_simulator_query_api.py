"""The simulator's GET /v5/user/query-api: each key's rights as Bybit shows them, set through
the admin API (signed by pybit's own function, as every simulator test)."""

from __future__ import annotations

import pytest

from tests.unit.simulator_support import KEY, Simulator

pytestmark = pytest.mark.asyncio

QUERY_API = "/v5/user/query-api"
GROUPS = {
    "ContractTrade",
    "Spot",
    "Wallet",
    "Options",
    "Derivatives",
    "CopyTrading",
    "BlockTrade",
    "Exchange",
    "NFT",
    "Affiliate",
}


async def test_a_default_key_trades_contracts_and_is_bound_to_no_address(
    simulator: Simulator,
) -> None:
    reply = await simulator.signed("GET", QUERY_API)
    assert reply.code == 0
    result = reply.body["result"]
    assert result["apiKey"] == KEY
    assert result["readOnly"] == 0
    assert result["secret"] == ""
    assert set(result["permissions"]) == GROUPS
    assert result["permissions"]["ContractTrade"] == ["Order", "Position"]
    assert "Withdraw" not in result["permissions"]["Wallet"]
    assert result["ips"] == ["*"]
    for field in ("id", "note", "type", "deadlineDay", "expiredAt", "createdAt", "uta", "userID"):
        assert field in result


async def test_the_admin_api_sets_what_the_key_may_do(simulator: Simulator) -> None:
    changed = await simulator.admin(
        "PUT",
        f"/sim/accounts/{KEY}/key",
        {"read_only": True, "permissions": {"Wallet": ["Withdraw"]}, "ips": ["192.0.2.1"]},
    )
    assert changed["read_only"] is True
    result = (await simulator.signed("GET", QUERY_API)).body["result"]
    assert result["readOnly"] == 1
    assert result["permissions"]["Wallet"] == ["Withdraw"]
    assert result["permissions"]["ContractTrade"] == []  # a group not named has none
    assert result["ips"] == ["192.0.2.1"]
    # What is not given stays.
    await simulator.admin("PUT", f"/sim/accounts/{KEY}/key", {"read_only": False})
    result = (await simulator.signed("GET", QUERY_API)).body["result"]
    assert result["readOnly"] == 0
    assert result["ips"] == ["192.0.2.1"]


async def test_an_account_is_created_with_its_key_s_rights(simulator: Simulator) -> None:
    await simulator.admin(
        "POST",
        "/sim/accounts",
        {
            "api_key": "RIGHTS0000000001",
            "api_secret": "rights-secret-000001",
            "permissions": {"Derivatives": ["DerivativesTrade"]},
            "ips": [],
        },
    )
    reply = await simulator.signed(
        "GET", QUERY_API, key="RIGHTS0000000001", secret="rights-secret-000001"
    )
    result = reply.body["result"]
    assert result["permissions"]["Derivatives"] == ["DerivativesTrade"]
    assert result["ips"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"read_only": 1},
        {"permissions": {"Nope": []}},
        {"permissions": {"Wallet": "Withdraw"}},
        {"ips": "*"},
    ],
)
async def test_bad_rights_are_refused(simulator: Simulator, body: dict[str, object]) -> None:
    async with simulator.http.put(f"{simulator.url}/sim/accounts/{KEY}/key", json=body) as r:
        assert r.status == 400
    async with simulator.http.put(f"{simulator.url}/sim/accounts/NOPE/key", json={}) as r:
        assert r.status == 404


async def test_an_unknown_key_is_10003(simulator: Simulator) -> None:
    reply = await simulator.signed("GET", QUERY_API, key="UNKNOWN000000001")
    assert reply.code == 10003
