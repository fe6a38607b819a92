"""Bybit's answers: the JSON envelope, and business errors (HTTP 200, non-zero retCode)."""

from __future__ import annotations

import time
from typing import Any


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class BybitError(Exception):
    """A refusal Bybit sends as HTTP 200 with a non-zero retCode."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


def params_error(detail: str) -> BybitError:
    """Bybit's usual answer to a bad parameter: 10001 with a `params error: …` message."""
    return BybitError(10001, f"params error: {detail}")


def envelope(
    result: Any = None, code: int = 0, msg: str = "OK", ext: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`{"retCode", "retMsg", "result", "retExtInfo", "time"}`, exactly as Bybit frames it.
    `ext` fills retExtInfo, which is `{}` except on batch replies (`{"list": [...]}`)."""
    return {
        "retCode": code,
        "retMsg": msg,
        "result": result if result is not None else {},
        "retExtInfo": ext if ext is not None else {},
        "time": now_ms(),
    }
