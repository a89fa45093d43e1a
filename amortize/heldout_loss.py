"""A held-out validation loss during training, with optional early stopping (as sbi and BayesFlow show one).

Every ``val_every`` steps (``TrainConfig.val_every``; 0: never) the training objective is evaluated on
fixed held-out batches (:data:`VAL_BATCHES` structures of ``batch_size`` datasets, their mean loss):
the same simulated datasets at every check, drawn from a seed moved apart from training's streams,
with the RNG left as it was, so that training itself is unchanged by it. The value goes to TensorBoard
as ``train/val_loss`` and to :attr:`HeldOutLoss.history`; with ``early_stop = p`` training stops after
p checks in a row without a lower value. A rising held-out loss while the training loss still falls
says the network is fitting its batches, not the model.

Example:
    >>> amortizer.fit(steps=5000, val_every=100, early_stop=5, log_dir="runs/x")  # doctest: +SKIP
    >>> amortizer.held_out.history[-1]  # {"step": ..., "val_loss": ...}  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .plates import seeded
from .train import _loss

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["HeldOutLoss", "SEED_OFFSET", "VAL_BATCHES"]

log = logging.getLogger(__name__)
SEED_OFFSET = 7_000_003  # the held-out batches' seed: the amortizer's, moved apart from training's streams
VAL_BATCHES = 8  # batches (structures) of train.batch_size datasets: one batch's loss is heavy-tailed


class HeldOutLoss:
    """The ``callback`` of :func:`amortize.train.train` that checks the held-out loss (module docstring).

    Args:
        amortizer: the amortizer being trained (its ``config`` gives ``val_every`` and ``early_stop``).
        log_dir: TensorBoard folder for ``train/val_loss`` (None: not written).
        then: the caller's own callback, called first.
    """

    def __init__(
        self, amortizer: Amortizer, log_dir: str | None = None, then: Callable[[int, float], Any] | None = None
    ) -> None:
        self.amortizer, self.log_dir, self.then = amortizer, log_dir, then
        self.seed = amortizer.seed + SEED_OFFSET
        self.history: list[dict[str, float]] = []
        self.best: float | None = None
        self.since = 0  # checks since the best one
        self._writer: Any = None

    def loss(self) -> float:
        """The training objective on the held-out batches (their mean), for the current weights."""
        a = self.amortizer
        cfg, total = a.config.at(max(0, a.step - 1)), 0.0
        for i in range(VAL_BATCHES):
            with seeded(self.seed + i):
                total += float(_loss(a, cfg, torch.Generator().manual_seed(self.seed + i)).detach())
        return total / VAL_BATCHES

    def __call__(self, step: int, value: float) -> bool:
        """After step ``step``: True when training should stop (early stopping)."""
        stop = self.then(step, value) is True if self.then else False
        cfg = self.amortizer.config
        if not cfg.val_every or (step + 1) % cfg.val_every:
            return stop
        val = self.loss()
        self.history.append({"step": step + 1, "val_loss": val})
        if self.log_dir:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(self.log_dir)
            self._writer.add_scalar("train/val_loss", val, step + 1)
            self._writer.flush()
        self.best, self.since = (val, 0) if self.best is None or val < self.best else (self.best, self.since + 1)
        if cfg.early_stop and self.since >= cfg.early_stop:
            log.info("early stop at step %d: held-out loss %.4f, best %.4f", step + 1, val, self.best)
            return True
        return stop
