"""Latents at the observation level: one effect per row (an implicit innermost level named after the plate)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.errors import DataError, ModelStructureError
from amortize.simulate import simulate
from amortize.structure import drawing_data, priors_free_of_rows, trace_structure
from amortize.subsample import restrict_groups


def olre(data, plate="obs"):
    """Poisson counts with a county effect and an overdispersion effect per row (in the response's plate)."""
    mu = pyro.sample("mu", dist.Normal(1.0, 0.5))
    tau = pyro.sample("tau", dist.HalfNormal(0.5))
    sigma = pyro.sample("sigma_e", dist.HalfNormal(0.5))
    with pyro.plate("county", data.size("county")):
        a = pyro.sample("a", dist.Normal(mu, tau))
    with pyro.plate(plate, data.n_obs):
        e = pyro.sample("e", dist.Normal(0.0, sigma))
        pyro.sample("y", dist.Poisson(torch.exp(a[..., data.index("county")] + e)), obs=data.y)


def olre_row(data):
    olre(data, plate="row")


def olre_3level(data):
    """Regions in states plus the row effect: the rows are the third level."""
    mu = pyro.sample("mu", dist.Normal(1.0, 0.5))
    taus = [pyro.sample(f"tau_{lvl}", dist.HalfNormal(0.5)) for lvl in ("state", "region")]
    sigma = pyro.sample("sigma_e", dist.HalfNormal(0.5))
    with pyro.plate("state", data.size("state")):
        a_s = pyro.sample("a_state", dist.Normal(mu, taus[0]))
    with pyro.plate("region", data.size("region")):
        a_r = pyro.sample("a_region", dist.Normal(a_s[..., data.parent_index("region")], taus[1]))
    with pyro.plate("obs", data.n_obs):
        e = pyro.sample("e", dist.Normal(0.0, sigma))
        pyro.sample("y", dist.Poisson(torch.exp(a_r[..., data.index("region")] + e)), obs=data.y)


SAMPLER = am.StructureSampler(["county"], groups={"county": (3, 6)}, obs=(1, 4))


@pytest.fixture(scope="module")
def trained():
    a = am.Amortizer(olre, SAMPLER, hidden=16, seed=0)
    a.fit(steps=15, batch_size=8, progress=False)
    return a


def dataset(seed=3, model=olre, sampler=SAMPLER):
    d = sampler.sample(torch.Generator().manual_seed(seed))
    st = trace_structure(model, d.with_response(torch.ones(d.n_obs)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sim = simulate(model, st, d, 1)
    return sim.data.declared().with_response(sim.data.y[0])  # as a user has it: no row level


def test_tracing_adds_the_rows_as_an_implicit_level_named_after_the_plate():
    d = dataset()
    st = trace_structure(olre, d)
    assert st.levels == ("county", "obs") and st.row_level == "obs"
    assert st["e"].level == "obs" and st["a"].level == "county" and st["mu"].level is None
    st_row = trace_structure(olre_row, d)
    assert st_row.levels == ("county", "row") and st_row["e"].level == "row"
    assert trace_structure(olre_3level, dataset(model=olre_3level, sampler=THREE)).levels == ("state", "region", "obs")


def test_rows_as_level_is_a_level_of_singletons_whose_parents_are_the_rows_groups():
    d = dataset()
    r = d.rows_as_level("obs")
    N = d.n_obs
    assert r.levels == ("county", "obs") and r.size("obs") == N and r.n_obs == N
    assert torch.equal(r.index("obs"), torch.arange(N)) and torch.equal(
        r.counts("obs"), torch.ones(N, dtype=torch.long)
    )
    assert torch.equal(r.parent_index("obs"), d.group) and torch.equal(r.index("county"), d.index("county"))
    assert r.declared_levels == ("county",) and r.declared().levels == d.levels
    assert torch.equal(r.declared().group, d.group)
    assert r.as_levels(("county", "obs")) is r and d.as_levels(("county",)) is d
    with pytest.raises(DataError, match="level 'county'"):
        d.rows_as_level("county")


def test_simulation_and_encoding_have_one_group_per_row():
    a = am.Amortizer(olre, SAMPLER, hidden=8, seed=0)
    d = SAMPLER.sample(torch.Generator().manual_seed(4))
    sim = simulate(olre, a.structure, d, 5)
    B, N = sim.data.y.shape
    assert sim.latents["e"].shape == (1, B, N) and sim.latents["a"].shape == (1, B, d.size("county"))
    from amortize.nn.data_terms import group_terms

    enc = a.guide.encoder(sim.data, group_terms(olre, a.structure, sim.data))
    assert enc.groups["obs"].shape == (B, N, 8) and enc.groups["county"].shape == (B, d.size("county"), 8)
    loc, scale, _ = a.guide.encode(sim.data)["terms"]["e"]
    assert loc.shape == (B, N, 1) and bool(torch.isfinite(scale).all())


def test_a_short_seeded_training_run_is_finite(trained):
    losses = [h["loss"] for h in trained.history]
    assert losses and all(math.isfinite(x) for x in losses)
    assert trained.history[-1]["skipped"] == 0


def test_sample_has_a_dim_per_row_and_exports_name_it_after_the_plate(trained):
    d = dataset()
    post = trained.posterior(d)
    draws = post.sample(40, seed=0)
    assert draws["e"].shape == (40, d.n_obs) and draws["a"].shape == (40, d.size("county"))
    assert bool(torch.isfinite(draws["e"]).all())
    assert post.range_flags() == []  # the training structure: rows per county inside the trained range
    summary = post.summary(40, seed=0)
    assert f"e[{d.n_obs - 1}]" in summary.index
    idata = post.to_arviz(40, seed=0)
    assert idata.posterior["e"].dims == ("chain", "draw", "obs") and idata.posterior.sizes["obs"] == d.n_obs
    assert post.moments(5)["e"].mean.shape == (d.n_obs,)
    many = trained.posterior([d, dataset(seed=5)]).sample(10, seed=0)
    assert many[1]["e"].shape[1] == dataset(seed=5).n_obs


def test_a_row_plate_of_another_name_names_the_level(tmp_path):
    a = am.Amortizer(olre_row, SAMPLER, hidden=8, seed=0)
    a.fit(steps=3, batch_size=4, progress=False)
    d = dataset(model=olre_row)
    post = a.posterior(d)
    assert post.sample(5, seed=0)["e"].shape == (5, d.n_obs)
    assert post.to_arviz(20, seed=0).posterior["e"].dims == ("chain", "draw", "row")
    a.save(tmp_path / "ck.pt")
    b = am.Amortizer.load(tmp_path / "ck.pt", olre_row)
    assert b.structure.levels == ("county", "row")
    torch.testing.assert_close(b.posterior(d, seed=1).sample(5)["e"], a.posterior(d, seed=1).sample(5)["e"])


THREE = am.StructureSampler(["state", "region"], groups={"state": (2, 3), "region": (2, 3)}, obs=(1, 3))


def test_three_levels_with_the_row_effect_train_and_sample():
    a = am.Amortizer(olre_3level, THREE, hidden=8, seed=0)
    a.fit(steps=5, batch_size=4, progress=False)
    assert all(math.isfinite(h["loss"]) for h in a.history)
    d = dataset(model=olre_3level, sampler=THREE)
    draws = a.posterior(d).sample(7, seed=0)
    assert draws["e"].shape == (7, d.n_obs) and draws["a_region"].shape == (7, d.size("region"))


def test_drawing_keeps_every_row():
    d = dataset()
    assert not priors_free_of_rows(olre, d)  # the skeleton has one row per county: fewer row effects
    full = d.rows_as_level("obs")
    assert drawing_data(olre, full).n_obs == d.n_obs  # the skeleton of the row level is every row


def test_subsets_of_outermost_groups_keep_the_row_level():
    d = dataset().rows_as_level("obs")
    sub, kept = restrict_groups(d, [0, 2])
    assert sub.levels == ("county", "obs") and sub.size("obs") == sub.n_obs == len(kept["obs"])
    assert torch.equal(sub.y, d.y[kept["obs"]])


def nested_in_group_plate(data):
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("obs", data.n_obs):
        with pyro.plate("county", data.size("county"), dim=-2):
            e = pyro.sample("e", dist.Normal(0.0, s))
        pyro.sample("y", dist.Poisson(e.exp()[..., 0, :]), obs=data.y)


def in_another_row_plate(data):
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("rows", data.n_obs):
        e = pyro.sample("e", dist.Normal(0.0, s))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Poisson(e.exp()), obs=data.y)


def in_a_plate_of_no_level(data):
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("things", 2):
        b = pyro.sample("b", dist.Normal(0.0, s))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Poisson(b.sum(-1).exp()), obs=data.y)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (nested_in_group_plate, r"site 'e' is inside plates \['obs', 'county'\]"),
        (
            in_another_row_plate,
            r"site 'e' is in plate 'rows' over the \d+ rows, which is not the plate of the response",
        ),
        (in_a_plate_of_no_level, r"site 'b' is in plate 'things', which is not a level"),
    ],
)
def test_what_stays_unsupported_is_refused_naming_site_and_plate(model, words):
    with pytest.raises(ModelStructureError, match=words):
        trace_structure(model, dataset())


def gauss_row(data):
    """A Gaussian with a group effect and an effect per row, every scale known: its posterior is exact."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("county", data.size("county")):
        a = pyro.sample("a", dist.Normal(mu, 0.5))
    with pyro.plate("obs", data.n_obs):
        e = pyro.sample("e", dist.Normal(0.0, 0.3))
        pyro.sample("y", dist.Normal(a[..., data.index("county")] + e, 0.2), obs=data.y)


def _exact_gauss_row(data):
    """Means and sds of (mu, a, e) under gauss_row: x = L z with z standard, y = A x + 0.2 noise."""
    G, N = data.size("county"), data.n_obs
    L = torch.zeros(1 + G + N, 1 + G + N, dtype=torch.float64)
    L[0, 0] = 1.0
    L[1 : 1 + G, 0], L[1 : 1 + G, 1 : 1 + G] = 1.0, 0.5 * torch.eye(G, dtype=torch.float64)
    L[1 + G :, 1 + G :] = 0.3 * torch.eye(N, dtype=torch.float64)
    A = torch.zeros(N, 1 + G + N, dtype=torch.float64)
    A[torch.arange(N), 1 + data.index("county")] = 1.0
    A[torch.arange(N), 1 + G + torch.arange(N)] = 1.0
    M = A @ L
    cov_z = torch.linalg.inv(torch.eye(1 + G + N, dtype=torch.float64) + M.T @ M / 0.04)
    mean, cov = L @ (cov_z @ M.T @ data.y.double() / 0.04), L @ cov_z @ L.T
    sd = cov.diagonal().sqrt()
    return {"mu": (mean[:1], sd[:1]), "a": (mean[1 : 1 + G], sd[1 : 1 + G]), "e": (mean[1 + G :], sd[1 + G :])}


def test_a_model_with_latents_per_row_trains_subsampled_and_whole():
    """Subsampled carries the rows as a level through every subset. The whole ELBO finds the exact means
    of every site and mu's sd; the groups' sds come out narrow (0.6 of exact here: q(e | a) does not read
    the drawn a, so the ELBO is mean-field between a row's effect and its group's), which the verdict of
    this one-chunk posterior weighs (its k's are computed, not NaN)."""
    torch.manual_seed(0)
    sampler = am.StructureSampler(["county"], groups={"county": (20, 40)}, obs=(1, 4))
    design = am.StructureSampler(["county"], groups={"county": (30, 30)}, obs=(1, 4))
    data = dataset(seed=11, model=gauss_row, sampler=design)
    a = am.Amortizer(gauss_row, sampler, hidden=32, seed=0)
    a.fit(source=am.Subsampled(data), steps=800, num_particles=4, lr=5e-3, batch_size=16, progress=False)
    post = a.posterior(data)
    assert post.streamed is None
    draws = post.sample(4000, seed=0)
    exact = _exact_gauss_row(data)
    for site, (mean, sd) in exact.items():
        z = ((draws[site].double().mean(0) - mean) / sd).abs()
        assert float(z.median()) < 0.15 and float(z.max()) < 0.6, (site, z)
    assert 0.8 < float(draws["mu"].double().std() / exact["mu"][1]) < 1.2
    diag = post.diagnostics(1000, seed=0, local_sbc=False)
    assert math.isfinite(diag["pareto_k"]) and set(diag["levels"]) == {"county", "obs"}
    # subsets of its counties carry their rows as a level too
    a.fit(source=am.Subsampled(data, groups_per_step=10), steps=820, num_particles=2, progress=False)
    assert a.posterior(data).streamed is not None


def test_sbc_ranks_the_row_effects(trained):
    from amortize.validate.sbc import sbc

    res = sbc(trained, num_datasets=6, num_samples=9, datasets_per_structure=3)
    names = [r["quantity"] for r in res.rows]
    assert {"e (random group)", "e (group mean)", "a (random group)"} <= set(names)
    assert all(len(r) == 6 for r in res.ranks.values())
