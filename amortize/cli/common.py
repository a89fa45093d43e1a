"""What the ``amortize`` commands share: progress and warning lines, run folders, options and ``--data`` flags."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..amortizer import Amortizer
from ..config import Config, config_dir, config_source, load_config
from ..data import HierarchicalData
from ..errors import ConfigError, DataError
from ..experiment import build_sampler, dataset_spec, read_dataset
from ..modelspec import resolve_model
from ..posterior import K_THRESHOLD
from ..rundir import recorded_overrides

__all__ = ["load_run", "run_config"]


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars: not with ``--quiet`` and not when ``CI`` is set."""
    return not args.quiet and not os.environ.get("CI")


def _note(args: argparse.Namespace, text: str) -> None:
    """A progress line on stderr (stdout is kept for results)."""
    if not args.quiet:
        print(text, file=sys.stderr)


def _warn(text: str) -> None:
    print(f"amortize: warning: {text}", file=sys.stderr)


def _warn_diagnostics(diag: dict[str, Any], hint: str = "") -> None:
    """Each problem of a posterior's diagnostics as one warning line (``hint``: what to do next)."""
    for flag in diag["flags"]:
        _warn(f"outside the training range: {flag}")
    k = diag["pareto_k"]
    if k > K_THRESHOLD:
        _warn(f"Pareto k {k:.2f} > {K_THRESHOLD}: do not trust these draws{'; ' + hint if hint else ''}")


def _device(name: str) -> torch.device:
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
    amortizer = Amortizer.load(run / "checkpoint.pt", model, sampler=sampler, device=_device(device or cfg.device))
    return cfg, model, amortizer


def _validation_seed(cfg: Config) -> int:
    """``validate.seed``, else the training seed moved apart from training's streams."""
    return cfg.validate.seed if cfg.validate.seed is not None else cfg.seed + 100_003


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return int(text)


def _data_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, metavar="CSV", help="long-format CSV, one row per observation")
    p.add_argument("--levels", help="id columns, outermost first, comma-separated (default: from the config)")
    p.add_argument("--response", help="response column (default: from the config)")
    p.add_argument("--covariates", action="append", metavar="LEVEL:COL[,COL]", help="covariate columns (repeatable)")
    p.add_argument("--nested-ids", action="store_true", help="ids repeat within parents")


def _read_data(cfg: Config, args: argparse.Namespace, amortizer: Amortizer) -> HierarchicalData:
    """The ``--data`` CSV, read with the config's dataset spec, columns overridden by flags, its response
    checked against the model's likelihood (a Poisson -1 or a Bernoulli 0.5: named with its file)."""
    spec = replace(dataset_spec(cfg))
    if args.levels:
        spec.levels = [s.strip() for s in args.levels.split(",") if s.strip()]
    if args.response:
        spec.response = args.response
    if args.covariates is not None:
        spec.covariates = {}
        for item in args.covariates:
            lvl, sep, cols = item.partition(":")
            if not sep or not lvl or not cols:
                raise ConfigError(f"--covariates: expected LEVEL:COL[,COL...], got '{item}'")
            spec.covariates.setdefault(lvl, []).extend(c.strip() for c in cols.split(",") if c.strip())
    if args.nested_ids:
        spec.nested_ids = True
    try:
        data = read_dataset(spec, args.data, key="--data")
    except DataError as e:  # a column the config named and the flags did not override: say where it came from
        hints = [f"the response '{spec.response}' comes from the config; name yours with --response COLUMN"]
        hints = hints if not args.response and f"column '{spec.response}' is not" in str(e) else []
        missing = [lvl for lvl in spec.levels if f"column '{lvl}' is not" in str(e)]
        if missing and not args.levels:
            hints.append(f"the levels {list(spec.levels)} come from the config; name yours with --levels A,B")
        if not hints:
            raise
        raise DataError(f"{e} ({'; '.join(hints)})") from None
    try:
        amortizer.structure.check_response(data)
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    return data
