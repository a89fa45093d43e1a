"""Run folders of ``amortize train``: one writer at a time, a history of resumes, nothing half-made.

A run folder holds ``config.yaml`` (the config the run was started with, never rewritten),
``checkpoint.pt``, ``tb/`` (TensorBoard), ``history.yaml`` (one entry per resume: the step it
started from and the overrides it applied) and ``train.lock`` (the pid of the last writer; an
exclusive ``fcntl.flock`` on it while training).

Example:
    >>> with locked(run):  # doctest: +SKIP
    ...     cfg = load_config(run / "config.yaml", recorded_overrides(run))
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from .checkpoint import write_text
from .config import Config
from .errors import ConfigError

__all__ = [
    "LOCK",
    "HISTORY",
    "RESUMABLE",
    "locked",
    "make_dirs",
    "present",
    "remove_half_made",
    "recorded_overrides",
    "record_resume",
    "refuse_changes",
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


def make_dirs(run: Path, exist_ok: bool) -> list[Path]:
    """``mkdir -p run``; returns the folders it made, outermost first (for :func:`remove_half_made`)."""
    missing = [p for p in (run, *run.parents) if not p.exists()][::-1]
    try:
        run.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(run)) from None
    return missing


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
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


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
