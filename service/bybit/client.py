"""The aiohttp Bybit V5 client: signed requests, error mapping, typed results.

One `aiohttp.ClientSession` per event loop (keep-alive reuse), shared by every account: the
credentials travel with each private call. The query string and the body are built and
signed here and sent byte for byte (no `params=`/`json=`, which would re-encode them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import yarl

from service.bybit import constants
from service.bybit.auth import ApiCredentials, Clock, auth_headers, system_clock_ms
from service.bybit.errors import (
    BybitError,
    BybitNetworkError,
    BybitRateLimitError,
    BybitServerError,
    PermanentBybitError,
    error_for_retcode,
)
from service.bybit.types import (
    Execution,
    Instrument,
    Order,
    OrderAck,
    PayloadError,
    Ticker,
    WalletBalance,
)
from service.metrics import EXCHANGE_ERRORS

T = TypeVar("T")

# Bybit says an IP limit (HTTP 403) needs at least ten minutes.
IP_LIMIT_BACKOFF_SECONDS = 600.0


def create_http_session(
    *, connect_timeout: float, read_timeout: float, limit: int = 100
) -> aiohttp.ClientSession:
    """The HTTP session for one event loop; close it on the same loop."""
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=30, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, raise_for_status=False, trust_env=False
    )


def encode_query(params: Mapping[str, object]) -> str:
    """The query string exactly as sent and signed: keys sorted (as pybit), None dropped.

    Values pass through unchanged when they are already URL-safe, which keeps Bybit's
    percent-encoded cursors as Bybit sent them; anything else is percent-encoded.
    """
    parts = []
    for key in sorted(params):
        value = params[key]
        if value is None:
            continue
        parts.append(f"{key}={quote(str(value), safe='-_.~%')}")
    return "&".join(parts)


def _decimal_str(value: Decimal) -> str:
    # Bybit wants plain decimals ("0.01"), never exponents ("1E-2").
    return format(value, "f")


class BybitClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        recv_window: int = 5000,
        clock: Clock = system_clock_ms,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._recv_window = recv_window
        self._clock = clock

    # ---- public market data -------------------------------------------------------------

    async def get_instruments(self, symbol: str | None = None) -> list[Instrument]:
        instruments: list[Instrument] = []
        cursor: str | None = None
        while True:
            result = await self._get(
                "/v5/market/instruments-info",
                {
                    "category": constants.CATEGORY_LINEAR,
                    "symbol": symbol,
                    "limit": None if symbol else 1000,
                    "cursor": cursor,
                },
            )
            instruments.extend(
                self._parse_list(result, Instrument.from_payload, "/v5/market/instruments-info")
            )
            cursor = result.get("nextPageCursor") or None
            if symbol or not cursor:
                return instruments

    async def get_tickers(self, symbol: str | None = None) -> list[Ticker]:
        result = await self._get(
            "/v5/market/tickers", {"category": constants.CATEGORY_LINEAR, "symbol": symbol}
        )
        return self._parse_list(result, Ticker.from_payload, "/v5/market/tickers")

    # ---- private: account and trading --------------------------------------------------

    async def set_leverage(
        self, credentials: ApiCredentials, symbol: str, leverage: Decimal = Decimal(1)
    ) -> bool:
        """Set buy and sell leverage. Returns False when it was already so (110043)."""
        value = _decimal_str(leverage)
        body = {
            "category": constants.CATEGORY_LINEAR,
            "symbol": symbol,
            "buyLeverage": value,
            "sellLeverage": value,
        }
        try:
            await self._post("/v5/position/set-leverage", body, credentials)
        except PermanentBybitError as error:
            if error.retcode == constants.RETCODE_LEVERAGE_NOT_MODIFIED:
                return False
            raise
        return True

    async def create_market_order(
        self,
        credentials: ApiCredentials,
        *,
        symbol: str,
        side: str,
        qty: Decimal,
        order_link_id: str,
    ) -> OrderAck:
        if len(order_link_id) > constants.ORDER_LINK_ID_MAX_LENGTH:
            raise ValueError("orderLinkId is longer than 36 characters")
        body = {
            "category": constants.CATEGORY_LINEAR,
            "symbol": symbol,
            "side": side,
            "orderType": "Market",
            "qty": _decimal_str(qty),
            "orderLinkId": order_link_id,
            "positionIdx": 0,
        }
        result = await self._post("/v5/order/create", body, credentials)
        return self._parse(result, OrderAck.from_payload, "/v5/order/create")

    async def get_order(
        self, credentials: ApiCredentials, *, symbol: str, order_link_id: str
    ) -> Order | None:
        """Look an order up by orderLinkId: the realtime cache first, then the history."""
        for path in ("/v5/order/realtime", "/v5/order/history"):
            result = await self._get(
                path,
                {
                    "category": constants.CATEGORY_LINEAR,
                    "symbol": symbol,
                    "orderLinkId": order_link_id,
                },
                credentials,
            )
            orders = self._parse_list(result, Order.from_payload, path)
            for order in orders:
                if order.order_link_id == order_link_id:
                    return order
        return None

    async def get_executions(
        self, credentials: ApiCredentials, *, symbol: str, order_id: str
    ) -> list[Execution]:
        result = await self._get(
            "/v5/execution/list",
            {"category": constants.CATEGORY_LINEAR, "symbol": symbol, "orderId": order_id},
            credentials,
        )
        return self._parse_list(result, Execution.from_payload, "/v5/execution/list")

    async def get_wallet_balance(self, credentials: ApiCredentials) -> WalletBalance:
        path = "/v5/account/wallet-balance"
        result = await self._get(path, {"accountType": "UNIFIED"}, credentials)
        return self._parse(result, WalletBalance.from_payload, path)

    # ---- transport -----------------------------------------------------------------------

    async def _get(
        self,
        path: str,
        params: Mapping[str, object],
        credentials: ApiCredentials | None = None,
    ) -> dict[str, Any]:
        query = encode_query(params)
        url = f"{self._base_url}{path}?{query}" if query else f"{self._base_url}{path}"
        headers = self._headers(credentials, query)
        return await self._send("GET", path, url, headers, None)

    async def _post(
        self, path: str, body: Mapping[str, object], credentials: ApiCredentials
    ) -> dict[str, Any]:
        payload = json.dumps(body, separators=(",", ":"))
        headers = self._headers(credentials, payload)
        headers["Content-Type"] = "application/json"
        return await self._send("POST", path, f"{self._base_url}{path}", headers, payload)

    def _headers(self, credentials: ApiCredentials | None, payload: str) -> dict[str, str]:
        if credentials is None:
            return {}
        return auth_headers(
            credentials, payload, recv_window=self._recv_window, timestamp_ms=self._clock()
        )

    async def _send(
        self, method: str, path: str, url: str, headers: dict[str, str], body: str | None
    ) -> dict[str, Any]:
        try:
            return await self._exchange(method, path, url, headers, body)
        except BybitError as error:
            EXCHANGE_ERRORS.labels(error.reason).inc()
            raise

    async def _exchange(
        self, method: str, path: str, url: str, headers: dict[str, str], body: str | None
    ) -> dict[str, Any]:
        try:
            async with self._http.request(
                method,
                yarl.URL(url, encoded=True),
                headers=headers,
                data=body.encode() if body is not None else None,
            ) as response:
                raw = await response.read()
                return self._envelope(path, response.status, response.headers, raw)
        except BybitError:
            raise
        except aiohttp.ClientConnectorError as exc:
            # Nothing reached the exchange: not ambiguous.
            raise BybitNetworkError(
                f"cannot connect: {type(exc).__name__}", path=path, ambiguous=False
            ) from None
        except TimeoutError as exc:
            raise BybitNetworkError(
                f"timed out: {type(exc).__name__}", path=path, ambiguous=True
            ) from None
        except aiohttp.ClientError as exc:
            # Sent, then the connection dropped: the request may have taken effect.
            raise BybitNetworkError(
                f"connection lost: {type(exc).__name__}", path=path, ambiguous=True
            ) from None

    def _envelope(
        self, path: str, status: int, headers: Mapping[str, str], raw: bytes
    ) -> dict[str, Any]:
        if status == 403:
            raise BybitRateLimitError(
                "HTTP 403: IP rate limit breached or access refused",
                path=path,
                http_status=status,
                retry_after=IP_LIMIT_BACKOFF_SECONDS,
            )
        if status == 429 or status >= 500:
            raise BybitServerError(
                f"HTTP {status} from exchange", path=path, http_status=status, ambiguous=True
            )
        try:
            data = json.loads(raw, parse_float=Decimal) if raw else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("retCode"), int):
            if status != 200:
                raise PermanentBybitError(
                    f"HTTP {status} without a Bybit envelope", path=path, http_status=status
                )
            # A 200 whose body is cut or not JSON: we cannot know what happened.
            raise BybitServerError(
                "reply is not a Bybit JSON envelope", path=path, http_status=status, ambiguous=True
            )
        retcode: int = data["retCode"]
        if retcode != constants.RETCODE_OK:
            raise error_for_retcode(
                retcode,
                str(data.get("retMsg", "")),
                path=path,
                http_status=status,
                retry_after=self._retry_after(headers),
            )
        if status != 200:
            raise PermanentBybitError(f"HTTP {status} from exchange", path=path, http_status=status)
        result = data.get("result")
        return result if isinstance(result, dict) else {}

    def _retry_after(self, headers: Mapping[str, str]) -> float | None:
        reset = headers.get("X-Bapi-Limit-Reset-Timestamp")
        if not reset:
            return None
        try:
            return max(0.0, (int(reset) - self._clock()) / 1000)
        except ValueError:
            return None

    @staticmethod
    def _parse_list(
        result: dict[str, Any], parse: Callable[[dict[str, Any]], T], path: str
    ) -> list[T]:
        items = result.get("list")
        if not isinstance(items, list):
            raise BybitServerError("result.list is missing", path=path, http_status=200)
        try:
            return [parse(item) for item in items]
        except (PayloadError, TypeError, AttributeError) as exc:
            raise BybitServerError(
                f"unexpected payload: {exc}", path=path, http_status=200
            ) from None

    @staticmethod
    def _parse(result: dict[str, Any], parse: Callable[[dict[str, Any]], T], path: str) -> T:
        try:
            return parse(result)
        except (PayloadError, TypeError, AttributeError) as exc:
            raise BybitServerError(
                f"unexpected payload: {exc}", path=path, http_status=200
            ) from None
