"""Summary statistics of B datasets of one structure: pure tensor functions, no parameters.

:func:`dataset_statistics` pools observations into groups and groups into parents, bottom-up, and
returns a :class:`DatasetStatistics`: per level a :class:`LevelStatistics` (the features its network
reads, the dataset's scale statistics of that level, and per group a :class:`GroupStatistics` on the
response's own scale for the group heads' skip paths), plus the dataset's own. Everything is read by
name; the few vectors a linear skip path reads whole are assembled by methods that fix their order.

The statistics are versioned as a whole (:data:`STATISTICS_VERSION`, recorded in checkpoints): a
change to any number computed here is a new version, never a branch in these functions.

All tensors carry B datasets that share one structure: the response is ``[B, N]``, index arrays
and covariates are shared. Per-group work is done once per group, with segment sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from ..data import OBS, HierarchicalData
from .least_squares import WithinGroupFit, between_slopes, segment_mean, slope_spread, within_group_fit

__all__ = [
    "STATISTICS_VERSION",
    "DatasetStatistics",
    "GroupStatistics",
    "LevelStatistics",
    "dataset_statistics",
]

STATISTICS_VERSION = "amortize.terms/2"


@dataclass(frozen=True)
class GroupStatistics:
    """Raw statistics of each group of one level, on the response's own scale (never squashed by a
    scaler): ``[B, G]`` each, ``[B, G, k]`` for the k row covariates' slopes. The measurements of a
    group's slopes and intercepts exist at the innermost level of a model with row covariates."""

    mean: torch.Tensor  # the group's mean response
    dataset_mean: torch.Tensor  # the dataset's mean response
    unit_log_sd: torch.Tensor  # log sd of one unit of the group mean: pooled within-group (innermost) or of child means
    unit_log_n: torch.Tensor  # log number of units: rows (innermost) or children
    slopes: torch.Tensor | None = None  # [B, G, k] least-squares slopes on the row covariates
    intercept: torch.Tensor | None = None  # the group's fitted value at covariates 0
    pooled_intercept: torch.Tensor | None = None  # mean - the dataset's pooled slopes . the group's covariate means
    slopes_log_precision: torch.Tensor | None = None  # [B, G, k] log 1 / (S_xx^-1)_jj
    intercept_log_precision: torch.Tensor | None = None  # -log(1/n + xbar' S_xx^-1 xbar)
    pooled_intercept_log_precision: torch.Tensor | None = None  # log n

    @property
    def has_measurements(self) -> bool:
        """Whether the groups carry slope and intercept measurements."""
        return self.slopes is not None

    def measurements(self) -> torch.Tensor:
        """``[..., k + 2]``: the slopes, the intercept, the intercept at the pooled slopes."""
        return torch.cat([self.slopes, self.intercept.unsqueeze(-1), self.pooled_intercept.unsqueeze(-1)], -1)

    def measurement_log_precisions(self) -> torch.Tensor:
        """``[..., k + 2]``: the log precisions of :meth:`measurements`, in the same order."""
        return torch.cat(
            [
                self.slopes_log_precision,
                self.intercept_log_precision.unsqueeze(-1),
                self.pooled_intercept_log_precision.unsqueeze(-1),
            ],
            -1,
        )

    def rows(self) -> GroupStatistics:
        """The same statistics with datasets and groups flattened into rows: ``[B * G]`` (``[B * G, k]``)."""
        group_dims = self.mean.dim()  # [B, G]: the slopes' covariate dimension stays
        return self._map(lambda _, t: t.flatten(0, group_dims - 1))

    @staticmethod
    def cat(parts: list[GroupStatistics]) -> GroupStatistics:
        """Rows of several :meth:`rows` results, concatenated."""
        first = parts[0]
        return first._map(lambda name, _: torch.cat([getattr(p, name) for p in parts]))

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> GroupStatistics:
        """``fn(name, tensor)`` applied to every statistic the groups carry."""
        return replace(
            self,
            **{f.name: fn(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None},
        )


@dataclass(frozen=True)
class LevelStatistics:
    """One level's statistics: the features its network reads, the dataset's scale statistics of
    the level (``[B]`` each, log sds on the response's own scale) and each group's :class:`GroupStatistics`."""

    features: torch.Tensor  # [B, G, F] the level's summaries for its network (the encoder scales them)
    groups: GroupStatistics
    log_groups: torch.Tensor  # [B] log number of groups (0 for one group: no between-group degrees of freedom)
    pooled_log_sd: torch.Tensor  # pooled within-group log sd (of the residuals, with row covariates)
    between_log_sd: torch.Tensor  # log sd of the net group means around their fit on the level's covariates
    excess_log_sd: torch.Tensor  # method-of-moments log sd of the group effects (in excess of the noise)
    between_slopes: torch.Tensor | None = None  # [B, k] slopes of the net group means on the level's covariates
    between_t2: torch.Tensor | None = None  # [B, k] their squared t statistics
    between_intercept: torch.Tensor | None = None  # [B] that fit's value at covariates 0


@dataclass(frozen=True)
class DatasetStatistics:
    """Statistics of B datasets of one structure: per level (outermost first) and of the dataset."""

    levels: dict[str, LevelStatistics]  # outermost first
    features: torch.Tensor  # [B, F] the dataset's summaries for the dataset network (the encoder scales them)
    mean: torch.Tensor  # [B] mean response
    log_sd: torch.Tensor  # [B] log sd of the response
    log_rows: torch.Tensor  # [B] log number of rows
    pooled_slopes: torch.Tensor | None = None  # [B, k] pooled within-group slopes on the row covariates
    slope_log_sd: torch.Tensor | None = None  # [B, k] excess log sd of the groups' slopes
    slope_corr: torch.Tensor | None = None  # [B, k] correlation of the groups' slopes with their means
    rows_intercept: torch.Tensor | None = None  # [B] mean y - pooled slopes . mean x

    @staticmethod
    def merged(parts: list[DatasetStatistics], residual_log_sd: torch.Tensor) -> DatasetStatistics:
        """The statistics of a crossed dataset from those of its factors (each on the same rows): every
        factor's levels; the dataset's own summaries once, then each further factor's per-level ones
        (7 per level); the row covariates' pooled within-group fit of the first factor.

        ``residual_log_sd [B]`` (:func:`additive_residual_log_sd`) replaces each innermost level's pooled
        within-group log sd: within one factor's groups the rows still vary with the other factors'
        effects, so the noise is what the additive fit of every factor leaves."""
        first = parts[0]
        own = first.features.shape[-1] - 7 * len(first.levels)  # the dataset's summaries before the levels'
        parts = [_with_noise(p, own, residual_log_sd) for p in parts]
        levels = {lvl: st for part in parts for lvl, st in part.levels.items()}
        features = torch.cat([parts[0].features, *[p.features[..., own:] for p in parts[1:]]], -1)
        return replace(parts[0], levels=levels, features=features)

    def location_scale(self) -> torch.Tensor:
        """``[B, 2 + 3L]``: mean, log sd, then per level, innermost first, the pooled within-group,
        the between-group and the excess log sds (the global head's location skip path)."""
        inner_first = list(reversed(self.levels.values()))
        return torch.stack(
            [
                self.mean,
                self.log_sd,
                *[s.pooled_log_sd for s in inner_first],
                *[s.between_log_sd for s in inner_first],
                *[s.excess_log_sd for s in inner_first],
            ],
            -1,
        )

    def counts(self) -> torch.Tensor:
        """``[B, L + 1]``: log number of groups per level (outermost first), then log rows."""
        return torch.stack([*[s.log_groups for s in self.levels.values()], self.log_rows], -1)

    def covariate_slopes(self) -> torch.Tensor:
        """``[B, slope_dim]``: the pooled within-group slopes; each level's between-group slopes; the
        groups' slopes' excess log sds and correlations; the between-group slopes shrunk by their
        precision, ``b t^2 / (t^2 + c)`` for c = 1, then c = 4; the intercepts at covariates 0 of the
        rows and of each level's fit (levels outermost first; a part is absent without its covariates)."""
        with_cov = [s for s in self.levels.values() if s.between_slopes is not None]
        parts = [] if self.pooled_slopes is None else [self.pooled_slopes]
        parts += [s.between_slopes for s in with_cov]
        if self.slope_log_sd is not None:
            parts += [self.slope_log_sd, self.slope_corr]
        for c in (1.0, 4.0):
            parts += [s.between_slopes * s.between_t2 / (s.between_t2 + c) for s in with_cov]
        intercepts = [] if self.rows_intercept is None else [self.rows_intercept]
        parts += [a.unsqueeze(-1) for a in intercepts + [s.between_intercept for s in with_cov]]
        return torch.cat(parts, -1) if parts else self.mean.new_zeros(self.mean.shape[0], 0)


def _with_noise(part: DatasetStatistics, own: int, lw: torch.Tensor) -> DatasetStatistics:
    """``part`` (one factor's statistics) with the noise log sd ``lw`` of its innermost level: its pooled
    within-group log sd, its groups' unit and the excess log sd of the group effects over the noise
    their means carry (``e^{2 lw} / n``), each also in its slot of the dataset's features (the first
    level block, innermost first: 5th and 7th of 7)."""
    inner = list(part.levels)[-1]
    st = part.levels[inner]
    s2 = torch.exp(2 * part.log_sd)
    noise = torch.exp(2 * lw) * torch.exp(-st.groups.unit_log_n).mean(-1)
    between = (torch.exp(2 * st.between_log_sd) - 1e-6 * s2).clamp_min(0)
    le = 0.5 * torch.log((between - noise).clamp_min(0) + 1e-4 * s2)
    groups = replace(st.groups, unit_log_sd=lw.unsqueeze(-1).expand_as(st.groups.unit_log_sd))
    features = part.features.clone()
    features[..., own + 4] = lw
    features[..., own + 6] = le
    levels = {**part.levels, inner: replace(st, pooled_log_sd=lw, excess_log_sd=le, groups=groups)}
    return replace(part, levels=levels, features=features)


def additive_residual_log_sd(
    y: torch.Tensor, groups: list[tuple[torch.Tensor, int]], X: torch.Tensor | None = None, sweeps: int = 8
) -> torch.Tensor:
    """``[B]``: the log sd of what the additive fit ``y ~ 1 + sum_k effect_k[group_k] + X b`` leaves of
    ``y [B, N]`` (``groups``: each crossed factor's innermost ``(row index [N], groups)``; ``X [N, k]``
    the row covariates), by backfitting (``sweeps`` rounds of each factor's group means and the
    covariates' least squares, exact at once on a complete grid), over its degrees of freedom."""
    y = y if y.dim() == 2 else y.unsqueeze(0)
    B, N = y.shape
    r = y - y.mean(-1, keepdim=True)
    counts = [torch.bincount(idx, minlength=G).to(y.dtype).clamp_min(1) for idx, G in groups]
    effects = [y.new_zeros(B, G) for _, G in groups]
    Xc = pinv = None
    if X is not None and X.shape[-1]:
        Xc = (X - X.mean(0)).to(y.dtype)
        pinv = torch.linalg.pinv(Xc)  # [k, N]
    b = None
    for _ in range(sweeps):
        for k, (idx, G) in enumerate(groups):
            r = r + effects[k][:, idx]
            effects[k] = segment_mean(r.unsqueeze(-1), idx, G, counts[k]).squeeze(-1)
            r = r - effects[k][:, idx]
        if Xc is not None:
            if b is not None:
                r = r + b @ Xc.T
            b = r @ pinv.T  # [B, k]
            r = r - b @ Xc.T
    dof = max(N - 1 - sum(G - 1 for _, G in groups) - (0 if Xc is None else Xc.shape[-1]), 1)
    s2 = y.var(-1, unbiased=False).clamp_min(1e-12)
    return 0.5 * torch.log((r * r).sum(-1) / dof + 1e-6 * s2)


def dataset_statistics(
    data: HierarchicalData, levels: tuple[str, ...], covariates: dict[str, list[str]]
) -> DatasetStatistics:
    """The statistics of ``data`` (response ``[N]`` or ``[B, N]``) for a model with ``levels``
    (outermost first) and ``covariates`` (``{level or "obs": [names]}``), bottom-up through the levels.

    A level with one group has no between-group degrees of freedom: its between-group statistics
    are finite (the group means' spread reads 0, floored like every log sd) and its ``log_groups`` is 0.
    """
    y = data.y if data.y.dim() == 2 else data.y.unsqueeze(0)  # [B, N]
    B, N = y.shape
    m = y.mean(-1, keepdim=True)  # [B, 1]
    s = y.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6)  # [B, 1]
    s2 = s.squeeze(-1) ** 2  # [B]
    log_s = torch.log(s)
    ys = (y - m) / s
    feats = [ys, torch.asinh(y)]
    fit: WithinGroupFit | None = None
    kx = len(covariates.get(OBS, []))
    inner = levels[-1]
    if kx:
        X_raw = torch.stack([data.covariates[OBS][k] for k in covariates[OBS]], -1).to(y.dtype)  # [N, kx]
        fit = within_group_fit(y, X_raw, data.index(inner), data.size(inner), data.counts(inner).to(y.dtype))
        X = (X_raw - X_raw.mean(0)) / X_raw.std(0, unbiased=False).clamp_min(1e-6)
        feats += [X.expand(B, N, -1).unbind(-1)[j] for j in range(X.shape[-1])]
        feats += [ys * X[:, j] for j in range(X.shape[-1])]
    f = torch.stack(feats, -1)  # [B, N, F_obs]
    glob = [m.squeeze(-1), torch.asinh(m.squeeze(-1)), log_s.squeeze(-1), torch.full_like(m.squeeze(-1), N).log()]
    glob += list(f.mean(-2).unbind(-1))
    out: dict[str, LevelStatistics] = {}
    spread: tuple[torch.Tensor, torch.Tensor] | None = None
    child_rel: torch.Tensor | None = None  # [B, G_child] the child level's standardized means
    child_ybar: torch.Tensor | None = None  # [B, G_child] its raw means
    for i in reversed(range(len(levels))):
        lvl, innermost = levels[i], i == len(levels) - 1
        G = data.size(lvl)
        idx = data.index(lvl)  # [N]
        n = data.counts(lvl).to(y.dtype)  # [G]
        moments = segment_mean(torch.stack([y, y * y], -1), idx, G, n)  # [B, G, 2]
        ybar = moments[..., 0]
        var = (moments[..., 1] - ybar**2).clamp_min(0.0)
        lsd = 0.5 * torch.log(var + 1e-6 * s**2)
        rel = (ybar - m) / s
        cols = [ybar, rel, lsd, lsd - log_s, n.log().expand(B, G), (n > 1).to(y.dtype).expand(B, G)]
        cols.append(torch.asinh(ybar))
        cols += list(segment_mean(f, idx, G, n).unbind(-1))
        for k in covariates.get(lvl, []):
            c = data.covariates[lvl][k]
            cols.append(((c - c.mean()) / c.std(unbiased=False).clamp_min(1e-6)).expand(B, G))
        if not innermost:
            cidx = data.parent_index(levels[i + 1])
            nc = torch.bincount(cidx, minlength=G).to(y.dtype)
            cm = segment_mean(torch.stack([child_rel, child_rel**2], -1), cidx, G, nc)
            cols += [0.5 * torch.log((cm[..., 1] - cm[..., 0] ** 2).clamp_min(0) + 1e-6), nc.log().expand(B, G)]
        # pooled within-group log sd, on the response's own (log) scale: of the residuals with row covariates
        ss_within, dof = (fit.ss, fit.dof) if innermost and fit is not None else ((n * var).sum(-1), max(N - G, 1))
        lw = 0.5 * torch.log(ss_within / dof + 1e-6 * s2)  # [B]
        if innermost:
            unit_sd, unit_n = lw, n.log().expand(B, G)
        else:  # the spread of a group's child means, pooled over the dataset, is the unit of the group's mean
            ccm = segment_mean(torch.stack([child_ybar, child_ybar**2], -1), cidx, G, nc)
            cvar = (ccm[..., 1] - ccm[..., 0] ** 2).clamp_min(0.0)
            unit_sd = 0.5 * torch.log((nc * cvar).sum(-1) / (nc.sum() - G).clamp_min(1) + 1e-6 * s2)
            unit_n = nc.log().expand(B, G)
        child_rel, child_ybar = rel, ybar
        # the group means net of the row covariates' pooled slopes, then fitted on the level's covariates
        net = None
        if fit is not None:
            xbar = fit.xbar if innermost else segment_mean(X_raw, idx, G, n)
            net = ybar - (xbar * fit.pooled.unsqueeze(-2)).sum(-1)  # [B, G]
        response = ybar if net is None else net
        b_lvl = t2_lvl = a_lvl = None
        if covariates.get(lvl):
            C = torch.stack([data.covariates[lvl][c] for c in covariates[lvl]], -1).to(y.dtype)  # [G, k]
            b_lvl, t2_lvl, resid_var = between_slopes(response, C)
            a_lvl = response.mean(-1) - b_lvl @ C.mean(0)  # [B]
            between_var = resid_var.squeeze(-1)
        else:  # one group: no degrees of freedom, no spread
            between_var = response.var(-1) if G > 1 else response.new_zeros(B)
        # the within-group noise a group mean carries, s^2 / n, over the groups
        noise = (var / (n - 1).clamp_min(1) * (n > 1)).sum(-1) / (n > 1).sum().clamp_min(1)  # [B]
        if innermost and fit is not None:  # noise of the residuals
            noise = fit.ss / fit.dof * (1.0 / n).mean()
        lb = 0.5 * torch.log(between_var + 1e-6 * s2)  # [B]
        # method-of-moments log sd of group effects: between-group variance of the means in excess of
        # the within-group noise they carry (floored: it may be negative)
        le = 0.5 * torch.log((between_var - noise).clamp_min(0) + 1e-4 * s2)
        glob += [
            torch.full_like(m.squeeze(-1), G).log(),
            rel.mean(-1),
            0.5 * torch.log(rel.var(-1, unbiased=False) + 1e-6),
            (lsd - log_s).mean(-1),
            lw,
            lb,
            le,
        ]
        groups = GroupStatistics(ybar, m.expand(B, G), unit_sd.unsqueeze(-1).expand(B, G), unit_n)
        if innermost and fit is not None:  # the groups' slopes and intercepts, with their log precisions
            spread = slope_spread(fit, ybar, ss_within / dof, s**2 / X_raw.var(0).clamp_min(1e-12))
            groups = replace(
                groups,
                slopes=fit.slopes,
                intercept=fit.intercept,
                pooled_intercept=net,
                slopes_log_precision=torch.log(fit.precision + 1e-12).expand(B, G, kx),
                intercept_log_precision=torch.log(fit.intercept_precision + 1e-12).expand(B, G),
                pooled_intercept_log_precision=n.log().expand(B, G),
            )
        out[lvl] = LevelStatistics(
            torch.stack(cols, -1), groups, y.new_tensor(math.log(G)).expand(B), lw, lb, le, b_lvl, t2_lvl, a_lvl
        )
    return DatasetStatistics(
        levels={lvl: out[lvl] for lvl in levels},
        features=torch.stack(glob, -1),
        mean=m.squeeze(-1),
        log_sd=log_s.squeeze(-1),
        log_rows=y.new_tensor(math.log(N)).expand(B),
        pooled_slopes=None if fit is None else fit.pooled,
        slope_log_sd=None if spread is None else spread[0],
        slope_corr=None if spread is None else spread[1],
        rows_intercept=None if fit is None else y.mean(-1) - X_raw.mean(0) @ fit.pooled.T,
    )
