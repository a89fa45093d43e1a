"""Simulation-based calibration (Talts et al. 2018) of a trained amortizer, with simultaneous ECDF bands.

For each of N datasets simulated from the prior predictive (on structures from the amortizer's
training sampler), the true latent values are ranked among L posterior draws. If the amortized
posterior is calibrated, every rank is uniform on ``{0, ..., L}``. Amortized draws are independent,
so no thinning is needed (thinning only fights MCMC autocorrelation); ranks are computed from all L
draws and the ECDF is checked at ``K = min(N, L + 1)`` points (see :mod:`amortize.validate.ecdf`).

Quantities tested:

* every element of every global site (``mu``, ``weight[1]``);
* for each group-level site (and event element), two scalar functionals per dataset, each with
  exactly one rank per dataset so that the N ranks are independent:
  ``site (random group)``, the value of one group drawn at random (seeded, independent of the
  data), and ``site (group mean)``, the mean over the dataset's groups. Pooling the ranks of all
  groups would make the ranks within a dataset dependent and the binomial bands too narrow.

Each quantity passes when its rank ECDF stays inside the simultaneous band; with
``familywise=True`` (default) every band has level ``1 - alpha / m`` for m quantities (Bonferroni),
so that a calibrated amortizer passes *all* of them with probability at least ``1 - alpha``.

Example:
    >>> res = sbc(amortizer, num_datasets=200, num_samples=999, seed=0)  # doctest: +SKIP
    >>> res.passed, res.plot("sbc_ecdf.png")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import AmortizeError
from . import plots
from .ecdf import ECDFBand, ecdf_band, ecdf_test, ranks_of
from .metrics import format_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..amortizer import Amortizer

__all__ = ["SBCResult", "sbc"]

log = logging.getLogger(__name__)
RANDOM, MEAN = "random group", "group mean"


@dataclass
class SBCResult:
    """Ranks per scalar quantity, the band they were tested against, and the verdicts.

    Attributes:
        ranks: quantity -> ``[N]`` integer ranks in ``0..num_draws``.
        rows: one dict per quantity: ``quantity``, ``site``, ``level``, ``functional``
            (``"element"``, ``"random group"`` or ``"group mean"``), ``max_abs_diff`` (largest
            |ECDF - uniform|), ``p_value``, ``passed``, ``coverage90`` (share of datasets whose true
            value lies in the central 90% of the draws) and ``mean_rank`` (ranks / L, 0.5 when
            calibrated).
        num_draws: L, posterior draws per dataset.
        band: the simultaneous band (level ``1 - alpha_per_quantity``).
        alpha: family-wise (or per-quantity, without ``familywise``) error level.
        alpha_per_quantity: the level of each quantity's band.
        settings: seed, datasets per structure, seconds.
    """

    ranks: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    num_draws: int
    band: ECDFBand
    alpha: float
    alpha_per_quantity: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_datasets(self) -> int:
        return self.band.num

    @property
    def passed(self) -> bool:
        """Every quantity's ECDF lies inside its band."""
        return all(r["passed"] for r in self.rows)

    def failed(self) -> list[str]:
        """Names of the quantities outside their band."""
        return [r["quantity"] for r in self.rows if not r["passed"]]

    def table(self) -> str:
        """One line per quantity: level, functional, largest ECDF deviation, p-value, verdict."""
        rows = [{**r, "passed": "pass" if r["passed"] else "FAIL"} for r in self.rows]
        return format_table(rows, ["quantity", "level", "max_abs_diff", "p_value", "coverage90", "mean_rank", "passed"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, verdicts, ranks and the band."""
        return {
            "passed": self.passed,
            "num_datasets": self.num_datasets,
            "num_draws": self.num_draws,
            "alpha": self.alpha,
            "alpha_per_quantity": self.alpha_per_quantity,
            "settings": self.settings,
            "quantities": self.rows,
            "ranks": {k: v.astype(int).tolist() for k, v in self.ranks.items()},
            "band": self.band.to_dict(),
        }

    def figure(self, kind: str = "ecdf", columns: int = 4) -> Figure:
        """One panel per quantity.

        Args:
            kind: ``"ecdf"``: ECDF minus the uniform CDF with the simultaneous band (Säilynoja et al.);
                ``"hist"``: rank histograms (20 bins) with a pointwise 99% band of the counts.
            columns: panels per row.

        Raises:
            ImportError: matplotlib is not installed.
            ValueError: unknown ``kind``.
        """
        if kind not in ("ecdf", "hist"):
            raise ValueError(f"plot: kind must be 'ecdf' or 'hist', got {kind!r}")
        n = len(self.rows)
        cols = max(1, min(columns, n))
        rows = math.ceil(n / cols)
        fig = plots.new_figure(3.2 * cols, 2.6 * rows)
        band, N = self.band, self.band.num
        for i, row in enumerate(self.rows):
            ax = fig.add_subplot(rows, cols, i + 1)
            ranks = self.ranks[row["quantity"]]
            color = "tab:blue" if row["passed"] else "tab:red"
            if kind == "ecdf":
                test = ecdf_test(ranks, band)
                x = np.concatenate([[0.0], band.p, [1.0]])
                lo = np.concatenate([[0.0], band.lower / N - band.p, [0.0]])
                hi = np.concatenate([[0.0], band.upper / N - band.p, [0.0]])
                ax.fill_between(x, lo, hi, step="post", color="0.85", lw=0)
                ax.step(x, np.concatenate([[0.0], test.diff, [0.0]]), where="post", color=color, lw=1.2)
                ax.axhline(0.0, color="0.4", lw=0.6)
                ax.set_xlabel("fractional rank")
                ax.set_ylabel("ECDF difference")
            else:
                bins = 20
                edges = np.linspace(0, self.num_draws + 1, bins + 1)
                counts, _ = np.histogram(ranks, bins=edges)
                mean = N / bins
                sd = math.sqrt(N * (1 / bins) * (1 - 1 / bins))
                ax.axhspan(max(0.0, mean - 2.576 * sd), mean + 2.576 * sd, color="0.85", lw=0)
                ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=color, alpha=0.8)
                ax.set_xlabel("rank")
            ax.set_title(f"{row['quantity']}: p={row['p_value']:.2g}", fontsize=9, color=color)
            ax.tick_params(labelsize=7)
        title = f"SBC: {N} datasets, {self.num_draws} draws; band {1 - self.alpha_per_quantity:.2%} per panel"
        fig.suptitle(title, fontsize=10)
        return fig

    def plot(self, path: str | os.PathLike, kind: str = "ecdf", columns: int = 4) -> Path:
        """Write :meth:`figure` as a PNG file (atomically); returns the path."""
        return plots.save_png(self.figure(kind, columns), path)


def _quantity(site: str, elem: tuple[int, ...], functional: str | None) -> str:
    name = site + (f"[{','.join(map(str, elem))}]" if elem else "")
    return name if functional is None else f"{name} ({functional})"


def sbc(
    amortizer: Amortizer,
    num_datasets: int = 200,
    num_samples: int = 999,
    seed: int = 0,
    datasets_per_structure: int = 10,
    alpha: float = 0.05,
    familywise: bool = True,
    simulations: int = 5000,
    progress: bool = False,
) -> SBCResult:
    """Simulation-based calibration of ``amortizer`` on its training structures.

    Datasets come in batches of ``datasets_per_structure`` sharing one structure from the
    amortizer's sampler; each batch is simulated in one call and its posterior drawn in one call.
    Everything is seeded by ``seed``; the caller's RNG state is left as it was.

    Args:
        amortizer: a trained :class:`~amortize.Amortizer` (its sampler gives the structures).
        num_datasets: N, simulated datasets (ranks per quantity).
        num_samples: L, posterior draws per dataset (ranks lie in ``0..L``).
        seed: seeds structures, simulations, posterior draws, the random groups and the band.
        datasets_per_structure: datasets simulated on each structure.
        alpha: error level of the test (family-wise over all quantities with ``familywise``).
        familywise: Bonferroni: each quantity's band has level ``1 - alpha / m``.
        simulations: null ECDFs simulated for the band's adjusted level.
        progress: show a progress bar.

    Returns:
        An :class:`SBCResult`.

    Raises:
        ValueError: ``num_datasets < 2`` or ``num_samples < 1``.
    """
    if num_datasets < 2 or num_samples < 1:
        raise ValueError(f"sbc: need num_datasets >= 2 and num_samples >= 1, got {num_datasets}, {num_samples}")
    st = amortizer.structure
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    collected: dict[str, list[np.ndarray]] = {}
    meta: dict[str, tuple[str, str | None, str]] = {}
    done, empty, t0 = 0, 0, time.perf_counter()
    devices = [amortizer.device] if amortizer.device.type == "cuda" else []
    bar = tqdm(total=num_datasets, disable=None if progress else True, desc="sbc", leave=False)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        while done < num_datasets:
            sim = amortizer.simulate_batch(gen, min(datasets_per_structure, num_datasets - done))
            B = sim.data.batch_size or 0
            if B == 0:
                empty += 1
                if empty > 100:
                    raise AmortizeError("sbc: 100 simulated batches in a row had no finite dataset")
                continue
            empty = 0
            draws = amortizer.posterior(sim.data).sample(num_samples)  # site -> [L, B, *site_shape]
            for s in st.latents:
                truth = st.to_user(s, sim.latents[s.name])[0]  # [B, *site_shape]
                d, event = draws[s.name], tuple(s.event_shape)
                if s.level is None:
                    parts = {None: (d.reshape(num_samples, B, -1), truth.reshape(B, -1))}  # [L, B, E], [B, E]
                else:
                    G = sim.data.size(s.level)
                    d, t = d.reshape(num_samples, B, G, -1), truth.reshape(B, G, -1)  # [L, B, G, E], [B, G, E]
                    g = torch.as_tensor(rng.integers(0, G, B), device=d.device)
                    b = torch.arange(B, device=d.device)
                    parts = {RANDOM: (d[:, b, g], t[b, g]), MEAN: (d.mean(2), t.mean(1))}
                for functional, (dd, tt) in parts.items():
                    r = ranks_of(dd, tt, rng)  # [B, E]
                    for e, elem in enumerate(np.ndindex(*event) if event else [()]):
                        q = _quantity(s.name, elem, functional)
                        collected.setdefault(q, []).append(r[:, e])
                        meta[q] = (s.name, s.level, functional or "element")
            done += B
            bar.update(B)
    bar.close()
    ranks = {q: np.concatenate(v)[:num_datasets] for q, v in collected.items()}
    m = len(ranks)
    alpha_q = alpha / m if familywise else alpha
    band = ecdf_band(
        num_datasets, num_samples + 1, alpha_q, simulations=max(simulations, math.ceil(20 / alpha_q)), seed=seed
    )
    rows = []
    for q, r in ranks.items():
        test = ecdf_test(r, band)
        site, level, functional = meta[q]
        lo, hi = round(0.05 * (num_samples + 1)), round(0.95 * (num_samples + 1))
        rows.append(
            {
                "quantity": q,
                "site": site,
                "level": level or "global",
                "functional": functional,
                "max_abs_diff": float(np.abs(test.diff).max()),
                "p_value": float(test.p_value),
                "passed": bool(test.inside),
                # the truth inside the central 90% of the draws (0.9 when calibrated), and the mean
                # normalized rank (0.5; above: the draws sit below the truth)
                "coverage90": float(((r >= lo) & (r < hi)).mean()),
                "mean_rank": float(r.mean() / num_samples),
            }
        )
    settings = {
        "seed": seed,
        "datasets_per_structure": datasets_per_structure,
        "familywise": familywise,
        "seconds": time.perf_counter() - t0,
    }
    res = SBCResult(ranks, rows, num_samples, band, alpha, alpha_q, settings)
    if not res.passed:
        log.warning("SBC: %s outside the %.1f%% band", ", ".join(res.failed()), 100 * (1 - alpha_q))
    return res
