"""Training on one large dataset by subsampling outermost groups (amortize.subsample, sources.Subsampled),
and its streamed posterior (amortize.streaming)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import amortize as am
from amortize.models import gaussian_3level
from amortize.subsample import OuterGroupIndex, draw_groups, epochs, restrict_groups, subsampled_elbo

from .conftest import normal_known

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "large.py"


def _known(groups: int, seed: int) -> am.HierarchicalData:
    """A dataset from normal_known (mu ~ N(0, 2), theta ~ N(mu, 1), y ~ N(theta, 0.5)), 2-15 rows per group."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.randint(2, 16, (groups,), generator=gen)
    group = torch.repeat_interleave(torch.arange(groups), n)
    theta = 2.0 * torch.randn((), generator=gen) + torch.randn(groups, generator=gen)
    return am.HierarchicalData(["group"], {}, group, y=theta[group] + 0.5 * torch.randn(len(group), generator=gen))


def _exact(data: am.HierarchicalData) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Exact posterior (mean, sd) of mu and of every theta_g under normal_known."""
    n = data.counts("group").double()
    ybar = torch.zeros(len(n), dtype=torch.float64).index_add_(0, data.index("group"), data.y.double()) / n
    w = 1.0 / (1.0 + 0.25 / n)  # ybar_g | mu ~ N(mu, 1 + 0.25 / n_g)
    prec = 0.25 + w.sum()
    m_mu, v_mu = (w * ybar).sum() / prec, 1.0 / prec
    P = 1.0 + n / 0.25  # theta_g | mu, y: precision P, mean (mu + 4 n ybar) / P
    a = 1.0 / P
    return float(m_mu), float(v_mu.sqrt()), a * m_mu + 4 * n * ybar / P, (1.0 / P + a**2 * v_mu).sqrt()


def _three_level(seed: int = 0, shuffle: bool = True) -> am.HierarchicalData:
    """districts > schools > rows with covariates and labels at every level; rows and ids shuffled."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for d in range(7):
        for s in range(int(torch.randint(1, 4, (), generator=gen))):
            for _ in range(int(torch.randint(1, 5, (), generator=gen))):
                rows.append((f"d{d}", f"d{d}s{s}", float(torch.randn((), generator=gen)), d * 1.0, d + s / 10))
    if shuffle:
        rows = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    cols = list(zip(*rows))
    frame = {"district": cols[0], "school": cols[1], "y": cols[2], "xd": cols[3], "xs": cols[4]}
    frame["xo"] = [float(i) for i in range(len(rows))]
    return am.HierarchicalData.from_frame(
        frame, ["district", "school"], response="y", covariates={"district": ["xd"], "school": ["xs"], "obs": ["xo"]}
    )


@pytest.mark.parametrize("shuffle", [True, False])
def test_restrict_keeps_nesting_values_and_labels(shuffle: bool) -> None:
    data = _three_level(shuffle=shuffle)
    chosen = torch.tensor([5, 1, 3, 1])  # any order, repeats dropped
    sub, kept = restrict_groups(data, chosen)
    assert kept["district"].tolist() == [1, 3, 5]
    assert sub.size("district") == 3
    # every kept school / row keeps its parent; rows are exactly those of the chosen districts
    assert torch.equal(kept["district"][sub.parent_index("school")], data.parent_index("school")[kept["school"]])
    assert torch.equal(kept["school"][sub.group], data.group[kept["obs"]])
    in_chosen = torch.isin(data.index("district"), torch.tensor([1, 3, 5]))
    assert sorted(kept["obs"].tolist()) == torch.nonzero(in_chosen).squeeze(-1).tolist()
    assert sorted(kept["school"].tolist()) == torch.unique(data.index("school")[in_chosen]).tolist()
    assert torch.equal(sub.y, data.y[kept["obs"]])
    assert torch.equal(sub.x["xd"], data.x["xd"][kept["district"]])
    assert torch.equal(sub.x["xs"], data.x["xs"][kept["school"]])
    assert torch.equal(sub.x["xo"], data.x["xo"][kept["obs"]])
    assert sub.labels["school"] == [data.labels["school"][i] for i in kept["school"].tolist()]
    assert sub.labels["district"] == ["d1", "d3", "d5"]
    # the index gives the same subset as the one-off helper, and all groups give the whole dataset back
    index = OuterGroupIndex(data)
    again, kept2 = index.restrict(torch.tensor([3, 5, 1]))
    assert all(torch.equal(kept[k], kept2[k]) for k in kept) and torch.equal(again.y, sub.y)
    whole, kept_all = index.restrict(torch.arange(data.size("district")))
    assert whole.sizes == data.sizes and sorted(kept_all["obs"].tolist()) == list(range(data.n_obs))


def test_draw_groups_is_uniform_without_replacement() -> None:
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(40)
    for _ in range(4000):
        g = draw_groups(40, 5, gen)
        assert len(torch.unique(g)) == 5 and int(g.min()) >= 0 and int(g.max()) < 40
        hits[g] += 1
    assert float((hits / 4000 - 5 / 40).abs().max()) < 0.02  # every group with probability b / G
    assert draw_groups(10, 20, gen).tolist() == list(range(10))
    # training's random reshuffling: each epoch sees every group once, in chunks of about k
    batches = epochs(103, 10, gen)
    for _ in range(2):
        chunks = [next(batches) for _ in range(10)]
        assert {len(c) for c in chunks} <= {10, 11}
        assert sorted(torch.cat(chunks).tolist()) == list(range(103))


FAST = {"batch_size": 4, "pilot_structures": 2, "warmup": 2, "progress": False}


def _fit(a: am.Amortizer, data: am.HierarchicalData, b: int, **kw) -> am.Subsampled:
    source = am.Subsampled(data, groups_per_step=b)
    a.fit(source=source, **{**FAST, **kw})
    return source


def test_same_seed_same_fit() -> None:
    data = _known(60, 2)
    fits = []
    for _ in "ab":
        a = am.Amortizer(normal_known, data.with_response(None), hidden=8, flow_bins=0)
        _fit(a, data, 16, steps=4)
        fits.append(a)
    assert torch.equal(fits[0].q_globals.loc, fits[1].q_globals.loc)
    m = [f.posterior(data).sample(4, seed=0)["theta"] for f in fits]
    assert torch.equal(m[0], m[1])


def test_subsampled_state_is_saved_and_resumed_exactly(tmp_path: Path) -> None:
    """A subsampled run stopped, saved, loaded and continued gives the uninterrupted run's weights and q(globals)."""
    data = _known(80, 4)
    whole = am.Amortizer(normal_known, data.with_response(None), hidden=8, flow_bins=0, seed=1)
    _fit(whole, data, 20, steps=8)
    first = am.Amortizer(normal_known, data.with_response(None), hidden=8, flow_bins=0, seed=1)
    _fit(first, data, 20, steps=8, stop_at=4, checkpoint_path=str(tmp_path / "ck.pt"))
    torch.randn(10)  # the caller's RNG between the runs does not matter
    resumed = am.Amortizer.load(tmp_path / "ck.pt", normal_known, sampler=am.StructureSampler.fixed(data))
    assert resumed.step == 4 and resumed.subsampled["groups_per_step"] == 20
    with pytest.raises(am.AmortizeError, match="Subsampled"):
        resumed.fit(steps=8)  # a subsampled run continues on its data
    _fit(resumed, data, 20, steps=8)
    assert torch.equal(whole.q_globals.scale_tril(), resumed.q_globals.scale_tril())
    a, b = whole.guide.state_dict(), resumed.guide.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the loaded amortizer streams the posterior of its dataset with its own q(globals)
    post = resumed.posterior(data)
    assert post.streamed is not None and post.streamed.q_globals is resumed.q_globals


def test_an_amortizer_trained_on_simulations_is_fine_tuned_as_a_new_run(amortizer) -> None:
    a = copy.deepcopy(amortizer)  # trained 20 steps on simulations of 3-8 groups
    ranges = a.ranges
    data = _known(40, 3)
    _fit(a, data, 10, steps=3)
    assert a.step == 3 and a.ranges == ranges and a.subsampled["groups_per_step"] == 10
    flags = a.posterior(data).range_flags()  # 40 groups: no flag, the guide sees chunks of 10
    assert not any("level 'group'" in f for f in flags), flags
    assert any("level 'group'" in f for f in a.posterior(_known(40, 9)).range_flags())  # another dataset
    q = a.q_globals
    trained = {id(p) for p in a.optimizer.param_groups[1]["params"]}
    assert trained == {id(p) for p in q.parameters()}  # q(globals) is trained


def test_errors_name_the_level_and_ids() -> None:
    data = _known(30, 0)
    index = OuterGroupIndex(data)
    with pytest.raises(am.DataError, match="level 'group' has groups 0..29; got group id 30"):
        index.restrict([0, 30])
    with pytest.raises(am.DataError, match="got group id -1"):
        index.restrict([-1])
    with pytest.raises(am.DataError, match="no 'group' groups"):
        index.restrict([])
    with pytest.raises(am.DataError, match="must be integers"):
        index.restrict(torch.tensor([0.5]))
    a = am.Amortizer(normal_known, data.with_response(None), hidden=8, flow_bins=0)
    with pytest.raises(am.DataError, match="levels"):
        _fit(a, _three_level(), 4, steps=1)
    with pytest.raises(am.DataError, match="one dataset"):
        am.Subsampled(data.with_response(data.y.expand(2, -1).clone()))
    _fit(a, data, 10, steps=2)
    post = a.posterior(data)
    with pytest.raises(am.DataError, match="got group id 99"):
        post.sample(10, groups=[99])
    with pytest.raises(am.DataError, match="another dataset"):
        _fit(a, _known(31, 0), 10, steps=3)


@pytest.fixture(scope="module")
def trained() -> tuple[am.Amortizer, am.HierarchicalData, am.Subsampled]:
    torch.set_num_threads(1)
    data = _known(2000, 1)
    sampler = am.StructureSampler(["group"], groups={"group": (10, 50)}, obs=(2, 15))
    a = am.Amortizer(normal_known, sampler, hidden=32, flow_bins=0, seed=0)
    source = am.Subsampled(data, groups_per_step=256)
    a.fit(
        source=source, steps=300, num_particles=4, lr=5e-3, warmup=50, batch_size=32, pilot_structures=8, progress=False
    )
    return a, data, source


def test_minibatch_elbo_is_unbiased(trained) -> None:
    """The mean of the scaled minibatch ELBO over many random subsets is the full-data ELBO (fixed guide)."""
    a, data, source = trained
    G, b = data.size("group"), 100
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)

    def elbo(groups: torch.Tensor, particles: int) -> torch.Tensor:
        sub, _ = source.index.restrict(groups)
        return subsampled_elbo(a.guide, a.q_globals, sub, G / len(groups), particles)

    with torch.no_grad():
        full = torch.cat([elbo(torch.arange(G), 64) for _ in range(4)])
        mini = torch.stack([elbo(draw_groups(G, b, gen), 2).mean() for _ in range(1500)])
    se = (full.var() / len(full) + mini.var() / len(mini)).sqrt()
    diff = float(mini.mean() - full.mean())
    assert abs(diff) < 4 * se, (diff, float(se))
    # the check has power: a 1% error in the scale of the group terms would be caught
    assert 4 * se < 0.01 * abs(float(full.mean())), float(se)
    # without the G / b scaling the estimate is far off
    sub, _ = source.index.restrict(draw_groups(G, b, gen))
    with torch.no_grad():
        unscaled = subsampled_elbo(a.guide, a.q_globals, sub, 1.0, 8).mean()
    assert abs(float(unscaled - full.mean())) > 100 * se


def test_streamed_posterior_matches_exact_conjugate_posterior(trained) -> None:
    a, data, _ = trained
    m_mu, s_mu, m_theta, s_theta = _exact(data)
    post = a.posterior(data)  # the subsampled fit's dataset: streamed in chunks of 256 groups
    assert post.streamed is not None and post.streamed.chunk == 256
    moments = post.moments(num_draws=50, seed=0)["theta"]  # conditional moments: no Monte Carlo error per group
    assert moments.mean.shape == (2000,) and moments.sd.shape == (2000,)
    z = ((moments.mean.double() - m_theta) / s_theta).abs()
    ratio = moments.sd.double() / s_theta
    assert float(z.median()) <= 0.1
    assert 0.9 <= float(ratio.median()) <= 1.1
    draws = post.sample(400, seed=0)
    theta = draws["theta"]
    assert theta.shape == (400, 2000) and draws["mu"].shape == (400,)
    # the draws agree with the moments (draws' mean within 4 Monte Carlo sds for 99% of the groups)
    mc = ((theta.mean(0) - moments.mean) / (moments.sd / 400**0.5)).abs()
    assert float((mc < 4).double().mean()) > 0.99
    mu = draws["mu"]
    assert abs(float(mu.mean()) - m_mu) < 3 * s_mu
    assert 0.8 < float(mu.std()) / s_mu < 1.25
    # joint draws of chosen groups agree with the whole
    chosen = post.sample(400, groups=[7, 3, 1999], seed=1)
    assert chosen["theta"].shape == (400, 3) and chosen["mu"].shape == (400,)
    assert chosen.index["group"].tolist() == [3, 7, 1999]
    sel = chosen.index["group"]
    sd = theta.std(0)[sel]
    assert torch.allclose(chosen["theta"].mean(0), theta.mean(0)[sel], atol=4 * float(sd.max()) * (2 / 400) ** 0.5)
    assert torch.allclose(chosen["theta"].std(0), sd, rtol=0.2)
    diag = post.diagnostics()
    assert diag["flags"] == []  # its own data: in range (the chunk, not G, is what the guide saw)
    assert diag["ok"] is None and "not judged" in diag["reason"] and "8 chunks" in diag["reason"]
    assert diag["failed"] == []


def test_the_fitted_dataset_in_one_chunk_is_weighed_whole(trained) -> None:
    """Drawn in one chunk, a subsampled fit's dataset is not streamed: its verdict weighs q with the fit's
    own q(globals), and says not ok when that q(globals) is moved off the exact posterior."""
    a, data, _ = trained
    m_mu, s_mu, _, _ = _exact(data)
    post = a.posterior(data, chunk_groups=data.size("group"))
    assert post.streamed is None
    assert abs(float(post.sample(2000, seed=0)["mu"].mean()) - m_mu) < 0.5 * s_mu  # the fit's q(globals)
    diag = post.diagnostics(1000, seed=0, local_sbc=True)
    assert diag["ok"] is True and diag["failed"] == [], diag["reason"]
    assert diag["pareto_k"] <= 0.5 and diag["levels"]["group"]["k_p90"] <= 0.5
    assert diag["local_sbc"]["ok"] is None and "Subsampled" in diag["local_sbc"]["skipped"]
    chosen = post.sample(50, groups=[5, 1], seed=0)  # groups of a dataset that is not streamed
    assert chosen.index["group"].tolist() == [1, 5] and chosen["theta"].shape == (50, 2)
    off = copy.deepcopy(a.q_globals)
    with torch.no_grad():
        off.loc += 4 * s_mu  # q(mu) four posterior sds off
    wrong = am.Posterior(a.guide, normal_known, data, a.ranges, q_globals=off).diagnostics(1000, seed=0)
    assert wrong["ok"] is False and "globals'" in wrong["reason"], wrong["reason"]
    wide = copy.deepcopy(a.q_globals)
    with torch.no_grad():
        wide.log_diag += math.log(4.0)  # q(mu) 4x too wide: a small k, but an ESS of about 35% of the draws
    wide = am.Posterior(a.guide, normal_known, data, a.ranges, q_globals=wide).diagnostics(1000, seed=0)
    assert wide["pareto_k"] <= 0.7 and wide["ess_ratio"] < 0.5 and wide["ok"] is False
    assert "globals' importance ESS" in wide["reason"] and wide["failed"] == ["ess"], wide["reason"]
    for d, bad in ((0.2, False), (0.75, True)):  # q(mu) d posterior sds off: an ESS of exp(-d^2), above 50%
        near = copy.deepcopy(a.q_globals)
        with torch.no_grad():
            near.loc.fill_(m_mu + d * s_mu)
        near = am.Posterior(a.guide, normal_known, data, a.ranges, q_globals=near)
        diag = near.diagnostics(1000, seed=0)
        s_q = float(near.sample(4000, seed=0)["mu"].std())
        assert diag["pareto_k"] <= 0.7 and diag["ess_ratio"] >= 0.5, diag["reason"]
        assert abs(diag["shift"]["z"] - d * s_mu / s_q) < 0.15 and diag["shift"]["site"] == "mu", (diag["shift"], s_q)
        assert diag["ok"] is (not bad) and ("importance-weighted mean of 'mu'" in diag["reason"]) is bad, diag["reason"]
        assert diag["failed"] == (["shift"] if bad else []), diag["failed"]


def test_three_level_model_streams_every_level() -> None:
    """Inner-level sites (gathered from drawn parents) and constrained globals run through the same path."""
    sampler = am.StructureSampler(["district", "school"], groups={"district": (60, 60), "school": (2, 4)}, obs=(2, 5))
    structure = sampler.sample(torch.Generator().manual_seed(0))
    a = am.Amortizer(gaussian_3level, sampler, hidden=8, flow_bins=0, seed=0)
    data = am.simulate(gaussian_3level, a.structure, structure, 1).data
    data = data.with_response(data.y[0])
    _fit(a, data, 16, steps=5)
    m = a.posterior(data, chunk_groups=20).moments(num_draws=8, seed=0)
    assert set(m) == {"alpha", "beta"} and m["beta"].sd.shape == (data.size("school"),)
    assert all(bool(torch.isfinite(x.mean).all() and (x.sd > 0).all()) for x in m.values())
    with pytest.raises(am.DataError, match="unknown level 'county'"):
        a.posterior(data).moments(level="county")
    out = a.posterior(data, chunk_groups=20).sample(8, seed=0)
    assert set(out) == {"mu", "tau_district", "tau_school", "sigma", "alpha", "beta"}
    assert out["alpha"].shape == (8, 60) and out["beta"].shape == (8, data.size("school"))
    assert all(bool(torch.isfinite(v).all()) for v in out.values()) and bool((out["sigma"] > 0).all())
    draws = a.posterior(data).sample(6, groups=[2, 40])
    assert draws["alpha"].shape == (6, 2)
    schools = draws.index["school"]
    assert draws["beta"].shape == (6, len(schools))
    assert set(data.parent_index("school")[schools].tolist()) == {2, 40}


def test_a_prior_trained_amortizer_streams_any_dataset(amortizer) -> None:
    """Without a subsampled fit, chunks read the global head's draws on the whole dataset: streaming
    in one chunk and in several gives draws of one q (equal means within Monte Carlo error)."""
    data = _known(12, 5)
    one = amortizer.posterior(data, chunk_groups=12).sample(2000, seed=0)
    whole = amortizer.posterior(data).sample(2000, seed=1)
    se = (one["mu"].var() / 2000 + whole["mu"].var() / 2000).sqrt()
    assert abs(float(one["mu"].mean() - whole["mu"].mean())) < 4 * float(se)
    three = amortizer.posterior(data, chunk_groups=4).sample(50, seed=0)
    assert three["theta"].shape == (50, 12) and bool(torch.isfinite(three["theta"]).all())


def test_bench_large_runs_and_writes_results(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_large", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_large"] = mod
    spec.loader.exec_module(mod)
    try:
        rc = mod.main(["--groups", "300", "--steps", "5", "--groups-per-step", "50", "--out", str(tmp_path)])
    finally:
        del sys.modules["bench_large"]
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["groups"] == 300 and set(res["phases"]) == {"data", "train", "posterior"}
    assert "z median" in (tmp_path / "results.md").read_text()
