"""Workflow figures beside :mod:`.plots`: posterior predictive checks, recovery on held-out simulations,
z-score against posterior contraction, and a pair plot of the global sites.

* :func:`ppc_figure`: one panel per test statistic, the histogram of its replicated values with the
  observed value as a line and the p-value in the title (:class:`amortize.predictive.PPCResult`).
* :func:`recovery_figure`: per site element, the true value (the simulation's) against the posterior
  mean with a central 90% interval, over held-out simulated datasets, with the identity line.
* :func:`contraction_figure`: posterior z-score ``(mean - truth) / sd`` against posterior contraction
  ``1 - sd^2 / prior_var`` (Schad, Betancourt, Vasishth 2021): good points sit at the right, |z| < 2.
* :func:`pair_figure`: the global sites' draws, pairwise scatter below the diagonal, histograms on it.

Example:
    >>> save_png(ppc_figure(post.ppc(500, seed=0)), "ppc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..plates import seeded
from ..simulate import simulate
from .metrics import to_numpy
from .plots import AMORTIZED, REFERENCE, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..amortizer import Amortizer

__all__ = [
    "ppc_figure",
    "recovery_figure",
    "contraction_figure",
    "pair_figure",
    "elements",
    "recovery_draws",
    "recovery_figures",
]

MAX_PAIRS = 8  # global elements in a pair plot (a model with more shows its first 8)


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def ppc_figure(result: Any) -> Figure:
    """Histogram of each statistic over the replicated datasets, the observed value as a line."""
    rows, cols = _grid(len(result.rows))
    fig = new_figure(3.0 * cols, 2.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, row in zip(axes, result.rows):
        name = row["statistic"]
        ax.hist(result.replicated[name].numpy(), bins=30, color=AMORTIZED, alpha=0.7)
        ax.axvline(row["observed"], color=REFERENCE, lw=2)
        ax.set_title(f"{name}\np = {row['p_value']:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(result.rows) :]:
        ax.set_visible(False)
    fig.suptitle(f"posterior predictive check ({result.num_samples} replicated datasets; line: observed)", fontsize=9)
    return fig


def elements(draws: Mapping[str, Any], sites: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"mu": [n, ...], "beta[1]": [n, ...]}``: each element of ``sites`` flattened (first axis kept)."""
    out = {}
    for s in sites:
        v = to_numpy(draws[s])
        flat = v.reshape(v.shape[0], -1) if v.ndim > 1 else v[:, None]
        for j in range(flat.shape[1]):
            out[s if flat.shape[1] == 1 else f"{s}[{j}]"] = flat[:, j]
    return out


def recovery_figure(
    truths: Sequence[Mapping[str, Any]], draws: Sequence[Mapping[str, Any]], sites: Sequence[str]
) -> Figure:
    """Truth against posterior mean with 90% intervals over held-out datasets (one panel per global
    element; ``truths[i]`` the simulated values of dataset i, ``draws[i]`` its draws ``{site: [n, ...]}``)."""
    t = [elements({s: to_numpy(x[s])[None] for s in sites}, sites) for x in truths]
    d = [elements(x, sites) for x in draws]
    names = list(t[0]) if t else []
    rows, cols = _grid(len(names))
    fig = new_figure(3.0 * cols, 2.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, name in zip(axes, names):
        truth = np.array([x[name][0] for x in t])
        mean = np.array([x[name].mean() for x in d])
        lo, hi = np.array([np.quantile(x[name], [0.05, 0.95]) for x in d]).T
        ax.errorbar(truth, mean, yerr=[mean - lo, hi - mean], fmt="o", ms=3, color=AMORTIZED, alpha=0.7, lw=0.8)
        lims = [min(truth.min(), lo.min()), max(truth.max(), hi.max())]
        ax.plot(lims, lims, color="grey", lw=0.8, ls="--")
        inside = float(np.mean((lo <= truth) & (truth <= hi)))
        ax.set_title(f"{name}: 90% intervals cover {inside:.0%}", fontsize=8)
        ax.set_xlabel("truth", fontsize=7)
        ax.set_ylabel("posterior mean", fontsize=7)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return fig


def contraction_figure(
    truths: Sequence[Mapping[str, Any]],
    draws: Sequence[Mapping[str, Any]],
    prior_draws: Mapping[str, Any],
    sites: Sequence[str],
) -> Figure:
    """z-score against posterior contraction, one colour per global element, over held-out datasets."""
    prior = elements(prior_draws, sites)
    fig = new_figure(5.0, 3.8)
    ax = fig.subplots()
    for name, p in prior.items():
        zs, cs = [], []
        for x, dr in zip(truths, draws):
            truth = elements({s: to_numpy(x[s])[None] for s in sites}, sites)[name][0]
            v = elements(dr, sites)[name]
            sd = v.std(ddof=1)
            zs.append((v.mean() - truth) / sd if sd > 0 else np.nan)
            cs.append(1.0 - sd**2 / p.var(ddof=1) if p.var() > 0 else np.nan)
        ax.scatter(cs, zs, s=12, label=name, alpha=0.8)
    ax.axhline(0, color="grey", lw=0.8)
    for z in (-2, 2):
        ax.axhline(z, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("posterior contraction  1 - var_post / var_prior", fontsize=8)
    ax.set_ylabel("posterior z-score", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    return fig


def pair_figure(draws: Mapping[str, Any], sites: Sequence[str], reference: Mapping[str, Any] | None = None) -> Figure:
    """Pair plot of the global elements' draws (reference draws, when given, in the second colour)."""
    ours = elements(draws, sites)
    names = list(ours)[:MAX_PAIRS]
    ref = elements(reference, [s for s in sites if s in reference]) if reference is not None else {}
    n = len(names)
    fig = new_figure(1.9 * n + 0.5, 1.9 * n + 0.3)
    axes = np.atleast_2d(fig.subplots(n, n, squeeze=False))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ax = axes[i, j]
            ax.tick_params(labelsize=6)
            if j > i:
                ax.set_visible(False)
            elif i == j:
                bins = np.histogram_bin_edges(np.concatenate([ours[a], ref.get(a, ours[a])]), 30)
                ax.hist(ours[a], bins=bins, color=AMORTIZED, alpha=0.6, density=True)
                if a in ref:
                    ax.hist(ref[a], bins=bins, color=REFERENCE, alpha=0.5, density=True)
            else:
                if b in ref and a in ref:
                    ax.scatter(ref[b], ref[a], s=2, color=REFERENCE, alpha=0.3)
                ax.scatter(ours[b], ours[a], s=2, color=AMORTIZED, alpha=0.3)
            if i == n - 1:
                ax.set_xlabel(b, fontsize=7)
            if j == 0:
                ax.set_ylabel(a, fontsize=7)
    return fig


def recovery_draws(
    amortizer: Amortizer, num_datasets: int, num_samples: int, seed: int
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """``(truths, draws)`` of the global sites on ``num_datasets`` prior-predictive simulations (structures
    from the training sampler, seeded; the caller's RNG is left as it was)."""
    st = amortizer.structure
    sites = [s for s in st.latents if s.level is None]
    gen = torch.Generator().manual_seed(seed)
    truths, draws = [], []
    with seeded(seed):
        while len(truths) < num_datasets:
            sim = simulate(amortizer.model, st, amortizer.sampler.sample(gen), 1)
            if not sim.data.batch_size:
                continue  # dropped (non-finite): draw another
            truths.append({s.name: st.to_user(s, sim.latents[s.name])[0, 0] for s in sites})
            post = amortizer.posterior(sim.data.with_response(sim.data.y[0]), seed=seed + len(truths))
            draws.append({k: v for k, v in post.sample(num_samples).items() if k in truths[-1]})
    return truths, draws


def recovery_figures(amortizer: Amortizer, num_datasets: int, num_samples: int, seed: int) -> dict[str, Figure]:
    """``{"recovery", "contraction"}`` figures of the global sites on held-out simulations (the prior
    variance of the contraction from the simulations' own true values)."""
    truths, draws = recovery_draws(amortizer, num_datasets, num_samples, seed)
    sites = list(truths[0]) if truths else []
    prior = {s: torch.stack([t[s] for t in truths]) for s in sites}
    return {
        "recovery": recovery_figure(truths, draws, sites),
        "contraction": contraction_figure(truths, draws, prior, sites),
    }
