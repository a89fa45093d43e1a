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

import numpy as np
import torch

__all__ = ["PSISResult", "psis", "gpd_fit", "K_THRESHOLD", "MIN_DRAWS"]

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
