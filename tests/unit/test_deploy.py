"""The deployment files, validated with what runs here (no Docker engine, no cluster):
Kubernetes manifests against the Kubernetes JSON schemas, the compose file against our own
commands and settings."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.__main__ import _parser
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = {"keda.sh/v1alpha1"}  # custom resources: not in the Kubernetes schemas


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
