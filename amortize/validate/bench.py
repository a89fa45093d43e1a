"""``amortize bench``: accuracy and speed of trained runs in one table, against a reference posterior or NUTS.

Each run directory is compared with the best ground truth there is for its model:

* a model with a published reference posterior (:data:`REFERENCES`: radon Minnesota against
  Inference Gym's ground-truth means and sds, eight schools against posteriordb's reference draws)
  is compared with it on the real data the reference was computed for;
* any other model (or every model with ``against="nuts"``) is compared with NUTS on held-out
  datasets simulated from the model, with the run's ``validate`` settings (the same datasets and
  NUTS settings as ``amortize validate``), through :func:`~amortize.validate.heldout.against_nuts`.

Rows are pooled per level (global, then each plate level) as in ``amortize validate``.

Example:
    >>> entry = bench_run("checkpoints/radon_minnesota/20250101-120000")  # doctest: +SKIP
    >>> print(format_table(entry["summary"]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..data import HierarchicalData
from ..errors import ConfigError
from . import reference
from .metrics import ReferenceMoments, compare, format_table, summarize

if TYPE_CHECKING:
    import argparse

    from ..amortizer import Amortizer

__all__ = [
    "Reference",
    "REFERENCES",
    "bench_run",
    "table_rows",
    "cli",
    "COLUMNS",
    "machine_description",
    "machine_info",
    "results_header",
    "write_results",
]

log = logging.getLogger(__name__)
COLUMNS = (
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


@dataclass(frozen=True)
class Reference:
    """A published posterior of one shipped model.

    Attributes:
        name: what the table calls it.
        load: returns ``(data, posterior)``: the dataset the reference was computed for, and
            reference draws (site -> ``[m, *shape]``) or :class:`ReferenceMoments`.
    """

    name: str
    load: Callable[[], tuple[HierarchicalData, Mapping[str, torch.Tensor] | ReferenceMoments]]


def _radon() -> tuple[HierarchicalData, ReferenceMoments]:
    from ..models.radon import radon_minnesota_data

    return radon_minnesota_data(), reference.radon_minnesota("halfnormal")[1]


def _eight_schools() -> tuple[HierarchicalData, dict[str, torch.Tensor]]:
    from ..models import eight_schools_data

    y, sigma, draws = reference.eight_schools()
    return eight_schools_data(y.tolist(), sigma.tolist()), draws


REFERENCES: dict[str, Reference] = {  # a config's model spec -> its reference
    "amortize.models.radon:radon_contextual_effects": Reference("Inference Gym", _radon),
    "amortize.models:eight_schools": Reference("posteriordb", _eight_schools),
}


def bench_run(
    run_dir: str | os.PathLike,
    against: str = "auto",
    datasets: int | None = None,
    num_samples: int | None = None,
    device: str | None = None,
    progress: bool = False,
    figures: bool = True,
) -> dict[str, Any]:
    """Compare one trained run with its reference posterior or with NUTS.

    Args:
        run_dir: a run directory written by ``amortize train``.
        against: ``"auto"`` (the model's reference when it has one and the reference files are
            there, else NUTS), ``"reference"`` or ``"nuts"``.
        datasets: held-out datasets for NUTS (default: the run's ``validate.datasets``).
        num_samples: amortized draws per dataset (default: ``validate.num_samples``).
        device: overrides the run's device.
        progress: progress bars for the NUTS runs.
        figures: write the per-site figures of a reference comparison to ``run_dir/tb`` (tags
            ``bench/<site>``; needs matplotlib).

    Returns:
        A JSON-ready dict: ``run``, ``against``, ``summary`` (rows per level), ``rows`` (per site and
        element), ``amortized_seconds_per_dataset``, ``nuts_seconds_per_dataset`` (None against a
        reference), ``speedup``, ``diagnostics`` (Pareto k per dataset) and ``settings``.

    Raises:
        ConfigError: not a run directory, an unknown ``against``, or ``against="reference"`` for a
            model without a reference.
        ReferenceNotFoundError: ``against="reference"`` and the reference files are missing.
    """
    from ..cli import load_run
    from ..config import load_config

    if against not in ("auto", "reference", "nuts"):
        raise ConfigError(f"bench: against must be 'auto', 'reference' or 'nuts', got {against!r}")
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml; runs are made by 'amortize train')")
    spec = load_config(run / "config.yaml").model
    ref = REFERENCES.get(spec) if against != "nuts" else None
    if against == "reference" and ref is None:
        known = ", ".join(sorted(REFERENCES))
        raise ConfigError(f"{run}: no reference posterior for model '{spec}' (known: {known}); use --against nuts")
    loaded = None
    if ref is not None:
        try:
            loaded = ref.load()
        except reference.ReferenceNotFoundError as e:
            if against == "reference":
                raise
            log.warning("%s: %s; comparing with NUTS on held-out simulations instead", run, e)
    cfg, _, amortizer = load_run(run, device=device, with_sampler=loaded is None)
    v = cfg.validate
    n_draws = num_samples or v.num_samples
    seed = v.seed if v.seed is not None else cfg.seed + 100_003
    label = f"{cfg.name}/{run.name}"
    settings: dict[str, Any] = {"num_samples": n_draws, "seed": seed, "step": amortizer.step}
    if loaded is not None:
        assert ref is not None
        data, ref_post = loaded
        entry = _against_reference(amortizer, data, ref_post, n_draws, seed)
        entry["against"] = ref.name
        if figures:
            _figures(run, amortizer, data, ref_post, n_draws, seed, ref.name)
    else:
        from .heldout import against_nuts, heldout_datasets

        num = datasets or v.datasets
        sets = heldout_datasets(amortizer, num, seed)
        nuts = {**asdict(v.nuts), "progress": progress}
        report = against_nuts(amortizer, sets, n_draws, nuts=nuts, seed=seed, progress=progress)
        for i, d in enumerate(sets):
            report.diagnostics.append({"dataset": i, **amortizer.posterior(d).diagnostics(n_draws, seed + i)})
        entry = {"against": f"NUTS, {num} held-out", **report.to_dict()}
        settings.update(datasets=num, nuts=asdict(v.nuts))
        if not report.rows:
            log.warning("%s: no held-out dataset has a NUTS reference that passed its checks", run)
    return {"run": label, "run_dir": str(run), **entry, "settings": settings}


def _against_reference(
    amortizer: Amortizer,
    data: HierarchicalData,
    ref: Mapping[str, torch.Tensor] | ReferenceMoments,
    num_samples: int,
    seed: int,
) -> dict[str, Any]:
    levels = {s.name: s.level for s in amortizer.structure.latents}
    amortizer.posterior(data).sample(10)  # warm-up: first-call overheads are not inference time
    t0 = time.perf_counter()
    post = amortizer.posterior(data)
    draws = post.sample(num_samples, seed=seed)
    seconds = time.perf_counter() - t0
    rows = compare(draws, ref, levels)
    return {
        "summary": summarize(rows, by="level"),
        "amortized_seconds_per_dataset": seconds,
        "nuts_seconds_per_dataset": None,
        "speedup": None,
        "diagnostics": [{"dataset": 0, **post.diagnostics(num_samples, seed)}],
        "rows": [{**r, "index": list(r["index"])} for r in rows],
    }


def _figures(
    run: Path,
    amortizer: Amortizer,
    data: HierarchicalData,
    ref: Mapping[str, torch.Tensor] | ReferenceMoments,
    num_samples: int,
    seed: int,
    name: str,
) -> None:
    from . import plots

    if not plots.available():
        log.warning("no TensorBoard figures: matplotlib is not installed (pip install 'amortize[arviz]')")
        return
    levels = {s.name: s.level for s in amortizer.structure.latents}
    draws = amortizer.posterior(data).sample(num_samples, seed=seed)
    figs = plots.marginal_figures(draws, ref, levels, data.labels, label=name)
    plots.write_tensorboard(run / "tb", figs, step=amortizer.step, prefix="bench/")


def table_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and level, with the run's timings and its worst Pareto k."""
    rows = []
    for e in entries:
        ks = [d["pareto_k"] for d in e.get("diagnostics", []) if d.get("pareto_k") is not None]
        ks = [k for k in ks if np.isfinite(k)]
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


def cli(args: argparse.Namespace) -> int:
    """``amortize bench RUN_DIR [RUN_DIR ...]``: print the table, write JSON (``--json`` or ``RUN_DIR/bench.json``)."""
    from ..cli import _json_safe
    from ..config import write_text

    progress = not args.quiet and not os.environ.get("CI")
    entries = []
    for run in args.run_dirs:
        entry = bench_run(run, args.against, args.datasets, args.num_samples, args.device, progress)
        entries.append(entry)
        if not args.json:
            write_text(Path(run) / "bench.json", json.dumps(_json_safe(entry), indent=1, allow_nan=False))
    print(format_table(table_rows(entries), COLUMNS))
    if args.json:
        write_text(args.json, json.dumps(_json_safe({"runs": entries}), indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    else:
        print("wrote " + ", ".join(str(Path(r) / "bench.json") for r in args.run_dirs))
    return 0


# ------------------------------------------------------------------ results of the experiments/bench scripts
def machine_description(device: str | torch.device | None = None, *, threads: bool = False, extra: str = "") -> str:
    """The machine a benchmark ran on, as its results header names it.

    ``"<arch>, <n> cpus, torch <version>"``, followed by ``extra`` verbatim (e.g. ``" (CPU)"``), then
    ``", <n> thread(s)"`` (torch's CPU threads now) with ``threads``, then ``", device <device>"`` (and
    the GPU's name in parentheses on CUDA) with ``device``.
    """
    text = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}{extra}"
    if threads:
        text += f", {torch.get_num_threads()} thread(s)"
    if device is not None:
        device = torch.device(device)
        text += f", device {device}"
        if device.type == "cuda":
            text += f" ({torch.cuda.get_device_name(device)})"
    return text


def machine_info(
    device: str | torch.device | None = None, *, threads: bool = False, extra: str = "", with_time: bool = False
) -> dict[str, str]:
    """``{"date": ..., "machine": ...}``: today (``YYYY-MM-DD``, with ``HH:MM`` if ``with_time``) and
    :func:`machine_description` (same arguments); the first two keys of a benchmark's results."""
    date = time.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")
    return {"date": date, "machine": machine_description(device, threads=threads, extra=extra)}


def results_header(info: Mapping[str, Any], detail: str | None = None) -> str:
    """The first line of a benchmark's markdown: ``"Measured <date> on <machine>[; <detail>]."``.

    ``info`` holds ``date`` and ``machine`` (:func:`machine_info`, or the results dict that starts with it).
    """
    return f"Measured {info['date']} on {info['machine']}" + (f"; {detail}" if detail else "") + "."


def write_results(
    out_dir: str | os.PathLike,
    payload: Mapping[str, Any],
    markdown: str,
    *,
    indent: int = 1,
    default: Callable[[Any], Any] | None = None,
    safe: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/results.json`` (``payload``) and ``out_dir/results.md`` (``markdown`` as given).

    Both are serialized first, then each file is written to a temporary file in ``out_dir`` and
    renamed over the old one (:func:`~amortize.checkpoint.atomic_write`): a reader sees the old file or
    the new one, never half of one, and a payload that cannot be serialized raises before anything
    is written, leaving both files as they were.

    Args:
        out_dir: the results folder (created if missing).
        payload: the JSON results.
        markdown: the markdown text, written verbatim.
        indent: JSON indentation.
        default: ``json.dumps``'s fallback for objects it cannot serialize (e.g. ``str``).
        safe: first convert tensors and arrays to lists and non-finite floats to ``null``.

    Returns:
        The paths of ``results.json`` and ``results.md``.

    Raises:
        TypeError, ValueError: ``payload`` cannot be serialized (nothing written).
        OSError: a write failed (that file and any later one untouched; no temporary file left).
    """
    if safe:
        from ..cli import _json_safe

        payload = _json_safe(payload)
    blob = json.dumps(payload, indent=indent, default=default).encode()
    text = markdown.encode()
    out = Path(out_dir)
    json_path, md_path = out / "results.json", out / "results.md"
    atomic_write(json_path, lambda fh: fh.write(blob))
    atomic_write(md_path, lambda fh: fh.write(text))
    return json_path, md_path
