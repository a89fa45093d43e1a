"""A Poisson GLMM with an observation-level random effect (overdispersion), a model the library does not ship.

Counts with exposure, regions in nations, one Normal effect per row inside the observation plate::

    a_nation ~ N(mu, tau_nation), a_region ~ N(a_nation, tau_region), e_row ~ N(0, sigma_obs)
    y ~ Poisson(exposure * exp(a_region + e_row))        # log(exposure) is the offset

The row effects ``e`` live in the ``obs`` plate: amortize reads them as the latents of an implicit
innermost level named ``obs`` whose groups are the rows (``ModelStructure.row_level``). Trained by
``experiments/poisson_olre.yaml``; compared with NUTS by ``experiments/poisson_olre_vs_nuts.py``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from amortize import HierarchicalData

__all__ = ["poisson_olre"]


def poisson_olre(data: HierarchicalData) -> None:
    """Poisson counts with exposure, regions in nations, and one overdispersion effect per row."""
    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    tau_n = pyro.sample("tau_nation", dist.HalfNormal(0.5))
    tau_r = pyro.sample("tau_region", dist.HalfNormal(0.5))
    sigma = pyro.sample("sigma_obs", dist.HalfNormal(0.5))
    with pyro.plate("nation", data.size("nation")):
        a_n = pyro.sample("a_nation", dist.Normal(mu, tau_n))
    with pyro.plate("region", data.size("region")):
        a_r = pyro.sample("a_region", dist.Normal(a_n[..., data.parent_index("region")], tau_r))
    with pyro.plate("obs", data.n_obs):
        e = pyro.sample("e", dist.Normal(0.0, sigma))
        log_rate = a_r[..., data.index("region")] + e + torch.log(data.x["exposure"])
        pyro.sample("y", dist.Poisson(log_rate.exp()), obs=data.y)
