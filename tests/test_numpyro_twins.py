"""The NumPyro versions of the GLM, contextual, varying-slopes and 4-level models: same log joint as Pyro.

Skipped when numpyro is not installed: ``pip install 'amortize[bench]'``.
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

import amortize.models as models

pytest.importorskip("numpyro")
pytest.importorskip("jax")

import numpyro_models as nm  # noqa: E402

TWINS = [
    "poisson_3level",
    "logistic_2level",
    "logistic_3level",
    "gaussian_contextual",
    "varying_slopes",
    "gaussian_4level",
]


def _simulate(name: str, seed: int):
    """A dataset of the model's training structures, with latents and response drawn from the Pyro prior."""
    model = getattr(models, name)
    data = models.SAMPLERS[name]().sample(torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    trace = poutine.trace(model).get_trace(data.with_response(None))
    latents = nm.MODELS[name].latents
    values = {site: trace.nodes[site]["value"].detach() for site in latents}
    sites = [s for s, n in trace.nodes.items() if n["type"] == "sample" and not site_is_subsample(n)]
    (obs,) = [s for s in sites if s not in latents]
    return model, data.with_response(trace.nodes[obs]["value"].detach()), values


def _pyro_log_joint(model, values: dict[str, torch.Tensor], data) -> float:
    return float(poutine.trace(poutine.condition(model, data=values)).get_trace(data).log_prob_sum())


def _moved(site: str, value: torch.Tensor) -> torch.Tensor:
    """A nearby value in the site's support (scales doubled: at a prior draw a scale sits near the mode
    of its children's density, where a small relative move changes the log joint only to second order)."""
    if site == "corr_chol":  # another 2x2 correlation Cholesky factor: shift the correlation by 0.2
        r = float(value[1, 0])
        r = r - 0.2 if r > 0 else r + 0.2
        return torch.tensor([[1.0, 0.0], [r, math.sqrt(1.0 - r * r)]])
    if site.startswith(("tau", "sigma")) or site in ("county_effect_scale", "log_radon_scale"):
        return value * 2.0
    return value + 0.2


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", TWINS)
def test_numpyro_twin_log_density_equals_pyro_log_joint(name, seed):
    model, data, values = _simulate(name, seed)
    spec = nm.MODELS[name]
    assert spec.levels == tuple(data.levels)
    assert set(spec.loc_scale) <= set(spec.latents)
    lp_pyro = _pyro_log_joint(model, values, data)
    lp_numpyro = nm.log_density(values, data, name)
    assert math.isfinite(lp_pyro)
    tol = 1e-5 * abs(lp_pyro) + 1e-3
    assert abs(lp_numpyro - lp_pyro) <= tol, (lp_numpyro, lp_pyro)
    for site, value in values.items():  # the check could fail: moving any one latent moves the density far more
        nudged = {**values, site: _moved(site, value)}
        assert abs(nm.log_density(nudged, data, name) - lp_pyro) > 10 * tol, site
        lp_nudged = _pyro_log_joint(model, nudged, data)  # and the two still agree off the prior draw
        assert abs(nm.log_density(nudged, data, name) - lp_nudged) <= 1e-5 * abs(lp_nudged) + 1e-3, site


@pytest.mark.parametrize("name", TWINS)
def test_numpyro_twin_noncentered_sites_keep_their_shapes(name):
    """The loc-scale sites non-centering decenters are Normal: the reparameterized model runs and
    rebuilds every latent with the Pyro site's shape."""
    from functools import partial

    from numpyro import handlers
    from numpyro.infer.reparam import LocScaleReparam

    _, data, values = _simulate(name, 0)
    spec = nm.MODELS[name]
    args, sizes, y = nm.model_arrays(data, name)
    config = {site: LocScaleReparam(centered=0.0) for site in spec.loc_scale}
    fn = handlers.seed(handlers.reparam(partial(spec.fn, **sizes), config=config), 0)
    trace = handlers.trace(fn).get_trace(*args, y=y)
    for site in spec.loc_scale:
        assert f"{site}_decentered" in trace, site
    for site, value in values.items():
        assert tuple(trace[site]["value"].shape) == tuple(value.shape), site


def test_numpyro_twin_nuts_smoke_run_has_the_pyro_shapes():
    name = "gaussian_contextual"
    _, data, values = _simulate(name, 0)
    res = nm.run_numpyro_nuts(data, name, num_warmup=100, num_samples=100, num_chains=1, seed=0, reparam="none")
    assert set(res.samples) == set(values)
    for site, value in values.items():
        assert tuple(res.samples[site].shape) == (100, *value.shape), site
        assert torch.isfinite(res.samples[site]).all(), site


def test_twin_reference_refuses_a_model_without_a_twin():
    from amortize.errors import ConfigError

    with pytest.raises(ConfigError, match="eight_schools"):
        nm.twin_reference("eight_schools")
    assert callable(nm.twin_reference("gaussian_4level"))


def _crossed_models():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "models" / "crossed.py"
    spec = importlib.util.spec_from_file_location("crossed_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["crossed_gaussian", "crossed_bernoulli"])
def test_crossed_twin_log_density_equals_pyro_log_joint(name):
    crossed = _crossed_models()
    model = getattr(crossed, name)
    data = crossed.grid_design(7, 5, share=0.7, seed=2)
    torch.manual_seed(3)
    trace = poutine.trace(model).get_trace(data)
    latents = nm.MODELS[name].latents
    values = {s: trace.nodes[s]["value"].detach() for s in latents}
    data = data.with_response(trace.nodes["y"]["value"].detach())
    lp_pyro = _pyro_log_joint(model, values, data)
    tol = 1e-5 * abs(lp_pyro) + 1e-3
    assert abs(nm.log_density(values, data, name) - lp_pyro) <= tol
    nudged = {**values, "b": values["b"] + 0.2}  # an item effect moved: the density moves far more
    assert abs(nm.log_density(nudged, data, name) - lp_pyro) > 10 * tol
