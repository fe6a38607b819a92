"""What a Bybit key may do, checked before it is stored (PUT /api/credentials).

The service needs a key that trades linear contracts and nothing more. Bybit's
`/v5/user/query-api` answers, for the key that signs it, `readOnly` (1: read only), its
`permissions` by group and the `ips` it is bound to. Linear perpetuals are traded under
`ContractTrade: ["Order", "Position"]`, and only that is accepted. `Derivatives:
["DerivativesTrade"]` is not: Bybit adds it by itself according to the account type (unified
or classic; its update-api docs call the field ignored for that reason), so it says nothing
about whether the key was granted contract orders and positions. A key that
can withdraw (`Wallet` holds `"Withdraw"`) is refused: stored here, it would let whoever reads
it move the funds out. A key bound to no address (`ips` `["*"]` or empty) is stored with a
warning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from service.bybit.auth import ApiCredentials
from service.bybit.client import BybitClient
from service.bybit.errors import BybitError, TransientBybitError
from service.bybit.retcodes import lookup
from service.bybit.types import ApiKeyInfo
from service.errors import ExchangeUnavailableError, ValidationError

CONTRACT_TRADE = ("Order", "Position")
WITHDRAW = "Withdraw"
NO_IP_BINDING = "*"

# What can travel in the request's headers at all; a pair that is not so is refused by the
# format check of the store (service/credentials/service.py) without asking Bybit.
_SENDABLE = re.compile(r"^[\x21-\x7e]{1,128}$")


class KeyRefusedError(ValidationError):
    """The key cannot be stored: Bybit refused it, or it may do too little or too much."""


@dataclass(frozen=True, slots=True)
class KeyVerdict:
    """The key may be stored; `warnings` say what the user should still change."""

    warnings: list[str] = field(default_factory=list)


def sendable(api_key: str, api_secret: str) -> bool:
    return bool(_SENDABLE.match(api_key) and _SENDABLE.match(api_secret))


def judge(info: ApiKeyInfo) -> KeyVerdict:
    """The verdict on what Bybit said of the key (raises KeyRefusedError)."""
    granted = info.permissions
    if info.read_only:
        raise KeyRefusedError(
            "this Bybit API key is read-only: it cannot place orders. Create a key with "
            "'Read-Write' and the Contract 'Orders' and 'Positions' permissions"
        )
    # Derivatives: DerivativesTrade is not enough: Bybit adds it by account type.
    if not set(CONTRACT_TRADE) <= set(granted.get("ContractTrade", ())):
        raise KeyRefusedError(
            "this Bybit API key cannot trade linear contracts: it needs the Contract "
            "permissions 'Orders' and 'Positions' (ContractTrade: Order, Position)"
        )
    if WITHDRAW in granted.get("Wallet", ()):
        raise KeyRefusedError(
            "this Bybit API key can withdraw funds: the service never needs that, and a "
            "stored key that can withdraw puts the account's funds at risk. Create a key "
            "without the Wallet 'Withdrawal' permission"
        )
    warnings = []
    if not info.ips or NO_IP_BINDING in info.ips:
        warnings.append(
            "this Bybit API key is not bound to any IP address: whoever obtains it can use "
            "it from anywhere, and Bybit expires such keys after 90 days. Bind it to the "
            "service's outgoing addresses in Bybit's API management"
        )
    return KeyVerdict(warnings=warnings)


# What Bybit answers for a key it does not accept whatever the endpoint: invalid key,
# signature error, authentication failed, IP not whitelisted, key expired.
KEY_REFUSED = frozenset({10003, 10004, 10007, 10010, 33004})
UNCHECKED = (
    "the exchange did not say what this key may do (Bybit's Demo Trading does not serve "
    "/v5/user/query-api), so it is stored unchecked: make sure it cannot withdraw"
)


async def check_key(
    exchange: BybitClient, credentials: ApiCredentials, *, demo: bool = False
) -> KeyVerdict:
    """Ask Bybit what the key may do, and judge it. Bybit refusing the key is a 422; Bybit
    unreachable or busy (or the shared limiter asking to wait) is a 503 with Retry-After.
    `demo`: the exchange is Bybit's Demo Trading, which does not serve query-api (and holds
    no real funds): any other refusal than of the key itself stores it with a warning."""
    try:
        info = await exchange.query_api(credentials)
    except TransientBybitError as error:
        wait = math.ceil(error.retry_after) if error.retry_after else None
        raise ExchangeUnavailableError(
            "Bybit cannot be asked about the key right now, so it was not stored; try again "
            "shortly",
            retry_after=max(1, wait) if wait else None,
        ) from None
    except BybitError as error:
        if demo and error.http_status != 401 and error.retcode not in KEY_REFUSED:
            return KeyVerdict(warnings=[UNCHECKED])
        # Bybit's own message is not passed on: for a bad signature it echoes the key.
        if error.retcode is not None:
            reason = f"{lookup(error.retcode).meaning} (retCode {error.retcode})"
        else:
            reason = f"HTTP {error.http_status}"
        raise KeyRefusedError(
            f"Bybit refused this API key: {reason}. Check the key and secret, and that the "
            "key belongs to the environment the service trades on (mainnet, testnet and "
            "demo keys differ)"
        ) from None
    return judge(info)
