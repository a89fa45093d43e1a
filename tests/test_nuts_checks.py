"""The checks that decide whether a NUTS run is a usable reference (amortize.validate.nuts.checks_passed).

The draws here are generated directly (no MCMC): iid normal "chains", and stationary AR(1) chains
(identical in every chain, i.e. perfectly mixed) with the autocorrelation of a typical NUTS run.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from amortize.data import HierarchicalData
from amortize.validate import nuts
from amortize.validate.convergence import chain_diagnostics, checks_passed, rhat_threshold
from amortize.validate.nuts import NUTSResult, cached_nuts


def chains(num_chains: int, num_draws: int, elements: int, rho: float, seed: int) -> torch.Tensor:
    """``[chains, draws, elements]`` stationary AR(1) draws, N(0, 1) marginals (``rho=0``: iid normal)."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(num_chains, num_draws, elements, generator=gen, dtype=torch.float64)
    if rho == 0:
        return e
    x = torch.empty_like(e)
    x[:, 0] = e[:, 0]
    s = math.sqrt(1 - rho**2)
    for t in range(1, num_draws):
        x[:, t] = rho * x[:, t - 1] + s * e[:, t]
    return x


def verdicts(x: dict[str, torch.Tensor], max_rhat: float = 1.01, min_ess: float = 100.0) -> tuple[bool, bool]:
    """(old rule, new rule) for sites of draws ``[chains, draws, *shape]``: the old rule held every
    element of every site to ``max_rhat``."""
    r_hat, ess = {}, {}
    for name, v in x.items():
        rh, es = chain_diagnostics(v)
        r_hat[name], ess[name] = float(rh.max()), float(es.min())
    c, s = next(iter(x.values())).shape[:2]
    old = all(v < max_rhat for v in r_hat.values()) and all(v >= min_ess for v in ess.values())
    new = checks_passed(
        r_hat,
        ess,
        0,
        num_elements={name: math.prod(v.shape[2:]) for name, v in x.items()},
        num_chains=c,
        num_draws=s,
        max_rhat=max_rhat,
        min_ess=min_ess,
    )
    return old, new


# (draws per chain, AR(1) coefficient, seed): iid normal chains of 2 x 300 draws (bulk ESS about 600),
# and 2 x 1000 draws with rho 0.5 (bulk ESS about 650: a good NUTS run of a group-level site)
WELL_MIXED = [(300, 0.0, 2), (1000, 0.5, 1)]


@pytest.mark.parametrize("num_draws, rho, seed", WELL_MIXED, ids=["iid-2x300", "ar1-2x1000"])
def test_well_mixed_chains_of_200_elements_fail_the_old_rule_and_pass_the_new(num_draws, rho, seed) -> None:
    x = {"mu": chains(2, num_draws, 1, rho, seed + 100)[..., 0], "theta": chains(2, num_draws, 200, rho, seed)}
    r_hat, ess = chain_diagnostics(x["theta"])
    assert float(ess.min()) >= 100  # the ESS check passes: only R-hat decides
    assert float(r_hat.max()) >= 1.01  # the largest of 200 well-mixed R-hats crosses 1.01 by chance...
    assert float(r_hat.max()) < rhat_threshold(1.01, 200, 2, num_draws)  # ...not the threshold of 200 elements
    assert verdicts(x) == (False, True)


@pytest.mark.parametrize("num_draws, rho", [(300, 0.0), (1000, 0.5)], ids=["iid-2x300", "ar1-2x1000"])
def test_well_mixed_chains_fail_the_old_rule_and_pass_the_new_for_most_seeds(num_draws, rho) -> None:
    results = [verdicts({"theta": chains(2, num_draws, 200, rho, seed)}) for seed in range(10)]
    assert sum(old for old, _ in results) <= 2  # the old rule throws most of these references away
    assert all(new for _, new in results)


@pytest.mark.parametrize("num_draws, rho, seed", WELL_MIXED, ids=["iid-2x300", "ar1-2x1000"])
def test_a_shifted_chain_is_still_rejected(num_draws, rho, seed) -> None:
    theta = chains(2, num_draws, 200, rho, seed)
    assert verdicts({"theta": theta}) == (False, True)
    theta[1, :, 7] += 0.75  # one element's second chain sits 0.75 posterior sds away
    assert verdicts({"theta": theta})[1] is False
    whole = chains(2, num_draws, 200, rho, seed)
    whole[1] += 0.3  # every element a little off
    assert verdicts({"theta": whole})[1] is False
    # a scalar site keeps max_rhat itself: a 0.3 sd shift of one chain fails it
    mu = chains(2, num_draws, 1, rho, seed + 100)[..., 0]
    assert verdicts({"mu": mu}) == (True, True)
    mu[1] += 0.3
    assert verdicts({"mu": mu}) == (False, False)


def test_rhat_threshold_is_max_rhat_for_one_element_and_grows_slowly() -> None:
    assert rhat_threshold(1.01, 1, 2, 1000) == 1.01
    assert rhat_threshold(1.01, 0, 2, 1000) == 1.01
    assert rhat_threshold(1.05, 1, 4, 500) == 1.05
    ts = [rhat_threshold(1.01, k, 2, 1000) for k in (1, 2, 10, 200, 10_000, 10**6)]
    assert all(a < b for a, b in zip(ts, ts[1:]))
    assert ts[3] == pytest.approx(1.0231, abs=5e-4) and ts[-1] < 1.045
    # more chains: a sharper R-hat, a threshold closer to max_rhat; fewer draws: the other way
    assert 1.01 < rhat_threshold(1.01, 200, 4, 1000) < ts[3] < rhat_threshold(1.01, 200, 2, 200)
    # a looser one-element threshold scales the same way
    assert rhat_threshold(1.05, 200, 2, 1000) > rhat_threshold(1.05, 1, 2, 1000) == 1.05


def test_rhat_threshold_matches_the_chi_square_formula() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, c, s, alpha in [(200, 2, 1000, 0.05), (37, 4, 300, 0.01), (5000, 1, 2000, 0.2)]:
        n, m = s // 2, 2 * c
        q = [stats.chi2.ppf((1 - alpha) ** (1 / (2 * j)), m - 1) for j in (k, 1)]
        expect = math.sqrt((n - 1) / n + (1.01**2 - (n - 1) / n) * q[0] / q[1])
        assert rhat_threshold(1.01, k, c, s, alpha) == pytest.approx(expect, rel=1e-9)


def test_rhat_threshold_calibration_on_simulated_chains() -> None:
    """At the autocorrelation where 1.01 is one element's 95% point, a site of 100 elements crosses its
    threshold about as often (5%) as one element crosses 1.01; here measured on 60 seeds of 2 x 400."""
    n, df, k = 200, 3, 100
    stats = pytest.importorskip("scipy.stats")
    q1 = stats.chi2.ppf(0.95**0.5, df) / df
    tau = n * (1.01**2 - (n - 1) / n) / q1  # tau / N at the calibration point
    rho = (tau - 1) / (tau + 1)  # AR(1): tau = (1 + rho) / (1 - rho)
    t = rhat_threshold(1.01, k, 2, 2 * n)
    single = site = old = 0
    for seed in range(60):
        r_hat, _ = chain_diagnostics(chains(2, 2 * n, k + 1, rho, seed))
        single += float(r_hat[k]) >= 1.01
        site += float(r_hat[:k].max()) >= t
        old += float(r_hat[:k].max()) >= 1.01
    assert single <= 10 and site <= 10  # both about 3 of 60
    assert old >= 40  # 1.01 for each of the 100 elements: most runs fail


def test_checks_keep_the_ess_and_divergence_conditions() -> None:
    sizes = {"mu": 1, "theta": 200}
    good = {"r_hat": {"mu": 1.005, "theta": 1.018}, "ess_bulk": {"mu": 400.0, "theta": 350.0}}
    kw = {"num_elements": sizes, "num_chains": 2, "num_draws": 1000}
    assert checks_passed(good["r_hat"], good["ess_bulk"], 0, **kw)
    assert not checks_passed(good["r_hat"], good["ess_bulk"], 1, **kw)
    assert not checks_passed(good["r_hat"], {"mu": 400.0, "theta": 99.0}, 0, **kw)
    assert not checks_passed(good["r_hat"], good["ess_bulk"], 0, **kw, min_ess=1000)
    assert not checks_passed({"mu": 1.011, "theta": 1.0}, good["ess_bulk"], 0, **kw)  # scalar: 1.01 as before
    assert not checks_passed({"mu": 1.0, "theta": 1.03}, good["ess_bulk"], 0, **kw)
    assert not checks_passed({"mu": float("inf"), "theta": 1.0}, good["ess_bulk"], 0, **kw)
    assert not checks_passed({"mu": float("nan"), "theta": 1.0}, good["ess_bulk"], 0, **kw)
    # a site missing from num_elements is held to max_rhat
    assert not checks_passed(good["r_hat"], good["ess_bulk"], 0, num_elements={}, num_chains=2, num_draws=1000)


def _model(data: HierarchicalData) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[data.index("group")], 1.0), obs=data.y)


def test_cached_results_are_judged_by_the_current_rule(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reference stored when every element was held to 1.01 counts once loaded again."""
    data = HierarchicalData(["group"], {}, torch.arange(200).repeat_interleave(2), y=torch.zeros(400))
    stored = NUTSResult(
        samples={"mu": torch.zeros(2000), "theta": torch.zeros(2000, 200)},
        r_hat={"mu": 1.004, "theta": 1.017},
        ess_bulk={"mu": 500.0, "theta": 420.0},
        divergences=0,
        seconds=1.0,
        parameterization="none",
        ok=False,  # the old verdict
        num_chains=2,
    )
    monkeypatch.setattr(nuts, "run_nuts", lambda *a, **k: stored)
    first = cached_nuts(_model, data, tmp_path, num_samples=1000, num_chains=2)
    assert first is stored and not first.ok  # a fresh run is returned as run_nuts judged it
    monkeypatch.setattr(nuts, "run_nuts", lambda *a, **k: pytest.fail("not from the cache"))
    again = cached_nuts(_model, data, tmp_path, num_samples=1000, num_chains=2)
    assert again.ok and again.r_hat == stored.r_hat
    strict = cached_nuts(_model, data, tmp_path, run=False, num_samples=1000, num_chains=2, max_rhat=1.005)
    assert strict is None  # other settings, another cache entry


def test_bulk_ess_of_few_anti_correlated_draws_is_positive_and_bounded() -> None:
    # 2 chains x 20 draws alternating in sign: the estimated lag-1 autocorrelation is about -1, Geyer's tau
    # negative, and pyro's ESS alone is negative (-119 here); Stan's floor on tau bounds ESS by n log10(n)
    g = torch.Generator().manual_seed(0)
    sign = torch.tensor([(-1.0) ** i for i in range(20)])
    x = (sign + 0.1 * torch.randn(2, 20, generator=g)).unsqueeze(-1)
    _, ess = chain_diagnostics(x)
    n = 40
    assert 0 < float(ess) <= n * math.log10(n) + 1e-9
    # well-mixed independent draws keep their ESS near n
    iid = torch.randn(4, 500, 3, generator=g)
    _, ess = chain_diagnostics(iid)
    assert ((ess > 1500) & (ess < 2600)).all(), ess
