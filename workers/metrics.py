"""The worker's /metrics: pool processes write their counters to PROMETHEUS_MULTIPROC_DIR
(set by `python -m service worker` before anything is imported), and the main process serves
them all on WORKER_METRICS_PORT."""

from __future__ import annotations

import os
import shutil

from celery.signals import worker_init, worker_process_shutdown, worker_shutdown
from prometheus_client import multiprocess, start_http_server

from service.config import get_settings
from service.metrics import multiprocess_enabled, multiprocess_registry

OWNED_DIR_FLAG = "TRADER_METRICS_DIR_OWNED"


@worker_init.connect
def _serve_metrics(**_: object) -> None:
    settings = get_settings()
    if settings.worker_metrics_port and multiprocess_enabled():
        start_http_server(
            settings.worker_metrics_port,
            addr=settings.worker_metrics_host,
            registry=multiprocess_registry(),
        )


@worker_process_shutdown.connect
def _pool_process_gone(**_: object) -> None:
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


@worker_shutdown.connect
def _remove_metrics_dir(**_: object) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.environ.get(OWNED_DIR_FLAG) == "1":
        shutil.rmtree(directory, ignore_errors=True)
