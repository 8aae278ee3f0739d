"""Security against the embedded broker: TLS (and mutual TLS) through stunnel in front of it,
since tansu has no working TLS of its own (Apache Kafka's own TLS, SCRAM and ACLs:
test_apache_security.py); SASL settings reach the client config, and no
secret reaches a log line, /metrics, an error message or ``distill check-config``."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.core.exceptions import BrokerError
from distill.core.kafka import Clients, client_config, ensure_topics, redacted, wait_for_broker
from distill.local.broker import EmbeddedBroker, free_port
from tests.faults.conftest import Worker
from tests.integration.workers import write_config
from tests.kafka.pki import OPENSSL, make_pki

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
needs_tls = pytest.mark.skipif(
    not (STUNNEL and OPENSSL), reason="needs stunnel4 and openssl (apt-get install stunnel4)"
)
SENTINEL = "s3ntinel-Pa55w0rd-do-not-log"


@contextlib.contextmanager
def tls_broker(tmp: Path, pki: Path, mutual: bool = False):
    """tansu listens on A and advertises B; stunnel terminates TLS on B and forwards to A."""
    inner, outer = free_port(), free_port()
    broker = EmbeddedBroker(port=inner, advertised_port=outer, log_file=tmp / f"broker-{outer}.log")
    conf = tmp / f"stunnel-{outer}.conf"
    lines = [
        "foreground = yes",
        "pid =",
        f"output = {tmp / f'stunnel-{outer}.log'}",
        "[kafka]",
        f"accept = 127.0.0.1:{outer}",
        f"connect = 127.0.0.1:{inner}",
        f"cert = {pki / 'server.pem'}",
        f"key = {pki / 'server.key'}",
    ]
    if mutual:
        lines += ["verify = 2", f"CAfile = {pki / 'ca.pem'}"]
    conf.write_text("\n".join(lines) + "\n")
    broker.start()
    tunnel = subprocess.Popen([STUNNEL, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        broker.wait_ready()
        deadline = time.monotonic() + 10
        while not _listening(outer):
            assert tunnel.poll() is None, (tmp / f"stunnel-{outer}.log").read_text()
            assert time.monotonic() < deadline, "stunnel did not listen"
            time.sleep(0.05)
        yield f"127.0.0.1:{outer}"
    finally:
        tunnel.terminate()
        tunnel.wait(10)
        broker.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _roundtrip(config, make_consumer, consume) -> None:
    ensure_topics(config, Clients(config.kafka, "admin").admin(), seconds=20)
    producer = Clients(config.kafka, "p").producer()
    producer.produce(config.topics.examples, value=b"over tls", partition=0)
    assert producer.flush(20) == 0
    [msg] = consume(make_consumer(config, [config.topics.examples]), 1, timeout=20)
    assert msg.value() == b"over tls"


@needs_tls
def test_tls_through_stunnel(make_config, make_consumer, consume, tmp_path, caplog, capfd):
    pki = make_pki(tmp_path / "pki")
    with tls_broker(tmp_path, pki) as bootstrap:
        ssl = {"bootstrap_servers": bootstrap, "security_protocol": "SSL"}
        _roundtrip(make_config(kafka={**ssl, "ssl_ca_location": str(pki / "ca.pem")}), make_consumer, consume)

        caplog.set_level(logging.WARNING, logger="distill.core.kafka")
        wrong = make_config(kafka={**ssl, "ssl_ca_location": str(pki / "other-ca.pem")})
        with pytest.raises(BrokerError, match="broker unreachable"):
            wait_for_broker(Clients(wrong.kafka, "wrong-ca").admin(), seconds=3)
        # librdkafka logs the cause to stderr at once; error_cb gets it only when polled
        said = caplog.text + capfd.readouterr().err
        assert "certificate verify failed" in said and "ssl.ca.location" in said, said[-2000:]

        caplog.clear()
        plain = make_config(kafka={"bootstrap_servers": bootstrap})
        with pytest.raises(BrokerError):
            wait_for_broker(Clients(plain.kafka, "plaintext").admin(), seconds=3)
        said = caplog.text + capfd.readouterr().err
        assert "broker unreachable" in said and "Disconnected" in said, said[-2000:]

    with tls_broker(tmp_path, pki, mutual=True) as bootstrap:
        ssl = {"bootstrap_servers": bootstrap, "security_protocol": "SSL", "ssl_ca_location": str(pki / "ca.pem")}
        with pytest.raises(BrokerError):  # no client certificate: refused
            wait_for_broker(Clients(make_config(kafka=ssl).kafka, "no-cert").admin(), seconds=3)
        mtls = make_config(
            kafka={
                **ssl,
                "ssl_certificate_location": str(pki / "client.pem"),
                "ssl_key_location": str(pki / "client.key"),
            }
        )
        _roundtrip(mtls, make_consumer, consume)


def test_sasl_settings_reach_the_client_and_secrets_stay_out_of_output(make_config, tmp_path):
    from distill.core.config import load_config

    env = {
        "DISTILL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "DISTILL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "DISTILL_KAFKA__SASL_USERNAME": "distill",
        "DISTILL_KAFKA__SASL_PASSWORD": SENTINEL,
        "DISTILL_KAFKA__SSL_KEY_PASSWORD": SENTINEL + "-key",
    }
    cfg = load_config(None, environ=env)
    conf = client_config(cfg.kafka)
    assert conf["sasl.password"] == SENTINEL and conf["ssl.key.password"] == SENTINEL + "-key"
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert SENTINEL not in repr(redacted(conf)) and SENTINEL not in repr(cfg)
    import os

    shown = subprocess.run(
        [sys.executable, "-m", "distill", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert shown.returncode == 0, shown.stderr
    assert '"sasl_username": "distill"' in shown.stdout
    assert SENTINEL not in shown.stdout + shown.stderr

    # A worker with a password set, against a broker that answers in plaintext (SASL cannot be
    # exercised on tansu): its log, /metrics and its errors never show the password.
    config = make_config()
    path = write_config(config, tmp_path / "config.yaml")
    worker = Worker(["teacher", "--config", str(path)], tmp_path / "teacher.log")
    old = dict(os.environ)
    os.environ.update(
        DISTILL_KAFKA__SASL_PASSWORD=SENTINEL,
        DISTILL_KAFKA__SASL_USERNAME="distill",
        DISTILL_KAFKA__SASL_MECHANISM="PLAIN",
        DISTILL_LOG_LEVEL="DEBUG",
    )
    try:
        worker.start()  # spawn copies os.environ
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        worker.wait(lambda: worker.get("/metrics")[0] == 200, "/metrics", 30)
        time.sleep(2.0)  # let it log its client warnings
        body = worker.get("/metrics")[1] + worker.get("/readyz")[1] + worker.get("/healthz")[1]
        assert "distill_" in body and SENTINEL not in body
        worker.stop(30)
    finally:
        worker.kill()
    text = worker.log.read_text()
    assert len(text) > 200 and SENTINEL not in text, text[-1500:]
