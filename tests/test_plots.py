"""Tests of amortize/plots.py: per-site figures against reference draws or moments, and TensorBoard images."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import amortize as am
from amortize.validate import ReferenceMoments, plots

pytest.importorskip("matplotlib")
LEVELS = {"mu": None, "beta": None, "theta": "group"}


def _draws(n: int, shift: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "mu": torch.randn(n, generator=g) + shift,  # [n]
        "beta": torch.randn(n, 3, generator=g) * 2,  # [n, 3]: one panel per element
        "theta": torch.randn(n, 5, generator=g) + torch.arange(5.0),  # [n, G=5]
    }


def test_one_figure_per_common_site_with_draws_or_moments():
    draws, ref = _draws(400), _draws(300, shift=0.5, seed=1)
    del ref["beta"]  # a site only in the draws gets no figure
    figs = plots.marginal_figures(draws, ref, LEVELS, labels={"group": list("abcde")})
    assert list(figs) == ["mu", "theta"]
    assert len(figs["mu"].axes) == 1 and len(figs["theta"].axes) == 2  # histogram; means and sds
    assert figs["mu"].axes[0].get_title().startswith("mu: z ")
    moments = ReferenceMoments(
        mean={k: v.mean(0) for k, v in draws.items()}, sd={k: v.std(0) for k, v in draws.items()}
    )
    figs = plots.marginal_figures(draws, moments, LEVELS, label="Inference Gym")
    assert list(figs) == ["mu", "beta", "theta"] and len(figs["beta"].axes) == 3
    assert "Inference Gym" in figs["theta"].axes[0].get_xlabel()
    img = plots.to_rgb(figs["beta"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > img.shape[0]
    assert img.std() > 0  # something was drawn


def test_degenerate_draws_still_plot():
    draws = {"mu": torch.zeros(50), "theta": torch.ones(50, 2)}  # constant: zero-width bins and sds
    figs = plots.marginal_figures(draws, {"mu": torch.zeros(40), "theta": torch.ones(40, 2)}, LEVELS)
    assert all(plots.to_rgb(f).size for f in figs.values())


def test_write_tensorboard_images_and_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figs = plots.marginal_figures(_draws(200), _draws(200, seed=1), LEVELS)
    png = plots.save_png(figs["mu"], tmp_path / "x.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*.tmp"))
    images = {**figs, "from_png": plots.to_rgb(figs["mu"])}
    tags = plots.write_tensorboard(
        tmp_path / "tb", images, step=7, prefix="t/", scalars={"z": 0.5, "bad": float("nan")}
    )
    assert tags == ["t/mu", "t/beta", "t/theta", "t/from_png"]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(tags) and acc.Tags()["scalars"] == ["t/z"]
    assert acc.Images("t/theta")[0].step == 7 and acc.Images("t/theta")[0].encoded_image_string[:4] == b"\x89PNG"


def test_available_without_matplotlib(monkeypatch):
    assert plots.available()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots.available()


def test_workflow_figures(amortizer):
    """Recovery and z-vs-contraction on held-out simulations (seeded, RNG left alone), a pair plot of
    the globals and a PPC figure: one panel per element, statistic or pair."""
    pytest.importorskip("matplotlib")
    from amortize.predictive import ppc
    from amortize.validate.workflow_plots import pair_figure, ppc_figure, recovery_draws, recovery_figures

    state = torch.get_rng_state()
    truths, draws = recovery_draws(amortizer, 5, 40, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    again, _ = recovery_draws(amortizer, 5, 40, seed=3)
    assert [float(t["mu"]) for t in truths] == [float(t["mu"]) for t in again]
    assert set(truths[0]) == {"mu"} and draws[0]["mu"].shape == (40,)
    figs = recovery_figures(amortizer, 5, 40, seed=3)
    (ax,) = [a for a in figs["recovery"].axes if a.get_visible()]
    assert ax.get_title().startswith("mu: 90% intervals cover")
    assert len(figs["contraction"].axes[0].collections) == 1  # one scatter: mu
    pairs = pair_figure({"mu": torch.randn(50), "b": torch.randn(50, 2)}, ["mu", "b"], {"mu": torch.randn(30)})
    assert len([a for a in pairs.axes if a.get_visible()]) == 6  # 3 elements: 3 diagonal + 3 below
    data = am.HierarchicalData(["group"], {}, torch.tensor([0, 0, 1]), y=torch.tensor([0.0, 1.0, 2.0]))
    fig = ppc_figure(ppc(data, torch.randn(20, 3)))
    assert len([a for a in fig.axes if a.get_visible()]) == 8
