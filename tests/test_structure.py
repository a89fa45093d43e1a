import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize import ModelStructureError
from amortize.models import SAMPLERS, gaussian_3level

from .conftest import normal_known


def test_trace_levels_supports_and_shapes():
    data = SAMPLERS["gaussian_3level"]().sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(gaussian_3level, data)
    assert [(s.name, s.level) for s in st.latents] == [
        ("mu", None),
        ("tau_district", None),
        ("tau_school", None),
        ("sigma", None),
        ("alpha", "district"),
        ("beta", "school"),
    ]
    assert st.response == "y" and st.global_dim == 4 and st.max_plate_nesting == 1
    tau = st["tau_school"]
    u = torch.tensor([-1.0, 0.0, 2.0])
    value, ladj = tau.constrain(u.unsqueeze(-1))
    assert torch.all(value > 0) and torch.allclose(tau.unconstrain(value), u.unsqueeze(-1), atol=1e-6)
    assert torch.allclose(ladj, u)  # exp: log|d exp(u)/du| = u


def test_vector_site_and_simplex_dims(small_data):
    def model(data):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
        with pyro.plate("group", data.size("group")):
            b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("obs", data.n_obs):
            loc = b[..., data.index("group"), 0] + w[..., 0]
            pyro.sample("y", dist.Normal(loc, 1.0), obs=data.y)

    st = am.trace_structure(model, small_data)
    assert st["w"].dim == 2 and st["w"].event_shape == (3,)
    assert st["b"].dim == 2 and st["b"].level == "group"


def test_model_without_plates(small_data):
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0).expand([data.n_obs]).to_event(1), obs=data.y)

    with pytest.raises(ModelStructureError, match="no pyro.plate"):
        am.trace_structure(model, small_data)


def test_plate_not_a_level(small_data):
    def model(data):
        with pyro.plate("county", data.size("group")):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(theta[..., data.index("group")], 1.0), obs=data.y)

    with pytest.raises(ModelStructureError, match="site 'theta' is in plate 'county', which is not a level"):
        am.trace_structure(model, small_data)


def test_plate_size_mismatch_and_discrete(small_data):
    def wrong_size(data):
        with pyro.plate("group", data.size("group") + 1):
            pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=data.y)

    with pytest.raises(ModelStructureError, match="plate 'group' has size"):
        am.trace_structure(wrong_size, small_data)

    def discrete(data):
        with pyro.plate("group", data.size("group")):
            pyro.sample("z", dist.Bernoulli(0.5))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=data.y)

    with pytest.raises(ModelStructureError, match="site 'z': discrete latent"):
        am.trace_structure(discrete, small_data)


def test_batch_unsafe_gather_is_named(small_data):
    def unsafe(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("group", data.size("group")):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(theta[data.index("group")], 1.0), obs=data.y)  # not theta[..., idx]

    with pytest.raises(ModelStructureError, match=r"theta\[\.\.\., data.index"):
        am.trace_structure(unsafe, small_data)


def test_model_errors_are_wrapped(small_data):
    def broken(data):
        raise KeyError("x")

    with pytest.raises(ModelStructureError, match="the model failed on the data: KeyError"):
        am.trace_structure(broken, small_data)


def test_simulate_shapes(small_sampler):
    data = small_sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(normal_known, data)
    sim = am.simulate(normal_known, st, data, 5)
    assert sim.data.y.shape == (5, data.n_obs)
    assert sim.latents["mu"].shape == (1, 5, 1) and sim.latents["theta"].shape == (1, 5, data.size("group"))


def test_positive_sites_never_constrain_to_zero():
    def m(data):
        pyro.sample("tau", dist.HalfCauchy(5.0))
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("group", data.size("group")):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=data.y)

    d = am.HierarchicalData(["group"], {}, group=[0, 1], y=torch.zeros(2))
    st = am.structure.trace_structure(m, d)
    for name in ("tau", "s"):
        value, ladj = st[name].constrain(torch.tensor([[-200.0]]))
        assert float(value) > 0 and float(ladj) == -200.0
        value, _ = st[name].constrain(torch.tensor([[200.0]]))
        assert torch.isfinite(value).all()


def test_simulation_drops_draws_on_the_edge_of_a_support():
    """A HalfNormal(1e-44) scale underflows to exactly 0 in float32 on some draws (a HalfNormal(1) draw
    did once in training): the model's Normal would refuse it and end training; simulate drops those
    datasets and keeps the rest."""

    def edgy(data):
        s = pyro.sample("s", dist.HalfNormal(1e-44))
        with pyro.plate("group", data.size("group")):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(theta[..., data.index("group")], s), obs=data.y)

    sampler = am.StructureSampler(["group"], groups={"group": (3, 3)}, obs=(2, 2))
    data = sampler.sample(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with pyro.validation_enabled(False):
        structure = am.structure.trace_structure(edgy, data.with_response(torch.zeros(data.n_obs)))
    sim = am.simulate(edgy, structure, data, 400)
    kept = sim.data.batch_size
    assert 0 < kept < 400  # some draws were exactly 0 and were dropped, not raised on
    assert bool((sim.latents["s"] > 0).all())
