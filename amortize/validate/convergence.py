"""Convergence checks of MCMC draws: rank-normalized split R-hat, bulk ESS, and when a run counts as a reference.

:func:`chain_diagnostics` computes R-hat (bulk and folded) and bulk ESS per element (Vehtari et al. 2021);
:func:`checks_passed` decides whether a run is a reference, with the R-hat threshold of a site of many
elements from :func:`rhat_threshold` (one per site: :func:`rhat_thresholds`). Used by
:func:`amortize.validate.nuts.run_nuts` and by any other sampler's results (the NumPyro twins).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pyro.ops.stats import effective_sample_size, gelman_rubin

__all__ = [
    "chain_diagnostics",
    "worst_diagnostics",
    "checks_passed",
    "rhat_threshold",
    "rhat_thresholds",
    "MAX_RHAT",
    "MIN_ESS",
]

# default checks of a reference (run_nuts, cached_nuts)
MAX_RHAT = 1.01
MIN_ESS = 100.0
# false-alarm probability at which max_rhat is read as the upper quantile of one element's R-hat (rhat_threshold)
RHAT_ALPHA = 0.05


def chain_diagnostics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-normalized split R-hat (max of bulk and folded) and bulk ESS per element.

    Args:
        x: draws ``[chains, draws, *shape]`` (at least 4 draws per chain).

    Returns:
        ``(r_hat, ess_bulk)``, each of shape ``shape``; ESS lies in ``(0, n log10 n]`` for n draws in all
        (Stan's floor on the autocorrelation time). An element constant over all draws (the
        fixed entries of a correlation Cholesky factor) has nothing to mix: R-hat 1, ESS = draws.
    """
    c, s = x.shape[:2]
    shape = x.shape[2:]
    flat = x.reshape(c, s, -1).to(torch.float64)  # [C, S, K]
    z = _split(_rank_normalize(flat))  # [2C, S//2, K]
    med = torch.quantile(flat.reshape(c * s, -1), 0.5, dim=0)  # numpy-style median (mean of the middle two)
    zf = _split(_rank_normalize((flat - med).abs()))
    r_hat = torch.maximum(gelman_rubin(z), gelman_rubin(zf))
    # Stan's floor on the autocorrelation time, 1 / log10(n): with few draws the estimated lag-1
    # autocorrelation of an anti-correlated chain can be below -1/2, which makes Geyer's tau negative and
    # pyro's ESS negative (or, near zero, absurdly large); the floor bounds ESS by n log10(n)
    n = z.shape[0] * z.shape[1]
    tau = (n / effective_sample_size(z)).clamp(min=1.0 / math.log10(n))
    ess = n / tau
    const = (flat == flat[:1, :1]).reshape(c * s, -1).all(0)
    r_hat = torch.where(const, torch.ones_like(r_hat), r_hat)
    ess = torch.where(const, torch.full_like(ess, float(c * s)), ess)
    return r_hat.reshape(shape), ess.reshape(shape)


def worst_diagnostics(x: torch.Tensor) -> tuple[float, float]:
    """A site's largest R-hat and smallest bulk ESS over its elements, from draws ``[chains, draws, *shape]``.

    Undefined values (constant draws) count as failed: R-hat inf, ESS 0.
    """
    r_hat, ess = chain_diagnostics(x)
    return float(r_hat.nan_to_num(nan=float("inf")).max()), float(ess.nan_to_num(nan=0.0).min())


def checks_passed(
    r_hat: Mapping[str, float],
    ess_bulk: Mapping[str, float],
    divergences: int,
    *,
    num_elements: Mapping[str, int],
    num_chains: int,
    num_draws: int,
    max_rhat: float = MAX_RHAT,
    min_ess: float = MIN_ESS,
    alpha: float = RHAT_ALPHA,
) -> bool:
    """Whether a NUTS run counts as a reference: no divergence, ESS and R-hat per site within bounds.

    The rule: no divergent transition after warm-up; every site's smallest bulk ESS at least
    ``min_ess``; and every site's largest R-hat (over its elements, bulk and folded) below
    :func:`rhat_threshold` ``(max_rhat, K, num_chains, num_draws, alpha)`` for its number of elements
    K: ``max_rhat`` itself for a scalar site, a little more for a site of many elements (with
    2 chains x 1000 draws: 1.023 for 200 elements, 1.032 for 10^4).

    Why not ``max_rhat`` for every element: R-hat is a random quantity even for chains that have
    mixed, and the largest of K of them is larger than one. For stationary chains whose draws
    have integrated autocorrelation time tau, R-hat^2 = (N - 1)/N + (tau/N) X with N draws per
    split half-chain and X about chi^2 with M - 1 degrees of freedom over M - 1 (M = 2 x chains
    half-chains): the chain means scatter by their standard error (Vats & Knudson 2021, "Revisiting
    the Gelman-Rubin diagnostic", Statistical Science 36(4): R-hat^2 is about 1 + M / ESS). With
    2 chains x 1000 draws and 200 elements at bulk ESS about 650 (tau 3), the largest R-hat is
    above 1.01 in practically every run (simulated: 40 of 40; 6 of 40 at ESS 1000), so a single threshold
    over all elements rejects good references of the group-level sites while scalar sites pass;
    Vehtari et al. 2021 ("Rank-normalization, folding, and localization", Bayesian Analysis 16(2))
    recommend 1.01 for one quantity, with 4 chains and ESS > 400. Chains that disagree are still
    rejected: one chain's mean shifted by d posterior sds raises R-hat^2 by about d^2 / 3 (2
    chains), which crosses 1.023 from d of about 0.37 (1.01: 0.25) on any one element.

    Args:
        r_hat: site -> largest R-hat over its elements (NaN or inf fail).
        ess_bulk: site -> smallest bulk ESS over its elements.
        divergences: divergent transitions after warm-up, all chains.
        num_elements: site -> number of elements (1 where missing).
        num_chains: chains the diagnostics pooled.
        num_draws: kept draws per chain.
        max_rhat: the threshold of a one-element site.
        min_ess: the smallest bulk ESS allowed.
        alpha: see :func:`rhat_threshold`.
    """
    if divergences != 0 or not all(v >= min_ess for v in ess_bulk.values()):
        return False
    sizes = {name: num_elements.get(name, 1) for name in r_hat}
    thresholds = rhat_thresholds(sizes, num_chains, num_draws, max_rhat, alpha)
    return all(v < thresholds[name] for name, v in r_hat.items())


def rhat_thresholds(
    num_elements: Mapping[str, int],
    num_chains: int,
    num_draws: int,
    max_rhat: float = MAX_RHAT,
    alpha: float = RHAT_ALPHA,
) -> dict[str, float]:
    """Site -> :func:`rhat_threshold` for its number of elements: the thresholds :func:`checks_passed` applies."""
    return {name: rhat_threshold(max_rhat, k, num_chains, num_draws, alpha) for name, k in num_elements.items()}


def rhat_threshold(
    max_rhat: float, num_elements: int, num_chains: int, num_draws: int, alpha: float = RHAT_ALPHA
) -> float:
    """The threshold for the largest R-hat of ``num_elements`` elements that matches ``max_rhat`` for one.

    For stationary, well-mixed chains the rank-normalized split R-hat of one element satisfies
    R^2 = (N - 1)/N + (tau/N) X (see :func:`checks_passed`): N = ``num_draws // 2`` draws per half-chain,
    tau the integrated autocorrelation time, and X the between-half-chain variance of the chain means
    over its expectation, chi^2 with M - 1 = 2 x ``num_chains`` - 1 degrees of freedom over M - 1 (the
    F distribution's large-N limit). Each element contributes two such statistics, bulk and folded
    (uncorrelated for a symmetric posterior), and the check uses the larger.

    ``max_rhat`` is read as the upper (1 - ``alpha``) point of one element's R-hat, which fixes
    tau / N; the threshold of K elements is the upper (1 - ``alpha``) point of the largest of their 2K
    statistics at that tau (Sidak: each statistic below its (1 - alpha)^(1 / 2K) quantile), so

        t_K^2 = (N - 1)/N + (max_rhat^2 - (N - 1)/N) q_K / q_1,

    q_K the chi^2_(M-1) quantile at (1 - alpha)^(1 / 2K). A site of K elements is then rejected by
    chance about as often as one element held to ``max_rhat``, at the autocorrelation where
    ``max_rhat`` is the one-element (1 - alpha) point (bulk ESS about 560 of 2 x 1000 draws at the
    defaults); chains that mix worse fail more often, better ones less. The elements are treated as
    independent; correlated elements (shared hyperparameters) make the largest R-hat smaller, so such
    a site is rejected by chance less often than that (the threshold is then a little lenient).

    Args:
        max_rhat: the threshold of one element (``> 1``); returned unchanged for ``num_elements <= 1``.
        num_elements: elements of the site (K).
        num_chains: chains (split in halves by the diagnostic).
        num_draws: kept draws per chain.
        alpha: the one-element false-alarm probability at which the thresholds are matched.

    Returns:
        The threshold, at least ``max_rhat``: with 2 chains x 1000 draws and ``max_rhat`` 1.01 about
        1.013 for 3 elements, 1.020 for 50, 1.023 for 200, 1.027 for 1000, 1.032 for 10^4.
    """
    half = num_draws // 2
    floor = (half - 1) / half if half > 0 else 0.0
    excess = max_rhat**2 - floor
    if num_elements <= 1 or excess <= 0 or not 0 < alpha < 1:
        return max_rhat
    df = max(1, 2 * num_chains - 1)
    ratio = _max_chi2_quantile(num_elements, df, alpha) / _max_chi2_quantile(1, df, alpha)
    return math.sqrt(floor + excess * ratio)


def _max_chi2_quantile(k: int, df: int, alpha: float) -> float:
    """The upper ``alpha`` point of the largest of ``2 k`` independent chi^2_df variables."""
    tail = -math.expm1(math.log1p(-alpha) / (2 * k))  # per variable: 1 - (1 - alpha)^(1 / 2k), without rounding
    a = torch.tensor(df / 2.0, dtype=torch.float64)

    def upper(x: float) -> float:  # P(chi^2_df > x)
        return float(torch.special.gammaincc(a, torch.tensor(x / 2.0, dtype=torch.float64)))

    lo, hi = 0.0, float(df)
    while upper(hi) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):  # bisection to double precision
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if upper(mid) > tail else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _rank_normalize(x: torch.Tensor) -> torch.Tensor:
    """Normal scores of the ranks over all chains: ``Phi^-1((r - 3/8) / (n + 1/4))``."""
    c, s, k = x.shape
    flat = x.reshape(c * s, k)
    ranks = flat.argsort(0).argsort(0).to(torch.float64) + 1.0  # [C*S, K], 1..C*S
    return torch.special.ndtri((ranks - 0.375) / (c * s + 0.25)).reshape(c, s, k)


def _split(x: torch.Tensor) -> torch.Tensor:
    """Each chain cut into its first and last halves (middle draw dropped when odd): ``[2C, S//2, K]``."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, x.shape[1] - half :]], dim=0)
