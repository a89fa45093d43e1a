"""Hierarchical models the library does not ship, written as a user would write them.

Each is a plain Pyro model for ONE dataset: one ``pyro.plate`` per level, parents gathered with
``[..., data.index(level)]`` / ``[..., data.parent_index(level)]``, covariates read from ``data.x``.
Each has a config beside the shipped ones (``experiments/<name>.yaml``) and is compared with Pyro NUTS
by ``experiments/bench/unshipped.py``; ``experiments/terms_ab.py`` imports the first two.

* :func:`negbin_exposure`: negative binomial counts with an exposure offset (clinics);
* :func:`studentt_dof`: Student-t response with unknown degrees of freedom;
* :func:`gamma_log`: Gamma positive response, log link with a row covariate, unknown shape;
* :func:`binomial_trials`: Binomial successes out of per-row trials (the trials a row covariate);
* :func:`studentt_prior`: heavy-tailed (Student-t, 3 dof) group effects, Gaussian response;
* :func:`lognormal_scale`: a per-group noise sd with a LogNormal prior beside a Normal group mean;
* :func:`negbin_3level`: 3-level negative binomial counts (wards in hospitals in regions), ragged sizes
  with singleton groups at both inner levels.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from amortize import HierarchicalData

__all__ = [
    "negbin_exposure",
    "studentt_dof",
    "gamma_log",
    "binomial_trials",
    "studentt_prior",
    "lognormal_scale",
    "negbin_3level",
]


def negbin_exposure(data: HierarchicalData) -> None:
    """2-level negative binomial counts with an exposure offset: y ~ NB(mean exposure * exp(a_clinic), phi)."""
    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(0.5))
    phi = pyro.sample("phi", dist.LogNormal(1.0, 0.5))
    with pyro.plate("clinic", data.size("clinic")):
        a = pyro.sample("a", dist.Normal(mu, tau))
    rate = data.x["exposure"] * torch.exp(a[..., data.index("clinic")])
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.GammaPoisson(phi, phi / rate), obs=data.y)


def studentt_dof(data: HierarchicalData) -> None:
    """2-level Student-t response with unknown degrees of freedom: y ~ t_nu(theta_group, sigma)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.StudentT(nu, theta[..., data.index("group")], sigma), obs=data.y)


def gamma_log(data: HierarchicalData) -> None:
    """2-level Gamma response (positive, e.g. costs), log link, unknown shape:
    y ~ Gamma(shape, rate = shape / m), log m = a_group + beta * x."""
    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(0.5))
    beta = pyro.sample("beta", dist.Normal(0.0, 0.5))
    shape = pyro.sample("shape", dist.LogNormal(1.0, 0.5))
    with pyro.plate("group", data.size("group")):
        a = pyro.sample("a", dist.Normal(mu, tau))
    mean = torch.exp(a[..., data.index("group")] + beta * data.x["x"])
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Gamma(shape, shape / mean), obs=data.y)


def binomial_trials(data: HierarchicalData) -> None:
    """2-level Binomial: successes out of ``trials`` (a row covariate), logit a_group."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.5))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("group", data.size("group")):
        a = pyro.sample("a", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        logits = a[..., data.index("group")]
        pyro.sample("y", dist.Binomial(total_count=data.x["trials"], logits=logits), obs=data.y)


def studentt_prior(data: HierarchicalData) -> None:
    """Heavy-tailed group effects: theta_group ~ t_3(mu, tau), y ~ N(theta_group, sigma)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.StudentT(3.0, mu, tau))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], sigma), obs=data.y)


def lognormal_scale(data: HierarchicalData) -> None:
    """Per-group mean and per-group noise sd: theta_group ~ N(mu, tau), s_group ~ LogNormal(m_s, t_s),
    y ~ N(theta_group, s_group)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    m_s = pyro.sample("m_s", dist.Normal(-0.5, 0.5))
    t_s = pyro.sample("t_s", dist.HalfNormal(0.5))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        s = pyro.sample("s", dist.LogNormal(m_s, t_s))
    g = data.index("group")
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., g], s[..., g]), obs=data.y)


def negbin_3level(data: HierarchicalData) -> None:
    """3-level negative binomial counts: wards in hospitals in regions, an exposure offset;
    b_region ~ N(mu, tau_region), c_hospital ~ N(b_region, tau_hospital), y ~ NB(mean exposure * exp(c), phi)."""
    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    tau_r = pyro.sample("tau_region", dist.HalfNormal(0.5))
    tau_h = pyro.sample("tau_hospital", dist.HalfNormal(0.5))
    phi = pyro.sample("phi", dist.LogNormal(1.5, 0.5))
    with pyro.plate("region", data.size("region")):
        b = pyro.sample("b", dist.Normal(mu, tau_r))
    with pyro.plate("hospital", data.size("hospital")):
        c = pyro.sample("c", dist.Normal(b[..., data.parent_index("hospital")], tau_h))
    rate = data.x["exposure"] * torch.exp(c[..., data.index("hospital")])
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.GammaPoisson(phi, phi / rate), obs=data.y)
