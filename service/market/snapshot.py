"""The market snapshot shared through Redis: instrument filters and reference prices for
every catalogue symbol, written by a Beat job (`service.market.refresh`), read by the API to
refuse untradeable sizes without waiting on the exchange, and by the workers to plan without
a call per symbol. A missing or stale snapshot is an error, never a guess.

The API's side of the market: it imports no exchange client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
import structlog
from pydantic import SecretStr
from redis.exceptions import RedisError

from service.bybit.types import Instrument

CACHE_KEY = "trader:market:v1"
# Beside a snapshot, under its key plus this, the HMAC-SHA256 (hex) of its exact stored bytes
# with MARKET_SNAPSHOT_KEY: written with it in one transaction, with the same expiry.
MAC_SUFFIX = ":mac"
# How far ahead of this host's clock a snapshot's fetched_at may be (the refreshing worker's
# clock against this one's); further ahead, it is refused as if absent.
CLOCK_SKEW_SECONDS = 5.0
# The magnitudes and digits a stored decimal may have (prices, marks, steps, limits): far
# beyond anything Bybit quotes (1e-8 .. 1e9, a dozen digits), far inside what sizing's
# 50-digit arithmetic can carry. Outside them, the snapshot is refused as if absent.
MAX_ADJUSTED_EXPONENT = 30
MAX_DIGITS = 30

logger = structlog.stdlib.get_logger("service.market")


@dataclass(frozen=True, slots=True)
class MarketSnapshot:
    instruments: dict[str, Instrument]
    prices: dict[str, Decimal]
    fetched_at: float  # epoch seconds
    # Mark prices (what positions are valued at); a snapshot written before they were kept
    # (a rolling deploy) has none, and positions show no value until the next refresh.
    marks: dict[str, Decimal] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "fetched_at": self.fetched_at,
                "prices": {s: str(p) for s, p in self.prices.items()},
                "marks": {s: str(p) for s, p in self.marks.items()},
                "instruments": {
                    s: {k: str(v) for k, v in asdict(i).items()}
                    for s, i in self.instruments.items()
                },
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> MarketSnapshot:
        """Parse and check a stored snapshot: SnapshotError (a ValueError) for anything that
        is not one the refresh job could have written (a missing field, a price that is not
        a positive finite decimal, a step of zero...). The broker is not trusted with it:
        whoever can write to Redis could have written it."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise SnapshotError("not an object")
        instruments = {
            symbol: _instrument(symbol, item) for symbol, item in _mapping(data, "instruments")
        }
        prices = {s: _decimal(p, f"price of {s}", zero=False) for s, p in _mapping(data, "prices")}
        marks = {
            s: _decimal(p, f"mark of {s}", zero=False)
            for s, p in _mapping(data, "marks", required=False)
        }
        fetched_at = data.get("fetched_at")
        if (
            isinstance(fetched_at, bool)
            or not isinstance(fetched_at, int | float)
            or not math.isfinite(fetched_at)
            or fetched_at <= 0
        ):
            raise SnapshotError("fetched_at is not a time")
        return cls(
            instruments=instruments, prices=prices, fetched_at=float(fetched_at), marks=marks
        )


class SnapshotError(ValueError):
    """A stored snapshot that cannot be one the refresh job wrote: refused as if absent."""


def _mapping(data: dict[str, Any], name: str, *, required: bool = True) -> list[tuple[str, Any]]:
    value = data.get(name, None if required else {})
    if not isinstance(value, dict):
        raise SnapshotError(f"{name} is missing or not an object")
    if not all(isinstance(key, str) for key in value):
        raise SnapshotError(f"{name} has a key that is not a symbol")
    return list(value.items())


def _decimal(value: object, what: str, *, zero: bool = True) -> Decimal:
    """A finite decimal written as a string (as `to_json` writes them), not negative, not
    zero unless `zero`, and within MAX_ADJUSTED_EXPONENT and MAX_DIGITS."""
    if not isinstance(value, str) or len(value) > 64:
        raise SnapshotError(f"{what} is not a decimal string")
    try:
        number = Decimal(value)
    except ArithmeticError:
        raise SnapshotError(f"{what} is not a decimal") from None
    if not number.is_finite() or number < 0 or (not zero and number == 0):
        raise SnapshotError(f"{what} is {value!r}: not a {'' if zero else 'positive '}number")
    # Sizing divides by prices and steps at a fixed precision: a value the exchange never
    # quotes ("1E-999999999", fifty zeros then a 1) overflows it, and every request would fail.
    if abs(number.adjusted()) > MAX_ADJUSTED_EXPONENT or len(number.as_tuple().digits) > MAX_DIGITS:
        raise SnapshotError(f"{what} is {value[:40]!r}: out of the range the exchange quotes")
    return number


def _instrument(symbol: str, item: object) -> Instrument:
    if not isinstance(item, dict) or item.get("symbol") != symbol:
        raise SnapshotError(f"instrument {symbol} is not an instrument of that symbol")
    status = item.get("status")
    if not isinstance(status, str):
        raise SnapshotError(f"instrument {symbol} has no status")

    def field_(name: str, *, zero: bool = True, default: str | None = None) -> Decimal:
        value = item.get(name, default)
        return _decimal(value, f"{name} of {symbol}", zero=zero)

    max_mkt = field_("max_mkt_order_qty")
    return Instrument(
        symbol=symbol,
        status=status,
        # Sizes are rounded down to this step (a division): never zero.
        qty_step=field_("qty_step", zero=False),
        min_order_qty=field_("min_order_qty"),
        # A snapshot written before these two were kept (a rolling deploy) lacks them;
        # nothing that reads a snapshot uses them.
        max_order_qty=field_("max_order_qty", default=str(max_mkt)),
        max_mkt_order_qty=max_mkt,
        min_notional_value=field_("min_notional_value"),
        tick_size=field_("tick_size", default="0"),
    )


class MarketCache:
    """Redis-backed, with the last good snapshot kept in memory: re-read from Redis at most
    every `reuse_seconds`, and still served (while younger than `max_age_seconds`) when
    Redis cannot be reached, so a broker outage does not stop the API from sizing.

    With a `secret` (MARKET_SNAPSHOT_KEY, held by the workers only), `store` writes the
    snapshot's MAC beside it and `load` refuses, as if absent, a snapshot whose MAC is missing
    or wrong: the broker is not trusted, and a believable but false price (that the parser
    cannot tell from a real one) would size real orders. Without one, every snapshot the
    parser accepts is served (the API's cache, and workers where the setting is unset)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_age_seconds: float,
        reuse_seconds: float = 2.0,
        key: str = CACHE_KEY,
        secret: SecretStr | None = None,
    ) -> None:
        self._redis = redis
        self._max_age = max_age_seconds
        self._reuse = reuse_seconds
        self._key = key
        self._mac_key = key + MAC_SUFFIX
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._last: MarketSnapshot | None = None
        self._last_read = 0.0
        self._refused: bytes | str | None = None
        self._unauthenticated: bytes | str | None = None

    @staticmethod
    def _mac(secret: bytes, payload: bytes) -> bytes:
        return hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()

    async def store(self, snapshot: MarketSnapshot) -> None:
        # Expires by itself: a dead refresher leaves no data to be mistaken for fresh.
        payload = snapshot.to_json().encode()
        expiry = int(self._max_age) + 1
        if self._secret is None:
            await self._redis.set(self._key, payload, ex=expiry)
        else:
            # One transaction: a reader never sees a new snapshot with the old one's MAC (it
            # would be refused until the next refresh), and both expire together.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key, payload, ex=expiry)
                pipe.set(self._mac_key, self._mac(self._secret, payload), ex=expiry)
                await pipe.execute()
        self.remember(snapshot)

    def remember(self, snapshot: MarketSnapshot) -> None:
        """Serve `snapshot` from memory: only one this process made, or loaded and accepted."""
        self._last, self._last_read = snapshot, time.monotonic()

    def _fresh(self, snapshot: MarketSnapshot | None) -> MarketSnapshot | None:
        if snapshot is None or time.time() - snapshot.fetched_at > self._max_age:
            return None
        return snapshot

    def _authentic(self, raw: bytes | str, mac: bytes | str | None) -> bool:
        """True without a secret; with one, when `mac` is the MAC of `raw` (else logged once
        per stored value, not once per request)."""
        if self._secret is None:
            return True
        payload = raw.encode() if isinstance(raw, str) else raw
        given = mac.encode() if isinstance(mac, str) else mac
        if given is not None and hmac.compare_digest(given, self._mac(self._secret, payload)):
            return True
        if raw != self._unauthenticated:
            self._unauthenticated = raw
            logger.warning(
                "market.snapshot_unauthenticated",
                cache=self._key,
                reason="no MAC" if mac is None else "MAC does not match",
            )
        return False

    def _parse(self, raw: bytes | str) -> MarketSnapshot | None:
        """The snapshot stored in Redis, or None when it is refused: malformed, poisoned
        (see `MarketSnapshot.from_json`), or fetched in the future beyond the clock skew
        allowed (a forged one would otherwise pass for fresh until then)."""
        try:
            snapshot = MarketSnapshot.from_json(raw)
            ahead = snapshot.fetched_at - time.time()
            if ahead > CLOCK_SKEW_SECONDS:
                raise SnapshotError(f"fetched_at is {ahead:.0f} s in the future")
        except (ValueError, KeyError, TypeError, ArithmeticError) as error:
            if raw != self._refused:  # once per stored value, not once per request
                self._refused = raw
                logger.warning("market.snapshot_refused", cache=self._key, reason=str(error)[:200])
            return None
        return snapshot

    async def _read(self) -> tuple[bytes | str | None, bytes | str | None]:
        """The stored snapshot and its MAC, read in one command (never a MAC of another
        value); the MAC is not read without a secret."""
        if self._secret is None:
            return await self._redis.get(self._key), None
        raw, mac = await self._redis.mget([self._key, self._mac_key])
        return raw, mac

    async def load(self) -> MarketSnapshot | None:
        # What is in memory was made here or accepted by a load (MAC checked when there is a
        # secret): never a value read from Redis and refused.
        if self._last is not None and time.monotonic() - self._last_read < self._reuse:
            return self._fresh(self._last)
        try:
            raw, mac = await self._read()
        except RedisError:
            return self._fresh(self._last)
        if raw is None:
            # Gone from Redis: expired (then the copy in memory is too old as well), or
            # Redis restarted empty, when the copy in memory still serves until its max age.
            return self._fresh(self._last)
        snapshot = self._parse(raw) if self._authentic(raw, mac) else None
        if snapshot is None:
            # Refused as if absent: the last good copy serves until its max age, then none.
            return self._fresh(self._last)
        self.remember(snapshot)
        return self._fresh(snapshot)
