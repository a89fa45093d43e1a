"""Training on ONE large observed dataset by subsampling its outermost groups.

A dataset with 10^6 groups does not fit one pass of the guide, and it need not: each step of
:func:`fit_subsampled` takes b = ``groups_per_step`` of the G outermost groups (with all their
descendants and observations, :meth:`OuterGroupIndex.restrict`) and maximizes the minibatch ELBO

    log p(globals) - log q(globals) + (G / b) * sum over the b subtrees of
    [log p(group latents, observations | parents) - log q(group latents | ...)]

an unbiased estimate of the full-data ELBO whenever the b groups are a uniform random subset: every
subtree enters the sum with probability b / G. The subsets are the chunks of a fresh random
permutation per epoch (:func:`epochs`, random reshuffling: each chunk is marginally uniform, and
each epoch sees every group once). The factor G / b is put on every model and guide site inside a
model plate (the level plates and the observation plate) by :class:`ScaleGroups`, a Pyro messenger,
so the library's own :func:`~amortize.objectives.log_weights` computes the estimate.

What is learned:

* q(globals): a full-rank Gaussian on the joint unconstrained global vector, fitted directly for
  this one dataset (:class:`GlobalGaussian`; no dataset encoder is needed for one dataset);
* q(group latents | parents): the amortizer's own per-group machinery, its encoder's group
  embeddings and ``GroupHead`` data terms multiplied with the model's conditional prior, fine-tuned on
  the dataset. A copy of the amortizer's guide is trained; the amortizer itself is left as it was.

The guide sees one minibatch at a time, so memory is bounded by the minibatch (plus the dataset
and its group index). Its dataset-level inputs (the dataset embedding the group heads read) come
from the minibatch; the posterior is therefore computed on subsets of the same size as in training
(:meth:`LargePosterior.group_posterior` streams over all groups in random chunks of
``groups_per_step`` outermost groups; :meth:`LargePosterior.sample` pads a few chosen groups with
random companions).

Example:
    >>> from amortize.subsample import fit_subsampled
    >>> amortizer = am.Amortizer(model, sampler)  # doctest: +SKIP
    >>> post = fit_subsampled(amortizer, big_data, steps=1000, groups_per_step=1024)  # doctest: +SKIP
    >>> post.sample_globals(1000)  # {"mu": [1000], ...}  # doctest: +SKIP
    >>> post.group_posterior("group")["theta"].mean  # [G] posterior means of every group  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from tqdm.auto import tqdm

from .data import OBS, HierarchicalData
from .errors import DataError, TrainingError
from .objectives import log_weights
from .posterior import Posterior
from .simulate import Simulation, simulate
from .structure import DATASETS, DRAWS, ModelStructure, drawing_data
from .train import TrainConfig, lr_factor, pilot_fit

if TYPE_CHECKING:
    from .amortizer import Amortizer
    from .guide import AmortizedGuide

__all__ = [
    "OuterGroupIndex",
    "restrict_groups",
    "epochs",
    "draw_groups",
    "encode",
    "ScaleGroups",
    "GlobalGaussian",
    "subsampled_elbo",
    "fit_subsampled",
    "LargePosterior",
    "Moments",
    "GroupDraws",
]

log = logging.getLogger(__name__)
_MAX_BAD_STEPS = 20


# ---------------------------------------------------------------------------------- subsetting
class OuterGroupIndex:
    """Restrict a dataset to a subset of its outermost groups in time linear in the subset.

    Built once per dataset (one stable argsort per inner level and for the observations, skipped
    when the rows are already ordered by outermost group): for every unit of an inner level and
    every observation, the outermost group it belongs to, as contiguous ranges. A restriction then
    gathers those ranges with index operations only.

    Args:
        data: one dataset (``y [N]`` or no response) or a batch sharing one structure; it is kept in
            CPU memory (a copy is made of a dataset on another device), restrictions move to a device.
    """

    def __init__(self, data: HierarchicalData) -> None:
        if data.group.device.type != "cpu":
            data = data.to("cpu")
        self.data = data
        self.top = data.levels[0]
        self.num_groups = data.size(self.top)
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
            DataError: no ids, ids that are not integers, or an id that is not an outermost group.
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
        return g

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
            DataError: no groups, or an id that is not a group of the outermost level.
        """
        d = self.data
        g = self.check(groups)
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
    are left as they are. Applied around :func:`~amortize.objectives.log_weights`, it scales the model's
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


def encode(guide: AmortizedGuide, q: GlobalGaussian | None, data: HierarchicalData) -> dict[str, Any]:
    """:meth:`AmortizedGuide.encode` of ``data`` with q(globals) replaced by ``q``: a guide call given
    it draws the globals from ``q`` and the group sites as always (the model's conditional prior
    times the group heads' data terms of ``data``'s groups)."""
    encoded = guide.encode(data)
    if q is not None:
        encoded["q_globals"] = q.distribution(1 + guide.structure.max_plate_nesting)  # batch [B=1, 1..]
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


# ---------------------------------------------------------------------------------- training
class _SubsetSimulator:
    """What :func:`amortize.train.pilot_fit` needs of an amortizer (``guide``, ``structure``,
    ``simulate_batch``), simulating from the prior predictive on subsets of the large dataset's own
    structure (``size`` outermost groups each)."""

    def __init__(
        self,
        model: Callable,
        guide: AmortizedGuide,
        structure: ModelStructure,
        index: OuterGroupIndex,
        size: int,
        device: torch.device,
    ) -> None:
        self.model, self.guide, self.structure = model, guide, structure
        self.index, self.size, self.device = index, size, device

    def simulate_batch(self, gen: torch.Generator, num_datasets: int) -> Simulation:
        sub, _ = self.index.restrict(draw_groups(self.index.num_groups, self.size, gen))
        return simulate(self.model, self.structure, sub.with_response(None).to(self.device), num_datasets)


def fit_subsampled(
    amortizer: Amortizer,
    data: HierarchicalData,
    steps: int = 1000,
    groups_per_step: int = 1024,
    num_particles: int = 4,
    lr: float = 5e-3,
    seed: int = 0,
    warmup: int = 50,
    lr_final_ratio: float = 0.01,
    clip_norm: float = 5.0,
    pilot_datasets: int = 32,
    pilot_structures: int = 8,
    log_every: int = 25,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> LargePosterior:
    """Fit the posterior of ONE large dataset by subsampling its outermost groups.

    Args:
        amortizer: gives the model, its structure and the per-group machinery (encoder and group
            heads), trained on simulations or not; its guide is copied, never changed.
        data: one dataset (``y [N]``) with the model's levels and covariates; it stays where it is
            (usually CPU memory) and each minibatch moves to ``amortizer.device``.
        steps: optimization steps (Adam, linear warm-up over ``warmup`` steps, cosine annealing to
            ``lr * lr_final_ratio``: the library's schedule).
        groups_per_step: outermost groups per minibatch (b); all of them when larger than G.
        num_particles: reparameterized joint draws per step.
        lr: peak learning rate.
        seed: seeds the subsets, the draws and the pilot simulations (the caller's RNG is untouched).
        clip_norm: gradient norm clipping.
        pilot_datasets, pilot_structures: when the amortizer was never trained (its input scalers
            and skip paths unfitted), they are fitted first by :func:`amortize.train.pilot_fit` on
            ``pilot_structures`` x ``pilot_datasets`` prior-predictive datasets simulated on random
            subsets (b outermost groups) of ``data``'s structure.
        log_every: steps between records of the running loss in ``LargePosterior.history``.
        progress: show a progress bar.
        callback: ``callback(step, loss)`` after every applied step.

    Returns:
        A :class:`LargePosterior`.

    Raises:
        DataError: ``data`` does not fit the model (levels, covariates, response), or holds a batch.
        TrainingError: 20 consecutive steps with a non-finite loss or gradient.
    """
    if not isinstance(data, HierarchicalData):
        raise DataError(f"fit_subsampled: expected a HierarchicalData, got {type(data).__name__}")
    if data.y is None or data.y.dim() != 1:
        shape = None if data.y is None else tuple(data.y.shape)
        raise DataError(f"fit_subsampled: expected one dataset with a response y [N], got {shape}")
    if int(steps) < 1 or int(groups_per_step) < 1 or int(num_particles) < 1:
        raise DataError(
            f"fit_subsampled: steps, groups_per_step and num_particles must be >= 1"
            f" (got {steps}, {groups_per_step}, {num_particles})"
        )
    index = OuterGroupIndex(data)
    G = index.num_groups
    b = min(int(groups_per_step), G)
    Posterior(amortizer, index.restrict(torch.arange(min(b, 4)))[0])  # levels, covariates, values: DataError
    guide: AmortizedGuide = copy.deepcopy(amortizer.guide)
    structure = amortizer.structure
    device = amortizer.device
    dtype = next(guide.parameters()).dtype
    gen = torch.Generator().manual_seed(int(seed))
    cfg = TrainConfig(
        steps=int(steps),
        lr=float(lr),
        warmup=int(warmup),
        lr_final_ratio=float(lr_final_ratio),
        clip_norm=float(clip_norm),
        num_particles=int(num_particles),
        batch_size=int(pilot_datasets),
        pilot_structures=int(pilot_structures),
        objective="elbo",
    )
    history: list[dict[str, float]] = []
    with _seeded(int(seed), device):
        if not amortizer.pilot_done:
            source = _SubsetSimulator(amortizer.model, guide, structure, index, b, device)
            pilot_fit(source, cfg, gen)  # type: ignore[arg-type]
        q = _init_globals(guide, structure, index, b, gen, device, dtype)
        params = list(guide.encoder.parameters()) + list(guide.group_heads.parameters())
        params += list(q.parameters()) if q is not None else []
        opt = torch.optim.Adam(params, lr=cfg.lr)
        n_coords = structure.global_dim + sum(s.dim * data.size(s.level) for s in structure.latents if s.level)
        guide.train()
        bad, running, t0 = 0, None, time.perf_counter()
        batches = epochs(G, b, gen)
        bar = tqdm(range(cfg.steps), disable=not progress, desc="train (subsampled elbo)", leave=False)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            groups = next(batches)
            sub, _ = index.restrict(groups)
            sub = sub.to(device, dtype)
            loss = -subsampled_elbo(guide, q, sub, G / len(groups), cfg.num_particles).mean() / n_coords
            value = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            gnorm = torch.tensor(float("nan"))
            if math.isfinite(value):
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            if not bool(torch.isfinite(gnorm)):
                bad += 1
                log.warning("step %d: non-finite loss or gradient (%s); step skipped (%d in a row)", step, value, bad)
                if bad >= _MAX_BAD_STEPS:
                    raise TrainingError(f"fit_subsampled stopped at step {step}: {bad} consecutive non-finite steps")
                continue
            bad = 0
            opt.step()
            running = value if running is None else 0.95 * running + 0.05 * value
            if callback:
                callback(step, value)
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                history.append({"step": step + 1, "loss": running, "seconds": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{running:.4f}")
    guide.eval()
    return LargePosterior(guide, q, structure, data, index, b, device, history)


@torch.no_grad()
def _init_globals(
    guide: AmortizedGuide,
    structure: ModelStructure,
    index: OuterGroupIndex,
    b: int,
    gen: torch.Generator,
    device: Any,
    dtype: torch.dtype,
) -> GlobalGaussian | None:
    """q(globals) starts at the guide's global head on one minibatch: its mean, and its covariance
    shrunk by b / G (a posterior on b of G exchangeable groups is about G / b times wider in variance)."""
    D = structure.global_dim
    if not D:
        return None
    sub, _ = index.restrict(draw_groups(index.num_groups, b, gen))
    u = guide.encode(sub.to(device, dtype))["q_globals"].sample((512,)).reshape(512, D)
    u = u[torch.isfinite(u).all(-1)]
    if len(u) < 2 * D + 2:
        loc, cov = torch.zeros(D, dtype=dtype, device=device), torch.eye(D, dtype=dtype, device=device)
    else:
        loc, cov = u.mean(0), torch.cov(u.T).reshape(D, D)
    cov = cov * (b / index.num_groups) + 1e-8 * torch.eye(D, dtype=dtype, device=device)
    L = torch.linalg.cholesky(cov)
    return GlobalGaussian(structure, loc, L).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------- the result
class Moments(NamedTuple):
    """Posterior means and sds of one group site: ``[G_level, *event_shape]`` each."""

    mean: torch.Tensor
    sd: torch.Tensor


class GroupDraws(dict):
    """``{site: draws}`` from :meth:`LargePosterior.sample`: globals ``[n, *event]``, group sites
    ``[n, G_sel, *event]`` for the selected outermost groups and their descendants.

    Attributes:
        index: ``{level: original ids}`` of the groups along each group site's second dim.
    """

    index: dict[str, torch.Tensor]


class LargePosterior:
    """The posterior of one large dataset fitted by :func:`fit_subsampled`.

    Attributes:
        guide: the fine-tuned copy of the amortizer's guide (group latents).
        q_globals: the :class:`GlobalGaussian` of the globals (None for a model without globals).
        structure: the model's structure.
        data: the dataset.
        index: its :class:`OuterGroupIndex`.
        groups_per_step: the training subset size, also the size of the subsets the posterior is
            computed on (the group heads read the subset's dataset embedding).
        history: ``[{"step", "loss", "seconds"}]`` of training (loss: negative ELBO per coordinate).
    """

    def __init__(
        self,
        guide: AmortizedGuide,
        q_globals: GlobalGaussian | None,
        structure: ModelStructure,
        data: HierarchicalData,
        index: OuterGroupIndex,
        groups_per_step: int,
        device: torch.device,
        history: list[dict[str, float]],
    ) -> None:
        self.guide = guide
        self.q_globals = q_globals
        self.structure = structure
        self.data = data
        self.index = index
        self.groups_per_step = groups_per_step
        self.device = device
        self.dtype = next(guide.parameters()).dtype
        self.history = history

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lvl}={n}" for lvl, n in self.data.sizes.items())
        return f"LargePosterior({sizes}, obs={self.data.n_obs}; {self.groups_per_step} outermost groups per subset)"

    def _subset(self, groups: Any) -> tuple[HierarchicalData, dict[str, torch.Tensor]]:
        sub, kept = self.index.restrict(groups)
        return sub.to(self.device, self.dtype), kept

    # ------------------------------------------------------------------ globals
    @torch.no_grad()
    def sample_globals(self, num_samples: int = 1000, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Draws of the global latents: ``{site: [num_samples, *event_shape]}`` (empty without globals)."""
        if self.q_globals is None:
            return {}
        with _seeded(seed, self.device):
            u = self.q_globals.distribution().sample((int(num_samples),))
        return self.q_globals.constrain(u)

    # ------------------------------------------------------------------ objective
    def elbo(self, groups: Any = None, num_particles: int = 16) -> torch.Tensor:
        """The ELBO estimate ``[num_particles]`` of the whole dataset, from the subset of outermost
        ``groups`` scaled by G / len(groups) (unbiased over uniformly drawn subsets), or from all
        groups at once when ``groups`` is None. Differentiable in the guide's parameters."""
        G = self.index.num_groups
        sub, _ = self._subset(torch.arange(G) if groups is None else self.index.check(groups))
        return subsampled_elbo(self.guide, self.q_globals, sub, G / sub.size(self.index.top), num_particles)

    # ------------------------------------------------------------------ draws
    @torch.no_grad()
    def _skeleton(self, sub: HierarchicalData) -> HierarchicalData:
        """What the model runs on while drawing (:func:`~amortize.structure.drawing_data`)."""
        return drawing_data(self.guide.model, sub)

    def sample(self, num_samples: int, groups: Any, seed: int | None = None) -> GroupDraws:
        """Joint draws of the globals and of chosen outermost ``groups`` with their descendants.

        The chosen groups are run together with random companions up to ``groups_per_step``
        outermost groups (the subset size the guide was trained on); only the chosen ones come back.

        Returns:
            A :class:`GroupDraws`: ``{site: [num_samples, ...]}`` with ``.index``, the original ids
            of the returned groups per level.

        Raises:
            DataError: an id that is not an outermost group.
        """
        chosen = self.index.check(groups)
        with _seeded(seed, self.device):
            G, k = self.index.num_groups, len(chosen)
            pad = torch.zeros(0, dtype=torch.long)
            if k < self.groups_per_step:
                others = torch.ones(G, dtype=torch.bool)
                others[chosen] = False
                rest = torch.nonzero(others).squeeze(-1)
                pad = rest[torch.randperm(len(rest))[: self.groups_per_step - k]]
            sub, kept = self._subset(torch.cat([chosen, pad]))
            with pyro.validation_enabled(False):
                values = self.guide(
                    sub,
                    int(num_samples),
                    encoded=encode(self.guide, self.q_globals, sub),
                    model_data=self._skeleton(sub),
                    latents_only=True,
                )
        keep = _selected(sub, kept, chosen)
        out = GroupDraws()
        for s in self.structure.latents:
            v = self.structure.to_user(s, values[s.name])[:, 0]  # [n, *site_shape]
            out[s.name] = v if s.level is None else v[:, keep[s.level].to(v.device)]
        out.index = {lvl: kept[lvl][keep[lvl]] for lvl in sub.levels}
        return out

    @torch.no_grad()
    def group_posterior(
        self,
        level: str | None = None,
        chunk_size: int | None = None,
        num_draws: int = 100,
        seed: int | None = 0,
        progress: bool = False,
    ) -> dict[str, Moments]:
        """Posterior means and sds of the group latents of every group, streamed in chunks.

        The outermost groups are split, in a random order, into chunks of about ``chunk_size``
        (default: ``groups_per_step``, the subset size of training). Per chunk, ``num_draws`` draws
        of the globals (and of parent levels) are made, then each group's conditional q given them;
        means and variances combine the conditional moments over the draws (law of total
        variance) when q's conditional is Gaussian on the site's own scale, and use the group
        draws themselves otherwise. Memory is bounded by one chunk.

        Args:
            level: the level whose sites are summarized; None: every group site.
            chunk_size: outermost groups per chunk.
            num_draws: draws of the globals (and parents) per chunk.
            seed: seeds the chunking and draws (None: the caller's RNG).
            progress: show a progress bar.

        Returns:
            ``{site: Moments(mean, sd)}`` with ``[G_level, *event_shape]`` tensors (CPU).

        Raises:
            DataError: ``level`` is not a level of the data, or has no latent sites.
        """
        st = self.structure
        if level is not None and level not in self.data.levels:
            raise DataError(f"group_posterior: unknown level '{level}'; levels are {list(self.data.levels)}")
        sites = [s for s in st.latents if s.level is not None and (level is None or s.level == level)]
        if not sites:
            raise DataError(
                f"group_posterior: no latent sites at level '{level}' (sites: {[s.name for s in st.latents]})"
            )
        G = self.index.num_groups
        chunk = max(1, min(G, int(chunk_size or self.groups_per_step)))
        n_chunks = max(1, round(G / chunk))
        if num_draws < 2:
            raise DataError(f"group_posterior: num_draws must be >= 2, got {num_draws}")
        mean = {s.name: torch.zeros(self.data.size(s.level), *s.event_shape, dtype=self.dtype) for s in sites}
        var = {s.name: torch.zeros_like(mean[s.name]) for s in sites}
        with _seeded(seed, self.device):
            order = torch.randperm(G)
            bounds = torch.linspace(0, G, n_chunks + 1).round().long().tolist()
            bar = tqdm(range(n_chunks), disable=not progress, desc="group posterior", leave=False)
            for c in bar:
                sub, kept = self._subset(order[bounds[c] : bounds[c + 1]])
                with pyro.validation_enabled(False):
                    values = self.guide(
                        sub,
                        int(num_draws),
                        encoded=encode(self.guide, self.q_globals, sub),
                        model_data=self._skeleton(sub),
                    )
                    _, guide_trace = self.guide.get_traces()
                for s in sites:
                    m, v = _moments(st, s, guide_trace.nodes[s.name]["fn"], values[s.name])
                    mean[s.name][kept[s.level]] = m.cpu()
                    var[s.name][kept[s.level]] = v.cpu()
        return {k: Moments(mean[k], var[k].clamp_min(0).sqrt()) for k in mean}


def _moments(st: ModelStructure, site: Any, q: Any, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _selected(sub: HierarchicalData, kept: dict[str, torch.Tensor], chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per level, the positions in ``sub`` of the chosen outermost groups and their descendants."""
    top = sub.levels[0]
    mask = torch.isin(kept[top], chosen)
    out = {top: torch.nonzero(mask).squeeze(-1)}
    for lvl in sub.levels[1:]:
        mask = mask[sub.parent_index(lvl)]
        out[lvl] = torch.nonzero(mask).squeeze(-1)
    return out


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for this block only (nothing when ``seed`` is None)."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield
