"""The ``distill`` command line. Every option has the same name here, in config and in env."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from distill.config import Config, load_config
from distill.exceptions import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continuous knowledge distillation over Kafka.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML or YAML config file (or DISTILL_CONFIG).")]
BootstrapOpt = Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers).")]


def _load(config: Path | None, bootstrap: str | None = None, **overrides) -> Config:
    if bootstrap:
        overrides.setdefault("kafka", {})["bootstrap_servers"] = bootstrap
    return load_config(config, **overrides)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 9092,
    host: Annotated[str, typer.Option(help="Loopback address to bind.")] = "127.0.0.1",
    log_file: Annotated[Path, typer.Option(help="Where the broker logs.")] = Path("runs/broker.log"),
) -> None:
    """Run the embedded Kafka-protocol broker (memory only) until Ctrl-C."""
    from distill.broker import EmbeddedBroker

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
def topics(config: ConfigOpt = None, bootstrap: BootstrapOpt = None) -> None:
    """Create the examples, labels and dead-letter topics; check the partition counts."""
    from distill.kafka import Clients, ensure_topics

    try:
        cfg = _load(config, bootstrap)
        ensure_topics(cfg, Clients(cfg.kafka, "admin").admin(), seconds=30)
        typer.echo(f"topics ready: {cfg.topics.examples}, {cfg.topics.labels} ({cfg.topics.partitions} partitions) and their .dlq")
    except DistillError as exc:
        _fail(exc)


@app.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate a config file (and DISTILL_* overrides) and print the result."""
    try:
        cfg = _load(config)
    except DistillError as exc:
        _fail(exc)
    typer.echo(cfg.model_dump_json(indent=2, exclude={"kafka": {"sasl_password", "ssl_key_password"}}))


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    app()


if __name__ == "__main__":
    main()
