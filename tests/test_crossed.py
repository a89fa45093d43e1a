"""Crossed grouping factors (persons x items): data, tracing, ranges, and an exact posterior.

The accuracy test uses a linear Gaussian crossed model with known scales, whose posterior is Gaussian
and exact by linear algebra: the amortized guide (globals, then each factor's groups given them,
factors mean-field given the globals) is checked against it on held-out datasets.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.errors import DataError, ModelStructureError
from amortize.layout import structure_counts, structure_flags
from amortize.nn import HierarchicalEncoder

TAU_P, TAU_I, SIGMA = 0.8, 0.6, 0.5


def grid(P: int, Q: int, keep: float = 1.0, seed: int = 0) -> am.HierarchicalData:
    g = torch.Generator().manual_seed(seed)
    p, i = torch.meshgrid(torch.arange(P), torch.arange(Q), indexing="ij")
    p, i = p.flatten(), i.flatten()
    if keep < 1:
        m = torch.rand(len(p), generator=g) < keep
        m[:P] = True  # every person and item keeps a row (row r of the first P: person r, item r % Q)
        p, i = p[m], i[m]
    return am.HierarchicalData(["person", "item"], {}, {"person": p, "item": i}, factors=[["person"], ["item"]])


def crossed_known(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("person", data.size("person")):
        a = pyro.sample("a", dist.Normal(0.0, TAU_P))
    with pyro.plate("item", data.size("item")):
        b = pyro.sample("b", dist.Normal(0.0, TAU_I))
    with pyro.plate("obs", data.n_obs):
        loc = mu + a[..., data.index("person")] + b[..., data.index("item")]
        pyro.sample("y", dist.Normal(loc, SIGMA), obs=data.y)


def exact_posterior(data: am.HierarchicalData, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of (mu, a, b) under ``crossed_known``: prior precision plus X'X / sigma^2."""
    P, Q, N = data.size("person"), data.size("item"), data.n_obs
    X = torch.zeros(N, 1 + P + Q, dtype=torch.float64)
    X[:, 0] = 1.0
    X[torch.arange(N), 1 + data.index("person")] = 1.0
    X[torch.arange(N), 1 + P + data.index("item")] = 1.0
    prior = torch.cat([torch.tensor([1 / 4.0]), torch.full((P,), TAU_P**-2), torch.full((Q,), TAU_I**-2)])
    prec = torch.diag(prior.double()) + X.T @ X / SIGMA**2
    cov = torch.linalg.inv(prec)
    return cov @ (X.T @ y.double()) / SIGMA**2, cov.diagonal().sqrt()


# ---------------------------------------------------------------------------------------- data


def test_from_frame_with_factors_codes_each_chain():
    frame = {
        "person": ["p1", "p1", "p2", "p2", "p3"],
        "test": ["A", "B", "A", "B", "A"],
        "item": ["a1", "b1", "a2", "b1", "a1"],
        "age": [30.0, 30.0, 41.0, 41.0, 25.0],
        "y": [1.0, 0.0, 1.0, 1.0, 0.0],
    }
    d = am.HierarchicalData.from_frame(
        frame, factors={"person": ["person"], "item": ["test", "item"]}, response="y", covariates={"person": ["age"]}
    )
    assert d.crossed and d.factors == (("person",), ("test", "item"))
    assert d.sizes == {"person": 3, "test": 2, "item": 3}
    assert d.index("person").tolist() == [0, 0, 1, 1, 2]
    assert [d.labels["item"][g] for g in d.index("item")] == frame["item"]
    assert [d.labels["test"][g] for g in d.index("test")] == frame["test"]
    assert [d.labels["test"][t] for t in d.parent_index("item")] == [lbl[0].upper() for lbl in d.labels["item"]]
    assert d.x["age"].tolist() == [30.0, 41.0, 25.0]
    one = d.factor(1)
    assert not one.crossed and one.levels == ("test", "item") and one.covariates == {}
    skeleton = d.skeleton()  # a row of every person and of every item, fewest greedily
    assert set(skeleton.index("person").tolist()) == {0, 1, 2}
    assert set(skeleton.index("item").tolist()) == {0, 1, 2}
    assert skeleton.n_obs <= 4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(factors={"a": ["person"], "b": ["person"]}), ["person", "two factors"]),
        (dict(factors={"a": ["person"]}, levels=["person"]), ["not both"]),
        (dict(factors={"a": ["person"], "b": ["item"]}, covariates={"test": ["age"]}), ["unknown level", "test"]),
        (dict(factors={"a": ["person"], "b": ["item"]}, covariates={"item": ["age"]}), ["'age'", "constant", "item"]),
    ],
)
def test_bad_factors_name_the_culprit(kwargs, words):
    frame = {"person": [1, 1, 2], "item": [1, 2, 2], "age": [3.0, 4.0, 5.0], "y": [0.0, 1.0, 2.0]}
    with pytest.raises(DataError) as e:
        am.HierarchicalData.from_frame(frame, response="y", **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_row_indices_of_unequal_length_are_refused():
    with pytest.raises(DataError, match="differ in length"):
        am.HierarchicalData(["p", "i"], {}, {"p": [0, 1], "i": [0]}, factors=[["p"], ["i"]])


# ----------------------------------------------------------------------------------- structure


def test_trace_records_factors_and_refuses_an_interaction_site():
    data = grid(4, 3).with_response(torch.zeros(12))
    st = am.trace_structure(crossed_known, data)
    assert st.crossed and st.factors == (("person",), ("item",))
    assert {s.name: s.level for s in st.latents} == {"mu": None, "a": "person", "b": "item"}

    def interaction(data):
        with pyro.plate("person", data.size("person"), dim=-2), pyro.plate("item", data.size("item"), dim=-1):
            ab = pyro.sample("ab", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(ab[..., data.index("person"), data.index("item")], 1.0), obs=data.y)

    with pytest.raises(ModelStructureError, match=r"site 'ab' .*crossed factors.*interaction"):
        am.trace_structure(interaction, data)


def test_own_structure_raises_no_flag_and_more_persons_do():
    data = grid(6, 4, keep=0.7)
    counts = structure_counts(data)
    assert set(counts) == {"person", "item", "obs:person", "obs:item"}
    assert structure_flags(data, counts) == []
    flags = structure_flags(grid(9, 4), counts)
    assert any("level 'person': 9 groups, trained on 6-6" in f for f in flags), flags


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_crossed_noise_is_the_additive_fits_residual(keep):
    """Within one factor's groups the rows vary with the other factor's effects: the innermost levels'
    pooled log sd is the additive fit's residual, near log sigma (and far from the within-person sd)."""
    data = grid(200, 30, keep=keep, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(data.n_obs, generator=g)
    a, b = 1.5 * torch.randn(200, generator=g), 1.0 * torch.randn(30, generator=g)
    y = 0.3 + a[data.index("person")] + b[data.index("item")] + 0.7 * x + SIGMA * torch.randn(data.n_obs, generator=g)
    data = am.HierarchicalData(
        ["person", "item"],
        {},
        {"person": data.index("person"), "item": data.index("item")},
        y=y,
        covariates={"obs": {"x": x}},
        factors=[["person"], ["item"]],
    )
    enc = HierarchicalEncoder(("person", "item"), {"obs": ["x"]}, 16, factors=(("person",), ("item",)))
    stats = enc.statistics(data)
    for lvl in ("person", "item"):
        assert abs(float(stats.levels[lvl].pooled_log_sd[0]) - torch.log(torch.tensor(SIGMA))) < 0.05, lvl
    within_person = 0.5 * torch.log(torch.tensor(1.0 + SIGMA**2))  # items' sd 1 still inside a person's rows
    assert float(stats.levels["person"].pooled_log_sd[0]) < float(within_person) - 0.5
    # the excess log sd of the person effects reads their sd (1.5), not the noise's
    assert abs(float(stats.levels["person"].excess_log_sd[0]) - torch.log(a.std())) < 0.15


def test_a_crossed_dataset_trains_whole_and_a_part_of_it_is_refused_by_name():
    data = grid(4, 3).with_response(torch.zeros(12))
    with pytest.raises(DataError, match=r"crossed, so the dataset trains whole.*4 'person' groups"):
        am.Subsampled(data, groups_per_step=2)
    index = am.Subsampled(data).index
    assert am.Subsampled(data).groups_per_step == 4 and index.probe() is index.data
    with pytest.raises(DataError, match="crossed dataset cannot be restricted to some 'person' groups"):
        index.restrict([0, 1])


# ------------------------------------------------------------------------------------ accuracy


@pytest.fixture(scope="module")
def trained():
    data = grid(30, 8, keep=0.6, seed=1)
    amortizer = am.Amortizer(crossed_known, am.StructureSampler.fixed(data), seed=0)
    amortizer.fit(steps=700, batch_size=64, progress=False)
    return amortizer, data


def test_crossed_gaussian_matches_the_exact_posterior(trained):
    amortizer, data = trained
    st = amortizer.structure
    torch.manual_seed(123)
    sim = am.simulate(crossed_known, st, data, 5)
    P = data.size("person")
    z_groups, z_mu, ratios = [], [], []
    for j in range(5):
        y = sim.data.y[j]
        mean, sd = exact_posterior(data, y)
        draws = amortizer.posterior(data.with_response(y)).sample(4000)
        q = torch.cat([draws["mu"].reshape(-1, 1), draws["a"], draws["b"]], -1).double()
        z = ((q.mean(0) - mean) / sd).abs()
        z_mu.append(float(z[0]))
        z_groups.append(z[1:])
        ratios.append(q.std(0) / sd)
    z_groups, ratios = torch.cat(z_groups), torch.cat(ratios)
    assert float(z_groups.median()) < 0.15, float(z_groups.median())
    assert float(z_groups.quantile(0.9)) < 0.4, float(z_groups.quantile(0.9))
    assert max(z_mu) < 0.5, z_mu
    assert 0.8 < float(ratios.quantile(0.1)) and float(ratios.quantile(0.9)) < 1.25, ratios.quantile(
        torch.tensor([0.1, 0.9], dtype=ratios.dtype)
    )
    assert P == 30


def test_crossed_checkpoint_round_trip_draws_alike(trained, tmp_path):
    amortizer, data = trained
    path = tmp_path / "crossed.pt"
    amortizer.save(path)
    back = am.Amortizer.load(path, crossed_known)
    y = am.simulate(crossed_known, amortizer.structure, data, 1).data.y[0]
    one = amortizer.posterior(data.with_response(y), seed=4).sample(200)
    two = back.posterior(data.with_response(y), seed=4).sample(200)
    assert all(torch.equal(one[k], two[k]) for k in one)
    verdict = back.posterior(data.with_response(y)).diagnostics(local_sbc=False, model_check=False)
    assert verdict["flags"] == [] and verdict["pareto_k"] == verdict["pareto_k"]  # judged, by the joint k
    assert verdict["ok"] is (verdict["failed"] == []) and set(verdict["failed"]) <= {"k"}, verdict["failed"]


def test_the_elbo_on_one_whole_crossed_dataset_reaches_its_exact_posterior(trained):
    """Subsampled on a crossed dataset: the whole dataset's ELBO, q(globals) its own Gaussian. From an
    amortizer trained briefly (so that the fine-tuning has something to do), the posterior meets the
    exact one more closely than the amortized one did."""
    base, data = trained
    torch.manual_seed(11)
    y = am.simulate(crossed_known, base.structure, data, 1).data.y[0]
    obs = data.with_response(y)
    mean, sd = exact_posterior(data, y)
    amortizer = am.Amortizer(crossed_known, am.StructureSampler.fixed(data), seed=3)
    amortizer.fit(steps=60, batch_size=32, progress=False)

    def errors():
        draws = amortizer.posterior(obs, seed=2).sample(4000)
        q = torch.cat([draws["mu"].reshape(-1, 1), draws["a"], draws["b"]], -1).double()
        return ((q.mean(0) - mean) / sd).abs(), q.std(0) / sd

    z_before, _ = errors()
    amortizer.fit(source=am.Subsampled(obs), steps=300, progress=False)
    z, ratio = errors()
    assert amortizer.subsampled["groups_per_step"] == data.size("person")
    assert float(z.median()) < 0.06 and float(z.max()) < 0.3, (z.median(), z.max())
    assert float(z.median()) < float(z_before.median()), (z.median(), z_before.median())
    with pytest.raises(DataError, match="crossed dataset cannot be restricted to some 'person' groups"):
        amortizer.posterior(obs).sample(10, groups=[0, 1])  # drawn whole: no part of it alone
    post = amortizer.posterior(obs)  # one chunk: not streamed, so weighed with the fit's own q(globals)
    diag = post.diagnostics(1000, seed=0, local_sbc=False, model_check=False)
    assert post.streamed is None and math.isfinite(diag["pareto_k"]) and isinstance(diag["ok"], bool)
    # the ELBO's q is somewhat narrow (each factor's effects given the globals, not given each other's)
    assert 0.75 < float(ratio.quantile(0.1)) and float(ratio.quantile(0.9)) < 1.1, ratio.quantile(
        torch.tensor([0.1, 0.9], dtype=ratio.dtype)
    )
