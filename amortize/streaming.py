"""One huge dataset streamed through the guide in chunks of its outermost groups.

The global latents are drawn once (from the Gaussian a subsampled fit learned for this dataset, or
from the global head on the whole dataset); every chunk of about ``chunk_groups`` outermost groups
(with their descendants and rows) then runs the guide with those same global draws
(:class:`~amortize.subsample.FixedGlobals`), so the chunks' group draws are joint draws with the
globals, and memory is bounded by one chunk plus the returned draws. The chunks are a random
partition (a random permutation cut into pieces): the group heads read the chunk's dataset
embedding, and subsampled training saw random subsets of the same size.

Example:
    >>> post = amortizer.posterior(big, chunk_groups=1024)  # doctest: +SKIP
    >>> post.sample(200)["theta"].shape  # [200, G]  # doctest: +SKIP
    >>> post.sample(200, groups=[3, 7]).index["group"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pyro
import torch

from .batch import StructureBatch, check_data, check_finite
from .data import HierarchicalData
from .errors import DataError
from .subsample import FixedGlobals, GlobalGaussian, OuterGroupIndex, encode

__all__ = ["StreamedDataset", "GroupDraws", "Moments"]


class Moments(NamedTuple):
    """Posterior means and sds of one group site: ``[G_level, *event_shape]`` each."""

    mean: torch.Tensor
    sd: torch.Tensor


class GroupDraws(dict):
    """``{site: draws}`` of a streamed dataset: globals ``[n, *event]``, group sites ``[n, G_sel, *event]``.

    Attributes:
        index: ``{level: original ids}`` of the groups along each group site's second dim.
    """

    index: dict[str, torch.Tensor]


class StreamedDataset:
    """Draws of one large dataset, chunk by chunk (what :class:`~amortize.Posterior` runs when streaming).

    Args:
        guide: the trained guide; model: the user's model; data: one dataset (``y [N]``), kept where
            it is (usually CPU memory), each chunk moves to ``device``.
        chunk_groups: outermost groups per chunk (default: all of them, or the subsampled fit's).
        q_globals: the :class:`~amortize.subsample.GlobalGaussian` of a subsampled fit on this data;
            None: the global head on the whole dataset.
        covariates: the covariates the guide was trained with, per level.
    """

    def __init__(
        self,
        guide: Any,
        model: Callable,
        data: HierarchicalData,
        device: torch.device,
        chunk_groups: int | None,
        q_globals: GlobalGaussian | None,
        covariates: dict[str, list[str]],
    ) -> None:
        self.guide, self.model, self.device = guide, model, device
        self.structure = guide.structure
        self.dtype = next(guide.parameters()).dtype
        self.q_globals = q_globals
        self.index = OuterGroupIndex(data)
        self.data = self.structure.complete(self.index.data)  # the index keeps the declared levels
        G = self.index.num_groups
        self.chunk = G if self.index.crossed else max(1, min(G, int(chunk_groups or G)))  # crossed: whole
        sample = self.index.probe()
        check_data(sample, self.structure, covariates, self.dtype)  # levels, covariates, values: DataError
        check_data(self.data, self.structure, covariates, self.dtype)

    @property
    def num_chunks(self) -> int:
        """How many chunks the whole dataset is drawn in (1: it fits in one)."""
        return max(1, round(self.index.num_groups / self.chunk))

    def _subset(self, groups: torch.Tensor) -> tuple[HierarchicalData, dict[str, torch.Tensor]]:
        sub, kept = self.index.restrict(groups)
        return sub.to(self.device, self.dtype), kept

    def _global_draws(self, n: int) -> torch.Tensor | None:
        """Joint unconstrained global draws ``[n, 1, 1.., D]`` (None for a model without globals)."""
        if not self.structure.global_dim:
            return None
        if self.q_globals is not None:
            return self.q_globals.distribution(1 + self.structure.max_plate_nesting).sample((n,))
        whole = StructureBatch(self.guide, self.model, self.data, self.device)
        return self.guide.encode(whole.data)["q_globals"].sample((n,))

    def _chunks(self, chosen: torch.Tensor) -> Iterator[tuple[HierarchicalData, dict[str, torch.Tensor], dict]]:
        """The chosen outermost groups in random chunks of about ``chunk`` (a short chunk padded with
        random companions, as training's subsets): ``(subset, kept ids, own)``, ``own[level]``
        marking the subset's units that belong to the chunk's chosen groups."""
        G, top = self.index.num_groups, self.index.top
        perm = chosen[torch.randperm(len(chosen))]
        for piece in perm.tensor_split(max(1, round(len(perm) / self.chunk))):  # whole: num_chunks
            own = piece
            if len(piece) < self.chunk:
                others = torch.ones(G, dtype=torch.bool)
                others[piece] = False
                rest = torch.nonzero(others).squeeze(-1)
                piece = torch.cat([piece, rest[torch.randperm(len(rest))[: self.chunk - len(piece)]]])
            sub, kept = self._subset(piece)
            if self.index.crossed:  # the whole dataset, every group its own
                yield sub, kept, {lvl: torch.ones(sub.size(lvl), dtype=torch.bool) for lvl in sub.levels}
                continue
            mine = {top: torch.isin(kept[top], own)}
            for above, lvl in zip(sub.levels, sub.levels[1:]):
                mine[lvl] = mine[above][sub.parent_index(lvl).cpu()]
            yield sub, kept, mine

    def _positions(self, chosen: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per level: the original ids of the chosen groups' units in id order, and each unit's
        position among them (-1 when not chosen)."""
        d, top, G = self.data, self.index.top, self.index.num_groups
        if self.index.crossed:  # all groups (``index.check`` refused a part of a crossed dataset)
            sel = {lvl: torch.arange(d.size(lvl)) for lvl in d.levels}
            return dict(sel), sel
        pos, sel = {}, {}
        for lvl in d.levels:
            keep = torch.isin(d.index(top, at=lvl) if lvl != top else torch.arange(G), chosen)
            sel[lvl] = torch.nonzero(keep).squeeze(-1)
            pos[lvl] = torch.full((d.size(lvl),), -1, dtype=torch.long)
            pos[lvl][sel[lvl]] = torch.arange(len(sel[lvl]))
        return pos, sel

    def _run(self, sub: HierarchicalData, q: FixedGlobals | None, n: int, latents_only: bool) -> dict:
        part = StructureBatch(self.guide, self.model, sub, self.device)
        with pyro.validation_enabled(False):
            encoded = encode(self.guide, q, sub)
            return self.guide(sub, n, encoded=encoded, model_data=part.drawing_data(), latents_only=latents_only)

    @torch.no_grad()
    def sample(self, num_samples: int, groups: Any = None) -> dict[str, torch.Tensor] | GroupDraws:
        """Joint draws of every group (``groups=None``: ``{site: [n, *site_shape]}``) or of the chosen
        outermost ``groups`` and their descendants (a :class:`GroupDraws`), on torch's RNG as it is."""
        st = self.structure
        chosen = torch.arange(self.index.num_groups) if groups is None else self.index.check(groups)
        pos, sel = self._positions(chosen)
        u = self._global_draws(num_samples)
        q = None if u is None else FixedGlobals(u)
        out: dict[str, torch.Tensor] = {}
        for s in st.latents:
            if s.level is not None:
                out[s.name] = torch.empty(num_samples, len(sel[s.level]), *s.event_shape, dtype=self.dtype)
        for sub, kept, mine in self._chunks(chosen):
            values = self._run(sub, q, num_samples, latents_only=True)
            for s in st.latents:
                v = st.to_user(s, values[s.name])[:, 0]  # [n, *site_shape]
                if s.level is None:
                    out.setdefault(s.name, v.cpu())
                    continue
                at = pos[s.level][kept[s.level]]
                keep = mine[s.level] & (at >= 0)
                out[s.name][:, at[keep]] = v[:, keep.to(v.device)].cpu()
        check_finite(out)
        if groups is None:
            return out
        res = GroupDraws(out)
        res.index = sel
        return res

    @torch.no_grad()
    def moments(self, num_draws: int, level: str | None = None) -> dict[str, Moments]:
        """Posterior means and sds of every group's latents, chunk by chunk: q's conditional moments
        given ``num_draws`` draws of the globals and parents, combined by the law of total variance
        (the draws' own moments where q has none in closed form), on torch's RNG as it is.

        Raises:
            DataError: ``level`` is not a level of the data or has no latent sites; ``num_draws`` < 2.
        """
        st, d = self.structure, self.data
        if level is not None and level not in d.levels:
            raise DataError(f"moments: unknown level '{level}'; levels are {list(d.levels)}")
        sites = [s for s in st.latents if s.level is not None and (level is None or s.level == level)]
        if not sites:
            raise DataError(f"moments: no latent sites at level '{level}' (sites: {[s.name for s in st.latents]})")
        if num_draws < 2:
            raise DataError(f"moments: num_draws must be >= 2, got {num_draws}")
        mean = {s.name: torch.zeros(d.size(s.level), *s.event_shape, dtype=self.dtype) for s in sites}
        var = {s.name: torch.zeros_like(mean[s.name]) for s in sites}
        u = self._global_draws(num_draws)
        q = None if u is None else FixedGlobals(u)
        for sub, kept, mine in self._chunks(torch.arange(self.index.num_groups)):
            with pyro.validation_enabled(False):
                values = self._run(sub, q, num_draws, latents_only=False)
                _, guide_trace = self.guide.get_traces()
            for s in sites:
                m, v = _moments(st, s, guide_trace.nodes[s.name]["fn"], values[s.name])
                own = mine[s.level]
                mean[s.name][kept[s.level][own]] = m[own.to(m.device)].cpu()
                var[s.name][kept[s.level][own]] = v[own.to(v.device)].cpu()
        return {k: Moments(mean[k], var[k].clamp_min(0).sqrt()) for k in mean}

    def range_flags(self, ranges: dict[str, Any]) -> list[str]:
        """Flags of the whole dataset against ``ranges`` (its structure, response and covariates; not
        its number of outermost groups when q(globals) was fitted on it by subsampled training)."""
        if self.data.y is None:
            raise DataError(f"the data has no response ('{self.data.response}')")
        whole = StructureBatch(self.guide, self.model, self.data, torch.device("cpu"), self.q_globals)
        return whole.range_flags(ranges)


def _moments(st: Any, site: Any, q: Any, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over draws ``[G, *event]`` of a group site: from q's conditional moments
    given each draw's parents when q has them, else from the draws."""
    try:
        cm, cv = q.mean, q.variance
    except NotImplementedError:  # a transformed (constrained) Gaussian: no closed-form moments
        x = st.to_user(site, value)[:, 0]
        return x.mean(0), x.var(0)
    cm = st.to_user(site, cm.expand(value.shape))[:, 0]  # [S, G, *event]
    cv = st.to_user(site, cv.expand(value.shape))[:, 0]
    return cm.mean(0), cv.mean(0) + cm.var(0)
