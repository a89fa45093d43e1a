"""Conditional distributions of the guide, one "lazy distribution" per part of the posterior.

``GlobalHead(emb)`` returns q(globals | dataset) on the joint unconstrained scale; ``GroupHead(emb)``
returns the learned Gaussian data term of each group, which the guide multiplies with the model's
own conditional prior of the group latent given its sampled parents.
"""

from __future__ import annotations

import torch
from pyro.distributions import MultivariateNormal, TransformedDistribution
from pyro.distributions.transforms import AffineTransform, ConditionalSpline
from pyro.nn import DenseNN
from torch import nn
from torch.nn.functional import softplus

from .encoder import mlp

__all__ = ["GlobalHead", "GroupHead", "ParamScaler"]


class ParamScaler(nn.Module):
    """Affine map between the networks' normalized scale and a site's unconstrained scale,
    fitted on prior draws (robust location and scale per coordinate)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, u: torch.Tensor) -> None:
        u = u.reshape(-1, u.shape[-1]).double()[:200_000]
        q = torch.quantile(u, torch.tensor([0.25, 0.5, 0.75], dtype=u.dtype), dim=0)
        scale = (q[2] - q[0]) / 1.349
        self.loc.copy_(q[1])
        self.scale.copy_(torch.where(scale > 1e-4, scale, u.std(0).clamp_min(1e-4)))


class GlobalHead(nn.Module):
    """q(u_globals | dataset embedding) on the joint unconstrained scale: a full-covariance Gaussian,
    followed (``flow_bins > 0``) by a conditional elementwise rational-quadratic spline, so that
    skewed marginals (log tau with mass near 0) are represented; then the fitted affine map."""

    def __init__(self, hidden: int, dim: int, flow_bins: int = 8, raw_dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.net = mlp(hidden, hidden, dim + dim * (dim + 1) // 2)
        self.scaler = ParamScaler(dim)
        self.register_buffer("tril", torch.tril_indices(dim, dim, offset=-1), persistent=False)
        self.raw = _zero_linear(raw_dim, dim)
        self.spline = None
        if flow_bins:
            k = flow_bins
            hyper = DenseNN(hidden, [hidden], [dim * k, dim * k, dim * (k - 1)])
            self.spline = ConditionalSpline(hyper, dim, count_bins=k, bound=5.0, order="quadratic")

    def forward(
        self, emb: torch.Tensor, batch_dims: int = 0, raw: torch.Tensor | None = None
    ) -> TransformedDistribution:
        """``emb [B, H]`` (and raw location statistics ``[B, r]``) -> distribution with batch
        ``[B, *(1,) * batch_dims]`` and event ``[D]``."""
        emb = emb.reshape(emb.shape[0], *[1] * batch_dims, emb.shape[-1])
        out = self.net(emb)
        D = self.dim
        loc = out[..., :D]
        diag = softplus(out[..., D : 2 * D] + 0.5) + 1e-3
        L = torch.diag_embed(diag)
        if D > 1:
            L = _fill_tril(L, out[..., 2 * D :], self.tril)
        transforms = [] if self.spline is None else [self.spline.condition(emb)]
        shift = self.scaler.loc if raw is None else self.scaler.loc + self.raw(raw.reshape(*emb.shape[:-1], -1))
        transforms.append(AffineTransform(shift, self.scaler.scale, event_dim=1))
        return TransformedDistribution(MultivariateNormal(loc, scale_tril=L), transforms)


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    """A linear skip path from raw (unscaled) location statistics, starting at zero: it lets a
    location follow the data's own scale exactly, however extreme, where scaled features saturate."""
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _fill_tril(L: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    L = L.clone()
    L[..., idx[0], idx[1]] = values
    return L


class GroupHead(nn.Module):
    """Gaussian data term of one group site: ``(loc, scale)`` per group from the group's embedding
    and the dataset embedding, computed once per group (never per posterior draw)."""

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.net = mlp(2 * hidden, hidden, 2 * dim)
        self.scaler = ParamScaler(dim)
        self.raw = _zero_linear(2, dim)  # group mean, dataset mean -> location
        self.raw_scale = _zero_linear(2, dim)  # pooled within-group log sd, log n -> log scale
        self.dim = dim

    def forward(
        self, group_emb: torch.Tensor, dataset_emb: torch.Tensor, raw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``group_emb [B, G, H]``, ``dataset_emb [B, H]``, raw group statistics ``[B, G, 2]`` ->
        ``loc, scale`` each ``[B, G, d]``."""
        ctx = dataset_emb.unsqueeze(-2).expand_as(group_emb)
        out = self.net(torch.cat([group_emb, ctx], -1))
        loc = self.scaler.loc + self.scaler.scale * out[..., : self.dim] + self.raw(raw[..., :2])
        scale = self.scaler.scale * (softplus(out[..., self.dim :] + 0.5) + 1e-4) * self.raw_scale(raw[..., 2:]).exp()
        return loc, scale
