"""Shared tiny models and fixtures; every test starts from cleared Pyro state and fixed seeds."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am


@pytest.fixture(autouse=True)
def _seeded():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    np.random.seed(0)
    yield


def normal_known(data):
    """Conjugate 2-level model with known scales: exact posteriors are Gaussian."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)


@pytest.fixture
def small_sampler():
    return am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))


@pytest.fixture(scope="module")
def amortizer():
    """A briefly trained amortizer of ``normal_known`` (test modules may define their own)."""
    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))
    a = am.Amortizer(normal_known, sampler, hidden=16)
    a.fit(steps=20, batch_size=16, progress=False)
    return a


@pytest.fixture
def small_data(small_sampler):
    d = small_sampler.sample(torch.Generator().manual_seed(1))
    return d.with_response(torch.randn(d.n_obs))


# Tests use tiny networks: one thread avoids thread-pool overhead that dominates such small ops
# (about 50x per training step on a busy 2-core machine).
torch.set_num_threads(1)
