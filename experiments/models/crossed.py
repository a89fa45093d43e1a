"""Crossed random-effects models (persons x items), written as a user would write them, and their designs.

Each is a plain Pyro model for ONE dataset with one ``pyro.plate`` per grouping factor; a row reads its
person's and its item's latents with ``[..., data.index("person")]`` and ``[..., data.index("item")]``.

* :func:`crossed_gaussian`: ``y ~ N(mu + a_person + b_item + beta x, sigma)``, lme4's
  ``y ~ x + (1 | person) + (1 | item)``;
* :func:`crossed_bernoulli`: the same on the logit scale, 0/1 responses;
* :func:`irt_2pl`: the two-parameter logistic IRT model of stan-dev/stat_comp_benchmarks (item
  discrimination ``a`` and difficulty ``b`` per item, ability ``theta`` per person), against its external
  reference (``experiments/data/reference/stat_comp_benchmarks/irt_2pl``).

Designs: :func:`grid_design` (every person meets a random share of the items, a row covariate),
:func:`irt_2pl_data` (the reference's 20 items x 100 persons).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from amortize import HierarchicalData

__all__ = ["crossed_gaussian", "crossed_bernoulli", "irt_2pl", "grid_design", "irt_2pl_data", "IRT_REFERENCE"]

IRT_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "stat_comp_benchmarks" / "irt_2pl"


def crossed_gaussian(data: HierarchicalData) -> None:
    """Person and item intercepts and a row covariate, Gaussian noise."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    tau_p = pyro.sample("tau_person", dist.HalfNormal(1.0))
    tau_i = pyro.sample("tau_item", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("person", data.size("person")):
        a = pyro.sample("a", dist.Normal(0.0, tau_p))
    with pyro.plate("item", data.size("item")):
        b = pyro.sample("b", dist.Normal(0.0, tau_i))
    with pyro.plate("obs", data.n_obs):
        loc = mu + a[..., data.index("person")] + b[..., data.index("item")] + beta * data.x["x"]
        pyro.sample("y", dist.Normal(loc, sigma), obs=data.y)


def crossed_bernoulli(data: HierarchicalData) -> None:
    """Person and item intercepts and a row covariate on the logit scale, 0/1 responses."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.5))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    tau_p = pyro.sample("tau_person", dist.HalfNormal(1.0))
    tau_i = pyro.sample("tau_item", dist.HalfNormal(1.0))
    with pyro.plate("person", data.size("person")):
        a = pyro.sample("a", dist.Normal(0.0, tau_p))
    with pyro.plate("item", data.size("item")):
        b = pyro.sample("b", dist.Normal(0.0, tau_i))
    with pyro.plate("obs", data.n_obs):
        logit = mu + a[..., data.index("person")] + b[..., data.index("item")] + beta * data.x["x"]
        pyro.sample("y", dist.Bernoulli(logits=logit), obs=data.y)


def irt_2pl(data: HierarchicalData) -> None:
    """stat_comp_benchmarks ``irt_2pl``: sigma_theta, sigma_a, sigma_b ~ HalfCauchy(2), mu_b ~ N(0, 5);
    theta_person ~ N(0, sigma_theta); a_item ~ LogNormal(0, sigma_a), b_item ~ N(mu_b, sigma_b);
    y ~ Bernoulli(logit = a_item (theta_person - b_item))."""
    sigma_theta = pyro.sample("sigma_theta", dist.HalfCauchy(2.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfCauchy(2.0))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 5.0))
    sigma_b = pyro.sample("sigma_b", dist.HalfCauchy(2.0))
    with pyro.plate("person", data.size("person")):
        theta = pyro.sample("theta", dist.Normal(0.0, sigma_theta))
    with pyro.plate("item", data.size("item")):
        a = pyro.sample("a", dist.LogNormal(0.0, sigma_a))
        b = pyro.sample("b", dist.Normal(mu_b, sigma_b))
    with pyro.plate("obs", data.n_obs):
        item = data.index("item")
        logit = a[..., item] * (theta[..., data.index("person")] - b[..., item])
        pyro.sample("y", dist.Bernoulli(logits=logit), obs=data.y)


def grid_design(
    persons: int, items: int, share: float = 1.0, seed: int = 0, covariate: bool = True
) -> HierarchicalData:
    """Persons crossed with items: each (person, item) pair is a row with probability ``share`` (every
    person and item keeps at least one), a standard normal row covariate ``x``; no response."""
    g = torch.Generator().manual_seed(seed)
    p, i = torch.meshgrid(torch.arange(persons), torch.arange(items), indexing="ij")
    p, i = p.flatten(), i.flatten()
    if share < 1.0:
        keep = torch.rand(len(p), generator=g) < share
        keep[torch.arange(persons) * items + torch.arange(persons) % items] = True  # person r meets item r % items
        keep[(torch.arange(items) % persons) * items + torch.arange(items)] = True  # item c meets person c % persons
        p, i = p[keep], i[keep]
    cov = {"obs": {"x": torch.randn(len(p), generator=g)}} if covariate else None
    return HierarchicalData(
        ["person", "item"], {}, {"person": p, "item": i}, covariates=cov, factors=[["person"], ["item"]]
    )


def irt_2pl_data() -> tuple[HierarchicalData, dict[str, tuple[float, float]]]:
    """The reference design (20 items x 100 persons, long format: one row per person and item) with its
    response, and the reference ``{parameter: (mean, sd)}`` (``theta[1]`` ... 1-based, as Stan names them)."""
    raw = json.loads((IRT_REFERENCE / "irt_2pl.data.json").read_text())
    y = torch.tensor(raw["y"], dtype=torch.get_default_dtype())  # [I, J]
    n_items, n_persons = y.shape
    item, person = torch.meshgrid(torch.arange(n_items), torch.arange(n_persons), indexing="ij")
    data = HierarchicalData(
        ["person", "item"],
        {},
        {"person": person.flatten(), "item": item.flatten()},
        y=y.flatten(),
        response="y",
        factors=[["person"], ["item"]],
    )
    ref = {}
    for line in (IRT_REFERENCE / "irt_2pl.params").read_text().splitlines():
        if line.strip():
            name, mean, sd = line.split()
            ref[name] = (float(mean), float(sd))
    return data, ref
