"""Least-squares fits and segment sums the statistics are built from: pure tensor functions.

Index arrays ``idx [N]`` map rows to segments (groups); ``[B, ...]`` carries B datasets of one structure.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

__all__ = [
    "WithinGroupFit",
    "between_slopes",
    "mix",
    "mixing",
    "segment_mean",
    "segment_sum",
    "slope_spread",
    "within_group_fit",
]


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """``x [..., N, F]`` as a contiguous ``[N, (...) * F]``: segment sums and sparse products run along the
    leading dimension, where CPU kernels are fastest (``index_add_`` along dimension -2 of ``[B, N, F]`` is
    several times slower)."""
    return x.movedim(-2, 0).reshape(x.shape[-2], -1)


def _rows_back(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_rows_first` for ``out [G, (...) * F]``: ``[..., G, F]`` shaped as ``like``."""
    return out.reshape(out.shape[0], *like.shape[:-2], like.shape[-1]).movedim(0, -2)


def segment_sum(x: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``x [..., N, F]`` into ``[..., size, F]`` by ``idx [N]``."""
    rows = _rows_first(x)
    return _rows_back(rows.new_zeros(size, rows.shape[1]).index_add_(0, idx, rows), x)


def mixing(to: torch.Tensor, source: torch.Tensor, size_to: int, size_from: int, dtype: torch.dtype) -> torch.Tensor:
    """The sparse ``[size_to, size_from]`` matrix whose entry (g, h) is the share of group g's rows (``to [N]``)
    that fall in group h (``source [N]``); a group without rows has a row of zeros. ``mix(M, x)`` is then the
    mean over a group's rows of ``x`` gathered at each row's ``source`` group, without the ``[B, N, F]``
    gather: O(distinct pairs) instead of O(rows) work and memory, forward and backward."""
    n = torch.bincount(to, minlength=size_to).clamp_min(1).to(dtype)
    m = torch.sparse_coo_tensor(torch.stack([to, source]), 1.0 / n[to], (size_to, size_from), check_invariants=True)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense operand is all we use
        warnings.simplefilter("ignore", UserWarning)
        return m.coalesce().to_sparse_csr()


def mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m [G, K]`` (see :func:`mixing`) applied to ``x [..., K, F]``: ``[..., G, F]``."""
    return _rows_back(m @ _rows_first(x), x)


def segment_mean(x: torch.Tensor, idx: torch.Tensor, size: int, counts: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [..., N, F]`` per segment: ``[..., size, F]``; ``counts [size]`` > 0."""
    return segment_sum(x, idx, size) / counts.to(x.dtype).unsqueeze(-1)


class WithinGroupFit(NamedTuple):
    """Per-group least squares of the response on the row covariates (see :func:`within_group_fit`)."""

    slopes: torch.Tensor  # [B, G, k] each group's slopes
    precision: torch.Tensor  # [G, k] 1 / (S_xx^-1)_jj: a slope's sd is the noise sd / sqrt(precision)
    pooled: torch.Tensor  # [B, k] slopes of the within-group fit pooled over the groups
    ss: torch.Tensor  # [B] pooled residual sum of squares
    dof: float  # its degrees of freedom: rows minus fitted coefficients over the groups (>= 1)
    intercept: torch.Tensor  # [B, G] each group's fitted value at covariates 0: mean - slopes . covariate means
    intercept_precision: torch.Tensor  # [G] 1 / (1/n + xbar' S_xx^-1 xbar): its sd is noise sd / sqrt(this)
    xbar: torch.Tensor  # [G, k] each group's covariate means


def within_group_fit(y: torch.Tensor, X: torch.Tensor, idx: torch.Tensor, G: int, n: torch.Tensor) -> WithinGroupFit:
    """Least squares of ``y [B, N]`` on an intercept and the covariates ``X [N, k]`` within each group.

    Each group's covariates are centred on the group's means; a tiny ridge keeps a group whose
    covariate does not vary (or that has fewer rows than coefficients) solvable: its slope reads 0
    with a precision near 0, and it contributes its plain within-group sum of squares."""
    k = X.shape[-1]
    xc = X - segment_mean(X, idx, G, n)[idx]  # [N, k]
    yc = y - segment_mean(y.unsqueeze(-1), idx, G, n)[..., 0][..., idx]  # [B, N]
    sxx = segment_sum((xc.unsqueeze(-1) * xc.unsqueeze(-2)).reshape(-1, k * k), idx, G).reshape(G, k, k)
    sxy = segment_sum((yc.unsqueeze(-1) * xc).reshape(-1, xc.shape[0], k), idx, G)  # [B, G, k]
    syy = segment_sum(yc.pow(2).unsqueeze(-1), idx, G)[..., 0]  # [B, G]
    eye = torch.eye(k, dtype=X.dtype, device=X.device)
    ridge = 1e-6 * sxx.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12)  # [G]
    reg = sxx + ridge[:, None, None] * eye
    beta = torch.linalg.solve(reg, sxy.unsqueeze(-1)).squeeze(-1)  # [B, G, k]
    precision = 1.0 / torch.linalg.inv(reg).diagonal(dim1=-2, dim2=-1)  # [G, k]
    ss = (syy - (beta * sxy).sum(-1)).clamp_min(0.0).sum(-1)  # [B]
    diag = sxx.diagonal(dim1=-2, dim2=-1)  # [G, k]: a covariate that varies within a group costs a df
    rank = (diag > 1e-8 * diag.amax(-1, keepdim=True).clamp_min(1e-12)).sum(-1)
    dof = (n - 1 - rank).clamp_min(0).sum()
    total = sxx.sum(0)
    total = total + 1e-6 * total.diagonal().sum().clamp_min(1e-12) * eye
    pooled = torch.linalg.solve(total, sxy.sum(-2).unsqueeze(-1)).squeeze(-1)  # [B, k]
    xbar = segment_mean(X, idx, G, n)  # [G, k]
    ybar = segment_mean(y.unsqueeze(-1), idx, G, n)[..., 0]  # [B, G]
    intercept = ybar - (beta * xbar).sum(-1)
    leverage = (xbar.unsqueeze(-2) @ torch.linalg.solve(reg, xbar.unsqueeze(-1))).reshape(G)
    return WithinGroupFit(
        beta, precision, pooled, ss, float(max(int(dof), 1)), intercept, 1.0 / (1.0 / n + leverage), xbar
    )


def slope_spread(
    fit: WithinGroupFit, ybar: torch.Tensor, noise_var: torch.Tensor, floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How the groups' own slopes vary: per covariate the method-of-moments log sd of the slopes
    between groups (their variance in excess of the sampling variance ``noise / precision`` they
    carry, floored at ``1e-4 floor``) and the correlation of the slopes with the group means, each
    ``[B, k]``, over the groups whose covariate varies.

    Args:
        fit: the within-group fit of the innermost groups.
        ybar: ``[B, G]`` group means.
        noise_var: ``[B]`` pooled residual variance.
        floor: ``[B, k]`` a variance scale of the slopes (response variance over covariate variance).
    """
    beta, prec = fit.slopes, fit.precision  # [B, G, k], [G, k]
    w = (prec > 1e-6 * prec.median(0).values.clamp_min(1e-12)).to(beta.dtype)  # [G, k] a slope was measured
    n = w.sum(0).clamp_min(1)  # [k]
    mean = (w * beta).sum(-2) / n  # [B, k]
    dev = (beta - mean.unsqueeze(-2)) * w
    var = dev.pow(2).sum(-2) / (n - 1).clamp_min(1)  # [B, k]
    sampling = (w / prec.clamp_min(1e-12)).sum(0) / n * noise_var.unsqueeze(-1)  # [B, k]
    log_sd = 0.5 * torch.log((var - sampling).clamp_min(0) + 1e-4 * floor)
    yd = (ybar - ybar.mean(-1, keepdim=True)).unsqueeze(-1) * w  # [B, G, k]
    cov = (yd * dev).sum(-2)
    corr = cov / (yd.pow(2).sum(-2) * dev.pow(2).sum(-2)).sqrt().clamp_min(1e-12)
    return log_sd, corr


def between_slopes(ybar: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares slopes ``[B, k]`` of group means ``ybar [B, G]`` on group covariates ``C [G, k]``
    (with an intercept and a tiny ridge), their squared t statistics ``[B, k]`` (slope^2 over its
    sampling variance: residual variance on G - k - 1 degrees of freedom times ``(C'C)^-1``), and
    that residual variance ``[B, 1]`` (0 without residual degrees of freedom)."""
    G, k = C.shape
    cc = C - C.mean(0)
    eye = torch.eye(k, dtype=C.dtype, device=C.device)
    sxx = cc.T @ cc
    inv = torch.linalg.inv(sxx + 1e-6 * sxx.diagonal().sum().clamp_min(1e-12) * eye)  # symmetric
    yc = ybar - ybar.mean(-1, keepdim=True)
    beta = yc @ cc @ inv
    s2 = (yc - beta @ cc.T).pow(2).sum(-1, keepdim=True) / max(G - k - 1, 1)  # [B, 1]
    t2 = beta.pow(2) / (s2 * inv.diagonal()).clamp_min(1e-30)
    return beta, t2, s2
