"""The report of a ``distill up`` run: report.json, report.md and report.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.core.progress import clean_json, history


def _first_binary(report: dict) -> str | None:
    for task, values in report["teacher"]["metrics"].items():
        if "auc" in values:
            return task
    return None


def _markdown(report: dict) -> str:
    tasks = list(report["teacher"]["metrics"])
    baseline = next((s for s in report["students"].values() if s["mode"] == "none"), None)
    lines = [
        f"# online-distill run: {report['source']}",
        "",
        f"{report['examples_produced']:,} examples in {report['duration_s']:.0f} s; "
        f"teacher labelled {report['teacher']['examples_labeled']:,}.",
        "",
    ]
    pool = report["teacher"].get("pool")
    if pool:
        per = ", ".join(f"{name} {s['examples_labeled']:,}" for name, s in pool["labelers"].items())
        lines += [
            f"Teacher at scale: the trainer trained {pool['examples_trained']:,} examples and published "
            f"{pool['versions_published']} checkpoints; labelled by {per}.",
            "",
        ]
    lines += [
        "Progressive (predict-before-train) metrics of the serving head over the whole stream.",
        "",
    ]
    header = ["model", "mode", "params", "examples", "ex/s", "joined/missing/late/dup"]
    for task in tasks:
        for key in report["teacher"]["metrics"][task]:
            header.append(f"{task} {key}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name: str, mode: str, entry: dict, join: str) -> str:
        cells = [
            name,
            mode,
            f"{entry.get('params') or 0:,}",
            f"{entry.get('examples_trained', entry.get('examples_labeled', 0)):,}",
            f"{entry.get('examples_per_s') or 0:,.0f}",
            join,
        ]
        for task in tasks:
            for key, value in entry["metrics"][task].items():
                cell = "-" if value is None else f"{value:.4f}"
                if baseline is not None and entry is not baseline and mode != "teacher" and value is not None:
                    base = baseline["metrics"][task].get(key)
                    if base is not None and key in ("auc", "logloss", "rmse"):
                        cell += f" ({value - base:+.4f})"
                cells.append(cell)
        return "| " + " | ".join(cells) + " |"

    lines.append(row("teacher", "teacher", report["teacher"], "-"))
    for name, s in report["students"].items():
        j = s["join"]
        lines.append(row(name, s["mode"], s, f"{j['joined']}/{j['missing']}/{j['late']}/{j['duplicate']}"))
    lines += [
        "",
        "Numbers in brackets: difference to the `none` student (distillation off). "
        "Lower log loss / RMSE and higher AUC are better.",
        "",
    ]
    lines += _distillation(report, baseline)
    lines += ["![progress](report.png)", ""]
    return "\n".join(lines)


def gains(report: dict) -> dict[str, Any]:
    """Per task, in percent of the `none` student's loss (log loss, or RMSE), on the batches
    the students trained: how far the teacher's labels lead it, and how much each student gains."""
    baseline = next((s for s in report["students"].values() if s["mode"] == "none"), None)
    if baseline is None:
        return {}
    out: dict[str, Any] = {}
    for task, values in baseline["metrics"].items():
        key = "logloss" if "logloss" in values else "rmse"
        base = values.get(key)
        labels = baseline.get("teacher_on_same_batches", {}).get(task, {}).get(key)
        if not base:
            continue
        out[task] = {
            "metric": key,
            "teacher_lead_pct": None if labels is None else 100 * (base - labels) / base,
            "student_gain_pct": {
                name: 100 * (base - s["metrics"][task][key]) / base
                for name, s in report["students"].items()
                if s is not baseline and s["metrics"][task].get(key) is not None
            },
        }
    return out


def _distillation(report: dict, baseline: dict | None) -> list[str]:
    found = gains(report)
    if not found:
        return []
    launch = report.get("launch_after") or 0
    where = f" (the students started after the teacher's first {launch:,} examples)" if launch else ""
    lines = [f"Distillation, in % of the `none` student's loss on the batches the students trained{where}:", ""]
    names = list(next(iter(found.values()))["student_gain_pct"])
    lines += ["| task | teacher's labels lead `none` by | " + " | ".join(f"`{n}` gains" for n in names) + " |"]
    lines += ["|" + "---|" * (2 + len(names))]
    for task, g in found.items():
        lead = "-" if g["teacher_lead_pct"] is None else f"{g['teacher_lead_pct']:+.2f}%"
        cells = [f"{g['student_gain_pct'][n]:+.2f}%" for n in names]
        lines.append(f"| {task} ({g['metric']}) | {lead} | " + " | ".join(cells) + " |")
    gated = {n: s["gate"] for n, s in report["students"].items() if s.get("gate")}
    if gated:
        lines += ["", "Teacher-quality gate at the end (the labels' smoothed lead, the soft weight in effect):", ""]
        for name, tasks in gated.items():
            parts = [
                f"{task} lead {v['lead']:+.2%}, weight {v['soft_weight']:.2f}" + ("" if v["enabled"] else " (gate off)")
                for task, v in tasks.items()
                if v.get("lead") is not None
            ]
            lines.append(f"- `{name}`: " + "; ".join(parts))
    features = {n: s.get("features") for n, s in report["students"].items()}
    if any(f and f != report["teacher"].get("features") for f in features.values()):
        lines += ["", "Features: teacher " + ", ".join(report["teacher"].get("features") or [])]
        lines += [f"- `{n}`: " + ", ".join(f or []) for n, f in features.items()]
    return lines + [""]


def _plot(report: dict, progress_dir: Path, target: Path) -> bool:
    """Draw report.png; False without matplotlib, an optional dependency (the extra "report"),
    which the worker images do not carry."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = _first_binary(report)
    metric = "logloss"
    if task is None:
        task, metric = next(iter(report["teacher"]["metrics"])), "rmse"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("teacher", report["teacher"]["name"], "teacher", "examples_labeled")]
    series += [("student", name, f"{name} ({s['mode']})", "examples_trained") for name, s in report["students"].items()]
    for role, name, label, x_key in series:
        # With the rotated files (.1, .2): a long run's curve keeps what is still on disk.
        records = list(history(progress_dir / f"{role}-{name}.jsonl"))
        if not records:
            continue
        xs, ys_metric, ys_auc = [], [], []
        for rec in records:
            values = rec.get("metrics", {}).get(task, {}).get("main", {}).get("windowed", {})
            if values.get(metric) is None:
                continue
            xs.append(rec.get(x_key, rec.get("examples_trained", 0)))  # a pool's trainer labels nothing
            ys_metric.append(values[metric])
            ys_auc.append(values.get("auc"))
        axes[0].plot(xs, ys_metric, label=label, lw=2 if role == "teacher" else 1.2)
        if metric == "logloss":
            axes[1].plot(xs, ys_auc, label=label, lw=2 if role == "teacher" else 1.2)
    axes[0].set_title(f"{task}: windowed progressive {metric}")
    axes[1].set_title(f"{task}: windowed progressive AUC")
    for ax in axes:
        ax.set_xlabel("stream position (examples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], directory: Path, progress_dir: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    report = clean_json(report, digits=6)
    report["distillation"] = gains(report)
    paths = {"json": directory / "report.json", "md": directory / "report.md", "png": directory / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["md"].write_text(_markdown(report))
    if not _plot(report, progress_dir, paths["png"]):
        del paths["png"]
    return paths
