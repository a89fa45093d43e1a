"""Shipped models written again in NumPyro, and NumPyro NUTS with the same checks as :func:`run_nuts`.

This module is the optional ``bench`` extra (``pip install amortize[bench]``: numpyro and CPU jax).
It is what a user would otherwise run, for the speed benchmark ``experiments/bench/speed.py``; nothing
else in the library imports it, so ``import amortize`` never imports jax.

The NumPyro models take the same data arrays as the Pyro models (the group index of every
observation, each group's parent, the covariates and the response) and are the same math, site by
site, with the same site names, shapes and distributions: the tests check that their log densities
equal the Pyro models' log joints on the same values and data. :data:`MODELS` maps the name of each
shipped Pyro model that has a NumPyro version to it: ``gaussian_2level``, ``gaussian_3level``,
``poisson_3level``, ``logistic_2level``, ``logistic_3level``, ``gaussian_contextual`` (the radon
contextual-effects model with HalfNormal scales), ``varying_slopes`` and ``gaussian_4level``.

Example:
    >>> from numpyro_models import run_numpyro_nuts  # doctest: +SKIP
    >>> res = run_numpyro_nuts(data, num_warmup=500, num_samples=1000)  # doctest: +SKIP
    >>> res.summary()  # doctest: +SKIP
    'NumPyro NUTS (none): 2x1000 draws in 12.5 s (compile 11.8 s); max R-hat 1.010 (theta), ...'
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import torch
from numpyro import handlers
from numpyro.infer import MCMC, NUTS
from numpyro.infer.reparam import LocScaleReparam
from numpyro.infer.util import log_density as _numpyro_log_density

from amortize.data import HierarchicalData
from amortize.errors import ConfigError, DataError
from amortize.validate.convergence import checks_passed, rhat_thresholds, worst_diagnostics
from amortize.validate.nuts import NUTSResult, cached_reference

__all__ = [
    "gaussian_2level",
    "gaussian_3level",
    "poisson_3level",
    "logistic_3level",
    "gaussian_contextual",
    "varying_slopes",
    "gaussian_4level",
    "model_arrays",
    "NumPyroModel",
    "MODELS",
    "data_arrays",
    "log_density",
    "NumPyroNUTSResult",
    "run_numpyro_nuts",
    "twin_reference",
]


def gaussian_2level(group: jax.Array, n_groups: int, y: jax.Array | None = None) -> None:
    """:func:`amortize.models.gaussian_2level` in NumPyro: mu ~ N(0, 3), tau ~ HalfNormal(1),
    sigma ~ HalfNormal(1), theta_g ~ N(mu, tau), y_i ~ N(theta[group_i], sigma).

    Args:
        group: group index of every observation ``[N]`` (0..n_groups-1), as ``data.index("group")``.
        n_groups: number of groups (static: it sets the shape of ``theta``).
        y: the response ``[N]`` (None: simulate it).
    """
    mu = numpyro.sample("mu", ndist.Normal(0.0, 3.0))
    tau = numpyro.sample("tau", ndist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
    with numpyro.plate("group", n_groups):
        theta = numpyro.sample("theta", ndist.Normal(mu, tau))
    with numpyro.plate("obs", group.shape[0]):
        numpyro.sample("y", ndist.Normal(theta[group], sigma), obs=y)


def gaussian_3level(
    school: jax.Array, district_of_school: jax.Array, n_districts: int, n_schools: int, y: jax.Array | None = None
) -> None:
    """:func:`amortize.models.gaussian_3level` in NumPyro: mu ~ N(0, 3), tau_district, tau_school,
    sigma ~ HalfNormal(1), alpha_d ~ N(mu, tau_district), beta_s ~ N(alpha[district_s], tau_school),
    y_i ~ N(beta[school_i], sigma).

    Args:
        school: school index of every observation ``[N]``, as ``data.index("school")``.
        district_of_school: district of every school ``[n_schools]``, as ``data.parent_index("school")``.
        n_districts, n_schools: numbers of groups (static: they set the latents' shapes).
        y: the response ``[N]`` (None: simulate it).
    """
    mu = numpyro.sample("mu", ndist.Normal(0.0, 3.0))
    tau_d = numpyro.sample("tau_district", ndist.HalfNormal(1.0))
    tau_s = numpyro.sample("tau_school", ndist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
    with numpyro.plate("district", n_districts):
        alpha = numpyro.sample("alpha", ndist.Normal(mu, tau_d))
    with numpyro.plate("school", n_schools):
        beta = numpyro.sample("beta", ndist.Normal(alpha[district_of_school], tau_s))
    with numpyro.plate("obs", school.shape[0]):
        numpyro.sample("y", ndist.Normal(beta[school], sigma), obs=y)


def poisson_3level(
    county: jax.Array,
    region_of_county: jax.Array,
    nation_of_region: jax.Array,
    exposure: jax.Array,
    n_nations: int,
    n_regions: int,
    n_counties: int,
    y: jax.Array | None = None,
) -> None:
    """:func:`amortize.models.poisson_3level` in NumPyro: mu ~ N(1, 1), tau_nation, tau_region,
    tau_county ~ HalfNormal(0.5), a_nation ~ N(mu, tau_nation), a_region ~ N(a_nation[nation_r], tau_region),
    a_county ~ N(a_region[region_c], tau_county), y_i ~ Poisson(exp(a_county[county_i] + log exposure_i)).

    Args:
        county: county index of every observation ``[N]``, as ``data.index("county")``.
        region_of_county: region of every county, as ``data.parent_index("county")``.
        nation_of_region: nation of every region, as ``data.parent_index("region")``.
        exposure: the observation covariate ``exposure`` ``[N]`` (positive).
        n_nations, n_regions, n_counties: numbers of groups (static: they set the latents' shapes).
        y: the counts ``[N]`` (None: simulate them).
    """
    mu = numpyro.sample("mu", ndist.Normal(1.0, 1.0))
    tau_n = numpyro.sample("tau_nation", ndist.HalfNormal(0.5))
    tau_r = numpyro.sample("tau_region", ndist.HalfNormal(0.5))
    tau_c = numpyro.sample("tau_county", ndist.HalfNormal(0.5))
    with numpyro.plate("nation", n_nations):
        a_n = numpyro.sample("a_nation", ndist.Normal(mu, tau_n))
    with numpyro.plate("region", n_regions):
        a_r = numpyro.sample("a_region", ndist.Normal(a_n[nation_of_region], tau_r))
    with numpyro.plate("county", n_counties):
        a_c = numpyro.sample("a_county", ndist.Normal(a_r[region_of_county], tau_c))
    log_rate = a_c[county] + jnp.log(exposure)
    with numpyro.plate("obs", county.shape[0]):
        numpyro.sample("y", ndist.Poisson(jnp.exp(log_rate)), obs=y)


def logistic_2level(group: jax.Array, x: jax.Array, n_groups: int, y: jax.Array | None = None) -> None:
    """:func:`amortize.models.logistic_2level` in NumPyro: mu ~ N(0, 1.5), tau ~ HalfNormal(1),
    beta ~ N(0, 1), alpha_g ~ N(mu, tau), y_i ~ Bernoulli(logit = alpha[group_i] + beta x_i).

    Args:
        group: group index of every observation ``[N]``, as ``data.index("group")``.
        x: the row covariate ``[N]``.
        n_groups: number of groups (static: it sets the shape of ``alpha``).
        y: the 0/1 response ``[N]`` (None: simulate it).
    """
    mu = numpyro.sample("mu", ndist.Normal(0.0, 1.5))
    tau = numpyro.sample("tau", ndist.HalfNormal(1.0))
    beta = numpyro.sample("beta", ndist.Normal(0.0, 1.0))
    with numpyro.plate("group", n_groups):
        alpha = numpyro.sample("alpha", ndist.Normal(mu, tau))
    with numpyro.plate("obs", group.shape[0]):
        numpyro.sample("y", ndist.Bernoulli(logits=alpha[group] + beta * x), obs=y)


def logistic_3level(
    mother: jax.Array,
    community_of_mother: jax.Array,
    x_community: jax.Array,
    x_mother: jax.Array,
    x_child: jax.Array,
    n_communities: int,
    n_mothers: int,
    y: jax.Array | None = None,
) -> None:
    """:func:`amortize.models.logistic_3level` in NumPyro: mu ~ N(0, 1.5), beta ~ N(0, 1) [3],
    tau_community, tau_mother ~ HalfNormal(1), a_community ~ N(mu + beta_0 x_community, tau_community),
    a_mother ~ N(a_community[community_m] + beta_1 x_mother, tau_mother),
    y_i ~ Bernoulli(logit = a_mother[mother_i] + beta_2 x_child_i).

    Args:
        mother: mother index of every observation ``[N]``, as ``data.index("mother")``.
        community_of_mother: community of every mother, as ``data.parent_index("mother")``.
        x_community, x_mother, x_child: the covariates of the communities, mothers and rows.
        n_communities, n_mothers: numbers of groups (static: they set the latents' shapes).
        y: the 0/1 response ``[N]`` (None: simulate it).
    """
    mu = numpyro.sample("mu", ndist.Normal(0.0, 1.5))
    beta = numpyro.sample("beta", ndist.Normal(0.0, 1.0).expand([3]).to_event(1))
    tau_c = numpyro.sample("tau_community", ndist.HalfNormal(1.0))
    tau_m = numpyro.sample("tau_mother", ndist.HalfNormal(1.0))
    with numpyro.plate("community", n_communities):
        a_c = numpyro.sample("a_community", ndist.Normal(mu + beta[0] * x_community, tau_c))
    with numpyro.plate("mother", n_mothers):
        a_m = numpyro.sample("a_mother", ndist.Normal(a_c[community_of_mother] + beta[1] * x_mother, tau_m))
    with numpyro.plate("obs", mother.shape[0]):
        numpyro.sample("y", ndist.Bernoulli(logits=a_m[mother] + beta[2] * x_child), obs=y)


def gaussian_contextual(
    county: jax.Array,
    log_uranium: jax.Array,
    floor_mean: jax.Array,
    floor: jax.Array,
    n_counties: int,
    y: jax.Array | None = None,
) -> None:
    """:func:`amortize.models.gaussian_contextual` (the radon contextual-effects model with HalfNormal(1)
    scales) in NumPyro: county_effect_mean ~ N(0, 1), county_effect_scale ~ HalfNormal(1),
    weight ~ N(0, 1) [3], log_radon_scale ~ HalfNormal(1),
    county_effect ~ N(county_effect_mean, county_effect_scale), log_radon_i ~ N(weight_0 log_uranium[c_i]
    + weight_1 floor_i + weight_2 floor_mean[c_i] + county_effect[c_i], log_radon_scale).

    Args:
        county: county index of every observation ``[N]``, as ``data.index("county")``.
        log_uranium, floor_mean: the county covariates ``[n_counties]``.
        floor: the observation covariate ``[N]``.
        n_counties: number of counties (static: it sets the shape of ``county_effect``).
        y: the response ``[N]`` (None: simulate it).
    """
    county_mean = numpyro.sample("county_effect_mean", ndist.Normal(0.0, 1.0))
    county_scale = numpyro.sample("county_effect_scale", ndist.HalfNormal(1.0))
    weight = numpyro.sample("weight", ndist.Normal(0.0, 1.0).expand([3]).to_event(1))
    noise = numpyro.sample("log_radon_scale", ndist.HalfNormal(1.0))
    with numpyro.plate("county", n_counties):
        effect = numpyro.sample("county_effect", ndist.Normal(county_mean, county_scale))
    loc = weight[0] * log_uranium[county] + weight[1] * floor + weight[2] * floor_mean[county] + effect[county]
    with numpyro.plate("obs", county.shape[0]):
        numpyro.sample("log_radon", ndist.Normal(loc, noise), obs=y)


def varying_slopes(group: jax.Array, x: jax.Array, n_groups: int, y: jax.Array | None = None) -> None:
    """:func:`amortize.models.varying_slopes` in NumPyro: mu ~ N(0, 2) [2], tau ~ HalfNormal(1) [2],
    corr_chol ~ LKJCholesky(2, 2), sigma ~ HalfNormal(1), b_g ~ MVN(mu, scale_tril = diag(tau) corr_chol)
    (event shape [2]: intercept, slope), y_i ~ N(b[group_i, 0] + b[group_i, 1] x_i, sigma).

    Args:
        group: group index of every observation ``[N]``, as ``data.index("group")``.
        x: the observation covariate ``[N]``.
        n_groups: number of groups (static: it sets the shape of ``b``).
        y: the response ``[N]`` (None: simulate it).
    """
    mu = numpyro.sample("mu", ndist.Normal(0.0, 2.0).expand([2]).to_event(1))
    tau = numpyro.sample("tau", ndist.HalfNormal(1.0).expand([2]).to_event(1))
    corr = numpyro.sample("corr_chol", ndist.LKJCholesky(2, 2.0))
    sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
    scale_tril = tau[..., None] * corr  # diag(tau) @ L
    with numpyro.plate("group", n_groups):
        b = numpyro.sample("b", ndist.MultivariateNormal(mu, scale_tril=scale_tril))  # [G, 2]
    with numpyro.plate("obs", group.shape[0]):
        numpyro.sample("y", ndist.Normal(b[group, 0] + b[group, 1] * x, sigma), obs=y)


_FOUR_LEVELS = ("state", "district", "school", "classroom")


def gaussian_4level(
    classroom: jax.Array,
    school_of_classroom: jax.Array,
    district_of_school: jax.Array,
    state_of_district: jax.Array,
    n_states: int,
    n_districts: int,
    n_schools: int,
    n_classrooms: int,
    y: jax.Array | None = None,
) -> None:
    """:func:`amortize.models.gaussian_4level` in NumPyro: mu ~ N(0, 3), tau_state, tau_district,
    tau_school, tau_classroom, sigma ~ HalfNormal(1), a_state ~ N(mu, tau_state), a_level ~
    N(a_parent[parent], tau_level) for district, school and classroom, y_i ~ N(a_classroom[classroom_i], sigma).

    Args:
        classroom: classroom index of every observation ``[N]``, as ``data.index("classroom")``.
        school_of_classroom, district_of_school, state_of_district: each group's parent, as
            ``data.parent_index(level)``.
        n_states, n_districts, n_schools, n_classrooms: numbers of groups (static: they set the latents' shapes).
        y: the response ``[N]`` (None: simulate it).
    """
    mu = numpyro.sample("mu", ndist.Normal(0.0, 3.0))
    taus = {lvl: numpyro.sample(f"tau_{lvl}", ndist.HalfNormal(1.0)) for lvl in _FOUR_LEVELS}
    sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
    with numpyro.plate("state", n_states):
        a = numpyro.sample("a_state", ndist.Normal(mu, taus["state"]))
    below = (
        ("district", n_districts, state_of_district),
        ("school", n_schools, district_of_school),
        ("classroom", n_classrooms, school_of_classroom),
    )
    for lvl, size, parent in below:
        with numpyro.plate(lvl, size):
            a = numpyro.sample(f"a_{lvl}", ndist.Normal(a[parent], taus[lvl]))
    with numpyro.plate("obs", classroom.shape[0]):
        numpyro.sample("y", ndist.Normal(a[classroom], sigma), obs=y)


def crossed_gaussian(
    person: jax.Array, item: jax.Array, x: jax.Array, n_persons: int, n_items: int, y: jax.Array | None = None
) -> None:
    """``experiments/models/crossed.py``'s crossed_gaussian in NumPyro: mu ~ N(0, 2), beta ~ N(0, 1),
    tau_person, tau_item, sigma ~ HalfNormal(1), a ~ N(0, tau_person), b ~ N(0, tau_item),
    y ~ N(mu + a[person] + b[item] + beta x, sigma)."""
    mu = numpyro.sample("mu", ndist.Normal(0.0, 2.0))
    beta = numpyro.sample("beta", ndist.Normal(0.0, 1.0))
    tau_p = numpyro.sample("tau_person", ndist.HalfNormal(1.0))
    tau_i = numpyro.sample("tau_item", ndist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
    with numpyro.plate("person", n_persons):
        a = numpyro.sample("a", ndist.Normal(0.0, tau_p))
    with numpyro.plate("item", n_items):
        b = numpyro.sample("b", ndist.Normal(0.0, tau_i))
    with numpyro.plate("obs", person.shape[0]):
        numpyro.sample("y", ndist.Normal(mu + a[person] + b[item] + beta * x, sigma), obs=y)


def crossed_bernoulli(
    person: jax.Array, item: jax.Array, x: jax.Array, n_persons: int, n_items: int, y: jax.Array | None = None
) -> None:
    """crossed_bernoulli in NumPyro: as :func:`crossed_gaussian` on the logit scale (mu ~ N(0, 1.5)), no sigma."""
    mu = numpyro.sample("mu", ndist.Normal(0.0, 1.5))
    beta = numpyro.sample("beta", ndist.Normal(0.0, 1.0))
    tau_p = numpyro.sample("tau_person", ndist.HalfNormal(1.0))
    tau_i = numpyro.sample("tau_item", ndist.HalfNormal(1.0))
    with numpyro.plate("person", n_persons):
        a = numpyro.sample("a", ndist.Normal(0.0, tau_p))
    with numpyro.plate("item", n_items):
        b = numpyro.sample("b", ndist.Normal(0.0, tau_i))
    with numpyro.plate("obs", person.shape[0]):
        numpyro.sample("y", ndist.Bernoulli(logits=mu + a[person] + b[item] + beta * x), obs=y)


def _arrays_crossed(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    args = (_index(data.index("person")), _index(data.index("item")), _float(data.x["x"]))
    return args, {"n_persons": data.size("person"), "n_items": data.size("item")}


def _index(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.cpu().numpy().astype(np.int32))


def _arrays_2level(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    return (_index(data.index("group")),), {"n_groups": data.size("group")}


def _arrays_3level(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    args = (_index(data.index("school")), _index(data.parent_index("school")))
    return args, {"n_districts": data.size("district"), "n_schools": data.size("school")}


def _float(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().cpu().numpy().astype(np.float32))


def _arrays_poisson_3level(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    args = (
        _index(data.index("county")),
        _index(data.parent_index("county")),
        _index(data.parent_index("region")),
        _float(data.x["exposure"]),
    )
    sizes = {"n_nations": data.size("nation"), "n_regions": data.size("region"), "n_counties": data.size("county")}
    return args, sizes


def _arrays_logistic_2level(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    return (_index(data.index("group")), _float(data.x["x"])), {"n_groups": data.size("group")}


def _arrays_logistic_3level(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    x = data.x
    args = (
        _index(data.index("mother")),
        _index(data.parent_index("mother")),
        _float(x["x_community"]),
        _float(x["x_mother"]),
        _float(x["x_child"]),
    )
    return args, {"n_communities": data.size("community"), "n_mothers": data.size("mother")}


def _arrays_contextual(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    x = data.x
    args = (_index(data.index("county")), _float(x["log_uranium"]), _float(x["floor_mean"]), _float(x["floor"]))
    return args, {"n_counties": data.size("county")}


def _arrays_varying_slopes(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    return (_index(data.index("group")), _float(data.x["x"])), {"n_groups": data.size("group")}


def _arrays_4level(data: HierarchicalData) -> tuple[tuple[jax.Array, ...], dict[str, int]]:
    args = (
        _index(data.index("classroom")),
        _index(data.parent_index("classroom")),
        _index(data.parent_index("school")),
        _index(data.parent_index("district")),
    )
    sizes = {f"n_{lvl}s": data.size(lvl) for lvl in _FOUR_LEVELS}
    return args, sizes


@dataclass(frozen=True)
class NumPyroModel:
    """A NumPyro model ``fn(*arrays, **sizes, y=y)``, its data levels, latent sites, the
    loc-scale ones non-centering decenters, and how its arrays (group indices and covariates) and
    sizes come from the data."""

    fn: Callable[..., None]
    levels: tuple[str, ...]
    latents: tuple[str, ...]
    loc_scale: tuple[str, ...]
    arrays: Callable[[HierarchicalData], tuple[tuple[jax.Array, ...], dict[str, int]]]


# the Pyro model's name in amortize.models -> its NumPyro version
MODELS: dict[str, NumPyroModel] = {
    "gaussian_2level": NumPyroModel(
        gaussian_2level, ("group",), ("mu", "tau", "sigma", "theta"), ("mu", "theta"), _arrays_2level
    ),
    "gaussian_3level": NumPyroModel(
        gaussian_3level,
        ("district", "school"),
        ("mu", "tau_district", "tau_school", "sigma", "alpha", "beta"),
        ("alpha", "beta"),
        _arrays_3level,
    ),
    "poisson_3level": NumPyroModel(
        poisson_3level,
        ("nation", "region", "county"),
        ("mu", "tau_nation", "tau_region", "tau_county", "a_nation", "a_region", "a_county"),
        ("a_nation", "a_region", "a_county"),
        _arrays_poisson_3level,
    ),
    "logistic_2level": NumPyroModel(
        logistic_2level, ("group",), ("mu", "tau", "beta", "alpha"), ("alpha",), _arrays_logistic_2level
    ),
    "logistic_3level": NumPyroModel(
        logistic_3level,
        ("community", "mother"),
        ("mu", "beta", "tau_community", "tau_mother", "a_community", "a_mother"),
        ("a_community", "a_mother"),
        _arrays_logistic_3level,
    ),
    "gaussian_contextual": NumPyroModel(
        gaussian_contextual,
        ("county",),
        ("county_effect_mean", "county_effect_scale", "weight", "log_radon_scale", "county_effect"),
        ("county_effect",),
        _arrays_contextual,
    ),
    "varying_slopes": NumPyroModel(
        varying_slopes,
        ("group",),
        ("mu", "tau", "corr_chol", "sigma", "b"),
        (),  # b is MultivariateNormal: no loc-scale non-centering
        _arrays_varying_slopes,
    ),
    "crossed_gaussian": NumPyroModel(
        crossed_gaussian,
        ("person", "item"),
        ("mu", "beta", "tau_person", "tau_item", "sigma", "a", "b"),
        ("a", "b"),
        _arrays_crossed,
    ),
    "crossed_bernoulli": NumPyroModel(
        crossed_bernoulli,
        ("person", "item"),
        ("mu", "beta", "tau_person", "tau_item", "a", "b"),
        ("a", "b"),
        _arrays_crossed,
    ),
    "gaussian_4level": NumPyroModel(
        gaussian_4level,
        _FOUR_LEVELS,
        ("mu", "tau_state", "tau_district", "tau_school", "tau_classroom", "sigma")
        + ("a_state", "a_district", "a_school", "a_classroom"),
        ("a_state", "a_district", "a_school", "a_classroom"),
        _arrays_4level,
    ),
}


def model_arrays(
    data: HierarchicalData, model: str = "gaussian_2level"
) -> tuple[tuple[jax.Array, ...], dict[str, int], jax.Array]:
    """``(index and covariate arrays, static sizes, y)`` of one dataset for the NumPyro version of
    ``model`` (int32 indices, float32 covariates and response).

    Raises:
        ConfigError: no NumPyro version of ``model``.
        DataError: the data's levels are not the model's, or not one dataset with a response.
    """
    spec = _model(model)
    if tuple(data.levels) != spec.levels:
        raise DataError(f"the NumPyro {model} has levels {list(spec.levels)}, the data has {list(data.levels)}")
    if data.y is None or data.y.dim() != 1:
        shape = None if data.y is None else tuple(data.y.shape)
        raise DataError(f"need one dataset with response '{data.response}' of shape [N], got {shape}")
    args, sizes = spec.arrays(data)
    return args, sizes, jnp.asarray(data.y.detach().cpu().numpy().astype(np.float32))


def data_arrays(data: HierarchicalData) -> tuple[jax.Array, int, jax.Array]:
    """``(group, n_groups, y)`` of a one-level dataset (the 2-level model's arrays).

    Raises:
        DataError: not one dataset with a response on a single level.
    """
    if len(data.levels) != 1:
        raise DataError(f"data_arrays: the NumPyro models have one plate level, the data has {list(data.levels)}")
    if data.y is None or data.y.dim() != 1:
        shape = None if data.y is None else tuple(data.y.shape)
        raise DataError(f"data_arrays: need one dataset with response '{data.response}' of shape [N], got {shape}")
    level = data.levels[0]
    y = jnp.asarray(data.y.detach().cpu().numpy().astype(np.float32))
    return _index(data.index(level)), data.size(level), y


def _model(name: str) -> NumPyroModel:
    if name not in MODELS:
        raise ConfigError(f"no NumPyro version of model '{name}' (known: {sorted(MODELS)})")
    return MODELS[name]


def log_density(values: Mapping[str, torch.Tensor], data: HierarchicalData, model: str = "gaussian_2level") -> float:
    """The NumPyro model's log joint ``log p(y, z)`` at latent ``values`` (constrained, site -> tensor).

    Equals the Pyro model's ``poutine.trace(poutine.condition(model, values)).get_trace(data).log_prob_sum()``
    (float32 arithmetic on both sides).
    """
    args, sizes, y = model_arrays(data, model)
    params = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in values.items()}
    lp, _ = _numpyro_log_density(_model(model).fn, args, {**sizes, "y": y}, params)
    return float(lp)


@dataclass
class NumPyroNUTSResult(NUTSResult):
    """A :class:`~amortize.validate.nuts.NUTSResult` of NumPyro's NUTS (samples as torch float32;
    ``seconds`` covers both parameterizations when the first failed its checks), plus
    ``compile_seconds``: the part of ``seconds`` spent tracing and compiling (JAX's own compile
    events, overlapping spans merged)."""

    compile_seconds: float = 0.0

    @property
    def run_seconds(self) -> float:
        """Wall time without tracing and compiling: what a second dataset of the same shape costs."""
        return max(0.0, self.seconds - self.compile_seconds)

    def summary(self) -> str:
        """One line: parameterization, draws, times, worst R-hat and ESS, divergences, verdict."""
        n = next(iter(self.samples.values())).shape[0] // max(self.num_chains, 1)
        worst_r = max(self.r_hat, key=self.r_hat.__getitem__)
        worst_e = min(self.ess_bulk, key=self.ess_bulk.__getitem__)
        return (
            f"NumPyro NUTS ({self.parameterization}): {self.num_chains}x{n} draws in {self.seconds:.1f} s "
            f"(compile {self.compile_seconds:.1f} s); max R-hat {self.r_hat[worst_r]:.3f} ({worst_r}), "
            f"min bulk ESS {self.ess_bulk[worst_e]:.0f} ({worst_e}), {self.divergences} divergences: "
            f"{'ok' if self.ok else 'NOT ok'}"
        )


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


@contextmanager
def _compile_time() -> Iterator[list[float]]:
    """Collects JAX's trace/lower/compile spans; on exit the list holds their merged length in seconds
    (nested spans, such as the trace of an inner jit during the outer one, count once)."""
    spans: list[tuple[float, float]] = []
    total: list[float] = []

    def listener(event: str, start: float, end: float, **kwargs: object) -> None:
        if event in _COMPILE_EVENTS:
            spans.append((start, end))

    jax.monitoring.register_event_time_span_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)
        merged, cur_start, cur_end = 0.0, None, None
        for s, e in sorted(spans):
            if cur_end is None or s > cur_end:
                merged += 0.0 if cur_end is None else cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        merged += 0.0 if cur_end is None else cur_end - cur_start
        total.append(merged)


def run_numpyro_nuts(
    data: HierarchicalData,
    model: str = "gaussian_2level",
    *,
    num_warmup: int = 500,
    num_samples: int = 1000,
    num_chains: int = 2,
    seed: int = 0,
    reparam: str = "auto",
    target_accept: float = 0.9,
    max_tree_depth: int = 10,
    chain_method: str = "sequential",
    max_rhat: float = 1.01,
    min_ess: float = 100.0,
) -> NumPyroNUTSResult:
    """NumPyro NUTS on the NumPyro version of a shipped model, with :func:`run_nuts`'s settings and checks.

    With ``reparam="auto"`` the model runs as written first and, if R-hat, ESS or divergences fail,
    again with its loc-scale latents non-centered (as :func:`~amortize.validate.nuts.run_nuts`);
    ``seconds`` then counts both runs, since a user would have run both.

    Every call traces and compiles afresh; ``compile_seconds`` says how much of ``seconds`` that was,
    and ``run_seconds`` is the rest.

    Args:
        data: one dataset (``data.y`` of shape ``[N]``).
        model: name of the shipped model (a key of :data:`MODELS`).
        num_warmup: warmup iterations per chain.
        num_samples: kept draws per chain.
        num_chains: chains (``chain_method`` ``"sequential"`` or ``"vectorized"``).
        seed: PRNG seed.
        reparam: ``"auto"``, ``"none"`` or ``"noncentered"``.
        target_accept: NUTS target acceptance probability.
        max_tree_depth: NUTS maximum tree depth.
        chain_method: how chains run on one device.
        max_rhat: ``ok`` needs a one-element site's R-hat below this, a site of many elements its
            largest below :func:`~amortize.validate.convergence.rhat_threshold` (the same rule as Pyro NUTS).
        min_ess: ``ok`` needs every bulk ESS at least this.

    Raises:
        ConfigError: an unknown model, ``reparam`` or ``chain_method``, or fewer than 4 draws per chain.
        DataError: not one dataset with a response.
    """
    spec = _model(model)
    if reparam not in ("auto", "none", "noncentered"):
        raise ConfigError(f"run_numpyro_nuts: reparam must be 'auto', 'none' or 'noncentered', got {reparam!r}")
    if chain_method not in ("sequential", "vectorized"):
        raise ConfigError(f"run_numpyro_nuts: chain_method must be 'sequential' or 'vectorized', got {chain_method!r}")
    if num_samples < 4:
        raise ConfigError(f"run_numpyro_nuts: num_samples must be at least 4 for split R-hat, got {num_samples}")
    args, sizes, y = model_arrays(data, model)
    settings = (num_warmup, num_samples, num_chains, seed, target_accept, max_tree_depth, chain_method)
    thresholds = (max_rhat, min_ess)
    seconds, compile_s = 0.0, 0.0
    tried: list[NumPyroNUTSResult] = []
    for noncentered in {"none": [False], "noncentered": [True], "auto": [False, True]}[reparam]:
        mcmc = _mcmc(spec, noncentered, sizes, settings)
        with _compile_time() as spent:
            t0 = time.perf_counter()
            mcmc.run(jax.random.PRNGKey(seed), *args, y=y)
            by_chain = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))  # site -> [C, S, *shape]
            seconds += time.perf_counter() - t0
        compile_s += spent[0]
        divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
        res = _result(spec, by_chain, divergences, noncentered, num_chains, thresholds)
        tried.append(res)
        if res.ok:
            break
    best = tried[-1] if tried[-1].ok else min(tried, key=lambda r: (r.divergences, max(r.r_hat.values())))
    best.seconds = seconds
    best.compile_seconds = min(compile_s, seconds)
    return best


def _mcmc(spec: NumPyroModel, noncentered: bool, sizes: dict[str, int], settings: tuple) -> MCMC:
    """An MCMC object for ``spec.fn`` with the group counts fixed (plate sizes are static), called as
    ``mcmc.run(key, *index_arrays, y=y)``; loc-scale latents non-centered when asked."""
    num_warmup, num_samples, num_chains, _, target_accept, max_tree_depth, chain_method = settings
    run_fn = functools.partial(spec.fn, **sizes)
    if noncentered:
        run_fn = handlers.reparam(run_fn, config={name: LocScaleReparam(centered=0.0) for name in spec.loc_scale})
    kernel = NUTS(run_fn, target_accept_prob=target_accept, max_tree_depth=max_tree_depth)
    return MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=False,
    )


def _result(
    spec: NumPyroModel,
    by_chain: Mapping[str, jax.Array],
    divergences: int,
    noncentered: bool,
    num_chains: int,
    thresholds: tuple[float, float],
) -> NumPyroNUTSResult:
    """The model's own sites as torch draws, with R-hat, ESS and the verdict (timings filled in by the caller)."""
    draws = {k: torch.from_numpy(np.array(by_chain[k], dtype=np.float32)) for k in spec.latents}
    r_hat: dict[str, float] = {}
    ess: dict[str, float] = {}
    for name, x in draws.items():
        r_hat[name], ess[name] = worst_diagnostics(x)
    max_rhat, min_ess = thresholds
    sizes = {k: math.prod(v.shape[2:]) for k, v in draws.items()}
    num_draws = next(iter(draws.values())).shape[1]
    ok = checks_passed(
        r_hat,
        ess,
        divergences,
        num_elements=sizes,
        num_chains=num_chains,
        num_draws=num_draws,
        max_rhat=max_rhat,
        min_ess=min_ess,
    )
    return NumPyroNUTSResult(
        samples={k: v.reshape(-1, *v.shape[2:]) for k, v in draws.items()},
        r_hat=r_hat,
        ess_bulk=ess,
        divergences=divergences,
        seconds=0.0,
        compile_seconds=0.0,
        parameterization="noncentered" if noncentered else "none",
        ok=ok,
        num_chains=num_chains,
        r_hat_threshold=rhat_thresholds(sizes, num_chains, num_draws, max_rhat),
    )


def twin_reference(
    model: str,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    target_accept: float = 0.99,
    cache_dir: str | None = None,
) -> Callable[[HierarchicalData, int], NumPyroNUTSResult]:
    """A reference for :func:`amortize.validate.heldout.against_nuts` (``reference=``): NUTS on the
    NumPyro twin of ``model``, ``(data, seed) -> result``, with long warm-up and a high target
    acceptance (the centered funnels of the shipped models); results kept in ``cache_dir`` (None: not
    kept) under the twin's name, the data, the seed and these settings."""
    _model(model)  # an unknown model fails here, not on the first dataset
    settings = {"num_warmup": num_warmup, "num_samples": num_samples, "target_accept": target_accept}

    def run(data: HierarchicalData, seed: int) -> NumPyroNUTSResult:
        return cached_reference(
            lambda: run_numpyro_nuts(data, model, seed=seed, **settings),
            f"numpyro twin {model}",
            data,
            cache_dir,
            settings={**settings, "seed": seed},
            cls=NumPyroNUTSResult,
        )

    return run
