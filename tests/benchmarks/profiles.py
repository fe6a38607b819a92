"""Where the API's CPU goes under POST load: py-spy samples the API process (only threads
holding the GIL, i.e. on CPU) while the load generator runs, and the samples are grouped by
the frames they pass through."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.api_load import BODY, load
from tests.benchmarks.stack import Stack

# (label, frame substrings): a sample counts for the first group one of its frames matches.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Celery publish (kombu, in a worker thread)", ("Celery.send_task",)),
    ("token check (SELECT user by token hash)", ("authenticate (service/users",)),
    ("INSERT of the position (with the credentials check)", ("add_position (service/",)),
    ("size check against the exchange filters", ("check_tradeable (service/",)),
    ("session open, commit and close (BEGIN/COMMIT)", ("get_session (", "Session.commit (")),
    ("request parsing and validation, routing, response", ("fastapi/", "starlette/")),
    ("event loop and sockets (uvloop, httptools: C code)", ("Runner.run (",)),
)


def _group(stack: list[str]) -> str:
    # The order of GROUPS decides: a statement inside authenticate counts for the token check.
    for label, needles in GROUPS:
        if any(needle in frame for frame in stack for needle in needles):
            return label
    return "other"


def profile_api(stack: Stack, *, seconds: int = 10) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return "## Profile\n\npy-spy is not installed (`pip install -e '.[bench]'`).\n"
    user = stack.new_user()
    api, url = stack.start_api()
    out = Path(tempfile.mkdtemp(prefix="trader-profile-")) / "api.txt"
    try:
        recorder = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(api.pid), "--duration", str(seconds), "--gil"),
                *("--rate", "250", "--format", "raw", "-o", str(out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # py-spy attached
        deadline = time.monotonic() + seconds - 1
        while time.monotonic() < deadline:
            load(
                api.pid,
                f"{url}/api/positions",
                method="POST",
                concurrency=8,
                requests=300,
                headers=user.headers,
                body=BODY,
            )
        recorder.wait(timeout=seconds + 30)
        counts: dict[str, int] = {}
        total = 0
        for line in out.read_text().splitlines():
            frames, _, n = line.rpartition(" ")
            label = _group(frames.split(";"))
            counts[label] = counts.get(label, 0) + int(n)
            total += int(n)
    finally:
        api.stop()
        shutil.rmtree(out.parent, ignore_errors=True)
    rows = [
        f"| {label} | {count / total:.0%} |"
        for label, count in sorted(counts.items(), key=lambda item: -item[1])
    ]
    return "\n".join(
        [
            "### Profile: where a POST's CPU goes",
            "",
            f"py-spy ({seconds} s, 250 Hz, `--gil`: only samples on the CPU) on the API "
            "process under `POST /api/positions` with 8 clients. Each sample counts for the "
            "first group (in this order) one of its frames belongs to.",
            "",
            "| group | share of CPU samples |",
            "|---|---|",
            *rows,
            "",
            f"{total} samples.",
            "",
        ]
    )
