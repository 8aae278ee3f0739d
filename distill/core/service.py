"""What every long-running worker shares: signals, the HTTP endpoints, JSON logs, the loop.

Stop order on SIGTERM or SIGINT: the current step finishes, then the worker's ``close`` runs
(flush, checkpoint, commit, close clients) within ``stop_deadline_s``; a second signal or the
deadline ends the process at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import MetricsHandler

from distill import __version__
from distill.core import metrics as m

log = logging.getLogger(__name__)

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str, worker: str):
        super().__init__()
        self.role, self.worker = role, worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "role": self.role,
            "worker": self.worker,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(role: str, worker: str, level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role, worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("DISTILL_LOG_LEVEL", "INFO")).upper())


class Service:
    """Holds a worker's health state and HTTP server; runs its step function until stopped."""

    def __init__(
        self,
        role: str,
        worker: str,
        port: int = 0,
        host: str = "0.0.0.0",
        health_timeout_s: float = 60.0,
        stop_deadline_s: float = 60.0,
        busy_ready_s: float = 5.0,
    ):
        self.role, self.worker = role, worker
        self.host, self.port = host, port
        self.health_timeout_s = health_timeout_s
        self.stop_deadline_s = stop_deadline_s
        self.busy_ready_s = busy_ready_s
        self.stopping = threading.Event()
        self._last_beat = time.monotonic()
        self._ready = False
        self._ready_reason = "starting"
        self._server: ThreadingHTTPServer | None = None
        self._running = False  # True once run() loops: a stop before that exits at once
        self._deadline: threading.Timer | None = None
        m.BUILD.info({"version": __version__, "role": role, "worker": worker})

    # -- health ------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        m.HEARTBEAT.labels(self.role, self.worker).set(time.time())

    def set_ready(self, ready: bool, reason: str = "") -> None:
        if ready != self._ready:
            log.info("ready" if ready else "not ready", extra={"reason": reason})
        self._ready, self._ready_reason = ready, reason
        m.READY.labels(self.role, self.worker).set(1 if ready else 0)

    def healthy(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last_beat
        if age > self.health_timeout_s:
            return False, f"loop heartbeat is {age:.0f}s old (limit {self.health_timeout_s:.0f}s)"
        return True, f"heartbeat {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        # A step blocked this long is waiting on something (a commit to a stalled broker, say):
        # librdkafka reports nothing while the connection hangs, so the loop's age says it.
        age = time.monotonic() - self._last_beat
        if self._ready and age > self.busy_ready_s:
            m.READY.labels(self.role, self.worker).set(0)
            return False, f"the current step has run for {age:.0f}s (limit {self.busy_ready_s:.0f}s): broker stalled?"
        m.READY.labels(self.role, self.worker).set(1 if self._ready else 0)
        return self._ready, self._ready_reason

    # -- HTTP --------------------------------------------------------------------------------
    def start_http(self) -> int:
        service = self

        # prometheus_client's own handler serves /metrics: it negotiates the format from Accept
        # (OpenMetrics or text 0.0.4), gzips when asked and honours ?name[]=.
        class Handler(MetricsHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path == "/metrics":
                    service.ready()  # distill_ready as of this scrape
                    super().do_GET()
                elif path in ("/healthz", "/readyz"):
                    ok, why = service.healthy() if path == "/healthz" else service.ready()
                    body = json.dumps({"ok": ok, "role": service.role, "worker": service.worker, "detail": why})
                    self._send(200 if ok else 503, body.encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not news
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        log.info("serving /metrics /healthz /readyz", extra={"port": self.port})
        return self.port

    # -- lifecycle ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            if self.stopping.is_set():
                log.warning("second signal: exiting now")
                os._exit(130)
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
            self.stopping.set()
            if not self._running:
                # Still starting (waiting for the broker, say): nothing trained, nothing to
                # save; leave now rather than retry until the stop deadline kills the process.
                raise SystemExit(0)
            self._arm_deadline()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _arm_deadline(self) -> None:
        # A stop must not hang forever (a broker that never answers a commit, a consumer close
        # waiting for a rebalance, say).
        if self._deadline is None:
            self._deadline = threading.Timer(self.stop_deadline_s, self._deadline_passed)
            self._deadline.daemon = True
            self._deadline.start()

    def _deadline_passed(self) -> None:
        log.error("graceful stop took longer than %.0fs; exiting", self.stop_deadline_s)
        logging.shutdown()
        os._exit(1)

    def run(self, step: Callable[[], bool], close: Callable[[], None], collective: bool = False) -> None:
        """Call ``step`` until a stop is requested or it returns False; then ``close`` once.
        ``collective``: only ``step`` decides (it reads ``stopping`` and agrees with its peers)."""
        self._running = True
        try:
            while collective or not self.stopping.is_set():
                self.heartbeat()
                if not step():
                    break
        finally:
            self.set_ready(False, "stopping")
            self._arm_deadline()  # also when an error ends the loop
            try:
                close()
                self.shutdown_http()
            finally:
                self._deadline.cancel()  # closed in time
                self._deadline = None

    def shutdown_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
