"""Bounded disk over a long run: a teacher and a student on the embedded broker export
three times `keep` versions; the models directory never holds more than `keep` + 1 of a
student's versions, and what is left is a Triton model repository that plain torch loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.learn.export import load_serving_model
from distill.learn.repository import ModelRepository
from student_worker.worker import StudentWorker
from teacher_worker.worker import TeacherWorker
from tests.integration.workers import produce_synthetic, run_until

KEEP = 5  # the default of students[].export.keep, set explicitly
STUDENTS = [{"name": "aux", "label_wait_s": 0.5, "checkpoint": {"every_batches": 2}, "export": {"keep": KEEP}}]


def _versions_on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.mark.slow
def test_a_run_exporting_three_times_keep_versions_keeps_at_most_keep_plus_one(make_config):
    config = make_config(topics={"partitions": 1}, students=STUDENTS)
    teacher = TeacherWorker(config)
    teacher.start()
    students = [StudentWorker(config, s["name"]) for s in STUDENTS]
    for s in students:
        s.start()
    dirs = {s.name: Path(config.model_dir(s.name)) for s in students}
    most = dict.fromkeys(dirs, 0)
    batches = 0

    def trained_all() -> bool:
        for name, d in dirs.items():
            most[name] = max(most[name], len(_versions_on_disk(d)))  # watched at every step
        return all(s.counts["batches_trained"] >= batches for s in students)

    # The stream arrives in rounds of two batches: each round is a checkpoint and an export.
    def labelled_all() -> bool:
        return sum(teacher.trained_through.values()) >= batches

    for _ in range(3 * KEEP + 1):
        batches += produce_synthetic(config, 2 * 128, batch_size=128)["batches"]
        run_until(labelled_all, [teacher.step], 60)
        run_until(trained_all, [s.step for s in students], 60)
    teacher.close()
    for s in students:
        s.close()

    for s in students:
        d = dirs[s.name]
        repo = ModelRepository(d)
        assert s.version >= 3 * KEEP, (s.name, s.version)  # exported 3 x keep versions or more
        on_disk = _versions_on_disk(d)
        assert len(on_disk) <= KEEP + 1 and most[s.name] <= KEEP + 1, (s.name, on_disk, most[s.name])
        assert on_disk[-1] == s.version == repo.latest()
        assert on_disk[-KEEP:] == list(range(s.version - KEEP + 1, s.version + 1))
        assert repo.promoted() in on_disk
        assert not list(d.glob(".staging-*")) and not list(d.rglob("*.tmp"))
        # a Triton model repository: config.pbtxt naming the promoted version, model.pt per version
        pbtxt = (d / "config.pbtxt").read_text()
        assert f'name: "{s.name}"' in pbtxt and f"versions: [ {repo.promoted()} ]" in pbtxt
        assert all((d / str(v) / "model.pt").is_file() for v in on_disk)
        newest = d / str(on_disk[-1])
        signature = json.loads((newest / "signature.json").read_text())
        width = len(signature["inputs"][0]["columns"]), len(signature["inputs"][1]["columns"])
        cat, dense = torch.randint(-(2**40), 2**40, (16, width[0])), torch.randn(16, width[1])
        with torch.no_grad():
            scripted = torch.jit.load(str(newest / "model.pt"))
            program = torch.export.load(str(newest / "model.pt2")).module()
            expected = load_serving_model(d)(cat, dense)
            torch.testing.assert_close(scripted(cat, dense), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(program(cat, dense), expected, rtol=0, atol=1e-5)
