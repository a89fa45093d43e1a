"""What ``amortize validate``, ``sbc`` and ``bench`` compute and write: values, never prints.

Each function takes a loaded run (:func:`amortize.rundir.load_run`) and returns what the command
prints from (reports, tables' rows, the paths it wrote); the JSON reports, PNG files and TensorBoard
figures are written here, atomically. Each validation has a name (:func:`validation_name`): its report
is ``RUN_DIR/validate-<name>.json`` and its TensorBoard tags ``validate/<name>/...``, so a held-out
validation and one on a dataset never overwrite each other. SBC writes ``sbc.json``, two PNG files
beside it and the tags ``sbc/ecdf``, ``sbc/hist``; ``bench`` returns one JSON entry per run and, against
a published reference, writes the tags ``bench/<site>``. (``ppc`` and ``sample``:
:mod:`amortize.validate.draw_checks`.)

Example:
    >>> cfg, _, amortizer = load_run(run)  # doctest: +SKIP
    >>> val = validate_run(cfg, amortizer, run, "heldout", datasets=5)  # doctest: +SKIP
    >>> print(val.report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..data import HierarchicalData
from ..errors import ConfigError
from ..files import write_json
from ..rundir import load_run, run_config
from . import plots
from .bench import against_reference, reference_for
from .draw_checks import warn_diagnostics
from .heldout import Report, against_nuts, heldout_datasets
from .sbc import SBCResult, sbc
from .workflow_plots import pair_figure, recovery_figures

if TYPE_CHECKING:
    from ..amortizer import Amortizer

__all__ = [
    "Validation",
    "SBCRun",
    "validation_seed",
    "validation_name",
    "validate_run",
    "validation_figures",
    "sbc_run",
    "bench_run",
    "bench_rows",
    "BENCH_COLUMNS",
]

log = logging.getLogger(__name__)
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
NO_MATPLOTLIB = "no figures: matplotlib is not installed (pip install 'amortize[arviz]')"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validation_seed(cfg: Config) -> int:
    """``validate.seed``, else the training seed moved apart from training's streams."""
    return cfg.validate.seed if cfg.validate.seed is not None else cfg.seed + 100_003


def validation_name(name: str | None, data: str | os.PathLike | None) -> str:
    """``name``, else the ``data`` file's stem (characters other than letters, digits, ``_.-`` as ``_``),
    else ``heldout``.

    Raises:
        ConfigError: ``name`` is not usable in file names and tags.
    """
    if name is not None:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"--name '{name}': use letters, digits, '_', '.' and '-' (it names files and tags)")
        return name
    if data:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).stem).strip("_.-") or "data"
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


def _scalars(report: Report) -> dict[str, float]:
    """Per level the summary's z, sd ratio and coverage, as TensorBoard scalars ``<level>/<metric>``."""
    return {f"{r['level']}/{k}": r[k] for r in report.summary for k in SCALARS if r.get(k) is not None}


# ---------------------------------------------------------------------------------------------- validate
@dataclass
class Validation:
    """One validation of a run: what it compared (``source``), the report and its JSON ``result``."""

    name: str
    run_dir: Path
    source: str
    num_samples: int
    seed: int
    heldout: bool  # on held-out simulations (else on one given dataset)
    keep: int  # datasets kept for figures (0 without matplotlib)
    report: Report
    result: dict[str, Any]


def validate_run(
    cfg: Config,
    amortizer: Amortizer,
    run_dir: str | os.PathLike,
    name: str,
    data: HierarchicalData | None = None,
    data_path: str | os.PathLike | None = None,
    datasets: int | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    keep: int = 3,
    k_sets: int = 4,
    progress: bool = False,
) -> Validation:
    """The amortized posterior vs NUTS on ``data`` (read from ``data_path``), else on ``datasets`` held-out
    simulations (default ``validate.datasets``); ``keep`` datasets' draws are kept for figures."""
    v = cfg.validate
    n = datasets if datasets is not None else v.datasets
    num_samples = num_samples or v.num_samples
    seed = validation_seed(cfg) if seed is None else seed
    if data is not None:
        source, sets = str(data_path), [data]
    else:
        source, sets = f"{n} held-out simulated dataset(s), seed {seed}", heldout_datasets(amortizer, n, seed)
    if keep and not plots.available():
        log.warning(NO_MATPLOTLIB)
        keep = 0
    nuts = {**asdict(v.nuts), "progress": progress}
    report = against_nuts(
        amortizer, sets, num_samples, nuts=nuts, seed=seed, progress=progress, keep=keep, diagnose=True, k_sets=k_sets
    )
    if data is not None:
        warn_diagnostics(report.diagnostics[0], hint="the table below compares them with NUTS")
    if not report.rows:
        log.warning("no dataset has a NUTS reference that passed its checks: nothing to compare (see the JSON report)")
    settings = {"num_samples": num_samples, "seed": seed, "datasets": len(sets), "nuts": asdict(v.nuts)}
    result = {"name": name, "run_dir": str(run_dir), "source": source, "settings": settings, **report.to_dict()}
    return Validation(name, Path(run_dir), source, num_samples, seed, data is None, keep, report, result)


def validation_figures(amortizer: Amortizer, val: Validation, recovery: int = 20) -> list[str] | None:
    """Write ``val``'s figures (amortized vs NUTS per site; on held-out simulations also ``recovery``
    truth-vs-posterior simulations) and scalars to ``RUN_DIR/tb`` under ``validate/<name>/``; returns
    the tags written (None: nothing to write)."""
    figures = _figures(amortizer, val.report, per_dataset=val.heldout)
    if val.heldout and val.keep and recovery:  # truth vs posterior on held-out simulations (no NUTS: cheap)
        figures.update(recovery_figures(amortizer, recovery, val.num_samples, val.seed))
    scalars = _scalars(val.report)
    ks = [d["pareto_k"] for d in val.report.diagnostics if isinstance(d.get("pareto_k"), float)]
    if ks:
        scalars["pareto_k_max"] = max(ks)
    if not figures and not scalars:
        return None
    prefix = f"validate/{val.name}/"
    return plots.write_tensorboard(val.run_dir / "tb", figures, step=amortizer.step, prefix=prefix, scalars=scalars)


# --------------------------------------------------------------------------------------------------- sbc
@dataclass
class SBCRun:
    """SBC of a run: the result, the seed it used, the files written and the TensorBoard tags
    (None: nothing written there) with the number of p-values among them."""

    result: SBCResult
    seed: int
    written: list[Path]
    tags: list[str] | None
    p_values: int


def sbc_run(
    cfg: Config,
    amortizer: Amortizer,
    run_dir: str | os.PathLike,
    num_datasets: int = 200,
    num_samples: int = 1000,
    json_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> SBCRun:
    """SBC on simulated datasets; writes ``json_path`` (default ``RUN_DIR/sbc.json``), the ECDF and rank PNG
    files beside it, and the plots and p-values to ``RUN_DIR/tb`` (tags ``sbc/...``)."""
    seed = cfg.seed + 200_003
    res = sbc(amortizer, num_datasets=num_datasets, num_samples=num_samples, seed=seed, progress=progress)
    run = Path(run_dir)
    out = Path(json_path) if json_path else run / "sbc.json"
    written = [write_json(out, {"run_dir": str(run), **res.to_dict()})]
    figures = {}
    if plots.available():
        for kind in ("ecdf", "hist"):
            figures[kind] = res.figure(kind)
            written.append(plots.save_png(figures[kind], out.with_name(f"{out.stem}_{kind}.png")))
    else:
        log.warning(NO_MATPLOTLIB)
    scalars = {
        f"{re.sub(r'[^A-Za-z0-9_.]+', '_', r['quantity']).strip('_')}/p_value": r["p_value"]
        for r in res.rows
        if r.get("p_value") is not None
    }
    tags = None
    if figures or scalars:
        tags = plots.write_tensorboard(run / "tb", figures, step=amortizer.step, prefix="sbc/", scalars=scalars)
    return SBCRun(res, seed, written, tags, len(scalars))


# ------------------------------------------------------------------------------------------------- bench
def bench_run(
    run_dir: str | os.PathLike,
    against: str = "auto",
    datasets: int | None = None,
    num_samples: int | None = None,
    k_sets: int = 4,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One run against its model's reference posterior, or NUTS on held-out simulations: its JSON entry.

    Raises:
        ConfigError: naming the run, when ``against`` asks for a reference its model does not have.
    """
    run = Path(run_dir)
    try:
        ref = reference_for(run_config(run).model, against)
    except ConfigError as e:
        raise ConfigError(f"{run}: {e}") from None
    cfg, _, amortizer = load_run(run, device=device, with_sampler=ref is None)
    v = cfg.validate
    num_samples = num_samples or v.num_samples
    seed = validation_seed(cfg)
    settings: dict[str, Any] = {"num_samples": num_samples, "seed": seed, "step": amortizer.step}
    if ref is not None:
        report, against = against_reference(amortizer, ref, num_samples, seed, k_sets), ref.name
        if plots.available():
            figures = _figures(amortizer, report, False)
            plots.write_tensorboard(run / "tb", figures, step=amortizer.step, prefix="bench/", scalars=_scalars(report))
        else:
            log.warning(NO_MATPLOTLIB)
    else:
        num = datasets or v.datasets
        sets = heldout_datasets(amortizer, num, seed)
        nuts = {**asdict(v.nuts), "progress": progress}
        report = against_nuts(
            amortizer, sets, num_samples, nuts=nuts, seed=seed, progress=progress, diagnose=True, k_sets=k_sets
        )
        against = f"NUTS, {num} held-out"
        settings.update(datasets=num, nuts=asdict(v.nuts))
        if not report.rows:
            log.warning(f"{run}: no held-out dataset has a NUTS reference that passed its checks")
    return {
        "run": f"{cfg.name}/{run.name}",
        "run_dir": str(run),
        "against": against,
        **report.to_dict(),
        "settings": settings,
    }


def bench_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and level (:data:`BENCH_COLUMNS`), with the run's timings and its worst Pareto k."""
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
