"""The two outer plates amortize wraps a model in: posterior draws and datasets, left of the model's own.

The model is written for ONE dataset; :func:`batched` runs it for B datasets x S draws at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch

from .data import HierarchicalData

__all__ = ["batched", "on_device_of", "seeded", "DRAWS", "DATASETS"]

DRAWS = "_amortize_draws"  # outer plate over posterior draws / particles
DATASETS = "_amortize_datasets"  # plate over datasets that share one structure


def batched(model: Callable, max_plate_nesting: int) -> Callable:
    """Wrap ``model(data)`` so that ``fn(data, num_draws)`` runs it for B datasets x S draws.

    B is ``data.y.shape[0]`` for a response ``[B, N]`` (1 otherwise). Every site gains two
    leading batch dims ``[S, B]`` left of the model's own plates.
    """

    def run(data: HierarchicalData, num_draws: int = 1, num_datasets: int | None = None) -> Any:
        B = num_datasets or data.batch_size or 1
        with on_device_of(data), pyro.plate(DRAWS, num_draws, dim=-max_plate_nesting - 2):
            with pyro.plate(DATASETS, B, dim=-max_plate_nesting - 1):
                return model(data)

    return run


def on_device_of(data: HierarchicalData) -> contextlib.AbstractContextManager:
    """The model runs where its data are: on another device than the CPU, tensors the model creates
    (a prior's ``dist.Normal(0.0, 2.0)``, written for one dataset on the CPU) are made on the data's
    device; on the CPU, nothing changes."""
    device = data.group.device
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch's generator of ``device`` (and the CPU's) for the body only, restoring the
    caller's RNG state after it; ``seed=None``: the body runs on the caller's RNG as it is.
    Cheaper than ``torch.manual_seed`` (which seeds every backend), so it suits per-call seeds."""
    if seed is None:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(int(seed))
        if devices:
            torch.cuda.manual_seed(int(seed))
        yield
