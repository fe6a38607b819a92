"""The log lines an SRE reads: one JSON object each, ours written straight by structlog and the
standard library's through the same renderer, secrets redacted, decimals as strings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal

import pytest
import structlog

from service.logging import configure_logging, get_logger


@pytest.fixture
def json_logging() -> Iterator[None]:
    """The set-up is the test's to make (the standard library's handler keeps the stdout it
    finds then: the test's capture); this puts back what was there before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.usefixtures("json_logging")
def test_our_events_are_json_lines_with_context_redaction_and_decimal_strings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    structlog.contextvars.bind_contextvars(position_id="p-1")
    try:
        log = get_logger("service.execution").bind(leg=2)
        log.info("leg.filled", price=Decimal("101.50"), api_secret="s3cret", Token="t0ken")
        log.debug("not at INFO")
    finally:
        structlog.contextvars.clear_contextvars()
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "t0ken" not in out
    [line] = _lines(out)
    assert line["event"] == "leg.filled"
    assert line["level"] == "info"
    assert line["logger"] == "service.execution"
    assert line["position_id"] == "p-1"
    assert line["leg"] == 2
    assert line["price"] == "101.50"
    assert line["api_secret"] == "[redacted]"
    assert line["Token"] == "[redacted]"
    assert str(line["timestamp"]).endswith("Z")


@pytest.mark.usefixtures("json_logging")
def test_exceptions_and_the_standard_library_s_lines_render_the_same_way(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    log = get_logger("service.execution")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("run.failed")
    logging.getLogger("celery").warning("foreign %s", "line")
    first, second = _lines(capsys.readouterr().out)
    assert first["event"] == "run.failed"
    assert first["level"] == "error"
    assert "ZeroDivisionError: boom" in str(first["exception"])
    assert second == {
        "event": "foreign line",
        "level": "warning",
        "logger": "celery",
        "timestamp": second["timestamp"],
    }
