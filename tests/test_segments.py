"""Segment sums and the crossed factors' mixing operator (amortize/nn/least_squares.py): the same values
and gradients as the plain gather-and-loop definitions they replace."""

import pytest
import torch

from amortize.nn.least_squares import mix, mixing, segment_mean, segment_sum


@pytest.mark.parametrize("shape", [(7, 3), (2, 7, 1), (4, 7, 5), (2, 3, 7, 2)])
def test_segment_sum_equals_a_loop_over_groups(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 2, 2, 4, 0, 1, 4])
    got = segment_sum(x, idx, 6)
    assert got.shape == (*shape[:-2], 6, shape[-1])
    for k in range(6):
        want = x[..., idx == k, :].sum(-2)
        assert torch.allclose(got[..., k, :], want)
    assert torch.equal(got[..., 3, :], torch.zeros_like(got[..., 3, :]))  # a group without rows sums to 0


def test_mixing_is_the_mean_over_a_groups_rows_of_the_other_factors_groups_and_so_is_its_gradient():
    g = torch.Generator().manual_seed(1)
    persons, items, rows = 9, 5, 40
    person = torch.cat([torch.arange(persons), torch.randint(0, persons, (rows - persons,), generator=g)])
    item = torch.randint(0, items, (rows,), generator=g)  # repeated (person, item) pairs among them
    emb = torch.randn(3, items, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, persons, 4, generator=g, dtype=torch.float64)

    want = segment_mean(emb[..., item, :], person, persons, torch.bincount(person, minlength=persons))
    (grad_want,) = torch.autograd.grad((want * weights).sum(), emb)
    got = mix(mixing(person, item, persons, items, torch.float64), emb)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), emb)
    assert got.shape == (3, persons, 4)
    assert torch.allclose(got, want) and torch.allclose(grad_got, grad_want)


def test_functions_of_the_structure_are_computed_once_per_structure_and_device():
    """The training step's data (the sampler's structure moved to the device it is on, then given each
    batch's responses) shares the cached mixing operators: they are built once, not per step."""
    import amortize as am

    data = am.HierarchicalData(("g",), {}, torch.tensor([0, 0, 1]))
    calls = []
    data.derived(("k",), lambda: calls.append(1))
    data.to("cpu").with_response(torch.zeros(2, 3)).derived(("k",), lambda: calls.append(2))
    data.to(dtype=torch.float64).derived(("k",), lambda: calls.append(3))
    assert calls == [1]
