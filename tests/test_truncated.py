"""Truncated proposals around one observed dataset (:class:`amortize.Truncated`)."""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am

SIGMA = 0.5  # the known noise sd of the conjugate model


def conjugate(data: am.HierarchicalData) -> None:
    """mu ~ N(0, 10), theta_g ~ N(mu, 1), y ~ N(theta_g, 0.5): a wide prior, an exact Gaussian posterior."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], SIGMA), obs=data.y)


def _dataset(G: int = 12, n: int = 5, seed: int = 1) -> am.HierarchicalData:
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(G).repeat_interleave(n)
    theta = 3.0 + torch.randn(G, generator=g)
    y = theta[group] + SIGMA * torch.randn(G * n, generator=g)
    return am.HierarchicalData(("group",), {}, group, y=y)


def _exact(data: am.HierarchicalData) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and sds of (mu, theta_1..G): Gaussian conditioning on the group means."""
    G = data.size("group")
    n = data.counts("group").double()
    ybar = torch.zeros(G, dtype=torch.float64).index_add_(0, data.index("group"), data.y.double()) / n
    cov = torch.full((G + 1, G + 1), 100.0, dtype=torch.float64)  # Cov(mu, .) = Var(mu) = 100
    cov[1:, 1:] += torch.eye(G, dtype=torch.float64)  # theta_g = mu + N(0, 1)
    c_zy = cov[:, 1:]  # Cov((mu, theta), ybar) = Cov((mu, theta), theta)
    c_yy = cov[1:, 1:] + torch.diag(SIGMA**2 / n)
    gain = c_zy @ torch.linalg.inv(c_yy)
    mean = gain @ ybar
    post = cov - gain @ c_zy.T
    return mean, post.diagonal().sqrt()


def _fit(a: am.Amortizer, data: am.HierarchicalData, **kw) -> None:
    a.fit(source=am.Truncated(data, rounds=3), batch_size=32, progress=False, **kw)


def test_truncated_training_matches_the_exact_posterior() -> None:
    data = _dataset()
    a = am.Amortizer(conjugate, data, seed=0)
    _fit(a, data, steps=300)
    draws = a.posterior(data, seed=0).sample(4000)
    got = torch.cat([draws["mu"].reshape(-1, 1), draws["theta"]], -1).double()
    mean, sd = _exact(data)
    z = (got.mean(0) - mean).abs() / sd
    ratio = got.std(0) / sd
    assert float(z.max()) < 0.3, z
    assert 0.8 < float(ratio.min()) and float(ratio.max()) < 1.25, ratio
    rounds = a.truncation["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and not rounds[0]["truncated"]
    # the prior N(0, 10) of mu against a posterior sd near 0.3: few prior draws fall inside the region
    assert all(r["truncated"] and 0.0 < r["acceptance"] < 0.2 for r in rounds[1:]), rounds
    assert all(r["requested"] == 100 * 32 and r["usable"] == 1.0 for r in rounds), rounds


def test_the_proposal_is_the_prior_inside_the_region() -> None:
    data = _dataset()
    a = am.Amortizer(conjugate, data, seed=0)
    _fit(a, data, steps=60)
    source = a.source
    region = source._region
    sim = source.simulate(a, a.config, 512)  # the last round's proposal
    mu = sim.latents["mu"].reshape(-1)
    assert float(mu.std()) < 2.0  # the prior's sd is 10
    assert bool(region.inside(mu.unsqueeze(-1)).all())
    # the group latents keep the model's conditional prior given mu: theta - mu ~ N(0, 1)
    resid = sim.latents["theta"].reshape(512, -1) - mu.unsqueeze(-1)
    assert abs(float(resid.mean())) < 0.05 and abs(float(resid.std()) - 1.0) < 0.05


def test_a_truncated_run_is_saved_and_resumed_exactly(tmp_path: Path) -> None:
    data = _dataset()
    whole = am.Amortizer(conjugate, data, hidden=16, seed=2)
    _fit(whole, data, steps=12)
    first = am.Amortizer(conjugate, data, hidden=16, seed=2)
    _fit(first, data, steps=12, stop_at=6, checkpoint_path=str(tmp_path / "ck.pt"))  # inside round 1
    torch.randn(10)  # the caller's RNG between the runs does not matter
    resumed = am.Amortizer.load(tmp_path / "ck.pt", conjugate, sampler=am.StructureSampler.fixed(data))
    assert resumed.step == 6 and resumed.truncation["region"] is not None
    with pytest.raises(am.AmortizeError, match="Truncated"):
        resumed.fit(steps=12)  # a truncated run continues around its data
    _fit(resumed, data, steps=12)
    a, b = whole.guide.state_dict(), resumed.guide.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.truncation["rounds"] == resumed.truncation["rounds"]


def test_an_amortizer_trained_on_the_prior_truncates_from_its_first_step() -> None:
    data = _dataset()
    a = am.Amortizer(conjugate, data, hidden=16, seed=0)
    a.fit(steps=20, batch_size=16, progress=False)
    _fit(a, data, steps=6)
    assert a.step == 6 and a.truncation["pretrained"]
    assert a.truncation["rounds"][0]["truncated"]


def poisson_wide_slope(data: am.HierarchicalData) -> None:
    """A weakly informative prior with an absurd prior predictive: log rate slope ~ N(0, 2) on a
    covariate up to 13, so that many simulated counts overflow."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("group", data.size("group")):
        eta = pyro.sample("eta", dist.Normal(0.0, tau))
    x = data.covariates["obs"]["x"]
    with pyro.plate("obs", data.n_obs):
        rate = torch.exp(a + b * x + eta[..., data.index("group")])
        pyro.sample("y", dist.Poisson(rate), obs=data.y)


def _counts_dataset() -> am.HierarchicalData:
    g = torch.Generator().manual_seed(3)
    G, n = 10, 6
    group = torch.arange(G).repeat_interleave(n)
    x = 13.0 * torch.rand(G * n, generator=g)
    rate = torch.exp(0.5 + 0.15 * x + 0.3 * torch.randn(G, generator=g)[group])
    y = torch.poisson(rate, generator=g)
    return am.HierarchicalData(("group",), {}, group, covariates={"obs": {"x": x}}, y=y)


def test_an_absurd_prior_predictive_trains_truncated_and_reports_the_usable_share() -> None:
    data = _counts_dataset()
    plain = am.Amortizer(poisson_wide_slope, data, hidden=16, seed=0)
    with pytest.raises(am.TrainingError, match="dropped"):  # over 1% of prior simulations overflow
        plain.fit(steps=5, batch_size=32, progress=False)
    a = am.Amortizer(poisson_wide_slope, data, hidden=16, seed=0)
    _fit(a, data, steps=60)
    first, last = a.truncation["rounds"][0], a.truncation["rounds"][-1]
    assert first["usable"] < 0.95 and "y" in first["dropped"], first  # the prior predictive overflows
    assert last["truncated"] and last["usable"] > first["usable"], last
    draws = a.posterior(data).sample(200)
    assert all(bool(torch.isfinite(v).all()) for v in draws.values())


def test_bad_settings_and_data_are_refused() -> None:
    data = _dataset()
    with pytest.raises(am.DataError, match="y \\[N\\]"):
        am.Truncated(data.with_response(None))
    with pytest.raises(am.DataError, match="y \\[N\\]"):
        am.Truncated(data.with_response(data.y.expand(2, -1)))
    with pytest.raises(am.DataError, match="non-finite"):
        am.Truncated(data.with_response(torch.where(data.y > 3, torch.nan, data.y)))
    with pytest.raises(am.DataError, match="rounds"):
        am.Truncated(data, rounds=0)
    with pytest.raises(am.DataError, match="support_draws"):
        am.Truncated(data, support_draws=1000)
    a = am.Amortizer(conjugate, data, hidden=16, seed=0)
    _fit(a, data, steps=2)
    with pytest.raises(am.DataError, match="another dataset"):
        _fit(a, _dataset(seed=5), steps=4)
