"""``distill up``: the whole pipeline on one machine, as separate processes.

Starts the embedded broker (unless ``--bootstrap``), creates the topics, runs a producer, the
teacher (one process, or with ``--labelers N`` a trainer and N labelers) and every configured
student, shows live progress on a terminal, and when the producer
is done and every student has trained every example (or at ``--duration``) stops them
gracefully and writes the report. A child that dies takes the run down with its log's tail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import TopicPartition
from pydantic import BaseModel

from distill.core.config import ENV_PREFIX, Config
from distill.core.kafka import Clients, ensure_topics, local_profile, redacted
from distill.local.broker import EmbeddedBroker, free_port
from distill.local.processes import die_with_parent

log = logging.getLogger(__name__)


@dataclass
class Child:
    role: str
    name: str
    cmd: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        # Own session: a Ctrl-C in the terminal reaches ``distill up`` only, which then stops
        # the children in order.
        self.process = subprocess.Popen(
            self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent
        )
        out.close()

    def poll(self) -> int | None:
        if self.process is not None and self.exit_code is None:
            self.exit_code = self.process.poll()
        return self.exit_code

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        if self.process is None:
            return self.exit_code
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()
        return self.exit_code

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def is_secret_extra(key: str) -> bool:
    """A librdkafka property of kafka.extra whose value is a secret: what ``redacted`` masks in
    log lines (passwords, client secrets, the OAUTHBEARER config), and an inline private key."""
    return redacted({key: ""})[key] != "" or key == "ssl.key.pem"


def secret_fields(model: BaseModel, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every set field that the config declares with ``repr=False``: its
    secrets (kafka.sasl_password, kafka.ssl_key_password, the schema registry's credentials...)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if not info.repr and value is not None:
            yield (*path, name), value
        elif isinstance(value, BaseModel):
            yield from secret_fields(value, (*path, name))


def write_child_config(config: Config, path: Path) -> dict[str, str]:
    """Write the children's config to ``path`` without its secrets, and return the environment
    variables that carry them to the children (a file under state_dir outlives the run and is
    easily copied or shared; a child's environment is readable by its user only)."""
    data = config.model_dump(mode="json")
    env = {}
    for where, value in secret_fields(config):
        section = data
        for name in where[:-1]:
            section = section[name]
        del section[where[-1]]
        env[ENV_PREFIX + "__".join(name.upper() for name in where)] = str(value)
    extra = data["kafka"]["extra"]
    secret_extra = {k: extra.pop(k) for k in list(extra) if is_secret_extra(k)}
    if secret_extra:
        # A JSON table, merged over the file's kafka.extra by load_config.
        env[f"{ENV_PREFIX}KAFKA__EXTRA"] = json.dumps(secret_extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return env


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _last_line(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError, IndexError):
        return None


class Pipeline:
    def __init__(
        self,
        config: Config,
        source: str,
        examples: int | None,
        duration: float | None,
        report_dir: Path,
        bootstrap: str | None,
        prometheus: bool,
        live: bool | None = None,
        producer_args: list[str] | None = None,
        labelers: int = 0,
        launch_after: int = 0,
    ):
        self.config = config
        self.labelers = labelers
        # > 0: the teacher trains alone on this many examples before the students start
        # (a student launched beside a long-running teacher); the students train on the rest.
        self.launch_after = launch_after
        self.source = source
        self.examples = examples
        self.duration = duration
        self.report_dir = report_dir
        self.bootstrap = bootstrap
        self.want_prometheus = prometheus
        self.live = sys.stdout.isatty() if live is None else live
        self.producer_args = producer_args or []
        self.broker: EmbeddedBroker | None = None
        self.children: list[Child] = []
        self.prometheus: subprocess.Popen | None = None
        self.prometheus_url: str | None = None
        self._prom_targets: set[str] = set()
        self._prom_up: set[str] = set()  # scrape URLs seen up at least once
        self.stop_requested = False
        self.secret_env: dict[str, str] = {}

    # -- set-up --------------------------------------------------------------------------------
    def _prepare(self) -> Path:
        state = self.config.state_dir
        if state.exists():
            # A run starts clean: the embedded broker forgets topics, so old checkpoints would
            # point at offsets that no longer exist.
            shutil.rmtree(state)
        state.mkdir(parents=True)
        if self.bootstrap is None:
            self.broker = EmbeddedBroker(log_file=state / "logs" / "broker.log").start()
            self.bootstrap = self.broker.bootstrap
            # Client settings tuned for it, under the user's own kafka.extra (which wins).
            self.config.kafka.extra = local_profile(self.config.kafka.extra)
        self.config.kafka.bootstrap_servers = self.bootstrap
        config_path = state / "config.yaml"
        self.secret_env = write_child_config(self.config, config_path)
        ensure_topics(self.config, Clients(self.config.kafka, "up").admin(), seconds=30)
        return config_path

    def _children(self, config_path: Path) -> list[Child]:
        py = [sys.executable, "-m", "distill"]
        logs = self.config.state_dir / "logs"
        kids = []
        teachers = [(self.config.teacher.name, "both")]
        if self.labelers:
            teachers = [(self.config.teacher.name, "trainer")]
            teachers += [(f"labeler-{i}", "labeler") for i in range(self.labelers)]
        for name, role in teachers:
            port = free_port()
            args = [
                "teacher",
                "--role",
                role,
                "--name",
                name,
                "--config",
                str(config_path),
                "--metrics-port",
                str(port),
            ]
            log_name = "teacher.log" if role == "both" else f"teacher-{name}.log"
            kids.append(Child("teacher", name, py + args, port, logs / log_name, extra={"teacher_role": role}))
        for s in self.config.students:
            port = free_port()
            kids.append(
                Child(
                    "student",
                    s.name,
                    py + ["student", "--name", s.name, "--config", str(config_path), "--metrics-port", str(port)],
                    port,
                    logs / f"student-{s.name}.log",
                    extra={"mode": s.mode},
                )
            )
        port = free_port()
        # --hold: the producer keeps its final counters on /metrics until the run ends
        cmd = py + ["produce", self.source, "--config", str(config_path), "--metrics-port", str(port), "--hold"]
        examples = self.examples
        if self.launch_after:
            # Two runs of one resumable replay: the first stops where the students start.
            position = ["--position-file", str(self.config.state_dir / "producer.position")]
            first = py + ["produce", self.source, "--config", str(config_path), "--metrics-port", str(free_port())]
            first += ["--examples", str(self.launch_after), *position]
            name = self.config.producer.producer_id
            kids.append(Child("producer", name, first + self.producer_args, 0, logs / "producer-before-launch.log"))
            cmd += position
            examples = examples - self.launch_after if examples else None
        if examples:
            cmd += ["--examples", str(examples)]
        kids.append(
            Child("producer", self.config.producer.producer_id, cmd + self.producer_args, port, logs / "producer.log")
        )
        return kids

    def _launch_students_later(self, env: dict[str, str]) -> Child | None:
        """The teacher alone on the first ``launch_after`` examples; then the students, which
        start at the end of both topics (their groups' offsets are set there)."""
        first = self.children[[c.role for c in self.children].index("producer")]
        first.start(env)
        while first.poll() is None and not self.stop_requested:
            time.sleep(0.2)
        if first.exit_code not in (0, None):
            return first
        # Its summary moves aside: the file is the second run's from now on.
        summary = self.config.progress_dir() / f"producer-{first.name}.summary.json"
        if summary.exists():
            summary.replace(summary.with_name(f"producer-{first.name}.before-launch.summary.json"))
        while not self.stop_requested:
            labelled = sum(
                self.status().get(f"teacher:{c.name}", {}).get("examples_labeled", 0) for c in self._labelling()
            )
            if labelled >= self.launch_after:
                break
            for c in self._labelling():
                if c.poll() is not None:
                    return c
            time.sleep(0.2)
        start_groups_at_end(self.config)
        return None

    def _start_prometheus(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            print(
                "warning: --prometheus asked, but the prometheus binary is not installed "
                "(apt-get install prometheus); continuing without it",
                file=sys.stderr,
            )
            return
        state = self.config.state_dir / "prometheus"
        state.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, list[dict]] = {}
        for c in self.children:  # one job per role, one target per process
            jobs.setdefault(f"distill-{c.role}", []).append(
                {"targets": [f"127.0.0.1:{c.port}"], "labels": {"worker": c.name}}
            )
        scrape = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "5s"},
            "scrape_configs": [{"job_name": job, "static_configs": targets} for job, targets in jobs.items()],
        }
        (state / "prometheus.yml").write_text(yaml.safe_dump(scrape, sort_keys=False))
        port = free_port()
        self.prometheus = subprocess.Popen(
            [
                binary,
                f"--config.file={state / 'prometheus.yml'}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={state / 'data'}",
            ],
            stdout=open(state / "prometheus.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.prometheus_url = f"http://127.0.0.1:{port}"
        print(f"prometheus: {self.prometheus_url} (scraping {len(self.children)} processes)")

    def _poll_prometheus(self) -> None:
        """Remember every target Prometheus has scraped successfully (the producer may finish
        and go away before the others)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/targets", timeout=1) as r:
                active = json.load(r)["data"]["activeTargets"]
        except (OSError, ValueError, KeyError):
            return
        self._prom_targets = {t["scrapeUrl"] for t in active}
        self._prom_up |= {t["scrapeUrl"] for t in active if t["health"] == "up"}

    def _prometheus_targets(self) -> dict | None:
        if self.prometheus_url is None:
            return None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.prometheus is not None and self.prometheus.poll() is not None:
                return {
                    "url": self.prometheus_url,
                    "error": f"prometheus exited with code {self.prometheus.returncode}",
                }
            self._poll_prometheus()
            if self._prom_targets and self._prom_up >= self._prom_targets:
                break
            time.sleep(0.5)
        return {"url": self.prometheus_url, "targets": len(self._prom_targets), "up": len(self._prom_up)}

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        previous = signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        failed: Child | None = None
        targets = None
        self.children = []
        try:
            config_path = self._prepare()
            self.children = self._children(config_path)
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")  # several torch processes share the cores
            env.pop("DISTILL_CONFIG", None)
            env.update(self.secret_env)  # the secrets that config.yaml leaves out
            if self.want_prometheus:
                self._start_prometheus()
            # Teacher first, then students, then the producer, each once ready: students that
            # start before the teacher would time out on labels that are only late.
            for role in ("teacher", "student", "producer"):
                group = [c for c in self.children if c.role == role]
                if role == "student" and self.launch_after:
                    failed = self._launch_students_later(env)
                    if failed is not None:
                        break
                for child in group:
                    if child.process is None:
                        child.start(env)
                if role != "producer":
                    failed = self._wait_ready(group)
                    if failed is not None:
                        break
            teacher = f"trainer + {self.labelers} labelers" if self.labelers else "teacher"
            print(
                f"pipeline up on {self.bootstrap}: producer, {teacher}, {len(self.config.students)} students; "
                f"logs in {self.config.state_dir / 'logs'}",
                flush=True,
            )
            if failed is None:
                failed = self._watch(started)
            if self.prometheus_url and failed is None:
                targets = self._prometheus_targets()
        finally:
            self._stop_all()
            signal.signal(signal.SIGINT, previous)
        if failed is not None:
            print(
                f"\n{failed.role} {failed.name} exited with code {failed.exit_code}; last lines of {failed.log_path}:\n"
                f"{failed.tail()}",
                file=sys.stderr,
            )
        report = self._report(time.monotonic() - started, targets)
        from distill.local.report import write_report

        paths = write_report(report, self.report_dir, self.config.progress_dir())
        if "png" in paths:
            print(f"report: {paths['md']} ({paths['json']}, {paths['png']})")
        else:
            print(f"report: {paths['md']} ({paths['json']}; no report.png: pip install 'online-distill[report]')")
        bad = [c for c in self.children if c.exit_code not in (0,)]
        if failed is not None or bad:
            for c in bad:
                if c is not failed:
                    print(f"{c.role} {c.name} exited with code {c.exit_code}; see {c.log_path}", file=sys.stderr)
            return 1
        return 0

    def _wait_ready(self, group: list[Child], timeout_s: float = 120.0) -> Child | None:
        """Poll each child's /readyz; a child that exits meanwhile is returned as failed."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        pending = list(group)
        while pending and not self.stop_requested:
            for child in list(pending):
                if child.poll() is not None:
                    return child
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{child.port}/readyz", timeout=1) as r:
                        if r.status == 200:
                            pending.remove(child)
                except (urllib.error.URLError, OSError):
                    pass
            if time.monotonic() > deadline:
                names = ", ".join(f"{c.role} {c.name}" for c in pending)
                print(f"warning: not ready after {timeout_s:.0f}s: {names}; going on", file=sys.stderr)
                return None
            time.sleep(0.2)
        return None

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        print("\nstopping: finishing batches, checkpointing, committing...", file=sys.stderr, flush=True)

    def status(self) -> dict[str, dict]:
        progress = self.config.progress_dir()
        out = {}
        for c in self.children:
            out[f"{c.role}:{c.name}"] = _last_line(progress / f"{c.role}-{c.name}.jsonl") or {}
        return out

    def _done(self, status: dict[str, dict]) -> bool:
        producer = [c for c in self.children if c.role == "producer"][-1]
        summary = _read_json(self.config.progress_dir() / f"producer-{producer.name}.summary.json") or {}
        produced = summary.get("examples")
        if produced is None or producer.process is None:
            return False
        labelled = sum(status.get(f"teacher:{c.name}", {}).get("examples_labeled", 0) for c in self._labelling())
        if labelled < produced + self.launch_after:
            return False
        # A pool's trainer trains the whole stream too (its labelers may finish a little earlier:
        # labels within the staleness bound need not wait for the last batches to be trained).
        trainer = [c for c in self.children if c.extra.get("teacher_role") == "trainer"]
        trained = status.get(f"teacher:{trainer[0].name}", {}).get("examples_trained", 0) if trainer else None
        if trained is not None and trained < produced + self.launch_after:
            return False
        # after a late launch the students train what came after it
        return all(
            status.get(f"student:{s.name}", {}).get("examples_trained", 0) >= produced for s in self.config.students
        )

    def _labelling(self) -> list[Child]:
        """The processes that label: the teacher, or the labelers of a pool."""
        return [c for c in self.children if c.extra.get("teacher_role") in ("both", "labeler")]

    def _watch(self, started: float) -> Child | None:
        from distill.local.live import LiveView

        view = LiveView(self) if self.live else None
        try:
            if view:
                view.start()
            while not self.stop_requested:
                for child in self.children:
                    code = child.poll()
                    if code is not None and (code != 0 or child.role != "producer"):
                        return child
                status = self.status()
                if self.prometheus_url:
                    self._poll_prometheus()
                if view:
                    view.update(status)
                if self._done(status):
                    return None
                if self.duration is not None and time.monotonic() - started >= self.duration:
                    return None
                time.sleep(0.5)
            return None
        finally:
            if view:
                view.stop()

    def _stop_all(self) -> None:
        # Students and teacher stop gracefully (finish the batch, checkpoint, commit).
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=90)
        if self.prometheus is not None:
            self.prometheus.terminate()
            self.prometheus.wait(10)
        if self.broker is not None:
            self.broker.stop()

    def _report(self, duration_s: float, targets: dict | None) -> dict:
        progress = self.config.progress_dir()

        def summary(c: Child) -> dict:
            return _read_json(progress / f"{c.role}-{c.name}.summary.json") or {}

        producer = [c for c in self.children if c.role == "producer"][-1]
        # The teacher's model and metrics: the single teacher, or the pool's trainer.
        teacher_child = next(c for c in self.children if c.extra.get("teacher_role") in ("both", "trainer"))
        ps, ts = summary(producer), summary(teacher_child)
        labelers = {c.name: summary(c) for c in self.children if c.extra.get("teacher_role") == "labeler"}
        tasks = self.config.task_types()

        def task_metrics(snap: dict, head: str) -> dict:
            out = {}
            for task, kind in tasks.items():
                values = snap.get(task, {}).get(head, {}).get("cumulative", {})
                keys = ("auc", "logloss", "calibration") if kind == "binary" else ("rmse", "calibration")
                out[task] = {k: values.get(k) for k in keys}
            return out

        students = {}
        for c in self.children:
            if c.role != "student":
                continue
            s = summary(c)
            students[c.name] = {
                "mode": c.extra["mode"],
                "params": s.get("params"),
                "examples_trained": s.get("examples_trained", 0),
                "batches_trained": s.get("batches_trained", 0),
                "examples_per_s": s.get("examples_per_s"),
                "unique_batches_trained": s.get("unique_batches_trained"),
                "join": {k: s.get(k, 0) for k in ("joined", "missing", "late", "duplicate")},
                "metrics": task_metrics(s.get("metrics", {}), "main"),
                "teacher_on_same_batches": task_metrics(s.get("metrics", {}), "teacher"),
                "features": s.get("features"),
                "gate": s.get("gate"),
            }
        return {
            "source": self.source,
            "examples_produced": ps.get("examples", 0) + self.launch_after,
            "batches_produced": ps.get("batches", 0),  # after the launch, if any: what students saw
            "launch_after": self.launch_after,
            "duration_s": round(duration_s, 2),
            "bootstrap": self.bootstrap,
            "teacher": {
                "name": teacher_child.name,
                "examples_labeled": sum(summary(c).get("examples_labeled", 0) for c in self._labelling()),
                "params": ts.get("params"),
                "flops_per_example": ts.get("flops_per_example"),
                "examples_per_s": ts.get("examples_per_s"),
                "features": self.config.features.categorical_names + list(self.config.features.dense),
                "metrics": task_metrics(ts.get("metrics", {}), "main"),
                "pool": None
                if not labelers
                else {
                    "examples_trained": ts.get("examples_trained", 0),
                    "versions_published": ts.get("version", 0),
                    "labelers": {
                        name: {
                            "examples_labeled": s.get("examples_labeled", 0),
                            "label_batches_by_version": s.get("label_batches_by_version", {}),
                        }
                        for name, s in labelers.items()
                    },
                },
            },
            "students": students,
            "processes": [
                {
                    "role": c.role,
                    "name": c.name,
                    "exit_code": c.exit_code,
                    "metrics_url": c.metrics_url,
                    "log": str(c.log_path),
                }
                for c in self.children
            ],
            "prometheus": targets,
        }


def run_up(
    config: Config,
    source: str,
    examples: int | None = None,
    duration: float | None = None,
    report_dir: Path = Path("report"),
    bootstrap: str | None = None,
    prometheus: bool = False,
    live: bool | None = None,
    producer_args: list[str] | None = None,
    labelers: int = 0,
    launch_after: int = 0,
) -> int:
    return Pipeline(
        config,
        source,
        examples,
        duration,
        report_dir,
        bootstrap,
        prometheus,
        live,
        producer_args,
        labelers,
        launch_after,
    ).run()


def start_groups_at_end(config: Config) -> None:
    """Commit every student group's offsets at the current end of the examples and labels
    topics (read to the end: the embedded broker's ListOffsets answer is too low)."""
    from producers.recovery import read_to_end

    clients = Clients(config.kafka, "up.launch")
    admin = clients.admin()
    ends: list[TopicPartition] = []
    for topic in (config.topics.examples, config.topics.labels):
        last: dict[int, int] = {}
        for msg in read_to_end(clients, admin, topic, {}):
            last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())
        ends += [TopicPartition(topic, p, o + 1) for p, o in last.items()]
    for s in config.students:
        consumer = clients.consumer(s.group_id)
        try:
            consumer.commit(offsets=ends, asynchronous=False)
        finally:
            consumer.close()
