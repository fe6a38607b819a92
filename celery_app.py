"""The Celery app: Redis broker, reliability settings for money, task routes, Beat schedule.

It creates no engine and no HTTP session: those live in the worker's runtime
(workers/runtime.py), one set per process, on that process's event loop.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging

from service.config import Settings, get_settings
from service.logging import configure_logging


def visibility_timeout(settings: Settings) -> int:
    """Redis re-delivers any message not acked within this many seconds of being fetched.

    Countdown (retry) messages are fetched at once and held unacked until due, so the
    timeout must exceed the longest countdown (a scheduled delay, or an IP ban) plus the
    longest run, or Redis would hand a
    waiting retry to a second worker and run it twice. It is also how long a message lost
    with a dead worker waits, so keep it no larger than needed: the recovery sweep, not
    redelivery, brings crashed positions back quickly.
    """
    # A retry after an IP ban waits for the ban to end, however short the schedule.
    longest_delay = max((*settings.trade_retry_delays, settings.bybit_ip_ban_seconds))
    return int(longest_delay + 2 * settings.task_time_limit_seconds + 300)


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("synthetic_index_trader", broker=settings.redis_url)
    timeout = visibility_timeout(settings)
    transport_options = {
        "visibility_timeout": timeout,
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
    }
    app.conf.update(
        include=["workers.trade_executor", "workers.maintenance", "workers.metrics"],
        task_default_queue=settings.celery_queue,
        task_routes={"workers.*": {"queue": settings.celery_queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # Acknowledge after the run, put the message back if the process running it dies,
        # and take one message at a time: the documented setting for long, critical tasks.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_seconds,
        # A backstop only: each run stops itself at its deadline inside its event loop
        # (workers/runtime.py), well before this, and the runtime drains whatever is left.
        task_soft_time_limit=settings.soft_time_limit_seconds,
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options,
        visibility_timeout=timeout,
        broker_connection_retry_on_startup=True,
        # Our JSON logging, not Celery's: keep the root logger and stdout as they are.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        # The broker is not trusted with control of the workers: anyone holding the Redis URL
        # could otherwise ping them, list their queues, revoke tasks or shut them down
        # (`control.broadcast("shutdown")`). No remote control: workers consume no pidbox
        # queue at all. Mingle (revoked ids taken from whoever answers at start-up) is off
        # too, by the worker's command line (`python -m service worker`:
        # service/commands.py, which says why gossip stays on).
        worker_enable_remote_control=False,
        enable_utc=True,
        beat_schedule={
            "recover-stale-positions": {
                "task": "workers.maintenance.recover_stale_positions",
                "schedule": settings.recovery_interval_seconds,
                "options": {"expires": settings.recovery_interval_seconds},
            },
            "reconcile-positions": {
                "task": "workers.maintenance.reconcile_positions",
                "schedule": settings.reconcile_interval_seconds,
                "options": {"expires": settings.reconcile_interval_seconds},
            },
            "refresh-market-data": {
                "task": "workers.maintenance.refresh_market_data",
                "schedule": settings.market_refresh_seconds,
                "options": {"expires": settings.market_refresh_seconds},
            },
        },
    )
    return app


@setup_logging.connect
def _configure_logging(**_: object) -> None:
    # Connecting to this signal stops Celery from installing its own handlers.
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


app = create_celery_app(get_settings())
