"""Secrets never reach a log line: under any variant of a secret's name (case, '-' or '_',
camelCase), at any depth of dicts, lists, tuples and (name, value) pairs, bound to our own
events or carried in the arguments of a logged exception, through structlog or the standard
library. A property test feeds them everywhere and reads the rendered JSON lines."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.logging import configure_logging, get_logger
from service.redaction import Redactor

BASE_NAMES = [
    "api_key",
    "api_secret",
    "api_secret_encrypted",
    "secret",
    "token",
    "access_token",
    "authorization",
    "signature",
    "x-bapi-sign",
    "x-bapi-api-key",
    "credentials_keys",
    "credentials_private_keys",
    "password",
    "private_key",
]


def _camel(name: str) -> str:
    first, *rest = re.split(r"[-_]", name)
    return first + "".join(part.capitalize() for part in rest)


VARIANTS = [
    str.lower,
    str.upper,
    str.title,
    _camel,
    lambda n: n.replace("_", "-"),
    lambda n: n.replace("-", "_"),
    lambda n: "-".join(p.capitalize() for p in re.split(r"[-_]", n)),  # X-Bapi-Api-Key
]

secret_names = st.builds(
    lambda base, variant: variant(base), st.sampled_from(BASE_NAMES), st.sampled_from(VARIANTS)
)
# Unmistakable values: no log line holds such a string by chance.
secrets = st.from_regex(r"\AZq[A-Za-z0-9]{14}\Z")
plain_keys = st.sampled_from(["data", "items", "detail", "payload", "context", "x"])


def _leaf(name: str, value: str, shape: str) -> Any:
    if shape == "pair":
        return (name, value)
    if shape == "bytes-pair":
        return (name.encode(), value.encode())
    return {name: value}


leaves = st.builds(_leaf, secret_names, secrets, st.sampled_from(["dict", "pair", "bytes-pair"]))
structures = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.dictionaries(plain_keys, children, min_size=1, max_size=3),
    ),
    max_leaves=8,
)


def _secrets_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secrets_in(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _secrets_in(v)]
    if isinstance(value, bytes):
        value = value.decode()
    return [value] if isinstance(value, str) and value.startswith("Zq") else []


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    """JSON logging set up on a fresh stdout; what was there before is put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            configure_logging("json", "INFO")
            yield out
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structure=structures, name=secret_names, top=secrets)
def test_no_secret_reaches_a_line_at_any_depth(structure: Any, name: str, top: str) -> None:
    hidden = [*_secrets_in(structure), top]
    with _captured() as out:
        log = get_logger("service.test")
        log.info("event", payload=structure, **{name: top})
        try:
            raise ValueError(structure)
        except ValueError:
            log.exception("failed", payload=structure)
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        log.bind(context=structure).warning("bound")
    rendered = out.getvalue()
    assert len(_lines(out)) == 4
    for secret in hidden:
        assert secret not in rendered, (secret, rendered)


def test_the_structure_is_kept_and_the_caller_s_objects_are_untouched(
    capsys: pytest.CaptureFixture[str],
) -> None:
    payload = {"leg": 1, "headers": [("X-BAPI-SIGN", "Zqsig"), ("Content-Type", "json")]}
    nested = {"credentials": {"apiKey": "Zqkey"}, "items": [{"Password": "Zqpw"}, 3]}
    with _captured() as out:
        get_logger("service.test").info(
            "e", payload=payload, nested=nested, tokens=5, token_id="t-1", apiSecret=None
        )
    [line] = _lines(out)
    assert line["payload"] == {
        "leg": 1,
        "headers": [["X-BAPI-SIGN", "[redacted]"], ["Content-Type", "json"]],
    }
    assert line["nested"] == {"credentials": "[redacted]", "items": [{"Password": "[redacted]"}, 3]}
    # A count under a token's name, an id and an absent value are no secrets.
    assert (line["tokens"], line["token_id"], line["apiSecret"]) == (5, "t-1", None)
    # The logged objects are the caller's: unchanged.
    assert payload["headers"] == [("X-BAPI-SIGN", "Zqsig"), ("Content-Type", "json")]
    assert nested["credentials"] == {"apiKey": "Zqkey"}
    assert sys.stdout is not out


def test_a_driver_s_refused_value_is_not_shown() -> None:
    text = (
        "sqlalchemy.exc.DBAPIError: (sqlalchemy.dialects.postgresql.asyncpg.Error) invalid "
        "input for query argument $1: 'Zqtokenhash0000' (expected str, got int)\n"
        "[SQL parameters hidden due to hide_parameters=True]\n"
        "asyncpg.exceptions.InvalidTextRepresentationError: invalid input syntax for type uuid: "
        '"Zqciphertext000"'
    )
    scrubbed = Redactor([]).scrub_text(text)
    assert "Zqtokenhash0000" not in scrubbed
    assert "Zqciphertext000" not in scrubbed
    assert "[SQL parameters hidden due to hide_parameters=True]" in scrubbed


@pytest.mark.parametrize(
    "name",
    ["event", "position_id", "status", "leg", "symbol", "error", "tokens_left", "order_link_id"],
)
def test_ordinary_names_are_not_secrets(name: str) -> None:
    redactor = Redactor([])
    assert redactor.is_secret_name(name) is ("token" in name)
    event = {name: "visible"}
    redactor.redact_mapping(event)
    assert event[name] == ("[redacted]" if "token" in name else "visible")
