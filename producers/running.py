"""Running a producer as a process: its settings (``config.producer`` with overrides), then its
loop on its service, with signal handlers and the HTTP endpoints, until it stops; then its counts."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from distill.core.config import Config, ProducerConfig
from distill.core.exceptions import ConfigError
from distill.core.service import Service
from producers.transaction import Transactions

log = logging.getLogger(__name__)


class Worker(ABC):
    """A producer's loop: ``start``, then ``step`` until it returns False or a stop is requested,
    then ``close``; ``result`` gives the counts."""

    service: Service

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def step(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, Any]: ...

    def run(self) -> dict[str, Any]:
        self.start()
        self.service.run(self.step, self.close)
        return self.result()


def closing_figures(started: float, examples: int, txn: Transactions | None) -> dict[str, Any]:
    """The last counts of a run that started at ``started`` (monotonic; 0: it did not start)."""
    seconds = time.monotonic() - started if started else 0.0
    return {
        "transactions": txn.commits if txn is not None else 0,
        "seconds": round(seconds, 3),
        "examples_per_s": round(examples / seconds, 1) if seconds > 0 else 0.0,
    }


def producer_settings(config: Config, **overrides: Any) -> ProducerConfig:
    """``config.producer`` with the given fields replaced (None means: keep the config's)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(ProducerConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown producer options {unknown}; allowed: {sorted(ProducerConfig.model_fields)}")
    try:
        return ProducerConfig.model_validate(config.producer.model_dump() | given)
    except ValidationError as exc:
        where = "; ".join(f"producer.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid producer option: {where}") from None


def run_service(
    pcfg: ProducerConfig,
    build: Callable[[Service], Worker],
    *,
    handle_signals: bool,
    serve_http: bool,
    stop: threading.Event | None,
    finished: str,
) -> dict[str, Any]:
    """Build the worker on its service (before anything starts: a bad config fails here), run it
    until it stops and return its counts, logged as ``finished``."""
    service = Service("producer", pcfg.producer_id, port=pcfg.metrics_port)
    if stop is not None:
        service.stopping = stop
    worker = build(service)
    if handle_signals:
        service.install_signal_handlers()
    if serve_http:
        service.start_http()
    try:
        result = worker.run()
    finally:
        service.shutdown_http()
    # A stop asked for while the run was closing anyway (at the end of the data, say): the
    # caller must not wait for another one (``distill produce --hold``).
    result["stop_requested"] = service.stopping.is_set()
    log.info(finished, extra=result)
    return result
