"""The amortized guide: a real Pyro guide with the model's site names, computed top-down.

It runs the model itself (Pyro's effect-based :class:`~pyro.poutine.guide.GuideMessenger`): at each
latent site it sees the model's prior given the parents already drawn from the guide, and returns

* for global sites: one joint draw ``u ~ q(u_globals | dataset)`` on the unconstrained scale,
  handed out site by site through the site's bijection (the joint log density rides on the first
  global site);
* for a group site: ``q(u_g | parents, data) ∝ prior(u_g | parents) x N(u_g; m_g, s_g)``, the
  model's own conditional prior times a learned Gaussian data term of the group (exact when the
  prior is Gaussian on the unconstrained scale, with full covariance for a MultivariateNormal prior;
  the data term alone otherwise).

The same pass scores given values (``truth``): that is the NPE objective, and with the model's
log density it gives the importance weights behind the ELBO, the IW bound and PSIS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import constraints

from .data import HierarchicalData
from .errors import ModelStructureError
from .nn import GlobalHead, GroupHead, HierarchicalEncoder
from .structure import LatentSite, ModelStructure, batched

__all__ = ["AmortizedGuide", "gaussian_prior", "gaussian_product", "product_draw"]


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
        self.encoder = HierarchicalEncoder(structure.levels, covariates, hidden)
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
            self.args_kwargs = args, {}
            try:
                with self:
                    self.model(*args)
            except _LatentsDrawn:
                pass
            finally:
                del self.args_kwargs
            return {s.name: self.trace.nodes[s.name]["value"] for s in self.structure.latents}
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
        enc = self.encoder(data)
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
            loc, scale, coupling = head(enc.groups[site.level], enc.dataset, group_stats)  # [B, G, d]
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
        if g is not None:  # precision-weighted product of prior and data term
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

    # ------------------------------------------------------------------ objectives
    def log_weights(
        self,
        data: HierarchicalData,
        num_draws: int = 1,
        truth: dict[str, torch.Tensor] | None = None,
        encoded: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(log p(y, z), log q(z | y), z)`` per draw and dataset, ``[S, B]`` each; with ``truth``,
        z is the given values (log p is then skipped and returned as zeros)."""
        values = self(data, num_draws, truth, encoded)
        model_trace, guide_trace = self.get_traces()
        log_q = _sum_per_particle(guide_trace, self.structure.max_plate_nesting)
        if truth is not None:
            return torch.zeros_like(log_q), log_q, values
        return _sum_per_particle(model_trace, self.structure.max_plate_nesting), log_q, values


def _sum_per_particle(trace: Any, K: int) -> torch.Tensor:
    total: torch.Tensor | float = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"])
        if site.get("scale", 1.0) is not None:
            lp = lp * site.get("scale", 1.0)
        if lp.dim() > 2:
            lp = lp.sum(tuple(range(2, lp.dim())))
        while lp.dim() < 2:
            lp = lp.unsqueeze(0)
        total = total + lp
    return total  # type: ignore[return-value]
