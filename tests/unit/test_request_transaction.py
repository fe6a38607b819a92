"""The request scope owns the API's transaction (service.dependencies.get_session): no
endpoint commits by hand, so none can forget to."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_endpoint_commits() -> None:
    endpoints = [*ROOT.glob("service/*/endpoints.py"), ROOT / "service" / "api.py"]
    assert len(endpoints) >= 4
    for path in endpoints:
        assert ".commit(" not in path.read_text(), path
