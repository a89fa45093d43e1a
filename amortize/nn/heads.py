"""Conditional distributions of the guide, one "lazy distribution" per part of the posterior.

``GlobalHead(emb)`` returns q(globals | dataset) on the joint unconstrained scale; ``GroupHead(emb)``
returns the learned Gaussian data term of each group, which the guide multiplies with the model's
own conditional prior of the group latent given its sampled parents.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Normal, TransformedDistribution
from pyro.distributions.transforms import AffineTransform, ConditionalSpline
from pyro.nn import DenseNN
from torch import nn
from torch.nn.functional import linear, softplus

from .data_terms import TermRange
from .encoder import mlp
from .statistics import GroupStatistics
from .transforms import CholeskyAffine

__all__ = ["GlobalHead", "GroupHead", "ParamScaler", "PILOT_ROWS"]

PILOT_ROWS = 200_000  # the pilot fits its scalers and skip paths on at most this many rows (groups x datasets)


def _pilot_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` as ``[rows, d]`` in double, cut to the first :data:`PILOT_ROWS` rows."""
    return t.reshape(-1, t.shape[-1]).double()[:PILOT_ROWS]


class ParamScaler(nn.Module):
    """Affine map between the networks' normalized scale and a site's unconstrained scale,
    fitted on prior draws (robust location and scale per coordinate)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, u: torch.Tensor) -> None:
        u = _pilot_rows(u)
        q = torch.quantile(u, u.new_tensor([0.25, 0.5, 0.75]), dim=0)
        scale = (q[2] - q[0]) / 1.349
        self.loc.copy_(q[1])
        self.scale.copy_(torch.where(scale > 1e-4, scale, u.std(0).clamp_min(1e-4)))


TRIL_BOUND = 8.0  # the largest |entry| of q(globals)'s unit lower-triangular factor (a correlation of 0.99 needs 7)


class GlobalHead(nn.Module):
    """q(u_globals | dataset embedding) on the joint unconstrained scale: a standard normal shaped
    (``flow_bins > 0``) by a conditional elementwise rational-quadratic spline, so that skewed
    marginals (log tau with mass near 0) are represented, then a conditional full-covariance affine
    map (location and Cholesky factor), then a per-dataset standardizing map ``u = shift + unit * x``.

    The standardizing map is fitted on prior simulations (:meth:`fit`), is not trained afterwards, and
    reads the dataset's raw statistics and its counts (log groups per level, log rows), never the networks:

    * ``shift``: least squares of the globals on the raw statistics and on the raw statistics over
      each count (shrinkage towards the prior fades like 1 / count, so the fitted location keeps
      doing the right thing past the trained counts);
    * ``unit``: a log-linear function of the log counts, fitted to the residuals' size (posterior
      spreads shrink like a power of the counts), so the networks correct in units that narrow with
      the data as the true posterior does, beyond the trained range too.

    The raw statistics, counts and slopes are :meth:`DatasetStatistics.location_scale`, ``.counts()``
    and ``.covariate_slopes()`` (see :mod:`amortize.nn.statistics`)."""

    def __init__(
        self, hidden: int, dim: int, flow_bins: int = 8, raw_dim: int = 1, count_dim: int = 0, slope_dim: int = 0
    ) -> None:
        super().__init__()
        self.dim = dim
        self.net = mlp(hidden, hidden, dim + dim * (dim + 1) // 2)
        self.scaler = ParamScaler(dim)
        self.register_buffer("tril", torch.tril_indices(dim, dim, offset=-1), persistent=False)
        self.raw = _zero_linear(raw_dim, dim)
        self.raw_slope = _zero_linear(slope_dim, dim) if slope_dim else None  # covariate slopes -> loc
        self.count_dim = count_dim
        # raw statistics and slopes over each count -> loc
        self.raw_per_count = _zero_linear((raw_dim + slope_dim) * count_dim, dim) if count_dim else None
        self.count_unit = _zero_linear(count_dim, dim) if count_dim else None  # log counts -> log unit
        # the standardizing map is the pilot's fit and stays it: trained, the first steps' huge losses on
        # extreme simulations (Mmmec's prior predictive: 3e10 nats per coordinate) drove its log unit up by
        # ~9, where the networks' smallest scale (1e-3) then kept every q(globals) 10x wider than the prior
        for lin in (self.raw, self.raw_slope, self.raw_per_count, self.count_unit):
            if lin is not None:
                lin.requires_grad_(False)
        self.spline = None
        if flow_bins:
            k = flow_bins
            hyper = DenseNN(hidden, [hidden], [dim * k, dim * k, dim * (k - 1)])
            self.spline = ConditionalSpline(hyper, dim, count_bins=k, bound=5.0, order="quadratic")

    @staticmethod
    def _per_count(raw: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``[..., r]`` statistics over each of ``[..., c]`` log counts: ``[..., r * c]``."""
        return (raw.unsqueeze(-1) * torch.exp(-counts).unsqueeze(-2)).flatten(-2)

    def _shift_unit(
        self, raw: torch.Tensor | None, counts: torch.Tensor | None, shape: torch.Size, slopes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, scale)`` of the standardizing map, broadcast to ``shape[:-1] + (D,)``."""
        shift = torch.zeros(self.dim, dtype=self.scaler.loc.dtype, device=self.scaler.loc.device)
        unit = torch.ones_like(shift)
        if raw is not None:
            raw = raw.reshape(*shape[:-1], -1)
            shift = self.raw(raw)
            if self.raw_slope is not None and slopes is not None:
                slopes = slopes.reshape(*shape[:-1], -1)
                shift = shift + self.raw_slope(slopes)
                raw = torch.cat([raw, slopes], -1)
            if self.raw_per_count is not None and counts is not None:
                counts = counts.reshape(*shape[:-1], -1)
                shift = shift + self.raw_per_count(self._per_count(raw, counts))
                unit = self.count_unit(counts).clamp(-30.0, 30.0).exp()
        shift = shift + unit * self.scaler.loc
        return shift.expand(*shape[:-1], self.dim), (unit * self.scaler.scale).expand(*shape[:-1], self.dim)

    @torch.no_grad()
    def fit(
        self, raw: torch.Tensor, u: torch.Tensor, counts: torch.Tensor | None = None, slopes: torch.Tensor | None = None
    ) -> None:
        """Fit the standardizing map on prior simulations: raw dataset statistics ``[M, r]``, the
        globals ``u [M, D]``, the log counts ``[M, c]`` and the covariate slopes ``[M, k]``. The location
        is least squares (with a small ridge) of ``u`` on the raw statistics and slopes and on both over
        each count; the log unit, least squares of ``log |residual| + 0.635`` (``E log|z| = -0.635``
        for a standard normal) on the log counts; the scaler then takes the standardized residuals' robust spread.
        The flow starts at, and corrects, this count-aware linear-regression posterior."""
        raw, u, r = _pilot_rows(raw), _pilot_rows(u), raw.shape[-1]
        if self.raw_slope is not None and slopes is not None:
            raw = torch.cat([raw, _pilot_rows(slopes)], -1)
        use_counts = self.raw_per_count is not None and counts is not None
        c = _pilot_rows(counts) if use_counts else raw[:, :0]
        ok = torch.isfinite(raw).all(-1) & torch.isfinite(u).all(-1) & torch.isfinite(c).all(-1)
        raw, u, c = raw[ok], u[ok], c[ok]
        feats = torch.cat([raw, self._per_count(raw, c)], -1) if use_counts else raw
        mean, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
        x = torch.cat([(feats - mean) / sd, torch.ones_like(feats[:, :1])], -1)
        ridge = 1e-3 * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        ridge[-1, -1] = 0.0
        sol = torch.linalg.solve(x.T @ x + ridge, x.T @ u)  # [F + 1, D]
        w = sol[:-1] / sd.unsqueeze(-1)  # [F, D]
        full = raw.shape[-1]  # raw statistics, then slopes, then both over each count
        self.raw.weight.copy_(w[:r].T)
        self.raw.bias.copy_(sol[-1] - mean @ w)
        if full > r:
            self.raw_slope.weight.copy_(w[r:full].T)
            self.raw_slope.bias.zero_()
        resid = u - x @ sol
        unit = torch.ones_like(resid)
        if use_counts:
            self.raw_per_count.weight.copy_(w[full:].T)
            self.raw_per_count.bias.zero_()
            cx = torch.cat([c - c.mean(0), torch.ones_like(c[:, :1])], -1)
            target = resid.abs().clamp_min(1e-12).log() + 0.635
            ridge = (
                1e-3 * cx.shape[0] * torch.eye(cx.shape[1], dtype=cx.dtype, device=cx.device)
            )  # constant counts: slope 0
            ridge[-1, -1] = 0.0
            ls = torch.linalg.solve(cx.T @ cx + ridge, cx.T @ target)  # [c + 1, D]
            self.count_unit.weight.copy_(ls[:-1].T)
            self.count_unit.bias.copy_(ls[-1] - c.mean(0) @ ls[:-1])
            unit = self.count_unit(c.to(self.count_unit.weight.dtype)).double().exp()
        self.scaler.fit(resid / unit)

    def standardizer(
        self,
        emb: torch.Tensor,
        batch_dims: int = 0,
        raw: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        slopes: torch.Tensor | None = None,
    ) -> tuple:
        """``(shift, scale)`` of the standardizing map, shaped as the globals ``[B, *(1,) * batch_dims, D]``:
        ``(u - shift) / scale`` are the globals on the networks' scale (per-dataset centre and unit)."""
        emb = emb.reshape(emb.shape[0], *[1] * batch_dims, emb.shape[-1])
        return self._shift_unit(raw, counts, emb.shape, slopes)

    def forward(
        self,
        emb: torch.Tensor,
        batch_dims: int = 0,
        raw: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        slopes: torch.Tensor | None = None,
        standardizer: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> TransformedDistribution:
        """``emb [B, H]`` (raw statistics ``[B, r]``, log counts ``[B, c]``, covariate slopes ``[B, k]``)
        -> distribution with batch ``[B, *(1,) * batch_dims]`` and event ``[D]``. ``standardizer``:
        :meth:`standardizer` of the same inputs, when the caller already has it."""
        emb = emb.reshape(emb.shape[0], *[1] * batch_dims, emb.shape[-1])
        out = self.net(emb)
        D = self.dim
        loc = out[..., :D]
        # L = diag(s) T with T unit lower triangular, its entries bounded by TRIL_BOUND: L^-1 stays
        # bounded by (1 + TRIL_BOUND)^(D-1) / min(s) however far a dataset drives the network (free
        # entries over a small diagonal made L^-1 overflow, log q(truth) -inf, on extreme simulations)
        diag = softplus(out[..., D : 2 * D] + 0.5) + 1e-3
        L = torch.diag_embed(torch.ones_like(diag))
        if D > 1:
            L = _fill_tril(L, TRIL_BOUND * torch.tanh(out[..., 2 * D :] / TRIL_BOUND), self.tril)
        L = diag.unsqueeze(-1) * L
        # shape first, on a standard normal (whose mass lies inside the spline's bound), then scale:
        # a spline after the scaling would map [-b, b] onto itself, and contracting the centre
        # would stretch the tails
        transforms = [] if self.spline is None else [self.spline.condition(emb)]
        transforms.append(CholeskyAffine(loc, L))
        shift, scale = standardizer if standardizer is not None else self._shift_unit(raw, counts, emb.shape, slopes)
        transforms.append(AffineTransform(shift, scale, event_dim=1))
        base = Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
        return TransformedDistribution(base, transforms)


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

    The data term is standardized per group by linear skip paths on raw statistics: a location
    from the group mean (and the dataset mean) or, with row covariates, from the group's own
    least-squares slope or intercept, whichever informs the coordinate best; and a unit, the log of
    a scale from the pooled within-group log sd and log n (``sigma / sqrt(n)`` for a Gaussian
    likelihood), or log sd and the statistic's log precision (``sigma / sqrt(S_xx)`` for a slope).
    The networks only correct in that unit, so a
    group whose noise is 100x smaller than typical is served as well as a typical one, and a group
    whose covariate does not vary gets a data term too wide to matter. :meth:`fit` sets the paths
    from prior simulations by calibrating the statistic against the latent (``stat = c + d u``):
    the likelihood's own scale, not the posterior's shrinkage, which the model's prior supplies.

    ``lower_dim``: the site's rows of the strictly-lower part of the unit-diagonal factor ``T`` of the
    joint data term of its plate (``AmortizedGuide`` says which entries), unit-free, starting at 0.
    """

    def __init__(self, hidden: int, dim: int, global_dim: int = 0, slope_dim: int = 0, lower_dim: int = 0) -> None:
        super().__init__()
        self.raw_term = _zero_linear(dim, dim)  # the likelihood's data term location -> location
        self.raw_term_scale = _zero_linear(dim, dim)  # its log precision -> log unit
        self.term_range = TermRange(dim)  # the range of the data term seen in prior simulations
        self.net = mlp(2 * hidden, hidden, 2 * dim + lower_dim)
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)  # start at the fitted skip paths
            self.net[-1].bias.zero_()
            self.net[-1].weight[2 * dim :].zero_()  # the joint's off-diagonals start at 0: independent
        self.lower_dim = lower_dim
        self.raw = _zero_linear(2, dim)  # group mean, dataset mean -> location
        self.raw_scale = _zero_linear(2, dim)  # pooled within-group log sd, log n -> log unit
        self.slope_dim = slope_dim
        self.raw_slope = self.raw_slope_scale = None
        if slope_dim:
            self.raw_slope = _zero_linear(slope_dim, dim)  # the group's slopes -> location
            self.raw_slope_scale = _zero_linear(slope_dim, dim)  # their log precisions -> log unit
        self.dim = dim
        self.global_dim = global_dim
        self.coupling = None  # per group: d(loc) / d(standardized globals), in units; starts at 0
        if global_dim:
            self.coupling = mlp(2 * hidden, hidden, dim * global_dim)
            with torch.no_grad():
                self.coupling[-1].weight.zero_()
                self.coupling[-1].bias.zero_()

    @torch.no_grad()
    def fit(self, stats: GroupStatistics, u: torch.Tensor, term: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Least-squares skip paths from simulated groups: their statistics as rows
        (:meth:`GroupStatistics.rows`, ``[M]`` each) and the latent's unconstrained values ``[M, dim]``.
        Each coordinate takes the statistic it is most correlated with (the group mean or one of the
        k = ``slope_dim`` measurements: slopes and intercepts); one none informs (|correlation| < 0.1)
        gets location = its typical value, unit = its spread. ``term``: the site's likelihood data term
        ``(location, log precision)`` ``[M, dim]`` each, a candidate like the statistics; its range in
        these simulations bounds what :meth:`forward` reads (:class:`TermRange`)."""
        k = self.slope_dim
        # candidates: group mean, slopes, intercepts; their log n / log precisions; the unit's log sd
        m = PILOT_ROWS  # every candidate is cut to the same first rows
        cand = [stats.mean.unsqueeze(-1)[:m]] + ([stats.measurements()[:m]] if k else [])
        prec = [stats.unit_log_n.unsqueeze(-1)[:m]] + ([stats.measurement_log_precisions()[:m]] if k else [])
        term = tuple(t.reshape(-1, self.dim)[:m] for t in term)
        self.term_range.fit(term)
        loc_t, prec_t = self.term_range(term)
        cand.append(loc_t)  # the likelihood's data term location per coordinate, its log precision
        prec.append(prec_t)
        k_all = k + self.dim
        cand, prec = torch.cat(cand, -1).double(), torch.cat(prec, -1).double()
        log_sd = stats.unit_log_sd.double()[:m]
        u = u.reshape(-1, self.dim).double()[:m]
        ok = torch.isfinite(cand).all(-1) & torch.isfinite(prec).all(-1) & torch.isfinite(log_sd)
        ok &= torch.isfinite(stats.dataset_mean.double()[:m]) & torch.isfinite(u).all(-1)
        cand, counts, log_sd, u = cand[ok], prec[ok], log_sd[ok], u[ok]
        w_loc, b_loc = u.new_zeros(self.dim, 2), u.new_zeros(self.dim)
        w_scale, b_scale = u.new_zeros(self.dim, 2), u.new_zeros(self.dim)
        w_slope, w_slope_scale = u.new_zeros(self.dim, k_all), u.new_zeros(self.dim, k_all)
        # a slope of a group whose covariate (nearly) does not vary is no measurement: left out of the fits
        valid = counts > counts.median(0).values - math.log(1e6)  # [M, 1 + k]
        for j in range(self.dim):
            x = u[:, j]
            corrs = [_corr(x[valid[:, i]], cand[valid[:, i], i]) for i in range(cand.shape[1])]
            best = max(range(len(corrs)), key=lambda i: abs(corrs[i]))
            if abs(corrs[best]) < 0.1:
                q = torch.quantile(x, x.new_tensor([0.25, 0.5, 0.75]))
                b_loc[j], b_scale[j] = q[1], torch.log(((q[2] - q[0]) / 1.349).clamp_min(1e-4))
                continue
            rows = valid[:, best]
            xv, stat = x[rows], cand[rows, best]
            d = torch.cov(torch.stack([xv, stat]))[0, 1] / xv.var()
            c = stat.mean() - d * xv.mean()
            if best == 0:
                w_loc[j, 0] = 1.0 / d
            else:
                w_slope[j, best - 1] = 1.0 / d
            b_loc[j] = -c / d
            resid = ((stat - c - d * xv) / d).abs().clamp_min(1e-12)
            # E log|z| = -0.635 for z ~ N(0, 1): regress the log unit on (log sd, log n or precision, 1)
            design = torch.stack([log_sd[rows], counts[rows, best], torch.ones_like(xv)], -1)
            # on the CPU, whose default driver (gelsy) solves a rank-deficient design (a constant count);
            # CUDA's only driver (gels) assumes full rank
            rhs = (resid.log() + 0.635).unsqueeze(-1)
            sol = torch.linalg.lstsq(design.cpu(), rhs.cpu()).solution.squeeze(-1).to(design.device)
            w_scale[j, 0], b_scale[j] = sol[0], sol[2]
            if best == 0:
                w_scale[j, 1] = sol[1]
            else:
                w_slope_scale[j, best - 1] = sol[1]
        self.raw.weight.copy_(w_loc)
        self.raw.bias.copy_(b_loc)
        self.raw_scale.weight.copy_(w_scale)
        self.raw_scale.bias.copy_(b_scale)
        if k:
            self.raw_slope.weight.copy_(w_slope[:, :k])
            self.raw_slope_scale.weight.copy_(w_slope_scale[:, :k])
        self.raw_term.weight.copy_(w_slope[:, k:])
        self.raw_term_scale.weight.copy_(w_slope_scale[:, k:])

    def forward(
        self,
        group_emb: torch.Tensor,
        dataset_emb: torch.Tensor,
        stats: GroupStatistics,
        term: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``group_emb [B, G, H]``, ``dataset_emb [B, H]``, the level's :class:`GroupStatistics`, the
        site's data term ``(location, log precision)`` ``[B, G, d]`` each -> ``loc, scale`` each
        ``[B, G, d]``, the coupling ``[B, G, d, D]`` to the standardized globals (None without
        coupling): the data term's location is ``loc + coupling @ w``, and the joint's lower entries
        ``[B, G, lower_dim]`` (None without)."""
        # both networks read [group_emb, dataset_emb]: their first layers split into a per-group part
        # (one matmul for both networks) and a per-dataset part, computed once per dataset
        first = [self.net[0]] + ([] if self.coupling is None else [self.coupling[0]])
        H = group_emb.shape[-1]
        weight = torch.cat([f.weight for f in first])  # [(1 or 2) H, 2H]
        bias = torch.cat([f.bias for f in first])
        pre = linear(group_emb, weight[:, :H]) + linear(dataset_emb, weight[:, H:], bias).unsqueeze(-2)
        pre = pre.split([f.out_features for f in first], -1)  # each [B, G, H]
        out = self.net[1:](pre[0])
        log_unit = self.raw_scale(torch.stack([stats.unit_log_sd, stats.unit_log_n], -1))
        loc = self.raw(torch.stack([stats.mean, stats.dataset_mean], -1))
        if self.raw_slope is not None:
            log_unit = log_unit + self.raw_slope_scale(stats.measurement_log_precisions())
            loc = loc + self.raw_slope(stats.measurements())
        loc_t, prec_t = self.term_range(term)
        log_unit = log_unit + self.raw_term_scale(prec_t.to(loc.dtype))
        loc = loc + self.raw_term(loc_t.to(loc.dtype))
        unit = log_unit.clamp(-30.0, 30.0).exp()
        loc = loc + unit * out[..., : self.dim]
        scale = unit * (softplus(out[..., self.dim : 2 * self.dim] + _SOFTPLUS_ONE) + 1e-4)
        coupling = None
        if self.coupling is not None:
            coupling = unit.unsqueeze(-1) * self.coupling[1:](pre[1]).reshape(*loc.shape, self.global_dim)
        lower = out[..., 2 * self.dim :] if self.lower_dim else None
        return loc, scale, coupling, lower


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    c = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return c if c == c else 0.0  # NaN -> 0


_SOFTPLUS_ONE = 0.5413248546129181  # softplus(x) = 1
