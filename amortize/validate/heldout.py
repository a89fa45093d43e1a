"""Amortized posterior against NUTS on the same model and data, dataset by dataset.

:func:`against_nuts` is the one comparison behind ``amortize validate``, the README's main job and
the benchmark scripts: for each dataset it times 1000 amortized draws and a NUTS run, compares them
site by site (z-error, sd ratio, 90% coverage, W1) and pools the rows per level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..data import HierarchicalData
from ..simulate import simulate
from .metrics import compare, format_table, summarize
from .nuts import NUTSResult, cached_nuts

if TYPE_CHECKING:
    from ..amortizer import Amortizer

__all__ = ["heldout_datasets", "against_nuts", "Report"]

log = logging.getLogger(__name__)


def heldout_datasets(amortizer: Amortizer, num: int, seed: int = 10_000) -> list[HierarchicalData]:
    """``num`` prior-predictive datasets on structures from the training sampler, seeded apart from
    training (each dataset gets its own structure)."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = []
        while len(out) < num:
            sim = simulate(amortizer.model, amortizer.structure, amortizer.sampler.sample(gen), 1)
            if sim.data.batch_size:
                out.append(sim.data.with_response(sim.data.y[0]))
        return out
    finally:
        torch.set_rng_state(state)


@dataclass
class Report:
    """Per-site rows (with the dataset index), their per-level summary, and timings."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    amortized_seconds: list[float] = field(default_factory=list)
    nuts_seconds: list[float] = field(default_factory=list)
    nuts: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    nuts_results: list[NUTSResult] = field(default_factory=list, repr=False)  # the first ``keep_nuts`` runs

    @property
    def speedup(self) -> float:
        """Mean NUTS seconds per dataset over mean amortized seconds per dataset."""
        a = sum(self.amortized_seconds) / max(1, len(self.amortized_seconds))
        n = sum(self.nuts_seconds) / max(1, len(self.nuts_seconds))
        return n / a if a > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "amortized_seconds_per_dataset": sum(self.amortized_seconds) / max(1, len(self.amortized_seconds)),
            "nuts_seconds_per_dataset": sum(self.nuts_seconds) / max(1, len(self.nuts_seconds)),
            "speedup": self.speedup,
            "nuts": self.nuts,
            "diagnostics": self.diagnostics,
            "rows": [{**r, "index": list(r["index"])} for r in self.rows],
        }

    def table(self) -> str:
        """The per-level table with timing columns."""
        a = sum(self.amortized_seconds) / max(1, len(self.amortized_seconds))
        n = sum(self.nuts_seconds) / max(1, len(self.nuts_seconds))
        rows = [{**s, "amortized_s": a, "nuts_s": n, "speedup": self.speedup} for s in self.summary]
        cols = ["level", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90"]
        return format_table(rows, cols + ["count", "amortized_s", "nuts_s", "speedup"])


def against_nuts(
    amortizer: Amortizer,
    datasets: list[HierarchicalData],
    num_samples: int = 1000,
    nuts: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    nuts_cache: str | None = None,
    keep_nuts: int = 0,
    cached_only: bool = False,
    reference: Callable[[HierarchicalData, int], NUTSResult] | None = None,
) -> Report:
    """Compare the amortized posterior with NUTS on each dataset (same model, same data).

    Datasets whose NUTS run fails its own checks (R-hat, ESS, divergences after the
    reparameterization retry) are reported but left out of the accuracy rows. ``nuts_cache``: a
    folder where NUTS results are kept and reused for the same model, data and settings;
    ``keep_nuts``: how many NUTS results (draws included) the report keeps, for figures;
    ``cached_only``: compare only on datasets whose reference is in ``nuts_cache`` (the others are
    listed in ``report.nuts`` as not run). ``reference(data, seed) -> NUTSResult`` replaces Pyro
    NUTS, e.g. NUTS on a NumPyro twin of the model
    (``run_numpyro_nuts`` in ``experiments/bench/numpyro_models.py``).
    """
    report = Report()
    levels = {s.name: s.level for s in amortizer.structure.latents}
    amortizer.posterior(datasets[0]).sample(10)  # warm-up: first-call overheads are not inference time
    for i, data in enumerate(tqdm(datasets, disable=not progress, desc="validate", leave=False)):
        if reference is not None:
            res = reference(data, seed + i)
        else:
            res = cached_nuts(amortizer.model, data, nuts_cache, run=not cached_only, seed=seed + i, **(nuts or {}))
        if res is None:
            report.nuts.append({"dataset": i, "ok": False, "not_run": True})
            continue
        t0 = time.perf_counter()
        draws = amortizer.posterior(data).sample(num_samples, seed=seed + i)
        report.amortized_seconds.append(time.perf_counter() - t0)
        report.nuts_seconds.append(res.seconds)
        if len(report.nuts_results) < keep_nuts:
            report.nuts_results.append(res)
        report.nuts.append(
            {
                "dataset": i,
                "ok": res.ok,
                "r_hat_max": max(res.r_hat.values()),
                "ess_bulk_min": min(res.ess_bulk.values()),
                "divergences": res.divergences,
                "parameterization": res.parameterization,
                "seconds": res.seconds,
            }
        )
        if not res.ok:
            log.warning("dataset %d: NUTS failed its checks (%s); left out of the comparison", i, res.summary())
            continue
        for row in compare(draws, res.samples, levels):
            report.rows.append({**row, "dataset": i})
    if report.rows:
        report.summary = summarize(report.rows, by="level")
    return report
