"""`distill models list|promote|prune`: an operator's view of a student's exports, on real ones."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from distill.cli import app
from distill.core.config import Config, ExportConfig
from distill.learn.export import export_serving_model
from distill.learn.models import RankingModel

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=WIDE)


def test_list_promote_and_prune_a_students_exports(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    cfg = Config(state_dir=tmp_path / "state")
    sc = cfg.student("none")
    model = RankingModel(cfg.features, cfg.tasks, sc.model)
    for version in (1, 2, 3):
        export_serving_model(
            model, cfg.features, cfg.tasks, sc.model, cfg.model_dir("none"), version, export=ExportConfig(keep=5)
        )

    listed = invoke("models", "list", "--student", "none", "--config", str(config))
    assert listed.exit_code == 0, listed.output
    rows = [line.split() for line in listed.output.splitlines()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert "latest,promoted" in rows[-1]

    promoted = invoke("models", "promote", "--student", "none", "--version", "2", "--config", str(config))
    assert promoted.exit_code == 0 and "promoted version 2 (latest 3)" in promoted.output, promoted.output
    assert (Path(cfg.model_dir("none")) / "PROMOTED").read_text().strip() == "2"

    pruned = invoke("models", "prune", "--student", "none", "--keep", "1", "--config", str(config))
    assert pruned.exit_code == 0, pruned.output
    assert "deleted [1]" in pruned.output and "kept [2, 3]" in pruned.output  # the promoted one stays
    assert sorted(p.name for p in Path(cfg.model_dir("none")).iterdir() if p.name.isdigit()) == ["2", "3"]


def test_clear_errors(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    unknown = invoke("models", "list", "--student", "nobody", "--config", str(config))
    assert unknown.exit_code == 2 and "no student named 'nobody'" in unknown.output, unknown.output
    empty = invoke("models", "list", "--student", "aux", "--config", str(config))
    assert empty.exit_code == 1 and "no exported versions" in empty.output, empty.output
