"""Training objectives: log importance weights through Pyro's own densities, and the per-coordinate losses.

One guide call gives both traces (the guide is a :class:`~pyro.poutine.guide.GuideMessenger`: it runs
the model). Their densities come from :meth:`pyro.poutine.Trace.compute_log_prob`, which applies
``scale_and_mask``: a ``poutine.mask`` or ``poutine.scale`` in the model (or
:class:`~amortize.subsample.ScaleGroups` around the call) weighs every term exactly as in
:class:`pyro.infer.Trace_ELBO`.

* ``"npe"``: forward KL, ``-log q(z_true | y)`` for the simulated truth;
* ``"elbo"``: the reverse-KL evidence lower bound, ``E_q[log p(y, z) - log q(z | y)]``;
* ``"iwae"``: the importance-weighted bound, ``E[log mean_s p(y, z_s) / q(z_s | y)]``.

Losses are per latent coordinate, so that datasets of different sizes weigh alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from pyro.poutine import Trace

from .data import HierarchicalData
from .errors import ConfigError
from .guide import AmortizedGuide
from .simulate import Simulation

__all__ = [
    "OBJECTIVES",
    "TRAIN_CHUNK_ELEMENTS",
    "log_weights",
    "sum_per_draw",
    "batch_loss",
    "backward_in_chunks",
    "chunk_datasets",
]

OBJECTIVES = ("npe", "elbo", "iwae")

TRAIN_CHUNK_ELEMENTS = 2.5e5  # datasets x (rows + groups) per forward and backward pass of a training step: the
# activations of a pass stay near the cache (a 2-level Gaussian of 10^4 groups x 5 rows: 4 datasets a pass
# 0.10 s per dataset, 64 at once 0.24 s per dataset)


class _HasGuide(Protocol):
    guide: AmortizedGuide


class _ObjectiveSettings(Protocol):
    objective: str
    num_particles: int


def sum_per_draw(trace: Trace, num_draws: int, num_datasets: int) -> torch.Tensor:
    """The trace's log density per draw and dataset ``[S, B]``: Pyro's ``compute_log_prob`` (scales
    and masks applied) summed over every dim right of amortize's two outer plates."""
    trace.compute_log_prob()
    total: torch.Tensor | None = None
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        lp = torch.as_tensor(site["log_prob"])
        if lp.dim() > 2:
            lp = lp.sum(tuple(range(2, lp.dim())))  # [S, B, *plates] -> [S, B]
        while lp.dim() < 2:
            lp = lp.unsqueeze(0)
        total = lp if total is None else total + lp
    if total is None:
        return torch.zeros(num_draws, num_datasets)
    return total.expand(num_draws, num_datasets)


def log_weights(
    guide: AmortizedGuide,
    data: HierarchicalData,
    num_draws: int = 1,
    truth: dict[str, torch.Tensor] | None = None,
    encoded: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(log p(y, z), log q(z | y), z)`` per draw and dataset, ``[S, B]`` each, from one guide call.

    Args:
        guide: the amortized guide.
        data: one or B datasets sharing one structure.
        num_draws: S draws per dataset.
        truth: values to score instead of drawing (batched layout); log p is then not computed and
            returned as zeros (the NPE objective needs log q alone).
        encoded: :meth:`AmortizedGuide.encode` of ``data``, computed once for several calls.

    Returns:
        log p, log q and every sample site's value (latents and the response).
    """
    values = guide(data, num_draws, truth, encoded)
    model_trace, guide_trace = guide.get_traces()
    S, B = int(num_draws), data.batch_size or 1
    log_q = sum_per_draw(guide_trace, S, B)
    if truth is not None:
        return torch.zeros_like(log_q), log_q, values
    return sum_per_draw(model_trace, S, B), log_q, values


def batch_loss(amortizer: _HasGuide, cfg: _ObjectiveSettings, sim: Simulation) -> torch.Tensor:
    """The objective ``cfg.objective`` on one batch of simulated datasets, per latent coordinate.

    Raises:
        ConfigError: an objective that is not one of :data:`OBJECTIVES`.
    """
    guide = amortizer.guide
    structure = guide.structure
    n_coords = structure.global_dim + sum(s.dim * sim.data.size(s.level) for s in structure.latents if s.level)
    if cfg.objective == "npe":
        _, log_q, _ = log_weights(guide, sim.data, 1, truth=sim.latents)
        return -log_q.mean() / n_coords
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective: '{cfg.objective}' is not one of {OBJECTIVES}")
    log_p, log_q, _ = log_weights(guide, sim.data, cfg.num_particles)
    lw = log_p - log_q  # [S, B]
    if cfg.objective == "elbo":
        return -lw.mean() / n_coords
    return -(torch.logsumexp(lw, 0) - math.log(cfg.num_particles)).mean() / n_coords


def chunk_datasets(data: HierarchicalData, num_particles: int = 1) -> int:
    """How many datasets of ``data``'s structure one pass of a training step takes (:data:`TRAIN_CHUNK_ELEMENTS`)."""
    width = max(1, int(num_particles)) * (data.n_obs + sum(data.sizes.values()))
    return max(1, int(TRAIN_CHUNK_ELEMENTS // width))


def backward_in_chunks(
    amortizer: _HasGuide,
    cfg: _ObjectiveSettings,
    sim: Simulation,
    loss_fn: Callable[[Any, Any, Simulation], torch.Tensor] = batch_loss,
) -> float:
    """The loss of one batch, its gradients accumulated in the guide's parameters, computed in pieces of
    :func:`chunk_datasets` datasets: the same value and gradients as ``loss_fn`` (:func:`batch_loss`) on
    the whole batch followed by ``backward``, to float rounding, since each dataset's loss depends on that
    dataset alone and the batch's loss is their mean. A piece whose loss is not finite is not
    back-propagated and makes the returned loss not finite (the step is then skipped).
    """
    B = sim.data.batch_size or 1
    particles = 1 if cfg.objective == "npe" else cfg.num_particles
    total = 0.0
    for piece in sim.split(chunk_datasets(sim.data, particles)):
        share = (piece.data.batch_size or 1) / B
        loss = loss_fn(amortizer, cfg, piece) * share
        value = float(loss.detach())
        if math.isfinite(value):
            loss.backward()
        total += value
    return total
