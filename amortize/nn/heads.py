"""Conditional distributions of the guide, one "lazy distribution" per part of the posterior.

``GlobalHead(emb)`` returns q(globals | dataset) on the joint unconstrained scale; ``GroupHead(emb)``
returns the learned Gaussian data term of each group, which the guide multiplies with the model's
own conditional prior of the group latent given its sampled parents.
"""

from __future__ import annotations

import torch
from pyro.distributions import Normal, TransformedDistribution
from pyro.distributions.transforms import AffineTransform, ConditionalSpline
from pyro.nn import DenseNN
from torch import nn
from torch.distributions import Transform, constraints
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
    """q(u_globals | dataset embedding) on the joint unconstrained scale: a standard normal shaped
    (``flow_bins > 0``) by a conditional elementwise rational-quadratic spline, so that skewed
    marginals (log tau with mass near 0) are represented, then a conditional full-covariance affine
    map (location and Cholesky factor), then the fitted affine map."""

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

    @torch.no_grad()
    def fit(self, raw: torch.Tensor, u: torch.Tensor) -> None:
        """Set the raw skip path by least squares of the globals ``u [M, D]`` on the raw dataset
        statistics ``[M, r]`` (with a small ridge), and the scaler to the residuals' robust spread:
        the flow then starts at, and corrects, a linear-regression posterior."""
        raw, u = raw.reshape(-1, raw.shape[-1]).double()[:200_000], u.reshape(-1, self.dim).double()[:200_000]
        ok = torch.isfinite(raw).all(-1) & torch.isfinite(u).all(-1)
        raw, u = raw[ok], u[ok]
        mean, sd = raw.mean(0), raw.std(0).clamp_min(1e-6)
        x = torch.cat([(raw - mean) / sd, torch.ones_like(raw[:, :1])], -1)
        ridge = 1e-3 * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
        ridge[-1, -1] = 0.0
        sol = torch.linalg.solve(x.T @ x + ridge, x.T @ u)  # [r + 1, D]
        w = sol[:-1] / sd.unsqueeze(-1)
        self.raw.weight.copy_(w.T)
        self.raw.bias.copy_(sol[-1] - mean @ w)
        self.scaler.fit(u - self.raw(raw.to(self.raw.weight.dtype)).double())

    def standardizer(self, emb: torch.Tensor, batch_dims: int = 0, raw: torch.Tensor | None = None) -> tuple:
        """``(shift, scale)`` of the last affine map, shaped as the globals ``[B, *(1,) * batch_dims, D]``:
        ``(u - shift) / scale`` are the globals on the networks' scale (per-dataset centre)."""
        emb = emb.reshape(emb.shape[0], *[1] * batch_dims, emb.shape[-1])
        shift = self.scaler.loc if raw is None else self.scaler.loc + self.raw(raw.reshape(*emb.shape[:-1], -1))
        return shift.expand(*emb.shape[:-1], self.dim), self.scaler.scale

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
        # shape first, on a standard normal (whose mass lies inside the spline's bound), then scale:
        # a spline after the scaling would map [-b, b] onto itself, and contracting the centre
        # would stretch the tails
        transforms = [] if self.spline is None else [self.spline.condition(emb)]
        transforms.append(CholeskyAffine(loc, L))
        shift = self.scaler.loc if raw is None else self.scaler.loc + self.raw(raw.reshape(*emb.shape[:-1], -1))
        transforms.append(AffineTransform(shift, self.scaler.scale, event_dim=1))
        base = Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
        return TransformedDistribution(base, transforms)


class CholeskyAffine(Transform):
    """``y = loc + L x`` with a batch of lower-triangular ``L [..., D, D]`` (positive diagonal)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.loc, self.scale_tril = loc, scale_tril

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        diff = (y - self.loc).unsqueeze(-1)
        L = self.scale_tril.expand(*diff.shape[:-2], *self.scale_tril.shape[-2:])
        return torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ladj = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return ladj.expand(x.shape[:-1])


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
    and the dataset embedding, computed once per group (never per posterior draw).

    The data term is standardized per group by two linear skip paths on raw statistics:
    a location from the group mean (and the dataset mean) and a unit, the log of a scale from the
    pooled within-group log sd and log n (``sigma / sqrt(n)`` for a Gaussian likelihood). The
    networks only correct in that unit, so a group whose noise is 100x smaller than typical is
    served as well as a typical one. :meth:`fit` sets both paths from prior simulations by
    calibrating the group mean against the latent (``ybar = c + d u``): the likelihood's own
    scale, not the posterior's shrinkage, which the model's prior supplies in the guide.
    """

    def __init__(self, hidden: int, dim: int, global_dim: int = 0) -> None:
        super().__init__()
        self.net = mlp(2 * hidden, hidden, 2 * dim)
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)  # start at the fitted skip paths
            self.net[-1].bias.zero_()
        self.raw = _zero_linear(2, dim)  # group mean, dataset mean -> location
        self.raw_scale = _zero_linear(2, dim)  # pooled within-group log sd, log n -> log unit
        self.dim = dim
        self.global_dim = global_dim
        self.coupling = None  # per group: d(loc) / d(standardized globals), in units; starts at 0
        if global_dim:
            self.coupling = mlp(2 * hidden, hidden, dim * global_dim)
            with torch.no_grad():
                self.coupling[-1].weight.zero_()
                self.coupling[-1].bias.zero_()

    @torch.no_grad()
    def fit(self, raw: torch.Tensor, u: torch.Tensor) -> None:
        """Least-squares skip paths from simulated groups: raw statistics ``[M, 4]`` and the
        latent's unconstrained values ``[M, dim]``. A coordinate the group mean does not inform
        (|correlation| < 0.1, e.g. a slope) gets location = its typical value, unit = its spread."""
        raw, u = raw.reshape(-1, raw.shape[-1]).double()[:200_000], u.reshape(-1, self.dim).double()[:200_000]
        ok = torch.isfinite(raw).all(-1) & torch.isfinite(u).all(-1)
        raw, u = raw[ok], u[ok]
        ybar, scale_x = raw[:, 0], torch.cat([raw[:, 2:4], torch.ones_like(raw[:, :1])], -1)
        w_loc, b_loc = torch.zeros(self.dim, 2, dtype=u.dtype), torch.zeros(self.dim, dtype=u.dtype)
        w_scale, b_scale = torch.zeros(self.dim, 2, dtype=u.dtype), torch.zeros(self.dim, dtype=u.dtype)
        for j in range(self.dim):
            x = u[:, j]
            corr = torch.corrcoef(torch.stack([x, ybar]))[0, 1] if x.std() > 0 and ybar.std() > 0 else x.new_zeros(())
            if not torch.isfinite(corr) or corr.abs() < 0.1:
                q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype))
                b_loc[j], b_scale[j] = q[1], torch.log(((q[2] - q[0]) / 1.349).clamp_min(1e-4))
                continue
            d = torch.cov(torch.stack([x, ybar]))[0, 1] / x.var()
            c = ybar.mean() - d * x.mean()
            w_loc[j, 0], b_loc[j] = 1.0 / d, -c / d
            resid = ((ybar - c - d * x) / d).abs().clamp_min(1e-12)
            # E log|z| = -0.635 for z ~ N(0, 1): regress the log unit on (log sd, log n, 1)
            sol = torch.linalg.lstsq(scale_x, (resid.log() + 0.635).unsqueeze(-1)).solution.squeeze(-1)
            w_scale[j], b_scale[j] = sol[:2], sol[2]
        self.raw.weight.copy_(w_loc)
        self.raw.bias.copy_(b_loc)
        self.raw_scale.weight.copy_(w_scale)
        self.raw_scale.bias.copy_(b_scale)

    def forward(
        self, group_emb: torch.Tensor, dataset_emb: torch.Tensor, raw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``group_emb [B, G, H]``, ``dataset_emb [B, H]``, raw group statistics ``[B, G, 4]`` ->
        ``loc, scale`` each ``[B, G, d]`` and the coupling ``[B, G, d, D]`` to the standardized
        globals (None without coupling): the data term's location is ``loc + coupling @ w``."""
        features = torch.cat([group_emb, dataset_emb.unsqueeze(-2).expand_as(group_emb)], -1)
        out = self.net(features)
        unit = self.raw_scale(raw[..., 2:]).clamp(-30.0, 30.0).exp()
        loc = self.raw(raw[..., :2]) + unit * out[..., : self.dim]
        scale = unit * (softplus(out[..., self.dim :] + _SOFTPLUS_ONE) + 1e-4)
        coupling = None
        if self.coupling is not None:
            coupling = unit.unsqueeze(-1) * self.coupling(features).reshape(*loc.shape, self.global_dim)
        return loc, scale, coupling


_SOFTPLUS_ONE = 0.5413248546129181  # softplus(x) = 1
