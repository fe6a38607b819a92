"""The verdict on what Bybit says of a key (service/credentials/key_check.judge)."""

from __future__ import annotations

from typing import Any

import pytest

from service.bybit.types import ApiKeyInfo, PayloadError
from service.credentials.key_check import KeyRefusedError, judge


def _info(**fields: Any) -> ApiKeyInfo:
    payload: dict[str, Any] = {
        "readOnly": 0,
        "permissions": {"ContractTrade": ["Order", "Position"], "Wallet": ["AccountTransfer"]},
        "ips": ["198.51.100.4"],
        "userID": 533285,
    }
    payload.update(fields)
    return ApiKeyInfo.from_payload(payload)


def test_a_trade_only_bound_key_passes_without_warnings() -> None:
    assert judge(_info()).warnings == []


@pytest.mark.parametrize("ips", [["*"], []])
def test_a_key_bound_to_no_address_passes_with_a_warning(ips: list[str]) -> None:
    (warning,) = judge(_info(ips=ips)).warnings
    assert "not bound to any IP address" in warning


def test_the_derivatives_permission_alone_does_not_trade_contracts() -> None:
    """Bybit adds Derivatives: DerivativesTrade by account type (its update-api docs): it
    grants no contract orders or positions by itself."""
    with pytest.raises(KeyRefusedError, match="cannot trade linear contracts"):
        judge(_info(permissions={"Derivatives": ["DerivativesTrade"]}))
    with pytest.raises(KeyRefusedError, match="cannot trade linear contracts"):
        judge(_info(permissions={"ContractTrade": ["Order"], "Derivatives": ["DerivativesTrade"]}))
    # With the contract permissions, as a unified account's key shows it: accepted.
    both = {"ContractTrade": ["Order", "Position"], "Derivatives": ["DerivativesTrade"]}
    assert judge(_info(permissions=both)).warnings == []


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"readOnly": 1}, "read-only"),
        ({"permissions": {"ContractTrade": ["Position"]}}, "cannot trade linear contracts"),
        ({"permissions": {"Spot": ["SpotTrade"], "Derivatives": []}}, "cannot trade"),
        (
            {"permissions": {"ContractTrade": ["Order", "Position"], "Wallet": ["Withdraw"]}},
            "can withdraw",
        ),
    ],
)
def test_keys_that_may_do_too_little_or_too_much_are_refused(
    fields: dict[str, Any], said: str
) -> None:
    with pytest.raises(KeyRefusedError, match=said):
        judge(_info(**fields))


@pytest.mark.parametrize(
    "fields",
    [
        {"readOnly": "0"},
        {"permissions": None},
        {"permissions": {"Wallet": "Withdraw"}},
        {"ips": "*"},
    ],
)
def test_an_answer_not_as_documented_is_a_payload_error(fields: dict[str, Any]) -> None:
    with pytest.raises(PayloadError):
        _info(**fields)
