"""API throughput and latency against a separate minimal app (tests/benchmarks/minimal_app.py),
measured side by side with wrk: `POST /api/positions` against one INSERT and one LPUSH, and
`GET /api/positions/{id}` (a full 200, and a 304 for If-None-Match) against one primary-key
SELECT. Both apps are served by `python -m service api` with the same uvicorn settings, one
process each, with no worker consuming."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.benchmarks import wrk
from tests.benchmarks.stack import Stack

BODY = json.dumps({"index": "BLUECHIP", "size": "1000", "direction": "long"})
CONNECTIONS = (16, 64)
POST_USERS = 64
POST_GOAL, TAIL_GOAL, NOT_MODIFIED_GOAL, FULL_GET_GOAL = 0.6, 3.0, 0.8, 0.5


def _row(connections: int, label: str, r: wrk.WrkResult) -> str:
    return (
        f"| {connections} | {label} | {r.throughput:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
        f"{r.p99_ms / r.p50_ms:.1f} | {r.server_cpu_ms:.2f} | {r.unexpected} |"
    )


def _verdict(value: float, goal: float, *, at_least: bool = True) -> str:
    return "met" if (value >= goal if at_least else value <= goal) else "not met"


def _active_position(stack: Stack, url: str, headers: dict[str, str]) -> str:
    """A TOP10 basket executed to ACTIVE: the heaviest body a poll normally reads (10 legs,
    10 components, 10 fills)."""
    worker = stack.start_worker(processes=1)
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as api:
            created = api.post(
                "/api/positions", json={"index": "TOP10", "size": "20000", "direction": "long"}
            )
            created.raise_for_status()
            path = f"/api/positions/{created.json()['id']}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = api.get(path).json()["status"]
                if status == "ACTIVE":
                    return path
                if status == "FAILED":
                    raise RuntimeError(f"the polled position failed: {api.get(path).json()}")
                time.sleep(0.1)
            raise RuntimeError("the polled position did not reach ACTIVE in 120 s")
    finally:
        worker.stop()


def _end_open_positions(stack: Stack) -> None:
    """What the workers would have done by the next run, done at once (none consumes here):
    the positions the last run opened end FAILED. In production a user's open positions stay
    within their budget (USER_OPEN_POSITIONS), which the accept statement counts; left open,
    thousands per user would pile up and that count measure the pile instead."""

    async def end() -> None:
        import asyncpg

        connection = await asyncpg.connect(stack.database_url.replace("+asyncpg", ""))
        try:
            await connection.execute(
                "UPDATE synthetic_positions SET status = 'FAILED', "
                "error = 'benchmark: ended between runs' WHERE status = 'PENDING'"
            )
        finally:
            await connection.close()

    asyncio.run(end())


def run(stack: Stack, *, seconds: int = 8, rounds: int = 3) -> str:
    binary, found = wrk.find_or_install()
    user = stack.new_user()
    stack.env["BENCH_USER_ID"] = str(user.user_id)
    minimal, minimal_url = stack.start_api(app="tests.benchmarks.minimal_app:create_app")
    ours, url = stack.start_api()
    try:
        polled = _active_position(stack, url, user.headers)
        etag = httpx.get(f"{url}{polled}", headers=user.headers).headers["ETag"]
        not_modified = httpx.get(f"{url}{polled}", headers={**user.headers, "If-None-Match": etag})
        assert not_modified.status_code == 304, not_modified.status_code
        minimal_get = f"{minimal_url}/positions/{polled.rsplit('/', 1)[1]}"
        json_headers = {**user.headers, "Content-Type": "application/json"}

        def measure(server: int, target: str, connections: int, **request: object) -> wrk.WrkResult:
            _end_open_positions(stack)
            return wrk.run(
                binary,
                target,
                server_pid=server,
                connections=connections,
                seconds=seconds,
                **request,  # type: ignore[arg-type]
            )

        def side_by_side(
            connections: int, cases: dict[str, tuple[int, str, dict[str, object]]]
        ) -> dict[str, wrk.WrkResult]:
            """Each case `rounds` times, the cases taking turns, and each case's median run:
            a slow moment of the shared machine falls on one run of each, not on one case."""
            runs: dict[str, list[wrk.WrkResult]] = {label: [] for label in cases}
            for _ in range(rounds):
                for label, (server, target, request) in cases.items():
                    runs[label].append(measure(server, target, connections, **request))
            return {
                label: sorted(results, key=lambda r: r.throughput)[len(results) // 2]
                for label, results in runs.items()
            }

        # POSTs come from POST_USERS users in turn, as a real API's do: one user's openings
        # take turns by design (their open-positions budget is counted strictly,
        # service/budgets.py), so one user alone would measure that queue, not the API.
        posters = [user, *(stack.new_user() for _ in range(POST_USERS - 1))]
        post = {
            "method": "POST",
            "body": BODY,
            "headers": json_headers,
            "rotate": ("Authorization", [f"Bearer {u.token}" for u in posters]),
        }
        post_rows, get_rows, post_ratios, get_ratios = [], [], [], []
        worst_post, worst_tail, worst_304, worst_200 = 10.0, 0.0, 10.0, 10.0
        for connections in CONNECTIONS:
            posts = side_by_side(
                connections,
                {
                    "minimal app: INSERT + LPUSH": (
                        minimal.pid,
                        f"{minimal_url}/positions",
                        post,
                    ),
                    "`POST /api/positions`": (ours.pid, f"{url}/api/positions", post),
                },
            )
            post_rows += [_row(connections, label, r) for label, r in posts.items()]
            base, mine = posts.values()
            ratio, tail = mine.throughput / base.throughput, mine.p99_ms / mine.p50_ms
            worst_post, worst_tail = min(worst_post, ratio), max(worst_tail, tail)
            post_ratios.append(
                f"| {connections} | {ratio:.2f} | {tail:.1f} | {base.p99_ms / base.p50_ms:.1f} |"
            )

            polls = side_by_side(
                connections,
                {
                    "minimal app: one primary-key SELECT": (minimal.pid, minimal_get, {}),
                    "`GET /api/positions/{id}` (200, full body)": (
                        ours.pid,
                        f"{url}{polled}",
                        {"headers": user.headers},
                    ),
                    "`GET /api/positions/{id}` with If-None-Match (304)": (
                        ours.pid,
                        f"{url}{polled}",
                        {"headers": {**user.headers, "If-None-Match": etag}},
                    ),
                },
            )
            get_rows += [_row(connections, label, r) for label, r in polls.items()]
            base, full, cached = polls.values()
            full_ratio = full.throughput / base.throughput
            cached_ratio = cached.throughput / base.throughput
            worst_200, worst_304 = min(worst_200, full_ratio), min(worst_304, cached_ratio)
            get_ratios.append(f"| {connections} | {cached_ratio:.2f} | {full_ratio:.2f} |")
    finally:
        ours.stop()
        minimal.stop()
    header = (
        "| connections | endpoint | req/s | p50 ms | p99 ms | p99/p50 | server CPU ms/req "
        "| not 2xx/3xx |"
    )
    return "\n".join(
        [
            "## API: `POST /api/positions` and polling, against a minimal app",
            "",
            f"Load generator: {found}, 2 threads, closed loop over keep-alive connections, "
            f"{seconds} s per run after a 2 s warm-up; each row is the median of {rounds} runs, "
            "the endpoints of a table taking turns run by run. The baseline is a separate minimal "
            "FastAPI app (`tests/benchmarks/minimal_app.py`: asyncpg and redis.asyncio, no "
            "project middleware, ORM or settings) served by the same command and uvicorn "
            "settings (`python -m service api --app …`, uvloop and httptools, one process). "
            "Its POST does one INSERT of a PENDING row and one LPUSH; its GET one primary-key "
            "SELECT. `POST /api/positions` comes from "
            f"{POST_USERS} users in turn (request by request), as a real API's do: it takes "
            "the user's rate token in Redis (budgets per user), checks the token (revocation "
            "and expiry included), reads the index and the market snapshot, checks the size "
            "against the exchange's filters, and in one transaction takes the user's admission "
            "lock and INSERTs the row with the credentials check and the count of the user's "
            "open positions, commits, and pushes the Celery task message. Polls take the "
            "user's rate token too. Before each run the positions the runs before it opened "
            "are ended (no worker consumes here; in production a user's open positions stay "
            "within their budget, which the accept statement counts). The polled position is "
            "an ACTIVE TOP10 basket (10 legs, 10 fills). "
            "Our hot paths' pool skips asyncpg's reset query on release and serves waiting "
            "requests in arrival order (`service/db.py`, `StatementPool`); the minimal app keeps "
            "asyncpg's defaults. A full 200 of a version already rendered is served from "
            "memory; the first poll after each change renders it through the ORM. "
            "Server CPU is the serving process's own CPU per request; no worker consumes "
            "the queue meanwhile.",
            "",
            header,
            "|---|---|---|---|---|---|---|---|",
            *post_rows,
            "",
            f"| connections | POST throughput vs minimal (goal >= {POST_GOAL}) "
            f"| our p99/p50 (goal <= {TAIL_GOAL:.0f}) | minimal p99/p50 |",
            "|---|---|---|---|",
            *post_ratios,
            "",
            f"Worst POST throughput ratio **{worst_post:.2f}** (goal {POST_GOAL}: "
            f"{_verdict(worst_post, POST_GOAL)}); worst p99/p50 **{worst_tail:.1f}** "
            f"(goal {TAIL_GOAL:.0f}: {_verdict(worst_tail, TAIL_GOAL, at_least=False)}).",
            "",
            "### Polling `GET /api/positions/{id}`",
            "",
            header,
            "|---|---|---|---|---|---|---|---|",
            *get_rows,
            "",
            f"| connections | 304 vs minimal (goal >= {NOT_MODIFIED_GOAL}) "
            f"| full 200 vs minimal (goal >= {FULL_GET_GOAL}) |",
            "|---|---|---|",
            *get_ratios,
            "",
            f"Worst 304 ratio **{worst_304:.2f}** (goal {NOT_MODIFIED_GOAL}: "
            f"{_verdict(worst_304, NOT_MODIFIED_GOAL)}); worst full-200 ratio "
            f"**{worst_200:.2f}** (goal {FULL_GET_GOAL}: {_verdict(worst_200, FULL_GET_GOAL)}).",
            "",
        ]
    )
