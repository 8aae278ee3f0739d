"""Progress files stay valid JSON: NaN and inf become null."""

from __future__ import annotations

import json

from distill.core.progress import ProgressLog, clean_json


def test_nan_and_inf_become_null_in_lines_and_summary(tmp_path):
    log = ProgressLog(tmp_path / "progress", "student", "aux", every_s=60.0)
    record = {
        "auc": float("nan"),
        "loss": 0.1234567891,
        "nested": {"calibration": float("inf"), "rmse": [1.0, float("-inf"), float("nan")]},
        "pair": (float("nan"), 2),
        "count": 7,
    }
    log.write(record)
    log.write({"auc": 0.75})
    log.write_summary(record)

    raw_lines = log.lines.read_text().splitlines()
    assert len(raw_lines) == 2
    for text in raw_lines + [log.summary.read_text()]:
        assert "NaN" not in text and "Infinity" not in text

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    first = strict(raw_lines[0])
    summary = strict(log.summary.read_text())
    for got in (first, summary):
        assert got["auc"] is None
        assert got["loss"] == 0.123457
        assert got["nested"] == {"calibration": None, "rmse": [1.0, None, None]}
        assert got["pair"] == [None, 2]
        assert got["count"] == 7
        assert isinstance(got["ts"], float)
    assert strict(raw_lines[1])["auc"] == 0.75
    assert log.lines.name == "student-aux.jsonl" and log.summary.name == "student-aux.summary.json"


def test_due_after_every_s(tmp_path):
    log = ProgressLog(tmp_path, "teacher", "t", every_s=1.0)
    assert log.due()  # never written yet
    log.write({"x": 1})
    log.every_s = 3600.0
    assert not log.due()
    log.every_s = 0.0
    assert log.due()


def test_due_by_stream_position_at_most_every_min_interval(tmp_path):
    log = ProgressLog(tmp_path, "student", "aux", every_s=3600.0, every_examples=100, min_interval_s=3600.0)
    log.write({"x": 1}, examples=0)
    assert not log.due(99) and not log.due(10_000)  # far enough along, but too soon after the last line
    log.min_interval_s = 0.0
    assert not log.due(99) and log.due(100)


def test_clean_json_makes_strict_json_and_rounds_only_when_asked():
    value = {1: [float("nan"), float("inf"), 0.123456789, (2, True)], "s": "x"}
    assert clean_json(value) == {"1": [None, None, 0.123456789, [2, True]], "s": "x"}
    assert clean_json(value, digits=6) == {"1": [None, None, 0.123457, [2, True]], "s": "x"}
    json.dumps(clean_json(value), allow_nan=False)
