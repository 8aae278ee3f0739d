"""The ranking model family: shapes, hashing, sizes, batching, devices and real (small) training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.core.config import CategoricalFeature, Config, FeaturesConfig, ModelConfig, TaskConfig
from distill.core.wire import ExampleBatch
from distill.learn.losses import hard_losses
from distill.learn.models import (
    RankingModel,
    batch_tensors,
    make_optimizer,
    resolve_device,
    target_moments,
    weights_finite,
)

TASKS = [TaskConfig(name="click"), TaskConfig(name="watch", type="regression")]


def small_features(buckets=(7, 11), dense: int = 3) -> FeaturesConfig:
    return FeaturesConfig(
        categorical=[CategoricalFeature(name=f"c{i}", buckets=b) for i, b in enumerate(buckets)],
        dense=[f"d{i}" for i in range(dense)],
    )


def small_model(
    aux=("click",),
    cross: int = 1,
    hidden=(8,),
    emb: int = 4,
    dropout: float = 0.0,
    buckets=(7, 11),
    dense: int = 3,
) -> RankingModel:
    torch.manual_seed(0)
    return RankingModel(
        small_features(buckets, dense),
        TASKS,
        ModelConfig(embedding_dim=emb, hidden=list(hidden), cross_layers=cross, dropout=dropout),
        aux_tasks=list(aux) if aux is not None else None,
    )


def inputs(n: int, k: int = 2, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(-(2**62), 2**62, (n, k), generator=g, dtype=torch.long)
    dense = torch.randn(n, d, generator=g)
    return cat, dense


def test_output_shapes_with_and_without_aux_heads():
    cat, dense = inputs(5)
    main, aux = small_model(aux=("click", "watch"))(cat, dense)
    assert main.shape == (5, 2)
    assert aux is not None and aux.shape == (5, 2)

    main, aux = small_model(aux=("click",))(cat, dense)
    assert main.shape == (5, 2)
    assert aux is not None and aux.shape == (5, 1)

    main, aux = small_model(aux=None)(cat, dense)
    assert main.shape == (5, 2)
    assert aux is None


def test_default_config_model_runs_on_a_wire_batch(make_batch):
    cfg = Config()
    model = RankingModel(cfg.features, cfg.tasks, cfg.students[0].model, aux_tasks=[t.name for t in cfg.tasks])
    cat, dense, labels = batch_tensors([make_batch(12)], torch.device("cpu"))
    main, aux = model(cat, dense)
    assert main.shape == (12, len(cfg.tasks)) and aux is not None and aux.shape == (12, len(cfg.tasks))
    assert labels.shape == (12, len(cfg.tasks))
    assert torch.isfinite(main).all() and torch.isfinite(aux).all()


@pytest.mark.parametrize(
    "ids",
    [
        [0, 1, -1, 2**63 - 1, -(2**63)],
        [2**62 + 12345, -(2**62) - 7, 10**18, -(10**18), 42],
    ],
)
def test_hashing_maps_any_int64_into_range(ids):
    model = small_model(buckets=(7, 11))
    col = torch.tensor(ids, dtype=torch.long)
    cat = torch.stack([col, col.flip(0)], dim=1)
    main, _ = model(cat, torch.zeros(len(ids), 3))
    assert torch.isfinite(main).all()
    for hashed, buckets in zip(model.hashed_ids(cat).T, (7, 11), strict=True):
        assert hashed.dtype == torch.long
        assert int(hashed.min()) >= 0 and int(hashed.max()) < buckets


def test_hashing_spreads_sequential_ids_over_buckets():
    model = small_model(buckets=(101, 11))
    ids = torch.arange(10_000, dtype=torch.long)
    hashed = model.hashed_ids(torch.stack([ids, ids], dim=1))[:, 0]
    counts = torch.bincount(hashed, minlength=101)
    assert int((counts > 0).sum()) == 101  # every bucket used
    assert int(counts.max()) < 2 * 10_000 / 101  # no bucket badly overloaded


def test_same_id_same_embedding_and_huge_ids_are_deterministic():
    model = small_model()
    cat = torch.tensor([[2**63 - 1, -(2**63)], [2**63 - 1, -(2**63)]], dtype=torch.long)
    dense = torch.ones(2, 3)
    main, aux = model(cat, dense)
    torch.testing.assert_close(main[0], main[1])
    torch.testing.assert_close(aux[0], aux[1])


def test_param_count_and_serving_only_excludes_aux_head():
    # in_dim = 2 * 4 + 3 = 11
    model = small_model(aux=("click", "watch"), cross=1, hidden=(8,), emb=4, buckets=(7, 11), dense=3)
    tables = (7 + 11) * 4
    layer_norm = 3 + 3
    cross = 11 * 11 + 11
    tower = 11 * 8 + 8
    head = 8 * 2 + 2
    aux_head = 8 * 2 + 2
    assert model.param_count() == tables + layer_norm + cross + tower + head + aux_head
    assert model.param_count(serving_only=True) == tables + layer_norm + cross + tower + head

    no_aux = small_model(aux=None, cross=1, hidden=(8,), emb=4)
    assert no_aux.param_count() == no_aux.param_count(serving_only=True) == model.param_count(serving_only=True)


def test_flops_per_example_matches_a_hand_count():
    # in_dim = 2 * 4 + 3 = 11; 2 cross layers; tower 11 -> 8 -> 5; heads 5 -> 2 (+ 1 aux)
    model = small_model(aux=("click",), cross=2, hidden=(8, 5), emb=4, dense=3)
    macs = 2 * 11 * 11 + 11 * 8 + 8 * 5 + 5 * (2 + 1)
    assert model.flops_per_example == 2 * macs

    no_cross = small_model(aux=None, cross=0, hidden=(6,), emb=2, dense=0)
    # in_dim = 2 * 2 = 4; tower 4 -> 6; head 6 -> 2
    assert no_cross.flops_per_example == 2 * (4 * 6 + 6 * 2)


def test_model_without_dense_features():
    model = small_model(aux=None, dense=0)
    cat, _ = inputs(4)
    main, aux = model(cat, torch.zeros(4, 0))
    assert main.shape == (4, 2) and aux is None


def _batch(n: int, seq: int, k: int = 2, d: int = 3, t: int = 2) -> ExampleBatch:
    rng = np.random.default_rng(seq)
    # read-only views, as the wire codec hands them over (np.frombuffer)
    cat = np.frombuffer(rng.integers(-(2**62), 2**62, (n, k)).astype("<i8").tobytes(), "<i8").reshape(n, k)
    dense = np.frombuffer(rng.standard_normal((n, d)).astype("<f4").tobytes(), "<f4").reshape(n, d)
    labels = np.frombuffer(rng.random((n, t)).astype("<f4").tobytes(), "<f4").reshape(n, t)
    return ExampleBatch(
        batch_id=f"b-{seq}",
        producer_id="b",
        seq=seq,
        event_time_ms=np.arange(n, dtype=np.int64),
        example_ids=np.arange(n, dtype=np.int64) + 100 * seq,
        categorical_names=[f"c{i}" for i in range(k)],
        categorical=cat,
        dense_names=[f"d{i}" for i in range(d)],
        dense=dense,
        task_names=["click", "watch"],
        labels=labels,
    )


def test_batch_tensors_concatenates_several_batches():
    batches = [_batch(3, 1), _batch(5, 2), _batch(1, 3)]
    cat, dense, labels = batch_tensors(batches, torch.device("cpu"))
    assert cat.shape == (9, 2) and cat.dtype == torch.long
    assert dense.shape == (9, 3) and dense.dtype == torch.float32
    assert labels.shape == (9, 2) and labels.dtype == torch.float32
    np.testing.assert_array_equal(cat.numpy(), np.concatenate([b.categorical for b in batches]))
    np.testing.assert_array_equal(dense.numpy(), np.concatenate([b.dense for b in batches]))
    np.testing.assert_array_equal(labels.numpy(), np.concatenate([b.labels for b in batches]))


def test_batch_tensors_single_batch_copies_read_only_arrays():
    b = _batch(4, 7)
    assert not b.dense.flags.writeable
    cat, dense, labels = batch_tensors([b], torch.device("cpu"))
    np.testing.assert_array_equal(cat.numpy(), b.categorical)
    np.testing.assert_array_equal(dense.numpy(), b.dense)
    np.testing.assert_array_equal(labels.numpy(), b.labels)
    dense.add_(1.0)  # writable, and not the wire buffer
    assert not np.array_equal(dense.numpy(), b.dense)


def test_resolve_device_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"device=cuda.*no CUDA.*(auto|cpu)"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_weights_finite_detects_nan_and_inf():
    model = small_model()
    assert weights_finite(model)
    with torch.no_grad():
        model.tower[0].weight[0, 0] = float("nan")
    assert not weights_finite(model)

    model = small_model()
    with torch.no_grad():
        model.aux_head.bias[0] = float("inf")
    assert not weights_finite(model)


def test_training_on_a_learnable_signal_lowers_the_loss(one_thread):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    n_items = 20
    item_ctr = rng.choice([0.05, 0.95], size=n_items)
    item_watch = rng.normal(0.0, 2.0, size=n_items)
    item_ids = rng.integers(-(2**62), 2**62, size=n_items)  # arbitrary raw ids, hashed by the model

    def sample(n: int, seed: int):
        r = np.random.default_rng(seed)
        idx = r.integers(0, n_items, size=n)
        cat = np.stack([item_ids[idx], r.integers(0, 2**40, size=n)], axis=1)
        dense = r.standard_normal((n, 3)).astype(np.float32)
        click = (r.random(n) < item_ctr[idx]).astype(np.float32)
        watch = (item_watch[idx] + 0.1 * r.standard_normal(n)).astype(np.float32)
        return (
            torch.from_numpy(cat),
            torch.from_numpy(dense),
            torch.from_numpy(np.stack([click, watch], axis=1)),
        )

    model = RankingModel(
        small_features((53, 11), 3),
        TASKS,
        ModelConfig(embedding_dim=8, hidden=[16], cross_layers=1, learning_rate=0.02),
        aux_tasks=["click"],
    )
    opt = make_optimizer(model, ModelConfig(learning_rate=0.02))
    kinds = [t.type for t in TASKS]
    eval_cat, eval_dense, eval_labels = sample(2000, seed=10_000)

    def eval_losses() -> list[float]:
        with torch.no_grad():
            main, _ = model(eval_cat, eval_dense)
            return [float(x) for x in hard_losses(main, eval_labels, kinds)]

    before = eval_losses()
    for step in range(300):
        cat, dense, labels = sample(128, seed=step)
        main, _ = model(cat, dense)
        loss = torch.stack(hard_losses(main, labels, kinds)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_losses()
    assert weights_finite(model)
    # click: from ~log(2) towards the Bernoulli entropy of 0.05/0.95 (~0.2)
    assert after[0] < 0.6 * before[0], (before, after)
    assert after[0] < 0.35, (before, after)
    # watch: from the variance of item_watch (~4) well towards the noise floor
    assert after[1] < 0.3 * before[1], (before, after)


def test_running_target_moments_are_the_streams_exact_mean_and_variance():
    tasks = [TaskConfig(name="click", type="binary"), TaskConfig(name="watch", type="regression")]
    model = RankingModel(Config().features, tasks, ModelConfig(hidden=[4], embedding_dim=2))
    rng = np.random.default_rng(0)
    seen = []
    for n in (1, 300, 0, 7, 64):  # uneven batches, one empty
        labels = np.stack([rng.integers(0, 2, n), rng.normal(40.0, 3.0, n)], axis=1)
        seen.append(labels)
        model.observe_targets(target_moments(torch.from_numpy(labels)))
    # two ranks' moments summed (what a trainer's all-reduce hands every rank) count as one batch
    halves = [np.stack([rng.integers(0, 2, 50), rng.normal(40.0, 3.0, 50)], axis=1) for _ in range(2)]
    seen += halves
    model.observe_targets(sum(target_moments(torch.from_numpy(h)) for h in halves))
    watch = np.concatenate(seen)[:, 1]
    assert model.target_count.item() == len(watch) == 472
    np.testing.assert_allclose(model.target_mean[1].item(), watch.mean(), rtol=1e-6)
    np.testing.assert_allclose(model.target_var[1].item(), watch.var(), rtol=1e-5)
    assert model.target_mean[0].item() == 0.0 and model.target_var[0].item() == 1.0  # binary: identity


def test_frozen_target_moments_do_not_move():
    model = RankingModel(Config().features, Config().tasks, ModelConfig(hidden=[4], standardize_targets=False))
    model.observe_targets(target_moments(torch.full((8, len(Config().tasks)), 5.0)))
    assert model.target_count.item() < 0 and model.target_mean.abs().sum().item() == 0.0
    assert model.target_var.eq(1.0).all()


def _stepped(model: RankingModel, steps: int = 3):
    optimizer = make_optimizer(model, ModelConfig())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        cat = torch.randint(0, 10**6, (16, 2), generator=g)
        main, _ = model(cat, torch.randn(16, 3, generator=g))
        main.sum().backward()
        optimizer.step()
    return optimizer


def test_the_optimizers_state_survives_a_checkpoint():
    model = small_model()
    optimizer = _stepped(model)
    restored = make_optimizer(model, ModelConfig())
    restored.load_state_dict(optimizer.state_dict())
    (table,) = restored.tables.state.values()  # row-wise Adagrad: one accumulator a row
    torch.testing.assert_close(table["sum"], next(iter(optimizer.tables.state.values()))["sum"])
    assert table["sum"].shape == (7 + 11,) and table["sum"].gt(0).any()
    assert len(restored.dense.state) == len(optimizer.dense.state) > 0  # Adam's moments too


def test_a_checkpoint_with_a_table_per_feature_loads_into_the_one_table():
    model = small_model()
    optimizer = _stepped(model)
    # what the version with a table per feature wrote: tables.<i>.weight, an accumulator each
    weights = model.state_dict()
    table = weights.pop("tables.weight")
    weights["tables.0.weight"], weights["tables.1.weight"] = table[:7], table[7:]
    saved = optimizer.state_dict()
    (accumulator,) = [s["sum"] for s in saved["tables"]["state"].values()]
    group = saved["tables"]["param_groups"][0]
    saved["tables"] = {
        "state": {0: {"sum": accumulator[:7]}, 1: {"sum": accumulator[7:]}},
        "param_groups": [{**group, "params": [0, 1]}],
    }
    fresh = small_model(dropout=0.0)
    fresh.load_state_dict(weights)
    torch.testing.assert_close(fresh.tables.weight, model.tables.weight)
    restored = make_optimizer(fresh, ModelConfig())
    restored.load_state_dict(saved)
    torch.testing.assert_close(next(iter(restored.tables.state.values()))["sum"], accumulator)
    cat = torch.tensor([[3, 5], [10**12, -4]])
    torch.testing.assert_close(fresh(cat, torch.ones(2, 3))[0], model(cat, torch.ones(2, 3))[0])
