"""Losses against hand-computed values, and the three distillation modes."""

from __future__ import annotations

import math

import pytest
import torch

from distill.core.config import FeaturesConfig, ModelConfig, TaskConfig
from distill.learn.losses import soft_loss, student_loss, task_loss
from distill.learn.models import RankingModel

KINDS = ["binary", "regression", "binary"]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(logit: float, target: float) -> float:
    p = sig(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def data(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(n, 3, generator=g)
    aux = torch.randn(n, 2, generator=g)
    labels = torch.stack(
        [
            (torch.rand(n, generator=g) < 0.5).float(),
            torch.randn(n, generator=g),
            (torch.rand(n, generator=g) < 0.5).float(),
        ],
        dim=1,
    )
    teacher = torch.randn(n, 3, generator=g)
    return main, aux, labels, teacher


def test_task_loss_binary_is_bce_with_logits():
    logits = [0.3, -1.2, 2.0, 0.0]
    targets = [1.0, 0.0, 0.0, 1.0]
    expected = sum(bce(x, y) for x, y in zip(logits, targets, strict=True)) / 4
    got = task_loss(torch.tensor(logits), torch.tensor(targets), "binary")
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_task_loss_regression_is_mse():
    out = [1.0, -2.0, 0.5]
    target = [0.0, 1.0, 0.5]
    expected = (1.0 + 9.0 + 0.0) / 3
    assert float(task_loss(torch.tensor(out), torch.tensor(target), "regression")) == pytest.approx(expected)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 0.5])
def test_soft_loss_binary_against_hand_formula_with_temperature(t):
    out = [0.3, -1.2, 2.0]
    teacher = [1.5, -0.4, 3.0]
    expected = t * t * sum(bce(o / t, sig(z / t)) for o, z in zip(out, teacher, strict=True)) / 3
    got = soft_loss(torch.tensor(out), torch.tensor(teacher), "binary", t)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_soft_loss_binary_temperature_changes_the_value_and_softens_targets():
    out, teacher = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.5, -0.4, 3.0])
    values = {t: float(soft_loss(out, teacher, "binary", t)) for t in (1.0, 2.0, 4.0)}
    assert len({round(v, 6) for v in values.values()}) == 3
    # minimised where the student matches the teacher, at any temperature
    for t in (1.0, 3.0):
        at_teacher = float(soft_loss(teacher, teacher, "binary", t))
        assert at_teacher < float(soft_loss(teacher + 0.5, teacher, "binary", t))
        assert at_teacher < float(soft_loss(teacher - 0.5, teacher, "binary", t))


def test_soft_loss_binary_gradient_is_temperature_independent_at_first_order():
    # the T**2 factor keeps the gradient scale comparable across temperatures (Hinton et al.)
    teacher = torch.tensor([0.0])
    grads = {}
    for t in (1.0, 2.0, 8.0):
        out = torch.tensor([0.01], requires_grad=True)
        soft_loss(out, teacher, "binary", t).backward()
        grads[t] = float(out.grad)
    # d/do [T^2 * bce(o/T, sigmoid(0))] = T * (sigmoid(o/T) - 0.5) ~= o / 4 for small o
    for t, g in grads.items():
        assert g == pytest.approx(t * (sig(0.01 / t) - 0.5), rel=1e-4)
        assert g == pytest.approx(0.01 / 4, rel=0.01)


def test_soft_loss_regression_is_mse_to_teacher_and_ignores_temperature():
    out, teacher = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    for t in (1.0, 3.0):
        assert float(soft_loss(out, teacher, "regression", t)) == pytest.approx((1.0 + 4.0) / 2)


def hard_sum(main, labels) -> float:
    return sum(float(task_loss(main[:, i], labels[:, i], k)) for i, k in enumerate(KINDS))


def test_none_mode_ignores_the_teacher():
    main, aux, labels, teacher = data()
    total_a, parts_a = student_loss("none", main, aux, labels, teacher, KINDS, [0, 1, 2], 0.7, 2.0)
    total_b, parts_b = student_loss("none", main, aux, labels, teacher * 10 + 3, KINDS, [0, 1, 2], 0.7, 2.0)
    total_c, _ = student_loss("none", main, aux, labels, None, KINDS, [0, 1, 2], 0.7, 2.0)
    assert float(total_a) == pytest.approx(hard_sum(main, labels), rel=1e-6)
    assert float(total_a) == float(total_b) == float(total_c)
    assert set(parts_a) == set(parts_b) == {(0, "main"), (1, "main"), (2, "main")}


@pytest.mark.parametrize("mode", ["none", "direct", "aux"])
def test_no_teacher_falls_back_to_hard_loss_in_every_mode(mode):
    main, aux, labels, _ = data()
    total, parts = student_loss(mode, main, aux, labels, None, KINDS, [0, 2], 0.5, 1.0)
    assert float(total) == pytest.approx(hard_sum(main, labels), rel=1e-6)
    assert set(parts) == {(0, "main"), (1, "main"), (2, "main")}
    for i, k in enumerate(KINDS):
        assert float(parts[(i, "main")]) == pytest.approx(float(task_loss(main[:, i], labels[:, i], k)))


def test_aux_mode_without_teacher_does_not_need_aux_heads():
    main, _, labels, _ = data()
    total, _ = student_loss("aux", main, None, labels, None, KINDS, [0], 1.0, 1.0)
    assert float(total) == pytest.approx(hard_sum(main, labels), rel=1e-6)


def test_direct_with_weight_zero_equals_hard():
    main, aux, labels, teacher = data()
    total, parts = student_loss("direct", main, aux, labels, teacher, KINDS, [0, 1, 2], 0.0, 2.0)
    assert float(total) == pytest.approx(hard_sum(main, labels), rel=1e-6)
    assert {(0, "soft"), (1, "soft"), (2, "soft")} <= set(parts)  # soft parts still reported


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_direct_with_weight_one_equals_soft_for_distilled_tasks(temperature):
    main, aux, labels, teacher = data()
    distilled = [0, 1]  # task 2 is not distilled: stays on its hard label
    total, parts = student_loss("direct", main, aux, labels, teacher, KINDS, distilled, 1.0, temperature)
    expected = (
        float(soft_loss(main[:, 0], teacher[:, 0], "binary", temperature))
        + float(soft_loss(main[:, 1], teacher[:, 1], "regression", temperature))
        + float(task_loss(main[:, 2], labels[:, 2], "binary"))
    )
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert (2, "soft") not in parts
    assert float(parts[(0, "soft")]) == pytest.approx(
        float(soft_loss(main[:, 0], teacher[:, 0], "binary", temperature))
    )


def test_direct_mixes_hard_and_soft_linearly():
    main, aux, labels, teacher = data()
    w = 0.3
    total, parts = student_loss("direct", main, aux, labels, teacher, KINDS, [2], w, 1.0)
    expected = (
        float(parts[(0, "main")])
        + float(parts[(1, "main")])
        + (1 - w) * float(parts[(2, "main")])
        + w * float(parts[(2, "soft")])
    )
    assert float(total) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_aux_mode_adds_weighted_soft_loss_of_the_aux_head_only(w):
    main, aux, labels, teacher = data()
    distilled = [2, 1]  # aux column 0 learns task 2, column 1 learns task 1
    t = 2.0
    total, parts = student_loss("aux", main, aux, labels, teacher, KINDS, distilled, w, t)
    soft = float(soft_loss(aux[:, 0], teacher[:, 2], "binary", t)) + float(
        soft_loss(aux[:, 1], teacher[:, 1], "regression", t)
    )
    assert float(total) == pytest.approx(hard_sum(main, labels) + w * soft, rel=1e-6)
    assert float(parts[(2, "aux")]) == pytest.approx(float(soft_loss(aux[:, 0], teacher[:, 2], "binary", t)))
    assert float(parts[(1, "aux")]) == pytest.approx(float(soft_loss(aux[:, 1], teacher[:, 1], "regression", t)))
    assert (0, "aux") not in parts and not any(k[1] == "soft" for k in parts)
    # the teacher never reaches the main outputs' loss terms
    _, other = student_loss("aux", main, aux, labels, teacher + 5.0, KINDS, distilled, w, t)
    for i in range(3):
        assert float(other[(i, "main")]) == float(parts[(i, "main")])


def test_aux_mode_gives_the_main_head_no_gradient_from_the_aux_loss():
    torch.manual_seed(0)
    tasks = [TaskConfig(name="click"), TaskConfig(name="watch", type="regression")]
    model = RankingModel(
        FeaturesConfig(),
        tasks,
        ModelConfig(embedding_dim=4, hidden=[8], cross_layers=0),
        aux_tasks=["click", "watch"],
    )
    n = 32
    cat = torch.randint(0, 2**40, (n, 3))
    dense = torch.randn(n, 8)
    labels = torch.stack([(torch.rand(n) < 0.5).float(), torch.randn(n)], dim=1)
    teacher = torch.randn(n, 2) * 3
    main, aux = model(cat, dense)
    kinds = ["binary", "regression"]
    total, parts = student_loss("aux", main, aux, labels, teacher, kinds, [0, 1], 0.8, 2.0)
    aux_part = 0.8 * (parts[(0, "aux")] + parts[(1, "aux")])

    main_head = [model.head.weight, model.head.bias]
    grads = torch.autograd.grad(
        aux_part,
        main_head + [model.aux_head.weight, model.tower[0].weight],
        retain_graph=True,
        allow_unused=True,
    )
    for g in grads[:2]:
        assert g is None or torch.count_nonzero(g) == 0
    # ...while the aux head and the shared layers do learn from the teacher
    assert grads[2] is not None and torch.count_nonzero(grads[2]) > 0
    assert grads[3] is not None and torch.count_nonzero(grads[3]) > 0

    # and the main head's gradient from the total equals its gradient from the hard loss alone
    g_total = torch.autograd.grad(total, main_head, retain_graph=True)
    hard, _ = student_loss("none", main, aux, labels, teacher, kinds, [0, 1], 0.8, 2.0)
    g_hard = torch.autograd.grad(hard, main_head)
    for a, b in zip(g_total, g_hard, strict=True):
        torch.testing.assert_close(a, b)


def test_direct_mode_does_send_teacher_gradient_to_the_main_head():
    # the contrast to aux mode: here the teacher's signal reaches the served head
    main = torch.zeros(4, 3, requires_grad=True)
    _, _, labels, teacher = data(4)
    total, parts = student_loss("direct", main, None, labels, teacher, KINDS, [0], 1.0, 1.0)
    (g,) = torch.autograd.grad(parts[(0, "soft")], main)
    assert torch.count_nonzero(g[:, 0]) > 0
