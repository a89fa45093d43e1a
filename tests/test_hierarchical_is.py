"""Tests of the hierarchical importance weights (amortize.hierarchical_is) and the verdict built on them.

The trace split is checked against the joint weight it must sum to; the per-group evidence estimates
against the closed-form evidence of a conjugate model; the verdict against a quadrature reference of a
logistic model's globals on a design of 250 groups, where the joint weight over 252 latents degenerates.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.hierarchical_is import (
    WEIGHT_DRAWS,
    _subtree,
    group_log_weights,
    held_call,
    hierarchical_weights,
    parent_draws,
)
from amortize.importance import pareto_k_columns, psis
from amortize.objectives import log_weights
from amortize.predictive import MISFIT_DRAWS, MISFIT_FIRST
from amortize.shift import weighted_shift

from .test_psis import GROUP_SD, NOISE_SD, conjugate

GROUPS, ROWS = 250, 4


def logistic(data: am.HierarchicalData) -> None:
    """Varying intercepts on the logit scale: alpha_g ~ N(mu, tau), y ~ Bernoulli(sigmoid(alpha_g))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.5))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("group", data.size("group")):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Bernoulli(logits=alpha[..., data.index("group")]), obs=data.y)


def _design(groups: int, rows: int) -> am.HierarchicalData:
    return am.HierarchicalData(["group"], {}, torch.arange(groups).repeat_interleave(rows))


def _simulate(model, design: am.HierarchicalData, seed: int) -> am.HierarchicalData:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        y = am.simulate(model, am.trace_structure(model, design), design, 1).data.y[0]
    return design.with_response(y)


def reference_globals(data: am.HierarchicalData) -> dict[str, tuple[float, float]]:
    """Posterior mean and sd of mu and tau of :func:`logistic` on a grid, each group's intercept
    integrated out by 40-point Gauss-Hermite quadrature (groups of equal counts share one integral)."""
    k = torch.zeros(data.size("group"), dtype=torch.float64).index_add(0, data.index("group"), data.y.double())
    n = data.counts("group").double()
    pairs, times = torch.unique(torch.stack([k, n], 1), dim=0, return_counts=True)
    x, w = np.polynomial.hermite.hermgauss(40)
    x, w = torch.from_numpy(x), torch.from_numpy(w) / math.sqrt(math.pi)
    mu = torch.linspace(-4, 4, 161, dtype=torch.float64)
    tau = torch.linspace(0.005, 3, 150, dtype=torch.float64)
    a = mu[:, None, None] + math.sqrt(2) * tau[None, :, None] * x  # [mu, tau, node]
    ll = torch.zeros(len(mu), len(tau), dtype=torch.float64)
    for (kk, nn), t in zip(pairs, times):
        lik = kk * torch.nn.functional.logsigmoid(a) + (nn - kk) * torch.nn.functional.logsigmoid(-a)
        ll += t * torch.logsumexp(lik + w.log(), -1)
    lp = ll + dist.Normal(0.0, 1.5).log_prob(mu)[:, None] + dist.HalfNormal(1.0).log_prob(tau)[None, :]
    p = torch.softmax(lp.reshape(-1), 0).reshape(lp.shape)
    out = {}
    for name, grid, marg in (("mu", mu, p.sum(1)), ("tau", tau, p.sum(0))):
        m = float((grid * marg).sum())
        out[name] = (m, float(((grid - m) ** 2 * marg).sum().sqrt()))
    return out


@pytest.fixture(scope="module")
def many_groups():
    """A logistic amortizer trained on a fixed design of 250 groups of 4 rows."""
    design = _design(GROUPS, ROWS)
    a = am.Amortizer(logistic, design, hidden=32, flow_bins=0, seed=0)
    a.fit(steps=150, batch_size=16, warmup=10, progress=False)
    return a


@pytest.fixture(scope="module")
def conjugate_amortizer():
    a = am.Amortizer(conjugate, _design(30, 3), hidden=32, flow_bins=0, seed=0)
    a.fit(steps=60, batch_size=16, warmup=10, progress=False)
    return a


# --------------------------------------------------------------------------- vectorized Pareto k
def test_pareto_k_columns_is_psis_k_per_column():
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(300, 40, generator=g, dtype=torch.float64) * torch.linspace(0.05, 4, 40, dtype=torch.float64)
    lw[:, 3] = 0.0  # a flat tail
    lw[:10, 5] = -math.inf
    cols = pareto_k_columns(lw)
    ref = np.array([psis(lw[:, c]).k for c in range(40)])
    assert cols[3] == -math.inf and ref[3] == -math.inf
    fine = np.isfinite(ref)
    np.testing.assert_allclose(cols[fine], ref[fine], atol=0.02)  # column 5: its -inf count towards S here
    np.testing.assert_allclose(np.delete(cols, [3, 5]), np.delete(ref, [3, 5]), atol=1e-12)
    assert np.isnan(pareto_k_columns(lw[:20])).all()  # too few draws: NaN, as psis


# --------------------------------------------------------------------------- the trace split
@pytest.mark.parametrize("three_levels", [False, True])
def test_per_group_terms_sum_to_the_joint_weight(conjugate_amortizer, three_levels):
    if three_levels:
        from amortize.models import gaussian_3level

        sampler = am.StructureSampler(["district", "school"], groups={"district": (3, 3), "school": (1, 4)}, obs=(1, 3))
        design = sampler.sample(torch.Generator().manual_seed(0))
        a = am.Amortizer(gaussian_3level, design, hidden=8, flow_bins=0, seed=0)
        data = _simulate(gaussian_3level, design, 1)
    else:
        a, data = conjugate_amortizer, _simulate(conjugate, _design(30, 3), 1)
    part = a.posterior(data).parts[0][1]
    torch.manual_seed(0)
    log_p, log_q, _ = log_weights(part.guide, part.data, 7)
    torch.manual_seed(0)
    part.guide(part.data, 7)
    glob, per = group_log_weights(*part.guide.get_traces(), part.data, part.structure.max_plate_nesting, 7, 1)
    total = glob + sum(v.sum(-1) for v in per.values())
    torch.testing.assert_close(total, (log_p - log_q).double(), rtol=1e-6, atol=1e-6)
    tree = _subtree(per, part.data)
    torch.testing.assert_close(glob + tree[part.data.levels[0]].sum(-1), total)  # children roll up to the top


def test_per_group_evidence_estimates_match_the_closed_form(conjugate_amortizer):
    """sum_g log p_hat(y_g | mu) against the exact Gaussian marginal of each group given mu."""
    data = _simulate(conjugate, _design(30, 3), 2)
    part = conjugate_amortizer.posterior(data).parts[0][1]
    torch.manual_seed(1)
    mu = torch.linspace(-1.0, 1.0, 5, dtype=part.data.y.dtype)[:, None]  # [S, B]
    M = 64
    (glob, tree), _ = held_call(part, {"mu": mu}, M, part.guide.encode(part.data))
    w = tree["group"][:, :, 0]  # [S, M, G]
    p_hat = (torch.logsumexp(w, 1) - math.log(M)).sum(-1)  # [S]
    y = data.y.double().reshape(30, 3)
    cov = NOISE_SD**2 * torch.eye(3, dtype=torch.float64) + GROUP_SD**2
    exact = torch.stack([dist.MultivariateNormal(m.double().expand(3), cov).log_prob(y).sum() for m in mu[:, 0]])
    # Monte Carlo error of the sum over 30 groups: from the spread of the per-group weights
    rel = (torch.logsumexp(2 * w, 1) + math.log(M) - 2 * torch.logsumexp(w, 1)).exp() - 1
    sd = (rel / M).sum(-1).sqrt()
    assert bool(((p_hat - exact).abs() < 4 * sd + 1e-3).all()), (p_hat - exact, sd)
    assert torch.equal(glob[:, 0], glob[:, -1])  # the globals are held: their terms are the same for every m


# --------------------------------------------------------------------------- the verdict on many groups
def _z(draws: dict[str, torch.Tensor], ref: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per global: (|mean error| in reference sds, sd ratio)."""
    out = {}
    for name, (m, sd) in ref.items():
        x = draws[name].double()
        out[name] = (abs(float(x.mean()) - m) / sd, float(x.std()) / sd)
    return out


def test_many_groups_verdict_is_stable_and_the_correction_works_where_the_joint_k_fails(many_groups):
    """250 groups, a briefly trained q (globals 2-5x too wide): the verdict says so on every seed, and the
    hierarchical correction brings the globals to the quadrature reference where the joint k (> 0.7)
    refuses a joint correction."""
    data = _simulate(logistic, _design(GROUPS, ROWS), 2)
    post = many_groups.posterior(data)
    ref = reference_globals(data)
    plain = _z(post.sample(4000, seed=0), ref)
    assert max(r for _, r in plain.values()) > 1.5  # q is too wide here: ok must be False
    verdicts = [post.diagnostics(400, seed=s) for s in range(5)]
    assert [v["ok"] for v in verdicts] == [False] * 5 and all(v["correctable"] for v in verdicts)
    assert all("importance ESS" in v["reason"] and "ess" in v["failed"] for v in verdicts), [
        v["reason"] for v in verdicts
    ]
    # the joint k, from 250 joint draws (from 100 its k spreads over 0.4-2.2)
    joint = []
    for s in range(3):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(s)
            joint.append(psis(post.proposals(250)[0][1][:, 0]).k)
    assert all(k > 0.7 for k in joint), joint
    ks = [v["pareto_k"] for v in verdicts]
    assert max(ks) <= 0.7 and all(v["noise_sd"] <= 0.55 for v in verdicts)
    lv = verdicts[0]["levels"]["group"]
    assert lv["groups"] == GROUPS and lv["sites"] == ["alpha"] and lv["k_p90"] <= lv["k_worst"] <= 0.7
    fixed = post.sample(1000, seed=1, correct=True)
    assert fixed.parts == {"globals": True, "groups": True} and fixed["alpha"].shape == (1000, GROUPS)
    mc = 3 / math.sqrt(min(fixed.ess, 1000))  # importance error in reference sds
    for name, (z, ratio) in _z(fixed, ref).items():
        assert z < 0.15 + mc and 0.7 < ratio < 1.4, (name, z, ratio, mc)


def test_a_good_posterior_is_trusted(conjugate_amortizer):
    """The conjugate model on its 30-group design, q checked against the exact posterior: ok on every seed."""
    from .test_psis import exact_posterior

    design = _design(30, 3)
    data = _simulate(conjugate, design, 3)
    post = conjugate_amortizer.posterior(data)
    mean, sd = exact_posterior(data)
    draws = post.sample(4000, seed=0)
    assert abs(float(draws["mu"].double().mean()) - float(mean[0])) / float(sd[0]) < 0.3
    verdicts = [post.diagnostics(1000, seed=s) for s in range(3)]
    assert all(v["ok"] and v["correctable"] for v in verdicts), [v["reason"] for v in verdicts]


def test_an_untrained_amortizer_is_not_trusted(many_groups):
    data = _simulate(logistic, _design(GROUPS, ROWS), 8)
    untrained = am.Amortizer(logistic, _design(GROUPS, ROWS), hidden=32, flow_bins=0, seed=0)
    diag = untrained.posterior(data).diagnostics(500, seed=0)
    assert not diag["ok"] and ("Pareto k" in diag["reason"] or "importance ESS" in diag["reason"])


def test_correct_says_what_it_corrected_and_keeps_the_batch_layout(conjugate_amortizer):
    design = _design(30, 3)
    batch = design.with_response(torch.stack([_simulate(conjugate, design, s).y for s in (4, 5)]))
    out = conjugate_amortizer.posterior(batch).sample(50, seed=0, correct=True)
    assert out["theta"].shape == (50, 2, 30) and len(out.parts) == 2 and all(p["globals"] for p in out.parts)
    diag = conjugate_amortizer.posterior(batch).diagnostics(400, seed=0)
    assert len(diag["levels"]) == 2 and diag["levels"][0]["group"]["groups"] == 30


def test_three_level_weights_have_a_k_per_level():
    from amortize.models import gaussian_3level

    sampler = am.StructureSampler(["district", "school"], groups={"district": (4, 4), "school": (2, 3)}, obs=(2, 3))
    design = sampler.sample(torch.Generator().manual_seed(0))
    a = am.Amortizer(gaussian_3level, design, hidden=8, flow_bins=0, seed=0)
    part = a.posterior(_simulate(gaussian_3level, design, 1)).parts[0][1]
    torch.manual_seed(0)
    hw = hierarchical_weights(part, 40, 32)
    assert set(hw.levels) == {"district", "school"} and hw.global_log_weights.shape == (40, 1)
    assert hw.levels["school"].k.shape == (1, design.size("school"))
    # the k's from 25 parent draws x 32 per level, the globals' weights from 40 x 8 (no rerun: small noise)
    assert hw.num_draws == 2 * 25 * 32 + 40 * WEIGHT_DRAWS and hw.group_draws == WEIGHT_DRAWS, hw.num_draws


def test_many_groups_rest_their_k_on_fewer_parent_draws() -> None:
    """A level's k's cost parent draws x groups: up to 100 groups 25 parent draws each, then about 2500 k's
    in all, never fewer than 5 per group."""
    assert [parent_draws(g) for g in (1, 30, 100, 101, 250, 550, 2410)] == [25, 25, 25, 25, 10, 5, 5]


def test_a_level_that_already_fails_stops_the_rerun_and_the_globals_correction(conjugate_amortizer):
    """Responses x 100: the per-group k fails in the first pass, so the globals' pass is not rerun with
    more draws per group (its noise is above target, yet the decision cannot change), and the
    correction leaves the globals alone (their weights rest on the failing per-group estimates)."""
    from amortize.hierarchical_is import NOISE_SD_TARGET, WEIGHT_DRAWS

    data = _simulate(conjugate, _design(30, 3), 3)
    post = conjugate_amortizer.posterior(data.with_response(data.y * 100))
    diag = post.diagnostics(400, seed=0)
    assert not diag["ok"] and "level 'group'" in diag["reason"] and diag["levels"]["group"]["k_p90"] > 0.7
    assert "groups" in diag["failed"] and "range" in diag["failed"], diag["failed"]
    assert diag["noise_sd"] > NOISE_SD_TARGET and diag["group_draws"] == WEIGHT_DRAWS
    assert post.sample(100, seed=0, correct=True).parts == {"globals": False, "groups": False}


def test_the_model_check_flags_data_the_model_cannot_have_generated(conjugate_amortizer):
    """Six datasets simulated from the model pass the model check; one row moved 12 noise sds up (heavy
    tails the Normal likelihood has not) fails it, by the response's max, with the reason; batches get
    one check per dataset; ``model_check=False`` drops it and leaves every k as it was."""
    design = _design(30, 3)
    sims = [_simulate(conjugate, design, s) for s in range(10, 16)]
    checks = [conjugate_amortizer.posterior(d).diagnostics(400, seed=0)["model_check"] for d in sims]
    # each settles on its first 200 replicates (every p within [0.005, 0.995]: 1000 could not fail it)
    assert all(c["ok"] and c["num_samples"] == MISFIT_FIRST for c in checks), [c["extreme"] for c in checks]
    y = sims[0].y.clone()
    y[int(y.argmax())] += 12 * NOISE_SD
    post = conjugate_amortizer.posterior(sims[0].with_response(y))
    diag = post.diagnostics(400, seed=0)
    assert not diag["ok"] and not diag["model_check"]["ok"] and diag["model_check"]["num_samples"] == MISFIT_DRAWS
    assert "y: max" in [e["statistic"] for e in diag["model_check"]["extreme"]] and "model check" in diag["reason"]
    assert "model" in diag["failed"]
    plain = post.diagnostics(400, seed=0, model_check=False)
    assert "model_check" not in plain and plain["pareto_k"] == diag["pareto_k"]
    batch = design.with_response(torch.stack([sims[1].y, y]))
    both = conjugate_amortizer.posterior(batch).diagnostics(400, seed=0)["model_check"]
    assert [c["ok"] for c in both] == [True, False]


def test_the_weighted_shift_estimates_how_far_q_lies_from_the_posterior() -> None:
    """Draws of q = N(0, 1) weighted towards N(d, s): the shift is |d| / s in posterior sds, the sd ratio 1 / s,
    the element is named; its se shrinks like one over the root of the effective draws."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=gen)
    d, s = torch.tensor([0.0, 0.6, -0.2]), torch.tensor([1.0, 1.0, 0.8])
    log_w = (dist.Normal(d, s).log_prob(x) - dist.Normal(0.0, 1.0).log_prob(x)).sum(-1)
    res = weighted_shift({"tau": x[:, 0], "beta": x[:, 1:]}, log_w - log_w.logsumexp(0))
    assert res["site"] == "beta[0]" and abs(res["z"] - 0.6) < 0.1 and abs(res["sd_ratio"] - 1.0) < 0.1, res
    assert 0.01 < res["se"] < 0.05
    flat = weighted_shift({"tau": x[:, 0]}, torch.zeros(4000))  # equal weights: q is its own posterior
    assert flat["z"] < 1e-9 and abs(flat["sd_ratio"] - 1.0) < 1e-3


def test_the_shift_takes_q_s_mean_from_its_own_draws_where_q_has_a_heavy_tail() -> None:
    """q = LogNormal(0, 1) weighted towards LogNormal(0.375, 0.5), whose mean is the same: the true shift
    is 0. From 250 weighted draws, q's mean taken from those draws errs by q's heavy tail (sd_q / sqrt(250),
    0.16 posterior sds); taken from 4000 draws of q alone, the shift's error halves and stays far below the
    threshold, and its se counts both errors (z beyond 2 se in about 5% of repeats)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(300):
        lx = torch.randn(250, generator=gen)
        log_w = dist.Normal(0.375, 0.5).log_prob(lx) - dist.Normal(0.0, 1.0).log_prob(lx)
        log_w = log_w - log_w.logsumexp(0)
        q_alone = {"tau": torch.randn(4000, generator=gen).exp()}
        own, alone = weighted_shift({"tau": lx.exp()}, log_w), weighted_shift({"tau": lx.exp()}, log_w, q_alone)
        rows.append((own["z"], alone["z"], alone["se"]))
    own_z, z, se = torch.tensor(rows).T
    assert float(z.quantile(0.9)) < 0.65 * float(own_z.quantile(0.9)), (z.quantile(0.9), own_z.quantile(0.9))
    assert float(z.max()) < 0.35 and float((z > 2 * se).float().mean()) < 0.1, (z.max(), (z > 2 * se).float().mean())
