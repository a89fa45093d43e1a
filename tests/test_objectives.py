"""amortize/objectives.py: log weights through Pyro's compute_log_prob (masks and scales honoured), losses."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

import amortize as am
from amortize.errors import ConfigError
from amortize.guide import AmortizedGuide
from amortize.objectives import batch_loss, log_weights
from amortize.structure import batched


def masked_model(data):
    """Every third row and every second group's effect masked out; the group effects scaled by 2."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    G = data.size("group")
    with pyro.plate("group", G), poutine.mask(mask=torch.arange(G) % 2 == 0), poutine.scale(scale=2.0):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs), poutine.mask(mask=torch.arange(data.n_obs) % 3 != 0):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 1.0), obs=data.y)


def unmasked_sum(trace):
    """The 0.2 sum: each site's log_prob times its scale, masks ignored."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + float((site["fn"].log_prob(site["value"]) * site["scale"]).sum())
    return total


def setup(small_sampler, model, B=3):
    data = small_sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(model, data)
    sim = am.simulate(model, st, data, B)
    return st, sim, AmortizedGuide(model, st, {}, hidden=16)


def test_masked_and_scaled_model_gives_trace_elbo_exactly(small_sampler):
    """With poutine.mask and poutine.scale in the model, -sum(log p - log q) is Pyro's Trace_ELBO loss
    on the same draws; the mask-blind sum of 0.2 is not."""
    st, sim, guide = setup(small_sampler, masked_model)
    model = batched(masked_model, st.max_plate_nesting)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(max_plate_nesting=st.max_plate_nesting + 2).loss(model, guide, sim.data, 2)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_p, log_q, _ = log_weights(guide, sim.data, 2)
    assert log_p.shape == log_q.shape == (2, 3)
    ours = float(-(log_p - log_q).sum())
    assert abs(loss - ours) < 1e-4 * max(1.0, abs(loss))
    model_trace, guide_trace = guide.get_traces()
    blind = -(unmasked_sum(model_trace) - unmasked_sum(guide_trace))
    assert abs(blind - loss) > 1.0  # the masks matter in this example


def test_masked_rows_do_not_change_the_weights(small_sampler):
    """Changing the response of a masked row leaves log p unchanged; changing a kept row does not (the
    same draws: q encoded once from the original data)."""
    st, sim, guide = setup(small_sampler, masked_model, B=1)
    data = sim.data
    y = data.y.clone()
    with torch.no_grad():
        encoded = guide.encode(data)

    def log_p_for(yy):
        with torch.no_grad():
            torch.manual_seed(0)
            return log_weights(guide, data.with_response(yy), 2, encoded=encoded)[0]

    base = log_p_for(y)
    masked, kept = y.clone(), y.clone()
    masked[..., 0] += 100.0  # row 0: 0 % 3 == 0, masked
    kept[..., 1] += 100.0
    assert torch.equal(log_p_for(masked), base)
    assert float((base - log_p_for(kept)).min()) > 100.0


def test_losses_per_coordinate(small_sampler):
    """NPE is -log q(truth) per coordinate; on the same draws the IW bound is at least the ELBO."""
    st, sim, guide = setup(small_sampler, masked_model)
    amortizer = type("A", (), {"guide": guide})()
    n = st.global_dim + sim.data.size("group")
    with torch.no_grad():
        npe = batch_loss(amortizer, am.TrainConfig(objective="npe"), sim)
        _, log_q, _ = log_weights(guide, sim.data, 1, truth=sim.latents)
        assert math.isclose(float(npe), float(-log_q.mean()) / n, rel_tol=1e-6)
        losses = {}
        for objective in ("elbo", "iwae"):
            torch.manual_seed(1)
            losses[objective] = float(batch_loss(amortizer, am.TrainConfig(objective=objective, num_particles=6), sim))
    assert losses["iwae"] < losses["elbo"]  # Jensen on the same six draws
    cfg = am.TrainConfig()
    cfg.objective = "kl"
    with pytest.raises(ConfigError, match="objective: 'kl'"):
        batch_loss(amortizer, cfg, sim)
