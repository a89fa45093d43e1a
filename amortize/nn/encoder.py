"""Bottom-up set encoder: pools observations into groups, groups into parents, up to one
dataset embedding, carrying explicit log-scale summary statistics at every level.

All tensors carry B datasets that share one structure: the response is ``[B, N]``, index arrays
and covariates are shared. Per-group work is done once per group, with segment sums.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from ..data import OBS, HierarchicalData

__all__ = ["HierarchicalEncoder", "Encoding", "RobustScaler", "mlp", "segment_mean"]


def mlp(d_in: int, d_hidden: int, d_out: int, layers: int = 2) -> nn.Sequential:
    """A SiLU MLP with ``layers`` hidden layers."""
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, d_hidden), nn.SiLU()]
        d = d_hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def segment_sum(x: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``x [..., N, F]`` into ``[..., size, F]`` by ``idx [N]``."""
    out = x.new_zeros(*x.shape[:-2], size, x.shape[-1])
    return out.index_add_(x.dim() - 2, idx, x)


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


def _slope_spread(
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


def _between_slopes(ybar: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares slopes ``[B, k]`` of group means ``ybar [B, G]`` on group covariates ``C [G, k]``
    (with an intercept and a tiny ridge), their squared t statistics ``[B, k]`` (slope^2 over its
    sampling variance: residual variance on G - k - 1 degrees of freedom times ``(C'C)^-1``), and
    that residual variance ``[B, 1]``."""
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


class RobustScaler(nn.Module):
    """Fixed feature standardization fitted once on simulated data: robust z-score, then a soft clamp
    (``c * tanh(z / c)``) so that extreme but legitimate datasets stay in range."""

    def __init__(self, dim: int, clamp: float = 6.0) -> None:
        super().__init__()
        self.clamp = clamp
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        q = torch.quantile(x[:200_000], torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=0)
        scale = (q[2] - q[0]) / 1.349
        scale = torch.where(scale > 1e-6, scale, x.std(0).clamp_min(1e-6))
        self.loc.copy_(q[1])
        self.scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.loc) / self.scale
        return self.clamp * torch.tanh(z / self.clamp)


class Encoding:
    """Output of the encoder: embeddings ``dataset [B, H]`` and ``groups[level] [B, G_level, H]``,
    and raw statistics on the response's own scale, never squashed by a scaler: ``raw_dataset
    [B, 2 + 3L]`` (mean, log sd; per level pooled within-group, between-group and excess log sds) and
    ``raw_groups[level] [B, G, 4]`` (group mean, dataset mean, and the group mean's unit: for the
    innermost level the pooled within-group log sd and log n, above it the pooled within-group log
    sd of child means and the log number of children; with k row covariates the innermost level's
    end with the group's k least-squares slopes, its intercept, its intercept at the pooled slopes
    and their k + 2 log precisions),
    ``counts [B, L + 1]``:
    the log number of groups per level (outermost first) and the log number of rows, and
    ``raw_slopes [B, slope_dim]``: the pooled within-group slopes on the row covariates, for each
    level with covariates the slopes of its group means on them, then per row covariate the
    excess log sd of the groups' slopes and their correlation with the group means, then the
    group-mean slopes shrunk by their precision, ``b t^2 / (t^2 + c)`` for c = 1, then c = 4, then
    the intercepts at covariates 0 of the rows and of each level's fit on its covariates."""

    def __init__(
        self,
        dataset: torch.Tensor,
        groups: dict[str, torch.Tensor],
        raw_dataset: torch.Tensor,
        raw_groups: dict[str, torch.Tensor],
        counts: torch.Tensor | None = None,
        raw_slopes: torch.Tensor | None = None,
    ) -> None:
        self.dataset = dataset
        self.groups = groups
        self.raw_dataset = raw_dataset
        self.raw_groups = raw_groups
        self.counts = counts
        self.raw_slopes = raw_slopes


class HierarchicalEncoder(nn.Module):
    """Encode B datasets of one structure bottom-up through the levels.

    Args:
        levels: level names, outermost first.
        covariates: ``{level or "obs": [names]}`` the model's data carries.
        hidden: embedding width H.

    Attributes:
        revision: which statistics the encoder computes (checkpoints record it; older ones load
            with what they were trained on):

            * 0: the first statistics;
            * 1: pooled within-group variances divide by their degrees of freedom (N - G), not by N:
              unbiased whatever the group sizes (with N, log sigma read about 2% low when every
              group has 5-15 rows);
            * 2: with row covariates, the innermost pooled noise is that of the residuals of a
              least-squares fit of y on the covariates within each group, so slopes do not pass for
              noise (a varying-slopes dataset with sigma 0.05 read sigma 5x too high);
            * 3: covariate statistics for the heads' skip paths: each innermost group's least-squares
              slopes on the row covariates with their precisions, and the dataset's pooled
              within-group slopes and between-group slopes of group means on each level's covariates
              (zeros below revision 3);
            * 4: how the groups' slopes vary: per row covariate the excess log sd of the groups' slopes
              and their correlation with the group means (the raw statistics of varying slopes'
              scales and correlation), appended to the dataset's slopes (zeros below revision 4);
            * 5: each innermost group's least-squares intercept (its fitted value at covariates 0)
              with its log precision, after its slopes: the statistic of a varying intercept when
              slopes vary too (the group mean then carries slope x covariate mean);
            * 6: each innermost group's intercept at the dataset's pooled within-group slopes
              (``ybar - pooled . xbar``, log precision log n), after its own intercept: the
              statistic of a varying intercept when slopes are shared, measured in every group
              (a group's own intercept is not where its covariate does not vary, e.g. every row
              of a county on the same floor);
            * 7: each between-group slope shrunk by its own precision, ``b t^2 / (t^2 + c)`` for
              c = 1 and 4 (t: the slope over its standard error), appended to the dataset's slopes:
              the global head's linear location can then follow a precise slope all the way (a
              plain slope's coefficient, fitted over prior datasets of every noise level, is
              diluted towards 0: a county-level weight of 2.4 read as 1.4);
            * 8: with row covariates, the between-group slopes regress the group means of the
              response net of the pooled within-group slopes (``ybar - pooled . xbar``): a row
              covariate whose group means vary (the share of houses on a floor) no longer adds
              its effect to the between-group noise;
            * 9: the between-group log sd and its excess over the noise (the raw statistics of a
              level's scale) are those of the same net group means, around their fit on the
              level's covariates: the spread of the group effects, not of what covariates explain
              (a county-level weight of 2 on a covariate of sd 0.33 read as a county scale of 0.7
              when it was 0.13). The innermost noise is the residuals' when rows have covariates;
            * 10: the intercepts at covariates 0, appended to the dataset's slopes: of the rows
              (``mean y - pooled . mean x``) and of each level's fit of its net group means on its
              covariates: the raw counterparts of a model's intercepts, which otherwise depend on
              covariate means the standardized statistics do not carry (a county-level weight of 2
              on a covariate of mean -0.3 moved the county effects' mean by 0.6).
    """

    revision: int = 10

    @property
    def pooled_df(self) -> bool:
        return self.revision >= 1

    @property
    def residual_pooling(self) -> bool:
        return self.revision >= 2

    def __init__(self, levels: tuple[str, ...], covariates: dict[str, list[str]], hidden: int = 64) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.cov_names = {lvl: list(names) for lvl, names in covariates.items()}
        kx = len(self.cov_names.get(OBS, []))
        self.obs_dim = 2 + 2 * kx  # standardized y, asinh y, covariates, y * covariates
        self.phi = mlp(self.obs_dim, 32, hidden, layers=1)  # per observation: kept small, it runs N times
        self.level_stats = {lvl: self._n_level_stats(lvl) for lvl in self.levels}
        self.scalers = nn.ModuleDict({lvl: RobustScaler(n) for lvl, n in self.level_stats.items()})
        self.nets = nn.ModuleDict()
        for i, lvl in enumerate(self.levels):
            child = hidden if i + 1 < len(self.levels) else 0
            self.nets[lvl] = mlp(self.level_stats[lvl] + hidden + child, hidden, hidden)
        self.n_global_stats = 4 + self.obs_dim + 7 * len(self.levels)
        self.raw_dataset_dim = 2 + 3 * len(self.levels)
        self.count_dim = len(self.levels) + 1
        kc = sum(len(self.cov_names.get(lvl, [])) for lvl in self.levels)
        with_cov = sum(1 for lvl in self.levels if self.cov_names.get(lvl))
        self.slope_dim = 3 * kx + kc + 2 * kc + (kx > 0) + with_cov  # raw covariate slopes (see statistics)
        # per innermost group: k slopes, its own intercept and the pooled-slope intercept (each with a
        # log precision)
        self.group_slope_dim = {
            lvl: kx + 2 if kx and i == len(self.levels) - 1 else 0 for i, lvl in enumerate(self.levels)
        }
        self.global_scaler = RobustScaler(self.n_global_stats)
        self.global_net = mlp(self.n_global_stats + 2 * hidden, hidden, hidden)

    def _n_level_stats(self, lvl: str) -> int:
        inner = self.levels.index(lvl) == len(self.levels) - 1
        return 7 + self.obs_dim + len(self.cov_names.get(lvl, [])) + (0 if inner else 2)

    # -------------------------------------------------------------- summary statistics
    def statistics(self, data: HierarchicalData) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Any]:
        """Unscaled per-level summaries ``{level: [B, G, F_level]}``, dataset summaries ``[B, F]``,
        per-observation features ``[B, N, F_obs]`` and the raw location/scale statistics
        ``(raw_dataset [B, 2 + 3L], raw_groups {level: [B, G, 4 (+ 2k + 4)]}, counts [B, L + 1], raw_slopes
        [B, slope_dim])`` for the heads' skip paths (``counts``: log groups per level, outermost first,
        and log rows; with k row covariates the innermost groups' statistics end with their k slopes,
        their intercept, their intercept at the pooled slopes and the k + 2 log precisions;
        ``raw_slopes``: see :class:`Encoding`)."""
        y = data.y if data.y.dim() == 2 else data.y.unsqueeze(0)  # [B, N]
        B, N = y.shape
        m = y.mean(-1, keepdim=True)  # [B, 1]
        s = y.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6)  # [B, 1]
        ys = (y - m) / s
        feats = [ys, torch.asinh(y)]
        fit: WithinGroupFit | None = None
        if self.cov_names.get(OBS):
            X_raw = torch.stack([data.covariates[OBS][k] for k in self.cov_names[OBS]], -1).to(y.dtype)  # [N, kx]
            inner = self.levels[-1]
            if self.residual_pooling:
                fit = within_group_fit(y, X_raw, data.index(inner), data.size(inner), data.counts(inner).to(y.dtype))
            X = (X_raw - X_raw.mean(0)) / X_raw.std(0, unbiased=False).clamp_min(1e-6)
            feats += [X.expand(B, N, -1).unbind(-1)[j] for j in range(X.shape[-1])]
            feats += [ys * X[:, j] for j in range(X.shape[-1])]
        f = torch.stack(feats, -1)  # [B, N, F_obs]
        log_s = torch.log(s)
        stats: dict[str, torch.Tensor] = {}
        glob = [m.squeeze(-1), torch.asinh(m.squeeze(-1)), log_s.squeeze(-1), torch.full_like(m.squeeze(-1), N).log()]
        glob += list(f.mean(-2).unbind(-1))
        child_mean: torch.Tensor | None = None
        child_ybar: torch.Tensor | None = None
        raw_groups: dict[str, torch.Tensor] = {}
        pooled, between, excess = [], [], []
        kx = len(self.cov_names.get(OBS, []))
        between_slopes: dict[str, torch.Tensor] = {}
        between_t2: dict[str, torch.Tensor] = {}
        between_intercept: dict[str, torch.Tensor] = {}
        for i in reversed(range(len(self.levels))):
            lvl = self.levels[i]
            G = data.size(lvl)
            idx = data.index(lvl)  # [N]
            n = data.counts(lvl).to(y.dtype)  # [G]
            moments = segment_mean(torch.stack([y, y * y], -1), idx, G, n)  # [B, G, 2]
            ybar = moments[..., 0]
            var = (moments[..., 1] - ybar**2).clamp_min(0.0)
            lsd = 0.5 * torch.log(var + 1e-6 * s**2)
            cols = [ybar, (ybar - m) / s, lsd, lsd - log_s, n.log().expand(B, G), (n > 1).to(y.dtype).expand(B, G)]
            cols.append(torch.asinh(ybar))
            cols += list(segment_mean(f, idx, G, n).unbind(-1))
            for k in self.cov_names.get(lvl, []):
                c = data.covariates[lvl][k]
                cols.append(((c - c.mean()) / c.std(unbiased=False).clamp_min(1e-6)).expand(B, G))
            if i + 1 < len(self.levels):
                cidx = data.parent_index(self.levels[i + 1])
                nc = torch.bincount(cidx, minlength=G).to(y.dtype)
                cm = segment_mean(torch.stack([child_mean, child_mean**2], -1), cidx, G, nc)
                cols += [0.5 * torch.log((cm[..., 1] - cm[..., 0] ** 2).clamp_min(0) + 1e-6), nc.log().expand(B, G)]
            stats[lvl] = torch.stack(cols, -1)
            if i + 1 < len(self.levels):
                # the spread of a group's child means is what its own mean is uncertain by: pooled
                # over the dataset, with the number of children, it is the unit of the group's data term
                ccm = segment_mean(torch.stack([child_ybar, child_ybar**2], -1), cidx, G, nc)
                cvar = (ccm[..., 1] - ccm[..., 0] ** 2).clamp_min(0.0)
                dof = (nc.sum() - G).clamp_min(1) if self.pooled_df else nc.sum()
                unit_sd = 0.5 * torch.log((nc * cvar).sum(-1) / dof + 1e-6 * s.squeeze(-1) ** 2)
                unit_n = nc.log().expand(B, G)
            else:
                unit_sd, unit_n = None, n.log().expand(B, G)
            child_mean = (ybar - m) / s
            child_ybar = ybar
            rel = (ybar - m) / s
            # pooled within-group and between-group log sds, on the response's own (log) scale
            dof = max(N - G, 1) if self.pooled_df else N
            ss_within = (n * var).sum(-1)  # [B]
            if i == len(self.levels) - 1 and fit is not None:
                ss_within, dof = fit.ss, fit.dof
            lw = 0.5 * torch.log(ss_within / dof + 1e-6 * s.squeeze(-1) ** 2)  # [B]
            # the group means net of the row covariates' pooled slopes (revision 8) and, where the
            # level has covariates, their least-squares fit on them (revision 3)
            net = None  # the group means less the row covariates' pooled slopes x the group's covariate means
            if fit is not None:
                xbar = fit.xbar if i == len(self.levels) - 1 else segment_mean(X_raw, idx, G, n)
                net = ybar - (xbar * fit.pooled.unsqueeze(-2)).sum(-1)  # [B, G]
            response = net if self.revision >= 8 and net is not None else ybar
            between_var = ybar.var(-1, unbiased=False)  # [B]
            C = None
            if self.cov_names.get(lvl):
                C = torch.stack([data.covariates[lvl][c] for c in self.cov_names[lvl]], -1).to(y.dtype)
                b_lvl, t2_lvl, s2_lvl = _between_slopes(response, C)
                between_intercept[lvl] = response.mean(-1) - b_lvl @ C.mean(0)  # [B]
                between_slopes[lvl] = b_lvl if self.revision >= 3 else y.new_zeros(B, C.shape[-1])
                between_t2[lvl] = t2_lvl
            per_mean = var / (n - 1).clamp_min(1) if self.pooled_df else var / n.clamp_min(1)  # s^2 / n
            noise = (per_mean * (n > 1)).sum(-1) / (n > 1).sum().clamp_min(1)  # [B]
            if self.revision >= 9:  # the spread of the group effects, not of what covariates explain
                between_var = s2_lvl.squeeze(-1) if C is not None else response.var(-1)
                if i == len(self.levels) - 1 and fit is not None:  # noise of the residuals
                    noise = fit.ss / fit.dof * (1.0 / n).mean()
            lb = 0.5 * torch.log(between_var + 1e-6 * s.squeeze(-1) ** 2)  # [B]
            # method-of-moments log sd of group effects: between-group variance of the means in
            # excess of the within-group noise they carry (floored: it may be negative)
            le = 0.5 * torch.log((between_var - noise).clamp_min(0) + 1e-4 * s.squeeze(-1) ** 2)
            pooled.append(lw)
            between.append(lb)
            excess.append(le)
            glob += [
                torch.full_like(m.squeeze(-1), G).log(),
                rel.mean(-1),
                0.5 * torch.log(rel.var(-1, unbiased=False) + 1e-6),
                (lsd - log_s).mean(-1),
                lw,
                lb,
                le,
            ]
            unit_sd = lw if unit_sd is None else unit_sd
            raw_groups[lvl] = torch.stack([ybar, m.expand(B, G), unit_sd.unsqueeze(-1).expand(B, G), unit_n], -1)
            if self.group_slope_dim[lvl]:  # the group's slopes and intercepts, then their log precisions
                zero = y.new_zeros(B, G, 1)  # (zeros below revisions 3, 5 and 6)
                slopes_g, logp = y.new_zeros(B, G, kx), y.new_zeros(B, G, kx)
                a_g, logp_a, a_pool, logp_pool = zero, zero, zero, zero
                if self.revision >= 3 and fit is not None:
                    slopes_g, logp = fit.slopes, torch.log(fit.precision + 1e-12).expand(B, G, kx)
                    spread = _slope_spread(fit, ybar, ss_within / dof, s**2 / X_raw.var(0).clamp_min(1e-12))
                if self.revision >= 5 and fit is not None:
                    a_g = fit.intercept.unsqueeze(-1)
                    logp_a = torch.log(fit.intercept_precision + 1e-12).expand(B, G).unsqueeze(-1)
                if self.revision >= 6 and net is not None:
                    a_pool = net.unsqueeze(-1)
                    logp_pool = n.log().expand(B, G).unsqueeze(-1)
                raw_groups[lvl] = torch.cat([raw_groups[lvl], slopes_g, a_g, a_pool, logp, logp_a, logp_pool], -1)
        raw_dataset = torch.stack([m.squeeze(-1), log_s.squeeze(-1), *pooled, *between, *excess], -1)
        slopes = []
        if kx:  # pooled within-group slopes (zeros below revision 3)
            slopes = [fit.pooled if fit is not None and self.revision >= 3 else y.new_zeros(B, kx)]
        slopes += [between_slopes[lvl] for lvl in self.levels if lvl in between_slopes]
        if kx:  # the groups' slopes' excess log sds and correlations with the means (zeros below revision 4)
            slopes += list(spread) if fit is not None and self.revision >= 4 else [y.new_zeros(B, 2 * kx)]
        for c in (1.0, 4.0):  # the between-group slopes shrunk by their precision (zeros below revision 7)
            for lvl in self.levels:
                if lvl in between_slopes:
                    b, t2 = between_slopes[lvl], between_t2[lvl]
                    slopes.append(b * t2 / (t2 + c) if self.revision >= 7 else torch.zeros_like(b))
        intercepts = []  # at covariates 0: of the rows, then of each level's fit (zeros below revision 10)
        if kx:
            a_rows = y.mean(-1) - X_raw.mean(0) @ fit.pooled.T if fit is not None else y.new_zeros(B)
            intercepts.append(a_rows)
        intercepts += [between_intercept[lvl] for lvl in self.levels if lvl in between_intercept]
        slopes += [a.unsqueeze(-1) if self.revision >= 10 else torch.zeros_like(a).unsqueeze(-1) for a in intercepts]
        raw_slopes = torch.cat(slopes, -1) if slopes else y.new_zeros(B, 0)
        counts = y.new_tensor([math.log(data.size(lvl)) for lvl in self.levels] + [math.log(N)]).expand(B, -1)
        return stats, torch.stack(glob, -1), f, (raw_dataset, raw_groups, counts, raw_slopes)

    @torch.no_grad()
    def fit(self, datasets: list[HierarchicalData]) -> None:
        """Fit the feature scalers on simulated datasets."""
        per_level: dict[str, list[torch.Tensor]] = {lvl: [] for lvl in self.levels}
        glob = []
        for d in datasets:
            stats, g, _, _ = self.statistics(d)
            for lvl in self.levels:
                per_level[lvl].append(stats[lvl].reshape(-1, stats[lvl].shape[-1]))
            glob.append(g)
        for lvl in self.levels:
            self.scalers[lvl].fit(torch.cat(per_level[lvl]))
        self.global_scaler.fit(torch.cat(glob))

    def forward(self, data: HierarchicalData) -> Encoding:
        stats, glob, f, (raw_dataset, raw_groups, counts, raw_slopes) = self.statistics(data)
        h_obs = self.phi(f)  # [B, N, H]
        groups: dict[str, torch.Tensor] = {}
        child: torch.Tensor | None = None
        for i in reversed(range(len(self.levels))):
            lvl = self.levels[i]
            G = data.size(lvl)
            pooled = segment_mean(h_obs, data.index(lvl), G, data.counts(lvl))  # [B, G, H]
            parts = [self.scalers[lvl](stats[lvl]), pooled]
            if child is not None:
                cidx = data.parent_index(self.levels[i + 1])
                parts.append(segment_mean(child, cidx, G, torch.bincount(cidx, minlength=G)))
            child = groups[lvl] = self.nets[lvl](torch.cat(parts, -1))  # [B, G, H]
        top = groups[self.levels[0]].mean(-2)  # [B, H]
        dataset = self.global_net(torch.cat([self.global_scaler(glob), h_obs.mean(-2), top], -1))
        return Encoding(dataset, groups, raw_dataset, raw_groups, counts, raw_slopes)
