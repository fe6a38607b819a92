"""Decimal parsing and formatting: money is Decimal, and numbers travel as strings."""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from service.simulator.errors import params_error

_PLAIN_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?$")
PRICE_PLACES = Decimal("0.00000001")


def plain(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros: `Decimal("1E+5")` → `"100000"`."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def price_string(value: Decimal) -> str:
    """A price or amount to eight places, without trailing zeros (position/list's avgPrice)."""
    return plain(value.quantize(PRICE_PLACES))


def scaled(value: Decimal, step: Decimal) -> str:
    """A decimal written with as many places as `step` has, the way Bybit writes qty and price."""
    exponent = step.as_tuple().exponent
    places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    return format(value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN), "f")


def decimal_string(raw: object, name: str) -> Decimal:
    """A parameter sent as a plain decimal string ("0.001"); anything else is a params error."""
    if not isinstance(raw, str) or not _PLAIN_DECIMAL.match(raw):
        raise params_error(f"{name} invalid")
    return Decimal(raw)


def loose_decimal(raw: object, name: str) -> Decimal:
    """A decimal given as a string or a JSON number (the admin API is lenient)."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"{name} must be a decimal string")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise ValueError(f"{name} must be a decimal string") from None
    if not value.is_finite():
        raise ValueError(f"{name} must be finite")
    return value


def floor_to_step(value: Decimal, step: Decimal) -> Decimal:
    """Round down to a multiple of step."""
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step
