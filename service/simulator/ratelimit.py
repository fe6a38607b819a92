"""Bybit's rate limits.

- Per account (UID): a rolling one-second window per endpoint, enforced with retCode 10006 and
  reported on every private reply in X-Bapi-Limit, X-Bapi-Limit-Status and
  X-Bapi-Limit-Reset-Timestamp. order/create's limit is a knob (`order_rate_limit`); the
  others are Bybit's documented ones (`account_limits` turns them off).
- Per IP: `ip_limit` requests in any five seconds; a breach answers HTTP 403 to everything
  until the ban (`ip_ban_ms`) ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from service.simulator.state import Account

WINDOW_MS = 1000
ORDER_CREATE = "/v5/order/create"
# Bybit's documented limits per second (UTA, linear) for the endpoints the simulator serves.
DOCUMENTED_LIMITS = {
    "/v5/order/realtime": 50,
    "/v5/order/history": 50,
    "/v5/execution/list": 50,
    "/v5/position/list": 50,
    "/v5/position/set-leverage": 10,
    "/v5/account/wallet-balance": 50,
    "/v5/account/info": 50,
    "/v5/user/query-api": 10,
}


@dataclass(frozen=True)
class RateStatus:
    limit: int
    remaining: int
    reset_ms: int
    refused: bool

    def headers(self) -> dict[str, str]:
        if self.limit <= 0:
            return {}  # enforcement off: no limit to report (Bybit always has one)
        return {
            "X-Bapi-Limit": str(self.limit),
            "X-Bapi-Limit-Status": str(self.remaining),
            "X-Bapi-Limit-Reset-Timestamp": str(self.reset_ms),
        }


IP_WINDOW_MS = 5000


def admit(
    account: Account, path: str, order_limit: int, now: int, *, all_endpoints: bool = True
) -> RateStatus:
    """Count one call to `path`; refused when it is over its limit. order/create's limit of 0
    turns its enforcement off (and its headers); `all_endpoints` enforces the others."""
    limit = order_limit if path == ORDER_CREATE else DOCUMENTED_LIMITS.get(path, 50)
    calls = account.calls.setdefault(path, deque())
    while calls and calls[0] <= now - WINDOW_MS:
        calls.popleft()
    enforced = limit > 0 and (path == ORDER_CREATE or all_endpoints)
    if enforced and len(calls) >= limit:
        # Over the limit: the reset timestamp says when the oldest call leaves the window.
        return RateStatus(limit, 0, calls[0] + WINDOW_MS, refused=True)
    calls.append(now)
    remaining = max(limit - len(calls), 0) if limit > 0 else 0
    # Within the limit Bybit sends the current time as the reset timestamp.
    return RateStatus(limit, remaining, now, refused=False)


def ip_admit(calls: deque[int], limit: int, now: int) -> bool:
    """Count one request from the client's address; False when it breaches the IP limit."""
    while calls and calls[0] <= now - IP_WINDOW_MS:
        calls.popleft()
    calls.append(now)
    return limit <= 0 or len(calls) <= limit
