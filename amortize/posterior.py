"""The trained posterior: draws, log density, diagnostics, exports; one API for every input.

Training and the trained posterior are separate objects: :class:`~amortize.Amortizer` trains,
:class:`Posterior` only samples, scores, diagnoses and exports. It is built from what it needs (the
guide, the model, the training ranges, the device), never from the amortizer, and takes

* one dataset (``y [N]``): ``sample(n)`` gives ``{site: [n, *site_shape]}``;
* B datasets sharing one structure (``y [B, N]``): ``{site: [n, B, *site_shape]}``;
* a list of datasets, of one structure or several: a list of per-dataset dicts in input order,
  vectorized per distinct structure (:mod:`amortize.batch`);
* one huge dataset, streamed in chunks of outermost groups (``chunk_groups=``, or an amortizer fitted
  on it with :class:`~amortize.sources.Subsampled`): the same dict, built chunk by chunk with the
  global draws shared (:mod:`amortize.streaming`). A dataset that fits in one chunk (a crossed one
  always) is not streamed: it is drawn, weighed and diagnosed whole, with the subsampled fit's
  q(globals) where it has one. ``sample(n, groups=[...])`` keeps chosen groups of one dataset.

PSIS-corrected draws: :class:`~amortize.importance.ImportanceSampledPosterior` (``post.sample(n, correct=True)``).

Example:
    >>> post = amortizer.posterior([d1, d2])  # doctest: +SKIP
    >>> post.sample(1000, seed=0)  # [{"mu": [1000], "theta": [1000, G1]}, {...}]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .bad_steps import bad_step_error
from .batch import StructureBatch, check_data, check_list, group_by_structure, name_culprit
from .checkpoint import atomic_write
from .data import HierarchicalData
from .errors import DataError, NonFiniteDrawsError
from .export import inference_data, summary
from .hierarchical_resample import corrected_sample
from .importance import K_THRESHOLD, CorrectedDraws, psis
from .local_sbc import LocalSBC
from .predictive import PPCResult, ppc
from .streaming import GroupDraws, Moments, StreamedDataset
from .structure import seeded
from .verdict import unusable, verdict

__all__ = ["Posterior", "CorrectedDraws", "GroupDraws", "Moments", "psis_k", "K_THRESHOLD"]

log = logging.getLogger(__name__)


def psis_k(log_weights: torch.Tensor) -> float:
    """Pareto k of importance weights (PSIS, see :mod:`amortize.importance`). Below 0.5 fine,
    0.5-0.7 usable, above 0.7 not to be trusted; NaN with fewer than 25 finite weights."""
    return psis(log_weights).k


class Posterior:
    """q(latents | data) for one dataset, a ``[B, N]`` batch, a list of datasets or a streamed huge one.

    Args:
        guide: the trained :class:`~amortize.guide.AmortizedGuide` (gives the structure and covariates).
        model: the user's model.
        data: a :class:`~amortize.HierarchicalData` (``y [N]`` or ``[B, N]``) or a list of single datasets.
        ranges: the training ranges (:mod:`amortize.ranges`) for the out-of-range flags.
        device: where the guide lives.
        seed: seeds this posterior's own stream of draws (``sample`` without a seed continues it);
            None: a stream derived from torch's global RNG state, which is read, never advanced.
        chunk_groups: stream one dataset in chunks of this many outermost groups.
        q_globals: the Gaussian of the globals fitted on this dataset by subsampled training (streams
            with its draws of the globals).

    Raises:
        DataError: an empty list, or a dataset whose levels, covariates or values do not fit the model
            (a list names the dataset's position).
    """

    def __init__(
        self,
        guide: Any,
        model: Callable,
        data: HierarchicalData | Sequence[HierarchicalData],
        ranges: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
        chunk_groups: int | None = None,
        q_globals: Any = None,
    ) -> None:
        self.guide, self.model = guide, model
        self.structure = guide.structure
        self.ranges = ranges or {}
        self.device = torch.device(device) if device is not None else next(guide.parameters()).device
        self.dtype = next(guide.parameters()).dtype
        covariates = guide.encoder.cov_names
        if seed is None:
            stream = torch.Generator()
            stream.set_state(torch.get_rng_state())  # a copy: the caller's generator does not move
            seed = int(torch.randint(2**62, (), generator=stream))
        self._stream = torch.Generator().manual_seed(int(seed))
        self.streamed: StreamedDataset | None = None
        self._by_group: StreamedDataset | None = None  # the dataset group by group, built once when asked
        complete = self.structure.complete  # a model with latents per row: the rows as its innermost level
        if isinstance(data, (list, tuple)):
            self.layout, data = "list", [complete(d) if isinstance(d, HierarchicalData) else d for d in data]
            self.datasets = check_list(data, self.structure, covariates, self.dtype)
            self.parts = []
            for members in group_by_structure(self.datasets):
                first = self.datasets[members[0]]
                y = torch.stack([self.datasets[i].y.to(device=first.y.device, dtype=self.dtype) for i in members])
                try:
                    check_data(first.with_response(y), self.structure, covariates, self.dtype)
                except DataError as e:
                    name_culprit(members, self.datasets, self.structure, covariates, self.dtype, e)
                self.parts.append((members, StructureBatch(guide, model, first.with_response(y), self.device)))
        else:
            if not isinstance(data, HierarchicalData):
                raise DataError(f"posterior: expected a HierarchicalData or a list of them, got {type(data).__name__}")
            self.layout = "single" if data.batch_size is None else "batch"
            data = complete(data)
            self.datasets, self.parts = [data], []
            if chunk_groups is not None or q_globals is not None:
                if data.batch_size is not None:
                    raise DataError("posterior: a streamed dataset is one dataset (y [N]), not a batch")
                streamed = StreamedDataset(guide, model, data, self.device, chunk_groups, q_globals, covariates)
                self._by_group = streamed
                if streamed.num_chunks > 1:  # else one chunk: drawn, weighed and checked whole
                    self.streamed = streamed
            else:
                check_data(data, self.structure, covariates, self.dtype)
            if self.streamed is None:
                members = list(range(data.batch_size or 1))  # the datasets of a [B, N] batch
                self.parts = [(members, StructureBatch(guide, model, data, self.device, q_globals))]

    def __repr__(self) -> str:
        what = {"single": "1 dataset", "batch": f"a batch of {self.batch_size}", "list": f"{len(self)} datasets"}
        return f"Posterior({what[self.layout]}{', streamed' if self.streamed else ''})"

    # ------------------------------------------------------------------ shape of the input
    @property
    def data(self) -> HierarchicalData:
        """The dataset (or batch) of a single-input posterior."""
        if self.layout == "list":
            raise DataError("posterior of a list: index it (post[i].data) for one dataset")
        return self.streamed.data if self.streamed else self.parts[0][1].data

    @property
    def batch_size(self) -> int | None:
        """B of a ``[B, N]`` batch; None for one dataset (and for a list)."""
        return self.parts[0][1].batch_size if self.layout == "batch" else None

    @property
    def batches(self) -> list[tuple[list[int], Posterior]]:
        """Per distinct structure of a list: the input positions and a posterior of their ``[B, N]`` batch."""
        return [(m, self._sibling(part.data)) for m, part in self.parts]

    @property
    def num_structures(self) -> int:
        """Distinct structures: the number of vectorized batches."""
        return len(self.parts)

    def __len__(self) -> int:
        return len(self.datasets) if self.layout == "list" else (self.batch_size or 1)

    def __getitem__(self, i: int) -> Posterior:
        """The posterior of dataset ``i`` of a list alone (same networks; its own stream of draws)."""
        if self.layout != "list" or not isinstance(i, int):
            raise TypeError("Posterior indices are integers into a list of datasets")
        return self._sibling(self.datasets[i])

    def _sibling(self, data: HierarchicalData) -> Posterior:
        return Posterior(self.guide, self.model, data, self.ranges, self.device, seed=self._next_seed())

    def _next_seed(self) -> int:
        return int(torch.randint(2**62, (), generator=self._stream))

    def _seeded(self, seed: int | None) -> Any:
        return seeded(self._next_seed() if seed is None else seed, self.device)

    def _arrange(self, per_part: list[dict[str, torch.Tensor]]) -> Any:
        """Per-structure draws ``{site: [n, B, ...]}`` in the layout of the input."""
        if self.layout == "batch":
            return per_part[0]
        if self.layout == "single":
            return {k: v[:, 0] for k, v in per_part[0].items()}
        out: list[Any] = [None] * len(self.datasets)
        for (members, _), draws in zip(self.parts, per_part):
            for j, i in enumerate(members):
                out[i] = {k: v[:, j] for k, v in draws.items()}
        return out

    # ------------------------------------------------------------------ draws
    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 1000,
        seed: int | None = None,
        correct: bool = False,
        oversample: int = 4,
        groups: Any = None,
    ) -> Any:
        """Joint posterior draws in the layout of the input (see the module docstring).

        Args:
            num_samples: draws per dataset.
            seed: seeds these draws only (the caller's RNG is left as it was); None continues this
                posterior's own stream.
            correct: the draws of :class:`~amortize.importance.ImportanceSampledPosterior` (PSIS
                resampling of ``oversample * num_samples`` proposals; :class:`CorrectedDraws`).
            oversample: proposals per returned draw with ``correct``.
            groups: one dataset only: the outermost groups to return (with their descendants), drawn
                chunk by chunk when streamed; a :class:`GroupDraws` whose ``index`` holds their original ids.
        """
        if correct:
            return corrected_sample(self, num_samples, seed, oversample)
        if groups is not None:
            self._one("sample(groups=)")
        with self._seeded(seed):
            if self.streamed is not None or groups is not None:
                return self._streamer().sample(int(num_samples), groups)
            return self._arrange([part.draws(int(num_samples))[0] for _, part in self.parts])

    def _streamer(self) -> StreamedDataset:
        """The dataset drawn group by group: the streamed one, or the whole dataset as one chunk."""
        if self._by_group is None:  # checked once, not per call
            q, covariates = self.parts[0][1].q_globals, self.guide.encoder.cov_names
            self._by_group = StreamedDataset(self.guide, self.model, self.data, self.device, None, q, covariates)
        return self._by_group

    @torch.no_grad()
    def moments(self, num_draws: int = 100, level: str | None = None, seed: int | None = None) -> dict[str, Moments]:
        """Posterior means and sds of every group latent of one dataset, ``{site: Moments(mean, sd)}``
        with ``[G_level, *event_shape]`` tensors: q's conditional moments given ``num_draws`` draws of
        the globals (law of total variance), streamed in chunks (one chunk unless streamed).

        Raises:
            DataError: a batch or a list; an unknown level or one without latent sites.
        """
        self._one("moments")
        with self._seeded(seed):
            return self._streamer().moments(int(num_draws), level)

    @torch.no_grad()
    def predictive(self, num_samples: int = 100, seed: int | None = None, draws: Any = None) -> Any:
        """Posterior predictive responses: the model run on each of ``num_samples`` joint draws (or on
        ``draws``, in the layout :meth:`sample` returns), ``[n, N]`` for one dataset, ``[n, B, N]`` for
        a batch, a list of ``[n, N_i]`` for a list. Checks on them: :mod:`amortize.predictive`."""
        if self.streamed is not None:
            raise DataError("predictive of a streamed dataset is not computed; draw chosen groups with sample(groups=)")
        given = None if draws is None else self._by_part(draws)
        with self._seeded(seed):
            ys = [
                part.predictive(part.draws(int(num_samples))[0] if given is None else given[i])
                for i, (_, part) in enumerate(self.parts)
            ]
        out = self._arrange([{"y": y} for y in ys])
        return [d["y"] for d in out] if self.layout == "list" else out["y"]

    def ppc(self, num_samples: int = 500, seed: int | None = None, statistics: Any = None) -> PPCResult:
        """Posterior predictive check of one dataset: p-values of test statistics of the data against
        ``num_samples`` replicated datasets (:func:`amortize.predictive.ppc`; default statistics per level)."""
        self._one("ppc")
        return ppc(self.data, self.predictive(num_samples, seed), statistics)

    def _by_part(self, values: Any) -> list[dict[str, torch.Tensor]]:
        """Draws in the layout of the input as ``{site: [n, B, ...]}`` per distinct structure."""
        if self.layout == "single":
            return [{k: v.unsqueeze(1) for k, v in values.items()}]
        if self.layout == "batch":
            return [dict(values)]
        if len(values) != len(self.datasets):
            raise DataError(f"{len(values)} sets of draws for {len(self.datasets)} datasets")
        return [
            {k: torch.stack([values[i][k] for i in members], 1) for k in values[members[0]]}
            for members, _ in self.parts
        ]

    def proposals(self, num_samples: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Per distinct structure: draws ``{site: [n, B, ...]}`` with their log importance weights
        ``log p(y, z) - log q(z | y)`` ``[n, B]``, on torch's RNG as it is (for importance sampling).

        Raises:
            DataError: a streamed dataset (its full-data log density is not computed).
        """
        if self.streamed is not None:
            raise DataError("importance weights need the whole dataset's log density; not computed when streamed")
        return [part.draws(int(num_samples), with_weights=True) for _, part in self.parts]  # type: ignore[misc]

    @torch.no_grad()
    def log_prob(self, values: Any) -> Any:
        """log q(values | data) for draws in the layout :meth:`sample` returns: ``[n]``, ``[n, B]``, or
        a list of ``[n]`` (the same n for every dataset)."""
        if self.streamed is not None:
            raise DataError("log_prob of a streamed dataset is not computed (it needs every group at once)")
        lps = [part.log_prob(v) for (_, part), v in zip(self.parts, self._by_part(values))]
        if self.layout == "single":
            return lps[0][:, 0]
        if self.layout == "batch":
            return lps[0]
        out: list[Any] = [None] * len(self.datasets)
        for (members, _), lp in zip(self.parts, lps):
            for j, i in enumerate(members):
                out[i] = lp[:, j]
        return out

    # ------------------------------------------------------------------ trust
    def range_flags(self) -> Any:
        """Ways in which the data lie outside what the amortizer was trained on (structure, response
        scale, covariate values): a list of messages, per dataset for a list."""
        if self.streamed is not None:
            return self.streamed.range_flags(self.ranges)
        if self.layout != "list":
            return self.parts[0][1].range_flags(self.ranges)
        out: list[list[str]] = [[] for _ in self.datasets]
        for members, part in self.parts:
            flags = part.range_flags(self.ranges)
            shared = [f for f in flags if not f.startswith("dataset ")]
            for j, i in enumerate(members):
                out[i] = shared + [f.split(": ", 1)[1] for f in flags if f.startswith(f"dataset {j}: ")]
        return out

    @torch.no_grad()
    def diagnostics(
        self,
        num_samples: int = 1000,
        seed: int | None = 0,
        repeats: int = 1,
        local_sbc: bool | LocalSBC = False,
        model_check: bool = True,
    ) -> Any:
        """Per-dataset trust from hierarchical importance weights (:mod:`amortize.verdict`): the globals'
        Pareto k (``pareto_k``, its ``ess``), per level the worst and p90 per-group k (``levels``),
        flags for data outside the training range, the
        posterior SBC conditional on the data (``local_sbc``: :mod:`amortize.local_sbc`), the model check
        (``model_check``: posterior predictive p-values below 0.001 or above 0.999,
        :func:`amortize.predictive.misfit`), ``ok`` (globals' k and every level's p90 k <= 0.7, the
        globals' ESS >= 50% of the draws and weighted mean shift (``shift``) <= 0.5 sd, the model check
        not failed, no flag; the local SBC is reported, not deciding; the joint k decides only crossed
        models and those without globals), ``correctable`` (the k's and flags alone: the corrected draws
        apply) and ``reason``. One dict (lists per dataset for a batch), or a list of dicts for a list.
        A dataset streamed in several chunks is not judged: its flags, k = NaN, ``ok`` None unless a flag
        makes it False (no weights); a subsampled fit's dataset gets no local SBC (a replicate needs a fit).

        ``num_samples // 4`` (at least 100) global draws with 4 draws of each outermost group (32 of every
        group given the first 25, for its k), per repeat; ``repeats`` independent sets give the globals'
        k spread (``pareto_k_sets``), the decision pools them. ``local_sbc``: True runs it (the defaults
        of :class:`~amortize.local_sbc.LocalSBC`: 200 replicates x 49 draws, family-wise level 0.01), a
        ``LocalSBC`` sizes it; off by default; ``model_check=False`` skips the model check. The verdict is
        reproducible for a given ``seed`` and leaves this posterior's stream alone;
        a posterior whose draws are not finite is not ok, with the site in the reason."""
        try:
            return verdict(self, num_samples, seed, repeats, local_sbc, model_check)
        except (ValueError, NonFiniteDrawsError) as e:  # q's parameters or draws beyond floating point
            why = bad_step_error(e) if isinstance(e, ValueError) else str(e).split(";")[0]
            if why is None:
                raise
            return unusable(self, why)

    # ------------------------------------------------------------------ exports
    def _one(self, what: str) -> None:
        if self.layout != "single":
            raise DataError(f"{what} takes one dataset; index the list (post[i]) or the batch first")

    def to_arviz(self, num_samples: int = 1000, seed: int | None = None, correct: bool = False, **kw: Any) -> Any:
        """A full ArviZ InferenceData (posterior, sample_stats with Pareto k and ``ok`` as attributes,
        observed_data, log_likelihood, posterior_predictive, constant_data); ``dims=``, ``coords=`` name
        event dims: :func:`amortize.export.inference_data`."""
        return inference_data(self, num_samples, seed, correct=correct, **kw)

    def summary(
        self,
        num_samples: int = 1000,
        seed: int | None = None,
        prob: float = 0.9,
        reference: Any = None,
        correct: bool = False,
    ) -> Any:
        """A pandas DataFrame in ``az.summary`` layout per site element (``theta[a]``): mean, sd, the central
        ``prob`` interval, mcse and ``ess`` from the importance ESS (a poor fit shows as a large mcse);
        ``reference`` draws (``{site: [S, ...]}`` or an InferenceData) add ``ref_mean``, ``ref_sd``, ``z``.
        Pareto k, ``ok`` and ``reason`` are in ``frame.attrs``; a batch or list gets a ``(dataset, row)`` index."""
        return summary(self, num_samples, seed, prob, reference, correct)

    def save(self, path: str | os.PathLike, num_samples: int = 1000, seed: int | None = None) -> None:
        """Write draws (in the layout of :meth:`sample`, on the CPU) and the range flags atomically to
        ``path`` (``torch.load`` reads it back: ``{"draws", "flags", "levels", "labels", "seed"}``).

        Raises:
            OSError: the write failed; an existing file at ``path`` is intact.
        """
        seed = self._next_seed() if seed is None else int(seed)
        draws = self.sample(num_samples, seed)
        cpu = (
            [{k: v.cpu() for k, v in d.items()} for d in draws]
            if isinstance(draws, list)
            else {k: v.cpu() for k, v in draws.items()}
        )
        labels = [dict(d.labels) for d in self.datasets]
        payload = {"draws": cpu, "flags": self.range_flags(), "levels": list(self.structure.levels), "labels": labels}
        payload["seed"] = seed
        atomic_write(path, lambda fh: torch.save(payload, fh))
