"""Bybit's rate limits.

- Per account (UID): a rolling one-second window per endpoint, enforced with retCode 10006 and
  reported on every private reply in X-Bapi-Limit, X-Bapi-Limit-Status and
  X-Bapi-Limit-Reset-Timestamp. order/create's limit is a knob (`order_rate_limit`); the
  others are Bybit's documented ones (`account_limits` turns them off).
- order/create-batch has its own window, apart from order/create's, that counts orders, not
  requests (`batch_rate_limit`, Bybit's rate-limit page, "Instructions for batch endpoints"):
  a batch larger than what is left gets its first orders through and the rest refused.
- Per IP: `ip_limit` requests in any five seconds; a breach answers HTTP 403 to everything
  until the ban (`ip_ban_ms`) ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from service.simulator.state import Account

WINDOW_MS = 1000
ORDER_CREATE = "/v5/order/create"
BATCH_CREATE = "/v5/order/create-batch"
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


def _window(account: Account, path: str, now: int) -> deque[int]:
    """The account's accepted calls (or orders) on `path` within the last second."""
    calls = account.calls.setdefault(path, deque())
    while calls and calls[0] <= now - WINDOW_MS:
        calls.popleft()
    return calls


def admit(
    account: Account, path: str, order_limit: int, now: int, *, all_endpoints: bool = True
) -> RateStatus:
    """Count one call to `path`; refused when it is over its limit. order/create's limit of 0
    turns its enforcement off (and its headers); `all_endpoints` enforces the others."""
    limit = order_limit if path == ORDER_CREATE else DOCUMENTED_LIMITS.get(path, 50)
    calls = _window(account, path, now)
    enforced = limit > 0 and (path == ORDER_CREATE or all_endpoints)
    if enforced and len(calls) >= limit:
        # Over the limit: the reset timestamp says when the oldest call leaves the window.
        return RateStatus(limit, 0, calls[0] + WINDOW_MS, refused=True)
    calls.append(now)
    remaining = max(limit - len(calls), 0) if limit > 0 else 0
    # Within the limit Bybit sends the current time as the reset timestamp.
    return RateStatus(limit, remaining, now, refused=False)


@dataclass(frozen=True)
class BatchAdmission:
    """A batch's share of its window: the first `granted` orders go on, the rest are refused
    one by one (10006); `status.refused` refuses the whole request."""

    status: RateStatus
    granted: int


def admit_batch(account: Account, limit: int, orders: int, now: int) -> BatchAdmission:
    """Count a batch of `orders` against create-batch's own window, order by order. With
    nothing left the request is refused whole (also an unreadable batch, `orders` 0: the
    limit is checked before the parameters, as for every other call). A limit of 0 turns
    enforcement off (and the headers)."""
    calls = _window(account, BATCH_CREATE, now)
    if limit <= 0:
        return BatchAdmission(RateStatus(0, 0, now, refused=False), granted=orders)
    left = max(limit - len(calls), 0)
    if left == 0:
        return BatchAdmission(RateStatus(limit, 0, calls[0] + WINDOW_MS, refused=True), 0)
    granted = min(orders, left)
    calls.extend([now] * granted)
    # Cut short, the batch went over the limit: the reset says when the oldest order leaves
    # the window, as for a refused call; within the limit it is the current time.
    reset = now if granted == orders else calls[0] + WINDOW_MS
    return BatchAdmission(RateStatus(limit, limit - len(calls), reset, refused=False), granted)


def ip_admit(calls: deque[int], limit: int, now: int) -> bool:
    """Count one request from the client's address; False when it breaches the IP limit."""
    while calls and calls[0] <= now - IP_WINDOW_MS:
        calls.popleft()
    calls.append(now)
    return limit <= 0 or len(calls) <= limit
