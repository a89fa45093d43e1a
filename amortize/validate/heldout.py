"""Amortized posterior against NUTS on the same model and data, dataset by dataset.

:func:`against_nuts` is the one comparison behind ``amortize validate``, ``amortize bench``, the
README's main job and the benchmark scripts: for each dataset it times the amortized draws and a
NUTS run, compares them site by site (z-error, sd ratio, 90% coverage, W1) and pools the rows per
level, in a :class:`Report` (which :func:`amortize.validate.bench.against_reference` also returns).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..data import HierarchicalData
from ..simulate import simulate
from .metrics import ReferenceMoments, compare, format_table, summarize
from .nuts import NUTSResult, cached_nuts

if TYPE_CHECKING:
    from ..amortizer import Amortizer

__all__ = ["heldout_datasets", "against_nuts", "Report", "Compared", "TABLE_COLUMNS"]

log = logging.getLogger(__name__)
# columns of the per-level table after "level" (per-site tables: TABLE_COLUMNS["site"] after "site")
TABLE_COLUMNS = {
    "level": ("z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90", "count"),
    "site": ("count", "z_median", "z_p90", "sd_ratio_median", "coverage90", "w1_median"),
}


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
class Compared:
    """One dataset's amortized draws beside its reference, kept for figures.

    Attributes:
        dataset: the dataset's position in the comparison.
        draws: site -> amortized draws ``[n, *site_shape]`` (the draws that were compared).
        reference: site -> reference draws, or :class:`~amortize.validate.metrics.ReferenceMoments`.
        name: what the reference is (``"NUTS"``, ``"NUTS (failed its checks)"``, ``"posteriordb"``).
        labels: level -> group labels of the dataset.
    """

    dataset: int
    draws: dict[str, torch.Tensor]
    reference: Mapping[str, torch.Tensor] | ReferenceMoments
    name: str
    labels: dict[str, list[Any]] = field(default_factory=dict)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class Report:
    """Per-site rows (with the dataset index), their per-level summary, timings, checks and diagnostics.

    Attributes:
        rows: :func:`~amortize.validate.metrics.compare` rows with ``dataset`` added.
        summary: the rows pooled per level (:func:`~amortize.validate.metrics.summarize`).
        amortized_seconds: per dataset compared, the time of the amortized draws.
        nuts_seconds: per dataset compared, the NUTS run's time (empty against a published reference).
        nuts: per dataset, the NUTS run's checks (:meth:`~amortize.validate.nuts.NUTSResult.checks`).
        diagnostics: per dataset, the amortized posterior's diagnostics (Pareto k, training-range flags).
        compared: the first datasets' draws and references, for figures (``keep`` of :func:`against_nuts`).
        corrected_rows, corrected_summary: the same for ``sample(correct=True)`` (``correct`` of
            :func:`against_nuts`; uncorrected draws where the correction did not apply);
        corrected: per dataset compared, whether the correction applied and its proposals' Pareto k.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    amortized_seconds: list[float] = field(default_factory=list)
    nuts_seconds: list[float] = field(default_factory=list)
    nuts: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    compared: list[Compared] = field(default_factory=list, repr=False)
    corrected_rows: list[dict[str, Any]] = field(default_factory=list)
    corrected_summary: list[dict[str, Any]] = field(default_factory=list)
    corrected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """Mean NUTS seconds per dataset over mean amortized seconds per dataset (None without NUTS)."""
        a, n = _mean(self.amortized_seconds), _mean(self.nuts_seconds)
        if a is None or n is None:
            return None
        return n / a if a > 0 else float("nan")

    def timings(self) -> dict[str, float | None]:
        """``amortized_s``, ``nuts_s`` (mean seconds per dataset) and ``speedup``: the table's timing columns."""
        return {
            "amortized_s": _mean(self.amortized_seconds),
            "nuts_s": _mean(self.nuts_seconds),
            "speedup": self.speedup,
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary, timings, NUTS checks, diagnostics and rows (plain values; tuples for element indices)."""
        t = self.timings()
        return {
            "summary": self.summary,
            "amortized_seconds_per_dataset": t["amortized_s"],
            "nuts_seconds_per_dataset": t["nuts_s"],
            "speedup": t["speedup"],
            "nuts": self.nuts,
            "diagnostics": self.diagnostics,
            "rows": self.rows,
            **({"corrected": self.corrected, "corrected_summary": self.corrected_summary} if self.corrected else {}),
            **({"corrected_rows": self.corrected_rows} if self.corrected else {}),
        }

    def table(self, by: str = "level") -> str:
        """The summary per level (or per ``site``) with the timing columns."""
        if by not in TABLE_COLUMNS:
            raise ValueError(f"Report.table: by must be 'level' or 'site', got {by!r}")
        summary = self.summary if by == "level" else summarize(self.rows, by=by)
        rows = [{**s, **self.timings()} for s in summary]
        return format_table(rows, (by, *TABLE_COLUMNS[by], "amortized_s", "nuts_s", "speedup"))


def against_nuts(
    amortizer: Amortizer,
    datasets: list[HierarchicalData],
    num_samples: int = 1000,
    nuts: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    nuts_cache: str | None = None,
    keep: int = 0,
    cached_only: bool = False,
    reference: Callable[[HierarchicalData, int], NUTSResult] | None = None,
    diagnose: bool = False,
    k_sets: int = 4,
    correct: bool = False,
) -> Report:
    """Compare the amortized posterior with NUTS on each dataset (same model, same data).

    Datasets whose NUTS run fails its own checks (R-hat, ESS, divergences after the
    reparameterization retry) are reported but left out of the accuracy rows. ``nuts_cache``: a
    folder where NUTS results are kept and reused for the same model, data and settings;
    ``keep``: how many datasets' draws and NUTS draws the report keeps (``report.compared``), for
    figures; ``cached_only``: compare only on datasets whose reference is in ``nuts_cache`` (the
    others are listed in ``report.nuts`` as not run). ``reference(data, seed) -> NUTSResult``
    replaces Pyro NUTS, e.g. NUTS on a NumPyro twin of the model (``run_numpyro_nuts`` in
    ``experiments/bench/numpyro_models.py``). ``diagnose``: add each dataset's posterior
    diagnostics (Pareto k, training-range flags; ``num_samples`` draws, seed ``seed + i``) to
    ``report.diagnostics``; ``k_sets`` independent sets of draws give k's spread (the pooled k decides).
    ``correct``: also compare ``sample(num_samples, correct=True)`` (``report.corrected_*``).
    """
    report = Report()
    levels = {s.name: s.level for s in amortizer.structure.latents}
    amortizer.posterior(datasets[0]).sample(10)  # warm-up: first-call overheads are not inference time
    for i, data in enumerate(tqdm(datasets, disable=None if progress else True, desc="validate", leave=False)):
        if diagnose:
            report.diagnostics.append(
                {"dataset": i, **amortizer.posterior(data).diagnostics(num_samples, seed + i, k_sets)}
            )
        if reference is not None:
            res = reference(data, seed + i)
        else:
            res = cached_nuts(amortizer.model, data, nuts_cache, run=not cached_only, seed=seed + i, **(nuts or {}))
        if res is None:
            report.nuts.append({"dataset": i, "ok": False, "not_run": True})
            continue
        t0 = time.perf_counter()
        post = amortizer.posterior(data)  # timed with its draws, as a user's call is
        draws = post.sample(num_samples, seed=seed + i)
        report.amortized_seconds.append(time.perf_counter() - t0)
        report.nuts_seconds.append(res.seconds)
        if len(report.compared) < keep:
            name = "NUTS" if res.ok else "NUTS (failed its checks)"
            report.compared.append(Compared(i, dict(draws), res.samples, name, dict(data.labels)))
        report.nuts.append({"dataset": i, **res.checks()})
        if not res.ok:
            log.warning("dataset %d: NUTS failed its checks (%s); left out of the comparison", i, res.summary())
            continue
        for row in compare(draws, res.samples, levels, data.labels):
            report.rows.append({**row, "dataset": i})
        if correct:
            fixed = post.sample(num_samples, seed=seed + i, correct=True)
            report.corrected.append({"dataset": i, "applied": bool(fixed.corrected), "pareto_k": fixed.pareto_k})
            report.corrected_rows += [{**r, "dataset": i} for r in compare(fixed, res.samples, levels, data.labels)]
    if report.rows:
        report.summary = summarize(report.rows, by="level")
    if report.corrected_rows:
        report.corrected_summary = summarize(report.corrected_rows, by="level")
    return report
