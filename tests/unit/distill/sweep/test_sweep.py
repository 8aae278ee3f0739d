"""distill sweep without Kafka: the halving plan, budget accounting, candidates, windows, CLI."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.core.config import Config, ModelConfig, load_config, read_file
from distill.core.exceptions import ConfigError
from distill.sweep.candidates import load_candidates
from distill.sweep.halving import Budget, plan_rungs, successive_halving
from distill.sweep.render import write_outputs
from distill.sweep.replay import Window, merge_in_event_order, parse_offsets, parse_time
from distill.sweep.run import sweep_batches

# -- fakes: arms whose proxy loss is fixed, so the halving logic is all that is tested ------


class FakeArm:
    def __init__(self, name: str, loss: float, gflop: float = 1.0, clock: list[float] | None = None):
        self.name, self.loss, self.gflop, self.clock = name, loss, gflop, clock
        self.steps: list[int] = []
        self.slices = 0

    def step(self, batch: int) -> None:
        self.steps.append(batch)
        if self.clock is not None:
            self.clock[0] += 0.001 * 100  # 1 ms per example of a 100-example batch

    def new_slice(self) -> None:
        self.slices += 1

    def slice_loss(self) -> float:
        return self.loss

    def total_loss(self) -> float:
        return self.loss

    def cost(self) -> dict[str, float]:
        return {"gflop_per_1k": self.gflop, "seconds_per_1k": 1.0}


def _arms(losses: dict[str, float], **kw) -> list[FakeArm]:
    return [FakeArm(name, loss, **kw) for name, loss in losses.items()]


SIZES = [100] * 70


# -- the plan --------------------------------------------------------------------------------


def test_plan_doubles_slices_halves_candidates_and_tiles_the_window():
    plan = plan_rungs(SIZES, 8)
    assert [r.candidates for r in plan.rungs] == [8, 4, 2]
    assert plan.rungs[0].start == 0 and plan.rungs[-1].end == 70
    assert all(a.end == b.start for a, b in zip(plan.rungs, plan.rungs[1:], strict=False))
    lengths = [r.end - r.start for r in plan.rungs]
    assert lengths == [10, 20, 40]  # 1 : 2 : 4 of 70 batches
    assert plan.cost == sum(r.examples * r.candidates for r in plan.rungs) == 100 * (80 + 80 + 80)
    assert [r.candidates for r in plan_rungs(SIZES, 5).rungs] == [5, 3, 2]
    single = plan_rungs(SIZES, 1).rungs
    assert [(r.start, r.end, r.candidates) for r in single] == [(0, 70, 1)]
    assert [(r.start, r.end) for r in plan_rungs(SIZES, 2).rungs] == [(0, 70)]


def test_plan_warms_every_candidate_up_before_the_first_rung():
    plan = plan_rungs(SIZES, 4, warmup=0.5)
    assert plan.warmup is not None
    assert (plan.warmup.start, plan.warmup.end, plan.warmup.candidates) == (0, 35, 4)
    assert plan.rungs[0].start == 35 and plan.rungs[-1].end == 70
    assert plan.cost == 35 * 100 * 4 + sum(r.examples * r.candidates for r in plan.rungs)
    assert plan_rungs(SIZES, 4, warmup=0.0).warmup is None


@pytest.mark.parametrize("budget", [1_000, 5_000, 18_800, 30_000])
def test_plan_fits_the_budget_by_leaving_out_the_oldest_batches(budget):
    plan = plan_rungs(SIZES, 4, budget_examples=budget, warmup=0.3)
    assert plan.cost <= budget
    assert plan.rungs[-1].end == 70  # the newest batches are kept
    if budget < 18_800 * 1.3:  # the whole window would cost more
        assert plan.first > 0


def test_plan_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="too few for 3 rungs.*widen the window"):
        plan_rungs([100, 100], 8)
    with pytest.raises(ConfigError, match="--budget-examples 300 cannot pay.*give at least"):
        plan_rungs(SIZES, 8, budget_examples=300)
    with pytest.raises(ConfigError, match="--warmup 1.0"):
        plan_rungs(SIZES, 2, warmup=1.0)


# -- successive halving ----------------------------------------------------------------------


def test_halving_keeps_the_better_half_and_continues_incrementally():
    arms = _arms({"a": 0.50, "b": 0.40, "c": 0.70, "d": 0.45})  # lower proxy loss is better
    baseline = FakeArm("none", 0.60)
    plan = plan_rungs(SIZES, 4, warmup=0.2)
    out = successive_halving(arms, baseline, SIZES, plan, Budget())
    assert out.ranking == ["b", "d", "a", "c"]
    res = out.results
    assert res["b"].eliminated_at is None and res["d"].eliminated_at == 1  # lost the last rung
    assert res["a"].eliminated_at == res["c"].eliminated_at == 0
    assert res["b"].rungs[-1]["gain"] == pytest.approx(0.20)
    assert res["c"].rungs[0]["gain"] == pytest.approx(-0.10)
    # Kept state: every arm saw one unbroken run of batches from the window's start.
    first_rung_end = plan.rungs[0].end
    for arm in arms:
        end = 70 if arm.name in ("b", "d") else first_rung_end
        assert arm.steps == list(range(end)), arm.name
        assert res[arm.name].examples == 100 * end
    assert baseline.steps == list(range(70))  # the none student is trained once


def test_examples_budget_is_never_exceeded_and_live_arms_stay_comparable():
    for budget in (1_000, 4_000, 9_999, 12_345, 30_000):
        arms = _arms({"a": 0.5, "b": 0.4, "c": 0.7, "d": 0.45})
        plan = plan_rungs(SIZES, 4)  # planned without the budget: the budget must stop it
        spent = Budget(examples=budget)
        out = successive_halving(arms, FakeArm("none", 0.6), SIZES, plan, spent)
        assert spent.spent <= budget
        assert sum(r.examples for r in out.results.values()) == spent.spent
        assert out.stopped == ("examples" if budget < plan.cost else None)
        # Stopped batch by batch: the arms still running processed the same batches.
        live = [a for a in arms if out.results[a.name].eliminated_at is None]
        assert len({tuple(a.steps) for a in live}) == 1
        assert out.results[out.ranking[0]].rungs[-1]["complete"] is (budget >= plan.cost)


def test_a_budget_too_small_for_one_row_scores_nobody():
    out = successive_halving(
        _arms({"a": 0.5, "b": 0.4}), FakeArm("none", 0.6), SIZES, plan_rungs(SIZES, 2), Budget(examples=150)
    )
    assert all(r.examples == 0 and r.reached == -1 for r in out.results.values())


def test_seconds_budget_stops_before_a_step_that_would_overrun():
    clock = [0.0]
    arms = _arms({"a": 0.5, "b": 0.4}, clock=clock)
    budget = Budget(seconds=2.05, clock=lambda: clock[0])
    out = successive_halving(arms, FakeArm("none", 0.6), SIZES, plan_rungs(SIZES, 2), budget)
    assert out.stopped == "seconds"
    assert budget.elapsed() <= 2.05  # each row costs 0.2 s: the eleventh is not started
    assert out.results["a"].examples == out.results["b"].examples == 10 * 100
    assert out.ranking[0] == "b"


def test_objective_gain_per_gflop_prefers_the_cheaper_teacher():
    def run(objective):
        arms = [FakeArm("big", 0.40, gflop=10.0), FakeArm("small", 0.45, gflop=1.0)]
        return successive_halving(arms, FakeArm("none", 0.5), SIZES, plan_rungs(SIZES, 2), Budget(), objective).ranking

    assert run("gain") == ["big", "small"]
    assert run("gain-per-gflop") == ["small", "big"]  # 0.05 / 1 beats 0.10 / 10


def test_budget_must_be_positive():
    with pytest.raises(ConfigError, match="--budget-examples must be a positive number"):
        Budget(examples=0)
    with pytest.raises(ConfigError, match="--budget-seconds must be positive"):
        Budget(seconds=-1)


# -- candidates --------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_candidates_merge_over_the_teacher_model_and_a_grid_expands(tmp_path):
    base = Config().teacher.model
    path = _write(
        tmp_path,
        "c.toml",
        """
[[candidates]]
name = "tiny"
model = { hidden = [8], embedding_dim = 2, cross_layers = 0 }

[[candidates]]
name = "default"

[grid]
hidden = [[64], [128, 64]]
learning_rate = [0.01, 0.003]
""",
    )
    cands = load_candidates(path, base)
    assert [c.name for c in cands] == [
        "tiny",
        "default",
        "hidden=64,learning_rate=0.01",
        "hidden=64,learning_rate=0.003",
        "hidden=128x64,learning_rate=0.01",
        "hidden=128x64,learning_rate=0.003",
    ]
    assert cands[0].model.hidden == [8] and cands[0].model.learning_rate == base.learning_rate
    assert cands[1].model == base
    assert cands[5].model.hidden == [128, 64] and cands[5].model.embedding_dim == base.embedding_dim
    yaml_path = _write(tmp_path, "c.yaml", "candidates:\n  - name: wide\n    model: {hidden: [1024]}\n")
    assert load_candidates(yaml_path, base)[0].model.hidden == [1024]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[[candidates]]\nname = "tiny"\nmodel = { hiden = [8] }\n',
            r"candidates\[0\] \('tiny'\)\.model\.hiden: unknown field; a teacher model takes embed",
        ),
        (
            '[[candidates]]\nname = "a"\nmodel = { hidden = [0] }\n',
            r"candidates\[0\] \('a'\)\.model\.hidden: .*positive integer",
        ),
        (
            '[[candidates]]\nname = "a"\nhidden = [8]\n',
            r"candidates\.0\.hidden: unknown key; a candidate has a `name` and a `model` table",
        ),
        (
            '[[candidates]]\nname = "a"\n[[candidates]]\nname = "a"\n',
            r"candidates\[1\] \('a'\): the name 'a' is taken by candidates\[0\]",
        ),
        ('[[candidates]]\nname = "n"\nmodel = { kind = "null" }\n', r"a 'null' teacher learns nothing"),
        ("[grid]\nhiden = [[8]]\n", r"grid\.hiden: not a teacher model field"),
        ("candidates = []\n", r"no candidates: add \[\[candidates\]\]"),
        ('title = "x"\n', r"title: unknown key; allowed: candidates, grid"),
    ],
)
def test_bad_candidates_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_candidates(_write(tmp_path, "c.toml", text), Config().teacher.model)


def test_cli_reports_a_bad_candidates_file_before_touching_kafka(tmp_path):
    cfg = _write(tmp_path, "cfg.toml", '[kafka]\nbootstrap_servers = "127.0.0.1:1"\n')
    bad = _write(tmp_path, "c.toml", '[[candidates]]\nname = "tiny"\nmodel = { hiden = [8] }\n')
    result = CliRunner().invoke(app, ["sweep", "--config", str(cfg), "--candidates", str(bad)])
    assert result.exit_code == 2
    assert "candidates[0] ('tiny').model.hiden: unknown field" in result.output
    missing = CliRunner().invoke(app, ["sweep", "--config", str(cfg), "--candidates", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "does not exist; pass one with --candidates" in missing.output
    good = _write(tmp_path, "g.toml", '[[candidates]]\nname = "default"\n')
    for flags, message in (
        (["--warmup", "1.5"], "--warmup 1.5: give the share"),
        (["--objective", "auc"], "'auc' is not one of 'gain'"),
        (["--task", "like"], "--task 'like' is not a configured task"),
        (["--budget-examples", "0"], "--budget-examples must be a positive"),
        (["--from-time", "soon"], "--from-time 'soon': use ISO 8601"),
    ):
        result = CliRunner().invoke(app, ["sweep", "--config", str(cfg), "--candidates", str(good), *flags])
        assert result.exit_code == 2 and message in result.output, (flags, result.output)


# -- windows ---------------------------------------------------------------------------------


def test_offsets_and_times_parse_or_say_which_forms_work():
    assert parse_offsets("1200", "--from-offset") == 1200
    assert parse_offsets("0:10,3:7", "--from-offset") == {0: 10, 3: 7}
    for bad in ("x", "0:-1", "0=3", "-5"):
        with pytest.raises(ConfigError, match="partition:offset pairs"):
            parse_offsets(bad, "--from-offset")
    now = 1_700_000_000_000
    assert parse_time("now", "--to-time", now) == now
    assert parse_time("now-2h", "--from-time", now) == now - 2 * 3600 * 1000
    assert parse_time("1699999999000", "--from-time", now) == 1_699_999_999_000
    assert parse_time("2023-11-14T22:13:20Z", "--from-time", now) == now
    assert parse_time("2023-11-14T22:13:20", "--from-time", now) == now  # naive: UTC
    with pytest.raises(ConfigError, match="use ISO 8601"):
        parse_time("yesterday", "--from-time", now)
    with pytest.raises(ConfigError, match="must be before --to-time"):
        Window.parse(from_time="now-1h", to_time="now-2h", now_ms=now)
    with pytest.raises(ConfigError, match="--time-kind 'wall'"):
        Window.parse(time_kind="wall")
    with pytest.raises(ConfigError, match=r"partitions 0..1, not \[5\]"):
        Window.parse(from_offset="5:0").check(2, "examples")
    with pytest.raises(ConfigError, match="partition 0: --from-offset 9 is not before --to-off"):
        Window.parse(from_offset="9", to_offset="0:9").check(2, "examples")


def test_partitions_merge_by_earliest_event_keeping_each_partition_in_order(make_batch):
    a = [make_batch(4, seq=s) for s in (0, 2, 5)]  # event times grow with seq
    b = [make_batch(4, seq=s, producer_id="other") for s in (1, 2, 3)]
    merged = merge_in_event_order({1: b, 0: a})
    assert [x.batch_id for x in merged] == [
        "test-producer-0",
        "other-1",
        "test-producer-2",
        "other-2",
        "other-3",
        "test-producer-5",
    ]


# -- the real learners, in memory ---------------------------------------------------------------


def test_sweep_in_memory_reports_costs_and_writes_a_loadable_winner(tmp_path, make_batch):
    base_file = _write(tmp_path, "base.toml", "[teacher.model]\nhidden = [16]\nembedding_dim = 4\ncross_layers = 0\n")
    config = load_config(
        base_file, environ={}, students=[{"name": "aux", "mode": "aux", "model": {"hidden": [8], "embedding_dim": 2}}]
    )
    cands = load_candidates(
        _write(
            tmp_path,
            "c.toml",
            """
[grid]
hidden = [[8], [16], [32]]
""",
        ),
        config.teacher.model,
    )
    batches = [make_batch(64, seq=s) for s in range(24)]
    budget = Budget(examples=3_000)
    report = sweep_batches(config, cands, batches, budget, warmup=0.25, device="cpu")
    assert report["budget"]["spent_examples"] <= 3_000
    assert sum(c["examples"] for c in report["candidates"]) == report["budget"]["spent_examples"]
    assert report["plan"]["left_out_examples"] > 0  # 3 x 1,536 examples would not fit
    assert [c["rank"] for c in report["candidates"]] == [1, 2, 3]
    win = report["candidates"][0]
    assert report["winner"] == win["name"] and win["rung_reached"] == win["rungs"] == 2
    for c in report["candidates"]:
        t = c["teacher"]
        assert t["flops_per_example"] > 0 and t["params"] > 0 and t["seconds"] > 0
        assert t["gflop_per_1k_examples"] == pytest.approx(4 * t["flops_per_example"] / 1e6)
        assert math.isfinite(c["proxy"]["gain"]) and "click" in t["metrics"]
        assert c["gain_per_gflop"] == pytest.approx(c["proxy"]["gain"] / t["gflop_per_1k_examples"])
    report["run_id"] = "unit"
    write_outputs(report, config, tmp_path / "out")
    winner_file = tmp_path / "out" / "winner-teacher.toml"
    written = tomllib.loads(winner_file.read_text())["teacher"]["model"]
    assert written["hidden"] == win["model"]["hidden"]
    merged = load_config(base_file, environ={}, **read_file(winner_file))
    assert merged.teacher.model == ModelConfig(**win["model"])
    assert (tmp_path / "out" / "sweep.json").exists()
    assert np.isfinite(report["baseline"]["metrics"]["click"]["logloss"])
