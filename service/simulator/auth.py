"""Bybit's request authentication, implemented independently of the service's client.

Signed string: timestamp + api_key + recv_window + payload, where the payload is the raw
query string as received (GET) or the raw body bytes (POST): Bybit checks the exact bytes.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from service.simulator.errors import BybitReply
from service.simulator.state import Account, SimulatorState, now_ms

DEFAULT_RECV_WINDOW = 5000


def authenticate(state: SimulatorState, request: web.Request, payload: str) -> Account:
    key = request.headers.get("X-BAPI-API-KEY")
    timestamp = request.headers.get("X-BAPI-TIMESTAMP")
    signature = request.headers.get("X-BAPI-SIGN")
    if not key:
        raise BybitReply(10003, "API key is invalid.")
    if not timestamp or not signature:
        raise BybitReply(10004, "error sign! missing X-BAPI-TIMESTAMP or X-BAPI-SIGN")
    try:
        window = int(request.headers.get("X-BAPI-RECV-WINDOW") or DEFAULT_RECV_WINDOW)
        sent = int(timestamp)
    except ValueError:
        raise BybitReply(
            10001, "params error: timestamp and recv_window must be integers"
        ) from None
    server = now_ms()
    if not server - window <= sent < server + 1000:
        raise BybitReply(
            10002,
            "invalid request, please check your server timestamp or recv_window param. "
            f"req_timestamp[{sent}],server_timestamp[{server}],recv_window[{window}]",
        )
    account = state.accounts.get(key)
    if account is None:
        raise BybitReply(10003, "API key is invalid.")
    expected = hmac.new(
        account.api_secret.encode(),
        f"{timestamp}{key}{window}{payload}".encode(),
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected, signature.lower()):
        raise BybitReply(10004, "error sign! origin_string[...]")
    return account
