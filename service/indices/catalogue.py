"""The index catalogue: a data file in the repo, validated on load, seeded into the database."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from service.trading_logic import ComponentWeight

DEFAULT_CATALOGUE_PATH = Path(__file__).resolve().parent / "data" / "indices.json"

# Bybit linear USDT perpetuals the catalogue may use; anything else is refused.
LINEAR_USDT_SYMBOLS = frozenset(
    {
        "BTCUSDT",
        "ETHUSDT",
        "SOLUSDT",
        "XRPUSDT",
        "BNBUSDT",
        "DOGEUSDT",
        "ADAUSDT",
        "AVAXUSDT",
        "LINKUSDT",
        "DOTUSDT",
        "LTCUSDT",
        "UNIUSDT",
        "AAVEUSDT",
        "NEARUSDT",
        "ATOMUSDT",
        "TRXUSDT",
        "SUIUSDT",
        "ARBUSDT",
        "OPUSDT",
        "APTUSDT",
    }
)
MIN_COMPONENTS, MAX_COMPONENTS = 2, 10
_CODE = re.compile(r"^[A-Z0-9_]{2,32}$")


class CatalogueError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class IndexDefinition:
    code: str
    name: str
    description: str
    components: tuple[ComponentWeight, ...]


def _field(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CatalogueError(f"{where}: field {key!r} is missing or not a non-empty string")
    return value


def _weight(raw: object, where: str) -> Decimal:
    if not isinstance(raw, str):
        raise CatalogueError(f'{where}: weight must be a decimal string such as "0.25"')
    try:
        weight = Decimal(raw)
    except InvalidOperation:
        raise CatalogueError(f"{where}: weight {raw!r} is not a decimal") from None
    if not weight.is_finite() or weight <= 0 or weight > 1:
        raise CatalogueError(f"{where}: weight {raw} must be greater than 0 and at most 1")
    return weight


def _parse_index(item: object, position: int) -> IndexDefinition:
    if not isinstance(item, dict):
        raise CatalogueError(f"index #{position}: must be an object")
    code = _field(item, "code", f"index #{position}")
    if not _CODE.match(code):
        raise CatalogueError(f"index {code!r}: code must match {_CODE.pattern}")
    where = f"index {code}"
    name = _field(item, "name", where)
    description = item.get("description", "")
    if not isinstance(description, str):
        raise CatalogueError(f"{where}: description must be a string")
    raw_components = item.get("components")
    if not isinstance(raw_components, list):
        raise CatalogueError(f"{where}: components must be a list")
    if not MIN_COMPONENTS <= len(raw_components) <= MAX_COMPONENTS:
        raise CatalogueError(
            f"{where}: has {len(raw_components)} components; "
            f"an index has {MIN_COMPONENTS} to {MAX_COMPONENTS}"
        )
    components = []
    seen: set[str] = set()
    for raw in raw_components:
        if not isinstance(raw, dict):
            raise CatalogueError(f"{where}: each component must be an object")
        symbol = _field(raw, "symbol", where)
        if symbol not in LINEAR_USDT_SYMBOLS:
            raise CatalogueError(f"{where}: unknown symbol {symbol!r}")
        if symbol in seen:
            raise CatalogueError(f"{where}: duplicate component {symbol}")
        seen.add(symbol)
        components.append(
            ComponentWeight(symbol=symbol, weight=_weight(raw.get("weight"), f"{where} {symbol}"))
        )
    total = sum((c.weight for c in components), Decimal(0))
    if total != 1:
        raise CatalogueError(f"{where}: weights sum to {total}, not 1")
    return IndexDefinition(
        code=code, name=name, description=description, components=tuple(components)
    )


def parse_catalogue(data: object) -> tuple[IndexDefinition, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("indices"), list):
        raise CatalogueError('the catalogue must be an object with a list under "indices"')
    definitions = tuple(_parse_index(item, n) for n, item in enumerate(data["indices"], 1))
    codes = [d.code for d in definitions]
    duplicates = sorted({c for c in codes if codes.count(c) > 1})
    if duplicates:
        raise CatalogueError(f"duplicate index code(s): {', '.join(duplicates)}")
    return definitions


def load_catalogue(path: Path = DEFAULT_CATALOGUE_PATH) -> tuple[IndexDefinition, ...]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except json.JSONDecodeError as error:
        raise CatalogueError(f"{path.name} is not valid JSON: {error}") from None
    return parse_catalogue(data)
