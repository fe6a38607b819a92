"""The one settings object: every process reads its configuration here and nowhere else."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# While `python -m service up` runs, the addresses of the servers it chose (embedded ones on
# free ports, service/devservices.py), so that any command run from the same directory (the
# demo, `users create`) reaches the same stack. Removed when the stack stops.
STACK_ENV_FILE = ".dev/stack.env"


class Settings(BaseSettings):
    """Environment variables of the contract (DESIGN.md), plus a few operational knobs.

    A `.env` file in the working directory is read too (the dev stack writes its generated
    credentials key pair there), and while the dev stack runs, its `STACK_ENV_FILE`; real
    environment variables win over `.env`, and `.env` over the stack's file.
    """

    model_config = SettingsConfigDict(
        env_file=(STACK_ENV_FILE, ".env"), extra="ignore", frozen=True
    )

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/trader"
    redis_url: str = "redis://127.0.0.1:6379/0"
    bybit_base_url: str = "http://127.0.0.1:8999"
    bybit_recv_window: int = Field(default=5000, gt=0, le=60000)
    # How long Bybit bans an address that breached its IP limit (HTTP 403, retCode 10018):
    # "at least 10 minutes". Every call from the address pauses that long.
    bybit_ip_ban_seconds: float = Field(default=600.0, gt=0)
    # Shared rate limits (service/rate_limits.py): the name of the address every process
    # calls Bybit from (processes behind one NAT share one name), Bybit's IP limit per 5 s,
    # and the share of that IP limit the service allows itself (an account's limits are used
    # whole: see service/rate_limits.py).
    bybit_egress_id: str = Field(default="default", min_length=1, max_length=64)
    bybit_ip_limit: int = Field(default=600, gt=0)
    bybit_limit_share: float = Field(default=0.9, gt=0, le=1)
    # Credentials at rest (service/security.py). The API seals a user's key with the public
    # key of a sealed box (CREDENTIALS_PUBLIC_KEY) and cannot open what it sealed; only the
    # workers hold the private keys (CREDENTIALS_PRIVATE_KEYS: comma-separated, the first is
    # current, all open: rotation). CREDENTIALS_KEYS (comma-separated Fernet keys, the contract's
    # original scheme) still opens rows sealed before the move, and where no public key is set
    # it still encrypts too (the original, symmetric set-up). Each process checks at start that
    # it holds what its job needs (the API a way to seal, a worker a way to open).
    credentials_keys: SecretStr | None = None
    credentials_public_key: str | None = None
    credentials_private_keys: SecretStr | None = None
    trade_retry_delays: Annotated[tuple[float, ...], NoDecode] = (60.0, 300.0, 900.0)
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"

    # Operational knobs (not part of the contract table, documented in the README).
    celery_queue: str = "trades"
    # A PENDING position older than this has probably lost its enqueue: Beat re-sends it.
    stale_pending_seconds: float = Field(default=30.0, gt=0)
    # An EXECUTING position whose run has not been seen for this long lost its worker.
    stale_executing_seconds: float = Field(default=60.0, gt=0)
    recovery_interval_seconds: float = Field(default=20.0, gt=0)
    # Beat refreshes the market snapshot the API validates sizes with; older is refused.
    market_refresh_seconds: float = Field(default=15.0, gt=0)
    market_max_age_seconds: float = Field(default=120.0, gt=0)
    # The workers' secret that authenticates the snapshot they size orders with (the broker
    # is not trusted): the refresh job stores an HMAC beside it, and a worker refuses one
    # without a valid HMAC (then asks the exchange). Unset: the snapshot is used unchecked
    # (legacy). The API and Beat need none.
    market_snapshot_key: SecretStr | None = None
    # Reconciliation of every position with legs on the exchange, changed since it was last
    # reconciled and within the window (Bybit keeps filled orders' history for 7 days).
    reconcile_interval_seconds: float = Field(default=300.0, gt=0)
    reconcile_window_seconds: float = Field(default=6 * 86400.0, gt=0)
    reconcile_page_size: int = Field(default=100, gt=0, le=10_000)
    # A position is reconciled once its last change is this old: Bybit's order history can lag
    # a moment behind, and an order not visible yet must not pass for one never placed.
    reconcile_settle_seconds: float = Field(default=30.0, ge=0)
    # The worker's Prometheus endpoint (served by its main process); 0 turns it off.
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # Pre-flight: the available balance must cover the basket at 1x plus this share.
    preflight_margin: Decimal = Field(default=Decimal("0.01"), ge=0, le=1)
    # Budgets per user (service/budgets.py, kept in Redis, shared by every API process): a
    # request rate (a token bucket: this many requests a minute, bursts of USER_REQUEST_BURST)
    # and a number of positions not yet final; past either, 429 with Retry-After.
    user_requests_per_minute: int = Field(default=600, gt=0)
    user_request_burst: int = Field(default=120, gt=0)
    user_open_positions: int = Field(default=10, gt=0)
    # The HTTP edge: the most a request's line and headers may take in all (431 past it); the
    # operations endpoint (/metrics) on its own address, its position counts read at most this
    # often; the interactive docs (/docs, /redoc, /openapi.json) on or off; browser origins
    # allowed by CORS (comma-separated; none by default).
    max_request_header_bytes: int = Field(default=16384, ge=1024, le=1_048_576)
    api_metrics_host: str = "127.0.0.1"
    api_metrics_port: int = Field(default=9807, ge=0, le=65535)
    metrics_counts_cache_seconds: float = Field(default=15.0, ge=0)
    api_docs_enabled: bool = True
    cors_allow_origins: Annotated[tuple[str, ...], NoDecode] = ()
    # A bearer token stops working this long after it was issued.
    token_ttl_seconds: float = Field(default=90 * 86400.0, gt=0)
    # Hard limit of one task run; with the longest retry countdown it bounds the
    # Redis visibility timeout (see celery_app.py). The run's own deadline, enforced inside
    # its event loop, and Celery's soft limit are derived from it (properties below).
    task_time_limit_seconds: int = Field(default=300, gt=0)
    http_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    http_read_timeout_seconds: float = Field(default=10.0, gt=0)
    # Database connections: a statement that hangs fails after this many seconds, and TCP
    # keepalives (set on both ends of every connection) find a dead peer within
    # idle + interval x count seconds, which must stay well under STALE_EXECUTING_SECONDS.
    db_statement_timeout_seconds: float = Field(default=30.0, gt=0)
    db_keepalive_idle_seconds: int = Field(default=10, ge=1)
    db_keepalive_interval_seconds: int = Field(default=5, ge=1)
    db_keepalive_count: int = Field(default=3, ge=1)
    # One basket at a time per exchange account. A new basket whose account is busy gives its
    # worker slot back at once and is sent again ACCOUNT_RETRY_SECONDS later (no attempt
    # used); one that has waited ACCOUNT_WAIT_LIMIT_SECONDS in all (longer than a basket's
    # whole retry schedule by default) fails with nothing sent.
    account_retry_seconds: float = Field(default=1.0, ge=0)
    account_wait_limit_seconds: float = Field(default=1800.0, gt=0)
    # A basket being resumed waits this long in line for its account's lock (other baskets
    # hold it only for their check), then asks again ACCOUNT_RETRY_SECONDS later.
    account_lock_wait_seconds: float = Field(default=2.0, ge=0)

    # The run's tuning (service/execution). An order not final after ORDER_FILL_TIMEOUT_SECONDS
    # is left for the next attempt; one that may have landed is looked for this long before it
    # counts as absent (Bybit lists an accepted order a moment after it answers).
    order_fill_timeout_seconds: float = Field(default=10.0, gt=0)
    order_visibility_wait_seconds: float = Field(default=3.0, ge=0)
    # A leg that filled only in part gets at most this many more orders for its remainder.
    remainder_orders: int = Field(default=3, ge=0, le=9)
    # Batch execution: at most this many orders per /v5/order/create-batch request (Bybit's
    # order page allows 20 linear orders, its rate-limit page 10).
    batch_max_orders: int = Field(default=10, ge=1, le=20)
    # Short in-run retries of a transient exchange error, and their longest back-off; a
    # rate-limited call waits for Bybit's reset if it is this close, this many times.
    exchange_call_attempts: int = Field(default=3, ge=1)
    exchange_call_wait_max_seconds: float = Field(default=1.0, ge=0)
    rate_limit_wait_max_seconds: float = Field(default=2.0, ge=0)
    rate_limit_attempts: int = Field(default=6, ge=1)
    # How long after its creation a position may wait out rate limits and IP bans without
    # using attempts (after that they count like any transient error).
    pause_budget_seconds: float = Field(default=7200.0, ge=0)
    # A new basket whose stored key this worker cannot decrypt is left for another worker (a
    # key rotation rolling out) this long, then fails with nothing sent.
    unreadable_key_grace_seconds: float = Field(default=600.0, ge=0)
    # How early a scheduled retry may start (clock skew between hosts).
    retry_early_tolerance_seconds: float = Field(default=2.0, ge=0)

    @field_validator(
        "credentials_keys",
        "credentials_public_key",
        "credentials_private_keys",
        "market_snapshot_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty value counts as unset: how a process is denied a key that `.env` holds
        # (real environment variables win over `.env`), e.g. the dev stack's API.
        if isinstance(value, str) and not value.strip(" ,\t"):
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip(" ,\t"):
            return None
        return value

    @field_validator("trade_retry_delays", mode="before")
    @classmethod
    def _parse_delays(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            try:
                delays = tuple(float(Decimal(part)) for part in parts)
            except InvalidOperation as exc:
                raise ValueError(
                    f"TRADE_RETRY_DELAYS must be comma-separated seconds, got {value!r}"
                ) from exc
            return delays
        return value

    @field_validator("trade_retry_delays")
    @classmethod
    def _check_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value):
            raise ValueError("TRADE_RETRY_DELAYS must not contain negative delays")
        return value

    @property
    def run_deadline_seconds(self) -> float:
        """A run stops placing orders and winds down at this point (inside its loop)."""
        return 0.75 * self.task_time_limit_seconds

    @property
    def run_grace_seconds(self) -> float:
        """Time after the deadline for the run's own clean-up (release locks, schedule the
        retry); then the runtime cancels whatever is left, and drains it for as long again,
        which still ends before Celery's soft limit (with 0.05 x the limit to spare)."""
        return 0.05 * self.task_time_limit_seconds

    @property
    def soft_time_limit_seconds(self) -> float:
        """Celery's soft limit: a backstop after the deadline, its grace and the drain."""
        return 0.9 * self.task_time_limit_seconds

    @property
    def db_dead_peer_seconds(self) -> int:
        return self.db_keepalive_idle_seconds + (
            self.db_keepalive_interval_seconds * self.db_keepalive_count
        )

    @model_validator(mode="after")
    def _check_timings(self) -> Settings:
        if self.db_dead_peer_seconds >= self.stale_executing_seconds:
            raise ValueError(
                f"DB_KEEPALIVE_IDLE_SECONDS + DB_KEEPALIVE_INTERVAL_SECONDS x DB_KEEPALIVE_COUNT "
                f"({self.db_dead_peer_seconds} s) must be below STALE_EXECUTING_SECONDS "
                f"({self.stale_executing_seconds:g} s): a run whose database connection died "
                "must be recognised as dead before the recovery sweep may resume it"
            )
        return self

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
