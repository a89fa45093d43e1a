"""``amortize sample`` and ``amortize ppc``: draws of one dataset's posterior, and checks of the model on it.

Both say whether the draws can be trusted. ``sample`` estimates Pareto k from ``--k-sets`` independent
sets of ``--num-samples`` draws: it prints the pooled k with the range over the sets (its Monte Carlo
spread) and the decision, and writes them into the output (``.nc``: ``sample_stats`` attributes;
``.csv``: ``NAME.diagnostics.json`` beside it). ``--correct`` returns PSIS-resampled draws where k <= 0.7.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..checkpoint import write_text
from ..errors import ConfigError
from ..rundir import make_dirs, remove_half_made
from ..validate import plots
from ..validate.metrics import format_table
from ..validate.workflow_plots import ppc_figure
from .common import _note, _read_data, _warn, _warn_diagnostics, load_run
from .output import _draws_csv, _write_json, _write_netcdf

__all__ = ["cmd_sample", "cmd_ppc", "k_line", "PPC_COLUMNS"]

PPC_COLUMNS = ("statistic", "level", "observed", "replicated_mean", "replicated_5%", "replicated_95%", "p_value")


def k_line(diag: dict[str, Any]) -> str:
    """``pareto k 0.42 (4 sets of 1000 draws: 0.38-0.47), importance ESS 2100/4000: ok``."""
    sets = diag.get("pareto_k_sets", [])
    known = [k for k in sets if k == k]  # NaN: a set too small (< 25 draws) to estimate k
    spread = f"{min(known):.2f}-{max(known):.2f}" if known else "too few draws per set to estimate"
    spread = f" ({len(sets)} sets of {diag['num_samples'] // max(1, len(sets))} draws: {spread})"
    decision = "ok" if diag["ok"] else f"NOT ok ({diag['reason']})"
    return (
        f"pareto k {diag['pareto_k']:.2f}{spread if len(sets) > 1 else ''},"
        f" importance ESS {diag['ess']:.0f}/{diag['num_samples']}: {decision}"
    )


def cmd_sample(args: argparse.Namespace) -> int:
    """``amortize sample``: amortized (or ``--correct``: PSIS-corrected) posterior draws for one dataset."""
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".nc", ".csv"):
        raise ConfigError(f"--out {out}: the name must end in .nc (ArviZ NetCDF) or .csv")
    cfg, _, amortizer = load_run(args.run_dir, device=args.device)
    post = amortizer.posterior(_read_data(cfg, args, amortizer))
    diag = post.diagnostics(num_samples=args.num_samples, seed=args.seed, repeats=args.k_sets)
    _warn_diagnostics(diag, hint="check with 'amortize validate RUN_DIR --data' (NUTS) or 'amortize ppc'")
    line = k_line(diag)
    what, draws, corrected = "draws", None, False
    if args.correct:
        draws = post.sample(args.num_samples, args.seed, correct=True)
        corrected = bool(draws.corrected)
        if corrected:
            what = f"PSIS-corrected draws (from {draws.num_proposals} proposals, k {draws.pareto_k:.2f})"
        else:
            _warn(
                f"--correct: not applied, Pareto k {draws.pareto_k:.2f} of the proposals > 0.7; draws are uncorrected"
            )
    record = {
        **diag,
        "corrected": corrected,
        "correction_pareto_k": draws.pareto_k if draws is not None else None,
        "seed": args.seed,
        "draws": args.num_samples,
    }
    if out is None:
        frame = post.summary(args.num_samples, args.seed, correct=args.correct)
        print(frame.to_string(float_format=lambda x: f"{x:.3f}"))
        print(line)
        return 0
    _note(args, line)
    if out.suffix == ".nc":
        _write_netcdf(post, out, args.num_samples, args.seed, correct=args.correct, record=record)
    else:
        made = make_dirs(out.parent, exist_ok=True)
        try:
            write_text(out, _draws_csv(draws if draws is not None else post.sample(args.num_samples, args.seed)))
            _write_json(out.with_suffix(".diagnostics.json"), record)
        except OSError:
            remove_half_made(out.parent, made, files=False)
            raise
    print(f"wrote {args.num_samples} {what} to {out} ({'ok' if diag['ok'] else 'NOT ok: ' + diag['reason']})")
    if draws is not None and not corrected:
        print(f"the draws are uncorrected: Pareto k {draws.pareto_k:.2f} of the correction's proposals > 0.7")
    return 0


def cmd_ppc(args: argparse.Namespace) -> int:
    """``amortize ppc``: posterior predictive p-values of test statistics per level, a table, JSON and PNG."""
    cfg, _, amortizer = load_run(args.run_dir, device=args.device)
    data = _read_data(cfg, args, amortizer)
    post = amortizer.posterior(data)
    diag = post.diagnostics(num_samples=1000, seed=args.seed, repeats=1)
    _warn_diagnostics(diag, hint="the replicated data come from draws that may be off")
    res = post.ppc(args.num_samples, seed=args.seed)
    print(f"{args.run_dir}: posterior predictive check on {args.data} ({res.num_samples} replicated datasets)")
    print(format_table(res.rows, PPC_COLUMNS))
    if res.extreme:
        print(f"p-value below 0.05 or above 0.95: {', '.join(res.extreme)}")
    else:
        print("no statistic has a p-value below 0.05 or above 0.95")
    run = Path(args.run_dir)
    name = Path(args.data).stem
    out = Path(args.json) if args.json else run / f"ppc-{name}.json"
    written = [_write_json(out, {"run_dir": str(run), "data": str(args.data), "seed": args.seed, **res.to_dict()})]
    if plots.available():
        written.append(plots.save_png(ppc_figure(res), out.with_suffix(".png")))
    else:
        _warn("no figure: matplotlib is not installed (pip install 'amortize[arviz]')")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
