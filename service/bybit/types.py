"""Typed results of the calls we use; every amount is a Decimal parsed from Bybit's strings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from service.bybit import constants


class PayloadError(ValueError):
    """A field is missing or not what Bybit documents."""


def _decimal(data: dict[str, Any], key: str) -> Decimal:
    value = data.get(key)
    if value is None or value == "":
        raise PayloadError(f"field {key!r} is missing")
    try:
        result = Decimal(str(value))
    except InvalidOperation as exc:
        raise PayloadError(f"field {key!r} is not a decimal: {value!r}") from exc
    if not result.is_finite():
        raise PayloadError(f"field {key!r} is not finite: {value!r}")
    return result


def _optional_decimal(data: dict[str, Any], key: str) -> Decimal | None:
    if data.get(key) in (None, ""):
        return None
    return _decimal(data, key)


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise PayloadError(f"field {key!r} is missing or not a string")
    return value


def _time_ms(data: dict[str, Any], key: str) -> datetime | None:
    raw = data.get(key)
    if raw in (None, ""):
        return None
    try:
        return datetime.fromtimestamp(int(str(raw)) / 1000, tz=UTC)
    except ValueError as exc:
        raise PayloadError(f"field {key!r} is not a millisecond timestamp: {raw!r}") from exc


@dataclass(frozen=True, slots=True)
class Instrument:
    symbol: str
    status: str
    qty_step: Decimal
    min_order_qty: Decimal
    max_order_qty: Decimal
    max_mkt_order_qty: Decimal
    min_notional_value: Decimal
    tick_size: Decimal

    @classmethod
    def from_payload(cls, item: dict[str, Any]) -> Instrument:
        lot = item.get("lotSizeFilter") or {}
        price = item.get("priceFilter") or {}
        if not isinstance(lot, dict) or not isinstance(price, dict):
            raise PayloadError("instrument filters are not objects")
        return cls(
            symbol=_str(item, "symbol"),
            status=_str(item, "status"),
            qty_step=_decimal(lot, "qtyStep"),
            min_order_qty=_decimal(lot, "minOrderQty"),
            max_order_qty=_decimal(lot, "maxOrderQty"),
            max_mkt_order_qty=_optional_decimal(lot, "maxMktOrderQty")
            or _decimal(lot, "maxOrderQty"),
            min_notional_value=_optional_decimal(lot, "minNotionalValue") or Decimal(0),
            tick_size=_decimal(price, "tickSize"),
        )


@dataclass(frozen=True, slots=True)
class Ticker:
    symbol: str
    last_price: Decimal
    mark_price: Decimal | None

    @classmethod
    def from_payload(cls, item: dict[str, Any]) -> Ticker:
        return cls(
            symbol=_str(item, "symbol"),
            last_price=_decimal(item, "lastPrice"),
            mark_price=_optional_decimal(item, "markPrice"),
        )


@dataclass(frozen=True, slots=True)
class OrderAck:
    """Bybit accepted the order; whether and how it filled is read afterwards."""

    order_id: str
    order_link_id: str

    @classmethod
    def from_payload(cls, result: dict[str, Any]) -> OrderAck:
        return cls(order_id=_str(result, "orderId"), order_link_id=_str(result, "orderLinkId"))


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    order_link_id: str
    symbol: str
    side: str
    order_status: str
    qty: Decimal
    cum_exec_qty: Decimal
    avg_price: Decimal | None
    # The fee, in `fee_coin`: from cumFeeDetail (coin -> amount; the fee may be charged in
    # another coin), or the deprecated cumExecFee (USDT for linear) when that is missing.
    cum_exec_fee: Decimal | None
    updated_at: datetime | None
    fee_coin: str | None = None
    fee_detail: dict[str, Decimal] | None = None

    @property
    def is_final(self) -> bool:
        return self.order_status in constants.FINAL_ORDER_STATUSES

    @classmethod
    def from_payload(cls, item: dict[str, Any]) -> Order:
        avg_price = _optional_decimal(item, "avgPrice")
        fee, fee_coin, fee_detail = _fees(item)
        return cls(
            order_id=_str(item, "orderId"),
            order_link_id=str(item.get("orderLinkId") or ""),
            symbol=_str(item, "symbol"),
            side=_str(item, "side"),
            order_status=_str(item, "orderStatus"),
            qty=_decimal(item, "qty"),
            cum_exec_qty=_optional_decimal(item, "cumExecQty") or Decimal(0),
            # Bybit sends "0" or "" before anything filled.
            avg_price=avg_price if avg_price else None,
            cum_exec_fee=fee,
            updated_at=_time_ms(item, "updatedTime") or _time_ms(item, "createdTime"),
            fee_coin=fee_coin,
            fee_detail=fee_detail,
        )


def _fees(item: dict[str, Any]) -> tuple[Decimal | None, str | None, dict[str, Decimal] | None]:
    """(fee, its coin, every coin's fee) from cumFeeDetail, else from cumExecFee (USDT)."""
    detail = item.get("cumFeeDetail")
    if isinstance(detail, dict) and detail:
        fees = {str(coin): _decimal(detail, coin) for coin in detail}
        coin = "USDT" if "USDT" in fees else sorted(fees)[0]
        return fees[coin], coin, fees
    legacy = _optional_decimal(item, "cumExecFee")
    if legacy is None:
        return None, None, None
    return legacy, "USDT", {"USDT": legacy}


@dataclass(frozen=True, slots=True)
class Execution:
    exec_id: str
    order_id: str
    symbol: str
    side: str
    exec_price: Decimal
    exec_qty: Decimal
    exec_fee: Decimal | None
    exec_time: datetime | None

    @classmethod
    def from_payload(cls, item: dict[str, Any]) -> Execution:
        return cls(
            exec_id=_str(item, "execId"),
            order_id=_str(item, "orderId"),
            symbol=_str(item, "symbol"),
            side=_str(item, "side"),
            exec_price=_decimal(item, "execPrice"),
            exec_qty=_decimal(item, "execQty"),
            exec_fee=_optional_decimal(item, "execFee"),
            exec_time=_time_ms(item, "execTime"),
        )


@dataclass(frozen=True, slots=True)
class WalletBalance:
    total_equity: Decimal | None
    # What can margin new orders, in USDT: the account's `totalAvailableBalance` under cross
    # and portfolio margin; under isolated margin (where Bybit leaves account-wide fields
    # empty) the USDT coin's walletBalance - totalPositionIM - totalOrderIM - locked - bonus.
    total_available_balance: Decimal
    isolated: bool = False

    @classmethod
    def from_payload(cls, result: dict[str, Any]) -> WalletBalance:
        accounts = result.get("list")
        if not isinstance(accounts, list) or not accounts or not isinstance(accounts[0], dict):
            raise PayloadError("wallet balance list is empty")
        account = accounts[0]
        available = _optional_decimal(account, "totalAvailableBalance")
        if available is not None:
            return cls(_optional_decimal(account, "totalEquity"), available)
        coins = account.get("coin")
        usdt = (
            next((c for c in coins if isinstance(c, dict) and c.get("coin") == "USDT"), None)
            if isinstance(coins, list)
            else None
        )
        if usdt is None:
            # Nothing in USDT: nothing to margin a USDT perpetual with.
            return cls(_optional_decimal(account, "totalEquity"), Decimal(0), isolated=True)
        held = _decimal(usdt, "walletBalance")
        for name in ("totalPositionIM", "totalOrderIM", "locked", "bonus"):
            held -= _optional_decimal(usdt, name) or Decimal(0)
        return cls(_optional_decimal(account, "totalEquity"), held, isolated=True)


@dataclass(frozen=True, slots=True)
class PositionInfo:
    """One row of position/list: a position the account holds (or an empty one)."""

    symbol: str
    position_idx: int  # 0 one-way; 1 and 2 the long and short sides in hedge mode
    side: str  # "Buy", "Sell", or "" when empty
    size: Decimal
    leverage: Decimal | None

    @classmethod
    def from_payload(cls, item: dict[str, Any]) -> PositionInfo:
        raw_idx = item.get("positionIdx")
        if not isinstance(raw_idx, int) or raw_idx not in (0, 1, 2):
            raise PayloadError(f"field 'positionIdx' is not 0, 1 or 2: {raw_idx!r}")
        return cls(
            symbol=_str(item, "symbol"),
            position_idx=raw_idx,
            side=str(item.get("side") or ""),
            size=_optional_decimal(item, "size") or Decimal(0),
            leverage=_optional_decimal(item, "leverage"),
        )

    @property
    def hedge_mode(self) -> bool:
        return self.position_idx != 0


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What `/v5/user/query-api` says of the key that signed the call: whether it may only
    read, its permissions by group (`ContractTrade: ["Order", "Position"]`, `Wallet:
    [..., "Withdraw"]`, ...), the addresses it is bound to (`["*"]`: none) and its account's
    UID."""

    read_only: bool
    permissions: dict[str, tuple[str, ...]]
    ips: tuple[str, ...]
    user_id: str

    @classmethod
    def from_payload(cls, result: dict[str, Any]) -> ApiKeyInfo:
        read_only = result.get("readOnly")
        if isinstance(read_only, bool) or read_only not in (0, 1):
            raise PayloadError(f"field 'readOnly' is not 0 or 1: {read_only!r}")
        raw = result.get("permissions")
        if not isinstance(raw, dict):
            raise PayloadError("field 'permissions' is missing or not an object")
        permissions: dict[str, tuple[str, ...]] = {}
        for group, granted in raw.items():
            if not isinstance(granted, list) or not all(isinstance(p, str) for p in granted):
                raise PayloadError(f"permissions.{group} is not a list of strings")
            permissions[str(group)] = tuple(granted)
        ips = result.get("ips")
        if ips is None:
            ips = []
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise PayloadError("field 'ips' is not a list of strings")
        uid = result.get("userID")
        return cls(
            read_only=read_only == 1,
            permissions=permissions,
            ips=tuple(ips),
            user_id="" if uid is None or isinstance(uid, bool) else str(uid),
        )
