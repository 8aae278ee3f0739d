"""What stale labels cost, in memory: ``python -m bench.label_staleness [--every 1 4 16 64]``.

The teacher learns through ``Learner.step`` on a source's batches in one interleaved stream
order (as ``bench.distillation`` builds it), its labels being each step's own scores, as the
single teacher process gives them. Beside it, copies of the teacher refreshed every K batches
(as a labeler refreshes from published checkpoints) score each batch before the teacher trains
on it. Prints each copy's progressive log loss and AUC on the first binary task against the
fresh labels': the price of a pool whose labels are K batches stale.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.distillation import interleave, stream_batches
from distill.core.presets import load_config_for
from distill.learn.evaluation import ProgressiveEvaluator
from distill.learn.step import Learner, Objective, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="synthetic")
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4, 16, 64], help="refresh every K batches")
    parser.add_argument("--seed", type=int, default=0, help="the stream order")
    args = parser.parse_args()

    config = load_config_for(args.source)
    batches = interleave(stream_batches(config, args.source, args.examples), seed=args.seed)
    names, kinds = [t.name for t in config.tasks], [t.type for t in config.tasks]
    task = next(t.name for t in config.tasks if t.type == "binary")
    teacher = Learner.build(config, config.teacher.model, Objective.teacher(config), torch.device("cpu"))
    copies = {k: copy.deepcopy(teacher.model).eval() for k in args.every}
    stale = {k: ProgressiveEvaluator(names, kinds) for k in args.every}
    fresh = ProgressiveEvaluator(names, kinds)
    for i, batch in enumerate(batches):
        tensors = teacher.tensors(batch)
        for k, model in copies.items():
            if i % k == 0:
                model.load_state_dict(teacher.model.state_dict())
            stale[k].update("main", predict(model, tensors.categorical, tensors.dense), batch.labels)
        scored = teacher.step(tensors)
        assert scored is not None
        fresh.update("main", scored.main, batch.labels)
    base = fresh.snapshot()[task]["main"]["cumulative"]
    print(f"{len(batches)} batches; fresh labels: {task} log loss {base['logloss']:.4f}, AUC {base['auc']:.4f}")
    for k in args.every:
        s = stale[k].snapshot()[task]["main"]["cumulative"]
        print(
            f"refreshed every {k:>3} batches: log loss {100 * (s['logloss'] / base['logloss'] - 1):+.2f}%, "
            f"AUC {s['auc'] - base['auc']:+.4f}"
        )


if __name__ == "__main__":
    main()
