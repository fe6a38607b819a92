"""Build the image from deploy/Dockerfile and run docker-compose.yml for real, with podman
(`scripts/dev image`; not part of the test command).

On a machine of this kind (Debian, root, no Docker engine): installs podman, podman-compose,
runc and debootstrap from Debian's packages when missing; pulls the base images where a
registry answers, and otherwise builds stand-ins from Debian's own packages
(deploy/standin/) and says so; builds the app image; starts the compose file's services in
the order its `depends_on` conditions give, waiting for each condition (podman runs no
health checks by itself without systemd, so they are run here); then proves the stack:
`/readyz`, a demo trade ACTIVE, both `/metrics`, no process running as root, a stop of the
worker while it executes a basket ending with the basket finished; and removes everything.

podman runs with the runc runtime (crun refuses this kernel's hybrid cgroup layout) and
ulimits inside the machine's hard limits, through a containers.conf of its own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".dev" / "image"
STANDIN = Path(__file__).resolve().parent / "standin"
PROJECT = "trader-image-check"
APP_IMAGE = "synthetic-index-trader:dev"
# The Debian suite the stand-ins are made from, and the Python each suite ships: the stand-in
# for python:X.Y-slim must run X.Y (tests/unit/test_deploy.py; the built image is checked too).
STANDIN_SUITE = "bookworm"
DEBIAN_PYTHON = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""
PIP_MOUNTS = ("/etc/pip.conf", "/etc/xdg/pip", "/etc/ssl/certs")


def say(message: str) -> None:
    print(f"[image] {message}", flush=True)


def run(*args: str, check: bool = True, timeout: float = 900, **kwargs: Any) -> str:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def ensure_packages() -> None:
    missing = [
        tool
        for tool in ("podman", "podman-compose", "runc", "debootstrap")
        if not shutil.which(tool)
    ]
    if not missing:
        return
    say(f"installing {' '.join(missing)} from Debian's packages")
    run(
        "apt-get",
        "install",
        "-y",
        "-q",
        *missing,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0


def pull(name: str) -> bool:
    done = subprocess.run(
        ["podman", "pull", "-q", name], capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode == 0


# The stand-ins' two bases from Debian's packages: Python alone (the app's base, kept small)
# and the servers (PostgreSQL, Redis).
STANDIN_BASES = {
    "localhost/trader-standin-python:" + STANDIN_SUITE: "python3,python3-venv,ca-certificates",
    "localhost/trader-standin-services:" + STANDIN_SUITE: "postgresql,redis-server",
}


def standin_base(name: str) -> None:
    if image_exists(name):
        return
    rootfs = WORK / ("rootfs-" + name.rsplit("/", 1)[1].replace(":", "-"))
    if not (rootfs / "etc" / "debian_version").exists():
        say(f"building the stand-in base {name}: debootstrap {STANDIN_SUITE} (about a minute)")
        shutil.rmtree(rootfs, ignore_errors=True)
        run(
            *("debootstrap", "--variant=minbase", f"--include={STANDIN_BASES[name]}"),
            *(STANDIN_SUITE, str(rootfs)),
            timeout=1200,
        )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run("podman", "import", "-", name, stdin=tar.stdout)
    tar.wait()


COMPOSE_PASSWORDS = (
    "POSTGRES_PASSWORD",
    "TRADER_OWNER_PASSWORD",
    "TRADER_APP_PASSWORD",
    "REDIS_PASSWORD",
)


def credentials_key_pair() -> dict[str, str]:
    """CREDENTIALS_PRIVATE_KEYS and CREDENTIALS_PUBLIC_KEY from `python -m service credentials
    keygen`."""
    printed = run(sys.executable, "-m", "service", "credentials", "keygen", cwd=ROOT)
    pairs = (line.split("=", 1) for line in printed.splitlines() if "=" in line)
    keys = {name.strip(): value.strip() for name, value in pairs if not name.startswith("#")}
    if set(keys) != {"CREDENTIALS_PRIVATE_KEYS", "CREDENTIALS_PUBLIC_KEY"}:
        raise SystemExit(f"`credentials keygen` printed {sorted(keys)}, not a key pair")
    return keys


def compose_image(service: str) -> str:
    """The image docker-compose.yml pins for `service` (a stand-in is built under that name
    when no registry answers)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return str(compose["services"][service]["image"])


def ensure_base(name: str, containerfile: str) -> str:
    """The image `name` from a registry, or the stand-in built under that name."""
    if image_exists(name):
        return f"{name}: already here"
    if pull(name):
        return f"{name}: pulled"
    base = re.search(r"^FROM (\S+)", (STANDIN / containerfile).read_text(), re.M)
    assert base is not None
    standin_base(base.group(1))
    run("podman", "build", "-q", "-t", name, "-f", str(STANDIN / containerfile), str(STANDIN))
    return f"{name}: no registry answered; built a stand-in from Debian {STANDIN_SUITE}"


def dockerfile_python() -> str:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    match = re.search(r"^FROM python:(\d+\.\d+)", text, re.M)
    if not match:
        raise SystemExit("deploy/Dockerfile does not start FROM python:X.Y")
    return match.group(1)


def build_app() -> int:
    mounts = [
        arg for path in PIP_MOUNTS if Path(path).exists() for arg in ("-v", f"{path}:{path}:ro")
    ]
    say("building the app image from deploy/Dockerfile")
    run(
        "podman",
        "build",
        "-q",
        *mounts,
        "-t",
        APP_IMAGE,
        "-f",
        "deploy/Dockerfile",
        ".",
        cwd=ROOT,
        timeout=1800,
    )
    size = json.loads(run("podman", "image", "inspect", APP_IMAGE))[0]["Size"]
    python = run(
        "podman",
        "run",
        "--rm",
        "--entrypoint",
        "python",
        APP_IMAGE,
        "-c",
        "import sys; print('%d.%d' % sys.version_info[:2])",
    ).strip()
    if python != dockerfile_python():
        raise SystemExit(
            f"the image runs Python {python}, the Dockerfile names {dockerfile_python()}"
        )
    return int(size)


class Compose:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.file = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        self.services: dict[str, Any] = self.file["services"]

    def cmd(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return run(
            "podman-compose",
            "-p",
            PROJECT,
            "-f",
            str(ROOT / "docker-compose.yml"),
            *args,
            check=check,
            timeout=timeout,
            cwd=ROOT,
            env=self.env,
        )

    def container(self, service: str) -> str:
        return f"{PROJECT}_{service}_1"

    def order(self) -> list[str]:
        done: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            for dependency in self.services[name].get("depends_on", {}):
                visit(dependency)
            done.append(name)

        for name in self.services:
            visit(name)
        return done

    def wait_for(self, service: str, condition: str, timeout: float = 180) -> None:
        name = self.container(service)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = json.loads(run("podman", "inspect", name))[0]["State"]
            if condition == "service_completed_successfully":
                if state["Status"] == "exited":
                    if state["ExitCode"] != 0:
                        logs = run("podman", "logs", name, check=False)
                        raise SystemExit(
                            f"{service} exited with {state['ExitCode']}:\n{logs[-3000:]}"
                        )
                    return
            elif condition == "service_healthy":
                if self.healthy(service):
                    return
            else:  # service_started
                if state["Status"] == "running":
                    return
            time.sleep(1)
        raise SystemExit(f"{service} did not become {condition} in {timeout:.0f} s")

    def stop(self, service: str) -> None:
        """Stop with the service's `stop_grace_period`, which podman-compose 1.0 ignores (its
        `stop` uses podman's 10 s, its `down` 1 s: a running basket would be killed)."""
        grace = duration_seconds(str(self.services[service].get("stop_grace_period", "10s")))
        run(
            *("podman", "stop", "-t", str(int(grace)), self.container(service)),
            check=False,  # gone already, or never started: nothing to stop
            timeout=grace + 60,
        )

    def healthy(self, service: str) -> bool:
        """The service's own health check from the compose file, run in its container (podman
        runs none by itself without systemd, and podman-compose 1.0 garbles CMD checks)."""
        check = self.services[service]["healthcheck"]["test"]
        if check[0] == "CMD-SHELL":
            command = ["sh", "-c", check[1].replace("$$", "$")]
        else:
            command = [part.replace("$$", "$") for part in check[1:]]
        done = subprocess.run(
            ["podman", "exec", self.container(service), *command],
            capture_output=True,
            timeout=60,
            check=False,
        )
        return done.returncode == 0

    def up(self) -> None:
        for service in self.order():
            for dependency, spec in self.services[service].get("depends_on", {}).items():
                condition = (
                    spec.get("condition", "service_started")
                    if isinstance(spec, dict)
                    else "service_started"
                )
                self.wait_for(dependency, condition)
            say(f"starting {service}")
            self.cmd("up", "-d", "--no-deps", "--no-build", service)
        for service, spec in self.services.items():
            if "healthcheck" in spec and spec.get("restart") != "no":
                self.wait_for(service, "service_healthy", timeout=240)
                say(f"{service} healthy")


def duration_seconds(text: str) -> float:
    """A compose duration: "330s", "1m30s", "2h", "1.5s"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"([\d.]+)(h|ms|us|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise SystemExit(f"not a compose duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def http(url: str, timeout: float = 5) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return response.status, response.read().decode()


def prove(compose: Compose) -> list[str]:
    proofs = []
    status, body = http("http://127.0.0.1:8000/readyz")
    proofs.append(f"/readyz through the API container: {status} {body}")
    demo = compose.cmd(
        "run", "--rm", "--no-deps", "api", "demo", "--api-url", "http://api:8000", timeout=300
    )
    if "status: ACTIVE" not in demo:
        raise SystemExit(f"the demo did not reach ACTIVE:\n{demo}")
    proofs.append("demo trade through the containers: ACTIVE")
    # The API's /metrics is not on its public port, only on its own (API_METRICS_PORT, on the
    # container's loopback in compose): scraped from inside, as the worker's.
    try:
        status, _ = http("http://127.0.0.1:8000/metrics")
    except urllib.error.HTTPError as error:
        status = error.code
    if status != 404:
        raise SystemExit(f"the API's public port answered /metrics with {status}, not 404")

    def scrape(port: int) -> str:
        return (
            "import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
        )

    api_metrics = run("podman", "exec", compose.container("api"), "python", "-c", scrape(9807))
    if "trader_positions" not in api_metrics:
        raise SystemExit(f"the API's /metrics holds no positions:\n{api_metrics[:500]}")
    worker_metrics = run(
        "podman", "exec", compose.container("worker"), "python", "-c", scrape(9808)
    )
    if "trader_" not in worker_metrics:
        raise SystemExit(f"the worker's /metrics holds none of ours:\n{worker_metrics[:500]}")
    proofs.append("API /metrics (own port; 404 on the public one) and worker /metrics scraped")
    for service in compose.services:
        name = compose.container(service)
        state = json.loads(run("podman", "inspect", name))[0]["State"]
        if state["Status"] != "running":
            continue
        users = run("podman", "top", name, "user").split()[1:]
        if "root" in users:
            raise SystemExit(f"{service} runs a process as root: {users}")
    proofs.append("no process in any container runs as root (app containers as trader)")
    return proofs


def stop_worker_mid_basket(compose: Compose) -> str:
    # Slow exchange answers: the basket takes longer than podman's default 10 s stop timeout,
    # so it finishes only if the compose file's grace period is honoured.
    request = urllib.request.Request(
        "http://127.0.0.1:8999/sim/config",
        data=json.dumps({"latency_ms": 800}).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).close()  # noqa: S310 - loopback
    demo = subprocess.Popen(
        [
            "podman-compose",
            "-p",
            PROJECT,
            "-f",
            str(ROOT / "docker-compose.yml"),
            "run",
            "--rm",
            "--no-deps",
            "api",
            "demo",
            "--api-url",
            "http://api:8000",
            "--index",
            "TOP10",
            "--size",
            "20000",
            "--timeout",
            "300",
        ],
        cwd=ROOT,
        env=compose.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    lines: list[str] = []
    for line in demo.stdout:
        lines.append(line)
        if "status: EXECUTING" in line:
            break
    started = time.monotonic()
    grace = compose.services["worker"].get("stop_grace_period", "10s")
    say(f"stopping the worker mid-basket (grace period {grace})")
    compose.stop("worker")
    stopped_after = time.monotonic() - started
    exit_code = json.loads(run("podman", "inspect", compose.container("worker")))[0]["State"][
        "ExitCode"
    ]
    if exit_code != 0:
        raise SystemExit(f"the worker did not shut down warmly: exit code {exit_code}")
    rest, _ = demo.communicate(timeout=300)
    lines.append(rest)
    output = "".join(lines)
    if "status: ACTIVE" not in output:
        raise SystemExit(f"the basket did not finish after the worker's stop:\n{output}")
    return (
        f"worker stopped (exit 0) {stopped_after:.1f} s after the basket began executing, "
        "once the basket had finished: ACTIVE"
    )


def down(compose: Compose) -> None:
    ids = run("podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", "-q")
    volumes = {
        mount["Name"]
        for container in (json.loads(run("podman", "inspect", *ids.split())) if ids.strip() else [])
        for mount in container.get("Mounts", [])
        if mount.get("Type") == "volume"
    }
    running = run("podman", "ps", "--filter", f"label=io.podman.compose.project={PROJECT}", "-q")
    if running.strip():
        for service in reversed(compose.order()):  # each with its own grace period
            compose.stop(service)
    compose.cmd("down", "-v", check=False, timeout=600)
    left = run("podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", "-q")
    if left.strip():
        run("podman", "rm", "-f", "-v", *left.split(), check=False)  # -v: anonymous volumes
    for network in run("podman", "network", "ls", "--format", "{{.Name}}").split():
        if network.startswith(PROJECT):
            run("podman", "network", "rm", "-f", network, check=False)
    for volume in run("podman", "volume", "ls", "--format", "{{.Name}}").split():
        if volume.startswith(PROJECT) or volume in volumes:  # named, and the images' anonymous
            run("podman", "volume", "rm", "-f", volume, check=False)


def main() -> int:
    # A SIGTERM (or the command's timeout) still removes the stack (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        raise SystemExit("scripts/dev image runs podman as root (rootful) on these machines")
    WORK.mkdir(parents=True, exist_ok=True)
    conf = WORK / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)
    ensure_packages()
    if DEBIAN_PYTHON[STANDIN_SUITE] != dockerfile_python():
        raise SystemExit(
            f"the Dockerfile names Python {dockerfile_python()}; the stand-in suite "
            f"{STANDIN_SUITE} ships {DEBIAN_PYTHON[STANDIN_SUITE]}: change STANDIN_SUITE"
        )
    began = time.monotonic()
    bases = [
        ensure_base(f"python:{dockerfile_python()}-slim", "python.Containerfile"),
        ensure_base(compose_image("postgres"), "postgres.Containerfile"),
        ensure_base(compose_image("redis"), "redis.Containerfile"),
    ]
    for line in bases:
        say(line)
    size = build_app()
    say(f"app image {APP_IMAGE}: {size / 1e6:.0f} MB")
    # The credentials key pair, new each run, from the command an operator uses (KEY=VALUE
    # lines): docker-compose.yml gives the public key to the API, the private one to the worker.
    env = {**os.environ, **credentials_key_pair()}
    # The passwords docker-compose.yml requires (the database's roles, Redis), new each run.
    env.update({name: secrets.token_hex(16) for name in COMPOSE_PASSWORDS})
    # The worker's market snapshot key (docker-compose.yml requires it), new each run.
    env["MARKET_SNAPSHOT_KEY"] = secrets.token_hex(32)
    compose = Compose(env)
    down(compose)  # whatever an interrupted earlier run left
    started = time.monotonic()
    try:
        compose.up()
        ready_after = time.monotonic() - started
        say(
            f"stack ready {ready_after:.1f} s after the first container started "
            f"({time.monotonic() - began:.0f} s with the images)"
        )
        for proof in prove(compose):
            say(proof)
        say(stop_worker_mid_basket(compose))
    finally:
        down(compose)
    left = run("podman", "ps", "-a", "-q").strip()
    say("stack removed; nothing left running" if not left else f"containers left: {left}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
