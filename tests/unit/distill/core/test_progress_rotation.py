"""Progress files are bounded: rotated at a size cap with a few old files kept, and their readers
(the live view's last line, the report's curve) keep working across a rotation."""

from __future__ import annotations

import json
import threading

from distill.core import progress
from distill.core.progress import ProgressLog, history, rotated
from distill.local.report import _plot
from distill.local.up import _last_line

# About the size of a student's progress line (109 MB a day at one a second).
PADDING = "x" * 1200


def files_of(log: ProgressLog) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in log.lines.parent.iterdir() if p.name.startswith(log.lines.name)}


def test_a_long_run_stays_bounded(tmp_path):
    log = ProgressLog(tmp_path, "student", "aux", max_bytes=64 * 1024, keep=2)
    n = 5000  # 6 MB unrotated: over 30 times the bound
    for i in range(n):
        log.write({"i": i, "pad": PADDING})
    sizes = files_of(log)
    assert set(sizes) == {"student-aux.jsonl", "student-aux.jsonl.1", "student-aux.jsonl.2"}, sizes
    assert all(size <= 64 * 1024 for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 3 * 64 * 1024
    got = [r["i"] for r in history(log.lines)]
    # The newest records, in order and without a gap; the oldest are gone.
    assert got == list(range(got[0], n)) and got[0] > 0
    assert len(got) > 2 * (64 * 1024) // 1300
    assert _last_line(log.lines)["i"] == n - 1


def test_defaults_bound_a_day_of_a_student_well_under_its_unrotated_size():
    assert (progress.KEEP + 1) * progress.MAX_BYTES < 109e6 / 2
    assert progress.KEEP >= 1, "the report's curve needs more than the newest file"


def test_keep_zero_keeps_only_the_current_file(tmp_path):
    log = ProgressLog(tmp_path, "teacher", "t", max_bytes=4096, keep=0)
    for i in range(100):
        log.write({"i": i, "pad": PADDING})
    assert set(files_of(log)) == {"teacher-t.jsonl"}
    assert [r["i"] for r in history(log.lines)][-1] == 99


def test_a_restarted_worker_appends_and_rotates_its_old_file(tmp_path):
    first = ProgressLog(tmp_path, "student", "none", max_bytes=16384)
    for i in range(5):
        first.write({"i": i, "pad": PADDING})
    again = ProgressLog(tmp_path, "student", "none", max_bytes=16384)  # the same worker, restarted
    for i in range(5, 20):
        again.write({"i": i, "pad": PADDING})
    assert rotated(again.lines, 1).exists()
    assert [r["i"] for r in history(again.lines)] == list(range(20))


def test_the_current_file_always_has_a_last_line_during_rotations(tmp_path):
    """``distill up`` shows each worker's last line, read while the worker writes: a rotation
    must never leave the current file missing, empty, or holding only part of a line. (A line
    being appended can be read half-written, rotation or not: a reader takes the last complete
    line.)"""
    log = ProgressLog(tmp_path, "student", "aux", max_bytes=8 * 1024, keep=2)
    log.write({"i": 0, "pad": PADDING})
    stop = threading.Event()
    misses: list[str] = []
    seen: list[int] = []

    def read() -> None:
        while not stop.is_set():
            try:
                data = log.lines.read_bytes()
            except FileNotFoundError:
                misses.append("missing")
                continue
            complete = data[: data.rfind(b"\n") + 1].splitlines()
            if not complete:
                misses.append(f"no complete line in {len(data)} bytes")
                continue
            seen.append(json.loads(complete[-1])["i"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 3000):  # about 500 rotations
            log.write({"i": i, "pad": PADDING})
    finally:
        stop.set()
        reader.join()
    assert rotated(log.lines, 2).exists()
    assert not misses, f"{len(misses)} of {len(misses) + len(seen)} reads: {misses[:3]}"
    assert seen == sorted(seen), "the last line went back in time"
    assert _last_line(log.lines)["i"] == 2999  # the live view's own reader


def test_history_gives_a_record_once_while_dot_one_is_the_current_file(tmp_path):
    """Mid-rotation, .1 and the current file are one file (a hard link): read together, the
    records must not come twice."""
    log = ProgressLog(tmp_path, "teacher", "t")
    for i in range(3):
        log.write({"i": i})
    rotated(log.lines, 1).hardlink_to(log.lines)
    assert [r["i"] for r in history(log.lines)] == [0, 1, 2]


def test_the_report_curve_reads_the_rotated_files(tmp_path):
    progress_dir = tmp_path / "progress"
    log = ProgressLog(progress_dir, "student", "aux", max_bytes=16 * 1024, keep=2)
    for i in range(40):
        log.write({"examples_trained": i, "metrics": {"click": {"main": {"windowed": {"logloss": 0.6, "auc": 0.7}}}}})
        log.write({"pad": PADDING})  # lines without metrics are skipped by the plot
    assert rotated(log.lines, 1).exists()
    report = {
        "teacher": {"name": "teacher", "metrics": {"click": {"auc": 0.7}}},
        "students": {"aux": {"mode": "aux"}},
    }
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    plotted: list[list] = []
    real_plot = Axes.plot

    def recording_plot(self, xs, *args, **kwargs):
        plotted.append(list(xs))
        return real_plot(self, xs, *args, **kwargs)

    Axes.plot = recording_plot  # what the report draws, without reading the picture back
    try:
        _plot(report, progress_dir, tmp_path / "report.png")
    finally:
        Axes.plot = real_plot
    assert (tmp_path / "report.png").stat().st_size > 0
    # The curve spans the rotated files too, not only the newest (which holds a few lines).
    (logloss, auc) = plotted
    assert logloss == auc == list(range(logloss[0], 40)) and len(logloss) > 12
