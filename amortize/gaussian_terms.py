"""Gaussian algebra of the guide's group sites: the model's prior as a Gaussian on the unconstrained
scale (exact, or a stand-in), and its normalized product with a group's learned data term.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import constraints
from torch.distributions.transforms import IndependentTransform, Transform

from .structure import LatentSite

__all__ = ["gaussian_prior", "gaussian_product", "prior_surrogate", "product_draw"]


def _base(fn: Any) -> Any:
    while isinstance(fn, (dist.Independent, torch.distributions.Independent, ExpandedDistribution, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast copies: every expanded (stride 0) dim cut to size 1, a view that
    broadcasts back to ``t``, so elementwise work on it runs once per distinct value."""
    return t[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(t.shape, t.stride()))]


def _real(c: Any) -> bool:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c is constraints.real


def gaussian_prior(fn: Any, site: LatentSite) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The prior of a site as ``(loc, scale)`` on its unconstrained scale when it is exactly Gaussian
    there; None otherwise. ``loc`` is ``[*batch, dim]``; ``scale`` is ``[*batch, dim]`` (independent
    coordinates: Normal on R, LogNormal on R+) or a lower Cholesky factor of the covariance
    ``[*batch, dim, dim]`` (MultivariateNormal on R^d)."""
    base = _base(fn)
    if isinstance(base, torch.distributions.MultivariateNormal) and _real(site.support):
        if fn.event_shape != base.event_shape:  # MVN blocks reinterpreted as one event: not handled
            return None
        d = site.dim
        return base.loc.expand(*fn.batch_shape, d), base.scale_tril.expand(*fn.batch_shape, d, d)
    if isinstance(base, torch.distributions.LogNormal) and site.support is constraints.positive:
        loc, scale = base.loc, base.scale
    elif isinstance(base, torch.distributions.Normal) and _real(site.support):
        loc, scale = base.loc, base.scale
    else:
        return None
    shape = fn.batch_shape + fn.event_shape
    return loc.expand(shape).reshape(*fn.batch_shape, site.dim), scale.expand(shape).reshape(*fn.batch_shape, site.dim)


def _elementwise(t: Transform) -> Transform | None:
    """The per-coordinate bijection under ``IndependentTransform`` wrappers; None for one that mixes
    coordinates (stick-breaking onto a simplex, a Cholesky factor)."""
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return t if t.domain.event_dim == 0 else None


def _moments(base: Any, t: Transform) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``T^-1(mean)`` and the sd mapped by the bijection's slope there (delta method); inf where the
    moments are not finite, None without them."""
    try:
        mean, var = base.mean, base.variance
    except NotImplementedError:
        return None, None
    ok = torch.isfinite(mean) & torch.isfinite(var) & (var > 0)  # where not: no stand-in
    mean, var = torch.where(ok, mean, torch.ones_like(mean)), torch.where(ok, var, torch.ones_like(var))
    u = t.inv(mean)
    slope = t.log_abs_det_jacobian(u, mean).neg().exp()  # du / dx at the mean
    return torch.where(ok, u, 0.0), torch.where(ok, var.sqrt() * slope, torch.inf)


_QUANTILES = 32  # quantile levels of the prior's moment matching on the unconstrained scale


def prior_surrogate(
    fn: Any, site: LatentSite, data_loc: torch.Tensor | None = None, data_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian stand-in ``(loc, scale)``, each ``[*batch, dim]``, for a prior that is not Gaussian on
    the site's unconstrained scale, so that q keeps the prior's information for any prior (as Pyro's
    ``AutoHierarchicalNormalMessenger`` keeps an affine of it): the group posterior is then
    ``lerp(loc, m, w)``, an affine of the prior's location with the data term's weight ``w``.

    By the first rule that applies, per coordinate:

    * a Student-t (a Cauchy is df 1), given the data term ``N(m, s)`` ``[*batch, dim]``: a scale
      mixture of normals, so the stand-in is ``N(loc, scale^2 (df + z^2) / (df + 1))`` with
      ``z^2 = (m - loc)^2 / (scale^2 + s^2)``, the mixture's expected precision at the data (one
      EM step): a typical group is shrunk as by the prior's curvature, an outlying one is left to
      its data, as the heavy tails do (a fixed Gaussian pulled outliers to the centre);
    * otherwise the Gaussian matching the mean and sd of ``u = T^-1(x)`` (the one closest to the prior
      in the forward KL that NPE minimizes):

      - with an inverse CDF (Laplace, half-normal, half-Cauchy, exponential, Weibull, ...): mean and
        sd of ``u`` at 32 mid-quantile levels (quantiles pass exactly through the monotone bijection
        ``T``), the sd divided by that of a standard normal's same levels (exact for a Gaussian ``u``);
      - with a finite mean and variance (gamma, beta, inverse gamma, ...): ``T^-1(mean)`` and the sd
        mapped by the bijection's slope there (delta method);
    * none of these (no finite moments, or a bijection that mixes coordinates): scale ``inf``, loc 0,
      and q is the data term alone for that coordinate.
    """
    base = _base(fn)
    shape = fn.batch_shape + fn.event_shape
    out_shape = (*fn.batch_shape, site.dim)
    t = _elementwise(site.transform)
    params = [getattr(base, k, None) for k in getattr(base, "arg_constraints", {})]
    ref = next((v for v in params if isinstance(v, torch.Tensor)), torch.zeros(()))  # dtype and device
    loc = scale = None
    if _real(site.support) and isinstance(base, (torch.distributions.StudentT, torch.distributions.Cauchy)):
        df = base.df if isinstance(base, torch.distributions.StudentT) else torch.ones_like(base.loc)
        loc, scale = base.loc.expand(shape).reshape(out_shape), base.scale.expand(shape).reshape(out_shape)
        if data_loc is None or data_scale is None:  # no data term: the prior's curvature at its centre
            z2 = torch.zeros_like(loc)
        else:
            z2 = (data_loc - loc).pow(2) / (scale.pow(2) + data_scale.pow(2))
        df = df.expand(shape).reshape(out_shape)
        return loc, scale * ((df + z2) / (df + 1)).sqrt()
    if t is not None:
        try:
            p = (torch.arange(_QUANTILES, dtype=ref.dtype, device=ref.device) + 0.5) / _QUANTILES
            u = t.inv(base.icdf(p.reshape(-1, *[1] * len(base.batch_shape + base.event_shape))))  # [K, *shape]
            unit = torch.special.ndtri(p).std(unbiased=False)
            loc, scale = u.mean(0), u.std(0, unbiased=False) / unit
        except NotImplementedError:
            loc, scale = _moments(base, t)
    if loc is None:
        return ref.new_zeros(out_shape), ref.new_full(out_shape, torch.inf)
    finite = torch.isfinite(loc) & torch.isfinite(scale) & (scale > 0)
    loc = torch.where(finite, loc, torch.zeros_like(loc))
    scale = torch.where(finite, scale, torch.full_like(scale, torch.inf))
    return loc.expand(shape).reshape(out_shape), scale.expand(shape).reshape(out_shape)


def gaussian_product(
    prior_loc: torch.Tensor,
    prior_tril: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    data_tril: torch.Tensor | None = None,
) -> dist.MultivariateNormal:
    """N(m0, L0 L0^T) x N(m, S), normalized: the exact Gaussian with covariance
    ``C = ((L0 L0^T)^-1 + S^-1)^-1`` and mean ``m0 + C S^-1 (m - m0)``, where the data term's covariance
    is ``S = diag(s^2)`` or, given ``data_tril``, ``S = Ls Ls^T``.

    Computed in square-root form, without inverting the prior covariance (which is near singular
    when a group scale is near 0): with ``A = Ls^-1 L0``, ``QR([A; I]) -> U`` gives
    ``U^T U = I + A^T A``, so ``C = R R^T`` with ``R = L0 U^-1``; a second QR turns ``R`` into the
    lower Cholesky factor of ``C``. Neither step can fail for a positive diagonal of ``Ls``.

    Args:
        prior_loc: ``m0 [*batch, d]``.
        prior_tril: ``L0 [*batch, d, d]``, a lower Cholesky factor of the prior covariance.
        loc: the data term's location ``m [*batch, d]``.
        scale: the data term's scale ``s [*batch, d]`` (all broadcast against each other).
        data_tril: the data term's lower Cholesky factor ``Ls [*batch, d, d]``, replacing ``diag(s)``.
    """
    d = loc.shape[-1]
    full = data_tril is not None
    scale_batch = data_tril.shape[:-2] if full else scale.shape[:-1]
    batch = torch.broadcast_shapes(prior_loc.shape[:-1], prior_tril.shape[:-2], loc.shape[:-1], scale_batch)
    L0 = prior_tril.expand(*batch, d, d)
    eye = torch.eye(d, dtype=L0.dtype, device=L0.device).expand(*batch, d, d)
    if full:
        Ls = data_tril.expand(*batch, d, d)
        A = torch.linalg.solve_triangular(Ls, L0, upper=False)  # Ls^-1 L0
    else:
        A = L0 / scale.unsqueeze(-1)
    U = torch.linalg.qr(torch.cat([A, eye], -2)).R  # [*batch, d, d], upper
    R = torch.linalg.solve_triangular(U, L0, upper=True, left=False)  # L0 U^-1
    tril = torch.linalg.qr(R.mT).R.mT  # lower, tril tril^T = R R^T
    sign = torch.where(torch.diagonal(tril, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(tril.dtype)
    tril = tril * sign.unsqueeze(-2)  # flip columns: positive diagonal
    if full:  # S^-1 (m - m0)
        pull = torch.cholesky_solve((loc - prior_loc).expand(*batch, d).unsqueeze(-1), Ls)
    else:
        pull = ((loc - prior_loc) / scale.pow(2)).unsqueeze(-1)
    mean = prior_loc + (R @ (R.mT @ pull)).squeeze(-1)
    return dist.MultivariateNormal(mean, scale_tril=tril)


def product_draw(
    prior_loc: torch.Tensor,
    log_prior_var: torch.Tensor,
    loc: torch.Tensor,
    log_var: torch.Tensor,
    scale: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """One draw of N(prior_loc, prior_sd) x N(loc, scale), normalized, from standard normals ``eps``
    (elementwise, broadcasting): ``lerp(prior_loc, loc, w) + scale sqrt(w) eps`` with the data term's
    weight ``w = sigmoid(log_prior_var - log_var)``. The drawing kernel of :class:`AmortizedGuide`
    (:meth:`amortize.Amortizer.compile` compiles it into one loop)."""
    w = torch.sigmoid(log_prior_var - log_var)
    return torch.lerp(prior_loc, loc, w) + scale * w.sqrt() * eps
