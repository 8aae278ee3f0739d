"""Serving export: main heads only, loadable again, LATEST and explicit versions."""

from __future__ import annotations

import pytest
import torch

from distill.core.config import CategoricalFeature, FeaturesConfig, ModelConfig, TaskConfig
from distill.learn.export import export_serving_model, load_serving_model
from distill.learn.models import RankingModel, ServingModel, make_optimizer, target_moments

FEATURES = FeaturesConfig(
    categorical=[
        CategoricalFeature(name="user", buckets=97),
        CategoricalFeature(name="item", buckets=53),
    ],
    dense=["a", "b", "c"],
)
TASKS = [TaskConfig(name="click"), TaskConfig(name="watch", type="regression")]
MODEL = ModelConfig(embedding_dim=4, hidden=[16, 8], cross_layers=1, dropout=0.2)


def trained_model(seed: int = 0, steps: int = 20) -> RankingModel:
    torch.manual_seed(seed)
    model = RankingModel(FEATURES, TASKS, MODEL, aux_tasks=["click", "watch"])
    opt = make_optimizer(model, MODEL)
    for _ in range(steps):
        cat, dense = inputs(64)
        # watch targets around 40 with spread 5: the regression head learns them standardised
        targets = torch.stack([torch.randint(0, 2, (64,)).float(), 40 + 5 * torch.randn(64)], 1)
        model.observe_targets(target_moments(targets))
        main, aux = model(cat, dense)
        loss = (main - 1.0).pow(2).mean() + (aux + 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def inputs(n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    cat = torch.randint(-(2**62), 2**62, (n, 2), generator=g)
    return cat, torch.randn(n, 3, generator=g)


def test_exported_model_reproduces_the_main_head(tmp_path):
    model = trained_model()
    target = export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path, version=3)
    assert target == tmp_path / "3" and (target / "serving.pt").is_file()

    serving = load_serving_model(tmp_path)
    assert isinstance(serving, ServingModel)
    assert serving.version == 3
    assert not serving.training  # eval mode: dropout off, outputs deterministic
    cat, dense = inputs(50, seed=1)
    with torch.no_grad():
        expected, aux = model(cat, dense)
        got = serving(cat, dense)
    assert got.shape == (50, 2)
    torch.testing.assert_close(got, model.to_raw(expected), rtol=0, atol=0)
    assert not torch.allclose(got, model.to_raw(aux, aux=True))  # it is the main head, not the aux head


def test_standardised_targets_round_trip_through_the_export(tmp_path):
    """The head learns (y - mean) / std; the served value is in the target's own units."""
    model = trained_model(steps=50)
    mean, var, count = model.target_mean, model.target_var, model.target_count
    assert count.item() == 50 * 64
    assert mean[0].item() == 0 and var[0].item() == 1  # binary columns are left alone
    assert 38 < mean[1].item() < 42 and 20 < var[1].item() < 30  # the watch targets' moments
    export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path, version=1)
    serving = load_serving_model(tmp_path)
    torch.testing.assert_close(serving.model.target_mean, mean)
    cat, dense = inputs(200, seed=2)
    with torch.no_grad():
        head = model(cat, dense)[0]
        served = serving(cat, dense)
    torch.testing.assert_close(served[:, 1], head[:, 1] * var[1].sqrt() + mean[1])
    torch.testing.assert_close(served[:, 0], head[:, 0])  # logits unchanged
    assert 25 < served[:, 1].mean().item() < 55  # values in the targets' units, not around 0


def test_aux_head_is_not_exported(tmp_path):
    model = trained_model()
    export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path, version=1)
    payload = torch.load(tmp_path / "1" / "serving.pt", weights_only=True)
    keys = set(payload["state_dict"])
    assert not any(k.startswith("aux_head") for k in keys)
    assert {"head.weight", "head.bias", "buckets"} <= keys
    assert keys == {k for k in model.state_dict() if not k.startswith("aux_head")}
    exported = sum(
        v.numel() for k, v in payload["state_dict"].items() if k != "buckets" and not k.startswith("target_")
    )
    assert exported == model.param_count(serving_only=True)

    serving = load_serving_model(tmp_path)
    assert serving.model.aux_head is None
    assert serving.model.param_count() == model.param_count(serving_only=True)


def test_latest_points_at_the_newest_and_versions_load_explicitly(tmp_path):
    models = {v: trained_model(seed=v, steps=5) for v in (1, 2, 3)}
    for v, m in models.items():
        export_serving_model(m, FEATURES, TASKS, MODEL, tmp_path, version=v)
        assert (tmp_path / "LATEST").read_text().strip() == str(v)
        assert load_serving_model(tmp_path).version == v
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3", "LATEST"]
    assert not list(tmp_path.rglob("*.tmp"))

    cat, dense = inputs(20, seed=2)
    with torch.no_grad():
        for v, m in models.items():
            serving = load_serving_model(tmp_path, version=v)
            assert serving.version == v
            torch.testing.assert_close(serving(cat, dense), m.to_raw(m(cat, dense)[0]), rtol=0, atol=0)
        newest = load_serving_model(tmp_path)(cat, dense)
        oldest = load_serving_model(tmp_path, version=1)(cat, dense)
    torch.testing.assert_close(newest, models[3].to_raw(models[3](cat, dense)[0]), rtol=0, atol=0)
    assert not torch.allclose(newest, oldest)


def test_re_export_of_a_version_replaces_it(tmp_path):
    first, second = trained_model(seed=1, steps=3), trained_model(seed=2, steps=3)
    export_serving_model(first, FEATURES, TASKS, MODEL, tmp_path, version=7)
    export_serving_model(second, FEATURES, TASKS, MODEL, tmp_path, version=7)
    cat, dense = inputs(10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_serving_model(tmp_path, 7)(cat, dense), second.to_raw(second(cat, dense)[0]))


def test_missing_version_is_an_error(tmp_path):
    export_serving_model(trained_model(steps=1), FEATURES, TASKS, MODEL, tmp_path, version=1)
    with pytest.raises(FileNotFoundError):
        load_serving_model(tmp_path, version=2)
    with pytest.raises(FileNotFoundError):
        load_serving_model(tmp_path / "nothing-here")
