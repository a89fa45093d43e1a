"""Inference Gym's radon contextual-effects model (Minnesota: 919 houses in 85 counties), in Pyro.

Houses in counties, with the county's log soil uranium and its share of first-floor measurements
as county-level ("contextual") predictors::

    county_effect_mean ~ N(0, 1)
    county_effect_scale ~ HalfNormal(1)            # Uniform(0, 100) in the original target
    weight ~ N(0, 1), shape [3]                     # (log_uranium, floor, floor_mean)
    log_radon_scale ~ HalfNormal(1)                 # Uniform(0, 100) in the original target
    county_effect[j] ~ N(county_effect_mean, county_effect_scale)        # plate "county"
    log_radon[n] ~ N(weight[0] log_uranium[c_n] + weight[1] floor[n] + weight[2] floor_mean[c_n]
                     + county_effect[c_n], log_radon_scale)              # plate "obs"

Site names are Inference Gym's (as :func:`amortize.validate.reference.radon_minnesota` returns
them), so draws compare with its ground truth directly. :func:`radon_contextual_effects` has
HalfNormal(1) scale priors (Inference Gym's ``RadonContextualEffectsHalfNormalMinnesota``): a
prior predictive that amortization can cover. :func:`radon_contextual_effects_uniform` is the
original Uniform(0, 100) target, whose prior predictive is dominated by noise scales of tens (the
real data's is 0.76), so it suits NUTS but not training by simulation. Both posteriors agree to
about 0.01 sd (the two ground-truth files).

The data (``experiments/data/radon_minnesota.csv``, written by :func:`write_radon_csv` from the
reference files) has one row per house: ``county`` (name), ``log_radon``, ``floor`` (0 = basement,
1 = first floor) and the county covariates ``log_uranium``, ``floor_mean`` repeated per house.
"""

from __future__ import annotations

import os

import pyro
import pyro.distributions as dist
import torch

from ..data import HierarchicalData
from ..simulate import StructureSampler

__all__ = [
    "radon_contextual_effects",
    "radon_contextual_effects_uniform",
    "radon_minnesota_data",
    "radon_sampler",
    "write_radon_csv",
    "LEVELS",
    "COVARIATES",
]

LEVELS = ["county"]
COVARIATES = {"county": ["log_uranium", "floor_mean"], "obs": ["floor"]}


def _contextual_effects(data: HierarchicalData, scale_prior: dist.Distribution) -> None:
    county_mean = pyro.sample("county_effect_mean", dist.Normal(0.0, 1.0))
    county_scale = pyro.sample("county_effect_scale", scale_prior)
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0).expand([3]).to_event(1))  # [..., 1, 3]
    noise = pyro.sample("log_radon_scale", scale_prior)
    with pyro.plate("county", data.size("county")):
        effect = pyro.sample("county_effect", dist.Normal(county_mean, county_scale))  # [..., J]
    c = data.index("county")  # [N]
    x = data.x
    loc = (
        weight[..., 0] * x["log_uranium"][c]
        + weight[..., 1] * x["floor"]
        + weight[..., 2] * x["floor_mean"][c]
        + effect[..., c]
    )  # [..., N]
    with pyro.plate("obs", data.n_obs):
        pyro.sample("log_radon", dist.Normal(loc, noise), obs=data.y)


def radon_contextual_effects(data: HierarchicalData) -> None:
    """Radon contextual effects with HalfNormal(1) scale priors (the amortized model)."""
    _contextual_effects(data, dist.HalfNormal(1.0))


def radon_contextual_effects_uniform(data: HierarchicalData) -> None:
    """Radon contextual effects with Inference Gym's original Uniform(0, 100) scale priors."""
    _contextual_effects(data, dist.Uniform(0.0, 100.0))


def radon_minnesota_data(dtype: torch.dtype | None = None) -> HierarchicalData:
    """The Minnesota data from the shared reference folder (counties sorted by name, as the ground truth).

    Raises:
        ReferenceNotFoundError: the reference folder is missing.
    """
    from .reference_data import minnesota_radon

    return minnesota_radon(dtype).to_hierarchical_data()


def radon_sampler() -> StructureSampler:
    """Training structures: the fixed Minnesota structure and covariates."""
    return StructureSampler.fixed(radon_minnesota_data())


def write_radon_csv(path: str | os.PathLike) -> None:
    """Write the Minnesota data as a long-format CSV (one row per house, rows in county order), atomically."""
    from ..checkpoint import atomic_write

    d = radon_minnesota_data(torch.float64)
    c = d.index("county")
    names = d.labels["county"]
    ur, fm, fl = d.x["log_uranium"], d.x["floor_mean"], d.x["floor"]
    lines = ["county,log_radon,floor,log_uranium,floor_mean"]
    for n in range(d.n_obs):
        j = int(c[n])
        name = f'"{names[j]}"' if "," in names[j] else names[j]
        lines.append(f"{name},{float(d.y[n])!r},{int(fl[n])},{float(ur[j])!r},{float(fm[j])!r}")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))
