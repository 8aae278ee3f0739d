"""Work beside the learning step: on the training thread, or on a helper thread.

A student's worker decodes each example batch and its label and updates the progressive
evaluation, besides its learning step. This bench runs the `aux` student's step on batches in
memory three ways, in alternating 0.5 s slices: the step alone; the step with that work for
its batch on the same thread; and the step with the work handed to a helper thread (one batch's
work per step, released as the step ends). The ratios are each way's steps per second over the
step alone. A helper thread pays only if the training thread loses less than the work costs
inline: each torch call releases and takes back the GIL, so the helper's Python code runs in
the training thread's gaps and every hand-back waits (docs/architecture.md, "What runs on the
training thread").
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from bench.workers import SLICE_S, one_thread
from distill.core.config import load_config
from distill.core.wire import Codec, LabelBatch
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.gate import TeacherGate
from distill.learn.step import Learner, Objective
from producers.synthetic import SyntheticSource

BATCHES = 64
SLICES = 12  # per way


def run() -> list[dict]:
    cfg = load_config(None, environ={}, students=[{"name": "aux", "mode": "aux", "soft_weight": 1.0}])
    sc = cfg.student("aux")
    tasks = [t.name for t in cfg.tasks]
    source = SyntheticSource(cfg.synthetic)
    chunks = source.chunks(0, size=256)
    batches = [next(chunks).to_batch(f"b{i}", "bench", i, source) for i in range(BATCHES)]
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((b.size, len(tasks)), dtype=np.float32) for b in batches]
    codec = Codec()
    messages = [
        (
            codec.encode_examples(b),
            codec.encode_labels(LabelBatch(b.batch_id, b.example_ids_checksum, 0, i, 1, i, tasks, t, 0)),
        )
        for i, (b, t) in enumerate(zip(batches, logits, strict=True))
    ]
    evaluator = ProgressiveEvaluator(tasks, [t.type for t in cfg.tasks])

    with one_thread():
        learner = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
        gate = TeacherGate.of(sc, learner.objective.distilled, [t.type for t in cfg.tasks])

        def step(i: int) -> None:
            b, t = batches[i % BATCHES], logits[i % BATCHES]
            scored = learner.step(learner.tensors(b), t, sc.soft_weight, gate.fractions())
            assert scored is not None
            gate.update(scored.main, t, b.labels)

        def work(i: int) -> None:
            """One batch's work besides its step in the student worker: decode, evaluate."""
            (examples, label) = messages[i % BATCHES]
            batch = codec.decode_examples(*examples)
            teacher = codec.decode_labels(*label)
            evaluator.update("main", teacher.logits, batch.labels)
            evaluator.update("teacher", teacher.logits, batch.labels)

        released = threading.Semaphore(0)
        stop = threading.Event()
        handed, done = 0, [0]  # units released to the helper, and finished by it

        def helper() -> None:
            i = 0
            while True:
                released.acquire()
                if stop.is_set():
                    return
                work(i)
                i += 1
                done[0] += 1

        thread = threading.Thread(target=helper, name="bench-helper", daemon=True)
        thread.start()
        ways = ("alone", "inline", "helper")
        steps = dict.fromkeys(ways, 0)
        seconds = dict.fromkeys(ways, 0.0)
        i = 0
        for _ in range(10):  # warm-up: allocator, optimizer state
            step(i)
            work(i)
            i += 1
        for _ in range(SLICES):
            for way in ways:
                started = time.perf_counter()
                while time.perf_counter() - started < SLICE_S:
                    step(i)
                    if way == "inline":
                        work(i)
                    elif way == "helper":
                        released.release()
                        handed += 1
                    i += 1
                    steps[way] += 1
                seconds[way] += time.perf_counter() - started
                while done[0] < handed:  # outside the timing: none of its work runs in the next slice
                    time.sleep(0.001)
        stop.set()
        released.release()
        thread.join()

    rate = {way: steps[way] * batches[0].size / seconds[way] for way in ways}
    return [
        {"name": "student step alone (aux, batches in memory)", "value": rate["alone"], "unit": "examples/s"},
        {
            "name": "with each batch's decoding and evaluation on the training thread",
            "value": rate["inline"],
            "unit": "examples/s",
            "ratio": rate["inline"] / rate["alone"],
            "vs": "the step alone, in alternating 0.5 s slices",
        },
        {
            "name": "with the same work on a helper thread",
            "value": rate["helper"],
            "unit": "examples/s",
            "ratio": rate["helper"] / rate["alone"],
            "vs": "the step alone, in the same slices (under the inline row: the helper costs more than it takes)",
        },
    ]
