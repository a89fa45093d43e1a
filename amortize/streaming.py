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

from collections.abc import Callable
from typing import Any

import pyro
import torch

from .batch import StructureBatch, check_data
from .data import HierarchicalData
from .errors import DataError
from .subsample import FixedGlobals, GlobalGaussian, OuterGroupIndex, encode

__all__ = ["StreamedDataset", "GroupDraws"]


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
        self.data = self.index.data
        G = self.index.num_groups
        self.chunk = max(1, min(G, int(chunk_groups or G)))
        sample, _ = self.index.restrict(torch.arange(min(G, 4)))
        check_data(sample, self.structure, covariates, self.dtype)  # levels, covariates, values: DataError
        check_data(self.data, self.structure, covariates, self.dtype)

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

    @torch.no_grad()
    def sample(self, num_samples: int, groups: Any = None) -> dict[str, torch.Tensor] | GroupDraws:
        """Joint draws of every group (``groups=None``: ``{site: [n, *site_shape]}``) or of the chosen
        outermost ``groups`` and their descendants (a :class:`GroupDraws`), on torch's RNG as it is."""
        st, d, top = self.structure, self.data, self.index.top
        G = self.index.num_groups
        chosen = torch.arange(G) if groups is None else self.index.check(groups)
        pos, sel = {}, {}
        for lvl in d.levels:  # the returned groups of each level, in id order, and their positions
            keep = torch.isin(d.index(top, at=lvl) if lvl != top else torch.arange(G), chosen)
            sel[lvl] = torch.nonzero(keep).squeeze(-1)
            pos[lvl] = torch.full((d.size(lvl),), -1, dtype=torch.long)
            pos[lvl][sel[lvl]] = torch.arange(len(sel[lvl]))
        u = self._global_draws(num_samples)
        q = None if u is None else FixedGlobals(u)
        out: dict[str, torch.Tensor] = {}
        for s in st.latents:
            if s.level is not None:
                out[s.name] = torch.empty(num_samples, len(sel[s.level]), *s.event_shape, dtype=self.dtype)
        perm = chosen[torch.randperm(len(chosen))]
        for piece in perm.tensor_split(max(1, round(len(perm) / self.chunk))):
            own = piece
            if len(piece) < self.chunk:  # a short chunk runs with random companions, as training's subsets
                others = torch.ones(G, dtype=torch.bool)
                others[piece] = False
                rest = torch.nonzero(others).squeeze(-1)
                piece = torch.cat([piece, rest[torch.randperm(len(rest))[: self.chunk - len(piece)]]])
            sub, kept = self._subset(piece)
            part = StructureBatch(self.guide, self.model, sub, self.device)
            with pyro.validation_enabled(False):
                encoded = encode(self.guide, q, sub)
                values = self.guide(
                    sub, num_samples, encoded=encoded, model_data=part.drawing_data(), latents_only=True
                )
            mine = {top: torch.isin(kept[top], own)}  # this chunk's own groups (not companions) per level
            for above, lvl in zip(sub.levels, sub.levels[1:]):
                mine[lvl] = mine[above][sub.parent_index(lvl).cpu()]
            for s in st.latents:
                v = st.to_user(s, values[s.name])[:, 0]  # [n, *site_shape]
                if s.level is None:
                    out.setdefault(s.name, v.cpu())
                    continue
                at = pos[s.level][kept[s.level]]
                keep = mine[s.level] & (at >= 0)
                out[s.name][:, at[keep]] = v[:, keep.to(v.device)].cpu()
        if groups is None:
            return out
        res = GroupDraws(out)
        res.index = sel
        return res

    def range_flags(self, ranges: dict[str, Any]) -> list[str]:
        """Flags of the whole dataset against ``ranges`` (its structure, response and covariates)."""
        if self.data.y is None:
            raise DataError(f"the data has no response ('{self.data.response}')")
        return StructureBatch(self.guide, self.model, self.data, torch.device("cpu")).range_flags(ranges)
