"""Progressive validation metrics against brute-force and numpy references."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from distill.learn.evaluation import ProgressiveEvaluator, TaskMetrics, auc_from_histograms


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels > 0.5]
    neg = scores[labels <= 0.5]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC by binary search of the sorted negatives: brute force is too big for
    20,000 examples."""
    pos, neg = np.sort(scores[labels > 0.5]), np.sort(scores[labels <= 0.5])
    below = np.searchsorted(neg, pos, "left")
    ties = np.searchsorted(neg, pos, "right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(pos) * len(neg)))


def binned(logits: np.ndarray) -> np.ndarray:
    """The evaluator's histogram bin of each prediction: 4096 bins of the probability."""
    return np.minimum(sigmoid(logits.astype(np.float64)) * 4096, 4095).astype(np.int64).astype(np.float64)


def ref_binary(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    logits, labels = logits.astype(np.float64), labels.astype(np.float64)
    p = np.clip(sigmoid(logits), 1e-7, 1 - 1e-7)
    return {
        "logloss": float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))),
        "calibration": float(sigmoid(logits).mean() / labels.mean()),
        "auc": brute_auc(sigmoid(logits), labels),
    }


def ref_regression(out: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    out, labels = out.astype(np.float64), labels.astype(np.float64)
    return {
        "rmse": float(np.sqrt(np.mean((out.astype(np.float64) - labels) ** 2))),
        "calibration": float(out.mean() / labels.mean()),
    }


def binary_stream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < sigmoid(logits)).astype(np.float32)
    return logits.astype(np.float32), labels


# -- AUC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_the_sorted_reference_auc_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 12, n).astype(np.float64) / 4  # many ties
    labels = (rng.random(n) < 0.2 + 0.05 * scores).astype(np.float32)
    assert exact_auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)


def test_auc_from_histograms_hand_example():
    # bins 0..3; positives in bins 2 and 3, negatives in bins 0 and 2 (one tie bin)
    pos = np.array([0, 0, 1, 1])
    neg = np.array([1, 0, 1, 0])
    # pairs: (2 vs 0)=1, (2 vs 2)=0.5, (3 vs 0)=1, (3 vs 2)=1 -> 3.5 / 4
    assert auc_from_histograms(pos, neg) == pytest.approx(3.5 / 4)
    assert math.isnan(auc_from_histograms(np.zeros(4), neg))
    assert math.isnan(auc_from_histograms(pos, np.zeros(4)))


def test_cumulative_histogram_auc_is_close_to_exact():
    logits, labels = binary_stream(20_000, seed=3)
    m = TaskMetrics("binary", window=10)
    for chunk in range(0, len(logits), 1000):
        m.update(logits[chunk : chunk + 1000], labels[chunk : chunk + 1000])
    exact = exact_auc(sigmoid(logits.astype(np.float64)), labels)
    assert 0.6 < exact < 0.95
    assert m.cumulative()["auc"] == pytest.approx(exact, abs=0.002)


# -- cumulative metrics ------------------------------------------------------------------------


def test_cumulative_binary_metrics_equal_numpy_reference():
    logits, labels = binary_stream(3000, seed=1)
    logits[:3] = [80.0, -80.0, 0.0]  # saturated logits stay finite through the clip
    labels[:3] = [0.0, 1.0, 1.0]
    m = TaskMetrics("binary", window=500)
    for lo, hi in [(0, 7), (7, 1200), (1200, 1200), (1200, 3000)]:
        m.update(logits[lo:hi], labels[lo:hi])
    got = m.cumulative()
    ref = ref_binary(logits, labels)
    assert m.count == 3000
    assert got["logloss"] == pytest.approx(ref["logloss"], rel=1e-9)
    assert got["calibration"] == pytest.approx(ref["calibration"], rel=1e-9)
    assert got["auc"] == pytest.approx(ref["auc"], abs=0.002)


def test_cumulative_regression_metrics_equal_numpy_reference():
    rng = np.random.default_rng(2)
    labels = rng.normal(3.0, 1.0, 2500).astype(np.float32)
    out = (labels + rng.normal(0.2, 0.5, 2500)).astype(np.float32)
    m = TaskMetrics("regression", window=100)
    for lo in range(0, 2500, 333):
        m.update(out[lo : lo + 333], labels[lo : lo + 333])
    got = m.cumulative()
    ref = ref_regression(out, labels.astype(np.float64))
    assert set(got) == {"rmse", "calibration"}
    assert got["rmse"] == pytest.approx(ref["rmse"], rel=1e-9)
    assert got["calibration"] == pytest.approx(ref["calibration"], rel=1e-9)


def test_empty_metrics_and_zero_label_sum():
    m = TaskMetrics("binary", window=10)
    m.update(np.zeros(0, np.float32), np.zeros(0, np.float32))
    assert m.count == 0 and m.cumulative() == {} and m.windowed() == {}
    m.update(np.array([0.0, 1.0], np.float32), np.array([0.0, 0.0], np.float32))
    got = m.cumulative()
    assert math.isnan(got["calibration"]) and math.isnan(got["auc"])
    expected = -(np.log(1 - sigmoid(np.array([0.0, 1.0])))).mean()
    assert got["logloss"] == pytest.approx(expected)


# -- windowed metrics --------------------------------------------------------------------------

SIZES = [30, 250, 7, 64, 99, 100, 1, 100, 0, 3, 101, 45, 55]  # smaller, equal and larger than 100


def test_windowed_binary_covers_exactly_the_last_window_examples():
    window = 100
    logits, labels = binary_stream(sum(SIZES), seed=5)
    m = TaskMetrics("binary", window=window)
    seen = 0
    for size in SIZES:
        m.update(logits[seen : seen + size], labels[seen : seen + size])
        seen += size
        lo = max(0, seen - window)
        got = m.windowed()
        ref = ref_binary(logits[lo:seen], labels[lo:seen])
        assert got["logloss"] == pytest.approx(ref["logloss"], rel=1e-9), (size, seen)
        assert got["calibration"] == pytest.approx(ref["calibration"], rel=1e-9), (size, seen)
        # the AUC of the window's histograms: the exact AUC of the bins, ties counting one half
        assert got["auc"] == pytest.approx(brute_auc(binned(logits[lo:seen]), labels[lo:seen]), abs=1e-12), seen
        assert got["auc"] == pytest.approx(ref["auc"], abs=0.01), (size, seen)
    # cumulative keeps everything
    assert m.count == seen
    assert m.cumulative()["logloss"] == pytest.approx(ref_binary(logits, labels)["logloss"], rel=1e-9)


@pytest.mark.parametrize(
    "mean, spread, bound",
    [
        (0.0, 1.5, 1e-5),  # predictions over the whole range
        (-3.5, 0.5, 2e-4),  # a 3% click rate: a few hundred of the 4096 bins
        (-4.5, 0.3, 2e-3),  # a 1% click rate, a narrow spread: about a hundred bins
    ],
)
def test_windowed_auc_of_a_full_window_is_close_to_the_exact_auc(mean, spread, bound):
    """The binning's error, far below the sampling error of a 20,000-example window's AUC
    (0.01 to 0.02 at these click rates)."""
    rng = np.random.default_rng(11)
    logits = rng.normal(mean, spread, 30_000)
    labels = (rng.random(30_000) < sigmoid(logits)).astype(np.float32)
    m = TaskMetrics("binary", window=20_000)
    for lo in range(0, 30_000, 256):
        m.update(logits[lo : lo + 256].astype(np.float32), labels[lo : lo + 256])
    last = slice(10_000, 30_000)
    exact = exact_auc(sigmoid(logits[last].astype(np.float32).astype(np.float64)), labels[last])
    assert m.windowed()["auc"] == pytest.approx(exact, abs=bound)


def test_windowed_regression_covers_exactly_the_last_window_examples():
    window = 100
    rng = np.random.default_rng(6)
    total = sum(SIZES)
    # a trend, so that any stale or missing element changes the answer
    labels = (np.arange(total) / 10 + rng.normal(0, 1, total)).astype(np.float32)
    out = (labels + rng.normal(0, 1, total)).astype(np.float32)
    m = TaskMetrics("regression", window=window)
    seen = 0
    for size in SIZES:
        m.update(out[seen : seen + size], labels[seen : seen + size])
        seen += size
        lo = max(0, seen - window)
        got = m.windowed()
        ref = ref_regression(out[lo:seen], labels[lo:seen].astype(np.float64))
        assert got["rmse"] == pytest.approx(ref["rmse"], rel=1e-9), (size, seen)
        assert got["calibration"] == pytest.approx(ref["calibration"], rel=1e-9), (size, seen)


# -- state -------------------------------------------------------------------------------------


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)  # as the checkpoint stores it
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_task_metrics_state_round_trip_continues_identically(kind):
    logits, labels = binary_stream(700, seed=7)
    a = TaskMetrics(kind, window=64)
    a.update(logits[:300], labels[:300])
    b = TaskMetrics(kind, window=5)  # the state carries the window
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert b.window == 64
    assert b.cumulative() == a.cumulative() and b.windowed() == a.windowed()
    for lo, hi in [(300, 333), (333, 500), (500, 700)]:
        a.update(logits[lo:hi], labels[lo:hi])
        b.update(logits[lo:hi], labels[lo:hi])
    assert b.count == a.count
    for key, value in a.cumulative().items():
        assert b.cumulative()[key] == pytest.approx(value, rel=1e-12)
    for key, value in a.windowed().items():
        assert b.windowed()[key] == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("ring", ["_ring_loss", "_ring_bin"])
@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_a_state_without_a_later_ring_gives_the_same_windowed_metrics(kind, ring):
    """A checkpoint written before the ring of each example's loss, or of its histogram bin,
    existed: the ring is recomputed from the window's predictions and labels on load."""
    logits, labels = binary_stream(300, seed=9)
    a = TaskMetrics(kind, window=64)
    a.update(logits, labels)
    old = {k: v for k, v in _roundtrip(a.state_dict()).items() if k != ring}
    b = TaskMetrics(kind, window=64)
    b.load_state_dict(old)
    for key, value in a.windowed().items():
        assert b.windowed()[key] == pytest.approx(value, rel=1e-12), key
    a.update(logits[:40], labels[:40])
    b.update(logits[:40], labels[:40])
    for key, value in a.windowed().items():
        assert b.windowed()[key] == pytest.approx(value, rel=1e-12), key


def test_progressive_evaluator_with_task_subset_and_state_round_trip():
    rng = np.random.default_rng(8)
    names, kinds = ["click", "watch", "like"], ["binary", "regression", "binary"]
    n = 400
    labels = np.stack(
        [
            (rng.random(n) < 0.3).astype(np.float32),
            rng.normal(2.0, 1.0, n).astype(np.float32),
            (rng.random(n) < 0.6).astype(np.float32),
        ],
        axis=1,
    )
    main = rng.normal(0, 1, (n, 3)).astype(np.float32)
    aux = rng.normal(0, 1, (n, 2)).astype(np.float32)  # aux column 0 -> like, 1 -> click

    ev = ProgressiveEvaluator(names, kinds, window=50)
    for lo in (0, 150):
        hi = lo + 150 if lo == 0 else n
        ev.update("main", main[lo:hi], labels[lo:hi])
        ev.update("aux", aux[lo:hi], labels[lo:hi], tasks=[2, 0])

    assert set(ev.metrics) == {
        ("click", "main"),
        ("watch", "main"),
        ("like", "main"),
        ("like", "aux"),
        ("click", "aux"),
    }
    for (task, head), col, task_i in [(("like", "aux"), 0, 2), (("click", "aux"), 1, 0)]:
        ref = TaskMetrics(kinds[task_i], window=50)
        ref.update(aux[:, col], labels[:, task_i])
        assert ev.metrics[(task, head)].cumulative() == ref.cumulative()
        assert ev.metrics[(task, head)].windowed() == ref.windowed()
    ref = TaskMetrics("regression", window=50)
    ref.update(main[:, 1], labels[:, 1])
    assert ev.metrics[("watch", "main")].cumulative() == ref.cumulative()

    snap = ev.snapshot()
    assert set(snap) == {"click", "watch", "like"}
    assert set(snap["click"]) == {"main", "aux"} and set(snap["watch"]) == {"main"}
    assert set(snap["like"]["aux"]) == {"cumulative", "windowed"}
    assert set(snap["watch"]["main"]["cumulative"]) == {"rmse", "calibration"}
    assert set(snap["like"]["aux"]["cumulative"]) == {"auc", "logloss", "calibration"}

    restored = ProgressiveEvaluator(names, kinds, window=50)
    restored.load_state_dict(_roundtrip(ev.state_dict()))
    assert restored.snapshot() == snap
    assert restored.metrics[("watch", "main")].kind == "regression"


def test_non_finite_outputs_show_in_the_log_loss_and_do_not_stop_the_metrics():
    """A model whose weights went NaN scores NaN: the metrics say so, the worker keeps running."""
    m = TaskMetrics("binary", window=8)
    m.update(np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.0, 1.0]))
    m.update(np.array([np.nan, np.nan, np.inf, -np.inf]), np.array([1.0, 0.0, 1.0, 0.0]))
    assert m.count == 7 and int(m.pos.sum() + m.neg.sum()) == 7
    assert math.isnan(m.cumulative()["logloss"]) and math.isnan(m.windowed()["logloss"])
    m.update(np.array([1.0]), np.array([1.0]))  # later batches are still counted
    assert m.count == 8


def test_gathered_updates_read_as_if_each_batch_were_applied_at_once():
    # Updates are applied in bunches; whenever the metrics are read (a progress line, a
    # checkpoint) they are those of every batch so far, in order, the window included.
    rng = np.random.default_rng(3)
    ev = ProgressiveEvaluator(["click"], ["binary"], window=1000)
    ref = TaskMetrics("binary", window=1000)
    for i in range(40):
        n = int(rng.integers(1, 300))
        out = rng.normal(0, 2, (n, 1)).astype(np.float32)
        label = (rng.random((n, 1)) < 0.3).astype(np.float32)
        ev.update("main", out, label)
        ref.update(out[:, 0], label[:, 0])
        if i in (0, 7, 8, 25):
            got = ev.metrics[("click", "main")]
            assert got.count == ref.count
            assert got.cumulative() == pytest.approx(ref.cumulative(), rel=1e-9)
            assert got.windowed() == pytest.approx(ref.windowed(), rel=1e-9)
    state = ev.state_dict()  # what a checkpoint holds: the last batches too
    restored = ProgressiveEvaluator(["click"], ["binary"], window=1000)
    restored.load_state_dict(_roundtrip(state))
    assert restored.metrics[("click", "main")].count == ref.count
    assert restored.snapshot()["click"]["main"]["windowed"] == pytest.approx(ref.windowed(), rel=1e-9)
