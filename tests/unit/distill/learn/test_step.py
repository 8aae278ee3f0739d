"""The one learning step: predict-before-train, sparse row-wise table updates, standardised
targets, soft weights, and checkpoints written before these existed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.core.checkpoint import Checkpointer
from distill.core.config import load_config
from distill.core.wire import ExampleBatch
from distill.learn.models import RankingModel, make_optimizer
from distill.learn.step import Learner, Objective, predict

FIXTURES = Path(__file__).parent / "fixtures"


def config(**over):
    base = {
        "features": {
            "categorical": [{"name": "user_id", "buckets": 13}, {"name": "item_id", "buckets": 17}],
            "dense": ["ctx0", "ctx1"],
        },
        "tasks": [{"name": "click", "type": "binary"}, {"name": "watch", "type": "regression"}],
        "teacher": {"model": {"embedding_dim": 4, "hidden": [8], "cross_layers": 1}},
        "students": [
            {
                "name": "aux",
                "mode": "aux",
                "distill_tasks": ["click", "watch"],
                "model": {"embedding_dim": 2, "hidden": [4]},
            }
        ],
    }
    return load_config(None, environ={}, **(base | over))


def batch(n: int = 32, seed: int = 0, users=None, watch_mean: float = 0.0) -> ExampleBatch:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 1000, n) if users is None else np.asarray(users)
    cat = np.stack([users, rng.integers(0, 1000, n)], 1).astype(np.int64)
    labels = np.stack([rng.integers(0, 2, n), watch_mean + rng.random(n)], 1).astype(np.float32)
    return ExampleBatch(
        batch_id=f"b{seed}",
        producer_id="t",
        seq=seed,
        event_time_ms=np.zeros(n, dtype=np.int64),
        example_ids=np.arange(n, dtype=np.int64),
        categorical_names=["user_id", "item_id"],
        categorical=cat,
        dense_names=["ctx0", "ctx1"],
        dense=rng.normal(size=(n, 2)).astype(np.float32),
        task_names=["click", "watch"],
        labels=labels,
    )


def teacher_learner(cfg) -> Learner:
    return Learner.build(cfg, cfg.teacher.model, Objective.teacher(cfg), torch.device("cpu"))


def test_scores_come_from_the_weights_before_the_step():
    learner = teacher_learner(config())
    b = learner.tensors(batch())
    before = predict(learner.model, b.categorical, b.dense)
    scored = learner.step(b)
    assert scored is not None and scored.stepped
    np.testing.assert_allclose(scored.main, before, rtol=1e-5, atol=1e-6)
    after = predict(learner.model, b.categorical, b.dense)
    assert not np.allclose(after, before, atol=1e-5)  # the step changed the model
    assert set(scored.losses) == {(0, "main"), (1, "main")}


def test_a_table_row_absent_from_the_batch_does_not_move():
    cfg = config()
    learner = teacher_learner(cfg)
    model = learner.model
    hashed = torch.remainder(torch.arange(1000) * -7046029254386353131, 13)  # user_id's rows
    users = np.arange(1000)[(hashed != 5).numpy()][:40]  # no user that hashes to row 5
    before = model.feature_rows(0).detach().clone()
    for seed in range(5):
        learner.step(learner.tensors(batch(n=40, seed=seed, users=users)))
    moved = ~torch.isclose(model.feature_rows(0).detach(), before).all(dim=1)
    assert not moved[5], "row 5 was never looked up, yet it moved"
    assert moved.sum() >= 10  # the rows the batches used did move


def test_tables_get_sparse_gradients_and_only_looked_up_rows_move():
    cfg = config(
        features={"categorical": [{"name": "user_id", "buckets": 50_021}, {"name": "item_id", "buckets": 17}],
                  "dense": ["ctx0", "ctx1"]},
        teacher={"model": {"embedding_dim": 8, "hidden": [8]}},
    )  # fmt: skip
    learner = teacher_learner(cfg)
    model = learner.model
    assert model.tables.sparse and model.tables.num_embeddings == 50_021 + 17
    before = model.tables.weight.detach().clone()
    learner.step(learner.tensors(batch(n=64, seed=1)))
    assert model.tables.weight.grad.is_sparse
    moved = ~torch.isclose(model.tables.weight.detach(), before).all(dim=1)
    assert 0 < moved[:50_021].sum() <= 64 and 0 < moved[50_021:].sum() <= 17  # only rows the batch looked up


def test_dense_adam_moves_every_row_once_momentum_builds():
    """The old optimizer, kept behind table_optimizer = "adam", for comparison: rows that a
    batch did not touch move by momentum (what row-wise updates avoid)."""
    cfg = config(teacher={"model": {"embedding_dim": 4, "hidden": [8], "table_optimizer": "adam"}})
    learner = teacher_learner(cfg)
    hashed = torch.remainder(torch.arange(1000) * -7046029254386353131, 13)
    first = np.arange(1000)[(hashed == 1).numpy()][:8]
    other = np.arange(1000)[(hashed == 2).numpy()][:8]
    learner.step(learner.tensors(batch(n=8, seed=1, users=first)))
    row1 = learner.model.feature_rows(0).detach()[1].clone()
    learner.step(learner.tensors(batch(n=8, seed=2, users=other)))
    assert not torch.allclose(learner.model.feature_rows(0).detach()[1], row1)


def test_regression_targets_are_standardised_and_scores_stay_in_their_units():
    learner = teacher_learner(config())
    for seed in range(200):
        scored = learner.step(learner.tensors(batch(seed=seed, watch_mean=50.0)))
    assert scored is not None
    model = learner.model
    assert 50.3 < model.target_mean[1].item() < 50.7  # watch ~ 50 + U(0, 1)
    assert 0.06 < model.target_var[1].item() < 0.11  # var of U(0, 1) = 1/12
    assert model.target_mean[0].item() == 0.0 and model.target_var[0].item() == 1.0
    # the head learnt the standardised target: its raw scores are around 50.5
    assert 50.0 < scored.main[:, 1].mean() < 51.0


def test_a_closed_gate_leaves_the_served_model_as_none_trains_it_while_the_aux_head_learns():
    cfg = config()
    sc = cfg.student("aux")
    a = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
    b = Learner.build(cfg, sc.model, Objective.student(cfg, sc, "none"), torch.device("cpu"))
    aux_before = a.model.aux_head.weight.detach().clone()
    rng = np.random.default_rng(0)
    for seed in range(5):
        x = batch(seed=seed)
        teacher = rng.normal(size=(x.size, 2)).astype(np.float32)
        sa = a.step(a.tensors(x), teacher, 1.0, [0.0, 0.0])
        sb = b.step(b.tensors(x), teacher, 1.0)  # mode none ignores the teacher
        np.testing.assert_allclose(sa.main, sb.main, rtol=1e-5, atol=1e-6)
        assert (1, "aux") in sa.losses and (1, "aux") not in sb.losses
    assert not torch.allclose(a.model.aux_head.weight, aux_before)  # the aux head learnt
    # gate open: the labels shape the shared layers too, and the served outputs part ways
    for seed in range(5, 8):
        x = batch(seed=seed)
        teacher = rng.normal(size=(x.size, 2)).astype(np.float32)
        a.step(a.tensors(x), teacher, 1.0, [1.0, 1.0])
        b.step(b.tensors(x), teacher, 1.0)
    after_a = a.step(a.tensors(batch(seed=10)), None).main
    after_b = b.step(b.tensors(batch(seed=10)), None).main
    assert not np.allclose(after_a, after_b, atol=1e-6)


def test_direct_mode_scales_the_soft_share_by_the_gate():
    cfg = config(
        students=[
            {
                "name": "d",
                "mode": "direct",
                "soft_weight": 0.5,
                "distill_tasks": ["click", "watch"],
                "model": {"embedding_dim": 2},
            }
        ]
    )
    sc = cfg.student("d")
    closed = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
    none = Learner.build(cfg, sc.model, Objective.student(cfg, sc, "none"), torch.device("cpu"))
    x = batch(seed=1)
    teacher = np.zeros((x.size, 2), dtype=np.float32)
    for _ in range(3):
        c, n = closed.step(closed.tensors(x), teacher, 0.5, [0.0, 0.0]), none.step(none.tensors(x), None)
        np.testing.assert_allclose(c.main, n.main, rtol=1e-5, atol=1e-6)


def test_a_student_with_a_feature_subset_reads_only_its_columns():
    cfg = config(
        students=[{"name": "few", "mode": "none", "features": ["item_id", "ctx1"], "model": {"embedding_dim": 2}}]
    )
    sc = cfg.student("few")
    features = cfg.features.subset(sc.features)
    learner = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"), features)
    assert learner.model.buckets.tolist() == [17] and learner.model.tables.num_embeddings == 17
    x = batch()
    t = learner.tensors(x)
    np.testing.assert_array_equal(t.categorical.numpy(), x.categorical[:, [1]])
    np.testing.assert_array_equal(t.dense.numpy(), x.dense[:, [1]])
    changed = batch()
    changed.categorical[:, 0] += 7  # the user id: not one of its features
    changed.dense[:, 0] += 3.0
    np.testing.assert_array_equal(
        predict(learner.model, t.categorical, t.dense),
        predict(learner.model, *(lambda u: (u.categorical, u.dense))(learner.tensors(changed))),
    )


def test_unknown_student_features_fail_at_start_up():
    with pytest.raises(Exception, match="unknown features"):
        config(students=[{"name": "x", "features": ["nope"]}])


# -- checkpoints from before the change --------------------------------------------------------


def test_old_checkpoints_load_with_their_weights_and_a_reset_optimizer(caplog):
    """Files written by the code of commit 0d681d4 (one dense Adam, raw regression heads)."""
    cfg = config()
    old = torch.load(FIXTURES / "outputs.pt", weights_only=True)
    _, teacher_state = Checkpointer(FIXTURES / "teacher").load_latest()
    _, student_state = Checkpointer(FIXTURES / "student").load_latest()
    teacher = teacher_learner(cfg)
    sc = cfg.student("aux")
    student = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
    for learner, state, outputs in ((teacher, teacher_state, old["teacher"]), (student, student_state, old["student"])):
        with caplog.at_level("WARNING"):
            learner.model.load_state_dict(state["model"])
            learner.optimizer.load_state_dict(state["optimizer"])
        assert "optimizer state reset" in caplog.text and "predates target standardisation" in caplog.text
        caplog.clear()
        # the weights are the old ones: the same outputs, regression in raw units as before
        got = predict(learner.model, old["cat"], old["dense"])
        np.testing.assert_allclose(got, outputs.numpy(), rtol=1e-5, atol=1e-6)
        assert learner.model.target_count.item() < 0  # frozen: the old heads keep raw units
        scored = learner.step(learner.tensors(batch(seed=3, watch_mean=9.0)))
        assert scored is not None and scored.stepped  # and it trains on
        assert learner.model.target_mean[1].item() == 0.0
        # a checkpoint written now round-trips exactly
        fresh = RankingModel(
            cfg.features,
            cfg.tasks,
            sc.model if learner is student else cfg.teacher.model,
            aux_tasks=["click", "watch"] if learner is student else None,
        )
        fresh.load_state_dict(learner.model.state_dict())
        make_optimizer(fresh, cfg.teacher.model)
        assert fresh.target_count.item() < 0


def test_a_checkpoint_of_a_student_that_distilled_other_tasks_restarts_only_its_aux_head(caplog):
    """distill_tasks changed (e.g. the default became binary tasks only): the served layers
    and heads keep their weights; the aux head and the optimizer's moments start again."""
    cfg = config(students=[{"name": "aux", "mode": "aux", "model": {"embedding_dim": 2, "hidden": [4]}}])
    sc = cfg.student("aux")
    assert cfg.distilled_tasks(sc) == [0]  # the default: the binary task only
    learner = Learner.build(cfg, sc.model, Objective.student(cfg, sc), torch.device("cpu"))
    _, state = Checkpointer(FIXTURES / "student").load_latest()  # its aux head distilled both
    with caplog.at_level("WARNING"):
        learner.model.load_state_dict(state["model"])
        learner.optimizer.load_state_dict(state["optimizer"])
    assert "aux head starts again" in caplog.text and "optimizer state reset" in caplog.text
    torch.testing.assert_close(learner.model.head.weight, state["model"]["head.weight"])
    assert learner.model.aux_head.weight.shape == (1, 4)
    scored = learner.step(learner.tensors(batch()), np.zeros((32, 2), dtype=np.float32), 1.0, [1.0])
    assert scored is not None and scored.stepped and (0, "aux") in scored.losses
