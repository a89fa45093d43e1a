"""Tests of amortize.validate.ecdf (simultaneous ECDF bands) and amortize.validate.sbc.

SBC is checked against an oracle amortizer whose posterior is the exact conjugate posterior: it
must pass, and the same oracle made overconfident or biased must fail. Tolerances of stochastic
checks are derived from the binomial Monte Carlo error of the nominal level.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.cli import main
from amortize.simulate import Simulation
from amortize.structure import trace_structure
from amortize.validate import ecdf_band, ecdf_test, sbc
from amortize.validate.sbc import SBCResult

from .conftest import normal_known

PRIOR_SD, GROUP_SD, NOISE_SD = 2.0, 1.0, 0.5  # normal_known's constants


# --------------------------------------------------------------------------- ECDF bands
@pytest.mark.parametrize("num,values,points", [(100, 50, None), (200, 1000, None), (60, 1000, 20)])
def test_band_covers_uniform_ranks_at_nominal_level(num, values, points):
    band = ecdf_band(num, values, alpha=0.05, num_points=points, seed=1)
    rng = np.random.default_rng(123)
    reps = 1500
    inside = np.mean([ecdf_test(rng.integers(0, values, num), band).inside for _ in range(reps)])
    se = math.sqrt(0.95 * 0.05 / reps)  # binomial MC error of the coverage estimate
    assert abs(inside - 0.95) < 4 * se + 0.01  # + the band's own simulation error (5000 null ECDFs)


def test_band_shape_and_adjusted_level():
    band = ecdf_band(200, 1000, alpha=0.05, seed=0)
    assert band.p.size == 199 and np.all(np.diff(band.p) > 0)
    assert 0 < band.gamma < 0.05  # simultaneous coverage needs a smaller pointwise level
    assert np.all(band.lower <= band.num * band.p) and np.all(band.upper >= band.num * band.p)
    same = ecdf_band(200, 1000, alpha=0.05, seed=0)
    assert same.gamma == band.gamma  # seeded
    assert ecdf_band(200, 1000, alpha=0.01, seed=0).gamma < band.gamma
    d = band.to_dict()
    assert len(d["lower_diff"]) == 199 and max(d["lower_diff"]) <= 0 <= min(d["upper_diff"])


def test_p_values_uniform_under_null_and_small_for_miscalibration():
    band = ecdf_band(100, 100, alpha=0.05, seed=2)
    rng = np.random.default_rng(7)
    p = np.array([ecdf_test(rng.integers(0, 100, 100), band).p_value for _ in range(1000)])
    se = math.sqrt(0.1 * 0.9 / 1000)
    assert abs(np.mean(p < 0.1) - 0.1) < 4 * se + 0.01
    narrow = np.clip((rng.beta(3, 3, 100) * 100).astype(int), 0, 99)  # ranks piled in the middle: q too wide
    test = ecdf_test(narrow, band)
    assert not test.inside and test.p_value < 0.01


def test_ecdf_test_refuses_bad_ranks():
    band = ecdf_band(10, 20, seed=0)
    with pytest.raises(ValueError, match="ranks for a band"):
        ecdf_test(np.zeros(9, dtype=int), band)
    with pytest.raises(ValueError, match="ranks must lie"):
        ecdf_test(np.full(10, 20), band)
    with pytest.raises(ValueError, match="alpha"):
        ecdf_band(10, 20, alpha=0.0001, simulations=1000)


# --------------------------------------------------------------------------- SBC with an oracle
class _ExactPosterior:
    def __init__(self, data: am.HierarchicalData, width: float, shift: float) -> None:
        self.data, self.width, self.shift = data, width, shift

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        d = self.data
        G, idx = d.size("group"), d.index("group")
        counts = d.counts("group").double()
        prec = torch.zeros(G + 1, G + 1, dtype=torch.float64)
        prec[0, 0] = PRIOR_SD**-2 + G * GROUP_SD**-2
        prec[0, 1:] = prec[1:, 0] = -(GROUP_SD**-2)
        prec[1:, 1:] += torch.diag(GROUP_SD**-2 + counts * NOISE_SD**-2)
        cov = torch.linalg.inv(prec)
        sums = torch.zeros(d.batch_size, G, dtype=torch.float64).index_add(1, idx, d.y.double())  # [B, G]
        mean = torch.cat([torch.zeros(d.batch_size, 1, dtype=torch.float64), sums * NOISE_SD**-2], 1) @ cov  # [B, G+1]
        z = torch.randn(n, d.batch_size, G + 1, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        x = mean + self.width * z + self.shift * cov.diagonal().sqrt()  # [n, B, G+1]
        return {"mu": x[..., 0].float(), "theta": x[..., 1:].float()}


class Oracle:
    """Duck-typed amortizer for ``normal_known`` whose posterior is exact (``width`` x its sd, shifted
    by ``shift`` sds): what :func:`sbc` needs of an amortizer and nothing more."""

    def __init__(self, width: float = 1.0, shift: float = 0.0) -> None:
        self.model = normal_known
        self.sampler = am.StructureSampler(["group"], groups={"group": (2, 6)}, obs=(1, 5))
        self.structure = trace_structure(normal_known, self.sampler.sample(torch.Generator().manual_seed(0)))
        self.device = torch.device("cpu")
        self.width, self.shift = width, shift

    def simulate_batch(self, gen: torch.Generator, n: int) -> Simulation:
        return am.simulate(self.model, self.structure, self.sampler.sample(gen), n)

    def posterior(self, data: am.HierarchicalData) -> _ExactPosterior:
        return _ExactPosterior(data, self.width, self.shift)


def test_sbc_passes_for_the_exact_posterior():
    oracle = Oracle()
    state = torch.get_rng_state()
    res = sbc(oracle, num_datasets=200, num_samples=99, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    assert isinstance(res, SBCResult) and res.passed, res.table()
    assert [r["quantity"] for r in res.rows] == ["mu", "theta (random group)", "theta (group mean)"]
    assert all(r.shape == (200,) and r.min() >= 0 and r.max() <= 99 for r in res.ranks.values())
    assert res.alpha_per_quantity == pytest.approx(0.05 / 3)
    again = sbc(Oracle(), num_datasets=200, num_samples=99, seed=3)
    assert all(np.array_equal(res.ranks[q], again.ranks[q]) for q in res.ranks)  # seeded
    json.dumps(res.to_dict(), allow_nan=False)
    assert "mu" in res.table() and "pass" in res.table()
    for r in res.rows:  # 200 datasets: binomial sd of a 90% coverage is 0.021, of the mean rank 0.020
        assert abs(r["coverage90"] - 0.9) < 0.07 and abs(r["mean_rank"] - 0.5) < 0.07, r


@pytest.mark.parametrize("width,shift", [(0.5, 0.0), (2.0, 0.0), (1.0, 0.7)])
def test_sbc_fails_a_miscalibrated_posterior(width, shift):
    res = sbc(Oracle(width, shift), num_datasets=200, num_samples=99, seed=4)
    assert not res.passed and set(res.failed()) == set(res.ranks), res.table()
    mu = res.rows[0]
    if width < 1:  # too narrow: the truth falls outside the 90% interval far more often
        assert mu["coverage90"] < 0.75
    elif width > 1:
        assert mu["coverage90"] > 0.97
    else:  # shifted by +0.7 sd: the draws sit above the truth, low ranks
        assert mu["mean_rank"] < 0.4


def test_sbc_plots(tmp_path):
    pytest.importorskip("matplotlib")
    res = sbc(Oracle(), num_datasets=40, num_samples=19, seed=0)
    for kind in ("ecdf", "hist"):
        res.plot(tmp_path / f"{kind}.png", kind)
        assert (tmp_path / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="kind"):
        res.plot(tmp_path / "x.png", "violin")


def vector_model(data: am.HierarchicalData) -> None:
    """A global site with an event shape and a group site with one: one quantity per element."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("group", data.size("group")):
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))  # [..., G, 2]
    with pyro.plate("obs", data.n_obs):
        loc = w[..., :1].sum(-1) + b[..., data.index("group"), 0] + b[..., data.index("group"), 1]
        pyro.sample("y", dist.Normal(loc, 1.0), obs=data.y)


def test_sbc_runs_on_a_real_amortizer_with_event_shapes():
    sampler = am.StructureSampler(["group"], groups={"group": (2, 4)}, obs=(1, 3))
    a = am.Amortizer(vector_model, sampler, hidden=8, flow_bins=0)
    res = sbc(a, num_datasets=6, num_samples=9, datasets_per_structure=4)
    names = [r["quantity"] for r in res.rows]
    expected = ["w[0]", "w[1]", "b[0] (random group)", "b[1] (random group)", "b[0] (group mean)", "b[1] (group mean)"]
    assert names == expected
    assert all(len(r) == 6 for r in res.ranks.values())


# --------------------------------------------------------------------------- CLI
TINY = """\
name: tiny
model: amortize.models:gaussian_2level
network: {hidden: 8}
structure: {levels: [group], groups: {group: [3, 5]}, obs: [2, 4]}
train: {steps: 4, batch_size: 8, pilot_structures: 2, log_every: 2, warmup: 2}
"""


def _cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_sbc_writes_json_and_plots(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    run = tmp_path / "run"
    code, _, err = _cli("train", tmp_path / "tiny.yaml", "--quiet", "--run-dir", run)
    assert code == 0, err
    code, out, err = _cli("sbc", run, "--datasets", 20, "--num-samples", 19, "--quiet")
    assert code in (0, 1), err  # 1: a quantity failed (a 4-step training may well be miscalibrated)
    assert "quantity" in out and "tau" in out and "theta (group mean)" in out
    result = json.loads((run / "sbc.json").read_text())
    assert result["num_datasets"] == 20 and result["num_draws"] == 19 and len(result["ranks"]["mu"]) == 20
    assert (code == 0) == result["passed"]
    if pytest.importorskip("matplotlib"):
        assert (run / "sbc_ecdf.png").is_file() and (run / "sbc_hist.png").is_file()
    assert not list(run.glob(".*.tmp"))
    code, _, _ = _cli("sbc", run, "--datasets", 10, "--num-samples", 9, "--quiet", "--json", tmp_path / "o" / "s.json")
    assert code in (0, 1) and (tmp_path / "o" / "s.json").is_file()
