"""The speed benchmark's NumPyro model (the ``bench`` extra) and a tiny run of experiments/bench/speed.py.

Skipped when numpyro is not installed: ``pip install 'amortize[bench]'``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyro import poutine

import amortize as am
from amortize.models import gaussian_2level

pytest.importorskip("numpyro")
pytest.importorskip("jax")

import numpyro_models as nm  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "speed.py"


def _pyro_log_joint(values: dict[str, torch.Tensor], data: am.HierarchicalData) -> float:
    trace = poutine.trace(poutine.condition(gaussian_2level, data=values)).get_trace(data)
    return float(trace.log_prob_sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpyro_log_density_equals_pyro_log_joint(seed):
    """Same values, same ragged data: the two log joints agree to float32 rounding, and the tolerance
    is far tighter than what a small change of any one latent (or of the data) moves them by."""
    gen = torch.Generator().manual_seed(seed)
    data = am.StructureSampler(["group"], groups={"group": (7, 7)}, obs=(1, 9)).sample(gen)
    data = data.with_response(2.0 * torch.randn(data.n_obs, generator=gen))
    values = {
        "mu": torch.randn((), generator=gen),
        "tau": torch.rand((), generator=gen) + 0.2,
        "sigma": torch.rand((), generator=gen) + 0.3,
        "theta": torch.randn(7, generator=gen),
    }
    lp_pyro = _pyro_log_joint(values, data)
    lp_numpyro = nm.log_density(values, data)
    tol = 1e-5 * abs(lp_pyro) + 1e-4
    assert abs(lp_numpyro - lp_pyro) <= tol, (lp_numpyro, lp_pyro)
    for site in values:  # the check could fail: nudging one latent moves the density by much more
        nudged = {**values, site: values[site] * 1.02}
        assert abs(nm.log_density(nudged, data) - lp_pyro) > 10 * tol, site
    other = data.with_response(data.y + 0.05)
    assert abs(nm.log_density(values, other) - lp_pyro) > 10 * tol


@pytest.mark.parametrize("seed", [0, 1])
def test_numpyro_3level_log_density_equals_pyro_log_joint(seed):
    from amortize.models import gaussian_3level

    gen = torch.Generator().manual_seed(seed)
    data = am.StructureSampler(["district", "school"], groups={"district": (3, 3), "school": (1, 4)}, obs=(1, 6))
    data = data.sample(gen)
    data = data.with_response(2.0 * torch.randn(data.n_obs, generator=gen))
    values = {
        "mu": torch.randn((), generator=gen),
        "tau_district": torch.rand((), generator=gen) + 0.2,
        "tau_school": torch.rand((), generator=gen) + 0.2,
        "sigma": torch.rand((), generator=gen) + 0.3,
        "alpha": torch.randn(3, generator=gen),
        "beta": torch.randn(data.size("school"), generator=gen),
    }
    lp_pyro = float(poutine.trace(poutine.condition(gaussian_3level, data=values)).get_trace(data).log_prob_sum())
    lp_numpyro = nm.log_density(values, data, "gaussian_3level")
    tol = 1e-5 * abs(lp_pyro) + 1e-4
    assert abs(lp_numpyro - lp_pyro) <= tol, (lp_numpyro, lp_pyro)
    for site in values:  # a small move of any one latent changes the density by far more than tol
        nudged = {**values, site: values[site] + 0.1}
        assert abs(nm.log_density(nudged, data, "gaussian_3level") - lp_pyro) > 10 * tol, site
    shuffled = data.with_response(data.y.flip(0))
    assert abs(nm.log_density(values, shuffled, "gaussian_3level") - lp_pyro) > 10 * tol
    with pytest.raises(am.DataError, match="levels"):
        nm.log_density(values, data, "gaussian_2level")


def test_numpyro_nuts_recovers_a_known_dataset():
    """A short NumPyro NUTS run on a dataset with many rows per group centres theta near the group means."""
    gen = torch.Generator().manual_seed(3)
    group = torch.arange(6).repeat_interleave(40)
    truth = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    data = am.HierarchicalData(["group"], {}, group, y=truth[group] + 0.3 * torch.randn(240, generator=gen))
    res = nm.run_numpyro_nuts(data, num_warmup=150, num_samples=150, reparam="none", seed=1)
    assert res.samples["theta"].shape == (300, 6) and res.samples["mu"].shape == (300,)
    assert (res.samples["theta"].mean(0) - truth).abs().max() < 0.2
    assert 0.2 < float(res.samples["sigma"].mean()) < 0.4
    assert 0 <= res.compile_seconds <= res.seconds and res.run_seconds >= 0


def test_import_amortize_does_not_import_jax():
    code = "import sys, amortize, amortize.validate, amortize.cli; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_speed_bench_tiny_run_writes_its_results(tmp_path, capsys):
    """Two tiny sizes: 8 groups (outside the shipped training range: its own fixed-structure amortizer,
    Pyro NUTS run) and 12 groups (the shared amortizer; 'large' here: reduced NUTS, no Pyro NUTS)."""
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--groups", "8", "12", "--datasets", "1", "--steps", "3", "--batch-size", "4", "--draws", "40"]
    args += ["--repeats", "1", "--nuts-warmup", "20", "--nuts-draws", "20", "--nuts-reparam", "none"]
    args += ["--large-groups", "10", "--large-steps", "2", "--large-batch-size", "2", "--large-pilot", "1"]
    args += ["--large-nuts-warmup", "10", "--large-nuts-draws", "10", "--svi-steps", "5", "--out", str(tmp_path)]
    args += ["--batch", "3"]
    assert bench.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    small, large = results["sizes"]
    assert (small["groups"], large["groups"]) == (8, 12)
    assert small["structure"] == "one fixed structure" and large["structure"] == "one structure per dataset"
    assert small["pyro_nuts"] and not large["pyro_nuts"] and large["nuts_settings"]["reduced"]
    for entry in (small, large):
        s = entry["seconds_per_dataset"]
        assert s["amortized"] > 0 and s["numpyro_nuts"] >= s["numpyro_nuts_run"] > 0 and s["pyro_svi"] > 0
        assert entry["amortizer"]["train_seconds"] > 0
        assert entry["speedup_vs"]["numpyro_nuts"] == pytest.approx(s["numpyro_nuts"] / s["amortized"])
        assert {"amortized", "pyro_svi"} <= set(entry["accuracy"])
        assert entry["accuracy"]["amortized"]["group_z_median"] >= 0
    assert small["seconds_per_dataset"]["pyro_nuts"] > 0 and "pyro_nuts" in small["accuracy"]
    # batched timing (3 datasets of one structure per call) where NUTS is not reduced
    b = small["seconds_per_dataset"]["amortized_batched"]
    assert b > 0 and small["batch"] == 3 and large["seconds_per_dataset"]["amortized_batched"] is None
    assert small["speedup_batched_vs"]["numpyro_nuts"] == pytest.approx(
        small["seconds_per_dataset"]["numpyro_nuts"] / b
    )
    assert large["seconds_per_dataset"]["numpyro_nuts_run_full_est"] > large["seconds_per_dataset"]["numpyro_nuts_run"]
    text = (tmp_path / "results.md").read_text()
    assert "3 datasets of one structure per call" in text
    assert "NumPyro NUTS, run only" in text and "break_even_vs_numpyro" in text and "REDUCED" in text
    assert text in capsys.readouterr().out


def test_crossed_bench_large_arm_tiny_run_writes_its_results(tmp_path):
    """The large arm end to end on a tiny design, NUTS included: its row count survives the NUTS report."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "crossed.py"
    spec = importlib.util.spec_from_file_location("bench_crossed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--arms", "large", "--large-design", "12", "5", "3", "--large-steps", "2", "--batch", "2"]
    args += ["--large-nuts", "--nuts-warmup", "10", "--nuts-samples", "10", "--draws", "20", "--nuts-cache", ""]
    args += ["--large-elbo-steps", "2"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    large = json.loads((tmp_path / "results.json").read_text())["arms"]["large"]
    assert (large["persons"], large["items"]) == (12, 5) and 12 <= large["n_rows"] <= 60
    npe, elbo = large["stages"]["npe"], large["stages"]["then elbo"]
    assert npe["steps"] == 2 and len(npe["nuts"]) == 1 and "ok" in npe["nuts"][0]
    assert elbo["steps"] == 2 and len(elbo["nuts"]) == 1 and elbo["seconds"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "12 students x 5 lecturers" in text and "**then elbo**: 2 steps" in text
