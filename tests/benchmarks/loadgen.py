"""A closed-loop HTTP load generator in its own process (so its CPU is its own and measured):
`concurrency` clients, each sending its next request when the previous answer arrived, until
`requests` answers are in. Prints one JSON object: latencies, wall time, its own CPU time and
the status codes seen. `load()` runs it from a benchmark and measures the server's CPU too.
(The API throughput figures use wrk instead: tests/benchmarks/wrk.py.)

    python -m tests.benchmarks.loadgen --url URL --method POST --body '{...}' \
        --header 'Authorization: Bearer ...' --concurrency 8 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    wall: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float  # share of one core
    server_cpu_ms: float  # API process CPU per request
    statuses: dict[str, int]

    @property
    def throughput(self) -> float:
        return self.requests / self.wall


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def load(
    server_pid: int,
    url: str,
    *,
    method: str,
    concurrency: int,
    requests: int,
    headers: dict[str, str],
    body: str = "",
    conditional: bool = False,
    tokens_file: str = "",
) -> LoadResult:
    """Run this generator in its own process against `url` and measure the server's CPU."""
    command = [
        sys.executable,
        "-m",
        "tests.benchmarks.loadgen",
        *("--url", url, "--method", method, "--concurrency", str(concurrency)),
        *("--requests", str(requests), "--body", body),
        *[arg for k, v in headers.items() for arg in ("--header", f"{k}: {v}")],
        *(["--conditional"] if conditional else []),
        *(["--tokens-file", tokens_file] if tokens_file else []),
    ]
    cpu_before = process_cpu_seconds(server_pid)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    server_cpu = process_cpu_seconds(server_pid) - cpu_before
    data = json.loads(done.stdout)
    ordered = sorted(data["latencies"])
    return LoadResult(
        requests=len(ordered),
        wall=data["wall"],
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[int(len(ordered) * 0.99) - 1] * 1000,
        loadgen_cpu=data["cpu"] / data["wall"],
        server_cpu_ms=server_cpu / len(ordered) * 1000,
        statuses=data["statuses"],
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(args: argparse.Namespace) -> dict[str, object]:
    headers = dict(h.split(": ", 1) for h in args.header)
    # Several users in turn (one bearer token a line): their baskets run side by side, where
    # one account's run one at a time.
    tokens = Path(args.tokens_file).read_text().split() if args.tokens_file else []
    sent_count = 0
    body = args.body.encode() if args.body else None
    if body:
        headers.setdefault("Content-Type", "application/json")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    remaining = 0
    etag: str | None = None

    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(record: bool) -> None:
            nonlocal remaining, etag
            nonlocal sent_count
            while remaining > 0:
                remaining -= 1
                sent = dict(headers)
                if tokens:
                    sent["Authorization"] = f"Bearer {tokens[sent_count % len(tokens)]}"
                    sent_count += 1
                if args.conditional and etag:
                    sent["If-None-Match"] = etag
                started = time.perf_counter()
                async with session.request(args.method, args.url, data=body, headers=sent) as r:
                    await r.read()
                    elapsed = time.perf_counter() - started
                    if args.conditional and r.status == 200:
                        etag = r.headers.get("ETag")
                if record:
                    latencies.append(elapsed)
                    statuses[r.status] += 1

        # Warm-up requests open the connections and are not counted.
        remaining = args.warmup  # 0: every request counts, none is sent beforehand
        await asyncio.gather(*(client(False) for _ in range(args.concurrency)))
        remaining = args.requests
        cpu_before = _cpu_seconds()
        wall_before = time.perf_counter()
        await asyncio.gather(*(client(True) for _ in range(args.concurrency)))
        wall = time.perf_counter() - wall_before
        cpu = _cpu_seconds() - cpu_before
    return {
        "latencies": latencies,
        "wall": wall,
        "cpu": cpu,
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--conditional", action="store_true", help="send If-None-Match")
    parser.add_argument("--tokens-file", default="", help="bearer tokens to send in turn")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass
    json.dump(asyncio.run(_run(args)), sys.stdout)


if __name__ == "__main__":
    main()
