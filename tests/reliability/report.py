"""docs/reliability.md is assembled from one section per scenario: each scenario rewrites
only its own section (between markers), so running one scenario keeps the others' figures."""

from __future__ import annotations

import platform
import re
import subprocess
from datetime import UTC, datetime

from tests.support import ROOT

REPORT = ROOT / "docs" / "reliability.md"
ORDER = (
    "duplicates",
    "crashes",
    "crashes-batch",
    "crashes-closing",
    "deadline",
    "soft-limit",
    "lost-lock",
    "shared-account",
    "dead-run-reconciliation",
    "exchange-rules",
    "retries",
    "retries-batch",
    "infrastructure",
    "bad-requests",
    "bad-replies",
    "fuzz",
    "security",
    "load",
    "flood",
)
HEADER = """# Reliability

Every figure below comes from an automated scenario. The long ones run with

    scripts/dev reliability

(`pytest tests/reliability tests/fuzz`; one scenario: `scripts/dev reliability -k NAME`),
the quick ones are also part of `scripts/dev test`. Each section names the command and the
settings of the run that wrote it. The scenarios start their own simulator, API, worker and
Beat processes (and, for the infrastructure faults, their own Redis and PostgreSQL on spare
loopback ports); the machine's shared services are never stopped.
"""


def _machine() -> str:
    cores = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{cores} cores, Python {platform.python_version()}"


def write_section(name: str, title: str, body: str) -> None:
    if name not in ORDER:
        raise ValueError(f"unknown section {name!r}")
    text = REPORT.read_text() if REPORT.exists() else ""
    sections = {
        m.group(1): m.group(0)
        for m in re.finditer(r"<!-- section:([a-z-]+) -->.*?<!-- /section:\1 -->", text, re.S)
    }
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections[name] = (
        f"<!-- section:{name} -->\n## {title}\n\n_Run {stamp} on {_machine()}._\n\n"
        f"{body.strip()}\n<!-- /section:{name} -->"
    )
    parts = [HEADER.strip()] + [sections[n] for n in ORDER if n in sections]
    REPORT.write_text("\n\n".join(parts) + "\n")


def table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
