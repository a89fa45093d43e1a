"""``amortize validate``, ``sbc`` and ``bench``: run the checks of :mod:`amortize.validate`, print and write them.

Each validation has a name (``--name``; default: the ``--data`` file's stem, or ``heldout``): its
report is ``RUN_DIR/validate-<name>.json`` and its TensorBoard tags ``validate/<name>/...``, so a
held-out validation and one on a dataset never overwrite each other. SBC writes ``sbc.json``, two
PNG files beside it and the tags ``sbc/ecdf``, ``sbc/hist``; ``bench`` writes ``RUN_DIR/bench.json``
(or one ``--json``) and, against a published reference, the tags ``bench/<site>``.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..amortizer import Amortizer
from ..errors import ConfigError
from ..validate import plots
from ..validate.bench import against_reference, reference_for
from ..validate.heldout import Report, against_nuts, heldout_datasets
from ..validate.metrics import format_table
from ..validate.sbc import sbc
from ..validate.workflow_plots import pair_figure, recovery_figures
from .common import (
    _progress,
    _read_data,
    _validation_seed,
    _warn,
    _warn_diagnostics,
    load_run,
    run_config,
)
from .output import _write_json

__all__ = ["cmd_validate", "cmd_sbc", "cmd_bench", "BENCH_COLUMNS"]

BENCH_COLUMNS = (
    "run",
    "against",
    "level",
    "count",
    "z_median",
    "z_p90",
    "sd_ratio_median",
    "coverage90",
    "pareto_k",
    "amortized_s",
    "nuts_s",
    "speedup",
)
SCALARS = ("z_median", "z_p90", "sd_ratio_median", "coverage90")  # per level, into TensorBoard
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NO_MATPLOTLIB = "no figures: matplotlib is not installed (pip install 'amortize[arviz]')"


def _validation_name(args: argparse.Namespace) -> str:
    """``--name``, else the ``--data`` file's stem (characters other than letters, digits, ``_.-`` as ``_``),
    else ``heldout``."""
    if args.name is not None:
        if not _NAME.fullmatch(args.name):
            raise ConfigError(f"--name '{args.name}': use letters, digits, '_', '.' and '-' (it names files and tags)")
        return args.name
    if args.data:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.data).stem).strip("_.-") or "data"
    return "heldout"


def _figures(amortizer: Amortizer, report: Report, per_dataset: bool) -> dict[str, Any]:
    """The kept comparisons of ``report`` as figures: tag ``<site>``, or ``dataset_<i>/<site>``, and
    ``pairs``: the pair plot of the global sites against the reference draws."""
    levels = {s.name: s.level for s in amortizer.structure.latents}
    globals_ = [s.name for s in amortizer.structure.latents if s.level is None]
    figures = {}
    for c in report.compared:
        where = f"dataset_{c.dataset}/" if per_dataset else ""
        for site, fig in plots.marginal_figures(c.draws, c.reference, levels, c.labels, c.name).items():
            figures[where + site] = fig
        if globals_:
            ref = c.reference if isinstance(c.reference, dict) else None
            figures[where + "pairs"] = pair_figure(c.draws, globals_, ref)
    return figures


def cmd_validate(args: argparse.Namespace) -> int:
    """``amortize validate``: amortized posterior vs NUTS, on ``--data`` or on held-out simulations."""
    name = _validation_name(args)
    cfg, _, amortizer = load_run(args.run_dir, args.overrides, device=args.device, with_sampler=not args.data)
    v = cfg.validate
    n = args.datasets if args.datasets is not None else v.datasets
    num_samples = args.num_samples or v.num_samples
    seed = _validation_seed(cfg) if args.seed is None else args.seed
    if args.data:
        source, datasets = str(args.data), [_read_data(cfg, args, amortizer)]
    else:
        source, datasets = f"{n} held-out simulated dataset(s), seed {seed}", heldout_datasets(amortizer, n, seed)
    keep = args.figures
    if keep and not plots.available():
        _warn(NO_MATPLOTLIB)
        keep = 0
    progress = _progress(args)
    nuts = {**asdict(v.nuts), "progress": progress}
    report = against_nuts(
        amortizer,
        datasets,
        num_samples,
        nuts=nuts,
        seed=seed,
        progress=progress,
        keep=keep,
        diagnose=True,
        k_sets=args.k_sets,
    )
    if args.data:
        _warn_diagnostics(report.diagnostics[0], hint="the table below compares them with NUTS")
    print(
        f"{args.run_dir}: validation '{name}': amortized ({num_samples} draws) vs"
        f" NUTS ({v.nuts.num_chains}x{v.nuts.num_samples}) on {source}"
    )
    if report.rows:
        print(report.table(by=args.by))
    else:
        _warn("no dataset has a NUTS reference that passed its checks: nothing to compare (see the JSON report)")
    settings = {"num_samples": num_samples, "seed": seed, "datasets": len(datasets), "nuts": asdict(v.nuts)}
    result = {"name": name, "run_dir": str(args.run_dir), "source": source, "settings": settings, **report.to_dict()}
    run = Path(args.run_dir)
    out = _write_json(Path(args.json) if args.json else run / f"validate-{name}.json", result)
    print(f"wrote {out}")
    figures = _figures(amortizer, report, per_dataset=not args.data)
    if not args.data and keep and args.recovery:  # truth vs posterior on held-out simulations (no NUTS: cheap)
        figures.update(recovery_figures(amortizer, args.recovery, num_samples, seed))
    scalars = {f"{row['level']}/{k}": row[k] for row in report.summary for k in SCALARS if row.get(k) is not None}
    ks = [d["pareto_k"] for d in report.diagnostics if isinstance(d.get("pareto_k"), float)]
    if ks:
        scalars["pareto_k_max"] = max(ks)
    if figures or scalars:
        prefix = f"validate/{name}/"
        tags = plots.write_tensorboard(run / "tb", figures, step=amortizer.step, prefix=prefix, scalars=scalars)
        if tags:
            print(f"wrote {len(tags)} figures to {run / 'tb'} under {prefix} (tensorboard --logdir {run})")
    return 0


def cmd_sbc(args: argparse.Namespace) -> int:
    """``amortize sbc``: SBC table, ``sbc.json``, ECDF and rank plots (PNG and TensorBoard); exit 1 if one fails."""
    cfg, _, amortizer = load_run(args.run_dir, args.overrides, device=args.device, with_sampler=True)
    seed = cfg.seed + 200_003
    res = sbc(amortizer, num_datasets=args.datasets, num_samples=args.num_samples, seed=seed, progress=_progress(args))
    print(
        f"{args.run_dir}: SBC on {res.num_datasets} simulated datasets, {res.num_draws} draws each"
        f" (seed {seed}); band {1 - res.alpha_per_quantity:.2%} per quantity"
        f" ({'family-wise ' if res.settings['familywise'] else ''}alpha {res.alpha})"
    )
    print(res.table())
    run = Path(args.run_dir)
    out = Path(args.json) if args.json else run / "sbc.json"
    written = [_write_json(out, {"run_dir": str(run), **res.to_dict()})]
    figures = {}
    if plots.available():
        for kind in ("ecdf", "hist"):
            figures[kind] = res.figure(kind)
            written.append(plots.save_png(figures[kind], out.with_name(f"{out.stem}_{kind}.png")))
    else:
        _warn(NO_MATPLOTLIB)
    print("passed" if res.passed else "FAILED: " + ", ".join(res.failed()))
    print("wrote " + ", ".join(str(p) for p in written))
    scalars = {
        f"{re.sub(r'[^A-Za-z0-9_.]+', '_', r['quantity']).strip('_')}/p_value": r["p_value"]
        for r in res.rows
        if r.get("p_value") is not None
    }
    if figures or scalars:
        tags = plots.write_tensorboard(run / "tb", figures, step=amortizer.step, prefix="sbc/", scalars=scalars)
        print(f"wrote {', '.join(tags)} and {len(scalars)} p-values (sbc/<quantity>/p_value) to {run / 'tb'}")
    return 0 if res.passed else 1


def _bench_run(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """One run against its model's reference posterior, or NUTS on held-out simulations: the JSON entry."""
    run = Path(run_dir)
    try:
        ref = reference_for(run_config(run).model, args.against)
    except ConfigError as e:
        raise ConfigError(f"{run}: {e}") from None
    cfg, _, amortizer = load_run(run, device=args.device, with_sampler=ref is None)
    v = cfg.validate
    num_samples = args.num_samples or v.num_samples
    seed = _validation_seed(cfg)
    settings: dict[str, Any] = {"num_samples": num_samples, "seed": seed, "step": amortizer.step}
    if ref is not None:
        report, against = against_reference(amortizer, ref, num_samples, seed, args.k_sets), ref.name
        if plots.available():
            scalars = {f"{r['level']}/{k}": r[k] for r in report.summary for k in SCALARS if r.get(k) is not None}
            plots.write_tensorboard(
                run / "tb", _figures(amortizer, report, False), step=amortizer.step, prefix="bench/", scalars=scalars
            )
        else:
            _warn(NO_MATPLOTLIB)
    else:
        num, progress = args.datasets or v.datasets, _progress(args)
        sets = heldout_datasets(amortizer, num, seed)
        nuts = {**asdict(v.nuts), "progress": progress}
        report = against_nuts(
            amortizer, sets, num_samples, nuts=nuts, seed=seed, progress=progress, diagnose=True, k_sets=args.k_sets
        )
        against = f"NUTS, {num} held-out"
        settings.update(datasets=num, nuts=asdict(v.nuts))
        if not report.rows:
            _warn(f"{run}: no held-out dataset has a NUTS reference that passed its checks")
    return {
        "run": f"{cfg.name}/{run.name}",
        "run_dir": str(run),
        "against": against,
        **report.to_dict(),
        "settings": settings,
    }


def _bench_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and level, with the run's timings and its worst Pareto k."""
    rows = []
    for e in entries:
        ks = [d["pareto_k"] for d in e["diagnostics"] if d.get("pareto_k") is not None and math.isfinite(d["pareto_k"])]
        extra = {
            "run": e["run"],
            "against": e["against"],
            "pareto_k": max(ks) if ks else None,
            "amortized_s": e["amortized_seconds_per_dataset"],
            "nuts_s": e["nuts_seconds_per_dataset"],
            "speedup": e["speedup"],
        }
        rows += [{**extra, **s} for s in e["summary"]] or [{**extra, "level": "(no comparison)"}]
    return rows


def cmd_bench(args: argparse.Namespace) -> int:
    """``amortize bench RUN_DIR [RUN_DIR ...]``: print the table, write JSON (``--json`` or ``RUN_DIR/bench.json``)."""
    entries = []
    for run in args.run_dirs:
        entries.append(_bench_run(args, run))
        if not args.json:
            _write_json(Path(run) / "bench.json", entries[-1])
    print(format_table(_bench_rows(entries), BENCH_COLUMNS))
    if args.json:
        print(f"wrote {_write_json(args.json, {'runs': entries})}")
    else:
        print("wrote " + ", ".join(str(Path(r) / "bench.json") for r in args.run_dirs))
    return 0
