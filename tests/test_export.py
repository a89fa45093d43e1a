"""The exports of one dataset's posterior: a full ArviZ InferenceData and the summary table."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.export import log_density

az = pytest.importorskip("arviz")


def clinics():
    """Ids that sort differently as text (clinic_10 before clinic_2) and by number."""
    labels = [f"clinic_{i}" for i in (10, 2, 2, 0, 1, 1, 10, 0)]
    y = [0.1, 0.3, -1.0, 2.0, 1.5, 1.7, 0.2, 0.4]
    return am.HierarchicalData.from_frame({"clinic": labels, "y": y}, levels=["clinic"], response="y")


def clinic_model(data):
    """The conjugate model of ``conftest.normal_known``, at level ``clinic``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("clinic", data.size("clinic")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("clinic")], 0.5), obs=data.y)


@pytest.fixture(scope="module")
def clinic_amortizer():
    sampler = am.StructureSampler(["clinic"], groups={"clinic": (3, 6)}, obs=(1, 4))
    a = am.Amortizer(clinic_model, sampler, hidden=16)
    a.fit(steps=20, batch_size=16, progress=False)
    return a


def test_group_ids_sort_in_natural_order():
    assert clinics().labels["clinic"] == ["clinic_0", "clinic_1", "clinic_2", "clinic_10"]


def test_full_inference_data_opens_in_arviz(clinic_amortizer, tmp_path):
    """summary, loo and plot_ppc work on the exported file; every group is there with named dims."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    data = clinics()
    post = clinic_amortizer.posterior(data)
    post.to_arviz(120, seed=0).to_netcdf(str(tmp_path / "x.nc"))
    idata = az.from_netcdf(str(tmp_path / "x.nc"))
    for group in ("posterior", "sample_stats", "log_likelihood", "posterior_predictive", "observed_data"):
        assert group in idata.groups(), group
    assert idata.posterior["theta"].dims == ("chain", "draw", "clinic")
    assert list(idata.posterior["clinic"].values) == ["clinic_0", "clinic_1", "clinic_2", "clinic_10"]
    assert idata.log_likelihood["y"].shape == (1, 120, data.n_obs)
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs")
    assert np.allclose(idata.observed_data["y"].values, data.y.numpy())
    assert idata.constant_data["clinic_index"].values.tolist() == data.index("clinic").tolist()
    attrs = idata.sample_stats.attrs
    assert {"pareto_k", "importance_ess", "ok", "reason"} <= set(attrs) and attrs["ok"] in (0, 1)
    assert idata.posterior.attrs["reason"] == attrs["reason"]
    assert idata.sample_stats["log_importance_weight"].shape == (1, 120)
    assert "theta[clinic_10]" in az.summary(idata, kind="stats").index
    with pytest.warns(UserWarning):  # 8 rows and a 20-step network: loo says its k are high
        loo = az.loo(idata, pointwise=True)
    assert loo.pareto_k.shape == (data.n_obs,) and math.isfinite(float(loo.elpd_loo))
    az.plot_ppc(idata, num_pp_samples=20)


def test_export_weights_and_log_likelihood_agree_with_the_posterior(clinic_amortizer):
    """log p(y, z) - log q from the export equals the posterior's own importance weights, and the
    per-row log likelihood is the Normal(theta_g, 0.5) density of each row."""
    data = clinics()
    post = clinic_amortizer.posterior(data)
    draws = post.sample(50, seed=1)
    joint, rows = log_density(post, draws)
    theta = draws["theta"][:, data.index("clinic")]  # [n, N]
    want = torch.distributions.Normal(theta.double(), 0.5).log_prob(data.y.double())
    assert torch.allclose(rows.double(), want, atol=1e-5)
    prior = torch.distributions.Normal(0.0, 2.0).log_prob(draws["mu"].double())
    groups = torch.distributions.Normal(draws["mu"][:, None].double(), 1.0).log_prob(draws["theta"].double())
    prior = prior + groups.sum(1)
    assert torch.allclose(joint, prior + want.sum(1), atol=1e-4)


def test_export_names_event_dims_and_refuses_a_batch(clinic_amortizer):
    from amortize.export import _event_dims

    assert _event_dims("weight", 1) == ["weight_element"] and _event_dims("L", 2) == ["L_row", "L_col"]
    data = clinics()
    with pytest.raises(am.DataError, match="one"):
        clinic_amortizer.posterior(data.with_response(torch.stack([data.y, data.y]))).to_arviz(10, seed=0)
    with pytest.raises(am.DataError, match="site 'theta'"):
        clinic_amortizer.posterior(data).to_arviz(10, seed=0, dims={"theta": ["extra"]})


def test_summary_is_an_arviz_layout_frame_with_z_against_a_reference(clinic_amortizer):
    """Means and sds of the frame are those of the draws; z against a reference made from the same
    draws shifted by one reference sd is 1 for every row (an exact, not a Monte Carlo, identity)."""
    post = clinic_amortizer.posterior(clinics())
    frame = post.summary(400, seed=2)
    assert list(frame.columns) == ["mean", "sd", "5%", "95%", "mcse_mean", "mcse_sd", "ess"]
    assert list(frame.index) == ["mu", "theta[clinic_0]", "theta[clinic_1]", "theta[clinic_2]", "theta[clinic_10]"]
    draws = post.sample(400, seed=2)
    assert abs(frame.loc["mu", "mean"] - float(draws["mu"].mean())) < 1e-6
    assert frame.loc["mu", "mcse_mean"] == pytest.approx(frame.loc["mu", "sd"] / math.sqrt(frame.attrs["ess"]))
    assert {"pareto_k", "ess", "ok", "reason"} <= set(frame.attrs)
    ref = {k: v - v.std(0) for k, v in draws.items()}
    z = post.summary(400, seed=2, reference=ref)["z"]
    assert np.allclose(z.values, 1.0, atol=1e-6)
    lines = frame.to_string().splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned whatever the label length


def test_pareto_k_comes_with_its_spread_over_independent_sets(clinic_amortizer):
    """repeats=4: four independent sets of draws, the first the very set of a one-set call (same seed),
    k and ESS from all 400 pooled; with a response 30x the training scale every seed says not ok."""
    data = clinics()
    post = clinic_amortizer.posterior(data)
    for s in range(3):
        one = post.diagnostics(100, seed=s)
        four = post.diagnostics(100, seed=s, repeats=4)
        assert len(four["pareto_k_sets"]) == 4 and four["num_samples"] == 400
        assert four["pareto_k_sets"][0] == pytest.approx(one["pareto_k"]) and four["ess"] > one["ess"]
        assert (four["reason"] == "ok") == four["ok"]
    far = clinic_amortizer.posterior(data.with_response(30 * data.y))
    decisions = [far.diagnostics(100, seed=s, repeats=4) for s in range(4)]
    assert not any(d["ok"] for d in decisions)
    assert all("Pareto k" in d["reason"] or "importance ESS" in d["reason"] for d in decisions)
