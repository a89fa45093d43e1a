"""Example hierarchical models shipped with the library, each with the structure it is trained on.

Every model is a plain Pyro model for ONE dataset: one ``pyro.plate`` per level, named after the
level, parents gathered with ``[..., data.index(level)]``. ``SAMPLERS[name]()`` gives the
:class:`~amortize.simulate.StructureSampler` the experiments train it on. Models with other likelihoods,
covariates at every level, correlated varying slopes and four levels are in :mod:`amortize.models.glm`;
``docs/models.md`` lists them all.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist

from ..data import HierarchicalData
from ..simulate import StructureSampler
from .glm import GLM_SAMPLERS, gaussian_4level, gaussian_contextual, logistic_3level, poisson_3level, varying_slopes

__all__ = [
    "gaussian_2level",
    "gaussian_3level",
    "logistic_2level",
    "eight_schools",
    "poisson_3level",
    "logistic_3level",
    "gaussian_contextual",
    "varying_slopes",
    "gaussian_4level",
    "SAMPLERS",
]


def gaussian_2level(data: HierarchicalData) -> None:
    """Varying intercepts: y_ij ~ N(theta_j, sigma), theta_j ~ N(mu, tau)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], sigma), obs=data.y)


def gaussian_3level(data: HierarchicalData) -> None:
    """Students in schools in districts: y ~ N(school, sigma), school ~ N(district, tau_s),
    district ~ N(mu, tau_d)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau_d = pyro.sample("tau_district", dist.HalfNormal(1.0))
    tau_s = pyro.sample("tau_school", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("district", data.size("district")):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau_d))
    with pyro.plate("school", data.size("school")):
        beta = pyro.sample("beta", dist.Normal(alpha[..., data.parent_index("school")], tau_s))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(beta[..., data.index("school")], sigma), obs=data.y)


def logistic_2level(data: HierarchicalData) -> None:
    """Hierarchical logistic regression: varying intercepts, a common slope on covariate x."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.5))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    with pyro.plate("group", data.size("group")):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        logits = alpha[..., data.index("group")] + beta * data.x["x"]
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=data.y)


def eight_schools(data: HierarchicalData) -> None:
    """Eight schools, posteriordb prior (centered form): mu ~ N(0, 5), tau ~ HalfCauchy(5),
    theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j) with known sigma_j."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", data.size("school")):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("school")], data.x["sigma"]), obs=data.y)


def eight_schools_data(y: list[float] | None = None, sigma: list[float] | None = None) -> HierarchicalData:
    """The eight schools structure (8 schools, one estimate each, known standard errors)."""
    y = y if y is not None else [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
    sigma = sigma if sigma is not None else [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
    return HierarchicalData.from_frame(
        {"school": list(range(1, 9)), "y": y, "sigma": sigma},
        levels=["school"],
        response="y",
        covariates={"obs": ["sigma"]},
    )


SAMPLERS: dict[str, Callable[[], StructureSampler]] = {
    "gaussian_2level": lambda: StructureSampler(["group"], groups={"group": (10, 50)}, obs=(5, 30)),
    "gaussian_3level": lambda: StructureSampler(
        ["district", "school"], groups={"district": (5, 15), "school": (2, 6)}, obs=(3, 15)
    ),
    "logistic_2level": lambda: StructureSampler(
        ["group"], groups={"group": (10, 40)}, obs=(10, 40), covariates={"obs": {"x": {"dist": "normal"}}}
    ),
    "eight_schools": lambda: StructureSampler.fixed(eight_schools_data()),
    **GLM_SAMPLERS,  # poisson_3level, logistic_3level, gaussian_contextual, varying_slopes, gaussian_4level
}
