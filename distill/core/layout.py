"""The columns a config declares, and the check that a batch or a source carries exactly
those, in order: every model is built from the config, so a different layout is an error."""

from __future__ import annotations

from collections.abc import Sequence

from distill.core.config import Config
from distill.core.exceptions import DecodeError
from distill.core.wire import ExampleBatch


def layout_problems(
    config: Config,
    categorical: Sequence[str],
    dense: Sequence[str],
    tasks: Sequence[tuple[str, str]] | Sequence[str],
    holder: str,
) -> list[str]:
    """What differs between the config's columns and those ``holder`` (``"the batch"``, ``"the
    source"``) has, one line per kind, naming the config key. ``tasks`` are names, or (name, type)
    pairs where the types must match too."""
    want_tasks: list = [t.name for t in config.tasks]
    if tasks and not isinstance(tasks[0], str):
        want_tasks = [(t.name, t.type) for t in config.tasks]
    pairs = {
        "features.categorical is": (config.features.categorical_names, list(categorical)),
        "features.dense is": (list(config.features.dense), list(dense)),
        "tasks are": (want_tasks, list(tasks)),
    }
    return [f"{key} {want}, {holder} has {got}" for key, (want, got) in pairs.items() if want != got]


def check_layout(batch: ExampleBatch, config: Config) -> None:
    """The batch must carry the configured columns, in order; else it is a dead letter."""
    problems = layout_problems(config, batch.categorical_names, batch.dense_names, batch.task_names, "the batch")
    if problems:
        raise DecodeError("layout_mismatch", problems[0])
