"""Which logged values are secrets, and their removal: by the name they are logged under, at
any depth of dicts, lists and tuples, and in the text of a rendered exception.

A name is compared in a normal form: lower case, without '-' and '_' (so `api_secret`,
`apiSecret`, `API-SECRET` and `X-BAPI-API-KEY` are `apisecret`... `xbapiapikey`). It names a
secret if it is one of the given names, or holds a marker (`secret`, `token`, `password`,
`signature`, `privatekey`, `apikey`, `authorization`...), or starts with `credentials`; ids
(`token_id`) are not secrets. Under such a name, a number, a bool and None are kept (counts
such as a bucket's tokens), anything else becomes "[redacted]".

Logging is on the worker's hot path: a name's verdict is computed once and kept, only
containers are walked, and a container is copied only when something in it changes (the
logged objects are the caller's, never modified).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from dataclasses import is_dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

REDACTED = "[redacted]"

_MARKERS = (
    "secret",
    "token",
    "password",
    "passwd",
    "passphrase",
    "signature",
    "privatekey",
    "apikey",
    "authorization",
    "cookie",
    "ciphertext",
    "encrypted",
    "xbapisign",
)
_EXTRA_NAMES = ("sign", "auth", "bearer")
_PREFIXES = ("credentials",)
_NOT_SECRET_SUFFIXES = ("id", "ids")
_KEPT_TYPES = (bool, int, float, type(None))
_WALKED = (dict, list, tuple)
# What most values are: nothing to look into.
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, Decimal, UUID, datetime})
_VERDICTS_MAX = 4096  # names seen are few; a flood of made-up ones must not grow it forever

# In rendered text: `'name': value`, `'name', value` (reprs of a dict or of a (name, value)
# pair), `name=value`, `name: value` (a dataclass's repr, keyword arguments, a header line).
# The value: quoted (bytes too), bracketed (not nested), an auth scheme and its credential,
# or a bare word.
_TEXT_PAIR = re.compile(
    r"""(?:(?P<q>['"])(?P<qname>[A-Za-z][\w\-]*)(?P=q)\s*[:,=]\s*"""
    r"""|(?P<name>[A-Za-z][\w\-]*)\s*[:=]\s*)"""
    # The value in a lookahead: a pair whose name is no secret consumes only its name, and
    # what its value holds is looked at too.
    r"""(?=(?P<value>b?'[^'\n]*'|b?"[^"\n]*"|\[[^\]\n]*\]|\([^)\n]*\)|\{[^}\n]*\}"""
    r"""|(?:Bearer|Basic)\s+[^\s,;)}\]'"]+|[^\s,;)}\]'"]+))"""
)
# Database errors that quote a value: asyncpg's for one it could not encode ("invalid input
# for query argument $1: 'x' (...)"), PostgreSQL's for one it could not read ("invalid input
# syntax for type uuid: "x"", "invalid input value for enum ...: "x"").
_QUERY_ARGUMENT = re.compile(
    r"(invalid input for query argument \$\d+[^:\n]*: )[^\n]*"
    r"|(invalid input (?:syntax for type|value for enum) [^:\n]*: )\"[^\"\n]*\""
)


def normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


class Redactor:
    def __init__(self, names: Iterable[str]) -> None:
        self._names = frozenset(normalise(n) for n in (*names, *_EXTRA_NAMES))
        self._verdicts: dict[str, bool] = {}

    def is_secret_name(self, name: str) -> bool:
        verdict = self._verdicts.get(name)
        if verdict is None:
            verdict = self._judge(name)
            if len(self._verdicts) < _VERDICTS_MAX:
                self._verdicts[name] = verdict
        return verdict

    def _judge(self, name: str) -> bool:
        if not isinstance(name, str):
            return False
        plain = normalise(name)
        if plain in self._names:
            return True
        if plain.endswith(_NOT_SECRET_SUFFIXES):
            return False
        return plain.startswith(_PREFIXES) or any(marker in plain for marker in _MARKERS)

    def redact_mapping(self, event: MutableMapping[str, Any]) -> None:
        """The event's own dict, changed in place (structlog's, made for this line). Once per
        log line: the common case (a known harmless name, a plain value) is two lookups."""
        verdicts = self._verdicts
        for key, value in event.items():
            secret = verdicts.get(key)
            if secret is None:
                secret = self.is_secret_name(key)
            if secret:
                if not isinstance(value, _KEPT_TYPES):
                    event[key] = REDACTED
            elif type(value) not in _PLAIN:
                new = self._nested(value)
                if new is not value:
                    event[key] = new

    def _value(self, key: str, value: Any) -> Any:
        if self.is_secret_name(key):
            return value if isinstance(value, _KEPT_TYPES) else REDACTED
        return self._nested(value)

    def _nested(self, value: Any) -> Any:
        kind = type(value)
        if kind in _PLAIN:
            return value
        if kind in _WALKED:
            if kind is dict:
                return self._dict(value)
            return self._sequence(value)
        if isinstance(value, BaseException) or (
            is_dataclass(value) and not isinstance(value, type)
        ):
            # Rendered through repr: its arguments or fields would show as `name='value'`.
            text = repr(value)
            scrubbed = self.scrub_text(text)
            return value if scrubbed == text else scrubbed
        return value

    def _dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            new = self._value(key, item) if isinstance(key, str) else self._nested(item)
            if new is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        return value if changed is None else changed

    def _sequence(self, value: list[Any] | tuple[Any, ...]) -> list[Any] | tuple[Any, ...]:
        if type(value) is tuple and len(value) == 2 and isinstance(value[0], str | bytes):
            # A (name, value) pair: headers as ASGI, httpx or aiohttp list them.
            name = value[0] if isinstance(value[0], str) else value[0].decode("latin-1")
            if self.is_secret_name(name):
                kept = isinstance(value[1], _KEPT_TYPES)
                return value if kept else (value[0], REDACTED)
        items = [self._nested(item) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return items if isinstance(value, list) else tuple(items)

    def scrub_text(self, text: str) -> str:
        """Secrets in free text where a name says what they are (rendered exceptions)."""
        text = _QUERY_ARGUMENT.sub(lambda m: (m[1] or m[2]) + REDACTED, text)

        parts: list[str] = []
        done = 0  # text before this is in `parts`
        for match in _TEXT_PAIR.finditer(text):
            if match.start() < done or not self.is_secret_name(match["qname"] or match["name"]):
                continue
            parts += (text[done : match.end()], REDACTED)
            done = match.end("value")
        if not parts:
            return text
        parts.append(text[done:])
        return "".join(parts)
