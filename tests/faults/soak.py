"""Soak: the whole pipeline at a sustained rate for a bounded time (``make soak``; not in ``make test``).

Producer, teacher and two students run as real processes against their own embedded broker.
The producer runs at ``--rate`` examples/s: the rate the teacher sustains on this machine
beside two students (about 20k/s on 2 cores), not the producer's own ceiling (about 450k/s),
which would only build a backlog that no drain time could clear. Every few seconds the RSS
of each worker is sampled (/proc/<pid>/status VmRSS). Checks: memory stays bounded (the last
minute's max RSS within RSS_GROWTH x the first minute's max, per worker) and lag returns to
zero once the producer stops (each student trained every batch once). Prints a summary; exit
status 1 on a failed check.

    python -m tests.faults.soak [--duration 150] [--drain 180] [--rate 15000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from distill.core.config import load_config
from distill.local.broker import EmbeddedBroker
from tests.faults.conftest import Worker
from tests.integration.workers import stop as stop_proc

RSS_GROWTH = 1.3
STUDENTS = [{"name": "aux", "mode": "aux", "label_wait_s": 2.0}, {"name": "none", "mode": "none", "label_wait_s": 2.0}]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=150.0, help="seconds the producer runs")
    ap.add_argument("--drain", type=float, default=180.0, help="seconds allowed for lag to reach zero")
    ap.add_argument("--sample", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=15_000.0, help="examples/s the producer offers")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distill-soak-"))
    failures: list[str] = []
    with EmbeddedBroker(log_file=tmp / "broker.log") as broker:
        cfg = load_config(
            None,
            environ={},
            state_dir=str(tmp / "state"),
            students=STUDENTS,
            kafka={"bootstrap_servers": broker.bootstrap, "session_timeout_ms": 6000},
            topics={"partitions": 2},
            producer={"batch_size": 256},
            synthetic={"examples": 1_000_000_000},
        )  # endless within --duration
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        c = ["--config", str(path)]
        workers = {"teacher": Worker(["teacher", *c], tmp / "teacher.log")}
        for s in STUDENTS:
            workers[s["name"]] = Worker(["student", "--name", s["name"], *c], tmp / f"{s['name']}.log")
        producer = Worker(["produce", "synthetic", *c, "--rate", str(args.rate)], tmp / "producer.log")
        for w in [*workers.values(), producer]:
            w.start()
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in workers}
        started = time.monotonic()
        try:
            while time.monotonic() - started < args.duration:
                for n, w in workers.items():
                    if not w.alive():
                        failures.append(f"{n} exited: {w.tail(800)}")
                        raise SystemExit
                    samples[n].append((time.monotonic() - started, rss_mib(w.proc.pid)))
                time.sleep(args.sample)
            stop_proc(producer.proc, 60)
            produced = metric_from_log(producer)
            drain_start = time.monotonic()
            lagging = {s["name"]: None for s in STUDENTS}
            while time.monotonic() - drain_start < args.drain:
                lagging = {
                    s["name"]: produced - workers[s["name"]].metric("distill_student_examples_trained_total")
                    for s in STUDENTS
                }
                if all(v <= 0 for v in lagging.values()):
                    break
                time.sleep(1.0)
            drained_s = time.monotonic() - drain_start
            if any(v != 0 for v in lagging.values()):
                failures.append(f"examples not trained {args.drain:.0f}s after the producer stopped: {lagging}")
            rates = {
                n: w.metric("distill_student_examples_per_second") or w.metric("distill_teacher_examples_per_second")
                for n, w in workers.items()
            }
            for n, w in workers.items():
                if stop_proc(w.proc, 60) != 0:
                    failures.append(f"{n} did not stop cleanly: {w.tail(800)}")
        except SystemExit:
            drained_s, produced, rates = float("nan"), 0, {}
        finally:
            for w in [*workers.values(), producer]:
                w.kill()
    print(
        f"soak: {args.duration:.0f}s offered {args.rate:,.0f} examples/s, {produced:,} examples produced "
        f"({produced / args.duration:,.0f}/s), lag zero {drained_s:.1f}s after the producer stopped"
    )
    for n, pts in samples.items():
        first = [r for t, r in pts if t <= 60] or [0]
        last = [r for t, r in pts if t >= pts[-1][0] - 60] if pts else [0]
        ok = max(last) <= RSS_GROWTH * max(first)
        print(
            f"  {n:8s} RSS first-minute max {max(first):7.1f} MiB, last-minute max {max(last):7.1f} MiB "
            f"({max(last) / max(first):.2f}x) {'ok' if ok else 'GROWING'}; rate {rates.get(n, 0):,.0f} ex/s"
        )
        if not ok:
            failures.append(f"{n}: RSS grew {max(last) / max(first):.2f}x (limit {RSS_GROWTH}x)")
    if args.duration < 120:
        print("  (under 120 s the first and last minutes overlap: the RSS check is weak)")
    for s in STUDENTS:
        summary = json.loads((cfg.progress_dir() / f"student-{s['name']}.summary.json").read_text())
        if not (
            summary["batches_trained"] == summary["unique_batches_trained"] and summary["examples_trained"] == produced
        ):
            failures.append(
                f"student {s['name']}: {summary['batches_trained']} batches, "
                f"{summary['unique_batches_trained']} unique, {summary['examples_trained']} of {produced} examples"
            )
    for f in failures:
        print("FAIL:", f)
    print(f"state and logs: {tmp}")
    return 1 if failures else 0


def metric_from_log(producer: Worker) -> int:
    """The producer prints its counts as one JSON line when it stops."""
    for line in reversed(producer.log.read_text().splitlines()):
        if line.startswith("{") and '"examples"' in line:
            return int(json.loads(line)["examples"])
    raise SystemExit(f"the producer did not report its count: {producer.tail(800)}")


if __name__ == "__main__":
    sys.exit(main())
