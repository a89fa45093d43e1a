"""Subsets of ONE large observed dataset by its outermost groups, and the scaled minibatch ELBO.

A dataset with 10^6 groups does not fit one pass of the guide, and it need not: a training step
(:class:`amortize.sources.Subsampled`) takes b of the G outermost groups (with all their descendants
and observations, :meth:`OuterGroupIndex.restrict`) and maximizes the minibatch ELBO

    log p(globals) - log q(globals) + (G / b) * sum over the b subtrees of
    [log p(group latents, observations | parents) - log q(group latents | ...)]

an unbiased estimate of the full-data ELBO whenever the b groups are a uniform random subset: every
subtree enters the sum with probability b / G. The subsets are the chunks of a fresh random
permutation per epoch (:func:`epochs`, random reshuffling). The factor G / b is put on every model
and guide site inside a model plate by :class:`ScaleGroups`, a Pyro messenger, so the guide's own
:meth:`~amortize.guide.AmortizedGuide.log_weights` computes the estimate.

q(globals) of the one dataset is a full-rank Gaussian on the joint unconstrained global vector
(:class:`GlobalGaussian`); the group latents keep the amortizer's per-group machinery.

Example:
    >>> index = OuterGroupIndex(big_data)  # doctest: +SKIP
    >>> sub, kept = index.restrict(draw_groups(index.num_groups, 1024, gen))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from torch import nn

from .data import OBS, HierarchicalData
from .errors import DataError
from .objectives import log_weights
from .structure import DATASETS, DRAWS, ModelStructure

if TYPE_CHECKING:
    from .guide import AmortizedGuide

__all__ = [
    "OuterGroupIndex",
    "restrict_groups",
    "epochs",
    "draw_groups",
    "encode",
    "ScaleGroups",
    "GlobalGaussian",
    "FixedGlobals",
    "subsampled_elbo",
]


# ---------------------------------------------------------------------------------- subsetting
class OuterGroupIndex:
    """Restrict a dataset to a subset of its outermost groups in time linear in the subset.

    Built once per dataset (one stable argsort per inner level and for the observations, skipped
    when the rows are already ordered by outermost group): for every unit of an inner level and
    every observation, the outermost group it belongs to, as contiguous ranges. A restriction then
    gathers those ranges with index operations only.

    A crossed dataset (several grouping factors) has rows shared between the factors' groups, so it has
    no subsets of this kind: its only restriction is to all of its groups (``self.crossed``), the dataset
    itself, and a subsampled fit of it is trained whole.

    Args:
        data: one dataset (``y [N]`` or no response) or a batch sharing one structure; it is kept in
            CPU memory (a copy is made of a dataset on another device), restrictions move to a device.
    """

    def __init__(self, data: HierarchicalData) -> None:
        if data.group.device.type != "cpu":
            data = data.to("cpu")
        self.row_level = data.row_level  # the rows as a level: restricted as rows, then made a level again
        self.crossed = data.crossed
        data = data.declared()
        self.data = data
        self.top = data.levels[0]
        self.num_groups = data.size(self.top)
        if self.crossed:
            return
        self._order: dict[str, torch.Tensor | None] = {}
        self._offsets: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        for unit in (*data.levels[1:], OBS):
            anc = data.index(self.top, at=unit)  # outermost group of each unit
            ordered = bool((anc[1:] >= anc[:-1]).all())
            self._order[unit] = None if ordered else torch.argsort(anc, stable=True)
            counts = torch.bincount(anc, minlength=self.num_groups)
            self._counts[unit] = counts
            self._offsets[unit] = torch.cumsum(counts, 0) - counts
        # new ids of the kept groups, written at their old ids (only kept entries are ever read)
        self._new_id = {lvl: torch.zeros(data.size(lvl), dtype=torch.long) for lvl in data.levels}

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (not counting the dataset)."""
        tensors = [*self._counts.values(), *self._offsets.values(), *self._new_id.values()]
        tensors += [t for t in self._order.values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _units(self, unit: str, groups: torch.Tensor) -> torch.Tensor:
        """Old ids of the units of ``unit`` below ``groups``, grouped by outermost group."""
        counts = self._counts[unit][groups]
        starts = self._offsets[unit][groups]
        total = int(counts.sum())
        pos = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts, output_size=total)
        pos = pos + torch.arange(total)
        order = self._order[unit]
        return pos if order is None else order[pos]

    def check(self, groups: Any) -> torch.Tensor:
        """Outermost group ids as a sorted tensor without repeats.

        Raises:
            DataError: no ids, ids that are not integers, an id that is not an outermost group, or some but
                not all groups of a crossed dataset.
        """
        g = torch.as_tensor(groups).reshape(-1)
        if g.numel() == 0:
            raise DataError(f"no '{self.top}' groups given")
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise DataError(f"'{self.top}' group ids must be integers, got {g.dtype}")
        g = torch.unique(g.long().cpu())
        if int(g[0]) < 0 or int(g[-1]) >= self.num_groups:
            bad = int(g[0]) if int(g[0]) < 0 else int(g[-1])
            raise DataError(f"level '{self.top}' has groups 0..{self.num_groups - 1}; got group id {bad}")
        if self.crossed and len(g) < self.num_groups:
            raise DataError(
                f"factors {[list(c) for c in self.data.factors]}: a crossed dataset cannot be restricted to some"
                f" '{self.top}' groups (their rows are shared with the other factors' groups); take all"
                f" {self.num_groups} of them"
            )
        return g

    def probe(self, k: int = 4) -> HierarchicalData:
        """A small restriction, to check the data against a model cheaply: ``k`` outermost groups (a
        crossed dataset: all of it)."""
        return self.restrict(torch.arange(self.num_groups if self.crossed else min(k, self.num_groups)))[0]

    def restrict(self, groups: Any) -> tuple[HierarchicalData, dict[str, torch.Tensor]]:
        """The dataset restricted to outermost ``groups`` with all their descendants and observations.

        Args:
            groups: ids of outermost groups (any order; repeats are dropped).

        Returns:
            ``(subset, kept)``: a valid :class:`HierarchicalData` with dense ids (outermost groups in
            increasing id order, inner groups and rows grouped by outermost group and in their
            original order within it), and ``kept[level]`` / ``kept["obs"]``: the original id of
            each of its groups / rows.

        Raises:
            DataError: no groups, an id that is not a group of the outermost level, or some but not all
                groups of a crossed dataset.
        """
        d = self.data
        g = self.check(groups)
        if self.crossed:
            kept = {lvl: torch.arange(d.size(lvl)) for lvl in d.levels}
            kept[OBS] = torch.arange(d.n_obs)
            if self.row_level is not None:
                return d.rows_as_level(self.row_level), {**kept, self.row_level: kept[OBS]}
            return d, kept
        kept: dict[str, torch.Tensor] = {self.top: g}
        self._new_id[self.top][g] = torch.arange(len(g))
        parents: dict[str, torch.Tensor] = {}
        above = self.top
        for unit in (*d.levels[1:], OBS):
            units = self._units(unit, g)
            kept[unit] = units
            old_parent = d.group[units] if unit == OBS else d.parents[unit][units]
            new_parent = self._new_id[above][old_parent]
            if unit == OBS:
                group = new_parent
            else:
                parents[unit] = new_parent
                self._new_id[unit][units] = torch.arange(len(units))
                above = unit
        rows = kept[OBS]
        y = None if d.y is None else d.y[..., rows]
        cov = {lvl: {k: v[kept[lvl]] for k, v in cols.items()} for lvl, cols in d.covariates.items()}
        labels = {lvl: [labs[i] for i in kept[lvl].tolist()] for lvl, labs in d.labels.items() if lvl in kept}
        dtype = y.dtype if y is not None else next((v.dtype for c in cov.values() for v in c.values()), None)
        sub = HierarchicalData(
            d.levels, parents, group, y=y, covariates=cov, labels=labels, response=d.response, dtype=dtype
        )
        if self.row_level is not None:
            sub, kept[self.row_level] = sub.rows_as_level(self.row_level), rows
        return sub, kept


def restrict_groups(data: HierarchicalData, groups: Any) -> tuple[HierarchicalData, dict[str, torch.Tensor]]:
    """``data`` restricted to the outermost ``groups`` (see :meth:`OuterGroupIndex.restrict`; build an
    :class:`OuterGroupIndex` once to restrict one dataset many times)."""
    return OuterGroupIndex(data).restrict(groups)


def epochs(num_groups: int, k: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Minibatches of outermost groups by random reshuffling: each epoch splits a fresh random
    permutation into ``round(G / k)`` chunks of ``k`` groups (give or take one).

    Each chunk is marginally a uniform random subset of its size, so the scaled minibatch ELBO stays
    unbiased; over an epoch every group is seen exactly once, which cancels much of the
    subsampling noise that independent draws leave in the global latents' gradients."""
    n = max(1, round(num_groups / k))
    bounds = torch.linspace(0, num_groups, n + 1).round().long().tolist()
    while True:
        perm = torch.randperm(num_groups, generator=gen)
        for c in range(n):
            yield perm[bounds[c] : bounds[c + 1]]


def draw_groups(num_groups: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` of ``range(num_groups)`` uniformly without replacement, in time O(k) when k is small.

    Distinct values in the order of a stream of uniform draws are a uniform sample without
    replacement (sequential sampling that rejects repeats)."""
    if k >= num_groups:
        return torch.arange(num_groups)
    if 4 * k > num_groups:
        return torch.randperm(num_groups, generator=gen)[:k]
    while True:
        r = torch.randint(num_groups, (2 * k,), generator=gen)
        uniq, inv = torch.unique(r, return_inverse=True)
        if len(uniq) >= k:
            break
    first = torch.full((len(uniq),), 2 * k, dtype=torch.long).scatter_reduce_(0, inv, torch.arange(2 * k), "amin")
    return uniq[torch.argsort(first)[:k]]


# ---------------------------------------------------------------------------------- the estimator
class ScaleGroups(Messenger):
    """Multiply the log density of every sample site inside a model plate by ``factor``.

    Global sites sit outside every model plate (only amortize's draws and datasets plates): they
    are left as they are. Applied around :meth:`AmortizedGuide.log_weights`, it scales the model's
    group and observation terms and the guide's group terms alike.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample" or self.factor == 1.0:
            return
        if any(f.name not in (DRAWS, DATASETS) for f in msg["cond_indep_stack"]):
            msg["scale"] = self.factor * msg["scale"]


class GlobalGaussian(nn.Module):
    """q(u_globals) = N(loc, L L^T) on the joint unconstrained global vector of one dataset.

    Args:
        structure: the model's structure (fixes the order and transforms of the global sites).
        loc: initial location ``[D]``.
        scale_tril: initial lower Cholesky factor ``[D, D]`` (positive diagonal).
    """

    def __init__(self, structure: ModelStructure, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__()
        self.structure = structure
        D = structure.global_dim
        self.loc = nn.Parameter(loc.detach().clone().reshape(D))
        self.log_diag = nn.Parameter(torch.diagonal(scale_tril).detach().clamp_min(1e-8).log().clone())
        self.register_buffer("tril_idx", torch.tril_indices(D, D, offset=-1), persistent=False)
        self.off_diag = nn.Parameter(scale_tril.detach()[self.tril_idx[0], self.tril_idx[1]].clone())

    def scale_tril(self) -> torch.Tensor:
        L = torch.diag_embed(self.log_diag.exp())
        return L.index_put((self.tril_idx[0], self.tril_idx[1]), self.off_diag)

    def distribution(self, batch_dims: int = 0) -> dist.MultivariateNormal:
        """The Gaussian with batch shape ``[1] * batch_dims`` and event ``[D]``."""
        shape = [1] * batch_dims
        return dist.MultivariateNormal(
            self.loc.reshape(*shape, -1), scale_tril=self.scale_tril().expand(*shape, -1, -1)
        )

    def constrain(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``u [..., D]`` into the global sites' values ``{site: [..., *event]}``."""
        out, offset = {}, 0
        for s in self.structure.global_sites:
            out[s.name] = s.constrain(u[..., offset : offset + s.dim])[0]
            offset += s.dim
        return out


class FixedGlobals:
    """Stands in for q(globals) in a guide call: hands out given joint draws ``u [S, 1, 1.., D]`` (the
    layout of ``q.rsample((S,))``), so that several calls (chunks of one dataset) share their globals."""

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u

    def rsample(self, sample_shape: Any = ()) -> torch.Tensor:
        return self.u

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        return u.new_zeros(u.shape[:-1])


def encode(guide: AmortizedGuide, q: Any, data: HierarchicalData) -> dict[str, Any]:
    """:meth:`AmortizedGuide.encode` of ``data`` with q(globals) replaced by ``q``: a guide call given
    it draws the globals from ``q`` and the group sites as always (the model's conditional prior
    times the group heads' data terms of ``data``'s groups)."""
    encoded = guide.encode(data)
    if isinstance(q, GlobalGaussian):
        encoded["q_globals"] = q.distribution(1 + guide.structure.max_plate_nesting)  # batch [B=1, 1..]
    elif q is not None:
        encoded["q_globals"] = q
    return encoded


def subsampled_elbo(
    guide: AmortizedGuide, q: GlobalGaussian | None, subset: HierarchicalData, factor: float, num_particles: int
) -> torch.Tensor:
    """The minibatch ELBO ``[num_particles]`` on ``subset`` (b of the G outermost groups, all their
    descendants and rows), with every group and observation term scaled by ``factor = G / b``: an
    unbiased estimate of the full-data ELBO over uniformly drawn subsets. Differentiable."""
    encoded = encode(guide, q, subset)
    with ScaleGroups(factor):
        log_p, log_q, _ = log_weights(guide, subset, num_particles, encoded=encoded)
    return (log_p - log_q).reshape(num_particles)
