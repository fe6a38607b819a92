"""Request signing (HMAC-SHA256), with the clock injected.

Signed string: timestamp + api_key + recv_window + payload, where the payload is the exact
query string sent (GET) or the exact body bytes sent (POST).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], int]  # milliseconds since the epoch


def system_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ApiCredentials:
    """A decrypted Bybit key pair: created just before a call, never logged."""

    api_key: str
    api_secret: str

    @property
    def account(self) -> str:
        """A fingerprint of the key, naming the exchange account it trades: safe to log, and
        what per-account state (locks, confirmed leverage) is keyed by."""
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        shown = f"{self.api_key[:4]}…" if len(self.api_key) > 8 else "***"
        return f"ApiCredentials(api_key={shown!r}, api_secret='***')"

    __str__ = __repr__


def sign(secret: str, timestamp_ms: int, api_key: str, recv_window: int, payload: str) -> str:
    message = f"{timestamp_ms}{api_key}{recv_window}{payload}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def auth_headers(
    credentials: ApiCredentials, payload: str, *, recv_window: int, timestamp_ms: int
) -> dict[str, str]:
    return {
        "X-BAPI-API-KEY": credentials.api_key,
        "X-BAPI-TIMESTAMP": str(timestamp_ms),
        "X-BAPI-RECV-WINDOW": str(recv_window),
        "X-BAPI-SIGN": sign(
            credentials.api_secret, timestamp_ms, credentials.api_key, recv_window, payload
        ),
        "X-BAPI-SIGN-TYPE": "2",
    }
