"""Model coverage examples: non-Gaussian likelihoods, covariates at every level, correlated varying
slopes and four levels of nesting.

Each is a plain Pyro model for ONE dataset, with one ``pyro.plate`` per level, like the models in
:mod:`amortize.models`; ``SAMPLERS`` (exported there) gives the training structures, sized so that
NUTS on one dataset takes well under a minute. The library has no code for any of them: group
sites whose prior is Normal or MultivariateNormal get the exact Gaussian product in the guide,
constrained globals (positive scales, the LKJ correlation Cholesky factor) go through their
bijections to R^d.

``gaussian_contextual`` is :func:`amortize.models.radon.radon_contextual_effects` under a
generic name (Gaussian response, an observation covariate, two group-level predictors of the
group means), trained on random structures instead of the fixed Minnesota one.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from ..data import HierarchicalData
from ..simulate import StructureSampler
from .radon import radon_contextual_effects

__all__ = [
    "poisson_3level",
    "logistic_3level",
    "gaussian_contextual",
    "varying_slopes",
    "gaussian_4level",
    "GLM_SAMPLERS",
]


def poisson_3level(data: HierarchicalData) -> None:
    """Counts with exposure, counties in regions in nations, log link::

    a_nation ~ N(mu, tau_nation), a_region ~ N(a_nation, tau_region), a_county ~ N(a_region, tau_county)
    y ~ Poisson(exposure * exp(a_county))        # log(exposure) is the offset
    """
    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    tau_n = pyro.sample("tau_nation", dist.HalfNormal(0.5))
    tau_r = pyro.sample("tau_region", dist.HalfNormal(0.5))
    tau_c = pyro.sample("tau_county", dist.HalfNormal(0.5))
    with pyro.plate("nation", data.size("nation")):
        a_n = pyro.sample("a_nation", dist.Normal(mu, tau_n))
    with pyro.plate("region", data.size("region")):
        a_r = pyro.sample("a_region", dist.Normal(a_n[..., data.parent_index("region")], tau_r))
    with pyro.plate("county", data.size("county")):
        a_c = pyro.sample("a_county", dist.Normal(a_r[..., data.parent_index("county")], tau_c))
    log_rate = a_c[..., data.index("county")] + torch.log(data.x["exposure"])
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Poisson(log_rate.exp()), obs=data.y)


def logistic_3level(data: HierarchicalData) -> None:
    """Children (rows) of mothers in communities, Bernoulli logit, one covariate per level::

    a_community ~ N(mu + beta[0] x_community, tau_community)
    a_mother ~ N(a_community + beta[1] x_mother, tau_mother)
    y ~ Bernoulli(logit = a_mother + beta[2] x_child)
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 1.5))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))  # [..., 1, 3]
    tau_c = pyro.sample("tau_community", dist.HalfNormal(1.0))
    tau_m = pyro.sample("tau_mother", dist.HalfNormal(1.0))
    x = data.x
    with pyro.plate("community", data.size("community")):
        a_c = pyro.sample("a_community", dist.Normal(mu + beta[..., 0] * x["x_community"], tau_c))
    with pyro.plate("mother", data.size("mother")):
        loc = a_c[..., data.parent_index("mother")] + beta[..., 1] * x["x_mother"]
        a_m = pyro.sample("a_mother", dist.Normal(loc, tau_m))
    with pyro.plate("obs", data.n_obs):
        logits = a_m[..., data.index("mother")] + beta[..., 2] * x["x_child"]
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=data.y)


gaussian_contextual = radon_contextual_effects
"""Gaussian contextual effects (levels: county; covariates ``floor`` at the rows, ``log_uranium`` and
``floor_mean`` at the counties): the radon model itself, see :mod:`amortize.models.radon`."""


def varying_slopes(data: HierarchicalData) -> None:
    """Correlated varying intercepts and slopes on covariate x::

    L ~ LKJCholesky(2, 2), tau ~ HalfNormal(1) [2], mu ~ N(0, 2) [2]
    b_group ~ MVN(mu, diag(tau) L L^T diag(tau))     # b = (intercept, slope), event shape [2]
    y ~ N(b[0] + b[1] x, sigma)
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0).expand([2]).to_event(1))  # [..., 1, 2]
    tau = pyro.sample("tau", dist.HalfNormal(1.0).expand([2]).to_event(1))  # [..., 1, 2]
    corr = pyro.sample("corr_chol", dist.LKJCholesky(2, 2.0))  # [..., 1, 2, 2]
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    scale_tril = tau.unsqueeze(-1) * corr  # diag(tau) @ L
    with pyro.plate("group", data.size("group")):
        b = pyro.sample("b", dist.MultivariateNormal(mu, scale_tril=scale_tril))  # [..., G, 2]
    g = data.index("group")
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(b[..., g, 0] + b[..., g, 1] * data.x["x"], sigma), obs=data.y)


FOUR_LEVELS = ("state", "district", "school", "classroom")


def gaussian_4level(data: HierarchicalData) -> None:
    """Four nested levels (state > district > school > classroom), Gaussian varying intercepts at each."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    taus = {lvl: pyro.sample(f"tau_{lvl}", dist.HalfNormal(1.0)) for lvl in FOUR_LEVELS}
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("state", data.size("state")):
        a = pyro.sample("a_state", dist.Normal(mu, taus["state"]))
    for lvl in FOUR_LEVELS[1:]:
        with pyro.plate(lvl, data.size(lvl)):
            a = pyro.sample(f"a_{lvl}", dist.Normal(a[..., data.parent_index(lvl)], taus[lvl]))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(a[..., data.index("classroom")], sigma), obs=data.y)


GLM_SAMPLERS: dict[str, Callable[[], StructureSampler]] = {
    "poisson_3level": lambda: StructureSampler(
        ["nation", "region", "county"],
        groups={"nation": (3, 6), "region": (2, 4), "county": (2, 4)},
        obs=(2, 6),
        covariates={"obs": {"exposure": {"dist": "uniform", "low": 0.5, "high": 3.0}}},
    ),
    "logistic_3level": lambda: StructureSampler(
        ["community", "mother"],
        groups={"community": (8, 20), "mother": (2, 5)},
        obs=(1, 4),
        covariates={
            "community": {"x_community": {"dist": "bernoulli", "p": 0.4}},
            "mother": {"x_mother": {"dist": "normal"}},
            "obs": {"x_child": {"dist": "normal"}},
        },
    ),
    "gaussian_contextual": lambda: StructureSampler(
        ["county"],
        groups={"county": (10, 30)},
        obs=(2, 10),
        covariates={
            "county": {"log_uranium": {"dist": "normal", "scale": 0.5}, "floor_mean": {"dist": "uniform"}},
            "obs": {"floor": {"dist": "bernoulli", "p": 0.2}},
        },
    ),
    "varying_slopes": lambda: StructureSampler(
        ["group"], groups={"group": (8, 30)}, obs=(3, 10), covariates={"obs": {"x": {"dist": "normal"}}}
    ),
    "gaussian_4level": lambda: StructureSampler(
        FOUR_LEVELS,
        groups={"state": (3, 6), "district": (1, 3), "school": (1, 3), "classroom": (1, 3)},
        obs=(2, 6),
    ),
}
"""Training structures of the models above (merged into :data:`amortize.models.SAMPLERS`)."""
