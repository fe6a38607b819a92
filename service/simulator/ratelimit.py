"""Bybit's per-account (UID) rate limits: a rolling one-second window per endpoint, reported
on every private reply in X-Bapi-Limit, X-Bapi-Limit-Status and X-Bapi-Limit-Reset-Timestamp.
Only order/create is enforced (10006); the other endpoints report their documented limits."""

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
        return {
            "X-Bapi-Limit": str(self.limit),
            "X-Bapi-Limit-Status": str(self.remaining),
            "X-Bapi-Limit-Reset-Timestamp": str(self.reset_ms),
        }


def admit(account: Account, path: str, order_limit: int, now: int) -> RateStatus:
    """Count one call to `path`; refused when order/create is over its limit. A limit of 0
    turns enforcement off (the headers then say 0)."""
    limit = order_limit if path == ORDER_CREATE else DOCUMENTED_LIMITS.get(path, 50)
    calls = account.calls.setdefault(path, deque())
    while calls and calls[0] <= now - WINDOW_MS:
        calls.popleft()
    enforced = path == ORDER_CREATE and limit > 0
    if enforced and len(calls) >= limit:
        # Over the limit: the reset timestamp says when the oldest call leaves the window.
        return RateStatus(limit, 0, calls[0] + WINDOW_MS, refused=True)
    calls.append(now)
    remaining = max(limit - len(calls), 0) if limit > 0 else 0
    # Within the limit Bybit sends the current time as the reset timestamp.
    return RateStatus(limit, remaining, now, refused=False)
