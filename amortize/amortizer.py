"""The user-facing trainer: ``Amortizer(model, sampler).fit()``, then ``.posterior(data)``.

Example:
    >>> import amortize as am
    >>> from amortize.models import gaussian_2level, SAMPLERS
    >>> amortizer = am.Amortizer(gaussian_2level, SAMPLERS["gaussian_2level"]())
    >>> amortizer.fit(steps=10, progress=False)  # doctest: +SKIP
    >>> post = amortizer.posterior(data)  # doctest: +SKIP
    >>> draws = post.sample(1000)  # {"mu": [1000], ..., "theta": [1000, G]}  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import pyro
import torch

from . import __version__ as _version
from .checkpoint import load_checkpoint, save_checkpoint
from .data import HierarchicalData
from .errors import CheckpointError, ConfigError
from .guide import AmortizedGuide
from .posterior import Posterior
from .simulate import Simulation, StructureSampler, simulate
from .structure import trace_structure
from .train import TrainConfig, train

__all__ = ["Amortizer"]

log = logging.getLogger(__name__)


class Amortizer:
    """Builds and trains an amortized posterior for ``model`` over datasets from ``sampler``.

    Args:
        model: a Pyro model for ONE dataset (one ``pyro.plate`` per level, named after it).
        sampler: a :class:`StructureSampler` of training structures, or a dataset whose structure
            is used as is.
        hidden: width of the encoder and heads.
        flow_bins: bins of the spline flow on the global latents (0: a Gaussian).
        seed: seeds the structure sampler and, when training starts, Pyro's RNG.
        device: where the networks live (``"cpu"``, ``"cuda"``); never hard-coded elsewhere.
    """

    def __init__(
        self,
        model: Callable,
        sampler: StructureSampler | HierarchicalData,
        hidden: int = 64,
        flow_bins: int = 8,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(sampler, HierarchicalData):
            sampler = StructureSampler.fixed(sampler)
        self.model = model
        self.sampler = sampler
        self.hidden = int(hidden)
        self.flow_bins = int(flow_bins)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = torch.Generator().manual_seed(self.seed)
        self.example = sampler.sample(torch.Generator().manual_seed(self.seed))
        self.structure = trace_structure(model, self.example)
        self.covariates = {lvl: sorted(cols) for lvl, cols in self.example.covariates.items()}
        self.guide = AmortizedGuide(model, self.structure, self.covariates, self.hidden, self.flow_bins)
        self.guide.to(self.device)
        self.config = TrainConfig()
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.pilot_done = False
        self.history: list[dict[str, float]] = []
        self._optimizer_state: dict[str, Any] | None = None

    def __repr__(self) -> str:
        sites = ", ".join(f"{s.name}@{s.level or 'global'}" for s in self.structure.latents)
        return f"Amortizer({getattr(self.model, '__name__', 'model')}: {sites}; step {self.step})"

    def simulate_batch(self, gen: torch.Generator, num_datasets: int) -> Simulation:
        """Simulate ``num_datasets`` datasets on one structure drawn from the sampler."""
        data = self.sampler.sample(gen).to(self.device)
        return simulate(self.model, self.structure, data, num_datasets)

    def fit(
        self,
        config: TrainConfig | None = None,
        log_dir: str | None = None,
        checkpoint_path: str | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> list[dict[str, float]]:
        """Train (or continue training) the amortized posterior.

        Args:
            config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields
                (``steps=3000, objective="elbo"``, ...).
            log_dir: TensorBoard run directory (scalars: loss, lr, grad norm, datasets/s).
            checkpoint_path: where checkpoints are written (atomically) during and after training.
            progress: show a tqdm progress bar.

        Returns:
            The logged training history.
        """
        cfg = config or self.config
        names = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"fit: unknown option(s) {unknown}; options are {sorted(names)}")
        cfg = TrainConfig(**{**cfg.to_dict(), **overrides})
        self.config = cfg
        if self.step == 0 and not self.pilot_done:
            pyro.set_rng_seed(self.seed)
        if self.optimizer is None and self._optimizer_state is not None:
            self.optimizer = torch.optim.Adam(self.guide.parameters(), lr=cfg.lr)
            self.optimizer.load_state_dict(self._optimizer_state)
            self._optimizer_state = None
        self.guide.train()
        try:
            return train(self, cfg, log_dir=log_dir, checkpoint_path=checkpoint_path, progress=progress)
        finally:
            self.guide.eval()

    def posterior(self, data: HierarchicalData) -> Posterior:
        """The amortized posterior for a new dataset (``y [N]``) or a batch sharing one structure
        (``y [B, N]``): one forward pass of the encoder; draws come from :meth:`Posterior.sample`."""
        return Posterior(self, data)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds (see :mod:`amortize.checkpoint`)."""
        ex = self.example
        return {
            "library_version": _version,
            "signature": self.structure.signature(),
            "fingerprint": self.structure.fingerprint(),
            "hidden": self.hidden,
            "flow_bins": self.flow_bins,
            "seed": self.seed,
            "step": self.step,
            "pilot_done": self.pilot_done,
            "config": self.config.to_dict(),
            "state_dict": self.guide.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else self._optimizer_state,
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
            "example": {
                "levels": list(ex.levels),
                "parents": dict(ex.parents),
                "group": ex.group,
                "covariates": {lvl: dict(c) for lvl, c in ex.covariates.items()},
            },
            "ranges": self.sampler.ranges(),
            "history": self.history,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (a directory gets ``checkpoint.pt`` inside it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "checkpoint.pt")
        save_checkpoint(path, self.state())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: Callable,
        sampler: StructureSampler | None = None,
        device: str | torch.device | None = None,
    ) -> Amortizer:
        """Load a checkpoint for ``model``; pass the training ``sampler`` to continue training.

        Raises:
            CheckpointError: unreadable file, another model (sites, shapes, levels) or version.
        """
        ck = load_checkpoint(path)
        ex = ck["example"]
        example = HierarchicalData(ex["levels"], ex["parents"], ex["group"], covariates=ex["covariates"])
        try:
            new = cls(
                model, sampler or example, hidden=ck["hidden"], flow_bins=ck.get("flow_bins", 0), seed=ck["seed"], device=device
            )
        except Exception as e:
            raise CheckpointError(f"{path}: the model does not run on the checkpoint's data structure ({e})") from e
        if new.structure.fingerprint() != ck["fingerprint"]:
            raise CheckpointError(
                f"{path}: checkpoint is for another model: its sites are {ck['signature']['latents']}, "
                f"this model's are {new.structure.signature()['latents']}"
            )
        if ck["library_version"].split(".")[:2] != _version.split(".")[:2]:
            raise CheckpointError(f"{path}: written by amortize {ck['library_version']}, this is {_version}")
        new.guide.load_state_dict(ck["state_dict"])
        new.guide.eval()
        new.step, new.pilot_done = int(ck["step"]), bool(ck["pilot_done"])
        new.config = TrainConfig(**ck["config"])
        new._optimizer_state = ck["optimizer"]
        new.history = list(ck["history"])
        new.generator.set_state(ck["rng"]["generator"])
        torch.set_rng_state(ck["rng"]["torch"])
        new.ranges = ck["ranges"]
        return new

    @property
    def ranges(self) -> dict[str, Any]:
        """The structure range seen in training (for out-of-range flags)."""
        return getattr(self, "_ranges", None) or self.sampler.ranges()

    @ranges.setter
    def ranges(self, value: dict[str, Any]) -> None:
        self._ranges = value
