"""API throughput and latency: `POST /api/positions` against the baseline endpoint in the same
app (one INSERT, one Redis push: tests/benchmarks/bare_app.py), at several concurrencies, and
`GET /api/positions/{id}` polling with and without If-None-Match. The load generator runs in
its own process and reports its own CPU, so a saturated generator is visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import httpx

from tests.benchmarks.stack import Stack
from tests.support import ROOT

BODY = json.dumps({"index": "BLUECHIP", "size": "1000", "direction": "long"})
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
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
    command = [
        sys.executable,
        "-m",
        "tests.benchmarks.loadgen",
        "--url",
        url,
        "--method",
        method,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--body",
        body,
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


def _row(label: str, concurrency: int, r: LoadResult) -> str:
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
    return (
        f"| {concurrency} | {label} | {r.throughput:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
        f"{r.p99_ms / r.p50_ms:.1f} | {r.server_cpu_ms:.2f} | {r.loadgen_cpu:.0%} | {codes} |"
    )


def run(stack: Stack, *, requests: int, concurrencies: tuple[int, ...] = (1, 8, 32)) -> str:
    user = stack.new_user()
    stack.env["BENCH_USER_ID"] = str(user.user_id)
    api, url = stack.start_api(app="tests.benchmarks.bare_app:create_app")
    headers = user.headers
    rows: list[str] = []
    ratios: list[str] = []
    worst_ratio, worst_tail = 10.0, 0.0
    try:
        for concurrency in concurrencies:
            results: dict[str, LoadResult] = {}
            for label, path in (("baseline", "/bench/bare"), ("POST /api/positions", "")):
                results[label] = load(
                    api.pid,
                    f"{url}{path or '/api/positions'}",
                    method="POST",
                    concurrency=concurrency,
                    requests=requests,
                    headers=headers,
                    body=BODY,
                )
                rows.append(_row(label, concurrency, results[label]))
            ours, bare = results["POST /api/positions"], results["baseline"]
            ratio = ours.throughput / bare.throughput
            tail = ours.p99_ms / ours.p50_ms
            worst_ratio, worst_tail = min(worst_ratio, ratio), max(worst_tail, tail)
            ratios.append(
                f"| {concurrency} | {ratio:.2f} | {tail:.1f} | {bare.p99_ms / bare.p50_ms:.1f} |"
            )
        created = httpx.post(
            f"{url}/api/positions", json=json.loads(BODY), headers=headers, timeout=10
        )
        created.raise_for_status()
        position_url = f"{url}/api/positions/{created.json()['id']}"
        polls = {
            conditional: load(
                api.pid,
                position_url,
                method="GET",
                concurrency=8,
                requests=requests,
                headers=headers,
                conditional=conditional,
            )
            for conditional in (False, True)
        }
    finally:
        api.stop()
    plain, conditional = polls[False], polls[True]
    return "\n".join(
        [
            "## API: `POST /api/positions` against the baseline endpoint",
            "",
            f"{requests} requests per row after a warm-up, closed loop (each client sends its "
            "next request when the answer arrives), over keep-alive connections. One API "
            "process (`python -m service api`, uvicorn with uvloop and httptools); the baseline "
            "is `POST /bench/bare` in the same app, served the same way, doing one INSERT of a "
            "PENDING row and one LPUSH. `POST /api/positions` authenticates the token, reads "
            "the index and the market snapshot from Redis, checks the size against the "
            "exchange's filters, checks the credentials exist, INSERTs and publishes the Celery "
            "task. Server CPU is the API process's own CPU per request; the load generator is a "
            "separate process and its CPU is shown as a share of one core (it is not the "
            "bottleneck while that share stays well under 100%).",
            "",
            "| clients | endpoint | req/s | p50 ms | p99 ms | p99/p50 | server CPU ms/req "
            "| load generator CPU | statuses |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "| clients | throughput vs baseline (goal >= 0.6) | our p99/p50 (goal <= 3) "
            "| baseline p99/p50 |",
            "|---|---|---|---|",
            *ratios,
            "",
            f"Worst throughput ratio **{worst_ratio:.2f}** (goal 0.6: "
            f"{'met' if worst_ratio >= 0.6 else 'not met'}); worst p99/p50 **{worst_tail:.1f}** "
            f"(goal 3: {'met' if worst_tail <= 3 else 'not met'}).",
            "",
            "### Polling `GET /api/positions/{id}` (8 clients)",
            "",
            "| request | req/s | p50 ms | p99 ms | server CPU ms/req | statuses |",
            "|---|---|---|---|---|---|",
            f"| plain GET (full body) | {plain.throughput:.0f} | {plain.p50_ms:.2f} | "
            f"{plain.p99_ms:.2f} | {plain.server_cpu_ms:.2f} | {plain.statuses} |",
            f"| with If-None-Match (304) | {conditional.throughput:.0f} | "
            f"{conditional.p50_ms:.2f} | {conditional.p99_ms:.2f} | "
            f"{conditional.server_cpu_ms:.2f} | {conditional.statuses} |",
            "",
            f"A conditional poll costs **{conditional.server_cpu_ms / plain.server_cpu_ms:.2f}x"
            "** the server CPU of a full one.",
            "",
        ]
    )
