"""Bybit V5 facts as data: hosts, the IP ban, order statuses (retCodes: retcodes.py)."""

from __future__ import annotations

from typing import Final

MAINNET: Final = "https://api.bybit.com"
TESTNET: Final = "https://api-testnet.bybit.com"
DEMO: Final = "https://api-demo.bybit.com"

CATEGORY_LINEAR: Final = "linear"

RETCODE_OK: Final = 0
# Every other retCode and its handling: service/bybit/retcodes.py.

# Bybit bans an address that breached the IP limit for at least ten minutes.
IP_BAN_SECONDS: Final = 600.0

ORDER_LINK_ID_MAX_LENGTH: Final = 36

# Order statuses after which nothing more will fill.
FINAL_ORDER_STATUSES: Final = frozenset(
    {"Filled", "Cancelled", "Rejected", "PartiallyFilledCanceled", "Deactivated"}
)
