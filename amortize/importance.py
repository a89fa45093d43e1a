"""Pareto-smoothed importance sampling (PSIS; Vehtari, Simpson, Gelman, Yao, Gabry 2024, JMLR 25(72)).

Given log importance weights ``log p(y, z_s) - log q(z_s | y)`` of S draws from q, PSIS fits a
generalized Pareto distribution (GPD) to the M largest weights (``M = ceil(min(S / 5, 3 sqrt(S)))``),
reads off its shape ``k`` and replaces those M weights by the GPD's expected order statistics
(truncated at the largest raw weight). ``k`` says whether the weights can be trusted:

* ``k < 0.5``: the importance-sampling estimate converges at the usual rate;
* ``0.5 <= k <= 0.7``: usable, slower;
* ``k > 0.7``: the variance is practically infinite: do not use the weights (nor q, usually).

The GPD is fitted by the empirical-Bayes method of Zhang & Stephens (2009) with the weakly
informative prior on ``k`` of Vehtari et al. (shrinks ``k`` towards 0.5 by 10 pseudo-observations),
as in the ``loo`` R package and ArviZ. Our own code (numpy only), so that the library needs neither
ArviZ nor SciPy at run time and the same function serves the diagnostic and the resampling.

Example:
    >>> lw = torch.randn(4000)  # log weights of a mild mismatch
    >>> res = psis(lw)
    >>> res.k < 0.5
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .posterior import Posterior

__all__ = [
    "PSISResult",
    "psis",
    "pareto_k_columns",
    "gpd_fit",
    "CorrectedDraws",
    "ImportanceSampledPosterior",
    "K_THRESHOLD",
    "MIN_DRAWS",
]

K_THRESHOLD = 0.7  # above this, the weights (and usually the proposal) are not to be trusted
MIN_DRAWS = 25  # fewer draws leave too short a tail (M < 5) to estimate k: k is NaN then
_PRIOR_K_WEIGHT = 10.0  # pseudo-observations of the prior on k (centred at 0.5)


@dataclass
class PSISResult:
    """Smoothed, normalized log weights and the Pareto shape of their tail.

    Attributes:
        log_weights: ``[S]`` smoothed log weights, normalized (``logsumexp == 0``), float64.
        k: Pareto shape ``k`` (NaN with fewer than :data:`MIN_DRAWS` finite draws; ``-inf`` when
            the tail is flat, i.e. the largest weights are all equal).
        ess: importance-sampling effective sample size ``1 / sum(w^2)`` of the smoothed weights.
        tail_length: M, the number of weights fitted and smoothed.
    """

    log_weights: torch.Tensor
    k: float
    ess: float
    tail_length: int

    @property
    def ok(self) -> bool:
        """``k <= 0.7`` (NaN counts as not ok: too few draws to judge)."""
        return bool(self.k <= K_THRESHOLD)

    @property
    def weights(self) -> torch.Tensor:
        """``[S]`` normalized smoothed weights."""
        return self.log_weights.exp()


def gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Fit a generalized Pareto distribution (location 0) to positive exceedances ``x``.

    Zhang & Stephens (2009): a posterior-weighted average over a grid of ``b = -k / sigma`` values,
    then ``k`` shrunk towards 0.5 with the weakly informative prior of Vehtari et al. (2024).

    Args:
        x: exceedances over the threshold, ``[M]``, sorted ascending, positive.

    Returns:
        ``(k, sigma)``: shape and scale.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    grid = 30 + int(math.sqrt(n))
    j = np.arange(1, grid + 1, dtype=np.float64)
    quartile = x[max(0, int(n / 4 + 0.5) - 1)]
    b = 1.0 / x[-1] + (1.0 - np.sqrt(grid / (j - 0.5))) / (3.0 * quartile)  # [grid] candidate values of -k/sigma
    k = np.log1p(-b[:, None] * x[None, :]).mean(1)  # [grid] profile estimate of k given each b
    with np.errstate(divide="ignore", invalid="ignore"):
        profile = n * (np.log(-b / k) - k - 1.0)  # [grid] profile log likelihood
    profile = np.where(np.isfinite(profile), profile, -np.inf)
    post = np.exp(profile - profile.max())
    post /= post.sum()
    b_hat = float(np.sum(b * post))
    k_hat = float(np.log1p(-b_hat * x).mean())
    sigma = -k_hat / b_hat
    k_hat = (n * k_hat + _PRIOR_K_WEIGHT * 0.5) / (n + _PRIOR_K_WEIGHT)
    return k_hat, sigma


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """Quantiles of GPD(0, sigma, k) at probabilities ``p``."""
    if abs(k) < 1e-12:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def pareto_k_columns(log_weights: torch.Tensor) -> np.ndarray:
    """Pareto k of each column of ``[S, C]`` log weights at once (the k of :func:`psis`, vectorized over
    columns, for thousands of groups): NaN with S < :data:`MIN_DRAWS`, ``-inf`` for a flat tail.
    Non-finite weights count as weight 0 among the S."""
    lw = log_weights.detach().to("cpu", torch.float64).numpy()
    S, C = lw.shape
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    m = int(math.ceil(min(0.2 * S, 3.0 * math.sqrt(S))))
    out = np.full(C, np.nan)
    if S < MIN_DRAWS or m < 5 or C == 0:
        return out
    srt = np.sort(lw, 0)  # [S, C] ascending
    top = srt[-1]
    good = np.isfinite(top)
    srt = srt[:, good] - top[good]
    x = np.exp(srt[-m:]) - np.exp(srt[-m - 1])  # [m, c] ascending exceedances
    flat = ~(x[-1] > 0)
    x = np.maximum(x, np.finfo(np.float64).tiny).T  # [c, m]
    grid = 30 + int(math.sqrt(m))
    j = np.arange(1, grid + 1, dtype=np.float64)
    quartile = x[:, max(0, int(m / 4 + 0.5) - 1)]
    b = 1.0 / x[:, -1:] + (1.0 - np.sqrt(grid / (j - 0.5)))[None] / (3.0 * quartile[:, None])  # [c, grid]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = np.log1p(-b[:, :, None] * x[:, None, :]).mean(-1)  # [c, grid]
        profile = m * (np.log(-b / k) - k - 1.0)
    profile = np.where(np.isfinite(profile), profile, -np.inf)
    post = np.exp(profile - profile.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    b_hat = (b * post).sum(1)
    k_hat = np.log1p(-b_hat[:, None] * x).mean(1)
    k_hat = (m * k_hat + _PRIOR_K_WEIGHT * 0.5) / (m + _PRIOR_K_WEIGHT)
    out[good] = np.where(flat, -np.inf, k_hat)
    return out


def psis(log_weights: torch.Tensor) -> PSISResult:
    """Pareto-smooth one set of log importance weights.

    Args:
        log_weights: ``[S]`` log weights (any constant offset); non-finite entries get weight 0
            (``-inf``) and do not count towards S.

    Returns:
        A :class:`PSISResult`; with fewer than :data:`MIN_DRAWS` finite weights nothing is smoothed
        and ``k`` is NaN.
    """
    lw_in = log_weights.detach().to("cpu", torch.float64).reshape(-1).numpy()
    finite = np.isfinite(lw_in)
    lw = np.where(finite, lw_in, -np.inf)
    s = int(finite.sum())
    if s == 0:
        return PSISResult(torch.full(lw.shape, -math.inf, dtype=torch.float64), float("nan"), 0.0, 0)
    lw = lw - lw[finite].max()
    m = int(math.ceil(min(0.2 * s, 3.0 * math.sqrt(s))))
    k = float("nan")
    if s >= MIN_DRAWS and m >= 5:
        order = np.argsort(lw)  # ascending; -inf first
        tail = order[-m:]
        cutoff = lw[order[-m - 1]]
        x = np.exp(lw[tail]) - math.exp(cutoff)  # [M] ascending exceedances
        if x[-1] <= 0 or not np.any(x > 0):
            k = -math.inf  # a flat tail: the largest weights are equal, nothing to smooth
        else:
            x = np.maximum(x, np.finfo(np.float64).tiny)
            k, sigma = gpd_fit(x)
            if math.isfinite(k):
                p = (np.arange(m, dtype=np.float64) + 0.5) / m
                smoothed = np.log(_gpd_quantile(p, k, sigma) + math.exp(cutoff))
                lw[tail] = np.minimum(smoothed, 0.0)  # never above the largest raw weight (0 after the shift)
            else:
                k = math.inf
    finite_lw = lw[np.isfinite(lw)]
    top = finite_lw.max()
    lw = lw - (top + math.log(np.exp(finite_lw - top).sum()))
    w = np.exp(lw)
    ess = float(1.0 / np.sum(w * w))
    return PSISResult(torch.from_numpy(lw), float(k), ess, m)


class CorrectedDraws(dict):
    """What :class:`ImportanceSampledPosterior` (and ``Posterior.sample(n, correct=True)``) returns:
    ``{site: draws}`` like ``Posterior.sample``, plus what the correction did (per dataset for a batch).

    Attributes:
        pareto_k: PSIS k of the proposals' weights.
        ess: importance ESS of the smoothed weights (out of ``num_proposals``).
        corrected: True where the globals are PSIS-resampled; False where their k > 0.7 (or NaN) and
            they are the uncorrected proposals (a warning is logged).
        parts: which parts were corrected, ``{"globals": bool, "groups": bool}`` (groups: each outermost
            group's subtree resampled given the globals, where every level's p90 per-group k <= 0.7).
        level_k: per level, the p90 of the per-group k behind the groups' correction.
        num_proposals: global proposals (joint ones for a model without globals) drawn per dataset.
    """

    pareto_k: float | list[float]
    ess: float | list[float]
    corrected: bool | list[bool]
    parts: Any
    level_k: Any
    num_proposals: int


class ImportanceSampledPosterior:
    """The PSIS-corrected posterior of a :class:`~amortize.Posterior` (a wrapper, as sbi's
    ``ImportanceSamplingPosterior``): ``oversample * n`` proposals from q, their weights
    p(y, z) / q(z | y) Pareto-smoothed, ``n`` of them resampled (with replacement) by the smoothed
    weights. Where k > 0.7 the weights cannot be trusted: those draws are the uncorrected proposals,
    with a warning, and the result says so.

    Args:
        posterior: the amortized posterior (one dataset, a batch or a list; not a streamed one).
        oversample: proposals per returned draw.

    Example:
        >>> corrected = ImportanceSampledPosterior(amortizer.posterior(data)).sample(1000, seed=0)  # doctest: +SKIP
        >>> corrected.pareto_k, corrected.corrected  # doctest: +SKIP
    """

    def __init__(self, posterior: Posterior, oversample: int = 4) -> None:
        self.posterior = posterior
        self.oversample = max(1, int(oversample))

    def __repr__(self) -> str:
        return f"ImportanceSampledPosterior({self.posterior!r}, oversample={self.oversample})"

    def sample(self, num_samples: int = 1000, seed: int | None = None) -> Any:
        """Corrected draws in the layout of ``Posterior.sample``: a :class:`CorrectedDraws` (one per dataset,
        in input order, for a list); the caller's RNG is left as it was
        (:func:`amortize.hierarchical_resample.corrected_sample`)."""
        return self.posterior.sample(num_samples, seed, correct=True, oversample=self.oversample)

    def diagnostics(self, num_samples: int = 1000, seed: int | None = 0) -> Any:
        """The wrapped posterior's diagnostics (the Pareto k and ESS are those of these weights)."""
        return self.posterior.diagnostics(num_samples, seed)
