"""Seeding, one way: a seed (or a saved RNG state) is passed down, and the caller's RNG is left alone.

* :func:`~amortize.structure.seeded` runs a block on a seeded torch RNG and restores the caller's
  (posterior draws, initial weights, DDP shards);
* :func:`training_stream` runs ``Amortizer.fit`` on the amortizer's own stream: seeded by its
  ``seed`` on the first fit, else the state the last fit (or the checkpoint) left; the caller's
  torch, numpy and ``random`` states are restored afterwards. Pyro draws from torch's RNG.

Example:
    >>> with training_stream(amortizer):  # doctest: +SKIP
    ...     train(amortizer, cfg, source)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["training_stream", "get_rng", "set_rng"]


def get_rng(device: torch.device) -> dict[str, Any]:
    """torch's RNG state: the CPU generator and, for a CUDA device, that device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore a state from :func:`get_rng`."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def training_stream(amortizer: Any) -> Iterator[None]:
    """Run the block on ``amortizer``'s own random stream (``amortizer._rng``: None while it runs, so
    that checkpoints written inside read it live; the state it ends in afterwards)."""
    device = amortizer.device
    devices = [device] if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        if amortizer._rng is None or (amortizer.step == 0 and not amortizer.pilot_done):
            torch.manual_seed(amortizer.seed)
        else:
            set_rng(amortizer._rng, device)
        amortizer._rng = None
        try:
            yield
        finally:
            amortizer._rng = get_rng(device)
            np.random.set_state(np_state)
            random.setstate(py_state)
