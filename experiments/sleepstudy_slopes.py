"""A model the library does not ship: sleepstudy-like reaction times, a subject's intercept and slope as
two separate sites of one plate, days not centred (their likelihood is strongly correlated).

    amortize train experiments/sleepstudy_slopes.yaml
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

import amortize as am


def sleepstudy_two_sites(data: am.HierarchicalData) -> None:
    """y[subject, day] ~ N(a_subject + b_subject * day, sigma); a ~ N(mu_a, tau_a), b ~ N(mu_b, tau_b)."""
    mu_a = pyro.sample("mu_a", dist.Normal(250.0, 50.0))
    mu_b = pyro.sample("mu_b", dist.Normal(10.0, 10.0))
    tau_a = pyro.sample("tau_a", dist.HalfNormal(50.0))
    tau_b = pyro.sample("tau_b", dist.HalfNormal(15.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(50.0))
    with pyro.plate("subject", data.size("subject")):
        a = pyro.sample("a", dist.Normal(mu_a, tau_a))
        b = pyro.sample("b", dist.Normal(mu_b, tau_b))
    g = data.index("subject")
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(a[..., g] + b[..., g] * data.x["day"], sigma), obs=data.y)
