"""Bybit V5 facts as data: hosts, retCodes and their classes (see docs/bybit.md)."""

from __future__ import annotations

from typing import Final

MAINNET: Final = "https://api.bybit.com"
TESTNET: Final = "https://api-testnet.bybit.com"
DEMO: Final = "https://api-demo.bybit.com"

CATEGORY_LINEAR: Final = "linear"

RETCODE_OK: Final = 0
# Transient: the request may succeed later unchanged.
RETCODE_SERVER_TIMEOUT: Final = 10000
RETCODE_RECV_WINDOW: Final = 10002
RETCODE_RATE_LIMIT: Final = 10006
RETCODE_BUSY: Final = 10016
TRANSIENT_RETCODES: Final = frozenset(
    {
        RETCODE_SERVER_TIMEOUT,
        RETCODE_RECV_WINDOW,
        RETCODE_RATE_LIMIT,
        RETCODE_BUSY,
        10429,  # system-level frequency protection
        30034,  # pybit's default retry set
        30035,
        130035,
        130150,
    }
)
# Permanent, by cause (everything non-zero and not transient is permanent as well).
AUTH_RETCODES: Final = frozenset({10003, 10004, 10005, 10007, 10009, 10010})
INSUFFICIENT_BALANCE_RETCODES: Final = frozenset({110004, 110007, 110012, 110044, 110045, 170131})
RETCODE_DUPLICATE_ORDER_LINK_ID: Final = 110072
RETCODE_LEVERAGE_NOT_MODIFIED: Final = 110043

ORDER_LINK_ID_MAX_LENGTH: Final = 36

# Order statuses after which nothing more will fill.
FINAL_ORDER_STATUSES: Final = frozenset(
    {"Filled", "Cancelled", "Rejected", "PartiallyFilledCanceled", "Deactivated"}
)
