"""Training: ONE loop over steps, fed by a data source (:mod:`amortize.sources`).

The default source simulates, each step, one dataset structure and ``batch_size`` datasets on it
from the model's prior predictive, and minimizes one objective through the same guide:

* ``"npe"`` (default): forward KL, ``-log q(z_true | y)`` for the simulated truth;
* ``"elbo"``: the reverse-KL evidence lower bound with ``num_particles`` reparameterized draws;
* ``"iwae"``: the importance-weighted bound with ``num_particles`` draws.

:class:`~amortize.sources.Subsampled` trains on one large observed dataset instead; a ``step_fn``
(:mod:`amortize.distributed`) shards a step over processes. Whatever the source, the loop is this
one: Adam with linear warm-up and cosine annealing, gradient clipping, bad steps, checkpoints,
resume, TensorBoard scalars, signals.

Faults: a step with a non-finite loss or gradient, or one whose guide raised a distribution
argument error on non-finite values (a NaN inside the guide), is skipped, counted and logged;
``max_bad_steps`` in a row raise :class:`~amortize.errors.TrainingError` (naming the site where it
is known) without touching the last checkpoint. Ctrl-C, SIGTERM and SIGHUP end the current step,
save a checkpoint and raise :class:`Interrupted` (a ``KeyboardInterrupt``). Training draws its
randomness from the amortizer's structure generator and torch's RNG as ``Amortizer.fit`` sets it
(both saved in every checkpoint), so a resumed run continues bit for bit (on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .bad_steps import BadSteps, bad_step_error
from .errors import ConfigError, TrainingError
from .limits import Limit, check_limits
from .nn.data_terms import group_terms, site_term
from .nn.statistics import GroupStatistics
from .objectives import OBJECTIVES, batch_loss

if TYPE_CHECKING:
    from .amortizer import Amortizer
    from .simulate import Simulation

__all__ = [
    "TrainConfig",
    "TRAIN_LIMITS",
    "train",
    "pilot_fit",
    "lr_factor",
    "batch_loss",
    "local_step",
    "StepFn",
    "Interrupted",
]

log = logging.getLogger(__name__)
StepFn = Callable[["Amortizer", "TrainConfig", torch.Generator], float]  # see local_step


_COUNT, _AT_LEAST_ONE, _POSITIVE = Limit(0), Limit(1), Limit(0, open_low=True)
TRAIN_LIMITS = {  # the range of every numeric option of TrainConfig (amortize.limits)
    "steps": _AT_LEAST_ONE,
    "batch_size": _AT_LEAST_ONE,
    "lr": _POSITIVE,
    "lr_final_ratio": Limit(0, 1),
    "warmup": _COUNT,
    "clip_norm": Limit(0, open_low=True, finite=False),  # inf: no clipping
    "num_particles": _AT_LEAST_ONE,
    "refine_steps": _COUNT,
    "refine_lr": _POSITIVE,
    "pilot_structures": _AT_LEAST_ONE,
    "log_every": _AT_LEAST_ONE,
    "checkpoint_every": _AT_LEAST_ONE,
    "max_bad_steps": _AT_LEAST_ONE,
    **{"val_every": _COUNT, "early_stop": _COUNT},
}


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
    # hybrid training: after ``steps`` of ``objective``, ``refine_steps`` of ``refine_objective`` at
    # ``refine_lr`` (cosine down to a tenth); e.g. NPE then the ELBO, which trims the flow's tails
    refine_steps: int = 0
    refine_objective: str = "elbo"
    refine_lr: float = 5e-4
    pilot_structures: int = 16  # x batch_size datasets (on 8x as many structures) fit the scalers
    log_every: int = 25
    checkpoint_every: int = 500
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    val_every: int = 0  # held-out loss every this many steps (amortize.heldout_loss); 0: never
    early_stop: int = 0  # stop after this many held-out checks without a lower loss; 0: never
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("objective", "refine_objective"):
            if getattr(self, key) not in OBJECTIVES:
                raise ConfigError(f"{key}: '{getattr(self, key)}' is not one of {OBJECTIVES}")
        check_limits(self, TRAIN_LIMITS)

    @property
    def total_steps(self) -> int:
        """``steps`` plus ``refine_steps``: where training ends."""
        return int(self.steps) + int(self.refine_steps)

    def at(self, step: int) -> TrainConfig:
        """The settings step ``step`` runs with: this config, or in the refinement phase the same
        with ``objective = refine_objective``."""
        if step < self.steps or self.refine_objective == self.objective:
            return self
        return replace(self, objective=self.refine_objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then cosine down to ``lr_final_ratio``;
    in the refinement phase cosine from ``refine_lr`` down to a tenth of it."""
    if step >= cfg.steps:
        t = (step - cfg.steps) / max(1, cfg.refine_steps)
        return cfg.refine_lr / cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_final_ratio + (1 - cfg.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def pilot_fit(amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> list[Simulation]:
    """Fit the encoder's feature scalers, the global head's parameter scaler and the group heads'
    skip paths on prior simulations; returns the simulations (the training ranges are read from them)."""
    guide, structure = amortizer.guide, amortizer.structure
    # as many datasets as pilot_structures x batch_size, on 8x as many structures in batches of an
    # eighth: the global head's count terms are fitted across structures
    per = max(1, cfg.batch_size // 8)
    sims = [amortizer.simulate_batch(gen, per) for _ in range(cfg.pilot_structures * cfg.batch_size // per)]
    stats = [guide.encoder.statistics(sim.data) for sim in sims]
    terms = [group_terms(guide.user_model, structure, sim.data) for sim in sims]
    guide.encoder.fit(stats, terms)
    if guide.global_head is not None:
        u = torch.cat(  # [datasets, D]: batches hold different numbers of datasets when some were dropped
            [
                torch.cat([s.unconstrain(sim.latents[s.name]) for s in structure.global_sites], -1).reshape(
                    -1, structure.global_dim
                )
                for sim in sims
            ]
        )
        guide.global_head.fit(
            torch.cat([s.location_scale() for s in stats]),
            u,
            torch.cat([s.counts() for s in stats]),
            torch.cat([s.covariate_slopes() for s in stats]),
        )
    for name, head in guide.group_heads.items():
        site = structure[name]
        groups = GroupStatistics.cat([s.levels[site.level].groups.rows() for s in stats])
        parts = [site_term(t[site.level], structure.sites_at(site.level), name) for t in terms]
        term = tuple(torch.cat([p[i].reshape(-1, site.dim) for p in parts]) for i in range(2))
        head.fit(groups, torch.cat([site.unconstrain(sim.latents[name]).reshape(-1, site.dim) for sim in sims]), term)
    return sims


def _loss(amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    return amortizer.source.loss(amortizer, cfg, gen)


def local_step(amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> float:
    """The default step computation: the loss of ``amortizer.source`` (simulated datasets from
    ``gen``, or a subset of one large dataset), clear the gradients and back-propagate a finite loss
    (a source with a ``backward`` method, :class:`~amortize.sources.PriorPredictive`, does the last two
    itself, in pieces of the batch).

    A replacement (``step_fn`` of :func:`train`, e.g. :class:`amortize.distributed.ShardedStep`)
    takes the same arguments and leaves the same result: the gradients of this step's loss in
    ``amortizer.guide``'s parameters, and the loss as a float (not finite: the step is skipped).
    """
    assert amortizer.optimizer is not None
    amortizer.optimizer.zero_grad(set_to_none=True)
    backward = getattr(amortizer.source, "backward", None)
    if backward is not None:  # the source accumulates the gradients itself, in pieces of the batch
        return float(backward(amortizer, cfg, gen))
    loss = _loss(amortizer, cfg, gen)
    value = float(loss.detach())
    if math.isfinite(value):
        loss.backward()
    return value


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal (SIGINT, SIGTERM or SIGHUP) after a checkpoint was saved.

    Attributes:
        signum: the signal's number; ``exit_code`` is ``128 + signum`` (130, 143, 129), the shell's.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[dict[str, Any]]:
    """Hold a Ctrl-C, SIGTERM or SIGHUP until the current step ends (``flags["stop"]``, the signal in
    ``flags["signum"]``); a second one interrupts at once, except inside the parameter update, so
    that a saved checkpoint is never half a step."""
    flags: dict[str, Any] = {"stop": False, "updating": False, "signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flags  # signal handlers can only be set in the main thread: plain KeyboardInterrupt
        return

    def handler(signum: int, frame: Any) -> None:
        if flags["stop"] and not flags["updating"]:
            raise Interrupted(signum)
        flags["stop"], flags["signum"] = True, signum
        log.warning("%s: stopping after this step (again to stop at once)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield flags
    finally:
        for s, h in previous.items():  # None: a handler set outside Python; Python's own default then
            fallback = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
            signal.signal(s, h if h is not None else fallback)


def _optimizer(amortizer: Amortizer, cfg: TrainConfig, source: Any) -> torch.optim.Optimizer:
    """Adam over the guide's parameters (and a source's own, as a second group at ``source.lr_scale``
    times the learning rate), with the saved state."""
    groups: list[dict[str, Any]] = [{"params": list(amortizer.guide.parameters()), "lr_scale": 1.0}]
    extra = source.parameters()
    if extra:
        groups.append({"params": extra, "lr_scale": float(getattr(source, "lr_scale", 1.0))})
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    if amortizer._optimizer_state is not None:
        opt.load_state_dict(amortizer._optimizer_state)
        amortizer._optimizer_state = None
    return opt


def train(
    amortizer: Amortizer,
    cfg: TrainConfig,
    source: Any,
    log_dir: str | None = None,
    checkpoint_path: str | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    stop_at: int | None = None,
    step_fn: StepFn | None = None,
    is_main: bool = True,
) -> list[dict[str, float]]:
    """Run optimization steps from ``amortizer.step`` up to ``cfg.total_steps`` (resumes where it
    stopped): ``cfg.steps`` of ``cfg.objective``, then ``cfg.refine_steps`` of ``cfg.refine_objective``.

    ``source`` (:mod:`amortize.sources`) gives each step's data and loss (and runs the pilot of a
    fresh amortizer). ``stop_at`` ends the run earlier, after that step, without changing the
    learning-rate schedule (which always spans ``cfg.total_steps``): a later call continues exactly
    where this one stopped.

    A step whose loss or gradient is not finite, or whose guide raised a distribution argument
    error on non-finite values, is skipped and logged; ``cfg.max_bad_steps`` in a row stop the run.
    Ctrl-C, SIGTERM or SIGHUP finish the current step, save a checkpoint and raise :class:`Interrupted`.

    ``step_fn`` replaces how one step's loss and gradients are computed (default
    :func:`local_step`; :mod:`amortize.distributed` shards the batch over processes). Only the main
    process (``is_main``) writes checkpoints, TensorBoard scalars and the progress bar.

    Returns:
        The logged history of this call (one dict per ``log_every`` steps; also appended to
        ``amortizer.history``).

    Raises:
        TrainingError: ``cfg.max_bad_steps`` consecutive bad steps (nothing is saved, so the last
            checkpoint is the last good one).
        CheckpointError: a checkpoint could not be written (the previous one is intact).
        Interrupted: a signal stopped the run (after saving).
    """
    gen = amortizer.generator
    step_fn = step_fn or local_step
    checkpoint_path = checkpoint_path if is_main else None
    progress = progress and is_main
    log_dir = log_dir if is_main else None
    end = cfg.total_steps if stop_at is None else min(int(stop_at), cfg.total_steps)
    amortizer.source = source
    history: list[dict[str, float]] = []
    bad = BadSteps(cfg.max_bad_steps)
    running, writer = None, None
    try:
        with _deferred_interrupt() as interrupt:
            source.setup(amortizer, cfg, gen)  # the pilot of a fresh amortizer (a signal stops after it)
            if amortizer.optimizer is None:
                amortizer.optimizer = _optimizer(amortizer, cfg, source)
            opt = amortizer.optimizer
            params = [p for g in opt.param_groups for p in g["params"]]
            if log_dir:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir)
            t0, seen = time.perf_counter(), 0
            desc = f"train ({source.name})"
            start = amortizer.step
            bar = tqdm(range(start, end), disable=not progress or None, desc=desc, leave=False)
            for step in bar:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * g.get("lr_scale", 1.0) * lr_factor(step, cfg)
                why = None
                try:
                    value = step_fn(amortizer, cfg.at(step), gen)  # loss; its gradients are in the parameters
                except ValueError as e:
                    why = bad_step_error(e)
                    if why is None:
                        raise
                    value = float("nan")
                finite = math.isfinite(value)
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm) if finite else torch.tensor(math.nan)
                if not (finite and torch.isfinite(gnorm)):
                    bad.skip(step, why or ("non-finite gradient" if finite else f"non-finite loss ({value})"))
                    if bad.in_a_row >= cfg.max_bad_steps:
                        kept = f"; {checkpoint_path} was not overwritten" if checkpoint_path else ""
                        raise TrainingError(bad.message(step) + kept)
                    amortizer.step = step + 1
                    opt.zero_grad(set_to_none=True)
                else:
                    bad.in_a_row = 0
                    interrupt["updating"] = True
                    opt.step()
                    amortizer.step = step + 1
                    interrupt["updating"] = False
                    seen += source.datasets_per_step(cfg)
                    running = value if running is None else 0.95 * running + 0.05 * value
                    if callback and callback(step, value) is True:
                        break  # the callback stops training (early stopping: amortize.heldout_loss)
                    if (step + 1) % cfg.log_every == 0 or step + 1 in (cfg.steps, cfg.total_steps):
                        rate = seen / (time.perf_counter() - t0)
                        rec = {"step": step + 1, "loss": running, "lr": opt.param_groups[0]["lr"]}
                        rec.update(grad_norm=float(gnorm), datasets_per_s=rate, dropped=amortizer.drops.total)
                        rec["skipped"] = bad.total
                        history.append(rec)
                        amortizer.history.append(rec)
                        bar.set_postfix(loss=f"{running:.3f}")
                        if writer:
                            for k, v in rec.items():
                                if k != "step":
                                    writer.add_scalar(f"train/{k}", v, step + 1)
                if checkpoint_path and bad.in_a_row == 0 and (step + 1) % cfg.checkpoint_every == 0:
                    amortizer.save(checkpoint_path)
                if interrupt["stop"]:
                    raise Interrupted(interrupt["signum"])
            if interrupt["stop"]:  # a signal during the pilot of a run with no step left
                raise Interrupted(interrupt["signum"])
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; saving a checkpoint", amortizer.step)
        if checkpoint_path:
            amortizer.save(checkpoint_path)
        raise
    finally:
        if writer:
            writer.close()
    bad.report(amortizer.step - start)  # the steps this call ran (early stopping may end it before end)
    if checkpoint_path:
        amortizer.save(checkpoint_path)
    return history
