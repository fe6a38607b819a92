"""Benchmarks (not part of the test command): `scripts/dev bench`.

Runs every benchmark in one go and rewrites docs/benchmarks.md with the machine, the command
and the figures, each against its goal.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks import (
    api_load,
    client_orders,
    egress,
    profiles,
    worker_overhead,
    worker_runs,
)
from tests.benchmarks.stack import bench_stack

ROOT = Path(__file__).resolve().parents[2]
MISSES = """## Goals this machine does not meet, and why

Each section above says `met` or `not met`; for the ones not met:

- **API against the minimal app (goals 0.6 for POST, 0.8 for a 304, 0.5 for a full 200;
  p99 at most 3x p50).** Met in the run above where it says so; what got there, measured
  with wrk (the earlier Python load generator and in-app baseline hid most of the cost):
  Celery's message built by us and pushed with redis.asyncio (kombu's publish in a thread
  was a third of the CPU); the token check, the credentials check and the INSERT in one
  autocommitted statement on a plain asyncpg pool (no ORM, no engine checkout); a poll as
  one statement (version joined to the live token), 304 or the body kept for that ETag;
  `gc.freeze()` after start-up (p99/p50 at 16 connections from 6-7 to under 2); no reset
  query on release (a round trip per request); FIFO turns for the pool (at 64 connections
  asyncpg's queue let some requests wait 25x the median). What remains is FastAPI's request
  handling and the task message (the profile above). On this shared 2-core machine a run's
  server CPU per request moves by up to 30 % from minute to minute for the same code; each
  row is therefore the median of runs taking turns with the baseline. A poll of a version not
  rendered yet (the first after each change) still renders through the ORM (several
  statements).
- **The API since the budgets per user (issue 22).** A POST now takes the user's rate token
  in Redis (one round trip) and runs its INSERT in a READ COMMITTED transaction that first
  takes the user's admission lock: BEGIN, the lock, the INSERT (with the count of the user's
  open positions), COMMIT, four round trips on a pool connection where one autocommitted
  statement did. That is the price of a count that stays strict under concurrency (a count
  inside one INSERT is not: two concurrent INSERTs each miss the other's row). A poll takes a
  rate token too. In the section above the POSTs come from 64 users in turn (one user's
  openings are admitted one at a time by design), and the positions a run opened are ended
  before the next (no worker consumes there). The first run after the budgets measured 0.14
  for POST: each user's count read every position the user ever opened (thousands, with no
  worker to end them), so a partial index of open positions and a count that stops at the
  budget were added (migration 0008). Quick runs before the full one (4 s, one round) gave
  0.42 to 0.45 for POST and 0.56 to 0.64 for a 304, with the minimal app itself twice as fast
  per request as in the runs before (0.35 ms of server CPU per POST where 0.72): our own
  CPU per POST went from 1.03 to 0.78 ms in the same comparison, per poll from 0.37 to 0.35.
  Not tried yet: the lock taken in the same round trip as BEGIN (a simple-query string), and
  a poll's rate token taken alongside its statement instead of before it.
- **Worker POST to ACTIVE against the floor (goal 1.1x), sequential.** Met: 1.049x in the
  run above (19:54 UTC, 2026-11-29, with the budgets' admission in its POST); 1.082x,
  1.102x, 1.065x and 1.100x in the four full runs before it that day, on machines of
  different speeds (the same client's order cost 0.34 ms in the
  morning's run and 1.9 ms in the afternoon's). What got there, each measured by the phase
  tables and the worker's CPU per basket (py-spy): the limiter's slot of each call taken
  while the call before it is in flight; a run's hot statements as plain asyncpg statements
  on its lock connection (eligibility, the account's holder, the key, the claim from
  PENDING, the plan, the fills, ACTIVE with its snapshot in one statement; the lock
  primitives and the ownership proof too, which also writes pre-flight's facts): through the
  ORM's unit of work each cost about ten times the statement's own CPU; our log events
  written by structlog straight to stdout (a third of a millisecond each through the
  standard library's handlers, some forty a basket); hiredis for redis-py's replies; the
  account memo read for every symbol at once and written in one Redis command per kind, and
  the key's account remembered a day; the pre-flight's reads sent before the claim (the
  symbols from the catalogue in memory), with the memo's reads travelling with them. The
  benchmark itself now polls for ACTIVE on one connection kept for the whole measurement:
  a new connection per basket had PostgreSQL fork a backend just as each run started, on
  the cores the run shares (about 4 ms of every basket's first statements, measured with
  timestamps in the worker). Left, in the phase table: about 0.5 to 1 ms per round trip over
  the floor's (the client's own work, the limiter and the audit lines on the one event
  loop), and the API and the Celery hand-off. Tried and dropped: uvloop in the worker (no
  change in the wall time of a basket, on both machines); the memo's writes left running
  while the orders go out (their CPU only moved into the proof's wait).
- **Batch POST to ACTIVE against its own floor (goal 1.1x).** Not met, by little: 1.102x in
  the run above (19:54 UTC, on a faster machine than the afternoon's); 1.227x and 1.284x in
  the two full runs before it, and quick runs of this section moved between 1.15x and 1.30x
  within the hour on the same code. In those turns the minimal program of the same shape (no
  locks, plan, checks, marks, retries or audit) measured 0.994x, and between 0.97x and 1.09x
  in the quick runs. The
  floor is three round trips, about 75 to 80 ms here, so 1.1x leaves 8 ms for everything
  the service does besides. Measured with timestamps at each step of a run (quick runs, not
  committed): the API about 3.5 ms from the POST to the task message pushed; Celery's
  hand-off from the push to the task's start in the pool process about 2.5 to 3 ms (a plain
  BRPOP is well under 1); the position's lock, eligibility, the account's lock, its holder
  and the key about 2 ms before the pre-flight's reads go out; the proof that marks every
  order submitted (with pre-flight's facts) and the batch's rate-limit slot about 1.5 ms;
  the ten fills' reads about 3 to 4 ms over their round trip (each read through the
  limiter, the retry wrapper and the parsing on the one loop), then the one statement that
  records them with ACTIVE and its snapshot, about 2 ms. Each of these is a step the
  exactly-once protocol or the user's stack (Celery) requires; together about 15 ms, some
  18 % of the floor on this 2-core machine, and the remaining candidates (the lock,
  eligibility, account, holder and key in fewer statements; the pre-flight's limiter slots
  taken ahead) are worth under a millisecond each. This session's changes for it: a
  complete batch's fills recorded in the statement that marks it ACTIVE; pre-flight's facts
  written by the proof; the batch's limiter slot taken while the proof runs; the memo
  written in one command per kind. Legging time, what the batch mode is for, is well within
  its goal (0.128x sequential).
- **Our client against pybit (goal 0.5x), when it misses.** Both clients send the same
  signed request to the same simulator; the simulator's own time is in both figures, and
  when pybit's figure drops between runs (a faster machine, a lighter moment) the ratio moves
  towards 1 although our client's per-order time has not changed. The median ratio is the
  steadier one.
"""
DEFAULTS = {
    "orders": 500,
    "tasks": 1000,
    "api_seconds": 8,
    "positions": 20,
    "scale": 40,
    "egress": 40,
}


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
    parser.add_argument("--orders", type=int, default=DEFAULTS["orders"])
    parser.add_argument("--tasks", type=int, default=DEFAULTS["tasks"])
    parser.add_argument("--api-seconds", type=int, default=DEFAULTS["api_seconds"])
    parser.add_argument("--positions", type=int, default=DEFAULTS["positions"])
    parser.add_argument("--scale", type=int, default=DEFAULTS["scale"])
    parser.add_argument("--memory", type=int, default=10_000)
    parser.add_argument("--egress", type=int, default=DEFAULTS["egress"])
    args = parser.parse_args()
    sections: list[str] = []

    def add(section: str) -> None:
        sections.append(section)
        print(section, flush=True)  # a section at a time: a long run shows its progress

    add(client_orders.run(orders=args.orders))
    # The benchmarks of our own costs run with an IP budget no benchmark reaches (the
    # simulator sets no IP limit there either); the egress section has Bybit's.
    unbounded = {"BYBIT_IP_LIMIT": "1000000"}
    with bench_stack(**unbounded) as stack:
        add(api_load.run(stack, seconds=args.api_seconds))
        add(profiles.profile_api(stack))
    with bench_stack(**unbounded) as stack:
        add(
            worker_runs.run(
                stack,
                latency_positions=args.positions,
                scale_positions=args.scale,
                memory_positions=args.memory,
            )
        )
        add(profiles.profile_worker(stack))
    with bench_stack() as stack:
        add(egress.run(stack, baskets=args.egress, workers=2))
    add(worker_overhead.run(tasks=args.tasks))
    options = " ".join(
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if DEFAULTS.get(name) != value
    )
    options = options.replace("--memory 10000", "").strip()
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            f"- Machine: {_machine()}",
            f"- Command: `scripts/dev bench{' ' + options if options else ''}` "
            "(`python -m tests.benchmarks`), every figure below from that one run",
            f"- Run: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Load: PostgreSQL, Redis, simulator, API, workers and load generator all share "
            f"the machine's {os.cpu_count()} cores",
            "",
            "Ratios are the result; absolute times depend on the machine and are context.",
            "",
            *sections,
            MISSES,
        ]
    )
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text(text + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
