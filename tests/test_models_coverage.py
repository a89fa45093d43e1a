"""Model coverage (issue 6): the models of amortize.models.glm need no per-model code in the library.

For each model: the traced structure (levels, supports, event shapes), prior simulation from its
sampler, finite importance weights, a short NPE training that must lower the held-out NPE loss, and
posterior draws of the right shapes; plus the exact Gaussian product for a MultivariateNormal prior.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import amortize as am
import amortize.models as models
from amortize.guide import AmortizedGuide, gaussian_product
from amortize.models import SAMPLERS
from amortize.objectives import log_weights

FOUR = ("state", "district", "school", "classroom")
MODELS = ["poisson_3level", "logistic_3level", "gaussian_contextual", "varying_slopes", "gaussian_4level"]

# site -> (level, event shape, support name, unconstrained dim), in the model's order
EXPECTED = {
    "poisson_3level": {
        "mu": (None, (), "Real()", 1),
        "tau_nation": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "tau_region": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "tau_county": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "a_nation": ("nation", (), "Real()", 1),
        "a_region": ("region", (), "Real()", 1),
        "a_county": ("county", (), "Real()", 1),
    },
    "logistic_3level": {
        "mu": (None, (), "Real()", 1),
        "beta": (None, (3,), "IndependentConstraint(Real(), 1)", 3),
        "tau_community": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "tau_mother": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "a_community": ("community", (), "Real()", 1),
        "a_mother": ("mother", (), "Real()", 1),
    },
    "gaussian_contextual": {
        "county_effect_mean": (None, (), "Real()", 1),
        "county_effect_scale": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "weight": (None, (3,), "IndependentConstraint(Real(), 1)", 3),
        "log_radon_scale": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "county_effect": ("county", (), "Real()", 1),
    },
    "varying_slopes": {
        "mu": (None, (2,), "IndependentConstraint(Real(), 1)", 2),
        "tau": (None, (2,), "IndependentConstraint(GreaterThanEq(lower_bound=0.0), 1)", 2),
        "corr_chol": (None, (2, 2), "CorrCholesky()", 1),
        "sigma": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        "b": ("group", (2,), "IndependentConstraint(Real(), 1)", 2),
    },
    "gaussian_4level": {
        "mu": (None, (), "Real()", 1),
        **{f"tau_{lvl}": (None, (), "GreaterThanEq(lower_bound=0.0)", 1) for lvl in FOUR},
        "sigma": (None, (), "GreaterThanEq(lower_bound=0.0)", 1),
        **{f"a_{lvl}": (lvl, (), "Real()", 1) for lvl in FOUR},
    },
}
LEVELS = {  # levels and response site
    "poisson_3level": (("nation", "region", "county"), "y"),
    "logistic_3level": (("community", "mother"), "y"),
    "gaussian_contextual": (("county",), "log_radon"),
    "varying_slopes": (("group",), "y"),
    "gaussian_4level": (FOUR, "y"),
}


def structure_of(name: str, seed: int = 0) -> tuple[am.HierarchicalData, am.ModelStructure]:
    data = SAMPLERS[name]().sample(torch.Generator().manual_seed(seed))
    return data, am.trace_structure(getattr(models, name), data)


def npe_loss(a: am.Amortizer, sims: list) -> float:
    """Held-out NPE loss per latent coordinate, as training computes it."""
    st, total = a.structure, 0.0
    with torch.no_grad():
        for sim in sims:
            n = st.global_dim + sum(s.dim * sim.data.size(s.level) for s in st.latents if s.level)
            _, log_q, _ = log_weights(a.guide, sim.data, 1, truth=sim.latents)
            total += float(-log_q.mean()) / n
    return total / len(sims)


@pytest.fixture(scope="module")
def fitted():
    """name -> (amortizer after 150 NPE steps, held-out loss before, after); trained once per module."""
    cache: dict[str, tuple[am.Amortizer, float, float]] = {}

    def get(name: str) -> tuple[am.Amortizer, float, float]:
        if name not in cache:
            a = am.Amortizer(getattr(models, name), SAMPLERS[name](), hidden=32, seed=0)
            opts = dict(steps=150, batch_size=16, pilot_structures=4, progress=False)
            a.fit(stop_at=0, **opts)  # fits the scalers only: the untrained baseline
            held_out = [a.simulate_batch(torch.Generator().manual_seed(100 + i), 32) for i in range(3)]
            before = npe_loss(a, held_out)
            a.fit(**opts)
            cache[name] = (a, before, npe_loss(a, held_out))
        return cache[name]

    return get


def test_every_model_is_shipped_with_a_sampler():
    for name in MODELS:
        assert name in models.__all__ and name in SAMPLERS
    assert models.gaussian_contextual is models.radon.radon_contextual_effects  # reused, not copied


@pytest.mark.parametrize("name", MODELS)
def test_structure_levels_supports_and_event_shapes(name):
    data, st = structure_of(name)
    assert (st.levels, st.response) == LEVELS[name]
    got = {s.name: (s.level, tuple(s.event_shape), str(s.support), s.dim) for s in st.latents}
    assert got == EXPECTED[name]
    assert list(got) == list(EXPECTED[name])  # the model's order


def test_corr_cholesky_goes_through_its_bijection():
    _, st = structure_of("varying_slopes")
    site = st["corr_chol"]
    u = torch.tensor([[-3.0], [0.0], [0.7], [4.0]])
    L, ladj = site.constrain(u)
    assert L.shape == (4, 2, 2) and constraints.corr_cholesky.check(L).all()
    assert torch.allclose(L.pow(2).sum(-1), torch.ones(4, 2), atol=1e-6)  # unit rows: a correlation matrix
    assert torch.allclose(L[:, 1, 0], torch.tanh(u[:, 0]), atol=1e-6)  # 2x2: the correlation is tanh(u)
    assert torch.allclose(site.unconstrain(L), u, atol=1e-4)
    assert torch.allclose(ladj, site.transform.log_abs_det_jacobian(u, L))


@pytest.mark.parametrize("name", MODELS)
def test_simulation_from_the_sampler(name):
    data, st = structure_of(name, seed=3)
    sim = am.simulate(getattr(models, name), st, data, 6)
    y = sim.data.y
    assert y.shape[1] == data.n_obs and y.shape[0] >= 5 and torch.isfinite(y).all()
    if name == "poisson_3level":
        assert (y >= 0).all() and (y == y.round()).all() and y.max() > 0
    if name == "logistic_3level":
        assert set(y.unique().tolist()) == {0.0, 1.0}
    for s in st.latents:
        v = sim.latents[s.name]
        assert v.shape[:2] == (1, y.shape[0]) and torch.isfinite(v).all()
        assert s.support.check(v).all(), s.name
    if name == "gaussian_4level":  # ragged at every level: children per parent vary
        for lvl in data.levels[1:]:
            assert len(torch.bincount(data.parent_index(lvl)).unique()) > 1, lvl
        assert len(data.counts("classroom").unique()) > 1


@pytest.mark.parametrize("name", MODELS)
def test_log_weights_are_finite_and_scoring_matches_sampling(name):
    data, st = structure_of(name, seed=1)
    sim = am.simulate(getattr(models, name), st, data, 3)
    guide = AmortizedGuide(getattr(models, name), st, {k: sorted(v) for k, v in data.covariates.items()}, hidden=16)
    with torch.no_grad():
        log_p, log_q, values = log_weights(guide, sim.data, 4)
        _, log_q2, _ = log_weights(guide, sim.data, 4, truth={s.name: values[s.name] for s in st.latents})
    assert log_p.shape == log_q.shape == (4, sim.data.y.shape[0])
    assert torch.isfinite(log_p).all() and torch.isfinite(log_q).all()
    assert torch.allclose(log_q, log_q2, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_short_npe_training_lowers_the_held_out_loss(fitted, name):
    _, before, after = fitted(name)
    assert after < before - 0.03, (before, after)  # measured: improvements of 0.08 to 0.36 nats per coordinate


@pytest.mark.parametrize("name", MODELS)
def test_posterior_draws_have_each_site_shape(fitted, name):
    a, _, _ = fitted(name)
    data = SAMPLERS[name]().sample(torch.Generator().manual_seed(7))
    sim = am.simulate(a.model, a.structure, data, 1)
    draws = a.posterior(data.with_response(sim.data.y[0])).sample(5, seed=0)
    assert set(draws) == {s.name for s in a.structure.latents}
    for s in a.structure.latents:
        group = () if s.level is None else (data.size(s.level),)
        assert draws[s.name].shape == (5, *group, *s.event_shape), s.name
        assert torch.isfinite(draws[s.name]).all() and s.support.check(draws[s.name]).all(), s.name


def test_mvn_prior_product_is_exact():
    """N(m0, S0) x N(m, diag(s^2)) against the direct formula, with broadcasting batch shapes."""
    torch.manual_seed(0)
    dt = torch.float64
    A = torch.randn(3, 4, 2, 2, dtype=dt)
    cov0 = A @ A.mT + 0.1 * torch.eye(2, dtype=dt)
    m0 = torch.randn(3, 4, 2, dtype=dt)
    m, s = torch.randn(4, 2, dtype=dt), torch.rand(4, 2, dtype=dt) + 0.2
    q = gaussian_product(m0, torch.linalg.cholesky(cov0), m, s)
    prec0 = torch.linalg.inv(cov0)
    cov = torch.linalg.inv(prec0 + torch.diag_embed(s**-2))
    mean = (cov @ (prec0 @ m0.unsqueeze(-1) + (m / s**2).unsqueeze(-1))).squeeze(-1)
    assert q.batch_shape == (3, 4) and q.event_shape == (2,)
    assert torch.allclose(q.covariance_matrix, cov, atol=1e-12)
    assert torch.allclose(q.loc, mean, atol=1e-12)
    # a near-singular prior (group scale 1e-6, float32) stays finite: the posterior is the prior
    L0 = 1e-6 * torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    q = gaussian_product(torch.ones(2), L0, torch.zeros(2), torch.ones(2))
    assert torch.isfinite(q.scale_tril).all()
    assert torch.allclose(q.loc, torch.ones(2)) and torch.allclose(q.covariance_matrix, L0 @ L0.T, rtol=1e-4)


def test_guide_uses_the_full_mvn_product_for_varying_slopes():
    """The guide's q at the MVN site b is the model's conditional prior (given the sampled globals)
    times the group's learned data term, with full covariance."""
    data, st = structure_of("varying_slopes")
    sim = am.simulate(models.varying_slopes, st, data, 2)
    guide = AmortizedGuide(models.varying_slopes, st, {"obs": ["x"]}, hidden=16).eval()
    with torch.no_grad():
        guide(sim.data, 3)
        _, guide_trace = guide.get_traces()
        q, prior = guide_trace.nodes["b"]["fn"], guide_trace.nodes["b"]["infer"]["prior"]
        m, s, _ = guide.encode(sim.data)["terms"]["b"]  # data term [B, G, 2], once per group
    assert isinstance(q, dist.MultivariateNormal) and q.batch_shape == (3, 2, data.size("group"))
    cov0, m0 = prior.covariance_matrix.double(), prior.loc.double()
    prec0 = torch.linalg.inv(cov0)
    s2 = s.double().pow(2)
    cov = torch.linalg.inv(prec0 + torch.diag_embed(1 / s2))
    mean = (cov @ (prec0 @ m0.unsqueeze(-1) + (m.double() / s2).unsqueeze(-1))).squeeze(-1)
    assert torch.allclose(q.covariance_matrix.double(), cov, rtol=1e-3, atol=1e-6)
    assert torch.allclose(q.loc.double(), mean, rtol=1e-3, atol=1e-4)
    assert q.covariance_matrix[..., 0, 1].abs().max() > 1e-3  # correlated: not a diagonal approximation
