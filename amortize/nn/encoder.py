"""Bottom-up set encoder: pools observations into groups, groups into parents, up to one
dataset embedding, carrying the explicit summary statistics of :mod:`amortize.nn.statistics` at
every level (the networks here; the statistics, pure functions, there).

All tensors carry B datasets that share one structure: the response is ``[B, N]``, index arrays
and covariates are shared. Per-group work is done once per group, with segment sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import OBS, HierarchicalData
from .data_terms import DataTerm
from .least_squares import mix, mixing, segment_mean
from .statistics import STATISTICS_VERSION, DatasetStatistics, additive_residual_log_sd, dataset_statistics

__all__ = ["HierarchicalEncoder", "Encoding", "RobustScaler", "mlp", "term_features"]


def mlp(d_in: int, d_hidden: int, d_out: int, layers: int = 2) -> nn.Sequential:
    """A SiLU MLP with ``layers`` hidden layers."""
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, d_hidden), nn.SiLU()]
        d = d_hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def term_features(term: DataTerm) -> torch.Tensor:
    """``[B, G, 2D]``: a level's data term as features, the location and half the log diagonal of the
    precision (NaN read as 0, infinities as the largest float: the :class:`RobustScaler` bounds them)."""
    prec = torch.diagonal(term.precision, dim1=-2, dim2=-1)
    return torch.nan_to_num(torch.cat([term.location, 0.5 * prec.log()], -1), nan=0.0)


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
        q = torch.quantile(x[:200_000], x.new_tensor([0.25, 0.5, 0.75]), dim=0)
        scale = (q[2] - q[0]) / 1.349
        scale = torch.where(scale > 1e-6, scale, x.std(0).clamp_min(1e-6))
        self.loc.copy_(q[1])
        self.scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.loc) / self.scale
        return self.clamp * torch.tanh(z / self.clamp)


@dataclass
class Encoding:
    """Output of the encoder: the embeddings ``dataset [B, H]`` and ``groups[level] [B, G_level, H]``,
    and the :class:`~amortize.nn.statistics.DatasetStatistics` they were computed from (the heads'
    skip paths read its raw statistics by name)."""

    dataset: torch.Tensor
    groups: dict[str, torch.Tensor]
    statistics: DatasetStatistics


class HierarchicalEncoder(nn.Module):
    """Encode B datasets of one structure bottom-up through the levels.

    Args:
        levels: level names, outermost first.
        covariates: ``{level or "obs": [names]}`` the model's data carries.
        hidden: embedding width H.
        term_dims: ``{level: D}`` the width of each level's likelihood data term
            (:func:`~amortize.nn.data_terms.data_terms`), read as features beside the statistics.
        factors: the grouping factors, each a chain of ``levels`` (None: one chain, nested). With
            several (crossed), each factor is pooled up its own chain, and each innermost group first
            reads, through its rows, the mean embedding of the other factors' groups it meets (one
            round of messages, O(rows)); the dataset network reads every factor's top.

    Attributes:
        statistics_version: the statistics the encoder computes (:data:`STATISTICS_VERSION`);
            checkpoints record it and a checkpoint of other statistics is refused.
    """

    statistics_version: str = STATISTICS_VERSION

    def __init__(
        self,
        levels: tuple[str, ...],
        covariates: dict[str, list[str]],
        hidden: int = 64,
        term_dims: dict[str, int] | None = None,
        factors: tuple[tuple[str, ...], ...] | None = None,
    ) -> None:
        super().__init__()
        self.factors = tuple(tuple(c) for c in factors) if factors else (tuple(levels),)
        self.innermost = {chain[-1] for chain in self.factors}
        self.term_dims = dict(term_dims or {})
        self.term_scalers = nn.ModuleDict({lvl: RobustScaler(2 * d) for lvl, d in self.term_dims.items()})
        self.levels = tuple(levels)
        self.cov_names = {lvl: list(names) for lvl, names in covariates.items()}
        kx = len(self.cov_names.get(OBS, []))
        self.obs_dim = 2 + 2 * kx  # standardized y, asinh y, covariates, y * covariates
        self.level_stats = {lvl: self._n_level_stats(lvl) for lvl in self.levels}
        self.scalers = nn.ModuleDict({lvl: RobustScaler(n) for lvl, n in self.level_stats.items()})
        self.nets = nn.ModuleDict()
        for lvl in self.levels:
            child = 0 if lvl in self.innermost else hidden
            term = 2 * self.term_dims.get(lvl, 0)
            self.nets[lvl] = mlp(self.level_stats[lvl] + term + child, hidden, hidden)
        crossed = len(self.factors) > 1
        self.messages = nn.ModuleDict({c[-1]: mlp(2 * hidden, hidden, hidden) for c in self.factors if crossed})
        self.n_global_stats = 4 + self.obs_dim + 7 * len(self.levels)
        self.raw_dataset_dim = 2 + 3 * len(self.levels)
        self.count_dim = len(self.levels) + 1
        kc = sum(len(self.cov_names.get(lvl, [])) for lvl in self.levels)
        with_cov = sum(1 for lvl in self.levels if self.cov_names.get(lvl))
        self.slope_dim = 3 * kx + kc + 2 * kc + (kx > 0) + with_cov  # raw covariate slopes (see statistics)
        # per innermost group: k slopes, its own intercept and the pooled-slope intercept (each with a
        # log precision)
        self.group_slope_dim = {lvl: kx + 2 if kx and lvl in self.innermost else 0 for lvl in self.levels}
        self.global_scaler = RobustScaler(self.n_global_stats)
        self.global_net = mlp(self.n_global_stats + hidden * len(self.factors), hidden, hidden)

    def _n_level_stats(self, lvl: str) -> int:
        inner = lvl in self.innermost
        return 7 + self.obs_dim + len(self.cov_names.get(lvl, [])) + (0 if inner else 2)

    def statistics(self, data: HierarchicalData) -> DatasetStatistics:
        """The statistics of ``data`` the networks and heads read (see :func:`dataset_statistics`), computed
        without gradients: they are functions of the data alone."""
        with torch.no_grad():
            if len(self.factors) == 1:
                return dataset_statistics(data.as_levels(self.levels), self.levels, self.cov_names)
            parts = []
            for k, chain in enumerate(self.factors):
                cov = {lvl: names for lvl, names in self.cov_names.items() if lvl in chain or lvl == OBS}
                parts.append(dataset_statistics(data.factor(k), chain, cov))
            rows = self.cov_names.get(OBS, [])
            X = torch.stack([data.covariates[OBS][c] for c in rows], -1) if rows else None
            inner = [(data.index(chain[-1]), data.size(chain[-1])) for chain in self.factors]
            return DatasetStatistics.merged(parts, additive_residual_log_sd(data.y, inner, X))

    @torch.no_grad()
    def fit(self, statistics: Sequence[DatasetStatistics], terms: Sequence[dict] | None = None) -> None:
        """Fit the feature scalers on the :meth:`statistics` of simulated datasets (and their data terms)."""
        for lvl in self.term_dims:
            self.term_scalers[lvl].fit(torch.cat([term_features(t[lvl]).flatten(0, -2) for t in terms]))
        for lvl in self.levels:
            self.scalers[lvl].fit(torch.cat([s.levels[lvl].features.flatten(0, -2) for s in statistics]))
        self.global_scaler.fit(torch.cat([s.features for s in statistics]))

    @staticmethod
    def _mixing(data: HierarchicalData, lvl: str, other: str, dtype: torch.dtype) -> torch.Tensor:
        """The mean over a ``lvl`` group's rows of the ``other`` groups they meet, as a sparse operator."""
        sizes = data.size(lvl), data.size(other)
        return data.derived(
            ("mixing", lvl, other, dtype), lambda: mixing(data.index(lvl), data.index(other), *sizes, dtype)
        )

    def forward(self, data: HierarchicalData, terms: dict | None = None) -> Encoding:
        """Embed ``data`` bottom-up: each level's network reads its groups' statistics (and data terms)
        and the mean embedding of its child groups; the dataset network reads the dataset's statistics
        and the mean embedding of the outermost groups.

        No network runs per row: the rows enter through the statistics (segment sums, no gradient). A
        learned per-row network (0.4.0's ``phi``, pooled per group) cost 35-40% of a training step on a
        31,874-row design and gained nothing measurable on held-out simulations of four models
        (``experiments/results/0.5.0/per-row-network-ab.md``)."""
        data = data.as_levels(self.levels)  # a model with latents per row: the rows as its innermost level
        stats = self.statistics(data)
        groups: dict[str, torch.Tensor] = {}

        def level_input(lvl: str) -> list[torch.Tensor]:
            parts = [self.scalers[lvl](stats.levels[lvl].features)]
            if lvl in self.term_dims:
                parts.append(self.term_scalers[lvl](term_features(terms[lvl])))
            return parts

        for chain in self.factors:  # innermost groups from their rows' statistics
            groups[chain[-1]] = self.nets[chain[-1]](torch.cat(level_input(chain[-1]), -1))  # [B, G, H]
        if self.messages:  # crossed: each group hears the other factors' groups it meets in its rows
            inner = {c[-1]: groups[c[-1]] for c in self.factors}
            for lvl, net in self.messages.items():
                heard = [
                    mix(self._mixing(data, lvl, other, emb.dtype), emb) for other, emb in inner.items() if other != lvl
                ]
                msg = sum(heard) / len(heard)
                groups[lvl] = inner[lvl] + net(torch.cat([inner[lvl], msg], -1))
        for chain in self.factors:  # then up each chain: a level reads the mean of its child groups
            for i in reversed(range(len(chain) - 1)):
                lvl, G = chain[i], data.size(chain[i])
                cidx = data.parent_index(chain[i + 1])
                child = segment_mean(groups[chain[i + 1]], cidx, G, torch.bincount(cidx, minlength=G))
                groups[lvl] = self.nets[lvl](torch.cat([*level_input(lvl), child], -1))
        groups = {lvl: groups[lvl] for lvl in self.levels}
        top = torch.cat([groups[chain[0]].mean(-2) for chain in self.factors], -1)  # [B, H * factors]
        dataset = self.global_net(torch.cat([self.global_scaler(stats.features), top], -1))
        return Encoding(dataset, groups, stats)
