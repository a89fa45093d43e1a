"""The encoder's named statistics (amortize/nn/statistics.py): what the heads read, and one-group levels."""

import math
from dataclasses import fields

import pytest
import torch

import amortize as am
from amortize.models import SAMPLERS, gaussian_2level, gaussian_3level
from amortize.nn import DatasetStatistics, GroupStatistics, HierarchicalEncoder


def _encoder(amortizer: am.Amortizer) -> HierarchicalEncoder:
    return amortizer.guide.encoder


def _finite(stats: DatasetStatistics) -> bool:
    tensors = [getattr(stats, f.name) for f in fields(stats) if f.name != "levels"]
    for level in stats.levels.values():
        tensors += [getattr(level, f.name) for f in fields(level) if f.name != "groups"]
        tensors += [getattr(level.groups, f.name) for f in fields(level.groups)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_statistics_are_finite_and_fit_the_heads_of_every_shipped_model(name):
    """Simulated datasets of every shipped model: every named statistic is finite and the vectors the
    skip paths read have the widths the heads were built for."""
    from amortize import models

    a = am.Amortizer(getattr(models, name), SAMPLERS[name](), hidden=8)
    enc = _encoder(a)
    data = a.simulate_batch(torch.Generator().manual_seed(0), 3).data
    stats = enc.statistics(data)
    assert _finite(stats)
    B, L = 3, len(enc.levels)
    assert stats.location_scale().shape == (B, enc.raw_dataset_dim)
    assert stats.counts().shape == (B, enc.count_dim)
    assert stats.covariate_slopes().shape == (B, enc.slope_dim)
    assert stats.features.shape == (B, enc.n_global_stats)
    assert list(stats.levels) == list(enc.levels)
    for lvl, level in stats.levels.items():
        G = data.size(lvl)
        assert level.features.shape == (B, G, enc.level_stats[lvl])
        assert level.groups.has_measurements == bool(enc.group_slope_dim[lvl])
        if level.groups.has_measurements:
            assert level.groups.measurements().shape == (B, G, enc.group_slope_dim[lvl])
    # the global head's location skip path: mean, log sd, then per level (innermost first) three log sds
    inner_first = [stats.levels[lvl] for lvl in reversed(enc.levels)]
    expected = [stats.mean, stats.log_sd] + [
        getattr(s, k) for k in ("pooled_log_sd", "between_log_sd", "excess_log_sd") for s in inner_first
    ]
    assert torch.equal(stats.location_scale(), torch.stack(expected, -1))
    sizes = [math.log(data.size(lvl)) for lvl in enc.levels] + [math.log(data.n_obs)]
    assert torch.allclose(stats.counts(), torch.tensor(sizes).expand(B, L + 1))


@pytest.mark.parametrize("name", ["gaussian_2level", "varying_slopes"])
def test_group_statistics_flatten_into_rows_and_concatenate(name):
    from amortize import models

    a = am.Amortizer(getattr(models, name), SAMPLERS[name](), hidden=8)
    gen = torch.Generator().manual_seed(1)
    parts = [_encoder(a).statistics(a.simulate_batch(gen, 2).data).levels["group"].groups for _ in range(2)]
    rows = GroupStatistics.cat([p.rows() for p in parts])
    M, m0 = sum(p.mean.numel() for p in parts), parts[0].mean.numel()
    assert rows.mean.shape == rows.unit_log_sd.shape == (M,)
    assert torch.equal(rows.mean[:m0], parts[0].mean.reshape(-1))
    if parts[0].has_measurements:
        k = parts[0].slopes.shape[-1]
        assert rows.slopes.shape == rows.slopes_log_precision.shape == (M, k)
        assert rows.measurements().shape == (M, k + 2)
        assert torch.equal(rows.measurements()[:m0], parts[0].measurements().reshape(m0, k + 2))
    else:
        assert rows.slopes is None


def test_a_level_with_one_group_has_finite_between_group_statistics():
    """One group: no between-group degrees of freedom. Its spread reads 0 (the floored log sds), its
    log number of groups 0, and nothing is NaN; the rows' statistics are as with more groups."""
    one = am.HierarchicalData.from_frame({"group": ["a"] * 4, "y": [1.0, 2, 3, 4]}, levels=["group"], response="y")
    stats = HierarchicalEncoder(("group",), {}, hidden=4).statistics(one)
    assert _finite(stats)
    level, s = stats.levels["group"], torch.tensor([1.0, 2, 3, 4]).std(unbiased=False)
    assert float(level.log_groups) == 0.0
    assert torch.allclose(level.between_log_sd, 0.5 * torch.log(1e-6 * s**2))
    assert torch.allclose(level.excess_log_sd, 0.5 * torch.log(1e-4 * s**2))
    assert torch.allclose(level.pooled_log_sd, 0.5 * torch.log(s**2 * 4 / 3 + 1e-6 * s**2))  # N - G = 3 dof


def test_one_top_level_group_with_a_group_covariate_is_finite():
    frame = {
        "district": ["d"] * 12,
        "school": [f"s{i // 4}" for i in range(12)],
        "y": [float(i % 5) for i in range(12)],
        "c": [1.0] * 12,
    }
    data = am.HierarchicalData.from_frame(
        frame, levels=["district", "school"], response="y", covariates={"district": ["c"]}
    )
    enc = HierarchicalEncoder(("district", "school"), {"district": ["c"]}, hidden=4)
    stats = enc.statistics(data)
    assert _finite(stats) and float(stats.levels["district"].log_groups) == 0.0
    assert float(stats.levels["district"].between_slopes.abs().sum()) == 0.0  # nothing to regress on


def test_training_on_one_to_four_groups_is_finite_and_draws_for_one_group():
    """groups=(1, 4): training stays finite, and a dataset of one group draws finite values."""
    sampler = am.StructureSampler(["group"], groups={"group": (1, 4)}, obs=(2, 6))
    a = am.Amortizer(gaussian_2level, sampler, hidden=16)
    history = a.fit(steps=30, batch_size=16, log_every=1, pilot_structures=2, progress=False)
    assert a.step == 30 and len(history) == 30 and all(math.isfinite(h["loss"]) for h in history)
    one = am.HierarchicalData.from_frame({"group": ["a"] * 4, "y": [1.0, 2, 3, 4]}, levels=["group"], response="y")
    draws = a.posterior(one).sample(200, seed=0)
    assert all(bool(torch.isfinite(v).all()) for v in draws.values())
    assert draws["theta"].shape == (200, 1)


def test_fixed_structure_with_one_top_level_group_trains():
    """One district, three schools, as a fixed structure: the pilot fit is solvable and draws are finite."""
    frame = {
        "district": ["d"] * 12,
        "school": [f"s{i // 4}" for i in range(12)],
        "y": [float(i % 5) for i in range(12)],
    }
    data = am.HierarchicalData.from_frame(frame, levels=["district", "school"], response="y")
    a = am.Amortizer(gaussian_3level, data, hidden=8)
    history = a.fit(steps=5, batch_size=8, log_every=1, pilot_structures=2, progress=False)
    assert all(math.isfinite(h["loss"]) for h in history)
    draws = a.posterior(data).sample(50, seed=0)
    assert all(bool(torch.isfinite(v).all()) for v in draws.values())


def test_group_sd_that_underflows_scores_a_draw_at_its_loc():
    """A global drawn far in q's tail (tau 1e-37) gives the groups a q sd whose square underflows; log q
    of a value at its loc was then 0 / 0, and the verdict, which scores the draws it holds, raised.
    The sd is floored where its square stays normal."""
    sampler = am.StructureSampler(["group"], groups={"group": (3, 5)}, obs=(2, 4))
    a = am.Amortizer(gaussian_2level, sampler, hidden=8)
    a.fit(steps=3, batch_size=8, pilot_structures=2, progress=False)
    data = am.HierarchicalData.from_frame(
        {"group": ["a", "a", "b", "b", "c"], "y": [0.1, 0.3, -0.2, 0.5, 1.0]}, levels=["group"], response="y"
    )
    one = torch.ones(1)
    values = {"mu": 0.0 * one, "tau": 1e-37 * one, "sigma": one, "theta": torch.zeros(1, 3)}
    lp = a.posterior(data).log_prob(values)
    assert lp.shape == (1,) and bool(torch.isfinite(lp).all())
