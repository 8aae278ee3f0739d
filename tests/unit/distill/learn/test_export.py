"""Serving export: the Triton layout, plain-torch graphs in raw units, retention, promotion,
LATEST / PROMOTED and explicit versions."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from distill.core.config import CategoricalFeature, ExportConfig, FeaturesConfig, ModelConfig, TaskConfig
from distill.core.exceptions import CheckpointError
from distill.learn.export import ServingGraphs, export_serving_model, load_serving_model
from distill.learn.models import RankingModel, ServingModel, make_optimizer, target_moments
from distill.learn.repository import ModelRepository

FEATURES = FeaturesConfig(
    categorical=[
        CategoricalFeature(name="user", buckets=97),
        CategoricalFeature(name="item", buckets=53),
    ],
    dense=["a", "b", "c"],
)
TASKS = [TaskConfig(name="click"), TaskConfig(name="watch", type="regression")]
MODEL = ModelConfig(embedding_dim=4, hidden=[16, 8], cross_layers=1, dropout=0.2)
PROJECT = ("distill", "producers", "teacher_worker", "student_worker", "schemas")


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


def served(model: RankingModel, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.to_raw(model(cat, dense)[0])


def snapshot(click_logloss: float, watch_rmse: float) -> dict:
    """A student evaluator's snapshot, as far as the promotion rule reads it."""
    return {
        "click": {"main": {"windowed": {"logloss": click_logloss, "auc": 0.7}}},
        "watch": {"main": {"windowed": {"rmse": watch_rmse}}},
    }


# -- the artefacts -------------------------------------------------------------------------
_ISOLATED = textwrap.dedent(
    """
    import importlib.abc, json, sys
    blocked = set(sys.argv[2].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"{name} is blocked in this process", name=name)
            return None

    sys.meta_path.insert(0, Block())
    proof = {}
    for name in sorted(blocked):
        try:
            __import__(name)
            proof[name] = "imported"
        except ImportError:
            proof[name] = "ImportError"
    import torch

    work = sys.argv[1]
    batch = torch.load(work + "/inputs.pt", weights_only=True)
    scripted = torch.jit.load(work + "/model/7/model.pt")
    program = torch.export.load(work + "/model/7/model.pt2").module()
    out = {}
    for n, (cat, dense) in batch.items():
        with torch.no_grad():
            out[n] = {"pt": scripted(cat, dense), "pt2": program(cat, dense)}
    torch.save(out, work + "/outputs.pt")
    print(json.dumps({"proof": proof, "modules": sorted(m for m in sys.modules if m.split(".")[0] in blocked)}))
    """
)


def test_model_pt_and_pt2_load_with_plain_torch_where_the_project_cannot_be_imported(tmp_path):
    model = trained_model(steps=30)
    export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path / "model", version=7)
    batch = {n: inputs(n, seed=n) for n in (1, 37, 300)}  # the batch dimension is dynamic
    torch.save(batch, tmp_path / "inputs.pt")
    # -I: no PYTHONPATH, no user site, no working directory on sys.path; -S: no site, so the
    # editable install's .pth finder never runs. sys.path is the interpreter's own plus the
    # site-packages torch lives in; the project's packages are blocked on top, and the child
    # proves that importing them fails.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    boot = f"import sys; sys.path += {site!r}; sys.argv[1:] = {[str(tmp_path), ','.join(PROJECT)]!r}\n"
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", boot + _ISOLATED],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["proof"] == dict.fromkeys(sorted(PROJECT), "ImportError")
    assert report["modules"] == []
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for n, (cat, dense) in batch.items():
        expected = served(model, cat, dense)
        assert outputs[n]["pt"].shape == (n, 2)
        torch.testing.assert_close(outputs[n]["pt"], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(outputs[n]["pt2"], expected, rtol=0, atol=1e-5)
    assert 25 < outputs[300]["pt"][:, 1].mean().item() < 55  # watch in its own units, not standardised


def test_signature_and_triton_config_describe_the_graph(tmp_path):
    state = export_serving_model(trained_model(steps=2), FEATURES, TASKS, MODEL, tmp_path / "s1", version=3)
    assert (state.exported, state.latest, state.promoted, state.kept) == (3, 3, 3, [3])
    assert state.bytes == sum(p.stat().st_size for p in (tmp_path / "s1").rglob("*") if p.is_file())
    files = sorted(p.name for p in (tmp_path / "s1" / "3").iterdir())
    assert files == ["metrics.json", "model.pt", "model.pt2", "serving.pt", "signature.json"]
    sig = json.loads((tmp_path / "s1" / "3" / "signature.json").read_text())
    assert [i["name"] for i in sig["inputs"]] == ["categorical__0", "dense__1"]
    assert sig["inputs"][0]["columns"] == ["user", "item"] and sig["inputs"][0]["dtype"] == "int64"
    assert sig["inputs"][1]["columns"] == ["a", "b", "c"] and sig["inputs"][1]["shape"] == [-1, 3]
    columns = sig["outputs"][0]["columns"]
    assert [(c["task"], c["type"], c["output"]) for c in columns] == [
        ("click", "binary", "logit"),
        ("watch", "regression", "value"),
    ]
    pbtxt = (tmp_path / "s1" / "config.pbtxt").read_text()
    assert 'name: "s1"' in pbtxt and 'platform: "pytorch_libtorch"' in pbtxt
    assert "version_policy: { specific: { versions: [ 3 ] } }" in pbtxt
    assert '{ name: "categorical__0" data_type: TYPE_INT64 dims: [ 2 ] }' in pbtxt
    assert '{ name: "dense__1" data_type: TYPE_FP32 dims: [ 3 ] }' in pbtxt
    assert '{ name: "outputs__0" data_type: TYPE_FP32 dims: [ 2 ] }' in pbtxt
    assert (tmp_path / "s1" / "PROMOTED").read_text().strip() == "3"


# -- load_serving_model (the package's own loader) ------------------------------------------
def test_exported_model_reproduces_the_main_head(tmp_path):
    model = trained_model()
    export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path, version=3)
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
        out = serving(cat, dense)
    torch.testing.assert_close(out[:, 1], head[:, 1] * var[1].sqrt() + mean[1])
    torch.testing.assert_close(out[:, 0], head[:, 0])  # logits unchanged
    assert 25 < out[:, 1].mean().item() < 55  # values in the targets' units, not around 0


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
    scripted = torch.jit.load(str(tmp_path / "1" / "model.pt"))
    assert not any("aux_head" in name for name, _ in scripted.named_parameters())

    serving = load_serving_model(tmp_path)
    assert serving.model.aux_head is None
    assert serving.model.param_count() == model.param_count(serving_only=True)


def test_latest_points_at_the_newest_and_versions_load_explicitly(tmp_path):
    models = {v: trained_model(seed=v, steps=5) for v in (1, 2, 3)}
    for v, m in models.items():
        export_serving_model(m, FEATURES, TASKS, MODEL, tmp_path, version=v)
        assert (tmp_path / "LATEST").read_text().strip() == str(v)
        assert load_serving_model(tmp_path).version == v
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3", "LATEST", "PROMOTED", "config.pbtxt"]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob(".staging-*"))

    cat, dense = inputs(20, seed=2)
    with torch.no_grad():
        for v, m in models.items():
            serving = load_serving_model(tmp_path, version=v)
            assert serving.version == v
            torch.testing.assert_close(serving(cat, dense), served(m, cat, dense), rtol=0, atol=0)
        newest = load_serving_model(tmp_path)(cat, dense)
        oldest = load_serving_model(tmp_path, version=1)(cat, dense)
    torch.testing.assert_close(newest, served(models[3], cat, dense), rtol=0, atol=0)
    assert not torch.allclose(newest, oldest)


def test_re_export_of_a_version_replaces_it(tmp_path):
    first, second = trained_model(seed=1, steps=3), trained_model(seed=2, steps=3)
    export_serving_model(first, FEATURES, TASKS, MODEL, tmp_path, version=7)
    export_serving_model(second, FEATURES, TASKS, MODEL, tmp_path, version=7)
    cat, dense = inputs(10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_serving_model(tmp_path, 7)(cat, dense), served(second, cat, dense))
        scripted = torch.jit.load(str(tmp_path / "7" / "model.pt"))
        torch.testing.assert_close(scripted(cat, dense), served(second, cat, dense), rtol=0, atol=1e-5)


def test_later_exports_fill_the_first_exports_graphs_with_their_own_weights(tmp_path):
    """A student traces its graphs once: each later version carries its own weights and
    target moments, in model.pt and model.pt2 alike; another architecture is traced anew."""
    graphs = ServingGraphs()
    models = {v: trained_model(seed=v, steps=5 * v) for v in (1, 2, 3)}  # moments of 320, 640, 960 targets
    for v, m in models.items():
        export_serving_model(m, FEATURES, TASKS, MODEL, tmp_path, version=v, graphs=graphs)
    assert graphs.traces == 1
    cat, dense = inputs(37, seed=4)  # another batch size than the trace's
    with torch.no_grad():
        for v, m in models.items():
            expected = served(m, cat, dense)
            scripted = torch.jit.load(str(tmp_path / str(v) / "model.pt"))
            program = torch.export.load(str(tmp_path / str(v) / "model.pt2")).module()
            torch.testing.assert_close(scripted(cat, dense), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(program(cat, dense), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(served(models[1], cat, dense), served(models[3], cat, dense))

    wider = ModelConfig(embedding_dim=6, hidden=[16, 8], cross_layers=1)
    other = RankingModel(FEATURES, TASKS, wider)
    export_serving_model(other, FEATURES, TASKS, wider, tmp_path / "wider", version=1, graphs=graphs)
    assert graphs.traces == 2
    scripted = torch.jit.load(str(tmp_path / "wider" / "1" / "model.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(cat, dense), served(other.eval(), cat, dense), rtol=0, atol=1e-5)


def test_missing_version_is_an_error(tmp_path):
    export_serving_model(trained_model(steps=1), FEATURES, TASKS, MODEL, tmp_path, version=1)
    with pytest.raises(FileNotFoundError):
        load_serving_model(tmp_path, version=2)
    with pytest.raises(FileNotFoundError):
        load_serving_model(tmp_path / "nothing-here")


# -- retention and promotion ----------------------------------------------------------------
def test_more_exports_than_keep_leave_keep_versions_and_the_promoted_one(tmp_path):
    """The bounded disk: 3 x keep exports; the promoted version (held by the rule at v2) stays."""
    root, keep = tmp_path / "models", 2
    export = ExportConfig(keep=keep)
    model = trained_model(steps=1)
    export_serving_model(model, FEATURES, TASKS, MODEL, root / "none", 1, metrics=snapshot(0.50, 5.0), baseline="none")
    sizes = []
    for v in range(1, 3 * keep + 1):
        # v2 beats the baseline; every later version is worse on click: PROMOTED stays at 2
        figures = snapshot(0.49 if v == 2 else 0.60, 4.0)
        state = export_serving_model(
            model, FEATURES, TASKS, MODEL, root / "aux", v, export=export, metrics=figures, baseline="none"
        )
        on_disk = sorted(int(p.name) for p in (root / "aux").iterdir() if p.name.isdigit())
        assert on_disk == state.kept and len(on_disk) <= keep + 1
        assert state.latest == v == max(on_disk)
        assert state.promoted == (None if v == 1 else 2)  # v1 is worse: nothing is promoted yet
        assert v == 1 or state.promoted in on_disk
        sizes.append(state.bytes)
    assert on_disk == [2, 5, 6]
    assert state.deleted == [4]
    assert not state.decision.promote and "click" in state.decision.reason
    assert max(sizes[keep + 1 :]) <= 1.05 * min(sizes[keep + 1 :])  # bounded: the bytes stop growing
    assert "versions: [ 2 ]" in (root / "aux" / "config.pbtxt").read_text()


def test_promotion_rule_against_the_baseline_with_a_margin(tmp_path):
    root, model = tmp_path / "models", trained_model(steps=1)

    def export(v: int, figures: dict | None, margin: float = 0.0, compared: list[str] | None = None):
        cfg = ExportConfig(promote_margin=margin)
        return export_serving_model(
            model,
            FEATURES,
            TASKS,
            MODEL,
            root / "aux",
            v,
            export=cfg,
            metrics=figures,
            compared_tasks=compared,
            baseline="none",
        )

    first = export(1, snapshot(0.9, 9.0))
    assert first.promoted == 1 and "no baseline" in first.decision.reason  # no `none` export yet
    state = export_serving_model(model, FEATURES, TASKS, MODEL, root / "none", 1, metrics=snapshot(0.5, 5.0))
    assert state.promoted == 1  # a student without a baseline name: nothing to compare with
    assert export(2, snapshot(0.51, 4.0)).promoted == 1  # 2% worse on click
    assert export(3, snapshot(0.51, 4.0), margin=0.03).promoted == 3  # within a 3% margin
    assert export(4, snapshot(0.49, 5.5)).promoted == 3  # better on click, worse on watch
    assert export(5, snapshot(0.49, 5.5), compared=["click"]).promoted == 5  # compared on click only
    held = export(6, None, compared=["click"])  # no figure of its own yet
    assert held.promoted == 5 and "no windowed figure" in held.decision.reason
    assert export(7, snapshot(0.50, 5.0)).promoted == 7  # equal is no worse
    off = export_serving_model(
        model,
        FEATURES,
        TASKS,
        MODEL,
        root / "aux",
        8,
        export=ExportConfig(promote=False),
        metrics=snapshot(0.9, 9.0),
        baseline="none",
    )
    assert off.promoted == 8 and "off" in off.decision.reason
    baseline = export_serving_model(
        model, FEATURES, TASKS, MODEL, root / "none", 2, metrics=snapshot(0.9, 9.0), baseline="none"
    )
    assert baseline.promoted == 2 and "baseline itself" in baseline.decision.reason


def test_operator_list_promote_and_prune(tmp_path):
    repo_dir, model = tmp_path / "aux", trained_model(steps=1)
    for v in (1, 2, 3):
        export_serving_model(model, FEATURES, TASKS, MODEL, repo_dir, v, metrics=snapshot(0.5, 5.0))
    repo = ModelRepository(repo_dir)
    listed = repo.entries()
    assert [(e.version, e.latest, e.promoted) for e in listed] == [
        (1, False, False),
        (2, False, False),
        (3, True, True),
    ]
    assert all(e.bytes > 0 for e in listed) and listed[0].figures == {"click": 0.5, "watch": 5.0}

    state = repo.promote(1)
    assert state.promoted == 1 and "versions: [ 1 ]" in (repo_dir / "config.pbtxt").read_text()
    with pytest.raises(CheckpointError, match=r"version 9 is not a complete export .* \[1, 2, 3\]"):
        repo.promote(9)
    pruned = repo.prune(keep=1)
    assert pruned.kept == [1, 3] and pruned.deleted == [2]  # the promoted one stays
    with pytest.raises(CheckpointError, match="at least 1"):
        repo.prune(keep=0)
    with pytest.raises(CheckpointError, match="no exported versions in .*nobody"):
        ModelRepository(tmp_path / "nobody").promote()


def test_a_crashed_export_is_never_a_version_and_is_cleaned_up(tmp_path):
    model = trained_model(steps=1)
    export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path, 1)
    # a crash before the rename: a staging directory; on an object store: a version without
    # its signature.json (the file written last)
    (tmp_path / ".staging-2").mkdir()
    (tmp_path / ".staging-2" / "model.pt").write_bytes(b"half")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "model.pt").write_bytes(b"half")
    repo = ModelRepository(tmp_path)
    assert repo.versions() == [1]
    assert repo.prune(keep=5).kept == [1]  # newer than the newest complete one: may be in flight
    assert (tmp_path / "2").exists() and (tmp_path / ".staging-2").exists()
    state = export_serving_model(model, FEATURES, TASKS, MODEL, tmp_path, 3)
    assert state.kept == [1, 3] and 2 in state.deleted
    assert not (tmp_path / "2").exists() and not (tmp_path / ".staging-2").exists()
