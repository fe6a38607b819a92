"""Where the CPU goes: py-spy samples a process (only threads holding the GIL, that is on the
CPU) while it works, and the samples are grouped by the frames they pass through. The API is
profiled under POST load, a worker process while it executes 10-leg positions."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.benchmarks import wrk
from tests.benchmarks.api_load import BODY
from tests.benchmarks.stack import Stack

# (label, frame substrings) by which the samples are grouped.
Groups = tuple[tuple[str, tuple[str, ...]], ...]
API_GROUPS: Groups = (
    ("task message built and pushed (queue.py, redis.asyncio)", ("RedisTaskPublisher.",)),
    ("size check against the exchange filters", ("check_tradeable (service/",)),
    ("the one statement: token, credentials, INSERT (asyncpg)", ("asyncpg/",)),
    ("rendering the 202 body (pydantic)", ("_json (service/positions/endpoints",)),
    ("the endpoint's own code", ("create_position (service/", "accept_position (service/")),
    ("the full path (ORM): replays and refusals", ("sqlalchemy/",)),
    ("request parsing and validation, routing, middleware", ("fastapi/", "starlette/")),
    ("HTTP protocol (uvicorn, httptools)", ("uvicorn/protocols/",)),
    ("event loop and sockets (uvloop: C code)", ("Runner.run (",)),
)
WORKER_GROUPS: Groups = (
    ("database: SQLAlchemy and asyncpg (claim, plan, leg writes, finish)", ("sqlalchemy/",)),
    ("exchange client: signing, aiohttp, parsing replies", ("service/bybit/", "aiohttp/")),
    ("audit log lines (structlog JSON)", ("structlog/", "service/logging.py")),
    ("credentials decryption (Fernet)", ("cryptography/",)),
    ("Celery: receiving the task, acks, retries", ("celery/", "kombu/", "billiard/")),
    ("execution flow itself (service/execution/)", ("service/execution/",)),
    ("event loop (asyncio: selectors, callbacks)", ("asyncio/",)),
)


def _group(stack: list[str], groups: Groups, *, innermost: bool) -> str:
    """The group a sample counts for. innermost=False: the first group (in their order) one
    of its frames belongs to, so a statement inside authenticate counts for the token check.
    innermost=True: the group of the innermost frame that belongs to one, so a database call
    made by the execution flow counts for the database and the loop only when nothing inside
    it runs."""
    if innermost:
        for frame in reversed(stack):
            for label, needles in groups:
                if any(needle in frame for needle in needles):
                    return label
        return "other"
    for label, needles in groups:
        if any(needle in frame for frame in stack for needle in needles):
            return label
    return "other"


def _py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return spy if Path(spy).exists() else None


def _record(
    pid: int, seconds: int, work: Callable[[], None], groups: Groups, *, innermost: bool
) -> list[str]:
    spy = _py_spy()
    if spy is None:
        return ["py-spy is not installed (`pip install -e '.[bench]'`)."]
    out = Path(tempfile.mkdtemp(prefix="trader-profile-")) / "profile.txt"
    try:
        recorder = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(pid), "--duration", str(seconds), "--gil"),
                *("--rate", "250", "--format", "raw", "-o", str(out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # py-spy attached
        deadline = time.monotonic() + seconds - 1
        while time.monotonic() < deadline:
            work()
        recorder.wait(timeout=seconds + 30)
        counts: dict[str, int] = {}
        total = 0
        for line in out.read_text().splitlines():
            frames, _, n = line.rpartition(" ")
            label = _group(frames.split(";"), groups, innermost=innermost)
            counts[label] = counts.get(label, 0) + int(n)
            total += int(n)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    rows = [
        f"| {label} | {count / total:.0%} |"
        for label, count in sorted(counts.items(), key=lambda item: -item[1])
    ]
    return ["| group | share of CPU samples |", "|---|---|", *rows, "", f"{total} samples."]


def profile_api(stack: Stack, *, seconds: int = 10) -> str:
    binary, _ = wrk.find_or_install()
    user = stack.new_user()
    api, url = stack.start_api()
    headers = {**user.headers, "Content-Type": "application/json"}
    try:
        table = _record(
            api.pid,
            seconds,
            lambda: wrk.run(
                binary,
                f"{url}/api/positions",
                server_pid=api.pid,
                connections=16,
                seconds=seconds - 1,
                method="POST",
                body=BODY,
                headers=headers,
                warmup_seconds=0,
            ),
            API_GROUPS,
            innermost=False,
        )
    finally:
        api.stop()
    return "\n".join(
        [
            "### Profile: where a POST's CPU goes",
            "",
            f"py-spy ({seconds} s, 250 Hz, `--gil`: only samples on the CPU) on the API "
            "process under `POST /api/positions` from wrk with 16 connections. Each sample "
            "counts for the first group in this order that one of its frames belongs to (the "
            "statement made inside the accept counts there, not as request handling).",
            "",
            *table,
            "",
        ]
    )


def profile_worker(stack: Stack, *, seconds: int = 15) -> str:
    """One worker pool process executing TOP10 positions one after another, 20 ms latency."""
    stack.configure_simulator(latency_ms=20, order_rate_limit=0)
    user = stack.new_user()
    server, url = stack.start_api()
    worker = stack.start_worker(processes=1)
    api = httpx.Client(base_url=url, timeout=10)
    body = {"index": "TOP10", "size": "20000", "direction": "long"}
    stop = threading.Event()

    def feed() -> None:
        # Keep the worker busy: a new position whenever fewer than two are waiting.
        while not stop.is_set():
            api.post("/api/positions", json=body, headers=user.headers).raise_for_status()
            time.sleep(0.3)

    try:
        deadline = time.monotonic() + 30
        pool: list[int] = []
        while not pool and time.monotonic() < deadline:
            path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
            pool = [int(p) for p in path.read_text().split()] if path.exists() else []
            time.sleep(0.1)
        feeder = threading.Thread(target=feed)
        feeder.start()
        table = _record(pool[0], seconds, lambda: time.sleep(0.5), WORKER_GROUPS, innermost=True)
        stop.set()
        feeder.join()
    finally:
        api.close()
        worker.stop()
        server.stop()
    return "\n".join(
        [
            "### Profile: where a worker's CPU goes",
            "",
            f"py-spy ({seconds} s, 250 Hz, `--gil`) on the worker's pool process while it "
            "executes TOP10 positions one after another (simulator latency 20 ms); each sample "
            "counts for the group of its innermost frame that belongs to one. Only CPU "
            "time is sampled; the waits on the exchange are not in this table (they are the "
            "floor above).",
            "",
            *table,
            "",
        ]
    )
