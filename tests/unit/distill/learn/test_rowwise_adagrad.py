"""Row-wise Adagrad: one accumulator per row, the exact update, sparse and dense gradients alike,
and checkpoints of torch's element-wise Adagrad taken over."""

from __future__ import annotations

import torch
from torch import nn

from distill.learn.rowwise_adagrad import RowWiseAdagrad

LR, EPS = 0.1, 1e-10


def lookups(table: nn.Embedding, ids: list[int], seed: int) -> None:
    """A loss over the looked-up rows (some ids twice), its gradient on the table."""
    weights = torch.randn(len(ids), table.embedding_dim, generator=torch.Generator().manual_seed(seed))
    table.zero_grad(set_to_none=True)
    (table(torch.tensor(ids)) * weights).sum().backward()


def reference(weight: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """The update written out densely: per row, accumulator += mean(g^2), row -= lr g / (sqrt + eps)."""
    w, accumulator = weight.clone(), torch.zeros(weight.shape[0])
    for g in grads:
        touched = g.abs().sum(1) > 0
        accumulator += torch.where(touched, g.pow(2).mean(1), torch.zeros(()))
        step = LR * g / (accumulator.sqrt() + EPS).unsqueeze(1)
        w -= torch.where(touched.unsqueeze(1), step, torch.zeros(()))
    return w


def test_sparse_steps_match_the_row_wise_update_and_keep_one_accumulator_per_row():
    table = nn.Embedding(10, 4, sparse=True)
    start = table.weight.detach().clone()
    optimizer = RowWiseAdagrad(table.parameters(), lr=LR, eps=EPS)
    grads = []
    for seed, ids in enumerate([[1, 3, 3, 7], [3, 4], [1, 1, 9, 0]]):
        lookups(table, ids, seed)
        grads.append(table.weight.grad.to_dense())
        optimizer.step()
    torch.testing.assert_close(table.weight.detach(), reference(start, grads))
    (state,) = optimizer.state.values()
    assert state["sum"].shape == (10,)  # a scalar per row, not per element
    untouched = [2, 5, 6, 8]
    torch.testing.assert_close(table.weight.detach()[untouched], start[untouched])
    assert (state["sum"][untouched] == 0).all()


def test_a_dense_gradient_steps_as_the_same_sparse_one():
    """A trainer's ranks all-reduce table gradients dense: the same rows move the same way."""
    sparse, dense = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=False)
    dense.weight.data.copy_(sparse.weight.data)
    opt_sparse = RowWiseAdagrad(sparse.parameters(), lr=LR)
    opt_dense = RowWiseAdagrad(dense.parameters(), lr=LR)
    for seed, ids in enumerate([[1, 3, 3], [3, 8]]):
        lookups(sparse, ids, seed)
        lookups(dense, ids, seed)
        assert sparse.weight.grad.is_sparse and not dense.weight.grad.is_sparse
        opt_sparse.step()
        opt_dense.step()
    torch.testing.assert_close(dense.weight.detach(), sparse.weight.detach())


def test_a_checkpoint_of_torchs_element_wise_adagrad_is_taken_over_as_row_means():
    table = nn.Embedding(6, 3, sparse=True)
    old = torch.optim.Adagrad(table.parameters(), lr=LR)
    lookups(table, [0, 2, 2], seed=0)
    old.step()
    element_wise = old.state[table.weight]["sum"].clone()
    assert element_wise.shape == (6, 3)

    optimizer = RowWiseAdagrad(table.parameters(), lr=LR)
    optimizer.load_state_dict(old.state_dict())
    torch.testing.assert_close(optimizer.state[table.weight]["sum"], element_wise.mean(1))
    before = table.weight.detach().clone()
    lookups(table, [2], seed=1)
    optimizer.step()  # steps on from the taken-over accumulators
    moved = ~torch.isclose(table.weight.detach(), before).all(dim=1)
    assert moved.tolist() == [False, False, True, False, False, False]
