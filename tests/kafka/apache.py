"""Apache Kafka (KRaft, no ZooKeeper) for the tests, run from the jars that ``make kafka-jars``
resolves with tests/kafka/pom.xml into a cache outside the repository.

``ApacheKafka(brokers=1)`` is one combined broker/controller; ``brokers=3`` is three combined
nodes with a static controller quorum. Every listener is on a free loopback port and every
log dir is a temporary folder. ``start()`` returns once metadata lists every broker;
``stop()`` sends SIGTERM, then kills.

``ApacheKafka(security=Security(...))`` adds a client listener with SCRAM-SHA-512 users
(created when the storage is formatted), TLS from a test CA (``tests/kafka/pki.py``) and ACLs
(Kafka's StandardAuthorizer): ``secure_bootstrap``. The plaintext listener (``bootstrap``)
stays for the brokers, the controllers and the tests' own set-up: its anonymous principal is a
super user, like the cluster operator's own access in production.

    python -m tests.kafka.apache [--brokers 3]   # start one by hand; Ctrl-C stops it
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from distill.local.broker import free_port
from distill.local.processes import die_with_parent

POM = Path(__file__).with_name("pom.xml")
KAFKA_VERSION = re.search(r"<kafka.version>(.+?)</kafka.version>", POM.read_text()).group(1)
HOST = "127.0.0.1"
# Small and quick to start on 2 cores shared with the tests: C1 only, serial GC.
JVM_OPTS = ["-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]

LOG4J = """\
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""


@dataclass(frozen=True)
class Security:
    """What the secure client listener asks of a client."""

    users: dict[str, str] = field(default_factory=dict)  # SCRAM-SHA-512 user -> password
    pki: Path | None = None  # a make_pki() folder: TLS (SASL_SSL) with its server.p12, else SASL_PLAINTEXT
    acls: bool = True  # authorize every request of the secure listener by ACLs

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.pki else "SASL_PLAINTEXT"


def jar_dir() -> Path:
    """Where ``make kafka-jars`` puts the jars (KAFKA_JARS overrides)."""
    default = Path.home() / ".cache" / "online-distill" / f"kafka-{KAFKA_VERSION}"
    return Path(os.environ.get("KAFKA_JARS", default))


def resolve_command() -> str:
    return f"mvn -B -q -f {POM} dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory={jar_dir()}"


def unavailable() -> str | None:
    """Why Apache Kafka cannot run here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (OpenJDK 17 or newer runs Apache Kafka 4)"
    if not (jar_dir() / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        return (
            f"Apache Kafka {KAFKA_VERSION} jars are missing in {jar_dir()}: run `make kafka-jars` ({resolve_command()})"
        )
    return None


def _java(main: str, *args: str, log, opts: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    cmd = ["java", *JVM_OPTS, *opts, "-cp", f"{jar_dir()}/*", main, *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)


class ApacheKafka:
    """Start with ``with ApacheKafka() as kafka: kafka.bootstrap``; stops on exit."""

    flavour = "apache"

    def __init__(
        self, brokers: int = 1, root: Path | str | None = None, partitions: int = 1, security: Security | None = None
    ):
        self.brokers = brokers
        self.partitions = partitions
        self.security = security
        self.secure_ports = [free_port(HOST) for _ in range(brokers)] if security else []
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="apache-kafka-"))
        self.ports = [free_port(HOST) for _ in range(brokers)]
        self.controller_ports = [free_port(HOST) for _ in range(brokers)]
        self.processes: list[subprocess.Popen | None] = [None] * brokers
        self._logs: list = [None] * brokers

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{HOST}:{p}" for p in self.ports)

    @property
    def secure_bootstrap(self) -> str:
        """The SCRAM (and TLS) listener's addresses; only with ``security``."""
        assert self.security, "ApacheKafka(security=Security(...)) has a secure listener"
        return ",".join(f"{HOST}:{p}" for p in self.secure_ports)

    def _security_properties(self, node: int) -> dict:
        sec = self.security
        if sec is None:
            return {}
        props: dict = {
            "listeners": f"PLAINTEXT://{HOST}:{self.ports[node]},SECURE://{HOST}:{self.secure_ports[node]},"
            f"CONTROLLER://{HOST}:{self.controller_ports[node]}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.ports[node]},SECURE://{HOST}:{self.secure_ports[node]}",
            "listener.security.protocol.map": f"PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SECURE:{sec.protocol}",
            "listener.name.secure.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.secure.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
        }
        if sec.pki:
            from tests.kafka.pki import KEYSTORE_PASSWORD

            props |= {
                "listener.name.secure.ssl.keystore.type": "PKCS12",
                "listener.name.secure.ssl.keystore.location": sec.pki / "server.p12",
                "listener.name.secure.ssl.keystore.password": KEYSTORE_PASSWORD,
                "listener.name.secure.ssl.key.password": KEYSTORE_PASSWORD,
            }
        if sec.acls:
            props |= {
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                # the brokers and controllers talk over the plaintext listeners as ANONYMOUS
                "super.users": "User:ANONYMOUS",
                "allow.everyone.if.no.acl.found": "false",
            }
        return props

    def log_file(self, node: int) -> Path:
        return self.root / f"node-{node}" / "kafka.log"

    def tail(self, node: int = 0, n: int = 3000) -> str:
        path = self.log_file(node)
        return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"

    def _properties(self, node: int) -> Path:
        n = self.brokers
        rf = min(3, n)
        voters = ",".join(f"{i + 1}@{HOST}:{p}" for i, p in enumerate(self.controller_ports))
        props = {
            "process.roles": "broker,controller",
            "node.id": node + 1,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{HOST}:{self.ports[node]},CONTROLLER://{HOST}:{self.controller_ports[node]}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.ports[node]}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self.root / f"node-{node}" / "data",
            "num.partitions": self.partitions,
            "default.replication.factor": rf,
            "min.insync.replicas": 1 if n == 1 else 2,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 4,  # the default 50 takes seconds to create
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": 1 if n == 1 else 2,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": 1 if n == 1 else 2,
            "group.initial.rebalance.delay.ms": 0,
            "group.min.session.timeout.ms": 1000,  # the tests use 6 s, some less
            # Notice a dead node within seconds, not the defaults' 9 s and more.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 3000,
            "controller.quorum.election.timeout.ms": 1000,
            "controller.quorum.fetch.timeout.ms": 2000,
            "message.max.bytes": 16 * 1024 * 1024 + 1024,  # the project's producers send up to 16 MiB
            "replica.fetch.max.bytes": 16 * 1024 * 1024 + 1024,
            "log.segment.bytes": 64 * 1024 * 1024,
        } | self._security_properties(node)
        folder = self.root / f"node-{node}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (folder / "log4j2.properties").write_text(LOG4J)
        return path

    def format(self, timeout_s: float = 60.0, cluster_id: str | None = None) -> None:
        """``kafka-storage format`` on every node, in parallel (one JVM start each)."""
        cluster_id = cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        scram = []
        for user, password in (self.security.users if self.security else {}).items():
            scram += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        procs = []
        for node in range(self.brokers):
            props = self._properties(node)
            log = open(self.root / f"node-{node}" / "format.log", "wb")
            # One argument: a random id can start with "-", which argparse reads as an option.
            args = ("format", f"--cluster-id={cluster_id}", "-c", str(props), *scram)
            procs.append((node, log, _java("kafka.tools.StorageTool", *args, log=log)))
        for node, log, proc in procs:
            code = proc.wait(timeout_s)
            log.close()
            if code != 0:
                text = (self.root / f"node-{node}" / "format.log").read_text(errors="replace")
                raise RuntimeError(f"kafka-storage format of node {node} exited {code}:\n{text[-2000:]}")

    def start_node(self, node: int) -> None:
        props = self.root / f"node-{node}" / "server.properties"
        self._logs[node] = open(self.log_file(node), "ab")
        log4j = self.root / f"node-{node}" / "log4j2.properties"
        self.processes[node] = _java(
            "kafka.Kafka",
            str(props),
            log=self._logs[node],
            opts=(f"-Dlog4j2.configurationFile={log4j}",),
            start_new_session=True,  # Ctrl-C in a terminal reaches pytest, not the JVM
            preexec_fn=die_with_parent,
        )

    def start(self, timeout_s: float = 90.0) -> ApacheKafka:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.format()
        for node in range(self.brokers):
            self.start_node(node)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 90.0, brokers: int | None = None) -> None:
        """Ready: a metadata answer that lists ``brokers`` (default: all) brokers."""
        want = self.brokers if brokers is None else brokers
        live = [f"{HOST}:{p}" for p, proc in zip(self.ports, self.processes, strict=True) if proc is not None]
        admin = AdminClient({"bootstrap.servers": ",".join(live), "log_level": 0})
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            for node, proc in enumerate(self.processes):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"Kafka node {node} exited {proc.returncode}:\n{self.tail(node)}")
            try:
                seen = len(admin.list_topics(timeout=2.0).brokers)
                if seen >= want:
                    return
            except KafkaException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Apache Kafka: {seen} of {want} brokers in metadata after {timeout_s}s:\n{self.tail()}")

    def warm_up(self, timeout_s: float = 60.0) -> None:
        """Create the internal topics (__consumer_offsets, __transaction_state) now: the first
        group join and the first transaction would otherwise wait seconds for them."""
        conf = {"bootstrap.servers": self.bootstrap, "log_level": 0}
        topic = f"warm-up-{uuid.uuid4().hex}"  # Kafka refuses offsets of a topic that does not exist
        admin = AdminClient(conf)
        for future in admin.create_topics([NewTopic(topic, 1)]).values():
            future.result(timeout_s)
        producer = Producer(conf | {"transactional.id": f"warm-up-{uuid.uuid4().hex}"})
        producer.init_transactions(timeout_s)
        producer.begin_transaction()
        producer.commit_transaction(timeout_s)
        consumer = Consumer(conf | {"group.id": f"warm-up-{uuid.uuid4().hex}"})
        try:
            for attempt in range(100):  # COORDINATOR_NOT_AVAILABLE until the topic has leaders
                try:
                    consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
                    return
                except KafkaException as exc:
                    if attempt == 99:
                        raise RuntimeError(f"Apache Kafka: no group coordinator: {exc}") from exc
                    time.sleep(0.3)
        finally:
            consumer.close()

    def stop_node(self, node: int, timeout_s: float = 20.0, kill: bool = False) -> None:
        proc = self.processes[node]
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes[node] = None
        self._logs[node].close()

    def stop(self, timeout_s: float = 20.0) -> None:
        # SIGTERM all first: a controlled shutdown of one node waits on the others' quorum.
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for node in range(self.brokers):
            self.stop_node(node, timeout_s)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ApacheKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", type=int, default=1)
    args = parser.parse_args()
    t0 = time.monotonic()
    with ApacheKafka(brokers=args.brokers) as kafka:
        print(f"ready in {time.monotonic() - t0:.1f}s: {kafka.bootstrap} (logs in {kafka.root})", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
