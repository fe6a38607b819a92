"""Bybit's HMAC request authentication, written independently of the service's client.

Signed string: timestamp + api_key + recv_window + payload, where the payload is the raw query
string exactly as received (GET) or the raw body (POST): Bybit checks the bytes it got, so a
client that signs one encoding and sends another is refused with 10004.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from service.simulator.errors import BybitError, now_ms
from service.simulator.state import Account, SimulatorState

DEFAULT_RECV_WINDOW = 5000
FUTURE_TOLERANCE_MS = 1000  # a timestamp this far ahead of the server is refused


def sign(secret: str, timestamp: str, api_key: str, recv_window: str, payload: str) -> str:
    message = f"{timestamp}{api_key}{recv_window}{payload}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def authenticate(
    state: SimulatorState, headers: Mapping[str, str], payload: str, server_ms: int | None = None
) -> Account:
    """The account a signed request belongs to, or the BybitError Bybit would answer."""
    key = headers.get("X-BAPI-API-KEY", "")
    account = state.accounts.get(key) if key else None
    if account is None:
        raise BybitError(10003, "API key is invalid.")
    # The window defaults to 5000 ms when absent; the signed string holds what was sent.
    raw_window = headers.get("X-BAPI-RECV-WINDOW", "")
    timestamp = headers.get("X-BAPI-TIMESTAMP", "")
    server = now_ms() if server_ms is None else server_ms
    if raw_window and not raw_window.isdigit():
        raise BybitError(10001, "params error: recv_window invalid")
    window = int(raw_window) if raw_window else DEFAULT_RECV_WINDOW
    if not timestamp.isdigit() or not server - window <= int(timestamp) < server + (
        FUTURE_TOLERANCE_MS
    ):
        raise BybitError(
            10002,
            "invalid request, please check your server timestamp or recv_window param. "
            f"req_timestamp[{timestamp}],server_timestamp[{server}],recv_window[{window}]",
        )
    signature = headers.get("X-BAPI-SIGN", "")
    expected = sign(account.api_secret, timestamp, key, raw_window, payload)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise BybitError(10004, f"error sign! origin_string[{timestamp}{key}{raw_window}{payload}]")
    return account
