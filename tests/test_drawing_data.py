"""drawing_data (amortize/structure.py): the skeleton or the full data, decided for each dataset."""

import pyro
import pyro.distributions as dist
import torch

import amortize as am
from amortize.structure import drawing_data


def prior_at_row_means(data):
    """Group prior centred on each group's mean of a row covariate: it needs every row, unless each
    group has one row (then the skeleton is the data)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    xbar = torch.zeros(data.size("group")).index_add_(0, data.index("group"), data.x["x"]) / data.counts("group")
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu + xbar, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)


def dataset(rows, seed):
    sampler = am.StructureSampler(
        ["group"], groups={"group": (5, 5)}, obs=rows, covariates={"obs": {"x": {"dist": "normal"}}}
    )
    gen = torch.Generator().manual_seed(seed)
    d = sampler.sample(gen)
    return d.with_response(torch.randn(d.n_obs, generator=gen))


def test_each_dataset_gets_its_own_decision():
    """Same model, same levels and covariate names: one row per group -> the skeleton; several rows
    per group -> the full data (a decision cached from the first dataset gave the skeleton to both,
    so the second dataset's priors were centred on its first rows' covariates)."""
    one_row, many_rows = dataset((1, 1), 0), dataset((4, 6), 1)
    assert one_row.structure_signature() == many_rows.structure_signature()
    first = drawing_data(prior_at_row_means, one_row)
    assert first.n_obs == one_row.size("group") == one_row.n_obs
    assert drawing_data(prior_at_row_means, many_rows) is many_rows
    assert drawing_data(prior_at_row_means, dataset((1, 1), 2)).n_obs == 5  # and back again


def test_a_model_whose_priors_ignore_rows_draws_on_the_skeleton():
    def rows_free(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("group", data.size("group")):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)

    many_rows = dataset((4, 6), 3)
    skeleton = drawing_data(rows_free, many_rows)
    assert skeleton.n_obs == many_rows.size("group") < many_rows.n_obs
