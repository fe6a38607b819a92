"""The index catalogue file and its validation."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path

import pytest

from service.indices.catalogue import (
    LINEAR_USDT_SYMBOLS,
    CatalogueError,
    load_catalogue,
    parse_catalogue,
)

GOOD = {
    "indices": [
        {
            "code": "PAIR",
            "name": "Pair",
            "components": [
                {"symbol": "BTCUSDT", "weight": "0.5"},
                {"symbol": "ETHUSDT", "weight": "0.5"},
            ],
        }
    ]
}


def test_the_shipped_catalogue_is_valid() -> None:
    indices = load_catalogue()
    assert len(indices) >= 4
    codes = {i.code for i in indices}
    assert {"BLUECHIP", "TOP10"} <= codes
    for index in indices:
        assert 2 <= len(index.components) <= 10
        assert sum(c.weight for c in index.components) == Decimal(1)
        assert all(c.symbol in LINEAR_USDT_SYMBOLS for c in index.components)
        assert all(isinstance(c.weight, Decimal) for c in index.components)


def _with(change: dict[str, object]) -> dict[str, object]:
    data = copy.deepcopy(GOOD)
    data["indices"][0].update(change)  # type: ignore[index]
    return data


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            _with(
                {
                    "components": [
                        {"symbol": "BTCUSDT", "weight": "0.5"},
                        {"symbol": "ETHUSDT", "weight": "0.4"},
                    ]
                }
            ),
            "weights sum to 0.9, not 1",
        ),
        (
            _with(
                {
                    "components": [
                        {"symbol": "BTCUSDT", "weight": "0.5"},
                        {"symbol": "FAKEUSDT", "weight": "0.5"},
                    ]
                }
            ),
            "unknown symbol 'FAKEUSDT'",
        ),
        (
            _with(
                {
                    "components": [
                        {"symbol": "BTCUSDT", "weight": "0.5"},
                        {"symbol": "BTCUSDT", "weight": "0.5"},
                    ]
                }
            ),
            "duplicate component BTCUSDT",
        ),
        (_with({"components": [{"symbol": "BTCUSDT", "weight": "1"}]}), "has 1 components"),
        (
            _with(
                {
                    "components": [
                        {"symbol": "BTCUSDT", "weight": 0.5},
                        {"symbol": "ETHUSDT", "weight": "0.5"},
                    ]
                }
            ),
            "decimal string",
        ),
        (
            _with(
                {
                    "components": [
                        {"symbol": "BTCUSDT", "weight": "-0.5"},
                        {"symbol": "ETHUSDT", "weight": "1.5"},
                    ]
                }
            ),
            "greater than 0 and at most 1",
        ),
        (_with({"code": "bad code"}), "code must match"),
        (_with({"name": ""}), "'name' is missing"),
        ({"indices": [GOOD["indices"][0], GOOD["indices"][0]]}, "duplicate index code(s): PAIR"),
        ({"nope": []}, "list under"),
    ],
)
def test_bad_catalogues_are_refused_with_a_clear_message(
    data: dict[str, object], fragment: str
) -> None:
    with pytest.raises(CatalogueError) as caught:
        parse_catalogue(data)
    assert fragment in str(caught.value)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "indices.json"
    path.write_text("{not json")
    with pytest.raises(CatalogueError, match="not valid JSON"):
        load_catalogue(path)
    path.write_text(json.dumps(GOOD))
    assert load_catalogue(path)[0].code == "PAIR"
