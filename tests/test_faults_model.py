"""Faults in the user's model, found when it is traced: each raises the exact error class and its
message names the site (or parameter) and what is actually wrong; a checkpoint of another model
(another likelihood family with the same site names) is refused; a response outside the
likelihood's support is refused before any draw."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.errors import CheckpointError, DataError, ModelStructureError
from amortize.structure import trace_structure

FAST = dict(steps=2, batch_size=4, warmup=1, pilot_structures=1, log_every=1, progress=False)


@pytest.fixture
def data(small_sampler):
    d = small_sampler.sample(torch.Generator().manual_seed(0))
    return d.with_response(torch.ones(d.n_obs))


def _two_level(
    likelihood, mixing=False, param=False, deterministic=False, observe=True, plate=True, covariate=None, event=False
):
    """``normal_known`` with the faults the tests switch on."""

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if deterministic:
            pyro.deterministic("mu2", mu**2)
        scale = pyro.param("scale", torch.tensor(1.0)) if param else 1.0
        if plate:
            with pyro.plate("group", data.size("group")):
                theta = pyro.sample("theta", dist.Normal(mu, scale))
        elif event:
            theta = pyro.sample("theta", dist.Normal(mu, 1.0).expand([data.size("group")]).to_event(1))
        else:
            theta = pyro.sample("theta", dist.Normal(mu, 1.0).expand([data.size("group")]))
        loc = theta[..., data.index("group")]
        if covariate:
            loc = loc + data.x[covariate]
        if mixing:
            loc = loc + float(mu.mean())  # one number for every dataset and draw of a batch
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", likelihood(loc), obs=data.y if observe else None)

    return model


def gaussian(loc):
    return dist.Normal(loc, 1.0)


def poisson(loc):
    return dist.Poisson(loc.exp())


def bernoulli(loc):
    return dist.Bernoulli(logits=loc)


def test_batch_unsafe_scalar_conversion_is_named(data):
    with pytest.raises(ModelStructureError, match=r"site 'y'.*mixes datasets.*float\(\.\.\.\)"):
        trace_structure(_two_level(gaussian, mixing=True), data)


def test_param_inside_the_model_is_named(data):
    with pytest.raises(ModelStructureError, match=r"pyro\.param\('scale'\).*never learned"):
        trace_structure(_two_level(gaussian, param=True), data)


def test_deterministic_site_is_allowed_and_not_a_response(small_sampler, data):
    structure = trace_structure(_two_level(gaussian, deterministic=True), data)
    assert structure.response == "y" and [s.name for s in structure.latents] == ["mu", "theta"]
    a = am.Amortizer(_two_level(gaussian, deterministic=True), small_sampler, hidden=8)
    a.fit(**FAST)
    draws = a.posterior(data).sample(5, seed=0)
    assert set(draws) == {"mu", "theta"} and draws["theta"].shape == (5, data.size("group"))


def test_unobserved_response_is_named_as_such(data):
    with pytest.raises(ModelStructureError, match=r"observes nothing: site 'y' .*sampled, not observed.*obs=data\.y"):
        trace_structure(_two_level(gaussian, observe=False), data)


def test_per_group_latent_outside_its_plate_is_named(data):
    with pytest.raises(
        ModelStructureError, match=r"site 'theta' has \d+ values .*outside any plate.*pyro\.plate\('group'"
    ):
        trace_structure(_two_level(gaussian, plate=False), data)


def test_per_group_vector_latent_outside_its_plate_is_named(data):
    with pytest.raises(
        ModelStructureError, match=r"site 'theta' has shape \(5,\) on the data and \(10,\) on data with twice the"
    ):
        trace_structure(_two_level(gaussian, plate=False, event=True), data)


# ---------------------------------------------------------------------------------------------- another model
@pytest.mark.parametrize(
    "trained, loaded, family",
    [
        (poisson, gaussian, "checkpoint Poisson, this model Normal"),
        (bernoulli, poisson, "Bernoulli, this model Poisson"),
    ],
)
def test_checkpoint_of_another_likelihood_is_refused(small_sampler, tmp_path, trained, loaded, family):
    a = am.Amortizer(_two_level(trained), small_sampler, hidden=8)
    a.save(tmp_path / "ck.pt")
    with pytest.raises(
        CheckpointError, match=rf"ck\.pt: checkpoint is for another model \(response_family: .*{family}"
    ):
        am.Amortizer.load(tmp_path / "ck.pt", _two_level(loaded))
    am.Amortizer.load(tmp_path / "ck.pt", _two_level(trained))  # its own model loads


def test_checkpoint_of_a_model_reading_other_covariates_is_refused(tmp_path):
    sampler = am.StructureSampler(["group"], {"group": (3, 8)}, (2, 6), covariates={"obs": {"x": {}}})
    am.Amortizer(_two_level(gaussian, covariate="x"), sampler, hidden=8).save(tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=r"covariates: checkpoint \{'obs': \['x'\]\}, this model \{\}"):
        am.Amortizer.load(tmp_path / "ck.pt", _two_level(gaussian))


def test_signature_covers_plates_and_covariates(small_sampler, data):
    base = trace_structure(_two_level(gaussian), data).signature()
    with_x = am.HierarchicalData(data.levels, data.parents, data.group, data.y, covariates={"obs": {"x": data.y}})
    assert trace_structure(_two_level(gaussian), with_x).signature()["covariates"] == {}  # x is there, not read
    slope = _two_level(lambda loc: dist.Normal(loc, 1.0), covariate="x")
    assert trace_structure(slope, with_x).signature()["covariates"] == {"obs": ["x"]}

    def renamed_rows(d):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("group", d.size("group")):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("rows", d.n_obs):
            pyro.sample("y", dist.Normal(theta[..., d.index("group")], 1.0), obs=d.y)

    other = trace_structure(renamed_rows, data).signature()
    assert base["plates"] == [["group", -1], ["obs", -1]] and other["plates"] == [["group", -1], ["rows", -1]]


# ---------------------------------------------------------------------------------------------- response support
@pytest.mark.parametrize(
    "likelihood, bad, support",
    [(poisson, -1.0, "integers >= 0"), (poisson, 2.5, "integers >= 0"), (bernoulli, 0.5, r"\{0, 1\}")],
)
def test_response_outside_the_support_is_refused(small_sampler, data, likelihood, bad, support):
    a = am.Amortizer(_two_level(likelihood), small_sampler, hidden=8)
    y = torch.ones(data.n_obs)
    y[3] = bad
    with pytest.raises(
        DataError,
        match=rf"response 'y': 1 value\(s\) outside the support of site 'y' .*{support}.*first at row 3 \({bad:g}\)$",
    ):
        a.posterior(data.with_response(y))
    a.posterior(data.with_response(torch.ones(data.n_obs)))  # inside the support: accepted


def test_response_support_check_names_the_dataset_of_a_batch(small_sampler, data):
    structure = trace_structure(_two_level(poisson), data)
    y = torch.ones(3, data.n_obs)
    y[2, 1] = -2.0
    with pytest.raises(DataError, match=r"first at dataset 2 row 1 \(-2\)$"):
        structure.check_response(data.with_response(y))
