"""Training: SVI on batches of datasets simulated from the model's prior predictive.

Each step draws one dataset structure, simulates ``batch_size`` datasets on it, and minimizes one
objective through the same guide:

* ``"npe"`` (default): forward KL, ``-log q(z_true | y)`` for the simulated truth;
* ``"elbo"``: the reverse-KL evidence lower bound with ``num_particles`` reparameterized draws;
* ``"iwae"``: the importance-weighted bound with ``num_particles`` draws.

Losses are per latent coordinate, so datasets of different sizes weigh alike. Adam with linear
warm-up and cosine annealing, gradient clipping, skipped non-finite steps, TensorBoard scalars.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .errors import AmortizeError, ConfigError

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["TrainConfig", "train", "pilot_fit"]

log = logging.getLogger(__name__)
OBJECTIVES = ("npe", "elbo", "iwae")


@dataclass
class TrainConfig:
    """Everything that tunes training (all fields have defaults)."""

    steps: int = 2000
    batch_size: int = 128  # simulated datasets per step, sharing one structure
    lr: float = 2e-3
    lr_final_ratio: float = 0.01  # cosine annealing to lr * ratio
    warmup: int = 100
    clip_norm: float = 5.0
    objective: str = "npe"
    num_particles: int = 8  # for elbo / iwae
    pilot_structures: int = 16  # structures x batch_size datasets fit the input/output scalers
    log_every: int = 25
    checkpoint_every: int = 500
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: '{self.objective}' is not one of {OBJECTIVES}")
        for key in ("steps", "batch_size", "num_particles"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_final_ratio + (1 - cfg.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def pilot_fit(amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> None:
    """Fit the encoder's feature scalers and the heads' parameter scalers on prior simulations."""
    guide, structure = amortizer.guide, amortizer.structure
    sims = [amortizer.simulate_batch(gen, cfg.batch_size) for _ in range(cfg.pilot_structures)]
    guide.encoder.fit([s.data for s in sims])
    if guide.global_head is not None:
        u = torch.cat(
            [
                torch.cat([s.unconstrain(sim.latents[s.name]) for s in structure.global_sites], -1).reshape(
                    -1, structure.global_dim
                )
                for sim in sims
            ]
        )
        guide.global_head.scaler.fit(u)
    for name, head in guide.group_heads.items():
        site = structure[name]
        head.scaler.fit(torch.cat([site.unconstrain(sim.latents[name]).reshape(-1, site.dim) for sim in sims]))


def _loss(amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    sim = amortizer.simulate_batch(gen, cfg.batch_size)
    guide, structure = amortizer.guide, amortizer.structure
    n_coords = structure.global_dim + sum(s.dim * sim.data.size(s.level) for s in structure.latents if s.level)
    if cfg.objective == "npe":
        _, log_q, _ = guide.log_weights(sim.data, 1, truth=sim.latents)
        return -log_q.mean() / n_coords
    log_p, log_q, _ = guide.log_weights(sim.data, cfg.num_particles)
    lw = log_p - log_q  # [S, B]
    if cfg.objective == "elbo":
        return -lw.mean() / n_coords
    return -(torch.logsumexp(lw, 0) - math.log(cfg.num_particles)).mean() / n_coords


def train(
    amortizer: Amortizer,
    cfg: TrainConfig,
    log_dir: str | None = None,
    checkpoint_path: str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> list[dict[str, float]]:
    """Run ``cfg.steps - amortizer.step`` optimization steps (resumes where the amortizer stopped).

    Returns the logged history (one dict per ``log_every`` steps).
    """
    guide = amortizer.guide
    gen = amortizer.generator
    if amortizer.step == 0 and not amortizer.pilot_done:
        pilot_fit(amortizer, cfg, gen)
        amortizer.pilot_done = True
    if amortizer.optimizer is None:
        amortizer.optimizer = torch.optim.Adam(guide.parameters(), lr=cfg.lr)
    opt = amortizer.optimizer
    writer = None
    if log_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir)
    history: list[dict[str, float]] = []
    bad = 0
    t0, seen = time.perf_counter(), 0
    bar = tqdm(range(amortizer.step, cfg.steps), disable=not progress, desc=f"train ({cfg.objective})", leave=False)
    running = None
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, cfg)
            loss = _loss(amortizer, cfg, gen)
            value = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(guide.parameters(), cfg.clip_norm)
            else:
                gnorm = torch.tensor(float("nan"))
            if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
                bad += 1
                log.warning("step %d: non-finite loss or gradient (%s); step skipped", step, value)
                if bad >= cfg.max_bad_steps:
                    raise AmortizeError(
                        f"training stopped at step {step}: {bad} consecutive non-finite steps; "
                        "the last checkpoint is intact"
                    )
                amortizer.step = step + 1
                continue
            bad = 0
            opt.step()
            amortizer.step = step + 1
            seen += cfg.batch_size
            running = value if running is None else 0.95 * running + 0.05 * value
            if callback:
                callback(step, value)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                rate = seen / (time.perf_counter() - t0)
                rec = {"step": step + 1, "loss": running, "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm)}
                rec["datasets_per_s"] = rate
                history.append(rec)
                bar.set_postfix(loss=f"{running:.3f}")
                if writer:
                    for k, v in rec.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step + 1)
            if checkpoint_path and (step + 1) % cfg.checkpoint_every == 0:
                amortizer.save(checkpoint_path)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; saving a checkpoint", amortizer.step)
        if checkpoint_path:
            amortizer.save(checkpoint_path)
        raise
    finally:
        if writer:
            writer.close()
    amortizer.history.extend(history)
    if checkpoint_path:
        amortizer.save(checkpoint_path)
    return history
