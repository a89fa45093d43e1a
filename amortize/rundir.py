"""Run folders of ``amortize train``: one writer at a time, a history of resumes, nothing half-made;
loading a run (its config, model and trained amortizer) and the dataset a run is asked about.

A run folder holds ``config.yaml`` (the config the run was started with, never rewritten),
``checkpoint.pt``, ``tb/`` (TensorBoard), ``history.yaml`` (one entry per resume: the step it
started from and the overrides it applied) and ``train.lock`` (the pid of the last writer; an
exclusive ``fcntl.flock`` on it while training).

Example:
    >>> cfg, model, amortizer = load_run("checkpoints/gaussian_2level/20250101-120000")  # doctest: +SKIP
    >>> with resumed(run, ["train.steps=6000"]) as (cfg, amortizer):  # doctest: +SKIP
    ...     amortizer.fit(config=cfg.train)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from .amortizer import Amortizer
from .checkpoint import write_text
from .config import Config, config_dir, config_source, load_config, save_config
from .data import HierarchicalData
from .errors import ConfigError, DataError
from .experiment import build_sampler, dataset_spec, read_dataset
from .files import make_dirs, remove_empty
from .modelspec import resolve_model

__all__ = [
    "LOCK",
    "HISTORY",
    "RESUMABLE",
    "locked",
    "present",
    "remove_half_made",
    "recorded_overrides",
    "record_resume",
    "refuse_changes",
    "run_config",
    "load_run",
    "resolve_device",
    "new_amortizer",
    "new_run_dir",
    "new_run",
    "resumed",
    "read_data",
]

LOCK, HISTORY = "train.lock", "history.yaml"
WRITTEN = ("config.yaml", "tb", HISTORY, LOCK)  # what 'amortize train' writes before the first checkpoint
# what may change when a run is resumed: its length, the end of the schedule, logging, where it runs
RESUMABLE = (
    "train.steps",
    "train.refine_steps",
    "train.refine_objective",
    "train.refine_lr",
    "train.lr_final_ratio",
    "train.log_every",
    "train.checkpoint_every",
    "train.max_bad_steps",
    "train.val_every",
    "train.early_stop",
    "device",
    "validate",
)


@contextlib.contextmanager
def locked(run: Path) -> Iterator[None]:
    """Hold ``run/train.lock`` exclusively (``fcntl.flock``) for the body; it records our pid.

    Raises:
        ConfigError: another process holds it (names its pid).
        OSError: the lock file cannot be made (names it).
    """
    path = run / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"{run}: another 'amortize train' is writing this run (pid {holder}, {path});"
                " wait for it to finish, or use another --run-dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
        yield
    finally:
        os.close(fd)


def present(run: Path) -> set[str]:
    """Which of the files ``amortize train`` writes are in ``run`` already (:func:`remove_half_made` keeps them)."""
    return {name for name in WRITTEN if (run / name).exists()}


def remove_half_made(run: Path, made: Sequence[Path], files: bool = True, keep: Collection[str] = ()) -> None:
    """Remove what ``amortize train`` wrote in ``run`` when no checkpoint came of it (``files``: only
    while holding its lock; never those named in ``keep``, there before it started), then the
    folders in ``made`` that are left empty (a folder the user gave keeps their own files)."""
    if (run / "checkpoint.pt").exists():
        return
    for name in [n for n in WRITTEN if n not in keep] if files else ():
        p = run / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            with contextlib.suppress(OSError):
                p.unlink()
    remove_empty(made)


def recorded_overrides(run: Path) -> list[str]:
    """The overrides of every resume recorded in ``run/history.yaml``, oldest first."""
    path = run / HISTORY
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(e).split())})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: expected a list of entries (step, overrides)")
    return [str(o) for e in entries for o in e.get("overrides") or []]


def record_resume(run: Path, step: int, overrides: Sequence[str]) -> None:
    """Append one entry (time, step, pid, overrides) to ``run/history.yaml``, atomically."""
    path = run / HISTORY
    entries = yaml.safe_load(path.read_text()) if path.is_file() else None
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": int(step), "pid": os.getpid()}
    entries = [*(entries or []), {**entry, "overrides": list(overrides)}]
    write_text(path, yaml.safe_dump(entries, sort_keys=False))


def refuse_changes(run: Path, before: Config, after: Config) -> None:
    """Refuse a resume whose overrides change what the checkpoint was trained with.

    Raises:
        ConfigError: naming every changed key outside :data:`RESUMABLE` (the network, the seed, the
            model, the training structures, the objective, ...).
    """
    old, new = _flat(before), _flat(after)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    refused = [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]
    if refused:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in refused)
        raise ConfigError(
            f"--resume {run}: {shown} would change what the checkpoint was trained with; start a new run"
            f" for that (on resume only {', '.join(RESUMABLE)} may change)"
        )


def _flat(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


# ------------------------------------------------------------------------------------------ loading runs
def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda:1``, ...).

    Raises:
        ConfigError: not a device name, or CUDA asked for where it is not available.
    """
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' was asked for but CUDA is not available")
    return dev


def run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """The config of a run directory written by ``amortize train``, with the overrides its resumes recorded.

    Raises:
        ConfigError: not a run directory (names it), or a bad override.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml; runs are made by 'amortize train')")
    return load_config(run / "config.yaml", recorded_overrides(run) + list(overrides))  # resumes' overrides first


def load_run(
    run_dir: str | os.PathLike, overrides: Sequence[str] = (), device: str | None = None, with_sampler: bool = False
) -> tuple[Config, Callable, Amortizer]:
    """Load a run directory written by ``amortize train``: its config, model and trained amortizer.

    Args:
        run_dir: the run directory (``config.yaml`` and ``checkpoint.pt`` inside).
        overrides: ``key=value`` changes to the snapshotted config.
        device: overrides the config's ``device``.
        with_sampler: build the training structure sampler (needed to continue training or simulate).

    Returns:
        ``(config, model, amortizer)``.
    """
    run = Path(run_dir)
    cfg = run_config(run, overrides)
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    sampler = build_sampler(cfg) if with_sampler else None
    amortizer = Amortizer.load(
        run / "checkpoint.pt", model, sampler=sampler, device=resolve_device(device or cfg.device)
    )
    return cfg, model, amortizer


def read_data(
    cfg: Config,
    amortizer: Amortizer,
    path: str | os.PathLike,
    levels: str | None = None,
    response: str | None = None,
    covariates: Sequence[str] | None = None,
    nested_ids: bool = False,
) -> HierarchicalData:
    """The CSV at ``path``, read with the config's dataset spec, its response checked against the model's
    likelihood. ``levels`` (id columns, outermost first, comma-separated), ``response``, ``covariates``
    (items ``LEVEL:COL[,COL...]``) and ``nested_ids`` override the spec (the ``--data`` flags of ``amortize``).

    Raises:
        ConfigError: a ``covariates`` item without ``LEVEL:``.
        DataError: a column missing (saying which came from the config, and the flag that names
            another), or a response the likelihood cannot give (a Poisson -1, a Bernoulli 0.5), named with
            ``path``.
    """
    spec = replace(dataset_spec(cfg))
    if levels:
        spec.levels = [s.strip() for s in levels.split(",") if s.strip()]
    spec.response = response or spec.response
    if covariates is not None:
        spec.covariates = {}
        for item in covariates:
            lvl, sep, cols = item.partition(":")
            if not sep or not lvl or not cols:
                raise ConfigError(f"--covariates: expected LEVEL:COL[,COL...], got '{item}'")
            spec.covariates.setdefault(lvl, []).extend(c.strip() for c in cols.split(",") if c.strip())
    spec.nested_ids = spec.nested_ids or nested_ids
    try:
        data = read_dataset(spec, path, key="--data")
    except DataError as e:  # a column the config named and the caller did not override: say where it came from
        hints = [f"the response '{spec.response}' comes from the config; name yours with --response COLUMN"]
        hints = hints if not response and f"column '{spec.response}' is not" in str(e) else []
        missing = [lvl for lvl in spec.levels if f"column '{lvl}' is not" in str(e)]
        if missing and not levels:
            hints.append(f"the levels {list(spec.levels)} come from the config; name yours with --levels A,B")
        if not hints:
            raise
        raise DataError(f"{e} ({'; '.join(hints)})") from None
    try:
        amortizer.structure.check_response(data)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return data


# -------------------------------------------------------------------------------------------- training
def new_amortizer(cfg: Config) -> Amortizer:
    """An untrained amortizer of the model, training structures and network ``cfg`` names."""
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    return Amortizer(
        model,
        build_sampler(cfg),
        hidden=cfg.network.hidden,
        seed=cfg.seed,
        device=resolve_device(cfg.device),
        global_coupling=cfg.network.global_coupling,
    )


def new_run_dir(run_dir: str | os.PathLike | None, root: str | os.PathLike, name: str) -> tuple[Path, list[Path]]:
    """A new run's folder (``run_dir``, else ``root/checkpoints/name/<timestamp>``), and the folders made for
    it (removed again if no checkpoint comes of it).

    Raises:
        ConfigError: ``run_dir`` holds a run already, or no new timestamped folder can be made.
    """
    if run_dir:
        run = Path(run_dir)
        if (run / "checkpoint.pt").exists():
            raise ConfigError(f"--run-dir {run}: already holds a run; continue it with --resume {run}")
        return run, make_dirs(run, exist_ok=True)
    folder = Path(root) / "checkpoints" / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        run = folder / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            return run, make_dirs(run, exist_ok=False)
        except FileExistsError:
            continue
    raise ConfigError(f"{folder}: cannot make a new run directory for {stamp}")


@contextlib.contextmanager
def new_run(cfg: Config, run_dir: str | os.PathLike | None = None, root: str | os.PathLike = ".") -> Iterator[Path]:
    """A new run folder (see :func:`new_run_dir`), locked, with ``config.yaml`` written, for the body to train
    in; if the body fails before a checkpoint, what was written and the folders made are removed again
    (files of the user's that were there before are kept)."""
    run, made = new_run_dir(run_dir, root, cfg.name)
    before = present(run)  # a folder the user gave may hold files of theirs by these names: kept
    try:
        with locked(run):
            try:
                if (run / "checkpoint.pt").exists():  # another run finished here since the check above
                    raise ConfigError(f"--run-dir {run}: already holds a run; continue it with --resume {run}")
                save_config(cfg, run / "config.yaml")
                yield run
            except BaseException:
                remove_half_made(run, made, keep=before)  # under the lock: nobody else's files
                raise
    except ConfigError:
        remove_half_made(run, made, files=False)  # the lock was another's: only our folders, if left empty
        raise


@contextlib.contextmanager
def resumed(run_dir: str | os.PathLike, overrides: Sequence[str]) -> Iterator[tuple[Config, Amortizer]]:
    """The run at ``run_dir``, locked, loaded with ``overrides`` (and its sampler) for the body to train on.

    Raises:
        ConfigError: not a run directory, another writer holds it, or an override would change what the
            checkpoint was trained with (:func:`refuse_changes`).
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml; runs are made by 'amortize train')")
    with locked(run):
        recorded = recorded_overrides(run)
        refuse_changes(
            run,
            load_config(run / "config.yaml", recorded),
            load_config(run / "config.yaml", recorded + list(overrides)),
        )
        cfg, _, amortizer = load_run(run, overrides, with_sampler=True)
        yield cfg, amortizer
