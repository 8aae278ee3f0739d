"""The ``distill`` command line. Every option has the same name here, in config and in env.

Exit codes: 0 done, 1 a runtime error (the broker, a delivery, a checkpoint), 2 a usage error
(an unknown option or choice, a bad config: retrying the same command cannot help).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer

from distill import __version__
from distill.core.config import Config, Device, Partitioner, StudentConfig, TeacherRole, load_config
from distill.core.exceptions import ConfigError, DistillError

if TYPE_CHECKING:
    from distill.learn.repository import ModelRepository

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continuous knowledge distillation over Kafka.")

USAGE_ERROR, RUNTIME_ERROR = 2, 1
# Choices as Literal types: --help lists them, anything else is a usage error (exit 2).
Replay = Literal["synthetic", "movielens", "file"]
SourceName = Literal["synthetic", "movielens", "file", "events"]
Objective = Literal["gain", "gain-per-gflop", "gain-per-second"]
TimeKind = Literal["kafka", "event"]
TopicsAction = Literal["create"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distill {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Continuous knowledge distillation over Kafka."""


ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="TOML or YAML config file (or DISTILL_CONFIG).")
]
BootstrapOpt = Annotated[
    Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers).")
]


def _load(config: Path | None, bootstrap: str | None = None, **overrides) -> Config:
    if bootstrap:
        overrides.setdefault("kafka", {})["bootstrap_servers"] = bootstrap
    return load_config(config, **overrides)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(USAGE_ERROR if isinstance(exc, ConfigError) else RUNTIME_ERROR)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 9092,
    host: Annotated[str, typer.Option(help="Loopback address to bind.")] = "127.0.0.1",
    log_file: Annotated[Path, typer.Option(help="Where the broker logs.")] = Path("runs/broker.log"),
) -> None:
    """Run the embedded Kafka-protocol broker (memory only) until Ctrl-C."""
    from distill.local.broker import EmbeddedBroker

    # SIGTERM (kill, a process manager) stops like Ctrl-C, so the broker process is stopped too
    # rather than left running in its own session.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with EmbeddedBroker(host=host, port=port, log_file=log_file) as b:
            typer.echo(f"embedded broker ready at {b.bootstrap} (logs: {log_file}); Ctrl-C stops it")
            sys.stdout.flush()
            try:
                while b.process is not None and b.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    except DistillError as exc:
        _fail(exc)


@app.command("topics")
def topics(
    action: Annotated[TopicsAction, typer.Argument(help="create (the default): create what is missing.")] = "create",
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Create the examples, labels and dead-letter topics; check the partition counts."""
    from distill.core.kafka import Clients, ensure_topics

    try:
        cfg = _load(config, bootstrap)
        ensure_topics(cfg, Clients(cfg.kafka, "admin").admin(), seconds=30)
        typer.echo(
            f"topics ready: {cfg.topics.examples}, {cfg.topics.labels} "
            f"({cfg.topics.partitions} partitions) and their .dlq"
        )
    except DistillError as exc:
        _fail(exc)


@app.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate a config file (and DISTILL_* overrides) and print the result."""
    try:
        cfg = _load(config)
    except DistillError as exc:
        _fail(exc)
    secrets: dict[str, Any] = {
        "kafka": {"sasl_password", "ssl_key_password"},
        "events": {"schema_registry": {"basic_auth_user_info"}},
    }
    typer.echo(cfg.model_dump_json(indent=2, exclude=secrets))


models_app = typer.Typer(no_args_is_help=True, help="A student's exported serving models: list, promote, prune.")
app.add_typer(models_app, name="models")
StudentOpt = Annotated[str, typer.Option("--student", "-s", help="Which configured student's exports.")]


@contextmanager
def _models(config: Path | None, student: str) -> Iterator[tuple[StudentConfig, ModelRepository]]:
    """(the student's config, its exports); a DistillError ends the command with its exit code
    (an unknown student is a ConfigError: 2)."""
    from distill.learn.repository import ModelRepository

    try:
        cfg = _load(config)
        yield cfg.student(student), ModelRepository(cfg.model_dir(student))
    except DistillError as exc:
        _fail(exc)


@models_app.command("list")
def models_list(student: StudentOpt, config: ConfigOpt = None) -> None:
    """The exported versions, oldest first: bytes, LATEST / PROMOTED, windowed figures."""
    with _models(config, student) as (_, repo):
        repo.require()
        for e in repo.entries():
            marks = ",".join(m for m, on in (("latest", e.latest), ("promoted", e.promoted)) if on)
            figures = " ".join(f"{t}={v:.5f}" for t, v in e.figures.items())
            typer.echo(f"{e.version:>8}  {e.bytes / 1e6:8.2f} MB  {marks:<15}  {figures}")


@models_app.command("promote")
def models_promote(
    student: StudentOpt,
    version: Annotated[Optional[int], typer.Option(help="The version to serve; default: the newest.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve a version (PROMOTED and config.pbtxt), whatever the promotion rule said."""
    with _models(config, student) as (_, repo):
        state = repo.promote(version)
        typer.echo(f"{student}: promoted version {state.promoted} (latest {state.latest})")


@models_app.command("prune")
def models_prune(
    student: StudentOpt,
    keep: Annotated[Optional[int], typer.Option(help="Versions to keep; default students[].export.keep.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete all but the newest KEEP versions and the promoted one."""
    with _models(config, student) as (sc, repo):
        state = repo.prune(keep if keep is not None else sc.export.keep)
        typer.echo(f"{student}: deleted {state.deleted or 'nothing'}; kept {state.kept} ({state.bytes / 1e6:.2f} MB)")


def _configure(role: str, name: str) -> None:
    from distill.core.service import configure_logging

    configure_logging(role, name)


@app.command()
def teacher(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    role: Annotated[
        Optional[TeacherRole],
        typer.Option(
            help="both: label and train in one process (teacher.role, default). At scale: trainer "
            "(under torchrun for several GPUs) and any number of labeler processes."
        ),
    ] = None,
    name: Annotated[
        Optional[str], typer.Option(help="This worker's name (teacher.name); unique per labeler, e.g. the pod name.")
    ] = None,
    device: Annotated[Optional[Device], typer.Option(help="teacher.device.")] = None,
    metrics_port: Annotated[
        Optional[int], typer.Option(help="Port of /metrics, /healthz, /readyz (teacher.metrics_port).")
    ] = None,
) -> None:
    """Run the teacher until SIGTERM: label and train (role both), train and publish checkpoints
    (role trainer), or label with the newest out-of-sample checkpoint (role labeler)."""
    over: dict = {"teacher": {}}
    for key, value in (("role", role), ("name", name), ("device", device)):
        if value:
            over["teacher"][key] = value
    if metrics_port is not None:
        over["teacher"]["metrics_port"] = metrics_port
    try:
        cfg = _load(config, bootstrap, **over)
        if cfg.teacher.role == "trainer":
            from teacher_worker.trainer import run_trainer

            run_trainer(cfg)  # configures logging itself: it knows its rank
            return
        _configure("teacher", cfg.teacher.name)
        if cfg.teacher.role == "labeler":
            from teacher_worker.labeler import run_labeler

            run_labeler(cfg)
        else:
            from teacher_worker.worker import run_teacher

            run_teacher(cfg)
    except DistillError as exc:
        _fail(exc)


@app.command()
def student(
    name: Annotated[str, typer.Option("--name", "-n", help="Which configured student to run.")],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Port of /metrics, /healthz, /readyz.")] = None,
) -> None:
    """Run one student: join examples with labels, distil, checkpoint, export; until SIGTERM."""
    try:
        cfg = _load(config, bootstrap)
        sc = cfg.student(name)
        if metrics_port is not None:
            sc.metrics_port = metrics_port
        _configure("student", name)
        from student_worker.worker import run_student

        run_student(cfg, name)
    except DistillError as exc:
        _fail(exc)


@app.command()
def produce(
    source: Annotated[
        SourceName,
        typer.Argument(help="A replay (synthetic, movielens, file) or events (the topic events.topic names)."),
    ],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    examples: Annotated[
        Optional[int],
        typer.Option("--examples", "--max-examples", help="Stop after N examples this run (producer.max_examples)."),
    ] = None,
    rate: Annotated[Optional[float], typer.Option(help="Examples per second (producer.rate).")] = None,
    speedup: Annotated[
        Optional[float], typer.Option(help="Event-time speed-up of a replay (producer.speedup).")
    ] = None,
    position_file: Annotated[
        Optional[Path], typer.Option(help="Resume a replay from here (producer.position_file).")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per message (producer.batch_size).")] = None,
    linger_ms: Annotated[Optional[float], typer.Option(help="Send a partial batch after this long.")] = None,
    partitioner: Annotated[Optional[Partitioner], typer.Option(help="producer.partitioner.")] = None,
    producer_id: Annotated[Optional[str], typer.Option(help="Prefix of the batch ids (producer.producer_id).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Port of /metrics, /healthz, /readyz.")] = None,
    data_dir: Annotated[
        Optional[Path], typer.Option(help="movielens only: the ml-100k folder, if not the recbole wheel's.")
    ] = None,
    preset: Annotated[
        bool, typer.Option(help="Use the source's features and tasks preset unless the config sets them.")
    ] = True,
    hold: Annotated[bool, typer.Option(help="At the end of the data keep serving /metrics until SIGTERM.")] = False,
) -> None:
    """Run a producer service: stream a source into the examples topic. Prints the counts as
    one JSON line when it stops."""
    import json

    from distill.core.presets import load_config_for
    from distill.core.progress import ProgressLog
    from producers.service import run_producer

    overrides = {"kafka": {"bootstrap_servers": bootstrap}} if bootstrap else {}
    if source == "events":
        replay_only = {"--examples": examples, "--rate": rate, "--speedup": speedup, "--position-file": position_file}
        given = [k for k, v in replay_only.items() if v is not None]
        if given or data_dir is not None or hold:
            _fail(ConfigError(f"{given or ['--data-dir/--hold']} apply to replays, not to the events source"))
        _produce_events(config, overrides, batch_size, linger_ms, partitioner, producer_id, metrics_port)
        return
    try:
        cfg = load_config_for(source, config, **overrides) if preset else load_config(config, **overrides)
        _configure("producer", producer_id or cfg.producer.producer_id)
        result = run_producer(
            cfg,
            source,
            source_options={"data_dir": data_dir} if data_dir is not None else None,
            max_examples=examples,
            rate=rate,
            speedup=speedup,
            position_file=position_file,
            batch_size=batch_size,
            linger_ms=linger_ms,
            partitioner=partitioner,
            producer_id=producer_id,
            metrics_port=metrics_port,
        )
    except DistillError as exc:
        _fail(exc)
    ProgressLog(cfg.progress_dir(), "producer", result["producer_id"]).write_summary(result)
    typer.echo(json.dumps(result))
    if hold and not result["stop_requested"]:  # a SIGTERM while it closed is not lost
        port = metrics_port if metrics_port is not None else cfg.producer.metrics_port
        _hold(result["producer_id"], port)


def _produce_events(config, overrides, batch_size, linger_ms, partitioner, producer_id, metrics_port) -> None:
    """``distill produce events``: the [events] topic into the examples topic until SIGTERM."""
    import json

    from distill.core.progress import ProgressLog
    from producers.events import run_events

    try:
        cfg = load_config(config, **overrides)
        _configure("producer", producer_id or cfg.producer.producer_id)
        result = run_events(
            cfg,
            batch_size=batch_size,
            linger_ms=linger_ms,
            partitioner=partitioner,
            producer_id=producer_id,
            metrics_port=metrics_port,
        )
    except DistillError as exc:
        _fail(exc)
    ProgressLog(cfg.progress_dir(), "producer", result["producer_id"]).write_summary(result)
    typer.echo(json.dumps(result))


def _hold(worker: str, port: int) -> None:
    """Keep the final counters scrapeable (``distill up`` stops the producer with the rest)."""
    from distill.core.service import Service

    service = Service("producer", worker, port=port)
    service.install_signal_handlers()
    service.start_http()
    service.set_ready(True, "finished; holding metrics")
    service.run(lambda: not service.stopping.wait(0.5), lambda: None)


@app.command()
def up(
    source: Annotated[Replay, typer.Option(help="The stream to run.")] = "synthetic",
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    examples: Annotated[Optional[int], typer.Option(help="Examples to produce (default: the whole source).")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    report: Annotated[Path, typer.Option(help="Where report.json, report.md and report.png go.")] = Path("report"),
    prometheus: Annotated[bool, typer.Option(help="Start Debian's prometheus scraping every process.")] = False,
    state_dir: Annotated[
        Optional[Path], typer.Option(help="Checkpoints, models, logs (state_dir); wiped at start.")
    ] = None,
    labelers: Annotated[
        int, typer.Option(min=0, help="0: one teacher process. N: the teacher at scale, a trainer and N labelers.")
    ] = 0,
    launch_after: Annotated[
        int,
        typer.Option(
            min=0,
            help="Start the students only after the teacher has trained this many examples; they train on the rest.",
        ),
    ] = 0,
) -> None:
    """Run the whole pipeline locally: broker, producer, teacher, students; then a report."""
    from distill.core.presets import load_config_for
    from distill.local.up import run_up

    try:
        over = {"state_dir": str(state_dir)} if state_dir else {}
        cfg = load_config_for(source, config, **over)
        if source == "synthetic":
            # The synthetic stream is endless; its drift schedule spans synthetic.examples.
            examples = examples or cfg.synthetic.examples
            cfg.synthetic.examples = examples
        if launch_after and examples is not None and launch_after >= examples:
            raise ConfigError(
                f"--launch-after {launch_after} leaves no examples for the students (--examples {examples})"
            )
        code = run_up(
            cfg,
            source,
            examples=examples,
            duration=duration,
            report_dir=report,
            bootstrap=bootstrap,
            prometheus=prometheus,
            labelers=labelers,
            launch_after=launch_after,
        )
    except DistillError as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command()
def sweep(
    candidates: Annotated[
        Path,
        typer.Option(
            "--candidates",
            help="TOML or YAML: \\[\\[candidates]] (a name and a partial teacher model) and/or a \\[grid].",
        ),
    ],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    from_offset: Annotated[
        Optional[str], typer.Option(help="First offset: 1200 for every partition, or 0:1200,1:800.")
    ] = None,
    to_offset: Annotated[Optional[str], typer.Option(help="End offset (exclusive), same forms.")] = None,
    from_time: Annotated[
        Optional[str], typer.Option(help="Start: ISO 8601 (UTC unless it says), epoch ms, or now-2h.")
    ] = None,
    to_time: Annotated[Optional[str], typer.Option(help="End (exclusive); default: now.")] = None,
    time_kind: Annotated[
        TimeKind, typer.Option(help="kafka (message timestamps) or event (the batches' event times).")
    ] = "kafka",
    budget_examples: Annotated[
        Optional[int], typer.Option(help="At most N examples processed over all candidates.")
    ] = None,
    budget_seconds: Annotated[Optional[float], typer.Option(help="Stop after S seconds.")] = None,
    warmup: Annotated[
        float, typer.Option(help="Share of the window every candidate trains on before scoring starts.")
    ] = 0.3,
    objective: Annotated[Objective, typer.Option(help="What halving keeps.")] = "gain",
    task: Annotated[
        Optional[str], typer.Option(help="Task the gain is measured on (default: the first binary task).")
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(help="Where sweep.json and winner-teacher.toml go (default: <state_dir>/sweeps/<run id>)."),
    ] = None,
    device: Annotated[Optional[Device], typer.Option(help="Default: teacher.device.")] = None,
    max_window_mb: Annotated[int, typer.Option(help="Refuse a window larger than this in memory.")] = 2048,
) -> None:
    """Rank candidate teachers on a retained window of the examples topic (successive halving)."""
    from rich.console import Console

    from distill.sweep.render import render_table
    from distill.sweep.replay import Window
    from distill.sweep.run import run_sweep

    try:
        cfg = _load(config, bootstrap)
        window = Window.parse(from_offset, to_offset, from_time, to_time, time_kind)
        report = run_sweep(
            cfg,
            candidates,
            window,
            budget_examples=budget_examples,
            budget_seconds=budget_seconds,
            output=output,
            objective=objective,
            task=task,
            device=device,
            warmup=warmup,
            max_window_mb=max_window_mb,
        )
    except DistillError as exc:
        _fail(exc)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or a file: do not squeeze the table into 80 columns
    console.print(render_table(report))
    typer.echo(f"report: {report['output']}/sweep.json")
    if report["winner"] is None:
        typer.secho(
            "no winner: the budget ran out before every candidate was scored once", err=True, fg=typer.colors.RED
        )
        raise typer.Exit(1)
    typer.echo(f"winner: {report['winner']}; its teacher model: {report['winner_file']}")


if __name__ == "__main__":
    app()
