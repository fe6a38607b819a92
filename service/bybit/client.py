"""The aiohttp Bybit V5 client: signed requests, error mapping, typed results.

One `aiohttp.ClientSession` per event loop (keep-alive reuse), shared by every account: the
credentials travel with each private call. The query string and the body are built and
signed here and sent byte for byte (no `params=`/`json=`, which would re-encode them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import yarl

from service.bybit import constants
from service.bybit.auth import ApiCredentials, Clock, auth_headers, system_clock_ms
from service.bybit.errors import (
    BybitAuthError,
    BybitClockError,
    BybitError,
    BybitIpBanError,
    BybitNetworkError,
    BybitRateLimitError,
    BybitServerError,
    PermanentBybitError,
    error_for_retcode,
)
from service.bybit.retcodes import Handling, lookup
from service.bybit.types import (
    ApiKeyInfo,
    Execution,
    Instrument,
    Order,
    OrderAck,
    PayloadError,
    PositionInfo,
    Ticker,
    WalletBalance,
)
from service.metrics import EXCHANGE_ERRORS

T = TypeVar("T")

# Signed timestamps are set this far behind the exchange's clock as measured: Bybit refuses
# one more than 1 s ahead of its clock whatever the window, but accepts one a whole recv
# window behind, and the measurement is only as good as half a round trip.
CLOCK_SAFETY_MS = 250
ORDER_CREATE = "/v5/order/create"
ORDER_CREATE_BATCH = "/v5/order/create-batch"
ORDER_REALTIME = "/v5/order/realtime"


class CallGate(Protocol):
    """Rate limits shared by every process that calls Bybit (service/rate_limits.py): asked
    before each call, told what Bybit answered."""

    async def before(self, path: str, account: str | None, weight: int = 1) -> None:
        """`weight`: what the call counts against the account's limit (a batch: one per
        order)."""

    async def after(
        self,
        path: str,
        account: str | None,
        headers: Mapping[str, str],
        *,
        rate_limited: bool = False,
        reset_in_seconds: float | None = None,
    ) -> None: ...

    async def ban(self, seconds: float) -> None: ...

    def ahead(self, path: str, account: str | None, count: int = 1, weight: int = 1) -> None:
        """Begin taking the slots of the next `count` calls to `path` for `account` now, each
        of `weight`."""

    def drop_ahead(self, account: str | None) -> None:
        """Forget the account's slots taken ahead and not used."""


class OpenGate:
    """No shared limits: for one-off commands and tests that count nothing."""

    async def before(self, path: str, account: str | None, weight: int = 1) -> None:
        return None

    async def after(
        self,
        path: str,
        account: str | None,
        headers: Mapping[str, str],
        *,
        rate_limited: bool = False,
        reset_in_seconds: float | None = None,
    ) -> None:
        return None

    async def ban(self, seconds: float) -> None:
        return None

    def ahead(self, path: str, account: str | None, count: int = 1, weight: int = 1) -> None:
        return None

    def drop_ahead(self, account: str | None) -> None:
        return None


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


@dataclass(frozen=True, slots=True)
class MarketOrder:
    """One market order as sent, alone or in a batch. `position_idx`: 0 in one-way mode; in
    hedge mode 1 (Buy side) or 2 (Sell side), the side of the position the order opens or,
    with `reduce_only`, reduces."""

    symbol: str
    side: str
    qty: Decimal
    order_link_id: str
    position_idx: int = 0
    reduce_only: bool = False

    def fields(self) -> dict[str, object]:
        if len(self.order_link_id) > constants.ORDER_LINK_ID_MAX_LENGTH:
            raise ValueError("orderLinkId is longer than 36 characters")
        fields: dict[str, object] = {
            "symbol": self.symbol,
            "side": self.side,
            "orderType": "Market",
            "qty": _decimal_str(self.qty),
            "orderLinkId": self.order_link_id,
            "positionIdx": self.position_idx,
        }
        if self.reduce_only:
            fields["reduceOnly"] = True
        return fields


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One order's outcome in a batch: accepted (`ack`) or refused (`error`, mapped from its
    own code exactly as a single order's retCode is)."""

    order_link_id: str
    ack: OrderAck | None
    error: BybitError | None


def _batch_items(data: dict[str, Any], orders: Sequence[MarketOrder], path: str) -> list[BatchItem]:
    results = _result(data).get("list")
    ext = data.get("retExtInfo")
    codes = ext.get("list") if isinstance(ext, dict) else None
    if not isinstance(results, list) or not isinstance(codes, list):
        raise PayloadError("create-batch reply without result.list and retExtInfo.list")
    if len(results) != len(orders) or len(codes) != len(orders):
        raise PayloadError(
            f"create-batch answered {len(results)} results and {len(codes)} codes for "
            f"{len(orders)} orders"
        )
    items = []
    for order, result, outcome in zip(orders, results, codes, strict=True):
        code = outcome.get("code") if isinstance(outcome, dict) else None
        if isinstance(code, bool) or not isinstance(code, int):
            raise PayloadError(f"create-batch item without a code: {outcome!r}")
        link = result.get("orderLinkId") if isinstance(result, dict) else None
        if link not in (order.order_link_id, "", None):
            # Matched by position: an answer for another order means we cannot tell which.
            raise PayloadError(f"create-batch item {link!r} answers {order.order_link_id!r}")
        if code == constants.RETCODE_OK:
            ack = OrderAck.from_payload(result)
            items.append(BatchItem(order.order_link_id, ack, None))
            continue
        message = str(outcome.get("msg", ""))
        # The HTTP status is 200 (the request succeeded); the item's own code decides.
        error = error_for_retcode(code, message, path=path, http_status=200)
        items.append(BatchItem(order.order_link_id, None, error))
    return items


class BybitClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        recv_window: int = 5000,
        clock: Clock = system_clock_ms,
        ip_ban_seconds: float = constants.IP_BAN_SECONDS,
        gate: CallGate | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._recv_window = recv_window
        self._clock = clock
        self._ip_ban_seconds = ip_ban_seconds
        self._gate: CallGate = gate or OpenGate()
        # The exchange's clock minus ours, measured before the first signed call and again
        # whenever Bybit refuses a timestamp (10002); None until measured.
        self._offset_ms: int | None = None
        self._offset_lock = asyncio.Lock()

    @property
    def clock_offset_ms(self) -> int | None:
        return self._offset_ms

    def exchange_time_ms(self) -> int:
        """Now, by the exchange's clock as last measured (ours until measured)."""
        return self._clock() + (self._offset_ms or 0)

    async def sync_clock(self) -> int:
        """Measure the exchange's clock against ours (`/v5/market/time`, public)."""
        path = "/v5/market/time"
        # Ask the limiter first: its wait must not count as the request's round trip.
        await self._gate.before(path, None)
        sent = self._clock()
        status, headers, raw = await self._exchange(
            "GET", path, f"{self._base_url}{path}", {}, None
        )
        received = self._clock()
        result = _result(self._envelope(path, status, headers, raw))
        try:
            server_ms = int(str(result["timeNano"])) // 1_000_000
        except (KeyError, ValueError):
            try:
                server_ms = int(str(result["timeSecond"])) * 1000
            except (KeyError, ValueError):
                raise BybitServerError(
                    "market/time without timeNano or timeSecond", path=path, http_status=200
                ) from None
        self._offset_ms = server_ms - (sent + received) // 2
        return self._offset_ms

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
            if error.retcode is not None and lookup(error.retcode).handling is (
                Handling.NOT_MODIFIED
            ):
                return False
            raise
        return True

    def order_slot_ahead(self, credentials: ApiCredentials) -> None:
        """The shared rate limiter's slot for this account's next `create_market_order`, taken
        now, while another of its calls is in flight: the order then goes out as soon as it
        is asked for (service/rate_limits.py, `ahead`)."""
        self._gate.ahead(ORDER_CREATE, credentials.account)

    def order_read_slot_ahead(self, credentials: ApiCredentials, count: int = 1) -> None:
        """The same for this account's next `count` `get_order` calls (their realtime reads)."""
        self._gate.ahead(ORDER_REALTIME, credentials.account, count)

    def batch_slot_ahead(self, credentials: ApiCredentials, orders: int) -> None:
        """The same for this account's next `create_market_orders` of `orders` orders."""
        self._gate.ahead(ORDER_CREATE_BATCH, credentials.account, weight=orders)

    def drop_slots_ahead(self, credentials: ApiCredentials) -> None:
        """The account's slots taken ahead and not used are forgotten (they age out)."""
        self._gate.drop_ahead(credentials.account)

    async def create_market_order(
        self,
        credentials: ApiCredentials,
        *,
        symbol: str,
        side: str,
        qty: Decimal,
        order_link_id: str,
        position_idx: int = 0,
        reduce_only: bool = False,
    ) -> OrderAck:
        """`position_idx`: 0 in one-way mode; in hedge mode 1 (Buy side) or 2 (Sell side), the
        side of the position the order opens or, with `reduce_only`, reduces. A reduce-only
        order never increases a position and Bybit caps it at the position's size."""
        order = MarketOrder(symbol, side, qty, order_link_id, position_idx, reduce_only)
        body = {"category": constants.CATEGORY_LINEAR, **order.fields()}
        result = await self._post(ORDER_CREATE, body, credentials)
        return self._parse(result, OrderAck.from_payload, ORDER_CREATE, ambiguous=True)

    async def create_market_orders(
        self, credentials: ApiCredentials, orders: Sequence[MarketOrder]
    ) -> list[BatchItem]:
        """Several market orders in one `/v5/order/create-batch` request. Bybit answers
        retCode 0 even when some orders failed: each order's own outcome is
        `result.list[i]` and `retExtInfo.list[i]`, in the order sent. An error of the whole
        request raises as any call does (ambiguous when it may have landed); a reply whose
        lists do not match the request raises an ambiguous error too."""
        path = ORDER_CREATE_BATCH
        body = {
            "category": constants.CATEGORY_LINEAR,
            "request": [order.fields() for order in orders],
        }
        data = await self._post_envelope(path, body, credentials, weight=len(orders))
        return self._parse(data, lambda d: _batch_items(d, orders, path), path, ambiguous=True)

    async def get_order(
        self, credentials: ApiCredentials, *, symbol: str, order_link_id: str
    ) -> Order | None:
        """Look an order up by orderLinkId: the realtime cache first, then the history."""
        for path in (ORDER_REALTIME, "/v5/order/history"):
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
        """Every fill of an order, across all pages (an order can have many)."""
        executions: list[Execution] = []
        cursor: str | None = None
        while True:
            result = await self._get(
                "/v5/execution/list",
                {
                    "category": constants.CATEGORY_LINEAR,
                    "symbol": symbol,
                    "orderId": order_id,
                    "limit": 100,
                    "cursor": cursor,
                },
                credentials,
            )
            executions.extend(
                self._parse_list(result, Execution.from_payload, "/v5/execution/list")
            )
            cursor = result.get("nextPageCursor") or None
            if not cursor:
                return executions

    async def get_account_uid(self, credentials: ApiCredentials) -> str:
        """The UID of the Bybit account the key belongs to (`/v5/user/query-api` userID):
        two keys of one account share it."""
        path = "/v5/user/query-api"
        result = await self._get(path, {}, credentials)
        return self._parse(result, _user_id, path)

    async def query_api(self, credentials: ApiCredentials) -> ApiKeyInfo:
        """What the key may do (`/v5/user/query-api`): read-only or not, its permissions,
        the addresses it is bound to."""
        path = "/v5/user/query-api"
        result = await self._get(path, {}, credentials)
        return self._parse(result, ApiKeyInfo.from_payload, path)

    async def get_wallet_balance(self, credentials: ApiCredentials) -> WalletBalance:
        path = "/v5/account/wallet-balance"
        # The USDT coin's row too: under isolated margin the available balance is read there.
        result = await self._get(path, {"accountType": "UNIFIED", "coin": "USDT"}, credentials)
        return self._parse(result, WalletBalance.from_payload, path)

    async def get_positions(
        self, credentials: ApiCredentials, *, symbol: str | None = None
    ) -> list[PositionInfo]:
        """With `symbol`, its rows whether open or not (one per side in hedge mode, which
        tells the position mode); without, every open USDT position, across all pages."""
        path = "/v5/position/list"
        positions: list[PositionInfo] = []
        cursor: str | None = None
        while True:
            result = await self._get(
                path,
                {
                    "category": constants.CATEGORY_LINEAR,
                    "symbol": symbol,
                    "settleCoin": None if symbol else "USDT",
                    "limit": 200,
                    "cursor": cursor,
                },
                credentials,
            )
            positions.extend(self._parse_list(result, PositionInfo.from_payload, path))
            cursor = result.get("nextPageCursor") or None
            if not cursor:
                return positions

    # ---- transport -----------------------------------------------------------------------

    async def _get(
        self,
        path: str,
        params: Mapping[str, object],
        credentials: ApiCredentials | None = None,
    ) -> dict[str, Any]:
        query = encode_query(params)
        url = f"{self._base_url}{path}?{query}" if query else f"{self._base_url}{path}"
        return _result(await self._signed("GET", path, url, query, None, credentials))

    async def _post(
        self, path: str, body: Mapping[str, object], credentials: ApiCredentials
    ) -> dict[str, Any]:
        return _result(await self._post_envelope(path, body, credentials))

    async def _post_envelope(
        self,
        path: str,
        body: Mapping[str, object],
        credentials: ApiCredentials,
        *,
        weight: int = 1,
    ) -> dict[str, Any]:
        """The whole reply (result and retExtInfo) of a POST whose retCode is 0."""
        payload = json.dumps(body, separators=(",", ":"))
        url = f"{self._base_url}{path}"
        return await self._signed("POST", path, url, payload, payload, credentials, weight)

    async def _signed(
        self,
        method: str,
        path: str,
        url: str,
        payload: str,
        body: str | None,
        credentials: ApiCredentials | None,
        weight: int = 1,
    ) -> dict[str, Any]:
        """Send, signed when there are credentials. A timestamp Bybit refuses (10002) did
        nothing: the clock is measured again and the request signed and sent once more."""
        if credentials is None:
            return await self._send(method, path, url, {}, body, None)
        if self._offset_ms is None:
            await self._measure_clock(stale=None)
        for attempt in (1, 2):
            measured = self._offset_ms
            headers = self._headers(credentials, payload)
            if body is not None:
                headers["Content-Type"] = "application/json"
            try:
                return await self._send(
                    method, path, url, headers, body, credentials.account, weight
                )
            except BybitClockError:
                if attempt == 2:
                    raise
                await self._measure_clock(stale=measured)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _measure_clock(self, *, stale: int | None) -> None:
        # Concurrent calls share one measurement: only the first of them asks.
        async with self._offset_lock:
            if self._offset_ms is None or self._offset_ms == stale:
                await self.sync_clock()

    def _headers(self, credentials: ApiCredentials, payload: str) -> dict[str, str]:
        return auth_headers(
            credentials,
            payload,
            recv_window=self._recv_window,
            timestamp_ms=self.exchange_time_ms() - CLOCK_SAFETY_MS,
        )

    async def _send(
        self,
        method: str,
        path: str,
        url: str,
        headers: dict[str, str],
        body: str | None,
        account: str | None,
        weight: int = 1,
    ) -> dict[str, Any]:
        try:
            await self._gate.before(path, account, weight)
            status, reply_headers, raw = await self._exchange(method, path, url, headers, body)
            try:
                result = self._envelope(path, status, reply_headers, raw)
            except BybitIpBanError as error:
                await self._gate.ban(error.retry_after or self._ip_ban_seconds)
                raise
            except BybitRateLimitError as error:
                await self._gate.after(
                    path,
                    account,
                    reply_headers,
                    rate_limited=True,
                    reset_in_seconds=error.retry_after,
                )
                raise
            await self._gate.after(
                path, account, reply_headers, reset_in_seconds=self._retry_after(reply_headers)
            )
            return result
        except BybitError as error:
            EXCHANGE_ERRORS.labels(error.metric_label).inc()
            raise

    async def _exchange(
        self, method: str, path: str, url: str, headers: dict[str, str], body: str | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            async with self._http.request(
                method,
                yarl.URL(url, encoded=True),
                headers=headers,
                data=body.encode() if body is not None else None,
            ) as response:
                return response.status, response.headers, await response.read()
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
            raise BybitIpBanError(
                "HTTP 403: the IP rate limit was breached (or access refused): every call "
                "from this address pauses until the ban ends",
                path=path,
                http_status=status,
                retry_after=self._ip_ban_seconds,
            )
        if status == 401:
            raise BybitAuthError(
                "HTTP 401: the exchange refused the API key (wrong key, or a key for another "
                "environment: mainnet, testnet and demo keys differ)",
                path=path,
                http_status=status,
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
                ban_seconds=self._ip_ban_seconds,
            )
        if status != 200:
            raise PermanentBybitError(f"HTTP {status} from exchange", path=path, http_status=status)
        return data

    def _retry_after(self, headers: Mapping[str, str]) -> float | None:
        reset = headers.get("X-Bapi-Limit-Reset-Timestamp")
        if not reset:
            return None
        try:
            # The reset is stamped by the exchange's clock.
            return max(0.0, (int(reset) - self.exchange_time_ms()) / 1000)
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
    def _parse(
        result: dict[str, Any],
        parse: Callable[[dict[str, Any]], T],
        path: str,
        *,
        ambiguous: bool = False,
    ) -> T:
        """`ambiguous`: the call placed orders, so a reply we cannot read may hide some that
        landed (they are looked up, never taken as not placed)."""
        try:
            return parse(result)
        except (PayloadError, TypeError, AttributeError) as exc:
            raise BybitServerError(
                f"unexpected payload: {exc}", path=path, http_status=200, ambiguous=ambiguous
            ) from None


def _result(data: dict[str, Any]) -> dict[str, Any]:
    result = data.get("result")
    return result if isinstance(result, dict) else {}


def _user_id(result: dict[str, Any]) -> str:
    uid = result.get("userID")
    if isinstance(uid, bool) or not isinstance(uid, int | str) or str(uid) in ("", "0"):
        raise PayloadError(f"query-api has no userID: {uid!r}")
    return str(uid)
