"""Posterior predictive checks: default statistics per level and their p-values."""

from __future__ import annotations

import pytest
import torch

import amortize as am
from amortize.predictive import REDUCTIONS, default_statistics, misfit, ppc


def two_levels():
    return am.HierarchicalData.from_frame(
        {
            "district": ["d1", "d1", "d1", "d2", "d2", "d2"],
            "school": ["s1", "s1", "s2", "s3", "s3", "s4"],
            "y": [0.0, 1.0, 2.0, 3.0, 5.0, 4.0],
        },
        levels=["district", "school"],
        response="y",
    )


def test_default_statistics_cover_rows_and_every_level():
    data = two_levels()
    stats = default_statistics(data)
    assert list(stats)[:4] == ["y: mean", "y: sd", "y: min", "y: max"]
    assert {"school means: sd", "district means: max"} <= set(stats)
    level, t = stats["school means: max"]
    assert level == "school" and float(t(data.y)) == pytest.approx(4.0)  # schools: 0.5, 2, 4, 4
    assert float(stats["district means: min"][1](data.y)) == pytest.approx(1.0)


def test_p_values_are_exact_for_replicates_equal_to_or_above_the_data():
    """y_rep = y: every statistic ties, p = 0.5; y_rep = y + 1: every location statistic is exceeded
    (p = 1) and every spread ties (p = 0.5)."""
    data = two_levels()
    same = ppc(data, data.y.repeat(10, 1))
    assert all(r["p_value"] == 0.5 for r in same.rows) and same.extreme == []
    up = {r["statistic"]: r["p_value"] for r in ppc(data, data.y.repeat(10, 1) + 1.0).rows}
    for name, p in up.items():
        assert p == (0.5 if name.endswith(": sd") else 1.0), name


def test_p_values_of_a_well_specified_model_are_not_extreme():
    """Replicates from the data's own distribution: the p-value of the mean over 400 replicates of 200
    rows lies well inside (0.01, 0.99) (a 1-in-50 event for a uniform p-value at this seed)."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    data = am.HierarchicalData(["group"], {}, torch.arange(n) % 10, y=torch.randn(n, generator=gen))
    res = ppc(data, torch.randn(400, n, generator=gen))
    ps = {r["statistic"]: r["p_value"] for r in res.rows}
    assert 0.01 < ps["y: mean"] < 0.99 and 0.01 < ps["y: sd"] < 0.99
    assert res.num_samples == 400 and res.replicated["y: mean"].shape == (400,)


def test_posterior_ppc_and_shape_errors(amortizer):
    data = am.HierarchicalData.from_frame(
        {"group": ["b", "b", "a", "c", "c", "c"], "y": [0.1, 0.3, -1.0, 2.0, 1.5, 1.7]}, levels=["group"], response="y"
    )
    res = amortizer.posterior(data).ppc(50, seed=0)
    assert res.num_samples == 50 and len(res.rows) == 8 and all(0 <= r["p_value"] <= 1 for r in res.rows)
    with pytest.raises(am.DataError, match=r"\[n, 6\]"):
        ppc(data, torch.zeros(5, 7))
    with pytest.raises(am.DataError, match="one dataset"):
        amortizer.posterior([data, data]).ppc(5)


def test_the_sd_statistic_matches_tensor_std_far_from_zero():
    """The sd from sums and sums of squares agrees with ``Tensor.std`` for responses centred near 0 and
    near 10^4 (sd 1: relative error 1e-8, far below a float32 response's resolution), and is 0 for one row."""
    gen = torch.Generator().manual_seed(1)
    sd = REDUCTIONS["sd"]
    for offset in (0.0, 1e4):
        v = (offset + torch.randn(20, 500, generator=gen)).double()
        rel = float(((sd(v) - v.std(-1)) / v.std(-1)).abs().max())
        assert rel < 1e-14 + 1e-15 * offset**2, (offset, rel)  # cancellation: about 1e-16 (mean / sd)^2
    assert sd(torch.ones(3, 1, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]


def test_the_model_check_settles_on_its_first_replicates_exactly():
    """``misfit`` on the first 200 of 1000 replicates with ``total=1000``: where it settles it passes, and so
    do all 1000 (a statistic's count above the data only grows); data the model misfits (one row moved
    k sds) leave it open (None) on the first 200, and all 1000 fail them."""
    gen = torch.Generator().manual_seed(2)
    n = 300
    base = am.HierarchicalData(["group"], {}, torch.arange(n) % 20, y=torch.randn(n, generator=gen))
    settled = open_ = 0
    for k in (0.0, 2.0, 3.0, 3.5, 4.0, 5.0, 8.0):
        y = base.y.clone()
        y[0] = k if k else y[0]
        data = base.with_response(y)
        y_rep = torch.randn(1000, n, generator=gen)
        full, first = misfit(data, y_rep), misfit(data, y_rep[:200], total=1000)
        if first is None:
            open_ += 1
        else:
            settled += 1
            assert first["ok"] and full["ok"] and first["num_samples"] == 200, k
        if not full["ok"]:
            assert first is None, k
    assert settled >= 2 and open_ >= 2 and not misfit(base.with_response(y), y_rep)["ok"]
