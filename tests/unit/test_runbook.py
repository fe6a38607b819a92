"""The runbook covers every log event the code emits, and lists none that it does not."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A logging call's first argument: log.info("leg.filled", ...) or log.info(\n "leg.filled"
EVENT = re.compile(
    r"\b(?:log|logger|run_log)\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+\.[a-z_]+)\""
)


def _emitted() -> set[str]:
    found: set[str] = set()
    for folder in ("service", "workers"):
        for path in (ROOT / folder).rglob("*.py"):
            found.update(EVENT.findall(path.read_text()))
    return found


def _documented() -> set[str]:
    text = (ROOT / "docs" / "runbook.md").read_text()
    table = text.split("## Events", 1)[1].split("## Metrics", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)`", table, re.MULTILINE))


def test_every_emitted_event_is_in_the_runbook() -> None:
    emitted = _emitted()
    assert len(emitted) > 15
    assert emitted - _documented() == set()


def test_the_runbook_lists_no_event_the_code_does_not_emit() -> None:
    assert _documented() - _emitted() == set()
