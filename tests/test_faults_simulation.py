"""Dropped simulations change the prior: they are counted per site, logged, carried in the training
history, and more than 1% of them stops training with a TrainingError naming the site and the share."""

from __future__ import annotations

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.errors import TrainingError
from amortize.simulate import DropTally, Simulation

FAST = dict(steps=4, batch_size=8, warmup=1, pilot_structures=1, log_every=1, progress=False)


def bad_above(threshold: float, bad: float, likelihood):
    """A 2-level model whose response's parameter is ``bad`` where ``mu > threshold`` (P = 1 - Phi(threshold))."""

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("group", data.size("group")):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        loc = theta[..., data.index("group")]
        loc = torch.where(mu > threshold, torch.full_like(loc, bad), loc)
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", likelihood(loc), obs=data.y)

    return model


def infinite_above(threshold: float):
    """``normal_known`` whose response is infinite where ``mu > threshold``."""
    return bad_above(threshold, math.inf, lambda loc: dist.Normal(loc, 0.5))


def nan_logit_above(threshold: float):
    """A Bernoulli response whose logit is NaN where ``mu > threshold`` (inf x 0, as an overflowing scale
    gives): torch's Bernoulli sampler raises on it even with argument checks off."""
    return bad_above(threshold, math.nan, lambda logit: dist.Bernoulli(logits=logit))


def test_a_likelihood_that_fails_for_part_of_the_prior_stops_training(small_sampler):
    a = am.Amortizer(infinite_above(1.0), small_sampler, hidden=8)  # 16% of the prior gives y = inf
    with pytest.raises(
        TrainingError, match=r"of \d+ prior-predictive datasets \(\d+\.\d%\) were dropped, most for site 'y'"
    ):
        a.fit(**FAST)
    assert a.drops.dropped["y"] > 0.01 * a.drops.requested


def test_every_response_non_finite_is_a_training_error_not_a_reshape(small_sampler):
    a = am.Amortizer(infinite_above(-math.inf), small_sampler, hidden=8)
    with pytest.raises(TrainingError, match=r"\(100\.0%\) were dropped, most for site 'y' \(a non-finite response"):
        a.fit(**FAST)


def test_rare_drops_are_counted_logged_and_carried_in_the_history(small_sampler, caplog):
    a = am.Amortizer(infinite_above(2.0), small_sampler, hidden=8)  # P = 2.3%: ~6 drops in 250 (none: P = 0.3%)
    a.drops.limit = 0.1  # a rate of 2.3% is far inside 10%: the run must go on
    with caplog.at_level(logging.WARNING, logger="amortize.simulate"):
        a.fit(**{**FAST, "steps": 30})
    assert a.drops.requested >= 30 * 8
    assert a.history[-1]["dropped"] == a.drops.total == a.drops.dropped.get("y", 0)
    assert a.drops.total > 0 and "simulations: dropped" in caplog.text


def test_the_pilot_takes_batches_that_lost_datasets(small_sampler):
    """Pilot batches of 4 datasets, some of which lose one (a non-finite response): the pilot fits on the
    datasets kept (batches of unequal sizes) and training goes on."""
    a = am.Amortizer(infinite_above(1.5), small_sampler, hidden=8, seed=1)  # P = 6.7%: drops among 64 datasets
    a.drops.limit = 0.2  # far above the rate: the run must go on
    a.fit(**{**FAST, "steps": 2, "batch_size": 32, "pilot_structures": 2})
    assert a.step == 2 and a.drops.total > 0 and a.drops.requested >= 64


def test_a_sampler_that_raises_drops_only_the_datasets_that_made_it_raise(small_sampler):
    from amortize.simulate import simulate
    from amortize.structure import trace_structure

    data = small_sampler.sample(torch.Generator().manual_seed(0))
    structure = trace_structure(nan_logit_above(math.inf), data)  # the same sites, traced without a NaN
    model = nan_logit_above(1.0)  # 16% of the prior
    pyro.set_rng_seed(0)
    out = simulate(model, structure, data, 64)
    assert out.requested == 64 and set(out.dropped) == {"y"} and 0 < out.dropped["y"] < 32
    assert out.data.batch_size == 64 - out.dropped["y"] == out.latents["mu"].shape[1]
    assert (out.latents["mu"] <= 1.0).all()  # the datasets kept are the ones whose draws did not raise
    assert "sampling site 'y' raised" in out.error and "Trace Shapes" not in out.error
    with pytest.raises(TrainingError, match=r"\(\d+\.\d%\) were dropped, most for site 'y'"):
        am.Amortizer(model, small_sampler, hidden=8, seed=1).fit(**FAST)  # seed 1: mu <= 1 in its one traced run


def test_a_sampler_that_always_raises_stops_training_naming_its_site_and_error(small_sampler):
    from amortize.simulate import simulate_counted
    from amortize.structure import trace_structure

    data = small_sampler.sample(torch.Generator().manual_seed(0))
    structure = trace_structure(nan_logit_above(math.inf), data)
    tally = DropTally("y", limit=1.0)  # not the share: the second empty batch stops it
    with pytest.raises(
        TrainingError, match=r"in a row was dropped \(site 'y': 16\); sampling site 'y' raised: Expected"
    ):
        simulate_counted(nan_logit_above(-math.inf), structure, data, 8, tally)
    assert tally.requested == 16


def sim(requested: int, dropped: int) -> Simulation:
    data = am.HierarchicalData(["g"], {}, torch.zeros(2, dtype=torch.long), y=torch.zeros(requested - dropped, 2))
    return Simulation(data, {}, requested, {"y": dropped} if dropped else {})


@pytest.mark.parametrize(
    "batches, stops",
    [
        ([(4, 1)], False),  # one unlucky dataset of 4: P(>=1 | 1%) = 4%, not evidence of more than 1%
        ([(4, 3)], True),  # 3 of 4: P(>=3 | 1%) = 4e-6
        ([(1000, 5)] * 10, False),  # 0.5% of 10^4
        ([(1000, 20)] * 10, True),  # 2% of 10^4: 10 sds of the binomial above 1%
        ([(1000, 11)] * 10, False),  # 1.1%: within Monte Carlo doubt of 1%
    ],
)
def test_drop_tally_stops_beyond_one_percent_only(batches, stops):
    tally = DropTally("y")
    raised = False
    try:
        for n, d in batches:
            tally.add(sim(n, d))
    except TrainingError as e:
        raised = True
        assert "site 'y'" in str(e) and "changes the prior" in str(e)
    assert raised == stops
