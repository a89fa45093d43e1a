"""Tests of amortize.validate: metrics on known distributions, NUTS on a conjugate model, reference loaders."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.data import HierarchicalData
from amortize.errors import AmortizeError, DataError
from amortize.models import eight_schools  # noqa: E402
from amortize.validate import (
    NUTSResult,
    ReferenceMoments,
    compare,
    format_table,
    reference,
    run_nuts,
    summarize,
    to_markdown,
)
from amortize.validate.convergence import chain_diagnostics

# --------------------------------------------------------------------------- helpers

S0, TAU, SIGMA = 2.0, 0.5, 1.0  # conjugate model: prior sd of mu, known group sd, known noise sd


def conjugate_model(data: HierarchicalData) -> None:
    """mu ~ N(0, S0); theta_g ~ N(mu, TAU); y ~ N(theta_g, SIGMA): Gaussian posterior in closed form."""
    mu = pyro.sample("mu", dist.Normal(0.0, S0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, TAU))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], SIGMA), obs=data.y)


def conjugate_data(groups: int = 5, per_group: int = 4, seed: int = 0) -> HierarchicalData:
    """A dataset simulated from :func:`conjugate_model`."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.arange(groups).repeat_interleave(per_group)
    mu = S0 * torch.randn((), generator=gen)
    theta = mu + TAU * torch.randn(groups, generator=gen)
    y = theta[g] + SIGMA * torch.randn(len(g), generator=gen)
    return HierarchicalData(["group"], {}, g.numpy(), y=y.numpy())


def exact_posterior(data: HierarchicalData) -> ReferenceMoments:
    """Exact posterior mean/sd of (mu, theta) from the joint precision matrix."""
    groups = data.size("group")
    counts = data.counts("group").double()
    sums = torch.zeros(groups, dtype=torch.float64).index_add(0, data.index("group"), data.y.double())
    prec = torch.zeros(groups + 1, groups + 1, dtype=torch.float64)
    prec[0, 0] = 1 / S0**2 + groups / TAU**2
    prec[0, 1:] = prec[1:, 0] = -1 / TAU**2
    prec[1:, 1:] += torch.diag(1 / TAU**2 + counts / SIGMA**2)
    cov = torch.linalg.inv(prec)
    mean = cov @ torch.cat([torch.zeros(1, dtype=torch.float64), sums / SIGMA**2])
    sd = cov.diagonal().sqrt()
    return ReferenceMoments(mean={"mu": mean[0], "theta": mean[1:]}, sd={"mu": sd[0], "theta": sd[1:]})


def check_against_exact(res: NUTSResult, exact: ReferenceMoments) -> None:
    """NUTS means and sds agree with the exact posterior within Monte Carlo error (ESS-based)."""
    for row in compare(res.samples, exact):
        ess = res.ess_bulk[row["site"]]
        assert row["z"] < 4.5 / math.sqrt(ess), row
        assert abs(row["sd_ratio"] - 1) < 5 / math.sqrt(2 * ess), row


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # seeds torch, numpy and random


# --------------------------------------------------------------------------- metrics


def test_compare_same_distribution_is_within_monte_carlo_error() -> None:
    n = m = 4000
    rng = np.random.default_rng(1)
    rows = compare({"a": torch.tensor(rng.normal(size=n))}, {"a": torch.tensor(rng.normal(size=m))})
    (row,) = rows
    assert row["site"] == "a" and row["element"] == () and row["level"] == "global" and row["group"] is None
    assert row["z"] < 4 * math.sqrt(1 / n + 1 / m)
    assert abs(row["sd_ratio"] - 1) < 4 * math.sqrt(1 / (2 * n) + 1 / (2 * m))
    # coverage: binomial error over the reference plus the error of the two estimated quantiles
    assert abs(row["coverage90"] - 0.9) < 4 * math.sqrt(0.09 / m + 2 * 0.05 * 0.95 / n)
    assert row["w1"] < 6 / math.sqrt(min(n, m))


def test_compare_shifted_and_scaled_distribution() -> None:
    n = m = 8000
    rng = np.random.default_rng(2)
    shift, scale = 0.5, 2.0
    q = torch.tensor(shift + scale * rng.normal(size=n))
    r = torch.tensor(rng.normal(size=m))
    (row,) = compare({"a": q}, {"a": r})
    assert abs(row["z"] - shift) < 4 * math.sqrt(scale**2 / n + 1 / m)
    assert abs(row["sd_ratio"] - scale) < 4 * scale * math.sqrt(1 / (2 * n) + 1 / (2 * m))
    # W1(N(a, s^2), N(0, 1)) = E|a + (s - 1) Z| under the quantile coupling; here s - 1 = 1
    phi = math.exp(-(shift**2) / 2) / math.sqrt(2 * math.pi)
    w1 = shift * (2 * 0.5 * (1 + math.erf(shift / math.sqrt(2))) - 1) + 2 * phi
    assert abs(row["w1"] - w1) < 0.05
    cover = 0.5 * (math.erf((shift + 1.645 * scale) / math.sqrt(2)) - math.erf((shift - 1.645 * scale) / math.sqrt(2)))
    assert abs(row["coverage90"] - cover) < 0.01


def test_compare_with_moments_uses_normal_reference() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    q = torch.tensor(rng.normal(size=(n, 2, 3)))
    ref = ReferenceMoments(mean={"b": torch.full((2, 3), 0.25)}, sd={"b": torch.full((2, 3), 0.5)})
    rows = compare({"b": q}, ref, levels={"b": "school"}, labels={"school": ["north", "south"]})
    assert [(r["group"], r["element"]) for r in rows] == [(g, (j,)) for g in ("north", "south") for j in range(3)]
    for row, k in zip(rows, range(6)):
        x = q.reshape(n, 6)[:, k].numpy()
        assert row["level"] == "school" and row["w1"] is None
        assert row["mean"] == pytest.approx(x.mean()) and row["sd"] == pytest.approx(x.std(ddof=1))
        assert row["ref_mean"] == 0.25 and row["ref_sd"] == 0.5
        assert row["z"] == pytest.approx(abs(x.mean() - 0.25) / 0.5)
        assert row["sd_ratio"] == pytest.approx(x.std(ddof=1) / 0.5)
        # N(0, 1) draws' 90% interval holds P(|0.25 + 0.5 Z - 0| ...) of N(0.25, 0.5): about 0.999
        assert 0.99 < row["coverage90"] <= 1.0


def test_compare_errors_name_the_site() -> None:
    with pytest.raises(DataError, match="'a'"):
        compare({"a": torch.zeros(10, 2)}, {"a": torch.zeros(10, 3)})
    with pytest.raises(DataError, match="no site in common"):
        compare({"a": torch.zeros(10)}, {"b": torch.zeros(10)})


def test_summarize_groups_and_tables() -> None:
    rows = [{"site": "mu", "level": "global", "z": 0.1, "sd_ratio": 1.0, "coverage90": 0.9, "w1": 0.05}]
    rows += [
        {"site": "theta", "group": i, "level": "school", "z": z, "sd_ratio": s, "coverage90": 0.8, "w1": None}
        for i, (z, s) in enumerate([(0.0, 0.5), (0.2, 1.0), (0.4, 1.5)])
    ]
    out = summarize(rows[::-1])  # global comes first whatever the order
    assert [g["level"] for g in out] == ["global", "school"]
    school = out[1]
    assert school["count"] == 3 and school["z_median"] == pytest.approx(0.2)
    assert school["sd_ratio_p10"] == pytest.approx(0.6) and school["sd_ratio_p90"] == pytest.approx(1.4)
    assert school["coverage90"] == pytest.approx(0.8) and school["w1_median"] is None
    assert out[0]["w1_median"] == pytest.approx(0.05)
    assert [g["site"] for g in summarize(rows, by="site")] == ["mu", "theta"]

    table = format_table(out, columns=["level", "z_median", "w1_median", "count"]).splitlines()
    assert table[0].split() == ["level", "z_median", "w1_median", "count"]
    assert len(table) == 3 and table[1].startswith("global") and "-" in table[2]
    assert len({len(line) for line in table}) == 1  # the last column is numeric, so right-aligned
    assert table[2].index("0.200") + 5 == table[0].index("z_median") + len("z_median")
    md = to_markdown(out, columns=["level", "z_median", "count"]).splitlines()
    assert md[0] == "| level | z_median | count |" and md[1] == "|---|---:|---:|" and len(md) == 4


# --------------------------------------------------------------------------- diagnostics and NUTS


def test_chain_diagnostics_flags_a_stuck_chain_and_matches_arviz() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 400, 3, generator=gen, dtype=torch.float64)
    x[0, :, 2] += 1.0  # one chain elsewhere
    r_hat, ess = chain_diagnostics(x)
    assert r_hat.shape == (3,) and ess.shape == (3,)
    assert r_hat[:2].max() < 1.01 and r_hat[2] > 1.05
    assert (ess[:2] > 800).all()
    az = pytest.importorskip("arviz")
    ds = az.convert_to_dataset({"a": x.numpy()})
    assert np.allclose(r_hat.numpy(), az.rhat(ds)["a"].values, rtol=1e-6)
    assert np.allclose(ess[:2].numpy(), az.ess(ds, method="bulk")["a"].values[:2], rtol=0.05)


def test_run_nuts_conjugate_model_matches_exact_posterior() -> None:
    data = conjugate_data()
    res = run_nuts(conjugate_model, data, num_warmup=200, num_samples=500, reparam="none", seed=1)
    assert set(res.samples) == {"mu", "theta"}
    assert res.samples["mu"].shape == (1000,) and res.samples["theta"].shape == (1000, 5)
    assert res.parameterization == "none" and res.num_chains == 2 and res.seconds > 0
    assert set(res.r_hat) == set(res.ess_bulk) == {"mu", "theta"}
    assert res.ok and res.divergences == 0
    assert max(res.r_hat.values()) < 1.01 and min(res.ess_bulk.values()) >= 100
    assert "ok" in res.summary() and "R-hat" in res.summary()
    check_against_exact(res, exact_posterior(data))


def test_run_nuts_noncentered_reports_original_sites() -> None:
    data = conjugate_data(seed=5)
    res = run_nuts(conjugate_model, data, num_warmup=150, num_samples=300, reparam="noncentered", seed=2)
    assert res.parameterization == "noncentered"
    assert set(res.samples) == {"mu", "theta"}  # no *_decentered sites
    assert res.samples["theta"].shape == (600, 5)
    assert max(res.r_hat.values()) < 1.05 and res.divergences == 0, res.summary()
    check_against_exact(res, exact_posterior(data))


def test_run_nuts_auto_retries_and_keeps_the_better_run(caplog: pytest.LogCaptureFixture) -> None:
    data = conjugate_data(groups=3, per_group=2)
    with caplog.at_level(logging.INFO, logger="amortize.validate.nuts"):
        res = run_nuts(conjugate_model, data, num_warmup=30, num_samples=30, num_chains=1, min_ess=1e9)
    assert not res.ok and "NOT ok" in res.summary()
    assert res.parameterization in ("none", "noncentered")
    assert set(res.samples) == {"mu", "theta"} and res.samples["theta"].shape == (30, 3)
    assert any("non-centered" in r.getMessage() for r in caplog.records)


def test_run_nuts_runs_without_jit_when_the_model_branches_on_a_latent(caplog: pytest.LogCaptureFixture) -> None:
    def branching_model(data: HierarchicalData) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        scale = 1.0 if mu > 100 else 1.0  # a Python branch on a latent: JIT tracing would freeze it
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(mu, scale), obs=data.y)

    with caplog.at_level(logging.WARNING, logger="amortize.validate.nuts"):
        res = run_nuts(branching_model, conjugate_data(), num_warmup=30, num_samples=30, num_chains=1)
    assert res.samples["mu"].shape == (30,)
    assert any("without JIT" in r.getMessage() for r in caplog.records)


def test_run_nuts_rejects_a_batch_of_datasets() -> None:
    data = conjugate_data()
    batch = data.with_response(torch.stack([data.y, data.y]))
    with pytest.raises(DataError, match="one dataset"):
        run_nuts(conjugate_model, batch)
    with pytest.raises(ValueError, match="reparam"):
        run_nuts(conjugate_model, data, reparam="centered")


def test_cached_nuts_reuses_a_stored_run_and_recovers_from_a_corrupted_entry(tmp_path, monkeypatch, caplog) -> None:
    from amortize.validate import nuts

    calls = []
    real = nuts.run_nuts
    monkeypatch.setattr(nuts, "run_nuts", lambda *a, **k: calls.append(1) or real(*a, **k))
    data, settings = conjugate_data(), {"num_warmup": 30, "num_samples": 30, "num_chains": 1, "seed": 3}
    first = nuts.cached_nuts(conjugate_model, data, tmp_path, **settings)
    again = nuts.cached_nuts(conjugate_model, data, tmp_path, **settings)
    assert len(calls) == 1 and torch.equal(first.samples["theta"], again.samples["theta"])
    assert again.r_hat == first.r_hat and again.ok == first.ok and again.parameterization == first.parameterization
    nuts.cached_nuts(conjugate_model, data, tmp_path, **{**settings, "seed": 4})  # other settings: a new run
    nuts.cached_nuts(conjugate_model, data.with_response(data.y + 1), tmp_path, **settings)  # other data
    assert len(calls) == 3 and len(list(tmp_path.glob("nuts-*.pt"))) == 3
    entry = sorted(tmp_path.glob("nuts-*.pt"), key=lambda p: p.stat().st_mtime)[0]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated: run again, overwrite
    with caplog.at_level(logging.WARNING, logger="amortize.validate.nuts"):
        nuts.cached_nuts(conjugate_model, data, tmp_path, **settings)
    assert len(calls) == 4 and any("unusable NUTS cache" in r.getMessage() for r in caplog.records)


def test_cached_reference_keeps_a_subclass_and_keys_by_source(tmp_path) -> None:
    """Another sampler's result (a NUTSResult subclass) is stored and rebuilt as its class; another
    source name over the same data and settings is another entry."""
    from dataclasses import dataclass

    from amortize.validate import nuts

    @dataclass
    class Timed(nuts.NUTSResult):
        compile_seconds: float = 0.0

    data = conjugate_data()
    base = nuts.run_nuts(conjugate_model, data, num_warmup=30, num_samples=30, num_chains=1, seed=3)
    calls = []

    def compute() -> Timed:
        calls.append(1)
        return Timed(**vars(base), compile_seconds=1.5)

    first = nuts.cached_reference(compute, "twin a", data, tmp_path, settings={"seed": 1}, cls=Timed)
    again = nuts.cached_reference(compute, "twin a", data, tmp_path, settings={"seed": 1}, cls=Timed)
    assert len(calls) == 1 and isinstance(again, Timed) and again.compile_seconds == 1.5
    assert torch.equal(first.samples["theta"], again.samples["theta"])
    assert nuts.cached_reference(compute, "twin b", data, tmp_path, run=False, settings={"seed": 1}) is None
    nuts.cached_reference(compute, "twin a", data, tmp_path, settings={"seed": 2}, cls=Timed)
    assert len(calls) == 2 and len(list(tmp_path.glob("nuts-*.pt"))) == 2


# --------------------------------------------------------------------------- reference loaders

needs_reference = pytest.mark.skipif(
    not reference.reference_dir().is_dir(), reason=f"no reference folder at {reference.reference_dir()}"
)


@needs_reference
def test_eight_schools_loader() -> None:
    y, sigma, draws = reference.eight_schools()
    assert y.tolist() == [28, 8, -3, 7, -1, 1, 18, 12]
    assert sigma.tolist() == [15, 10, 16, 11, 9, 11, 10, 18]
    assert draws["mu"].shape == (10000,) and draws["tau"].shape == (10000,) and draws["theta"].shape == (10000, 8)
    # published reference mean 4.4105 (MCSE 0.033)
    assert abs(float(draws["mu"].mean()) - 4.4105) < 3 * 0.033
    assert (draws["tau"] > 0).all()


@needs_reference
@pytest.mark.parametrize("prior", ["uniform", "halfnormal"])
def test_radon_minnesota_loader(prior: str) -> None:
    radon, moments = reference.radon_minnesota(prior)
    n = radon.log_radon.shape[0]
    assert n == 919 and radon.num_counties == 85
    assert radon.county.dtype == torch.long and int(radon.county.max()) == 84
    assert torch.equal(radon.county_log_uranium[radon.county], radon.log_uranium)
    shapes = {k: tuple(v.shape) for k, v in moments.mean.items()}
    assert shapes == {
        "county_effect_mean": (),
        "county_effect_scale": (),
        "county_effect": (85,),
        "weight": (3,),
        "log_radon_scale": (),
    }
    assert {k: tuple(v.shape) for k, v in moments.sd.items()} == shapes
    assert float(moments.mean["county_effect_mean"]) == pytest.approx(1.393, abs=1e-3)
    data = radon.to_hierarchical_data()
    assert data.size("county") == 85 and data.n_obs == 919


def test_missing_reference_folder_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("AMORTIZE_REFERENCE", str(missing))
    with pytest.raises(AmortizeError, match="nowhere") as err:
        reference.eight_schools()
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ValueError, match="prior"):
        reference.radon_minnesota("flat")


@pytest.mark.slow
@needs_reference
def test_run_nuts_eight_schools_agrees_with_posteriordb() -> None:
    y, sigma, draws = reference.eight_schools()
    data = HierarchicalData(["school"], {}, np.arange(8), y=y, covariates={"obs": {"sigma": sigma}})
    res = run_nuts(eight_schools, data, num_warmup=500, num_samples=1000, seed=3)
    assert res.ok, res.summary()
    rows = compare(res.samples, draws, levels={"theta": "school"})
    for row in rows:
        assert row["z"] < 4.5 / math.sqrt(res.ess_bulk[row["site"]]), row
        assert abs(row["coverage90"] - 0.9) < 0.05, row


def test_constant_elements_count_as_converged_and_are_left_out_of_comparisons() -> None:
    from amortize.validate.convergence import chain_diagnostics

    torch.manual_seed(0)
    x = torch.randn(2, 200, 3)
    x[..., 0] = 1.0  # e.g. L[0, 0] of a correlation Cholesky factor
    r_hat, ess = chain_diagnostics(x)
    assert r_hat[0] == 1.0 and ess[0] == 400 and r_hat[1:].max() < 1.05
    rows = compare({"L": x.reshape(400, 3)}, {"L": x.reshape(400, 3) + 0.0})
    assert [r["element"] for r in rows] == [(1,), (2,)]


# --------------------------------------------------------------------------- bench: references and reports


def test_reference_for_picks_the_models_reference(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    from amortize.errors import ConfigError, ReferenceNotFoundError
    from amortize.validate import bench

    assert bench.reference_for("amortize.models:eight_schools", "nuts") is None
    assert bench.reference_for("my.models:f") is None  # no published reference: NUTS
    with pytest.raises(ConfigError, match="'my.models:f'"):
        bench.reference_for("my.models:f", "reference")
    with pytest.raises(ConfigError, match="against"):
        bench.reference_for("amortize.models:eight_schools", "both")
    if reference.reference_dir().is_dir():
        ref = bench.reference_for("amortize.models:eight_schools")
        assert (
            ref.name == "posteriordb" and ref.data.size("school") == 8 and set(ref.posterior) == {"mu", "tau", "theta"}
        )
    monkeypatch.setenv("AMORTIZE_REFERENCE", str(tmp_path / "nowhere"))
    with caplog.at_level(logging.WARNING, logger="amortize.validate.bench"):
        assert bench.reference_for("amortize.models:eight_schools") is None  # files missing: NUTS, with a warning
    assert "nowhere" in caplog.text and "NUTS" in caplog.text
    with pytest.raises(ReferenceNotFoundError, match="nowhere"):
        bench.reference_for("amortize.models:eight_schools", "reference")


def test_report_without_nuts_has_no_nuts_time_or_speedup() -> None:
    from amortize.validate.heldout import Report

    rows = compare(
        {"mu": torch.randn(500)}, ReferenceMoments(mean={"mu": torch.tensor(0.0)}, sd={"mu": torch.tensor(1.0)})
    )
    report = Report(rows=rows, summary=summarize(rows), amortized_seconds=[0.5, 1.5])
    d = report.to_dict()
    assert d["amortized_seconds_per_dataset"] == 1.0 and d["nuts_seconds_per_dataset"] is None and d["speedup"] is None
    report.nuts_seconds = [10.0, 30.0]
    assert report.speedup == 20.0 and report.timings() == {"amortized_s": 1.0, "nuts_s": 20.0, "speedup": 20.0}
    lines = report.table(by="site").splitlines()
    assert lines[0].split()[:2] == ["site", "count"] and lines[1].startswith("mu") and "20.000" in lines[1]
    with pytest.raises(ValueError, match="by"):
        report.table(by="group")


def test_against_nuts_also_compares_the_corrected_draws() -> None:
    """``correct=True``: per dataset whether the correction applied and its k, and the rows of
    ``sample(correct=True)`` against the reference (here the exact posterior of the conjugate model)."""
    from amortize.validate.heldout import against_nuts, heldout_datasets

    def exact_draws(data: HierarchicalData, seed: int) -> NUTSResult:
        m = exact_posterior(data)  # independent normal draws with the exact means and sds suffice for z
        gen = torch.Generator().manual_seed(seed)
        samples = {
            k: (m.mean[k] + m.sd[k] * torch.randn(4000, *m.mean[k].shape, generator=gen, dtype=torch.float64)).float()
            for k in m.mean
        }
        return NUTSResult(samples, {}, {}, 0, 1.0, "exact", True)

    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))
    a = am.Amortizer(conjugate_model, sampler, hidden=16, seed=0)
    a.fit(steps=300, batch_size=32, progress=False)
    datasets = heldout_datasets(a, 3)
    report = against_nuts(a, datasets, 1000, reference=exact_draws, correct=True)
    assert [c["dataset"] for c in report.corrected] == [0, 1, 2]
    assert all(c["applied"] == (c["pareto_k"] <= 0.7) for c in report.corrected)
    assert sum(c["applied"] for c in report.corrected) >= 2
    levels = {r["level"] for r in report.corrected_summary}
    assert levels == {r["level"] for r in report.summary} and len(report.corrected_rows) == len(report.rows)
    fixed = a.posterior(datasets[1]).sample(1000, seed=1, correct=True)
    again = compare(fixed, exact_draws(datasets[1], 1).samples, {"theta": "group"})
    assert [r["z"] for r in report.corrected_rows if r["dataset"] == 1] == [r["z"] for r in again]
    mean_z = [sum(r["z"] for r in rows) / len(rows) for rows in (report.rows, report.corrected_rows)]
    assert mean_z[1] <= mean_z[0]  # the correction does not make the means worse here
    assert (
        "corrected_summary" in report.to_dict()
        and "corrected_summary" not in against_nuts(a, datasets[:1], 200, reference=exact_draws).to_dict()
    )
