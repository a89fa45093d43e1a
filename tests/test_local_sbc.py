"""Local (posterior) SBC in the verdict: exact posteriors pass at the nominal rate, wrong ones fail.

The conjugate model ``normal_known`` (conftest) has an exact Gaussian joint posterior; the guide's draws
are replaced by exact draws (``StructureBatch.draws`` monkeypatched), optionally with every deviation
from the posterior mean scaled (a q too narrow) or shifted by a multiple of the posterior sd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import amortize as am
from amortize import ecdf, local_sbc
from amortize.batch import StructureBatch
from amortize.validate import ecdf as validate_ecdf
from amortize.verdict import local_checks

from .conftest import normal_known

real = StructureBatch.draws
SAMPLER = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))


def exact_draws(scale: float = 1.0, shift: float = 0.0):
    """A ``StructureBatch.draws`` giving the exact posterior of ``normal_known`` (mu ~ N(0, 2), theta_g ~
    N(mu, 1), y ~ N(theta_g, 0.5)), its deviations from the mean times ``scale``, moved by ``shift`` sds."""

    def draws(self, n, with_weights=False, encoded=None):
        if with_weights:  # the importance weights score the guide's own draws
            return real(self, n, with_weights, encoded)
        d = self.data
        B, G = d.batch_size or 1, d.size("group")
        y = d.y.reshape(B, -1).double()  # [B, N]
        cnt = torch.bincount(d.group, minlength=G).double()  # [G]
        total = torch.zeros(B, G, dtype=torch.double).index_add_(1, d.group, y)  # [B, G]
        v = 1.0 + 0.25 / cnt  # var of a group's mean given mu
        prec = 0.25 + (1 / v).sum()
        m_mu = (total / cnt / v).sum(-1) / prec  # [B]
        mu = m_mu + prec**-0.5 * torch.randn(n, B, dtype=torch.double)  # [n, B]
        t_prec = 1.0 + cnt / 0.25
        theta = (mu[..., None] + total / 0.25) / t_prec + t_prec**-0.5 * torch.randn(n, B, G, dtype=torch.double)
        m_theta = (m_mu[:, None] + total / 0.25) / t_prec  # [B, G]
        sd_theta = (t_prec**-1 + (1 / t_prec) ** 2 / prec).sqrt()  # [G]: conditional + mu's share
        mu = m_mu + scale * (mu - m_mu) + shift * prec**-0.5
        theta = m_theta + scale * (theta - m_theta) + shift * sd_theta
        return {"mu": mu.float(), "theta": theta.float()}, None

    return draws


@pytest.fixture(scope="module")
def untrained():
    return am.Amortizer(normal_known, SAMPLER, hidden=16)


def datasets(a, count, seed=0):
    design = SAMPLER.sample(torch.Generator().manual_seed(1))  # 4 groups, 22 rows
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sim = am.simulate(normal_known, a.structure, design, count)
    return [sim.data.with_response(sim.data.y[b]) for b in range(count)]


def checks(a, data, settings, seed=0):
    return local_checks(am.Posterior(a.guide, normal_known, data, a.ranges), settings, seed)


def test_the_exact_posterior_passes_at_the_nominal_rate(untrained, monkeypatch):
    monkeypatch.setattr(StructureBatch, "draws", exact_draws())
    alpha, n = 0.2, 60
    settings = am.LocalSBC(replicates=100, draws=19, alpha=alpha, within_range=False)
    data = datasets(untrained, n)
    batch = data[0].with_response(torch.stack([d.y for d in data]))  # one [60, N] batch, one call
    res = checks(untrained, batch, settings)
    fails = sum(not r["ok"] for r in res)
    # Bonferroni: a calibrated q fails with probability <= alpha; the 99.9% quantile of Binomial(n, alpha)
    assert fails <= stats.binom.ppf(0.999, n, alpha), fails
    # each quantity's p-values are uniform under calibration (a rank ECDF off by design would skew them)
    for q in res[0]["quantities"]:
        p = np.array([r["quantities"][q]["p_value"] for r in res])
        assert stats.kstest(p, "uniform").pvalue > 1e-3, (q, np.sort(p))
    assert {r["replicates"] for r in res} == {100} and res[0]["rows_added"] == 22
    # the effect size: each dataset's shift has standard error about 1 / sqrt(R); their mean is near 0
    shifts = np.array([r["quantities"]["mu"]["shift"] for r in res])
    assert abs(shifts.mean()) < 3 * 1.1 / math.sqrt(100 * n) and shifts.std() < 2 / math.sqrt(100), shifts


def test_the_shift_is_the_probit_mean_of_the_ranks():
    rng = np.random.default_rng(0)
    assert abs(local_sbc.probit_shift(rng.integers(0, 50, 100_000), 49)) < 0.02
    high = local_sbc.probit_shift(np.clip(np.round(50 * stats.norm.cdf(rng.normal(0.5, 1, 100_000))), 0, 49), 49)
    assert 0.4 < high < 0.6, high


@pytest.mark.parametrize(("scale", "shift"), [(0.5, 0.0), (1.0, 1.0)])
def test_a_wrong_posterior_fails(untrained, monkeypatch, scale, shift):
    """q too narrow by 2, or moved by one posterior sd (a shift in sd units changes as data accrue)."""
    monkeypatch.setattr(StructureBatch, "draws", exact_draws(scale, shift))
    settings = am.LocalSBC(replicates=200, draws=49, alpha=0.01, within_range=False)
    res = [checks(untrained, d, settings, seed=i)[0] for i, d in enumerate(datasets(untrained, 10))]
    assert sum(not r["ok"] for r in res) >= 9, [r["worst"] for r in res]


def test_diagnostics_report_it_name_the_site_and_do_not_decide_on_it(untrained, monkeypatch):
    """q too narrow by 2: the local SBC fails and says where; ``ok`` is decided by the k's (which see a q
    2x narrow too), not by it: the reasons name no local SBC."""
    monkeypatch.setattr(StructureBatch, "draws", exact_draws(0.5))
    post = am.Posterior(untrained.guide, normal_known, datasets(untrained, 1)[0], {})
    diag = post.diagnostics(200, seed=3, local_sbc=am.LocalSBC(within_range=False))
    res = diag["local_sbc"]
    assert res["ok"] is False and "local SBC" not in diag["reason"]
    assert res["reason"].startswith("local SBC: ranks of '") and res["worst"].split(" ")[0] in res["reason"]
    assert " sd)" in res["reason"] and all("shift" in v for v in res["quantities"].values())
    assert set(res["quantities"]) == {"mu", "theta (one group)", "theta (group mean)"}
    assert math.isclose(res["alpha_per_quantity"], 0.01 / 3)
    off = post.diagnostics(200, seed=3, local_sbc=False)
    assert diag["ok"] == off["ok"] and diag["reason"] == off["reason"]


def test_the_verdict_is_reproducible_and_off_by_default_with_the_same_k(untrained):
    data = datasets(untrained, 1)[0]
    post = am.Posterior(untrained.guide, normal_known, data, untrained.ranges, seed=5)
    first = post.sample(10)
    post = am.Posterior(untrained.guide, normal_known, data, untrained.ranges, seed=5)
    small = am.LocalSBC(replicates=20, draws=9)
    a, b = post.diagnostics(200, seed=1, local_sbc=small), post.diagnostics(200, seed=1, local_sbc=small)
    off = post.diagnostics(200, seed=1)  # off by default
    assert a["local_sbc"] == b["local_sbc"] and "local_sbc" not in off
    assert a["pareto_k"] == off["pareto_k"] and a["levels"] == off["levels"]
    assert torch.equal(post.sample(10)["mu"], first["mu"])  # the posterior's own stream did not move
    other = post.diagnostics(200, seed=2, local_sbc=small)["local_sbc"]
    assert other["quantities"] != a["local_sbc"]["quantities"]


def test_replicate_rows_stay_within_the_trained_rows_per_group(untrained):
    data = datasets(untrained, 1)[0]  # groups of 4-7 rows, trained on 2-6
    rows = local_sbc.replicate_rows(data, {"obs": [2, 6]}, np.random.default_rng(0))
    n = torch.bincount(data.group, minlength=data.size("group"))
    added = torch.bincount(data.group[rows], minlength=data.size("group"))
    assert torch.equal(added, (6 - n).clamp(min=0).minimum(n)) and len(set(rows.tolist())) == len(rows)
    full = local_sbc.replicate_rows(data, None, np.random.default_rng(0))
    assert torch.equal(full, torch.arange(data.n_obs))


def test_what_is_skipped_says_why(untrained):
    data = datasets(untrained, 1)[0]
    full = am.Posterior(untrained.guide, normal_known, data, {"obs": [1, 1]})
    res = full.diagnostics(200, seed=0, local_sbc=am.LocalSBC(replicates=20, draws=9))["local_sbc"]
    assert res["ok"] is None and "no room for replicate rows" in res["skipped"]
    streamed = am.Posterior(untrained.guide, normal_known, data, untrained.ranges, chunk_groups=2)
    res = streamed.diagnostics(200, seed=0, local_sbc=True)["local_sbc"]
    assert res["ok"] is None and "streamed" in res["skipped"]


def test_the_band_lives_in_the_core_and_validate_re_exports_it():
    assert validate_ecdf.ecdf_band is ecdf.ecdf_band and validate_ecdf.ecdf_test is ecdf.ecdf_test
    rng = np.random.default_rng(0)
    draws = torch.randn(9, 1000, 1, generator=torch.Generator().manual_seed(0))
    r = ecdf.ranks_of(draws, torch.randn(1000, 1, generator=torch.Generator().manual_seed(1)), rng)
    assert r.min() >= 0 and r.max() <= 9 and abs(r.mean() - 4.5) < 4 * math.sqrt(99 / 12 / 1000)
