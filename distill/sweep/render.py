"""What a sweep leaves behind: ``sweep.json``, the winner as a config snippet, the table."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from distill.core.config import Config, ModelConfig
from distill.core.files import atomic_write
from distill.core.progress import clean_json

# -- output ----------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string


def winner_toml(report: dict[str, Any]) -> str:
    """The winner's ``[teacher.model]``, to merge over the config the sweep ran with."""
    win = next(c for c in report["candidates"] if c["name"] == report["winner"])
    model, gain = win["model"], win["proxy"]["gain"]
    how = f"rung {win['rung_reached']} of {win['rungs']}, {win['examples']:,} examples"
    if gain is not None and not math.isnan(gain):
        how += f"; proxy-student {report['task']} {report['metric']} {gain:+.5f} vs `none`"
    lines = [
        f"# distill sweep {report.get('run_id', '')}: {win['name']!r} won among "
        f"{len(report['candidates'])} candidates ({how}).",
        "# Use it over the config the sweep ran with: paste the table into that file, or run",
        f"#   DISTILL_TEACHER__MODEL='{json.dumps(model, separators=(',', ':'))}' distill teacher --config CONFIG",
        "",
        "[teacher.model]",
        *(f"{k} = {_toml_value(v)}" for k, v in model.items()),
    ]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], config: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if report["winner"] is not None:
        text = winner_toml(report)
        # The file must say exactly what won: read it back as the teacher worker would.
        parsed = ModelConfig.model_validate(tomllib.loads(text)["teacher"]["model"])
        won = next(c["model"] for c in report["candidates"] if c["name"] == report["winner"])
        if parsed.model_dump() != won:
            raise RuntimeError(f"winner-teacher.toml reads back as {parsed}, not {won}")
        atomic_write(out_dir / "winner-teacher.toml", text.encode())
        report["winner_file"] = str(out_dir / "winner-teacher.toml")
    report["output"] = str(out_dir)
    atomic_write(out_dir / "sweep.json", json.dumps(clean_json(report), indent=2).encode())


def _f(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render_table(report: dict[str, Any]) -> Table:
    task, metric = report["task"], report["metric"]
    spent = report["budget"].get("exhausted")
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"distill sweep: gain = `none` student's {task} {metric} - aux proxy's "
        f"(objective {report['objective']}" + (f"; --budget-{spent} ran out)" if spent else ")"),
        caption="teacher metrics: progressive, on what it processed; cost: teacher compute "
        "(label + train) per 1,000 examples; * winner",
    )
    binary = metric == "logloss"
    cols = [
        "#",
        "candidate",
        "rung",
        "examples",
        *(["AUC"] if binary else []),
        metric,
        "gain",
        "params",
        "kFLOP/ex",
        "teacher s",
        "gain/GFLOP",
        "gain/s",
    ]
    for col in cols:
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for c in report["candidates"]:
        t = c["teacher"]
        tm = t["metrics"].get(task, {})
        table.add_row(
            str(c["rank"]),
            c["name"] + (" *" if c["name"] == report["winner"] else ""),
            f"{c['rung_reached']}/{c['rungs']}",
            f"{c['examples']:,}",
            *([_f(tm.get("auc"))] if binary else []),
            _f(tm.get(metric)),
            _f(c["proxy"]["gain"], "+.4f"),
            f"{t['params']:,}",
            _f(t["flops_per_example"] / 1e3, ",.1f"),
            _f(t["seconds"], ".1f"),
            _f(c["gain_per_gflop"], "+.3g"),
            _f(c["gain_per_second"], "+.3g"),
        )
    return table
