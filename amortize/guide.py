"""The amortized guide: a real Pyro guide with the model's site names, computed top-down.

It runs the model itself (Pyro's effect-based :class:`~pyro.poutine.guide.GuideMessenger`): at each
latent site it sees the model's prior given the parents already drawn from the guide, and returns

* for global sites: one joint draw ``u ~ q(u_globals | dataset)`` on the unconstrained scale,
  handed out site by site through the site's bijection (the joint log density rides on the first
  global site);
* for a group site: ``q(u_g | parents, data) ∝ prior(u_g | parents) x N(u_g; m_g, s_g)``, the
  model's own conditional prior times a learned Gaussian data term of the group (exact when the
  prior is Gaussian on the unconstrained scale, with full covariance for a MultivariateNormal prior;
  for any other prior, the product with a Gaussian stand-in of it, :func:`prior_surrogate`).

The same pass scores given values (``truth``): :mod:`amortize.objectives` turns its traces into the
NPE objective and, with the model's log density, the importance weights behind the ELBO, the IW
bound and PSIS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.guide import GuideMessenger
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import IndependentTransform, Transform

from .data import HierarchicalData
from .errors import ModelStructureError
from .nn import GlobalHead, GroupHead, HierarchicalEncoder
from .nn.data_terms import group_terms, level_dims, site_term
from .structure import LatentSite, ModelStructure, batched

__all__ = ["AmortizedGuide", "gaussian_prior", "gaussian_product", "prior_surrogate", "product_draw"]


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
    prior_loc: torch.Tensor, prior_tril: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> dist.MultivariateNormal:
    """N(m0, L0 L0^T) x N(m, diag(s^2)), normalized: the exact Gaussian with covariance
    ``C = ((L0 L0^T)^-1 + diag(s^-2))^-1`` and mean ``m0 + C diag(s^-2) (m - m0)``.

    Computed in square-root form, without inverting the prior covariance (which is near singular
    when a group scale is near 0): with ``A = diag(1/s) L0``, ``QR([A; I]) -> U`` gives
    ``U^T U = I + A^T A``, so ``C = R R^T`` with ``R = L0 U^-1``; a second QR turns ``R`` into the
    lower Cholesky factor of ``C``. Neither step can fail for s > 0.

    Args:
        prior_loc: ``m0 [*batch, d]``.
        prior_tril: ``L0 [*batch, d, d]``, a lower Cholesky factor of the prior covariance.
        loc: the data term's location ``m [*batch, d]``.
        scale: the data term's scale ``s [*batch, d]`` (all four broadcast against each other).
    """
    d = loc.shape[-1]
    batch = torch.broadcast_shapes(prior_loc.shape[:-1], prior_tril.shape[:-2], loc.shape[:-1], scale.shape[:-1])
    L0 = prior_tril.expand(*batch, d, d)
    eye = torch.eye(d, dtype=L0.dtype, device=L0.device).expand(*batch, d, d)
    U = torch.linalg.qr(torch.cat([L0 / scale.unsqueeze(-1), eye], -2)).R  # [*batch, d, d], upper
    R = torch.linalg.solve_triangular(U, L0, upper=True, left=False)  # L0 U^-1
    tril = torch.linalg.qr(R.mT).R.mT  # lower, tril tril^T = R R^T
    sign = torch.where(torch.diagonal(tril, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(tril.dtype)
    tril = tril * sign.unsqueeze(-2)  # flip columns: positive diagonal
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


class _LatentsDrawn(Exception):
    """Ends a latents-only run of the model at its last latent site."""


class AmortizedGuide(GuideMessenger, nn.Module):
    """q(all latents | dataset) for ``batched(model)``: call ``guide(data, num_draws)``.

    Args:
        model: the user's model for one dataset.
        structure: its traced :class:`ModelStructure`.
        covariates: ``{level or "obs": [names]}`` carried by the data.
        hidden: width of every network.
        flow_bins: spline bins of the flow on the globals (0: Gaussian globals).
        global_coupling: each group's data term gets a location linear in the drawn globals
            (standardized), with per-group coefficients: for likelihoods where globals act inside a
            group's data (slopes of row covariates), so that q keeps their posterior correlation.
    """

    def __init__(
        self,
        model: Callable,
        structure: ModelStructure,
        covariates: dict[str, list[str]],
        hidden: int = 64,
        flow_bins: int = 8,
        global_coupling: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, batched(model, structure.max_plate_nesting))
        self.structure = structure
        self.user_model = model
        self.encoder = HierarchicalEncoder(structure.levels, covariates, hidden, level_dims(structure))
        self.global_head = None
        if structure.global_dim:
            enc = self.encoder
            self.global_head = GlobalHead(
                hidden, structure.global_dim, flow_bins, enc.raw_dataset_dim, enc.count_dim, enc.slope_dim
            )
        D = structure.global_dim if global_coupling else 0
        self.group_heads = nn.ModuleDict(
            {
                s.name: GroupHead(hidden, s.dim, D, self.encoder.group_slope_dim[s.level])
                for s in structure.latents
                if s.level is not None
            }
        )
        self._state: dict[str, Any] | None = None
        self.draw_kernel: Callable[..., torch.Tensor] = product_draw  # see Amortizer.compile

    # ------------------------------------------------------------------ guide protocol
    def __call__(  # type: ignore[override]
        self,
        data: HierarchicalData,
        num_draws: int = 1,
        truth: dict[str, torch.Tensor] | None = None,
        encoded: dict[str, Any] | None = None,
        model_data: HierarchicalData | None = None,
        latents_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Draw ``num_draws`` joint posterior samples for each dataset in ``data`` (or score
        ``truth``, values in the batched layout); returns every sample site's value.
        ``encoded``: :meth:`encode` of ``data``, computed once for several calls.
        ``model_data``: what the model runs on for its priors (``data.skeleton()`` where
        :func:`~amortize.structure.priors_free_of_rows`); ``data`` by default.
        ``latents_only``: draws for their values alone: the model stops after its last latent site
        (the likelihood is not built) and ``log q`` is not computed; returns the latent sites."""
        self._state = {"truth": truth, "u": None, **(self.encode(data) if encoded is None else encoded)}
        args = (data if model_data is None else model_data, num_draws)
        try:
            if not latents_only:
                return super().__call__(*args)
            self._state["stop_after"] = self.structure.latents[-1].name
            try:
                super().__call__(*args)  # ends at the last latent site: the rest is the likelihood
            except _LatentsDrawn:
                pass
            return {s.name: self.upstream_value(s.name) for s in self.structure.latents}
        finally:
            self._state = None

    def _pyro_post_sample(self, msg: Any) -> None:
        super()._pyro_post_sample(msg)
        if self._state is not None and msg["name"] == self._state.get("stop_after"):
            raise _LatentsDrawn  # every latent is drawn: the rest of the model is the likelihood

    def encode(self, data: HierarchicalData) -> dict[str, Any]:
        """The per-dataset and per-group work of a call, independent of the draws: q(globals) and
        each group site's data term ``(loc, scale)`` in the batched layout."""
        K = self.structure.max_plate_nesting
        terms = group_terms(self.user_model, self.structure, data)
        enc = self.encoder(data, terms)
        B = enc.dataset.shape[0]
        state: dict[str, Any] = {"terms": {}}
        if self.global_head is not None:
            stats = enc.statistics
            std = self.global_head.standardizer(
                enc.dataset, K, stats.location_scale(), stats.counts(), stats.covariate_slopes()
            )
            state["standardizer"] = std
            state["q_globals"] = self.global_head(enc.dataset, K, standardizer=std)  # batch [B, 1..], event [D]
        for name, head in self.group_heads.items():
            site = self.structure[name]
            group_stats = enc.statistics.levels[site.level].groups
            term = site_term(terms[site.level], self.structure.sites_at(site.level), name)
            loc, scale, coupling = head(enc.groups[site.level], enc.dataset, group_stats, term)  # [B, G, d]
            G = loc.shape[-2]
            state["terms"][name] = (
                loc.reshape(B, *[1] * (K - 1), G, -1),
                scale.reshape(B, *[1] * (K - 1), G, -1),
                None if coupling is None else coupling.reshape(B, *[1] * (K - 1), G, *coupling.shape[-2:]),
            )
        return state

    def get_posterior(self, name: str, prior: Any) -> Any:
        st = self._state
        if st is None:
            raise RuntimeError("AmortizedGuide.get_posterior called outside guide(data)")
        try:
            site = self.structure[name]
        except KeyError:
            raise ModelStructureError(f"site '{name}' was not in the model when it was traced") from None
        truth = st["truth"]
        if site.level is None:
            return self._global_posterior(site, prior, st, truth)
        loc, scale, coupling = st["terms"][name]
        if coupling is not None and st["u"] is not None:  # globals come first in the model: drawn
            shift, spread = st["standardizer"]
            w = (st["u"] - shift) / spread  # [S, B, 1.., D]
            # one batched matmul per dataset ([S, D] @ [D, G d]), never the [S, B, G, d, D] product
            S, B, D = w.shape[0], coupling.shape[0], w.shape[-1]
            shifted = torch.einsum("bnk,sbk->sbn", coupling.reshape(B, -1, D), w.reshape(S, -1, D).expand(S, B, D))
            loc = loc + shifted.reshape(S, *loc.shape)  # [S, B, 1.., G, d]
        g = gaussian_prior(prior, site)
        if g is not None and g[1].dim() > g[0].dim():  # correlated Gaussian prior on R^d: full product
            q = gaussian_product(g[0], g[1], loc, scale)
            if truth is None:
                return q
            return dist.Delta(truth[name], log_density=q.log_prob(truth[name]), event_dim=1)
        ushape = site.unconstrained_shape
        if g is None:  # not Gaussian on the unconstrained scale: the product with a Gaussian stand-in
            g = prior_surrogate(prior, site, loc, scale)
        # precision-weighted product of prior (or its stand-in) and data term
        # the data term's weight w = tau^2 / (tau^2 + s^2) = sigmoid(2 log tau - 2 log s), logs
        # taken on the small unbroadcast tensors: a prior scale that underflows to 0 (a drawn tau
        # near 0) gives the prior's loc, an infinite one the data term; sd^2 = w s^2
        # (a prior written with float literals is float32 on float64 data: cast, as a product would)
        g0, g1 = (_compact(t).to(loc.dtype) for t in g)
        log_w = 2.0 * g1.log(), 2.0 * scale.log()
        if truth is None and "stop_after" in st:  # drawing alone: the draw itself, in one kernel
            shape = torch.broadcast_shapes(g0.shape, log_w[0].shape, loc.shape, scale.shape)
            eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
            u = self.draw_kernel(g0, log_w[0], loc, log_w[1], scale, eps)
            u = u.reshape(*u.shape[:-1], *ushape)
            return u if _real(site.support) else site.transform(u)
        w = torch.sigmoid(log_w[0] - log_w[1])
        loc = torch.lerp(g0, loc, w)
        scale = (scale * w.sqrt()).clamp_min(torch.finfo(scale.dtype).tiny)
        loc = loc.reshape(*loc.shape[:-1], *ushape)
        scale = scale.reshape(*scale.shape[:-1], *ushape)
        q = dist.Normal(loc, scale).to_event(len(ushape))
        if not _real(site.support):
            q = dist.TransformedDistribution(q, [site.transform])
        if truth is None:
            return q
        value = truth[name]
        return dist.Delta(value, log_density=q.log_prob(value), event_dim=len(site.event_shape))

    def _global_posterior(self, site: LatentSite, prior: Any, st: dict[str, Any], truth: Any) -> Any:
        q = st["q_globals"]
        first = st["u"] is None
        if first:
            if truth is None:
                u = q.rsample(prior.batch_shape[:1])  # [S, B, 1.., D]
            else:
                u = torch.cat([s.unconstrain(truth[s.name]) for s in self.structure.global_sites], -1)
            st["u"] = u
            st["log_q"] = 0.0 if "stop_after" in st else q.log_prob(u)  # drawing alone: no density
        offset = 0
        for s in self.structure.global_sites:
            if s.name == site.name:
                break
            offset += s.dim
        value, ladj = site.constrain(st["u"][..., offset : offset + site.dim])
        log_density = -ladj + (st["log_q"] if first else 0.0)
        if truth is not None:
            value = truth[site.name]
        return dist.Delta(value, log_density=log_density, event_dim=len(site.event_shape))
