"""The amortized guide: a real Pyro guide with the model's site names, computed top-down.

It runs the model itself (Pyro's effect-based :class:`~pyro.poutine.guide.GuideMessenger`): at each
latent site it sees the model's prior given the parents already drawn from the guide, and returns

* for global sites: one joint draw ``u ~ q(u_globals | dataset)`` on the unconstrained scale,
  handed out site by site through the site's bijection (the joint log density rides on the first
  global site);
* for a group site: ``q(u_g | parents, data) ∝ prior(u_g | parents) x N(u_g; m_g, S_g)``, the
  model's own conditional prior times a learned Gaussian data term of the group (exact when the
  prior is Gaussian on the unconstrained scale, with full covariance for a MultivariateNormal prior;
  for any other prior, the product with a Gaussian stand-in of it, :func:`prior_surrogate`).

Several latent sites of one plate share ONE data term: a joint Gaussian over the stacked unconstrained
vector of the plate's sites (model order, then each site's coordinates), location ``m`` and covariance
``L L^T`` with ``L = diag(s) T``, ``s`` the per-coordinate scales and ``T`` unit lower triangular (its
strictly-lower entries from the sites' heads, starting at 0: independent coordinates). Pyro's guide
meets the sites one by one and a later sibling's prior is only known when the model reaches it (it may
depend on the earlier siblings), so the draw is sequential: site ``k``'s q is its prior times the data
term's CONDITIONAL given the siblings already drawn, ``N(m_k + diag(s_k) T_k,<k e_<k, diag(s_k) T_kk
T_kk^T diag(s_k))`` with ``e`` the siblings' standardized residuals (the first site takes the data term's
marginal). Each factor is normalized exactly, so ``log q`` of the draw is the sum of the sites' log
densities, per group. A one-site scalar plate has no entries in ``T``: it computes what it always did.

The same pass scores given values (``truth``): :mod:`amortize.objectives` turns its traces into the
NPE objective and, with the model's log density, the importance weights behind the ELBO, the IW
bound and PSIS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.poutine.guide import GuideMessenger
from torch import nn

from .data import HierarchicalData
from .errors import ModelStructureError
from .gaussian_terms import (
    _compact,
    _real,
    gaussian_prior,
    gaussian_product,
    prior_surrogate,
    product_draw,
)
from .nn import GlobalHead, GroupHead, HierarchicalEncoder
from .nn.data_terms import group_terms, level_dims, site_term
from .structure import LatentSite, ModelStructure, batched

__all__ = ["AmortizedGuide", "gaussian_prior", "gaussian_product", "prior_surrogate", "product_draw"]


COUPLING_BOUND = 30.0  # the standardized globals the groups' coupling reads are clipped to +-30 sds


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
        self.encoder = HierarchicalEncoder(
            structure.levels, covariates, hidden, level_dims(structure), factors=structure.factors
        )
        self.global_head = None
        if structure.global_dim:
            enc = self.encoder
            self.global_head = GlobalHead(
                hidden, structure.global_dim, flow_bins, enc.raw_dataset_dim, enc.count_dim, enc.slope_dim
            )
        D = structure.global_dim if global_coupling else 0
        self._joint = _plate_joints(structure)
        self.group_heads = nn.ModuleDict(
            {
                s.name: GroupHead(
                    hidden, s.dim, D, self.encoder.group_slope_dim[s.level], self._joint[s.name].lower_dim
                )
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
        state: dict[str, Any] = {"terms": {}, "lower": {}, "embedding": enc.dataset}
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
            loc, scale, coupling, lower = head(enc.groups[site.level], enc.dataset, group_stats, term)  # [B, G, d]
            G = loc.shape[-2]
            state["terms"][name] = (
                loc.reshape(B, *[1] * (K - 1), G, -1),
                scale.reshape(B, *[1] * (K - 1), G, -1),
                None if coupling is None else coupling.reshape(B, *[1] * (K - 1), G, *coupling.shape[-2:]),
            )
            if lower is not None:  # [B, 1.., G, lower_dim]
                state["lower"][name] = lower.reshape(B, *[1] * (K - 1), G, -1)
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
        if truth is not None and name not in truth:  # a partial truth holds some sites and draws the rest
            truth = None
        if site.level is None:
            return self._global_posterior(site, prior, st, truth)
        loc, scale, coupling = st["terms"][name]
        if coupling is not None and st["u"] is not None:  # globals come first in the model: drawn
            shift, spread = st["standardizer"]
            # [S, B, 1.., D], bounded: a draw far in q(globals)'s tails moves the groups' terms no further
            # than COUPLING_BOUND sds would (unbounded, an overflowing global made the location inf, then NaN)
            w = ((st["u"] - shift) / spread).clamp(-COUPLING_BOUND, COUPLING_BOUND)
            # one batched matmul per dataset ([S, D] @ [D, G d]), never the [S, B, G, d, D] product
            S, B, D = w.shape[0], coupling.shape[0], w.shape[-1]
            shifted = torch.einsum("bnk,sbk->sbn", coupling.reshape(B, -1, D), w.reshape(S, -1, D).expand(S, B, D))
            loc = loc + shifted.reshape(S, *loc.shape)  # [S, B, 1.., G, d]
        loc, tril = self._conditional(site, loc, scale, st)
        g = gaussian_prior(prior, site)
        ushape = site.unconstrained_shape
        if tril is not None or (g is not None and g[1].dim() > g[0].dim()):  # correlated: full product
            if g is None:  # not Gaussian on the unconstrained scale: the product with a Gaussian stand-in
                g = prior_surrogate(prior, site, loc, scale)
            g0, g1 = (t.to(loc.dtype) for t in g)
            if g1.dim() == g0.dim():  # independent coordinates; one without a stand-in: 1e4 x the data term
                wide = 1e4 * torch.diagonal(tril, dim1=-2, dim2=-1).amax(-1, keepdim=True)
                g1 = torch.diag_embed(torch.where(torch.isfinite(g1), g1, wide))
            q = gaussian_product(g0, g1, loc, scale, tril)
            if not _real(site.support):
                q = dist.TransformedDistribution(q, [site.transform])
            if truth is None:
                return q
            return dist.Delta(truth[name], log_density=q.log_prob(truth[name]), event_dim=len(site.event_shape))
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
        # floored where its square stays normal: Normal.log_prob divides by scale**2 (0 / 0 at the loc itself)
        scale = (scale * w.sqrt()).clamp_min(torch.finfo(scale.dtype).tiny ** 0.5)
        loc = loc.reshape(*loc.shape[:-1], *ushape)
        scale = scale.reshape(*scale.shape[:-1], *ushape)
        q = dist.Normal(loc, scale).to_event(len(ushape))
        if not _real(site.support):
            q = dist.TransformedDistribution(q, [site.transform])
        if truth is None:
            return q
        value = truth[name]
        return dist.Delta(value, log_density=q.log_prob(value), event_dim=len(site.event_shape))

    def _conditional(
        self, site: LatentSite, loc: torch.Tensor, scale: torch.Tensor, st: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The plate's joint data term conditioned on the siblings already drawn: ``(loc, tril)`` of
        this site's block, ``tril`` None where its coordinates stay independent given the siblings."""
        joint = self._joint[site.name]
        lower = st["lower"].get(site.name)
        d, o = site.dim, joint.offset
        T = None
        if (
            lower is not None and o
        ):  # m_k + diag(s_k) T_k,<k e_<k, with e the siblings' standardized residuals [S?, B, 1.., G, o]
            cross = lower[..., : d * o].reshape(*lower.shape[:-1], d, o)
            e = torch.cat([self._residual(name, st) for name in joint.before], -1)
            loc = loc + scale * (cross @ e.unsqueeze(-1)).squeeze(-1)
        if lower is not None and joint.within:  # T_kk: unit lower triangle [B, 1.., G, d, d]
            T = torch.diag_embed(torch.ones_like(lower[..., :1]).expand(*lower.shape[:-1], d)).clone()
            T[..., joint.tril_index[0], joint.tril_index[1]] = lower[..., d * o :]
        if joint.later:
            st.setdefault("cond", {})[site.name] = (loc, scale, T)
        return loc, None if T is None else scale.unsqueeze(-1) * T

    def _residual(self, name: str, st: dict[str, Any]) -> torch.Tensor:
        """A drawn sibling's standardized residual ``e = T^-1 (u - m) / s`` under its conditional data term."""
        cache = st.setdefault("residuals", {})
        if name not in cache:
            site = self.structure[name]
            held = st["truth"] is not None and name in st["truth"]  # the verdict holds only some sites
            value = st["truth"][name] if held else self.upstream_value(name)
            loc, scale, T = st["cond"][name]
            z = (site.unconstrain(value) - loc) / scale
            if T is not None:
                z = torch.linalg.solve_triangular(T, z.unsqueeze(-1), upper=False, unitriangular=True).squeeze(-1)
            cache[name] = z
        return cache[name]

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


@dataclass(frozen=True)
class _Joint:
    """A group site's place in its plate's joint data term (coordinates stacked in model order)."""

    dim: int  # the site's coordinates
    offset: int  # coordinates of the plate's earlier sites
    before: tuple[str, ...]  # those sites
    later: bool  # a later site of the plate conditions on this one
    within: bool  # the site's own coordinates are correlated (a vector site)
    tril_index: tuple[torch.Tensor, torch.Tensor]  # strictly-lower entries of its d x d block

    @property
    def lower_dim(self) -> int:
        """The head's outputs for the site's rows of ``T``: ``d * offset`` cross entries, then its block."""
        return self.dim * self.offset + self.tril_index[0].numel()


def _plate_joints(structure: ModelStructure) -> dict[str, _Joint]:
    """Each group site's :class:`_Joint`: the sites of one level form one joint data term."""
    out: dict[str, _Joint] = {}
    for level in structure.levels:
        sites = [s for s in structure.latents if s.level == level]
        offset = 0
        for k, s in enumerate(sites):
            within = len(s.unconstrained_shape) == 1 and s.dim > 1
            idx = torch.tril_indices(s.dim, s.dim, offset=-1) if within else torch.zeros(2, 0, dtype=torch.long)
            out[s.name] = _Joint(
                s.dim, offset, tuple(t.name for t in sites[:k]), k + 1 < len(sites), within, (idx[0], idx[1])
            )
            offset += s.dim
    return out
