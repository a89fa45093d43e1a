"""What ``amortize ppc`` and ``amortize sample`` compute and write about one dataset's posterior: values, never prints.

Both say whether the draws can be trusted: :func:`draw_sample` estimates Pareto k from ``k_sets``
independent sets of draws (:func:`k_line` is the line that says the pooled k, its range over the sets
and the decision), and :func:`ppc_run` checks the model on the data; the problems of the draws are
logged as warnings (:func:`warn_diagnostics`), the reports written atomically.

Example:
    >>> drawn = draw_sample(amortizer.posterior(data), 1000, seed=0, k_sets=4, correct=True)  # doctest: +SKIP
    >>> k_line(drawn.diagnostics)  # doctest: +SKIP
    'pareto k 0.42 (4 sets of 1000 draws: 0.38-0.47), importance ESS 2100/4000: ok'
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import HierarchicalData
from ..files import write_json
from ..importance import K_THRESHOLD
from . import plots
from .workflow_plots import ppc_figure

if TYPE_CHECKING:
    from ..amortizer import Amortizer
    from ..posterior import Posterior
    from ..predictive import PPCResult

__all__ = ["PPCRun", "Drawn", "warn_diagnostics", "k_line", "local_line", "ppc_run", "draw_sample", "PPC_COLUMNS"]

log = logging.getLogger(__name__)
PPC_COLUMNS = ("statistic", "level", "observed", "replicated_mean", "replicated_5%", "replicated_95%", "p_value")


def warn_diagnostics(diag: dict[str, Any], hint: str = "") -> None:
    """Each problem of a posterior's diagnostics as one logged warning (``hint``: what to do next)."""
    for flag in diag["flags"]:
        log.warning(f"outside the training range: {flag}")
    k = diag["pareto_k"]
    if k > K_THRESHOLD:
        log.warning(f"Pareto k {k:.2f} > {K_THRESHOLD}: do not trust these draws{'; ' + hint if hint else ''}")


def local_line(diag: dict[str, Any]) -> str:
    """``local SBC (reported, not deciding; 200 replicates x 49 draws, family-wise level 0.01): passed,
    smallest p 0.21 ('tau', shift +0.05 sd)``, or why it was skipped; ``""`` where it was not run."""
    res = diag.get("local_sbc")
    if not res:
        return ""
    if "quantities" not in res:
        return f"local SBC: {'failed' if res['ok'] is False else 'skipped'} ({res['skipped']})"
    worst = res["worst"]
    q = res["quantities"][worst]
    return (
        f"local SBC (reported, not deciding; {res['replicates']} replicates x {res['draws']} draws, family-wise"
        f" level {res['alpha']}): {'passed' if res['ok'] else 'outside its band'}, smallest p {q['p_value']:.2g}"
        f" ('{worst}', shift {q['shift']:+.2f} sd)"
    )


def verdict_word(diag: dict[str, Any]) -> str:
    """``ok``, ``NOT ok (reason)``, or ``not judged (reason)`` (``ok`` None: a streamed dataset)."""
    return "ok" if diag["ok"] else f"{'NOT ok' if diag['ok'] is False else 'not judged'} ({diag['reason']})"


def k_line(diag: dict[str, Any]) -> str:
    """``pareto k 0.42 (4 sets of 1000 draws: 0.38-0.47), importance ESS 2100/4000, globals' shift 0.12 sd
    ('tau'): ok``; the shift (:func:`amortize.shift.weighted_shift`) only where the k is usable (<= 0.7)."""
    sets = diag.get("pareto_k_sets", [])
    known = [k for k in sets if k == k]  # NaN: a set too small (< 25 draws) to estimate k
    spread = f"{min(known):.2f}-{max(known):.2f}" if known else "too few draws per set to estimate"
    spread = f" ({len(sets)} sets of {diag['num_samples'] // max(1, len(sets))} draws: {spread})"
    decision = verdict_word(diag)
    shift = diag.get("shift")
    shift = f", globals' shift {shift['z']:.2f} sd ('{shift['site']}')" if shift and diag["pareto_k"] <= 0.7 else ""
    return (
        f"pareto k {diag['pareto_k']:.2f}{spread if len(sets) > 1 else ''},"
        f" importance ESS {diag['ess']:.0f}/{diag['num_samples']}{shift}: {decision}"
    )


@dataclass
class PPCRun:
    """A posterior predictive check: the draws' diagnostics, the result and the files written."""

    diagnostics: dict[str, Any]
    result: PPCResult
    written: list[Path]


def ppc_run(
    amortizer: Amortizer,
    data: HierarchicalData,
    run_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    num_samples: int = 500,
    seed: int = 0,
    json_path: str | os.PathLike | None = None,
) -> PPCRun:
    """Posterior predictive p-values of test statistics per level; writes ``json_path`` (default
    ``RUN_DIR/ppc-<data stem>.json``) and the figure beside it as PNG."""
    post = amortizer.posterior(data)
    diag = post.diagnostics(num_samples=1000, seed=seed, repeats=1)
    warn_diagnostics(diag, hint="the replicated data come from draws that may be off")
    res = post.ppc(num_samples, seed=seed)
    run = Path(run_dir)
    out = Path(json_path) if json_path else run / f"ppc-{Path(data_path).stem}.json"
    written = [write_json(out, {"run_dir": str(run), "data": str(data_path), "seed": seed, **res.to_dict()})]
    if plots.available():
        written.append(plots.save_png(ppc_figure(res), out.with_suffix(".png")))
    else:
        log.warning("no figure: matplotlib is not installed (pip install 'amortize[arviz]')")
    return PPCRun(diag, res, written)


@dataclass
class Drawn:
    """Draws of one dataset's posterior for ``amortize sample``: the diagnostics, the corrected draws
    (None: not asked for), whether the correction applied, and the ``record`` written with the draws."""

    diagnostics: dict[str, Any]
    draws: Any
    corrected: bool
    record: dict[str, Any]


def draw_sample(
    post: Posterior, num_samples: int, seed: int = 0, k_sets: int = 4, correct: bool = False, local_sbc: bool = False
) -> Drawn:
    """Pareto k from ``k_sets`` independent sets of ``num_samples`` draws (with ``local_sbc`` the local SBC
    too), and with ``correct`` the PSIS-resampled draws (applied where the proposals' k <= 0.7); problems
    are logged as warnings."""
    diag = post.diagnostics(num_samples=num_samples, seed=seed, repeats=k_sets, local_sbc=local_sbc)
    warn_diagnostics(diag, hint="check with 'amortize validate RUN_DIR --data' (NUTS) or 'amortize ppc'")
    draws = post.sample(num_samples, seed, correct=True) if correct else None
    corrected = bool(draws.corrected) if draws is not None else False
    if draws is not None and not corrected:
        log.warning(
            f"--correct: not applied, Pareto k {draws.pareto_k:.2f} of the proposals > 0.7; draws are uncorrected"
        )
    record = {
        **diag,
        "corrected": corrected,
        "correction_pareto_k": draws.pareto_k if draws is not None else None,
        "seed": seed,
        "draws": num_samples,
    }
    return Drawn(diag, draws, corrected, record)
