"""``python -m producers SOURCE --config FILE``: run one producer until its data ends or SIGTERM.

Options carry the names of the ``[producer]`` config fields; given ones override the config.
Prints the counts as one JSON line on stdout when it stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from distill.config import load_config
from distill.exceptions import DistillError
from distill.service import configure_logging
from producers.sources import SOURCES, load_config_for

app = typer.Typer(add_completion=False, help="Produce examples into the examples topic.")


@app.command()
def produce(
    source: Annotated[str, typer.Argument(help=f"One of {', '.join(SOURCES)}.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML or YAML config file (or DISTILL_CONFIG)."),
    ] = None,
    bootstrap: Annotated[
        str | None,
        typer.Option(help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)."),
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="Stop after this many examples (this run).")] = None,
    rate: Annotated[float | None, typer.Option(help="Examples per second; default: as fast as possible.")] = None,
    speedup: Annotated[
        float | None, typer.Option(help="Replay event time this many times faster than real time.")
    ] = None,
    position_file: Annotated[Path | None, typer.Option(help="Resume from and record delivered positions here.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per batch (message).")] = None,
    linger_ms: Annotated[float | None, typer.Option(help="Send a partial batch after this long.")] = None,
    partitioner: Annotated[str | None, typer.Option(help="user or round_robin.")] = None,
    producer_id: Annotated[str | None, typer.Option(help="Prefix of the batch ids.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of /metrics, /healthz, /readyz (0: any free port).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="movielens only: the ml-100k folder, if not the recbole wheel's."),
    ] = None,
    preset: Annotated[
        bool,
        typer.Option(help="Use the source's features and tasks preset unless the config sets them."),
    ] = True,
) -> None:
    """Produce SOURCE (synthetic, movielens or file) into the examples topic."""
    from producers.service import run_producer

    if source not in SOURCES:
        typer.secho(
            f"error: unknown source {source!r}; choose one of {list(SOURCES)}",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(2)
    overrides = {"kafka": {"bootstrap_servers": bootstrap}} if bootstrap else {}
    try:
        cfg = load_config_for(source, config, **overrides) if preset else load_config(config, **overrides)
        configure_logging("producer", producer_id or cfg.producer.producer_id)
        result = run_producer(
            cfg,
            source,
            source_options={"data_dir": data_dir} if data_dir is not None else None,
            max_examples=max_examples,
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
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result))


if __name__ == "__main__":
    app()
