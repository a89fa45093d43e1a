"""Tests of PSIS (amortize.validate.psis), the corrected draws and diagnostics of Posterior, and the
training ranges behind the out-of-range flags (amortize.validate.ranges).

Weights from known distributions check k: a bounded ratio has k <= 0, a Pareto tail of index
1 / k0 gives k near k0 within the Monte Carlo error of the fit (sd about (1 + k) / sqrt(M)).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.importance import K_THRESHOLD, MIN_DRAWS, CorrectedDraws, ImportanceSampledPosterior, psis
from amortize.ranges import value_flags

from .conftest import normal_known

PRIOR_SD, GROUP_SD, NOISE_SD = 2.0, 0.5, 1.0  # conjugate(): wide posteriors, which a brief training covers


def conjugate(data: am.HierarchicalData) -> None:
    """mu ~ N(0, 2); theta_g ~ N(mu, 0.5); y ~ N(theta_g, 1): a Gaussian posterior in closed form."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, GROUP_SD))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], NOISE_SD), obs=data.y)


# --------------------------------------------------------------------------- PSIS on known weights
def test_k_is_small_for_bounded_weights():
    gen = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(4000, generator=gen, dtype=torch.float64)  # q = N(0, 2^2), p = N(0, 1)
    lw = torch.distributions.Normal(0.0, 1.0).log_prob(x) - torch.distributions.Normal(0.0, 2.0).log_prob(x)
    res = psis(lw)
    assert res.k < 0.3 and res.ok and res.tail_length == math.ceil(3 * math.sqrt(4000))
    assert psis(torch.rand(4000, generator=gen).log()).k < 0  # uniform weights: a bounded tail (k = -1)


@pytest.mark.parametrize("k0", [0.3, 0.8, 1.3])
def test_k_recovers_a_pareto_tail(k0):
    gen = torch.Generator().manual_seed(1)
    S = 10_000
    lw = -k0 * torch.rand(S, generator=gen, dtype=torch.float64).log()  # w = U^-k0: Pareto of index 1 / k0
    res = psis(lw)
    M = res.tail_length
    tol = 4 * (1 + k0) / math.sqrt(M) + 10 / (M + 10) * abs(0.5 - k0)  # 4 sd + the prior's shrinkage
    assert abs(res.k - k0) < tol
    assert res.ok == (k0 <= K_THRESHOLD)


def test_smoothed_weights_are_normalized_and_match_arviz():
    lw = 1.5 * torch.randn(3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = psis(lw)
    assert torch.logsumexp(res.log_weights, 0).abs() < 1e-12
    raw = torch.softmax(lw, 0)
    assert res.weights.max() < raw.max() * 1.05 and 1 / (raw * raw).sum() <= res.ess  # the tail is tamed
    assert 1 <= res.ess <= 3000
    az = pytest.importorskip("arviz")
    ref_lw, ref_k = az.psislw(lw.numpy().copy())
    assert res.k == pytest.approx(float(ref_k), abs=1e-10)
    np.testing.assert_allclose(res.log_weights.numpy(), ref_lw, atol=1e-10)


def test_few_draws_flat_tails_and_non_finite_weights():
    few = psis(torch.randn(MIN_DRAWS - 1))
    assert math.isnan(few.k) and not few.ok and torch.logsumexp(few.log_weights, 0).abs() < 1e-12
    flat = psis(torch.zeros(500))
    assert flat.k == -math.inf and flat.ess == pytest.approx(500)
    lw = torch.randn(500, generator=torch.Generator().manual_seed(3))
    lw[:50] = -math.inf
    lw[50] = math.nan
    res = psis(lw)
    assert bool((res.weights[:51] == 0).all()) and math.isfinite(res.k)
    assert math.isnan(psis(torch.full((100,), -math.inf)).k)


# --------------------------------------------------------------------------- Posterior: corrected draws
def exact_posterior(data: am.HierarchicalData) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior mean and sd of (mu, theta_1..G) under :func:`conjugate`: ``[G + 1]`` each."""
    G = data.size("group")
    prec = torch.zeros(G + 1, G + 1, dtype=torch.float64)
    prec[0, 0] = PRIOR_SD**-2 + G * GROUP_SD**-2
    prec[0, 1:] = prec[1:, 0] = -(GROUP_SD**-2)
    prec[1:, 1:] += torch.diag(GROUP_SD**-2 + data.counts("group").double() * NOISE_SD**-2)
    cov = torch.linalg.inv(prec)
    sums = torch.zeros(G, dtype=torch.float64).index_add(0, data.index("group"), data.y.double())
    mean = cov @ torch.cat([torch.zeros(1, dtype=torch.float64), sums * NOISE_SD**-2])
    return mean, cov.diagonal().sqrt()


def _dataset(seed: int, scale: float = 1.0) -> am.HierarchicalData:
    group = torch.arange(4).repeat_interleave(3)
    data = am.HierarchicalData(["group"], {}, group)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        y = am.simulate(conjugate, am.trace_structure(conjugate, data), data, 1).data.y[0]
    return data.with_response(scale * y)


@pytest.fixture(scope="module")
def amortizer():
    """A briefly trained amortizer (wide but overlapping q: a good proposal) on a fixed structure."""
    a = am.Amortizer(conjugate, _dataset(0).with_response(None), hidden=32, flow_bins=0, seed=0)
    a.fit(steps=30, batch_size=32, warmup=10, progress=False)
    return a


def _error(draws: dict[str, torch.Tensor], mean: torch.Tensor, sd: torch.Tensor) -> float:
    x = torch.cat([draws["mu"][:, None], draws["theta"]], 1).double()  # [n, G + 1]
    return float(((x.mean(0) - mean) / sd).abs().mean())


def test_correct_cuts_the_mean_error(amortizer):
    n, improved = 4000, 0
    for seed in range(101, 105):
        data = _dataset(seed)
        mean, sd = exact_posterior(data)
        post = amortizer.posterior(data)
        plain = post.sample(n, seed=seed)
        fixed = post.sample(n, seed=seed, correct=True)
        assert isinstance(fixed, CorrectedDraws) and fixed.num_proposals == 4 * n // 8
        assert fixed.corrected == (fixed.pareto_k <= K_THRESHOLD)
        if not fixed.corrected:
            continue
        e_plain, e_fixed = _error(plain, mean, sd), _error(fixed, mean, sd)
        mc = 3 * (1 / math.sqrt(fixed.ess) + 1 / math.sqrt(n))  # importance + resampling error, in sds
        assert e_fixed < mc, (seed, e_fixed, mc)
        improved += e_fixed < e_plain
    assert improved >= 3


def test_correct_is_seeded_batched_and_leaves_the_rng_alone(amortizer):
    data = _dataset(7)
    post = amortizer.posterior(data)
    state = torch.get_rng_state()
    a, b = post.sample(200, seed=5, correct=True), post.sample(200, seed=5, correct=True)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a) and a.pareto_k == b.pareto_k
    batch = data.with_response(torch.stack([data.y, _dataset(8).y, _dataset(9).y]))  # [3, N]
    out = amortizer.posterior(batch).sample(100, seed=0, correct=True)
    assert out["mu"].shape == (100, 3) and out["theta"].shape == (100, 3, 4)
    assert len(out.pareto_k) == len(out.corrected) == len(out.ess) == 3
    diag = amortizer.posterior(batch).diagnostics(num_samples=300)
    assert len(diag["pareto_k"]) == 3 and all(1 <= e <= 300 for e in diag["ess"])


def test_untrustworthy_weights_give_flagged_uncorrected_draws(amortizer, caplog):
    data = _dataset(11, scale=40.0)  # a response scale far outside training: q misses the posterior
    post = amortizer.posterior(data)
    with caplog.at_level(logging.WARNING, logger="amortize.posterior"):
        out = post.sample(300, seed=0, correct=True)
    assert out.pareto_k > K_THRESHOLD and out.corrected is False
    assert "uncorrected" in caplog.text and out["theta"].shape == (300, 4)
    diag = post.diagnostics(num_samples=300)
    assert not diag["ok"] and any("response 'y': log sd" in f and "above" in f for f in diag["flags"])


# --------------------------------------------------------------------------- training ranges and flags
def test_training_ranges_are_recorded_at_the_pilot_and_kept(tmp_path):
    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6), covariates={"obs": {"x": {}}})
    a = am.Amortizer(normal_known, sampler, hidden=8, flow_bins=0)
    assert a.ranges == {"group": [3, 8], "obs": [2, 6]}  # before the pilot: the sampler's structure alone
    a.save(tmp_path / "untrained.pt")  # saving simulates nothing
    assert torch.equal(a.generator.get_state(), am.Amortizer(normal_known, sampler, hidden=8).generator.get_state())
    a.fit(steps=1, batch_size=16, pilot_structures=4, progress=False)
    ranges = a.ranges
    assert ranges["group"] == [3, 8] and ranges["obs"] == [2, 6]
    lo, hi = ranges["response"]["log_sd"]
    assert lo < 0 < hi and ranges["response"]["mean"][0] < 0 < ranges["response"]["mean"][1]
    assert ranges["covariates"]["x"][0] < -2 and ranges["covariates"]["x"][1] > 2  # 64 x ~5 x 4 normal draws
    a.save(tmp_path / "a.pt")
    assert am.Amortizer.load(tmp_path / "a.pt", normal_known).ranges == ranges  # kept without the sampler


def test_fixed_three_level_structure_is_in_range_on_its_own_data():
    """Children per parent are recorded and compared (not a level's total count against a per-parent one)."""
    from amortize.models import gaussian_3level

    sampler = am.StructureSampler(["district", "school"], groups={"district": (5, 5), "school": (1, 6)}, obs=(1, 3))
    fixed = sampler.sample(torch.Generator().manual_seed(0))
    a = am.Amortizer(gaussian_3level, fixed, hidden=8, flow_bins=0)
    a.fit(steps=1, batch_size=4, pilot_structures=2, progress=False)
    c = torch.bincount(fixed.parent_index("school"), minlength=5)
    assert a.ranges["school"] == [int(c.min()), int(c.max())] and a.ranges["district"] == [5, 5]
    data = am.simulate(gaussian_3level, a.structure, fixed, 1).data
    own = data.with_response(data.y[0])
    assert a.posterior(own).range_flags() == []
    # and the check has power: one more child under one parent is out of range
    more = am.HierarchicalData(
        ["district", "school"],
        {"school": torch.cat([fixed.parents["school"], torch.tensor([0] * 7)])},
        torch.cat([fixed.group, torch.arange(fixed.size("school"), fixed.size("school") + 7)]),
        y=torch.zeros(fixed.n_obs + 7),
    )
    assert any("level 'school'" in f for f in a.posterior(more).range_flags())
    # and 4x the groups (the design and its data tiled four times) raises the outermost level's flag alone
    G, S = fixed.size("district"), fixed.size("school")
    tiled = am.HierarchicalData(
        ["district", "school"],
        {"school": torch.cat([fixed.parents["school"] + r * G for r in range(4)])},
        torch.cat([fixed.group + r * S for r in range(4)]),
    ).with_response(own.y.repeat(4))
    assert a.posterior(tiled).range_flags() == ["level 'district': 20 groups, trained on 5-5"]


def test_wrapper_is_the_one_line_correction(amortizer):
    post = amortizer.posterior(_dataset(7))
    wrapped = ImportanceSampledPosterior(post, oversample=3)
    a, b = wrapped.sample(100, seed=2), post.sample(100, seed=2, correct=True, oversample=3)
    assert isinstance(a, CorrectedDraws) and a.num_proposals == 100
    assert all(torch.equal(a[k], b[k]) for k in a) and a.pareto_k == b.pareto_k
    lists = ImportanceSampledPosterior(amortizer.posterior([_dataset(7), _dataset(8)])).sample(50, seed=0)
    assert len(lists) == 2 and all(isinstance(c.pareto_k, float) for c in lists)
    with pytest.raises(am.DataError, match="streamed"):  # a streamed dataset's full log density is not computed
        ImportanceSampledPosterior(amortizer.posterior(_dataset(7), chunk_groups=2)).sample(10)


def test_value_flags_name_the_response_and_covariate():
    ranges = {"response": {"mean": [-1.0, 1.0], "log_sd": [-3.0, 0.0]}, "covariates": {"x": [0.0, 1.0]}}
    group = torch.arange(3).repeat_interleave(2)
    inside = am.HierarchicalData(
        ["group"], {}, group, y=[0.1, 0.2, 0.0, -0.1, 0.3, 0.2], covariates={"obs": {"x": [0.5] * 6}}
    )
    assert value_flags(inside, ranges) == []
    outside = am.HierarchicalData(
        ["group"], {}, group, y=[5.0, 5.2, 4.0, 5.1, 4.3, 5.2], covariates={"obs": {"x": [0.5, 3.0, 0, 0, 0, 0]}}
    )
    flags = value_flags(outside, ranges)
    assert any("response 'y': mean 4.8 above" in f for f in flags)
    assert any("covariate 'x': values 0 to 3" in f for f in flags)
    batch = inside.with_response(torch.stack([inside.y, outside.y]))
    assert [f for f in value_flags(batch, {"response": ranges["response"]}) if f.startswith("dataset 1:")]
    assert value_flags(outside, {"group": [1, 5]}) == []  # older checkpoints: structure only


def test_four_times_the_groups_raises_the_flag(amortizer):
    group = torch.arange(16).repeat_interleave(3)  # trained on exactly 4 groups of 3
    data = am.HierarchicalData(["group"], {}, group, y=torch.randn(48, generator=torch.Generator().manual_seed(0)))
    diag = amortizer.posterior(data).diagnostics(num_samples=100)
    assert not diag["ok"] and any("level 'group': 16 groups, trained on 4-4" in f for f in diag["flags"])
