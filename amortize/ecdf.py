"""Simultaneous confidence bands for the ECDF of discrete uniform ranks (Säilynoja, Bürkner, Vehtari 2022).

Under calibration, the N ranks of one quantity in simulation-based calibration are independent
draws from the discrete uniform distribution on ``{0, ..., R - 1}`` (R = posterior draws + 1). The
ECDF is evaluated at K - 1 interior points ``z_i = i / K``: the count ``c_i`` of ranks below
``t_i = floor(i R / K)`` is ``Binomial(N, p_i)`` with ``p_i = t_i / R`` exactly (``p_i = z_i`` when K
divides R). Each point gets a two-sided binomial tail probability
``s_i = min(1, 2 min(P(X <= c_i), P(X >= c_i)))``; the ECDF lies inside the simultaneous band of
level ``1 - alpha`` when every ``s_i >= gamma``, where the adjusted pointwise level ``gamma`` is the
``alpha`` quantile of ``min_i s_i`` under uniformity. ``gamma`` comes from seeded simulations of
the null (the simulation method of Säilynoja et al., section 2.2; the counts are drawn as one
multinomial over the K bins, which is exact), so a band is reproducible for a given seed.

The same simulations give a p-value for an observed ECDF: the fraction of null ECDFs whose
``min_i s_i`` is at most the observed one.

It lives in the core (the per-dataset verdict's local SBC, :mod:`amortize.local_sbc`, tests ranks
with it); :mod:`amortize.validate.ecdf` re-exports it for SBC over the prior.

Example:
    >>> band = ecdf_band(num=200, num_values=1000, alpha=0.05)
    >>> test = ecdf_test(np.random.default_rng(0).integers(0, 1000, 200), band)
    >>> test.inside  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ECDFBand", "ECDFTest", "ecdf_band", "ecdf_test", "ranks_of"]


@dataclass
class ECDFBand:
    """A simultaneous band for the ECDF of N ranks uniform on ``{0, ..., R - 1}``.

    Attributes:
        num: N, ranks per ECDF.
        num_values: R, the number of possible rank values.
        alpha: the band covers a whole null ECDF with probability ``1 - alpha``.
        cuts: ``[K - 1]`` integer thresholds ``t_i``: the ECDF at point i counts ranks below ``t_i``.
        p: ``[K - 1]`` null probabilities ``t_i / R`` (the x axis of ECDF plots).
        lower: ``[K - 1]`` smallest count inside the band, per point.
        upper: ``[K - 1]`` largest count inside the band, per point.
        gamma: the adjusted pointwise level.
        null_stats: ``[M]`` sorted ``min_i s_i`` of the simulated null ECDFs (for p-values).
        seed: seed of the simulations.
    """

    num: int
    num_values: int
    alpha: float
    cuts: np.ndarray
    p: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    null_stats: np.ndarray
    seed: int
    _tail: np.ndarray  # [K - 1, N + 1] pointwise two-sided tail probability of each count

    def to_dict(self) -> dict:
        """The band in ECDF-difference units (``count / N - p``), JSON-ready."""
        return {
            "num": self.num,
            "num_values": self.num_values,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "simulations": int(self.null_stats.size),
            "seed": self.seed,
            "p": self.p.tolist(),
            "lower_diff": (self.lower / self.num - self.p).tolist(),
            "upper_diff": (self.upper / self.num - self.p).tolist(),
        }


@dataclass
class ECDFTest:
    """One ECDF against a band: counts per point, ECDF difference, statistic, p-value, verdict."""

    counts: np.ndarray  # [K - 1]
    diff: np.ndarray  # [K - 1] ECDF - p
    stat: float  # min_i s_i
    p_value: float
    inside: bool


def _binomial_tails(num: int, p: np.ndarray) -> np.ndarray:
    """``[len(p), num + 1]`` two-sided tail probabilities ``min(1, 2 min(P(X <= c), P(X >= c)))``."""
    c = torch.arange(num + 1, dtype=torch.float64)
    pt = torch.as_tensor(p, dtype=torch.float64)[:, None]
    log_pmf = (
        math.lgamma(num + 1)
        - torch.lgamma(c + 1)
        - torch.lgamma(num - c + 1)
        + c * torch.log(pt)
        + (num - c) * torch.log1p(-pt)
    )  # [P, N + 1]
    pmf = log_pmf.exp()
    cdf = pmf.cumsum(-1)  # P(X <= c)
    sf = pmf.flip(-1).cumsum(-1).flip(-1)  # P(X >= c), summed from the far tail for accuracy
    return (2 * torch.minimum(cdf, sf)).clamp(max=1.0).numpy()


def _num_points(num: int, num_values: int) -> int:
    return max(2, min(num, num_values))


def ecdf_band(
    num: int,
    num_values: int,
    alpha: float = 0.05,
    num_points: int | None = None,
    simulations: int = 5000,
    seed: int = 0,
) -> ECDFBand:
    """The simultaneous ``1 - alpha`` band for the ECDF of ``num`` ranks uniform on ``{0..num_values-1}``.

    Args:
        num: N, the number of ranks (simulated datasets).
        num_values: R, the number of possible ranks (posterior draws + 1).
        alpha: 1 minus the simultaneous coverage.
        num_points: K, the ECDF is checked at K - 1 interior points; default ``min(N, R)``.
        simulations: M null ECDFs simulated to find the adjusted level (resolution of p-values: 1 / M).
        seed: seeds the simulations.

    Returns:
        An :class:`ECDFBand`.

    Raises:
        ValueError: ``num < 1``, ``num_values < 2``, ``alpha`` outside (0, 1) or too small for ``simulations``.
    """
    if num < 1 or num_values < 2:
        raise ValueError(f"ecdf_band: need num >= 1 and num_values >= 2, got {num}, {num_values}")
    if not 0 < alpha < 1 or alpha * simulations < 5:
        raise ValueError(f"ecdf_band: alpha={alpha} needs 0 < alpha < 1 and alpha * simulations >= 5")
    k = num_points or _num_points(num, num_values)
    k = min(int(k), num_values)
    cuts = (np.arange(1, k, dtype=np.int64) * num_values) // k  # [K - 1]
    p = cuts / num_values
    tail = _binomial_tails(num, p)  # [K - 1, N + 1]
    rng = np.random.default_rng(seed)
    bins = np.diff(np.concatenate([[0], cuts, [num_values]])) / num_values  # [K] null bin probabilities
    counts = rng.multinomial(num, bins, size=simulations)[:, :-1].cumsum(1)  # [M, K - 1]
    stats = np.sort(tail[np.arange(k - 1)[None, :], counts].min(1))  # [M]
    gamma = float(stats[int(math.floor(alpha * simulations))])
    inside = tail >= gamma  # [K - 1, N + 1]; an interval of counts per point
    lower = inside.argmax(1)
    upper = num - inside[:, ::-1].argmax(1)
    return ECDFBand(num, num_values, alpha, cuts, p, lower, upper, gamma, stats, seed, tail)


def ecdf_test(ranks: np.ndarray, band: ECDFBand) -> ECDFTest:
    """Test ranks (integers in ``0..R-1``) against ``band``.

    Returns:
        The counts per point, the ECDF difference, ``min_i s_i``, the p-value
        ``(1 + #{null stats <= observed}) / (M + 1)`` and whether the ECDF lies inside the band.

    Raises:
        ValueError: a rank count other than ``band.num``, or ranks outside ``0..R-1``.
    """
    r = np.asarray(ranks).reshape(-1)
    if r.size != band.num:
        raise ValueError(f"ecdf_test: {r.size} ranks for a band of {band.num}")
    if r.size and (r.min() < 0 or r.max() >= band.num_values):
        raise ValueError(f"ecdf_test: ranks must lie in 0..{band.num_values - 1}")
    counts = np.searchsorted(np.sort(r), band.cuts, side="left")  # [K - 1] ranks below each cut
    stat = float(band._tail[np.arange(band.cuts.size), counts].min())
    n_below = int(np.searchsorted(band.null_stats, stat, side="right"))
    p_value = (1 + n_below) / (1 + band.null_stats.size)
    return ECDFTest(counts, counts / band.num - band.p, stat, p_value, stat >= band.gamma)


def ranks_of(draws: torch.Tensor, truth: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """Rank of ``truth [B, E]`` among ``draws [L, B, E]``: the draws below it, ties broken at random
    (uniform on ``0..L`` when ``truth`` is one more draw of the draws' distribution)."""
    d, t = draws.double(), truth.double().unsqueeze(0)
    below = (d < t).sum(0).cpu().numpy()
    ties = (d == t).sum(0).cpu().numpy()
    return below + np.floor(rng.random(below.shape) * (ties + 1)).astype(np.int64)
