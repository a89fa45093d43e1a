"""Data sources of the one training loop (:func:`amortize.train.train`).

A source says where a step's data come from and what the step's loss is; the loop (schedule,
clipping, bad steps, checkpoints, resume, TensorBoard, signals) is the same for all:

* :class:`PriorPredictive` (default): each step draws one dataset structure from the amortizer's
  sampler and simulates ``batch_size`` datasets on it; the objective is ``cfg.objective``. Its pilot
  fits the input scalers and records the training ranges (:mod:`amortize.ranges`).
* :class:`Subsampled`: ONE large observed dataset, ``groups_per_step`` outermost groups per step, the
  scaled minibatch ELBO (:mod:`amortize.subsample`); q(globals) of the dataset is a full-rank
  Gaussian (:class:`~amortize.subsample.GlobalGaussian`) kept by the amortizer, saved and resumed
  with it; the group latents are the amortizer's own guide, fine-tuned on the dataset.

Example:
    >>> amortizer.fit(source=Subsampled(big, groups_per_step=1024), steps=1000)  # doctest: +SKIP
    >>> amortizer.posterior(big).sample(200)  # streamed in chunks of 1024 groups  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .batch import check_data
from .data import HierarchicalData
from .errors import DataError
from .layout import structure_counts
from .objectives import backward_in_chunks
from .ranges import record_ranges
from .simulate import Simulation, simulate_counted
from .structure import ModelStructure
from .subsample import GlobalGaussian, OuterGroupIndex, draw_groups, subsampled_elbo
from .train import TrainConfig, batch_loss, pilot_fit

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["PriorPredictive", "Subsampled", "dataset_key", "same_dataset"]


class PriorPredictive:
    """Simulated batches from the prior predictive (the default source)."""

    name = "prior_predictive"

    def setup(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> None:
        """The pilot on a fresh amortizer: input scalers, and the training ranges from the same simulations."""
        if amortizer.step == 0 and not amortizer.pilot_done:
            sims = pilot_fit(amortizer, cfg, gen)
            amortizer.ranges = record_ranges([s.data for s in sims], amortizer.sampler.ranges())
            amortizer.pilot_done = True

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def loss(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
        """``cfg.objective`` on ``cfg.batch_size`` datasets simulated on one structure from ``gen``."""
        return batch_loss(amortizer, cfg, amortizer.simulate_batch(gen, cfg.batch_size))

    def backward(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> float:
        """:meth:`loss` with its gradients accumulated in the guide, computed in pieces of the batch that
        stay near the cache (:func:`~amortize.objectives.backward_in_chunks`); returns the loss."""
        return backward_in_chunks(amortizer, cfg, amortizer.simulate_batch(gen, cfg.batch_size), batch_loss)

    def datasets_per_step(self, cfg: TrainConfig) -> int:
        return int(cfg.batch_size)


def dataset_key(data: HierarchicalData) -> list[Any]:
    """A cheap identity of one dataset (sizes, rows and the response's sum): what a subsampled fit was on."""
    y = 0.0 if data.y is None else float(data.y.double().sum())
    return [list(data.levels), [data.size(lvl) for lvl in data.levels], int(data.n_obs), y]


def same_dataset(record: dict[str, Any] | None, data: HierarchicalData, what: str) -> list[Any]:
    """``data``'s :func:`dataset_key`, after checking that a one-dataset fit's ``record`` (None: none
    yet) was on the same dataset.

    Raises:
        DataError: it was on another; ``what`` says how (``"Subsampled: ... was fitted on"``).
    """
    key = dataset_key(data)
    if record is not None and record.get("data") != key:
        raise DataError(
            f"{what} another dataset (sizes {record['data'][:3]}, this one {key[:3]}); build a new amortizer for it"
        )
    return key


class _SubsetSimulator:
    """What :func:`~amortize.train.pilot_fit` needs of an amortizer (``guide``, ``structure``,
    ``simulate_batch``), simulating on subsets (``size`` outermost groups) of the large dataset."""

    def __init__(self, amortizer: Amortizer, index: OuterGroupIndex, size: int) -> None:
        self.model, self.guide, self.structure = amortizer.model, amortizer.guide, amortizer.structure
        self.index, self.size, self.device = index, size, amortizer.device
        self.drops = amortizer.drops

    def simulate_batch(self, gen: torch.Generator, num_datasets: int) -> Simulation:
        sub, _ = self.index.restrict(draw_groups(self.index.num_groups, self.size, gen))
        return simulate_counted(
            self.model, self.structure, sub.with_response(None).to(self.device), num_datasets, self.drops
        )


class Subsampled:
    """ONE large observed dataset, ``groups_per_step`` of its outermost groups per training step.

    The loop's ``batch_size`` and ``pilot_structures`` size the pilot (when the amortizer was never
    trained) on prior simulations on random subsets of the dataset's structure; ``num_particles``
    draws per step estimate the ELBO (``objective`` is not read: the loss is the scaled minibatch
    ELBO). An amortizer trained on simulations is fine-tuned as a new run: its step count and Adam
    restart at 0 (its pilot and training ranges are kept). The subsets are random reshuffling
    epochs whose permutations are seeded by ``(amortizer.seed, epoch)``, so a resumed run sees the
    subsets of an uninterrupted one.

    Args:
        data: one dataset (``y [N]``) with the model's levels and covariates; it stays where it is
            (usually CPU memory) and each minibatch moves to the amortizer's device.
        groups_per_step: outermost groups per step (b); all of them when larger than G. Default 1024,
            and for a crossed dataset (whose rows no subset of one factor's groups holds alone) all of
            them: the ELBO of the whole dataset, q(globals) still its own Gaussian.
        lr_scale: q(globals)'s learning rate as a multiple of the networks'. Adam moves a parameter by
            about the learning rate per step, and this Gaussian's log scales start at the amortized
            head's width and must reach the posterior's, often 10-100x narrower on a large dataset (on
            the 70,000-row crossed design at 1x, 2000 steps left the globals' sds 5-9x too wide).

    A model with latents per row trains the same way (each subset carries its rows as a level); the
    ELBO is then mean-field between a row's effect and its group's (q(e | a) does not read the drawn
    a), so the groups' sds can come out narrow: trust the verdict, not the fit.

    Raises:
        DataError: ``data`` holds a batch, has no response, or does not fit the model; fewer than all
            groups of a crossed dataset.
    """

    name = "subsampled"

    def __init__(self, data: HierarchicalData, groups_per_step: int | None = None, lr_scale: float = 10.0) -> None:
        if not isinstance(data, HierarchicalData):
            raise DataError(f"Subsampled: expected a HierarchicalData, got {type(data).__name__}")
        if data.y is None or data.y.dim() != 1:
            shape = None if data.y is None else tuple(data.y.shape)
            raise DataError(f"Subsampled: expected one dataset with a response y [N], got {shape}")
        self.index = OuterGroupIndex(data)
        self.data = self.index.data
        self.num_groups = self.index.num_groups
        if groups_per_step is None:
            groups_per_step = self.num_groups if self.index.crossed else 1024
        if int(groups_per_step) < 1:
            raise DataError(f"Subsampled: groups_per_step must be >= 1, got {groups_per_step}")
        if self.index.crossed and int(groups_per_step) < self.num_groups:
            raise DataError(
                f"Subsampled: factors {[list(c) for c in data.factors]} are crossed, so the dataset trains whole:"
                f" groups_per_step must be at least its {self.num_groups} '{self.index.top}' groups (or left out),"
                f" got {groups_per_step}"
            )
        self.groups_per_step = min(int(groups_per_step), self.num_groups)
        if not float(lr_scale) > 0:
            raise DataError(f"Subsampled: lr_scale must be > 0, got {lr_scale}")
        self.lr_scale = float(lr_scale)

    def setup(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> None:
        """Check the data, run the pilot on subsets when needed, and give the amortizer its q(globals)."""
        if amortizer.structure.row_level is not None:  # latents per row: every subset carries its rows as a level
            self.index = OuterGroupIndex(amortizer.structure.complete(self.data))
        dtype = next(amortizer.guide.parameters()).dtype
        probe = self.index.probe(min(self.groups_per_step, 4))
        check_data(probe, amortizer.structure, amortizer.guide.encoder.cov_names, dtype)
        fitted = amortizer.subsampled
        key = same_dataset(fitted, self.data, "Subsampled: this amortizer was fitted on")
        if fitted is None and amortizer.step > 0:  # trained on simulations: fine-tuning is a new run
            amortizer.step, amortizer.optimizer, amortizer._optimizer_state = 0, None, None
        if not amortizer.pilot_done:
            sims = pilot_fit(_SubsetSimulator(amortizer, self.index, self.groups_per_step), cfg, gen)  # type: ignore[arg-type]
            structure = {**structure_counts(self.data), self.index.top: [self.groups_per_step] * 2}  # chunks of b
            amortizer.ranges = record_ranges([s.data for s in sims], structure)
            amortizer.pilot_done = True
        if amortizer.q_globals is None and amortizer.structure.global_dim:
            amortizer.q_globals = _init_globals(amortizer, self.index, self.groups_per_step, gen)
        amortizer.subsampled = {"data": key, "groups_per_step": self.groups_per_step}
        self._n_coords = amortizer.structure.global_dim + sum(
            s.dim * self.data.size(s.level) for s in amortizer.structure.latents if s.level
        )
        self._q = amortizer.q_globals

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self._q is None else list(self._q.parameters())

    def groups_at(self, seed: int, step: int) -> torch.Tensor:
        """The outermost groups of training step ``step``: chunk ``step % n`` of epoch ``step // n``."""
        G, b = self.num_groups, self.groups_per_step
        n = max(1, round(G / b))
        epoch, c = divmod(int(step), n)
        state = np.random.SeedSequence([int(seed), 7, epoch]).generate_state(1, dtype=np.uint64)[0]
        perm = torch.randperm(G, generator=torch.Generator().manual_seed(int(state) >> 1))
        bounds = torch.linspace(0, G, n + 1).round().long().tolist()
        return perm[bounds[c] : bounds[c + 1]]

    def loss(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
        """The negative scaled minibatch ELBO of this step's subset, per latent coordinate."""
        groups = self.groups_at(amortizer.seed, amortizer.step)
        sub, _ = self.index.restrict(groups)
        sub = sub.to(amortizer.device, next(amortizer.guide.parameters()).dtype)
        elbo = subsampled_elbo(amortizer.guide, self._q, sub, self.num_groups / len(groups), cfg.num_particles)
        return -elbo.mean() / self._n_coords

    def datasets_per_step(self, cfg: TrainConfig) -> int:
        return 1


@torch.no_grad()
def _init_globals(amortizer: Amortizer, index: OuterGroupIndex, b: int, gen: torch.Generator) -> GlobalGaussian:
    """q(globals) starts at the guide's global head on one minibatch: its mean, and its covariance
    shrunk by b / G (a posterior on b of G exchangeable groups is about G / b times wider in variance)."""
    structure: ModelStructure = amortizer.structure
    guide, device = amortizer.guide, amortizer.device
    dtype = next(guide.parameters()).dtype
    D = structure.global_dim
    sub, _ = index.restrict(draw_groups(index.num_groups, b, gen))
    u = guide.encode(sub.to(device, dtype))["q_globals"].sample((512,)).reshape(512, D)
    u = u[torch.isfinite(u).all(-1)]
    if len(u) < 2 * D + 2:
        loc, cov = torch.zeros(D, dtype=dtype, device=device), torch.eye(D, dtype=dtype, device=device)
    else:
        loc, cov = u.mean(0), torch.cov(u.T).reshape(D, D)
    cov = cov * (b / index.num_groups) + 1e-8 * torch.eye(D, dtype=dtype, device=device)
    return GlobalGaussian(structure, loc, torch.linalg.cholesky(cov)).to(device=device, dtype=dtype)
