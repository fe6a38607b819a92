"""Benchmarks (not part of the test command): `scripts/dev bench`.

Runs every benchmark in one go and rewrites docs/benchmarks.md with the machine, the command
and the figures.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks import client_orders, worker_overhead

ROOT = Path(__file__).resolve().parents[2]


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}, {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks")
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=300)
    args = parser.parse_args()
    sections = [client_orders.run(orders=args.orders), worker_overhead.run(tasks=args.tasks)]
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            f"- Machine: {_machine()}",
            "- Command: `scripts/dev bench` (`python -m tests.benchmarks"
            + (f" --orders {args.orders}" if args.orders != 500 else "")
            + (f" --tasks {args.tasks}" if args.tasks != 300 else "")
            + "`)",
            f"- Run: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            "",
            "Ratios are the result; absolute times depend on the machine and are context.",
            "",
            *sections,
        ]
    )
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
