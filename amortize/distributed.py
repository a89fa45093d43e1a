"""Multi-process training with PyTorch's DistributedDataParallel, launched by ``torchrun``.

Each training step draws ONE dataset structure from the amortizer's structure generator (the same
on every process: every process starts from the same seed) and splits the global batch of
``batch_size`` simulated datasets into ``world_size`` equal shards. Process ``rank`` simulates
shard ``rank`` with its own random stream, seeded from ``(seed, step, shard)``, and computes the
loss on it; DDP averages the gradients over the processes, so every process applies the same
update. Only rank 0 writes checkpoints, TensorBoard scalars and the progress bar.

The same shards can be computed in one process (:func:`fit_sharded`, shards one after another with
their gradients accumulated): that is training at the global batch on exactly the datasets the
processes simulate, and its loss curve is the multi-process one to float rounding.

The global loss of a step is the mean of the shards' losses (per latent coordinate, as in
:func:`amortize.train.batch_loss`). A shard that loses a non-finite simulated dataset (the
simulator drops them) keeps the weight of a full shard; every process then still agrees.

Example (``train_ddp.py``, run with ``torchrun --nproc_per_node 2 train_ddp.py``):

    >>> info = init_process_group()  # doctest: +SKIP
    >>> amortizer = am.Amortizer(model, sampler, seed=0, device=info.device)  # one seed for all  # doctest: +SKIP
    >>> fit_distributed(amortizer, steps=2000, batch_size=256, checkpoint_path="ck.pt")  # doctest: +SKIP
    >>> torch.distributed.destroy_process_group()  # doctest: +SKIP

Limits: the per-shard streams restart from ``(seed, step, shard)``, so a resumed run simulates the
same datasets as an uninterrupted one with the same number of processes; with another number of
processes it is a different (equally valid) run.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import AmortizeError, ConfigError
from .simulate import Simulation, simulate
from .structure import seeded
from .train import TrainConfig, batch_loss

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = [
    "ProcessInfo",
    "ShardedStep",
    "init_process_group",
    "fit_distributed",
    "fit_sharded",
    "shard_seed",
    "free_port",
]


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the process group.

    Attributes:
        rank: this process's rank (0 writes checkpoints and logs).
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        device: ``cuda:LOCAL_RANK`` with the NCCL backend, else ``cpu``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(backend: str | None = None) -> ProcessInfo:
    """Join the process group ``torchrun`` set up (environment ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a no-op when it is already initialized.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process); default NCCL when CUDA is
            available, else gloo.

    Raises:
        ConfigError: the process was not launched by ``torchrun`` (or the variables are missing).
    """
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"distributed training: environment {missing} not set; launch with"
                " 'torchrun --nproc_per_node N script.py' (or set them yourself)"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The seed of shard ``shard``'s random stream at training step ``step`` (well mixed, < 2**63)."""
    a, b = np.random.SeedSequence([int(seed), int(step), int(shard)]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def free_port() -> int:
    """A TCP port free on this machine now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ShardLoss(nn.Module):
    """The loss of one shard as a module's forward, so that DDP can wrap it (its parameters are the guide's)."""

    def __init__(self, amortizer: Amortizer) -> None:
        super().__init__()
        self.guide = amortizer.guide
        self._amortizer = [amortizer]  # not a submodule

    def forward(self, sim: Simulation, cfg: TrainConfig) -> torch.Tensor:
        return batch_loss(self._amortizer[0], cfg, sim)


class ShardedStep:
    """A training step (``step_fn`` of :meth:`Amortizer.fit <amortize.Amortizer.fit>`) over shards of the batch.

    Args:
        num_shards: shards the global batch ``cfg.batch_size`` is split into (must divide it).
        shards: the shards this process computes: ``[rank]`` under DDP, all of them in one process.
        ddp: wrap the loss in :class:`~torch.nn.parallel.DistributedDataParallel` (needs an
            initialized process group of ``num_shards`` processes, one shard each).
        find_unused_parameters: passed to DDP (every parameter of the guide takes part in every
            shipped objective, so the default skips DDP's search for unused ones).

    Attributes:
        is_main: whether this process writes checkpoints and logs (rank 0, or a single process).
    """

    def __init__(
        self,
        num_shards: int,
        shards: Sequence[int] | None = None,
        ddp: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        self.num_shards = int(num_shards)
        self.shards = list(range(self.num_shards)) if shards is None else [int(s) for s in shards]
        if self.num_shards < 1 or not self.shards or any(not 0 <= s < self.num_shards for s in self.shards):
            raise ConfigError(f"shards {self.shards} of {num_shards}: need 0 <= shard < num_shards")
        self.ddp = bool(ddp)
        self.find_unused_parameters = bool(find_unused_parameters)
        if not self.ddp and sorted(self.shards) != list(range(self.num_shards)):
            raise ConfigError(f"shards {self.shards} of {num_shards}: one process without DDP computes every shard")
        if self.ddp:
            if not dist.is_initialized():
                raise AmortizeError("ShardedStep(ddp=True): no process group; call init_process_group() first")
            if dist.get_world_size() != self.num_shards or self.shards != [dist.get_rank()]:
                raise ConfigError(
                    f"ShardedStep(ddp=True): {dist.get_world_size()} processes need one shard each"
                    f" ({self.shards} of {self.num_shards} given to rank {dist.get_rank()})"
                )
        self.is_main = not self.ddp or dist.get_rank() == 0
        self._wrapped: tuple[Amortizer, nn.Module] | None = None

    @classmethod
    def for_process_group(cls, find_unused_parameters: bool = False) -> ShardedStep:
        """One shard per process of the initialized process group, gradients averaged by DDP."""
        if not dist.is_initialized():
            raise AmortizeError("no process group; call init_process_group() first (under torchrun)")
        return cls(dist.get_world_size(), [dist.get_rank()], ddp=True, find_unused_parameters=find_unused_parameters)

    def _module(self, amortizer: Amortizer) -> nn.Module:
        if self._wrapped is None or self._wrapped[0] is not amortizer:
            module: nn.Module = _ShardLoss(amortizer)
            if self.ddp:
                from torch.nn.parallel import DistributedDataParallel

                cuda = amortizer.device.type == "cuda"
                module = DistributedDataParallel(
                    module,
                    device_ids=[amortizer.device] if cuda else None,
                    find_unused_parameters=self.find_unused_parameters,
                )
            self._wrapped = (amortizer, module)
        return self._wrapped[1]

    @staticmethod
    @contextlib.contextmanager
    def stream(amortizer: Amortizer, step: int, shard: int) -> Iterator[None]:
        """Run under shard ``shard``'s own random stream of training step ``step`` (torch's global RNG
        is seeded from :func:`shard_seed` inside, and left outside as it was)."""
        with seeded(shard_seed(amortizer.seed, step, shard), amortizer.device):
            yield

    def __call__(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> float:
        """Simulate and score this process's shards of one step; leave the (averaged) gradients in
        the guide's parameters and return the global loss (the mean over all shards)."""
        if cfg.batch_size % self.num_shards:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} datasets cannot be split into {self.num_shards} equal shards"
            )
        per_shard = cfg.batch_size // self.num_shards
        structure = amortizer.sampler.sample(gen).to(amortizer.device)  # one structure for all shards
        module = self._module(amortizer)
        assert amortizer.optimizer is not None
        amortizer.optimizer.zero_grad(set_to_none=True)
        losses = []
        for shard in self.shards:
            with self.stream(amortizer, amortizer.step, shard):
                sim = simulate(amortizer.model, amortizer.structure, structure, per_shard)
                loss = module(sim, cfg)
            losses.append(loss.detach())
            if self.ddp:
                loss.backward()  # always, even when not finite: every process joins the gradient all-reduce
            elif torch.isfinite(loss):
                (loss / self.num_shards).backward()
        total = torch.stack(losses).sum()
        if self.ddp:
            dist.all_reduce(total)
        return float(total / self.num_shards)


def fit_distributed(amortizer: Amortizer, find_unused_parameters: bool = False, **fit_kwargs: Any) -> list[dict]:
    """``amortizer.fit(**fit_kwargs)`` as one process of a DDP run: this process computes its shard
    of every step's global batch (``batch_size``), DDP averages the gradients; only rank 0 writes
    ``checkpoint_path``, ``log_dir`` and the progress bar.

    Every process must build its amortizer with the same model, sampler and seed (checked).

    Raises:
        AmortizeError: no process group (see :func:`init_process_group`).
        ConfigError: the processes' amortizers differ (seed, step or model), or ``batch_size`` is
            not a multiple of the number of processes.
    """
    step = ShardedStep.for_process_group(find_unused_parameters)
    mine = (amortizer.seed, amortizer.step, amortizer.structure.fingerprint())
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        raise ConfigError(
            "fit_distributed: the processes' amortizers differ (seed, step, model fingerprint per rank:"
            f" {everyone}); build them the same way on every process"
        )
    return amortizer.fit(step_fn=step, is_main=step.is_main, **fit_kwargs)


def fit_sharded(
    amortizer: Amortizer, num_shards: int, callback: Callable[[int, float], None] | None = None, **fit_kwargs: Any
) -> list[dict]:
    """Train in one process on exactly the datasets ``num_shards`` DDP processes would simulate
    (the reference for a multi-process run; also a way to bound memory by the shard)."""
    return amortizer.fit(step_fn=ShardedStep(num_shards), callback=callback, **fit_kwargs)
