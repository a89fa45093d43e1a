"""Posteriors of many datasets from one call: ``amortizer.posterior([d1, d2, ...])``.

Datasets that share one structure (the same levels, parent indices, observations' groups and
covariate values; only the responses differ) are stacked into one ``[B, N]`` batch and go through
the networks together: one encoder pass and one vectorized draw per structure, however many datasets
it holds. A list that mixes structures is split into one batch per distinct structure (the only
Python loop is over distinct structures); results come back in the order of the input list.

Example:
    >>> post = amortizer.posterior([d1, d2, d3])  # doctest: +SKIP
    >>> draws = post.sample(1000, seed=0)  # [{"mu": [1000], "theta": [1000, G1]}, {...}, {...}]  # doctest: +SKIP
    >>> post.batches  # [([0, 2], Posterior over a [2, N] batch), ([1], ...)]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .data import HierarchicalData
from .errors import DataError
from .posterior import K_THRESHOLD, CorrectedDraws, Posterior
from .structure import seeded

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["PosteriorBatch", "same_structure"]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device))))


def same_structure(a: HierarchicalData, b: HierarchicalData) -> bool:
    """Whether ``a`` and ``b`` can share one ``[B, N]`` batch: the same levels, parent indices,
    observations' groups and covariates (names, levels and values); responses and labels may differ."""
    if a is b:
        return True
    if a.levels != b.levels or a.n_obs != b.n_obs or a.covariate_level != b.covariate_level:
        return False
    if not _same_tensor(a.group, b.group):
        return False
    if any(not _same_tensor(a.parents[lvl], b.parents[lvl]) for lvl in a.parents):
        return False
    return all(_same_tensor(a.covariates[lvl][k], b.covariates[lvl][k]) for k, lvl in a.covariate_level.items())


class PosteriorBatch(Sequence[Posterior]):
    """The amortized posteriors of a list of datasets, computed one structure at a time.

    What :meth:`Amortizer.posterior <amortize.Amortizer.posterior>` returns for a list (or tuple) of
    :class:`~amortize.HierarchicalData`, each holding one dataset (``y [N]``).

    * :meth:`sample` returns a **list with one dict per input dataset**, in input order:
      ``{site: [num_samples, *site_shape]}``, exactly the layout ``Posterior.sample`` gives for that
      dataset alone (group sites sized by that dataset's groups).
    * ``batch[i]`` is the :class:`Posterior` of dataset ``i`` alone (for ``to_arviz``, ``summary``).
    * :attr:`batches` holds, per distinct structure, the input positions and one :class:`Posterior`
      over their stacked ``[B, N]`` responses: its ``sample`` gives ``[num_samples, B, ...]``
      tensors, for callers that want draws with a leading dataset dimension.

    Args:
        amortizer: the trained amortizer.
        datasets: a non-empty sequence of single datasets (``y [N]``).

    Raises:
        DataError: the list is empty; an element is not a HierarchicalData, has no response or
            already holds a batch ``[B, N]``; or a dataset's levels, covariates or values do not fit
            the model (the message starts with ``dataset i:``, naming the first one at fault).
    """

    def __init__(self, amortizer: Amortizer, datasets: Sequence[HierarchicalData]) -> None:
        if isinstance(datasets, HierarchicalData) or not isinstance(datasets, (list, tuple)):
            raise DataError(f"posterior: expected a HierarchicalData or a list of them, got {type(datasets).__name__}")
        if not datasets:
            raise DataError("posterior: an empty list of datasets; pass at least one HierarchicalData")
        for i, d in enumerate(datasets):
            if not isinstance(d, HierarchicalData):
                raise DataError(
                    f"dataset {i}: expected a HierarchicalData (see HierarchicalData.from_frame),"
                    f" got {type(d).__name__}"
                )
            if d.y is None:
                raise DataError(f"dataset {i}: the data has no response ('{d.response}')")
            if d.batch_size is not None:
                raise DataError(
                    f"dataset {i}: already a batch of {d.batch_size} datasets (y {tuple(d.y.shape)}); a list"
                    " holds single datasets (y [N]): pass the batch alone, or split it"
                )
        self.amortizer = amortizer
        self.datasets = list(datasets)
        groups: list[list[int]] = []
        for i, d in enumerate(self.datasets):  # one comparison per distinct structure, not per pair
            for members in groups:
                if same_structure(self.datasets[members[0]], d):
                    members.append(i)
                    break
            else:
                groups.append([i])
        dtype = next(amortizer.guide.parameters()).dtype
        self.batches: list[tuple[list[int], Posterior]] = []
        for members in groups:
            first = self.datasets[members[0]]
            y = torch.stack([self.datasets[i].y.to(device=first.y.device, dtype=dtype) for i in members])
            try:
                post = Posterior(amortizer, first.with_response(y))
            except DataError:
                self._name_culprit(members)
                raise
            self.batches.append((members, post))
        self._where = {i: (b, j) for b, (members, _) in enumerate(self.batches) for j, i in enumerate(members)}

    def _name_culprit(self, members: list[int]) -> None:
        """Re-check the datasets of a failed batch one by one and raise the first one's error with its position."""
        for i in members:
            try:
                Posterior(self.amortizer, self.datasets[i])
            except DataError as e:
                raise DataError(f"dataset {i}: {e}") from None

    # ------------------------------------------------------------------ sequence protocol
    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, i: int) -> Posterior:  # type: ignore[override]
        """The posterior of dataset ``i`` alone (same networks; draws are not those of :meth:`sample`)."""
        if isinstance(i, slice):
            raise TypeError("PosteriorBatch indices must be integers; build a new batch from a slice of the datasets")
        return Posterior(self.amortizer, self.datasets[i])

    def __repr__(self) -> str:
        return f"PosteriorBatch({len(self)} datasets in {self.num_structures} structure(s))"

    @property
    def num_structures(self) -> int:
        """Distinct structures in the list: the number of vectorized batches."""
        return len(self.batches)

    # ------------------------------------------------------------------ draws
    @torch.no_grad()
    def sample(
        self, num_samples: int = 1000, seed: int | None = None, correct: bool = False, oversample: int = 4
    ) -> list[dict[str, torch.Tensor]]:
        """Joint posterior draws for every dataset: a list, in input order, of ``{site: [num_samples,
        *site_shape]}`` (with ``correct``: :class:`~amortize.posterior.CorrectedDraws`, whose
        ``pareto_k``, ``ess`` and ``corrected`` are this dataset's own).

        One vectorized pass per distinct structure. The per-dataset tensors are views into each
        structure's ``[num_samples, B, ...]`` draws.

        Args:
            num_samples: draws per dataset.
            seed: seeds these draws only (the caller's RNG is left as it was); the same seed and the
                same list give the same draws.
            correct: PSIS importance-sampling correction per dataset (see :meth:`Posterior.sample`).
            oversample: proposals per returned draw with ``correct``.
        """
        per_batch: list[dict[str, torch.Tensor]] = []
        with seeded(seed, self.amortizer.device):
            for _, post in self.batches:
                if correct:
                    per_batch.append(post._corrected(num_samples, None, max(1, int(oversample))))
                else:
                    per_batch.append(post._draws_unseeded(num_samples, False)[0])
        out: list[dict[str, torch.Tensor]] = []
        for i in range(len(self)):
            b, j = self._where[i]
            draws = per_batch[b]
            one = {k: v[:, j] for k, v in draws.items()}
            if isinstance(draws, CorrectedDraws):
                fixed = CorrectedDraws(one)
                fixed.pareto_k, fixed.ess = draws.pareto_k[j], draws.ess[j]  # type: ignore[index]
                fixed.corrected = draws.corrected[j]  # type: ignore[index]
                fixed.num_proposals = draws.num_proposals
                one = fixed
            out.append(one)
        return out

    @torch.no_grad()
    def log_prob(self, values: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """log q(values_i | dataset_i) for draws in the layout :meth:`sample` returns: a list of ``[n]``
        (the same number of draws n for every dataset)."""
        if len(values) != len(self):
            raise DataError(f"log_prob: {len(values)} sets of draws for {len(self)} datasets")
        out: list[torch.Tensor | None] = [None] * len(self)
        for members, post in self.batches:
            stacked = {k: torch.stack([values[i][k] for i in members], 1) for k in values[members[0]]}
            lp = post.log_prob(stacked)  # [n, B]
            for j, i in enumerate(members):
                out[i] = lp[:, j]
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def diagnostics(self, num_samples: int = 1000, seed: int | None = 0) -> list[dict[str, Any]]:
        """Per-dataset trust, in input order: the dict :meth:`Posterior.diagnostics` gives for one
        dataset (``pareto_k``, ``ess``, ``num_samples``, ``flags``, ``ok``), computed one structure at a time."""
        results: list[dict[str, Any] | None] = [None] * len(self)
        with seeded(seed, self.amortizer.device):
            for members, post in self.batches:
                d = post.diagnostics(num_samples, seed=None)
                ks, ess = d["pareto_k"], d["ess"]
                shared = [f for f in d["flags"] if not f.startswith("dataset ")]
                for j, i in enumerate(members):
                    own = [f.split(": ", 1)[1] for f in d["flags"] if f.startswith(f"dataset {j}: ")]
                    flags = shared + own
                    ok = not flags and not (ks[j] > K_THRESHOLD)
                    results[i] = {
                        "pareto_k": ks[j],
                        "ess": ess[j],
                        "num_samples": num_samples,
                        "flags": flags,
                        "ok": ok,
                    }
        return results  # type: ignore[return-value]

    def range_flags(self) -> list[list[str]]:
        """Per dataset, in input order: the ways it lies outside the training range (see
        :meth:`Posterior.range_flags`)."""
        out: list[list[str]] = [[] for _ in range(len(self))]
        for members, post in self.batches:
            flags = post.range_flags()
            shared = [f for f in flags if not f.startswith("dataset ")]
            for j, i in enumerate(members):
                out[i] = shared + [f.split(": ", 1)[1] for f in flags if f.startswith(f"dataset {j}: ")]
        return out
