"""The deployment files, validated with what runs here (no Docker engine, no cluster):
Kubernetes manifests against the Kubernetes JSON schemas, the compose file against our own
commands and settings."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.__main__ import _parser
from service.config import Settings
from tests.support import k8s_container_env

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = {"keda.sh/v1alpha1"}  # custom resources: not in the Kubernetes schemas
APP_IMAGE = "synthetic-index-trader"


def _documents(path: Path) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_schemas(path: Path) -> None:
    for document in _documents(path):
        if document["apiVersion"] in CRDS:
            continue
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def _containers(document: dict[str, object]) -> list[dict[str, object]]:
    spec = document.get("spec", {})
    template = spec.get("template", {}) if isinstance(spec, dict) else {}
    pod = template.get("spec", {}) if isinstance(template, dict) else {}
    if not isinstance(pod, dict):
        return []
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def test_manifests_run_our_commands_with_probes() -> None:
    commands = _parser()
    kinds: dict[str, dict[str, object]] = {}
    for path in K8S.glob("*.yaml"):
        for document in _documents(path):
            kinds[f"{document['kind']}/{document['metadata']['name']}"] = document  # type: ignore[index]
            for container in _containers(document):
                if not str(container["image"]).startswith(APP_IMAGE + ":"):
                    continue  # Redis
                args = container["args"]
                commands.parse_known_args(args)  # a command of `python -m service`
    assert kinds["Deployment/trader-beat"]["spec"]["replicas"] == 1  # type: ignore[index]
    assert kinds["Deployment/trader-beat"]["spec"]["strategy"]["type"] == "Recreate"  # type: ignore[index]
    api = _containers(kinds["Deployment/trader-api"])[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"  # type: ignore[index]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"  # type: ignore[index]
    assert "HorizontalPodAutoscaler/trader-api" in kinds
    assert "Job/trader-migrate" in kinds
    worker = kinds["Deployment/trader-worker"]["spec"]["template"]["spec"]  # type: ignore[index]
    # Longer than one run's hard limit, so a stopping worker can finish its position.
    assert (
        worker["terminationGracePeriodSeconds"]
        > Settings.model_fields[  # type: ignore[index]
            "task_time_limit_seconds"
        ].default
    )


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    commands = _parser()
    settings_fields = {name.upper() for name in Settings.model_fields}
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            assert rule["condition"] in (
                "service_healthy",
                "service_completed_successfully",
                "service_started",
            )
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
        if service.get("image", "").startswith("synthetic-index-trader"):
            if "entrypoint" not in service:  # flower runs Celery's own command
                commands.parse_known_args(service["command"])
            for variable in service.get("environment", {}):
                assert variable in settings_fields, (name, variable)
    for long_running in ("postgres", "redis", "simulator", "api", "worker"):
        assert "healthcheck" in services[long_running], long_running
    # The API starts only after the migration (and the seed) finished.
    assert services["api"]["depends_on"]["seed"]["condition"] == "service_completed_successfully"
    assert services["seed"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def test_dockerfile_runs_as_non_root_from_one_image() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^USER \w+", text, re.MULTILINE)
    assert text.count("FROM ") == 2  # multi-stage
    assert 'ENTRYPOINT ["python", "-m", "service"]' in text


def test_the_stand_in_base_runs_the_python_the_dockerfile_names() -> None:
    """`scripts/dev image` builds python:X.Y-slim from Debian when no registry answers: the
    suite it uses must ship the X.Y the Dockerfile names (a Dockerfile moved to 3.12 must move
    the stand-in too, not build silently on 3.11)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "podman_stack", ROOT / "deploy" / "podman_stack.py"
    )
    assert spec is not None
    assert spec.loader is not None
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    assert stack.DEBIAN_PYTHON[stack.STANDIN_SUITE] == stack.dockerfile_python()
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert {line.split()[1] for line in text.splitlines() if line.startswith("FROM ")} == {
        f"python:{stack.dockerfile_python()}-slim"
    }


# --- Issue 22: pinned images, a broker with a password and no remote control, no superuser --


def _all_images() -> list[tuple[str, str]]:
    images = []
    for path in K8S.glob("*.yaml"):
        for document in _documents(path):
            images += [(path.name, str(c["image"])) for c in _containers(document)]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        images.append((f"compose:{name}", str(service.get("image", ""))))
    return images


def test_every_image_is_pinned() -> None:
    images = _all_images()
    assert len(images) > 10
    for where, image in images:
        name, _, tag = image.rpartition(":")
        assert name, (where, image)  # no untagged image (that is :latest)
        assert tag, (where, image)
        assert "/" not in tag, (where, image)  # a port, not a tag
        assert tag != "latest", (where, image)
        if not name.startswith(APP_IMAGE):
            # Third-party images to the minor version at least (postgres:15.10, redis:7.4.1).
            assert re.fullmatch(r"\d+\.\d+(\.\d+)?([-.][\w.]+)?", tag), (where, image)
    # The app's manifests all deploy one release.
    released = {i for where, i in images if i.startswith(APP_IMAGE) and where.endswith(".yaml")}
    assert len(released) == 1


def test_redis_requires_a_password_everywhere() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "--requirepass" in services["redis"]["command"]
    app_env = services["api"]["environment"]
    assert re.match(r"^rediss?://:\$\{REDIS_PASSWORD:\?", app_env["REDIS_URL"])
    # The healthcheck authenticates (a bare `redis-cli ping` would get NOAUTH).
    assert "REDISCLI_AUTH" in services["redis"]["environment"]

    kinds = {
        f"{d['kind']}/{d['metadata']['name']}": d
        for path in K8S.glob("*.yaml")
        for d in _documents(path)
    }
    redis = _containers(kinds["StatefulSet/redis"])[0]
    assert "--requirepass" in redis["args"]
    password = next(e for e in redis["env"] if e["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"]["name"] == "trader-redis"
    secrets = kinds["Secret/trader-secrets"]["stringData"]
    assert re.match(r"^rediss?://:[^@]+@", secrets["REDIS_URL"])
    # KEDA reads the queue's length with the password too.
    trigger = kinds["ScaledObject/trader-worker"]["spec"]["triggers"][0]
    authentication = kinds[f"TriggerAuthentication/{trigger['authenticationRef']['name']}"]
    assert authentication["spec"]["secretTargetRef"][0]["name"] == "trader-redis"


def test_no_probe_relies_on_celery_remote_control() -> None:
    """Remote control is off in the workers: a `celery inspect ping` probe would fail."""
    paths = [*K8S.glob("*.yaml"), ROOT / "docker-compose.yml"]
    for path in paths:
        lines = path.read_text().splitlines()
        text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
        assert "inspect ping" not in text
        assert "celery -A celery_app inspect" not in text
        assert "celery -A celery_app control" not in text


def test_workers_take_no_orders_over_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_app import app, create_celery_app
    from service import commands

    settings = Settings()
    assert create_celery_app(settings).conf.worker_enable_remote_control is False
    assert app.conf.worker_enable_remote_control is False
    assert app.conf.worker_send_task_events is False
    started: list[list[str]] = []
    monkeypatch.setattr(app, "start", lambda argv: started.append(list(argv)))
    monkeypatch.setattr(commands, "_prepare_worker_metrics", lambda: None)
    commands.worker(argparse.Namespace(command="worker", celery_args=[]))
    assert "--without-mingle" in started[0]
    # Gossip stays on: it is how a worker busy when Redis went away notices and reconnects.
    assert "--without-gossip" not in started[0]


def test_the_application_never_connects_as_the_database_superuser() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    user_of = {}
    for name, service in services.items():
        url = service.get("environment", {}).get("DATABASE_URL")
        if url:
            user_of[name] = url.split("://", 1)[1].split(":", 1)[0]
    assert user_of["migrate"] == "trader_owner"
    for name in ("api", "worker", "beat", "seed", "simulator", "flower"):
        assert user_of[name] == "trader_app", name
    init = "./deploy/postgres-init:/docker-entrypoint-initdb.d:ro"
    assert init in services["postgres"]["volumes"]
    assert (ROOT / "deploy" / "postgres-init" / "10-roles.sh").exists()

    secrets = {
        d["metadata"]["name"]: d.get("stringData", {})
        for d in _documents(K8S / "secret.example.yaml")
    }
    assert "trader_app:" in secrets["trader-secrets"]["DATABASE_URL"]
    assert "trader_owner:" in secrets["trader-db-owner"]["DATABASE_URL"]
    migrate = next(d for d in _documents(K8S / "migrate-job.yaml") if d["kind"] == "Job")
    owner_env = _containers(migrate)[0]["env"]  # the init container: migrate
    assert owner_env[0]["valueFrom"]["secretKeyRef"]["name"] == "trader-db-owner"
    seed = _containers(migrate)[1]
    assert "env" not in seed or all(e["name"] != "DATABASE_URL" for e in seed["env"])


def test_only_the_workers_hold_the_market_snapshot_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """MARKET_SNAPSHOT_KEY authenticates the snapshot the workers size orders with: the workers
    (who also write it) hold it; the API, Beat and the rest do not, in compose, in the
    manifests and in the dev stack."""
    from service.commands import _stack_env

    name = "MARKET_SNAPSHOT_KEY"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    holders = {
        s for s, service in compose["services"].items() if name in service.get("environment", {})
    }
    assert holders == {"worker"}

    given = {container for container, names in k8s_container_env().items() if name in names}
    assert given == {"trader-worker/worker"}

    monkeypatch.setenv(name, "0" * 64)
    for role in ("api", "beat", "simulator"):
        assert _stack_env(role)[name] == "", role
    assert _stack_env("worker")[name] == "0" * 64
    monkeypatch.setenv(name, "")
    assert Settings(_env_file=None).market_snapshot_key is None


def test_a_worker_refuses_a_guessable_market_snapshot_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A short key or the manifests' placeholder would let whoever writes to Redis sign a
    forged snapshot: a worker refuses to start with one, without printing it; without a key it
    starts (the legacy set-up) and warns."""
    from pydantic import SecretStr

    from service.commands import _snapshot_key_usable
    from service.config import Settings
    from service.logging import configure_logging

    configure_logging("json")
    for guessable in ("CHANGE-ME", "change-me", "x" * 31):
        settings = Settings.model_construct(market_snapshot_key=SecretStr(guessable))
        assert not _snapshot_key_usable(settings)
        out = capsys.readouterr().out
        assert "worker.market_snapshot_key_unusable" in out
        assert "x" * 31 not in out
    assert _snapshot_key_usable(Settings.model_construct(market_snapshot_key=SecretStr("k" * 32)))
    assert _snapshot_key_usable(Settings.model_construct(market_snapshot_key=None))
    assert "worker.market_snapshot_unauthenticated" in capsys.readouterr().out
